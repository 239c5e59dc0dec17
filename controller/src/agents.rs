//! What agents need from the controller: the instances their node should
//! run (a snapshot, then changes) and a place to report what actually runs.
//!
//! Reported state is kept apart from the instance records (under
//! `/keel/status/`), so that frequent reports never collide with the
//! reconciler's compare-and-swap on the records themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use keel_manifest::AppManifest;
use keel_protocol::{InstanceRef, InstanceSpec, InstanceStatus, StatusReport, StreamMessage};
use keel_store::{EventKind, Op, RangeRequest, Store, Txn};
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
}

#[derive(Debug, Clone)]
pub struct Agents {
    store: Arc<dyn Store>,
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

impl Agents {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The manifest of a revision, read once per stream.
    async fn manifest(
        &self,
        cache: &mut BTreeMap<(String, String, u64), AppManifest>,
        record: &InstanceRecord,
    ) -> Result<Option<AppManifest>, ApiError> {
        let key = (record.project.clone(), record.app.clone(), record.revision);
        if let Some(manifest) = cache.get(&key) {
            return Ok(Some(manifest.clone()));
        }
        let kv = self
            .store
            .get(&keys::revision(
                &record.project,
                &record.app,
                record.revision,
            ))
            .await?;
        let Some(kv) = kv else { return Ok(None) };
        let revision: RevisionRecord = decode(&kv)?;
        cache.insert(key, revision.manifest.clone());
        Ok(Some(revision.manifest))
    }

    async fn spec(
        &self,
        cache: &mut BTreeMap<(String, String, u64), AppManifest>,
        record: &InstanceRecord,
    ) -> Result<Option<InstanceSpec>, ApiError> {
        Ok(self
            .manifest(cache, record)
            .await?
            .map(|manifest| InstanceSpec {
                instance: instance_ref(record),
                revision: record.revision,
                manifest,
            }))
    }

    /// Starts the node's stream: a snapshot now, then every change, as
    /// messages on the returned channel until its receiver is dropped.
    pub async fn watch(&self, node: &str) -> Result<mpsc::Receiver<StreamMessage>, ApiError> {
        let page = self
            .store
            .range(&RangeRequest::prefix(instance_keys::instances(None)))
            .await?;
        let generation = page.revision;
        let mut cache = BTreeMap::new();
        let mut sent: BTreeSet<InstanceRef> = BTreeSet::new();
        let mut instances = Vec::new();
        for kv in &page.kvs {
            let record: InstanceRecord = decode(kv)?;
            if record.node.as_deref() == Some(node)
                && let Some(spec) = self.spec(&mut cache, &record).await?
            {
                sent.insert(spec.instance.clone());
                instances.push(spec);
            }
        }
        let mut changes = self
            .store
            .watch(&instance_keys::instances(None), generation + 1)
            .await?;
        let (tx, rx) = mpsc::channel(64);
        let _ = tx.try_send(StreamMessage::Snapshot {
            generation,
            instances,
        });
        let (this, node) = (self.clone(), node.to_owned());
        tokio::spawn(async move {
            loop {
                // A client that went away ends the task (and its watch) at
                // once, not at the next change.
                let event = tokio::select! {
                    event = changes.next() => event,
                    () = tx.closed() => return,
                };
                let Some(Ok(event)) = event else { break };
                let generation = event.revision();
                let message = match event.kind {
                    EventKind::Put => {
                        let Ok(record) = decode::<InstanceRecord>(&event.kv) else {
                            continue;
                        };
                        let reference = instance_ref(&record);
                        if record.node.as_deref() == Some(node.as_str()) {
                            match this.spec(&mut cache, &record).await {
                                Ok(Some(instance)) => {
                                    sent.insert(reference);
                                    StreamMessage::Put {
                                        generation,
                                        instance: Box::new(instance),
                                    }
                                }
                                Ok(None) => continue,
                                Err(_) => break,
                            }
                        } else if sent.remove(&reference) {
                            StreamMessage::Delete {
                                generation,
                                instance: reference,
                            }
                        } else {
                            continue;
                        }
                    }
                    EventKind::Delete => match parse_instance_key(&event.kv.key) {
                        Some(reference) if sent.remove(&reference) => StreamMessage::Delete {
                            generation,
                            instance: reference,
                        },
                        _ => continue,
                    },
                };
                if tx.send(message).await.is_err() {
                    return;
                }
            }
            // The watch ended (store closing, compaction): dropping the
            // sender ends the stream, and the agent reconnects for a new
            // snapshot.
        });
        Ok(rx)
    }

    /// Records a node's report: the state of every instance it runs.
    /// Instances not placed on that node are ignored (the agent is about to
    /// stop them); unchanged ones are not written again.
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
        if !ops.is_empty() {
            self.store.txn(Txn::new().and_then(ops)).await?;
        }
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
