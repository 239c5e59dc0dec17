//! What agents need from the controller: the instances their node should
//! run (a snapshot, then changes) and a place to report what actually runs.
//!
//! Reported state is kept apart from the instance records (under
//! `/keel/status/`), so that frequent reports never collide with the
//! reconciler's compare-and-swap on the records themselves.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use keel_manifest::AppManifest;
use keel_protocol::{InstanceRef, InstanceSpec, InstanceStatus, StatusReport, StreamMessage};
use keel_store::{EventKind, Op, RangeRequest, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::api::ApiError;
use crate::apps::{decode, encode, list_records};
use crate::instances::{InstanceRecord, keys as instance_keys};
use crate::records::{RevisionRecord, keys, now_ms};

pub mod status_keys {
    pub fn status(project: &str, app: &str, id: &str) -> String {
        format!("/keel/status/{project}/{app}/{id}")
    }
    pub fn statuses(app: Option<(&str, &str)>) -> String {
        match app {
            Some((project, app)) => format!("/keel/status/{project}/{app}/"),
            None => "/keel/status/".to_owned(),
        }
    }
}

/// An instance's reported state, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRecord {
    pub node: String,
    pub status: InstanceStatus,
    pub updated_at_ms: u64,
}

/// An instance as the API shows it: where it should run and how it does.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct InstanceView {
    pub project: String,
    pub app: String,
    pub id: String,
    pub revision: u64,
    /// Where it is placed; absent while no node fits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why no node fits, as the scheduler counted it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
    /// `pending` until placed, `placed` until its agent reports, then the
    /// agent's word: `pulling`, `starting`, `running`, `exited`, `failed`.
    pub state: String,
    pub ready: bool,
    pub restarts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Port name to the address it is published on.
    pub ports: BTreeMap<String, String>,
    /// CPU in use, in thousandths of a core, as its agent last sampled it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    /// Memory in use, in bytes (without the page cache), as last sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Agents {
    store: Arc<dyn Store>,
    fanout: Arc<tokio::sync::Mutex<Option<Arc<Fanout>>>>,
    /// The fan-out in `fanout`, readable without waiting for a start.
    current: Arc<std::sync::Mutex<Option<Arc<Fanout>>>>,
    /// Log requests sent to agents and not yet answered, by request id.
    logs: Arc<std::sync::Mutex<BTreeMap<String, PendingLog>>>,
}

/// How long an agent has to start answering a log request.
pub const LOG_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug)]
struct PendingLog {
    node: String,
    sink: mpsc::Sender<bytes::Bytes>,
}

/// One instance's part of a log request: the raw bytes its agent sends,
/// until the agent's answer ends (or the node never answers).
#[derive(Debug)]
pub struct LogPart {
    pub instance: InstanceRef,
    pub node: String,
    pub bytes: mpsc::Receiver<bytes::Bytes>,
}

/// Forgets the log requests of a client that went away, so that their
/// agents' answers are refused and they stop reading.
#[derive(Debug)]
pub struct LogRequests {
    ids: Vec<String>,
    registry: Arc<std::sync::Mutex<BTreeMap<String, PendingLog>>>,
}

impl Drop for LogRequests {
    fn drop(&mut self) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        for id in &self.ids {
            registry.remove(id);
        }
    }
}

/// One store watch on all instances, fanned out to the nodes' streams.
///
/// Every node's stream needs the same events, filtered by node; one watch
/// and an index of specs by node make a change cost one decode and one
/// message to the node concerned, whatever the number of nodes, and a new
/// stream's snapshot a lookup rather than a read of every instance.
#[derive(Debug)]
struct Fanout {
    index: std::sync::Mutex<Index>,
}

#[derive(Debug, Default)]
struct Index {
    generation: i64,
    /// Each node's instances, with everything needed to run them.
    by_node: BTreeMap<String, BTreeMap<InstanceRef, InstanceSpec>>,
    /// Where each instance is, to find it again on a delete.
    node_of: BTreeMap<InstanceRef, String>,
    /// The open streams of each node, by subscription id. A stream leaves
    /// when its connection ends (its [`NodeStream`] is dropped), or when it
    /// falls 64 messages behind.
    subscribers: BTreeMap<String, BTreeMap<u64, mpsc::Sender<StreamMessage>>>,
    next_subscriber: u64,
    manifests: BTreeMap<(String, String, u64), AppManifest>,
    stopped: bool,
}

impl Fanout {
    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stopped(&self) -> bool {
        self.lock().stopped
    }

    async fn start(store: Arc<dyn Store>) -> Result<Arc<Fanout>, ApiError> {
        let page = store
            .range(&RangeRequest::prefix(instance_keys::instances(None)))
            .await?;
        let mut index = Index {
            generation: page.revision,
            ..Index::default()
        };
        for kv in &page.kvs {
            let record: InstanceRecord = decode(kv)?;
            index.put(store.as_ref(), record).await?;
        }
        let mut changes = store
            .watch(&instance_keys::instances(None), page.revision + 1)
            .await?;
        let fanout = Arc::new(Fanout {
            index: std::sync::Mutex::new(index),
        });
        let this = Arc::downgrade(&fanout);
        // Weak, so that the fan-out never keeps a closed controller's store
        // open.
        let store = Arc::downgrade(&store);
        tokio::spawn(async move {
            while let Some(Ok(event)) = changes.next().await {
                let Some(fanout) = this.upgrade() else { return };
                let generation = event.revision();
                // Decoding and reading the manifest happen outside the lock.
                let record = match event.kind {
                    EventKind::Put => decode::<InstanceRecord>(&event.kv).ok(),
                    EventKind::Delete => None,
                };
                let manifest = match &record {
                    Some(record) if record.node.is_some() => {
                        let known = fanout.lock().manifests.get(&manifest_key(record)).cloned();
                        match (known, store.upgrade()) {
                            (Some(manifest), _) => Some(manifest),
                            (None, Some(store)) => revision_manifest(store.as_ref(), record)
                                .await
                                .ok()
                                .flatten(),
                            (None, None) => return,
                        }
                    }
                    _ => None,
                };
                let mut index = fanout.lock();
                index.generation = generation;
                match (record, event.kind) {
                    (Some(record), _) => index.apply_put(record, manifest, generation),
                    (None, EventKind::Delete) => {
                        if let Some(reference) = parse_instance_key(&event.kv.key) {
                            index.remove(&reference, generation);
                        }
                    }
                    (None, EventKind::Put) => {}
                }
            }
            // The watch ended (the store closing, or history compacted
            // under it): every stream ends, and agents reconnect for a
            // fresh snapshot from a fresh fan-out.
            if let Some(fanout) = this.upgrade() {
                let mut index = fanout.lock();
                index.stopped = true;
                index.subscribers.clear();
            }
        });
        Ok(fanout)
    }
}

fn manifest_key(record: &InstanceRecord) -> (String, String, u64) {
    (record.project.clone(), record.app.clone(), record.revision)
}

async fn revision_manifest(
    store: &dyn Store,
    record: &InstanceRecord,
) -> Result<Option<AppManifest>, ApiError> {
    let Some(kv) = store
        .get(&keys::revision(
            &record.project,
            &record.app,
            record.revision,
        ))
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(decode::<RevisionRecord>(&kv)?.manifest))
}

impl Index {
    /// Adds an instance while the index is being built.
    async fn put(&mut self, store: &dyn Store, record: InstanceRecord) -> Result<(), ApiError> {
        if record.node.is_none() {
            return Ok(());
        }
        let key = manifest_key(&record);
        if !self.manifests.contains_key(&key)
            && let Some(manifest) = revision_manifest(store, &record).await?
        {
            self.manifests.insert(key.clone(), manifest);
        }
        let manifest = self.manifests.get(&key).cloned();
        self.apply_put(record, manifest, self.generation);
        Ok(())
    }

    /// An instance was written: it is now on its node (or on none), and
    /// the nodes concerned hear of it.
    fn apply_put(
        &mut self,
        record: InstanceRecord,
        manifest: Option<AppManifest>,
        generation: i64,
    ) {
        let reference = instance_ref(&record);
        match (&record.node, manifest) {
            (Some(node), Some(manifest)) => {
                self.manifests
                    .insert(manifest_key(&record), manifest.clone());
                if self.node_of.get(&reference).is_some_and(|n| n != node) {
                    self.remove(&reference, generation);
                }
                let spec = InstanceSpec {
                    instance: reference.clone(),
                    revision: record.revision,
                    manifest,
                };
                let unchanged =
                    self.by_node.get(node).and_then(|s| s.get(&reference)) == Some(&spec);
                self.node_of.insert(reference.clone(), node.clone());
                self.by_node
                    .entry(node.clone())
                    .or_default()
                    .insert(reference, spec.clone());
                if !unchanged {
                    self.send(
                        node,
                        StreamMessage::Put {
                            generation,
                            instance: Box::new(spec),
                        },
                    );
                }
            }
            _ => self.remove(&reference, generation),
        }
    }

    fn remove(&mut self, reference: &InstanceRef, generation: i64) {
        let Some(node) = self.node_of.remove(reference) else {
            return;
        };
        if let Some(specs) = self.by_node.get_mut(&node) {
            specs.remove(reference);
            if specs.is_empty() {
                self.by_node.remove(&node);
            }
        }
        self.send(
            &node,
            StreamMessage::Delete {
                generation,
                instance: reference.clone(),
            },
        );
    }

    /// Sends to the node's streams; a stream that is gone, or too slow to
    /// take 64 messages, is dropped (its agent reconnects for a snapshot).
    fn send(&mut self, node: &str, message: StreamMessage) {
        self.send_counted(node, message);
    }

    /// As [`Index::send`]; says how many streams took it.
    fn send_counted(&mut self, node: &str, message: StreamMessage) -> usize {
        let Some(senders) = self.subscribers.get_mut(node) else {
            return 0;
        };
        senders.retain(|_, tx| tx.try_send(message.clone()).is_ok());
        let sent = senders.len();
        if senders.is_empty() {
            self.subscribers.remove(node);
        }
        sent
    }
}

fn instance_ref(record: &InstanceRecord) -> InstanceRef {
    InstanceRef {
        project: record.project.clone(),
        app: record.app.clone(),
        id: record.id.clone(),
    }
}

/// `/keel/instances/{project}/{app}/{id}` back into its parts.
fn parse_instance_key(key: &str) -> Option<InstanceRef> {
    let rest = key.strip_prefix(&instance_keys::instances(None))?;
    let mut parts = rest.splitn(3, '/');
    Some(InstanceRef {
        project: parts.next()?.to_owned(),
        app: parts.next()?.to_owned(),
        id: parts.next()?.to_owned(),
    })
}

/// A node's desired-instances stream: the messages for one connection.
/// Dropping it (the connection ended) removes its subscription.
#[derive(Debug)]
pub struct NodeStream {
    messages: mpsc::Receiver<StreamMessage>,
    _subscription: Subscription,
}

impl futures::Stream for NodeStream {
    type Item = StreamMessage;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<StreamMessage>> {
        self.messages.poll_recv(cx)
    }
}

#[derive(Debug)]
struct Subscription {
    fanout: std::sync::Weak<Fanout>,
    node: String,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(fanout) = self.fanout.upgrade() else {
            return;
        };
        let mut index = fanout.lock();
        if let Some(streams) = index.subscribers.get_mut(&self.node) {
            streams.remove(&self.id);
            if streams.is_empty() {
                index.subscribers.remove(&self.node);
            }
        }
    }
}

impl Agents {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            fanout: Arc::default(),
            current: Arc::default(),
            logs: Arc::default(),
        }
    }

    /// Asks the agents of an app's placed instances for their logs (on
    /// their nodes' instance streams) and returns one part per instance,
    /// and the guard that withdraws the requests when dropped. A node
    /// without a stream, or one that does not answer within
    /// [`LOG_ANSWER_TIMEOUT`], gives a part with one line that says so.
    pub async fn request_logs(
        &self,
        project: &str,
        app: &str,
        tail: Option<u32>,
        follow: bool,
    ) -> Result<(Vec<LogPart>, LogRequests), ApiError> {
        let records: Vec<(InstanceRecord, _)> = list_records(
            self.store.as_ref(),
            &instance_keys::instances(Some((project, app))),
        )
        .await?;
        let fanout = self.fanout().await?;
        let mut parts = Vec::new();
        let mut ids = Vec::new();
        for (record, _) in records {
            let Some(node) = record.node.clone() else {
                continue;
            };
            let instance = instance_ref(&record);
            let id =
                crate::auth::new_token("logs").map_err(|e| ApiError::Internal(e.to_string()))?;
            // Small: an agent's answer waits for the client to read.
            let (sink, bytes) = mpsc::channel(16);
            self.logs.lock().unwrap_or_else(|p| p.into_inner()).insert(
                id.clone(),
                PendingLog {
                    node: node.clone(),
                    sink: sink.clone(),
                },
            );
            ids.push(id.clone());
            let request = StreamMessage::Logs(keel_protocol::LogRequest {
                request: id.clone(),
                instance: instance.clone(),
                tail,
                follow,
            });
            let sent = fanout.lock().send_counted(&node, request);
            let registry = self.logs.clone();
            if sent == 0 {
                registry
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let _ = sink.try_send(bytes::Bytes::from(format!(
                    "keel: node {node} is not connected\n"
                )));
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(LOG_ANSWER_TIMEOUT).await;
                    let unanswered = registry
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    if let Some(pending) = unanswered {
                        let _ = pending.sink.try_send(bytes::Bytes::from(format!(
                            "keel: node {} did not answer within {} s\n",
                            pending.node,
                            LOG_ANSWER_TIMEOUT.as_secs()
                        )));
                    }
                });
            }
            parts.push(LogPart {
                instance,
                node,
                bytes,
            });
        }
        Ok((
            parts,
            LogRequests {
                ids,
                registry: self.logs.clone(),
            },
        ))
    }

    /// Where a node's answer to a log request goes; `None` when there is
    /// no such request for that node (answered already, withdrawn because
    /// its client went away, or never made).
    pub fn log_answer(&self, node: &str, request: &str) -> Option<mpsc::Sender<bytes::Bytes>> {
        let mut registry = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        match registry.get(request) {
            Some(pending) if pending.node == node => registry.remove(request).map(|p| p.sink),
            _ => None,
        }
    }

    /// Starts the node's stream: a snapshot now, then every change, until
    /// the returned stream is dropped (its connection ended), which
    /// unsubscribes it at once.
    pub async fn watch(&self, node: &str) -> Result<NodeStream, ApiError> {
        let fanout = self.fanout().await?;
        let (tx, rx) = mpsc::channel(64);
        let mut index = fanout.lock();
        let instances = index
            .by_node
            .get(node)
            .map(|specs| specs.values().cloned().collect())
            .unwrap_or_default();
        let _ = tx.try_send(StreamMessage::Snapshot {
            generation: index.generation,
            instances,
        });
        let id = index.next_subscriber;
        index.next_subscriber += 1;
        index
            .subscribers
            .entry(node.to_owned())
            .or_default()
            .insert(id, tx);
        drop(index);
        Ok(NodeStream {
            messages: rx,
            _subscription: Subscription {
                fanout: Arc::downgrade(&fanout),
                node: node.to_owned(),
                id,
            },
        })
    }

    /// How many desired-instance streams are open, of one node or of all.
    pub fn open_streams(&self, node: Option<&str>) -> usize {
        let current = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(fanout) = current else { return 0 };
        let index = fanout.lock();
        match node {
            Some(node) => index.subscribers.get(node).map_or(0, BTreeMap::len),
            None => index.subscribers.values().map(BTreeMap::len).sum(),
        }
    }

    /// The shared fan-out, started on first use (and again after it
    /// stopped, when its watch ended).
    async fn fanout(&self) -> Result<Arc<Fanout>, ApiError> {
        let mut slot = self.fanout.lock().await;
        if let Some(fanout) = slot.as_ref().filter(|f| !f.stopped()) {
            return Ok(fanout.clone());
        }
        let fanout = Fanout::start(self.store.clone()).await?;
        *slot = Some(fanout.clone());
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(fanout.clone());
        Ok(fanout)
    }

    /// Records a node's report: the state of every instance it runs.
    /// Instances not placed on that node are ignored (the agent is about to
    /// stop them); unchanged ones are not written again. Each instance's
    /// status is written atomically; a large report is written in several
    /// transactions (see `writes.rs`).
    pub async fn report(&self, node: &str, report: StatusReport) -> Result<usize, ApiError> {
        let mut ops = Vec::new();
        for status in report.instances {
            let r = &status.instance;
            let record = self
                .store
                .get(&instance_keys::instance(&r.project, &r.app, &r.id))
                .await?;
            let Some(record) = record else { continue };
            let record: InstanceRecord = decode(&record)?;
            if record.node.as_deref() != Some(node) {
                continue;
            }
            let key = status_keys::status(&r.project, &r.app, &r.id);
            if let Some(kv) = self.store.get(&key).await? {
                let old: StatusRecord = decode(&kv)?;
                if old.node == node && old.status == status {
                    continue;
                }
            }
            let record = StatusRecord {
                node: node.to_owned(),
                status,
                updated_at_ms: now_ms(),
            };
            ops.push(Op::put(key, encode(&record)?));
        }
        let written = ops.len();
        // Each status stands alone: split to fit etcd's transaction limit.
        crate::writes::write_split(self.store.as_ref(), ops).await?;
        Ok(written)
    }

    /// Instances with their reported state, of every app or of one.
    pub async fn instances(
        &self,
        app: Option<(&str, &str)>,
    ) -> Result<Vec<InstanceView>, ApiError> {
        let records: Vec<(InstanceRecord, _)> =
            list_records(self.store.as_ref(), &instance_keys::instances(app)).await?;
        let statuses: Vec<(StatusRecord, _)> =
            list_records(self.store.as_ref(), &status_keys::statuses(app)).await?;
        let statuses: BTreeMap<InstanceRef, StatusRecord> = statuses
            .into_iter()
            .map(|(s, _)| (s.status.instance.clone(), s))
            .collect();
        Ok(records
            .into_iter()
            .map(|(record, _)| {
                let reported = statuses
                    .get(&instance_ref(&record))
                    .filter(|s| Some(s.node.as_str()) == record.node.as_deref());
                let state = match (reported, &record.node) {
                    (Some(s), _) => serde_json::to_value(s.status.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    (None, Some(_)) => "placed".to_owned(),
                    (None, None) => "pending".to_owned(),
                };
                InstanceView {
                    state,
                    ready: reported.is_some_and(|s| s.status.ready),
                    restarts: reported.map_or(0, |s| s.status.restarts),
                    exit_code: reported.and_then(|s| s.status.exit_code),
                    reason: reported.and_then(|s| s.status.reason.clone()),
                    ports: reported.map(|s| s.status.ports.clone()).unwrap_or_default(),
                    cpu_millis: reported.and_then(|s| s.status.cpu_millis),
                    memory_bytes: reported.and_then(|s| s.status.memory_bytes),
                    project: record.project,
                    app: record.app,
                    id: record.id,
                    revision: record.revision,
                    node: record.node,
                    pending_reason: record.pending_reason,
                }
            })
            .collect())
    }
}
