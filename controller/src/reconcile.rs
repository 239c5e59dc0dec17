//! The app reconciler: turns apps into instances and places them.
//!
//! Level-triggered and idempotent: each pass reads everything it needs (a
//! [`Snapshot`]), [`plan`]s the changes from that alone, and writes each
//! change as a compare-and-swap on the record it read. A pass that loses a
//! race, or a controller killed between two writes, simply leaves work for
//! the next pass. Passes run when anything under `/keel/` changes (a store
//! watch) and at least every second.
//!
//! What a pass does, per app:
//! - removes instances of apps that are gone, and instances on nodes that
//!   are lost (their replacements are created in the same pass; when the
//!   node comes back its agent no longer finds them in its desired set);
//! - creates the missing instances of the current revision and removes
//!   surplus ones (unplaced first);
//! - removes the old revision's instances once the current revision has all
//!   its instances placed (until agents report readiness, placement is the
//!   signal; the rolling update proper waits for readiness);
//! - for a global app, keeps one instance on every node that matches;
//! - places unplaced instances with the scheduler, and records why when
//!   nothing fits (an event, only when the reason changes).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keel_manifest::{AppManifest, ConstraintOp, Instances};
use keel_scheduler as scheduler;
use keel_store::{Compare, CompareOp, Op, Revision, Store, Txn};

use crate::api::ApiError;
use crate::apps::{decode, encode, list_records};
use crate::instances::{InstanceRecord, keys as instance_keys};
use crate::nodes::alive_nodes;
use crate::records::{AppRecord, EventRecord, NodeRecord, RevisionRecord, keys, now_ms};

/// Everything a pass decides from.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub apps: Vec<(AppRecord, RevisionRecord)>,
    /// Each instance with the mod revision it was read at.
    pub instances: Vec<(InstanceRecord, Revision)>,
    pub nodes: Vec<NodeRecord>,
    /// Names of nodes whose heartbeats are current.
    pub alive: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Create(InstanceRecord),
    Update {
        record: InstanceRecord,
        mod_revision: Revision,
    },
    Delete {
        record: InstanceRecord,
        mod_revision: Revision,
    },
}

#[derive(Debug, Default, Clone)]
pub struct Plan {
    pub changes: Vec<Change>,
    pub events: Vec<EventRecord>,
}

fn event(app: &AppRecord, reason: &str, message: String) -> EventRecord {
    EventRecord {
        time_ms: now_ms(),
        project: Some(app.project.clone()),
        app: Some(app.name.clone()),
        reason: reason.to_owned(),
        message,
    }
}

fn app_id(project: &str, app: &str) -> scheduler::AppId {
    scheduler::AppId::new(format!("{project}/{app}"))
}

fn resources(manifest: &AppManifest) -> scheduler::Resources {
    scheduler::Resources {
        cpu_millis: manifest.resources.cpu_millis,
        memory_mb: manifest.resources.memory_mb,
    }
}

/// The scheduler's view of an app's manifest.
fn request(app: &AppRecord, manifest: &AppManifest) -> scheduler::AppRequest {
    let placement = &manifest.placement;
    let constraints = placement
        .constraints
        .iter()
        .filter_map(|c| match &c.op {
            ConstraintOp::Eq { value } => Some(scheduler::Constraint::eq(&c.key, value)),
            ConstraintOp::Ne { value } => Some(scheduler::Constraint::ne(&c.key, value)),
            ConstraintOp::In { values } => {
                Some(scheduler::Constraint::is_in(&c.key, values.clone()))
            }
            // The manifest was validated, so the pattern compiles.
            ConstraintOp::Regex { value } => keel_manifest::anchored_regex(value)
                .ok()
                .map(|re| scheduler::Constraint::regex(&c.key, re)),
        })
        .collect();
    scheduler::AppRequest {
        app: app_id(&app.project, &app.name),
        resources: resources(manifest),
        placement: scheduler::Placement {
            constraints,
            regions: placement.regions.clone(),
            zones: placement.zones.clone(),
            roles: placement.roles.clone(),
            spread_zones: placement.spread_zones,
        },
        strategy: match placement.strategy {
            keel_manifest::Strategy::LeastAllocated => scheduler::Strategy::LeastAllocated,
            keel_manifest::Strategy::BinPack => scheduler::Strategy::BinPack,
        },
    }
}

fn node_status(node: &NodeRecord, alive: &BTreeSet<String>) -> scheduler::NodeStatus {
    match (alive.contains(&node.name), node.draining) {
        (false, _) => scheduler::NodeStatus::Lost,
        (true, true) => scheduler::NodeStatus::Draining,
        (true, false) => scheduler::NodeStatus::Ready,
    }
}

/// The instances of one app that stay, sorted into placed and waiting.
#[derive(Default)]
struct Kept {
    count: usize,
    placed: usize,
    /// With their mod revision; `None` for those created in this pass.
    unplaced: Vec<(InstanceRecord, Option<Revision>)>,
}

impl Kept {
    fn keep(&mut self, record: InstanceRecord, mod_revision: Revision) {
        self.count += 1;
        if record.node.is_some() {
            self.placed += 1;
        } else {
            self.unplaced.push((record, Some(mod_revision)));
        }
    }

    fn create(&mut self, record: InstanceRecord) {
        self.count += 1;
        self.unplaced.push((record, None));
    }
}

/// Deletes an instance and frees what it held in the scheduler's view.
fn remove(
    cluster: &mut scheduler::Cluster,
    request: &scheduler::AppRequest,
    out: &mut Plan,
    record: InstanceRecord,
    mod_revision: Revision,
) {
    if let Some(node) = &record.node {
        let _ = cluster.release(
            &request.app,
            &scheduler::NodeId::new(node.as_str()),
            request.resources,
        );
    }
    out.changes.push(Change::Delete {
        record,
        mod_revision,
    });
}

/// Decides one pass. `new_id` names new instances (random in production,
/// predictable in tests).
pub fn plan(snapshot: &Snapshot, new_id: &mut dyn FnMut(u64) -> String) -> Plan {
    let mut out = Plan::default();
    let mut cluster = scheduler::Cluster::new();
    for node in &snapshot.nodes {
        let mut n = scheduler::Node::new(
            node.name.as_str(),
            node.region.clone(),
            node.zone.clone(),
            scheduler::Resources {
                cpu_millis: node.capacity.cpu_millis,
                memory_mb: node.capacity.memory_mb,
            },
            node.capacity.max_instances,
        )
        .with_status(node_status(node, &snapshot.alive));
        for (key, value) in &node.labels {
            n = n.with_label(key.clone(), value.clone());
        }
        for role in &node.roles {
            n = n.with_role(role.clone());
        }
        cluster.add_node(n);
    }
    let usable =
        |node: &str| snapshot.alive.contains(node) && snapshot.nodes.iter().any(|n| n.name == node);
    let apps: BTreeMap<(&str, &str), &(AppRecord, RevisionRecord)> = snapshot
        .apps
        .iter()
        .map(|entry| ((entry.0.project.as_str(), entry.0.name.as_str()), entry))
        .collect();

    // Instances that must go whatever else happens; the rest, per app.
    let mut live: BTreeMap<(&str, &str), Vec<(InstanceRecord, Revision)>> = BTreeMap::new();
    for (record, mod_revision) in &snapshot.instances {
        let Some((app, _)) = apps.get(&(record.project.as_str(), record.app.as_str())) else {
            out.changes.push(Change::Delete {
                record: record.clone(),
                mod_revision: *mod_revision,
            });
            continue;
        };
        if let Some(node) = &record.node
            && !usable(node)
        {
            out.events.push(event(
                app,
                "instance-replaced",
                format!("instance {} on lost node {node} is replaced", record.id),
            ));
            out.changes.push(Change::Delete {
                record: record.clone(),
                mod_revision: *mod_revision,
            });
            continue;
        }
        if let Some(node) = &record.node {
            let resources = scheduler::Resources {
                cpu_millis: record.cpu_millis,
                memory_mb: record.memory_mb,
            };
            let _ = cluster.assign(
                &app_id(&record.project, &record.app),
                &scheduler::NodeId::new(node.as_str()),
                resources,
            );
        }
        live.entry((app.project.as_str(), app.name.as_str()))
            .or_default()
            .push((record.clone(), *mod_revision));
    }

    for ((app, revision), key) in snapshot
        .apps
        .iter()
        .map(|e| ((&e.0, &e.1), (e.0.project.as_str(), e.0.name.as_str())))
    {
        let manifest = &revision.manifest;
        let request = request(app, manifest);
        let instances = live.remove(&key).unwrap_or_default();
        let (current, old): (Vec<_>, Vec<_>) = instances
            .into_iter()
            .partition(|(i, _)| i.revision == app.revision);
        let new_instance = |id: String, pinned: Option<String>| InstanceRecord {
            id,
            project: app.project.clone(),
            app: app.name.clone(),
            revision: app.revision,
            node: None,
            pinned_node: pinned,
            cpu_millis: manifest.resources.cpu_millis,
            memory_mb: manifest.resources.memory_mb,
            created_at_ms: now_ms(),
            pending_reason: None,
        };
        let mut kept = Kept::default();
        let wanted = match manifest.instances {
            Instances::Count(n) => {
                let wanted = n as usize;
                // Surplus: unplaced ones go first, then the newest.
                let mut current = current;
                current
                    .sort_by_key(|(i, _)| (i.node.is_some(), std::cmp::Reverse(i.created_at_ms)));
                let surplus = current.len().saturating_sub(wanted);
                for (record, mod_revision) in current.drain(..surplus) {
                    remove(&mut cluster, &request, &mut out, record, mod_revision);
                }
                for (record, mod_revision) in current {
                    kept.keep(record, mod_revision);
                }
                while kept.count < wanted {
                    kept.create(new_instance(new_id(app.revision), None));
                }
                wanted
            }
            Instances::Global => {
                let eligible: BTreeSet<String> = cluster
                    .global_nodes(&request.placement)
                    .iter()
                    .map(|n| n.as_str().to_owned())
                    .collect();
                let mut covered = BTreeSet::new();
                for (record, mod_revision) in current {
                    let pinned = record.pinned_node.clone().unwrap_or_default();
                    if eligible.contains(&pinned) && covered.insert(pinned) {
                        kept.keep(record, mod_revision);
                    } else {
                        remove(&mut cluster, &request, &mut out, record, mod_revision);
                    }
                }
                for node in eligible.difference(&covered) {
                    kept.create(new_instance(new_id(app.revision), Some(node.clone())));
                }
                kept.count
            }
        };
        let mut placed_current = kept.placed;

        // Reasons that are new for some instance, counted, so that a pass
        // makes one event per app and reason rather than one per instance.
        let mut newly_pending: BTreeMap<String, usize> = BTreeMap::new();
        for (mut record, mod_revision) in kept.unplaced {
            let placed = match &record.pinned_node {
                Some(node) => cluster
                    .place_on(&request, &scheduler::NodeId::new(node.as_str()))
                    .map(|()| scheduler::NodeId::new(node.as_str()))
                    .map_err(|e| e.to_string()),
                None => cluster.place_one(&request).map_err(|e| e.to_string()),
            };
            let before = record.clone();
            match placed {
                Ok(node) => {
                    record.node = Some(node.as_str().to_owned());
                    record.pending_reason = None;
                    placed_current += 1;
                }
                Err(reason) => {
                    if record.pending_reason.as_deref() != Some(reason.as_str()) {
                        *newly_pending.entry(reason.clone()).or_default() += 1;
                    }
                    record.pending_reason = Some(reason);
                }
            }
            match mod_revision {
                None => out.changes.push(Change::Create(record)),
                Some(mod_revision) if record != before => {
                    out.changes.push(Change::Update {
                        record,
                        mod_revision,
                    });
                }
                Some(_) => {}
            }
        }

        for (reason, count) in newly_pending {
            let what = if count == 1 {
                "1 instance".to_owned()
            } else {
                format!("{count} instances")
            };
            out.events.push(event(
                app,
                "unschedulable",
                format!(
                    "{what} of {}/{} cannot be placed: {reason}",
                    app.project, app.name
                ),
            ));
        }

        // The old revision goes once the new one is wholly placed.
        if placed_current >= wanted {
            for (record, mod_revision) in old {
                out.changes.push(Change::Delete {
                    record,
                    mod_revision,
                });
            }
        }
    }
    out
}

/// Runs passes against the store.
#[derive(Debug, Clone)]
pub struct Reconciler {
    store: Arc<dyn Store>,
}

fn random_id(revision: u64) -> String {
    let suffix = getrandom::u32().unwrap_or_else(|_| now_ms() as u32);
    format!("{revision}-{suffix:08x}")
}

impl Reconciler {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    pub async fn snapshot(&self) -> Result<Snapshot, ApiError> {
        let store = self.store.as_ref();
        let apps: Vec<(AppRecord, Revision)> = list_records(store, &keys::apps(None)).await?;
        let mut with_revisions = Vec::with_capacity(apps.len());
        for (app, _) in apps {
            let kv = store
                .get(&keys::revision(&app.project, &app.name, app.revision))
                .await?;
            // An app whose revision is missing is mid-delete: skip it.
            if let Some(kv) = kv {
                with_revisions.push((app, decode(&kv)?));
            }
        }
        let alive = alive_nodes(store).await?;
        Ok(Snapshot {
            apps: with_revisions,
            instances: list_records(store, &instance_keys::instances(None)).await?,
            nodes: list_records::<NodeRecord>(store, &keys::nodes())
                .await?
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
            alive,
        })
    }

    /// One pass; returns how many changes were written.
    pub async fn pass(&self) -> Result<usize, ApiError> {
        let snapshot = self.snapshot().await?;
        let plan = plan(&snapshot, &mut random_id);
        let mut written = 0;
        for change in plan.changes {
            let txn = match &change {
                Change::Create(record) => Txn::new()
                    .when([Compare::missing(record.key())])
                    .and_then([Op::put(record.key(), encode(record)?)]),
                Change::Update {
                    record,
                    mod_revision,
                } => Txn::new()
                    .when([Compare::mod_revision(
                        record.key(),
                        CompareOp::Equal,
                        *mod_revision,
                    )])
                    .and_then([Op::put(record.key(), encode(record)?)]),
                Change::Delete {
                    record,
                    mod_revision,
                } => Txn::new()
                    .when([Compare::mod_revision(
                        record.key(),
                        CompareOp::Equal,
                        *mod_revision,
                    )])
                    .and_then([Op::delete(record.key())]),
            };
            if self.store.txn(txn).await?.succeeded {
                written += 1;
            }
        }
        if !plan.events.is_empty() {
            let sequence = self.store.status().await?.revision as u64;
            let nonce = getrandom::u32().unwrap_or_default();
            let ops = plan
                .events
                .iter()
                .enumerate()
                .map(|(i, e)| Ok(Op::put(keys::event(sequence, nonce, i), encode(e)?)))
                .collect::<Result<Vec<_>, ApiError>>()?;
            self.store.txn(Txn::new().and_then(ops)).await?;
        }
        Ok(written)
    }

    /// Runs passes until the store closes: after every change under
    /// `/keel/` (events aside) and at least every `period`.
    pub fn spawn(self, period: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut watch = None;
            loop {
                if watch.is_none() {
                    watch = self.store.watch("/keel/", 0).await.ok();
                }
                match self.pass().await {
                    Ok(0) => {}
                    Ok(changes) => tracing::debug!(changes, "reconcile pass"),
                    Err(error) => tracing::warn!(error = %error, "reconcile pass failed"),
                }
                let woken = async {
                    match watch.as_mut() {
                        Some(stream) => loop {
                            match stream.next().await {
                                Some(Ok(event)) if event.kv.key.starts_with("/keel/events/") => {
                                    continue;
                                }
                                Some(Ok(_)) => return true,
                                _ => return false,
                            }
                        },
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    alive = woken => if !alive { watch = None; },
                    () = tokio::time::sleep(period) => {}
                }
            }
        })
    }
}
