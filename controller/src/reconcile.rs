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
//!   see [`LostPolicy`] for the health manager's protections;
//! - creates the missing instances of the current revision and removes
//!   surplus ones (unplaced first);
//! - rolls a new revision forward: never more than `max_surge` instances
//!   above the count, never fewer than `count - max_unavailable` ready, and
//!   an old instance is stopped only when enough new ones have been ready
//!   for `min_ready`; readiness is what agents report;
//! - for a global app, keeps one instance on every node that matches, and
//!   replaces each node's old instance once the new one there is ready;
//! - places unplaced instances with the scheduler, and records why when
//!   nothing fits (an event, only when the reason changes);
//! - marks an app degraded when its instances keep failing (crash loop),
//!   with the last exit reason, and recovered when they stop;
//! - forgets reported states of instances that are gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use keel_manifest::{AppManifest, ConstraintOp, Instances};
use keel_protocol::{InstanceRef, InstanceState};
use keel_scheduler as scheduler;
use keel_store::{Compare, CompareOp, Op, Revision, Store, Txn};

use crate::agents::{StatusRecord, status_keys};
use crate::api::ApiError;
use crate::apps::{decode, encode, list_records};
use crate::instances::{InstanceRecord, keys as instance_keys};
use crate::nodes::alive_nodes;
use crate::records::{AppRecord, EventRecord, NodeRecord, RevisionRecord, keys, now_ms};
use std::time::Instant;

/// Everything a pass decides from.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub apps: Vec<(AppRecord, RevisionRecord)>,
    /// Each instance with the mod revision it was read at.
    pub instances: Vec<(InstanceRecord, Revision)>,
    pub nodes: Vec<NodeRecord>,
    /// Names of nodes whose heartbeats are current.
    pub alive: BTreeSet<String>,
    /// What agents reported, with each record's key and mod revision.
    pub statuses: Vec<(StatusRecord, String, Revision)>,
    /// Each app's health record, with its mod revision.
    pub health: BTreeMap<(String, String), (AppHealth, Revision)>,
    /// The template (see [`template`]) of every revision that instances
    /// or apps refer to.
    pub templates: BTreeMap<(String, String, u64), Vec<u8>>,
    /// The wall clock, for `min_ready`.
    pub now_ms: u64,
    /// Which lost nodes' instances may be replaced in this pass.
    pub lost: LostPolicy,
}

/// The health manager's answer to "may the instances of lost nodes be
/// replaced now?". Learned from fleet and Kubernetes: right after a
/// controller starts, silence may be the controller's own (it has not heard
/// the heartbeats yet), and when most nodes fall silent at once the fault
/// is more likely the network than the nodes, so a stampede of replacements
/// would do more harm than good.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum LostPolicy {
    /// Replace the instances of every lost node.
    #[default]
    All,
    /// Only these nodes' (mass silence: one node at a time).
    Only(BTreeSet<String>),
    /// None (the grace period after the controller started).
    None,
}

impl LostPolicy {
    fn allows(&self, node: &str) -> bool {
        match self {
            LostPolicy::All => true,
            LostPolicy::Only(nodes) => nodes.contains(node),
            LostPolicy::None => false,
        }
    }
}

/// Whether an app's instances keep failing, as last recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppHealth {
    pub degraded: bool,
    /// The last failure, in words, while degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What an instance runs: the manifest without the count and the update
/// strategy, which change how many run and how they are replaced, not what
/// each one is, plus the revision's restart count, which a rolling restart
/// increments. Two revisions with one template run the same instances.
pub fn template(revision: &RevisionRecord) -> Vec<u8> {
    let mut manifest = revision.manifest.clone();
    manifest.instances = Instances::Count(0);
    manifest.update = keel_manifest::Update::default();
    let mut bytes = manifest.canonical_json();
    bytes.extend_from_slice(format!("\nrestarts={}", revision.restarts).as_bytes());
    bytes
}

/// The newest events kept; older ones are pruned every minute.
pub const EVENTS_KEPT: usize = 10_000;

/// An instance restarted this often is crash-looping.
pub const CRASH_LOOP_RESTARTS: u32 = 3;

pub fn health_key(project: &str, app: &str) -> String {
    format!("/keel/health/{project}/{app}")
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
    /// Any other record: put (`mod_revision` None: must not exist yet).
    Put {
        key: String,
        value: Vec<u8>,
        mod_revision: Option<Revision>,
    },
    Remove {
        key: String,
        mod_revision: Revision,
    },
}

/// A put that expects the key at `mod_revision` (None: absent).
fn put_txn(key: String, value: Vec<u8>, mod_revision: Option<Revision>) -> Txn {
    let compare = match mod_revision {
        Some(revision) => Compare::mod_revision(&key, CompareOp::Equal, revision),
        None => Compare::missing(&key),
    };
    Txn::new().when([compare]).and_then([Op::put(key, value)])
}

impl Change {
    /// The compare-and-swap that makes the change, or nothing if the key
    /// moved since it was read.
    fn txn(&self) -> Result<Txn, ApiError> {
        Ok(match self {
            Change::Create(record) => put_txn(record.key(), encode(record)?, None),
            Change::Update {
                record,
                mod_revision,
            } => put_txn(record.key(), encode(record)?, Some(*mod_revision)),
            Change::Put {
                key,
                value,
                mod_revision,
            } => put_txn(key.clone(), value.clone(), *mod_revision),
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
            Change::Remove { key, mod_revision } => Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, *mod_revision)])
                .and_then([Op::delete(key)]),
        })
    }
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
    /// Running instances of an older revision that runs the same thing,
    /// now of the current one (a scale, or a change to the update
    /// strategy): their records are rewritten, the instances left alone.
    adopted: Vec<(InstanceRecord, Revision)>,
}

impl Kept {
    fn keep(&mut self, record: InstanceRecord, mod_revision: Revision, adopted: &BTreeSet<String>) {
        self.count += 1;
        if record.node.is_none() {
            self.unplaced.push((record, Some(mod_revision)));
            return;
        }
        self.placed += 1;
        if adopted.contains(&record.id) {
            self.adopted.push((record, mod_revision));
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

fn instance_ref(record: &InstanceRecord) -> InstanceRef {
    InstanceRef {
        project: record.project.clone(),
        app: record.app.clone(),
        id: record.id.clone(),
    }
}

/// Marks an app degraded while any of its instances crash-loops or failed
/// (with the last reason), and recovered when none does; writes and tells
/// only on a change.
fn crash_loops(
    app: &AppRecord,
    statuses: &BTreeMap<InstanceRef, &StatusRecord>,
    snapshot: &Snapshot,
    out: &mut Plan,
) {
    let failing = statuses
        .values()
        .filter(|s| s.status.instance.project == app.project && s.status.instance.app == app.name)
        .filter(|s| {
            s.status.state == InstanceState::Failed || s.status.restarts >= CRASH_LOOP_RESTARTS
        })
        .max_by_key(|s| s.updated_at_ms);
    let health = match failing {
        Some(s) => {
            let mut reason = format!("instance {} ", s.status.instance.id);
            reason.push_str(&match (s.status.state, s.status.restarts) {
                (InstanceState::Failed, _) => "failed".to_owned(),
                (_, restarts) => format!("restarted {restarts} times"),
            });
            if let Some(code) = s.status.exit_code {
                reason.push_str(&format!("; last exit code {code}"));
            }
            if let Some(why) = &s.status.reason {
                reason.push_str(&format!(": {why}"));
            }
            AppHealth {
                degraded: true,
                reason: Some(reason),
            }
        }
        None => AppHealth {
            degraded: false,
            reason: None,
        },
    };
    let key = (app.project.clone(), app.name.clone());
    let known = snapshot.health.get(&key);
    if known.map(|(h, _)| h) == Some(&health) || (known.is_none() && !health.degraded) {
        return;
    }
    let message = match &health.reason {
        Some(reason) => format!("app {}/{} is degraded: {reason}", app.project, app.name),
        None => format!(
            "app {}/{} recovered: no instance is failing",
            app.project, app.name
        ),
    };
    out.events.push(event(
        app,
        if health.degraded {
            "degraded"
        } else {
            "recovered"
        },
        message,
    ));
    if let Ok(value) = serde_json::to_vec(&health) {
        out.changes.push(Change::Put {
            key: health_key(&app.project, &app.name),
            value,
            mod_revision: known.map(|(_, r)| *r),
        });
    }
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
            && snapshot.lost.allows(node)
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

    // Reported states, by instance, kept only when the instance is where the
    // report came from; the others (and those of vanished instances) go.
    let placed_on: BTreeMap<InstanceRef, Option<&str>> = snapshot
        .instances
        .iter()
        .map(|(record, _)| (instance_ref(record), record.node.as_deref()))
        .collect();
    let mut statuses: BTreeMap<InstanceRef, &StatusRecord> = BTreeMap::new();
    for (status, key, mod_revision) in &snapshot.statuses {
        match placed_on.get(&status.status.instance) {
            Some(node) if *node == Some(status.node.as_str()) => {
                statuses.insert(status.status.instance.clone(), status);
            }
            Some(_) => {}
            None => out.changes.push(Change::Remove {
                key: key.clone(),
                mod_revision: *mod_revision,
            }),
        }
    }

    for ((app, revision), key) in snapshot
        .apps
        .iter()
        .map(|e| ((&e.0, &e.1), (e.0.project.as_str(), e.0.name.as_str())))
    {
        let manifest = &revision.manifest;
        let request = request(app, manifest);
        // Placed instances of an older revision whose template (all but the
        // count and the update strategy) is the current one's are adopted.
        let template = |revision: u64| {
            snapshot
                .templates
                .get(&(app.project.clone(), app.name.clone(), revision))
        };
        let mut adopted = BTreeSet::new();
        let instances: Vec<(InstanceRecord, Revision)> = live
            .remove(&key)
            .unwrap_or_default()
            .into_iter()
            .map(|(mut record, mod_revision)| {
                if record.revision != app.revision
                    && record.node.is_some()
                    && template(app.revision).is_some()
                    && template(record.revision) == template(app.revision)
                {
                    record.revision = app.revision;
                    adopted.insert(record.id.clone());
                }
                (record, mod_revision)
            })
            .collect();
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
        let min_ready_ms = manifest.update.min_ready_ms;
        let ready = |record: &InstanceRecord| {
            statuses.get(&instance_ref(record)).is_some_and(|s| {
                s.status.ready && snapshot.now_ms.saturating_sub(s.updated_at_ms) >= min_ready_ms
            })
        };
        let mut kept = Kept::default();
        match manifest.instances {
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
                let mut ready_count = current.iter().filter(|(r, _)| ready(r)).count();
                for (record, mod_revision) in current {
                    kept.keep(record, mod_revision, &adopted);
                }
                // The old revision: unplaced ones serve nothing and go now.
                let (old, unplaced_old): (Vec<_>, Vec<_>) =
                    old.into_iter().partition(|(r, _)| r.node.is_some());
                for (record, mod_revision) in unplaced_old {
                    remove(&mut cluster, &request, &mut out, record, mod_revision);
                }
                // Start new ones within the surge...
                let surge = manifest.update.max_surge as usize;
                let room = (wanted + surge).saturating_sub(kept.count + old.len());
                let missing = wanted.saturating_sub(kept.count);
                let start = if old.is_empty() {
                    missing
                } else {
                    missing.min(room)
                };
                for _ in 0..start {
                    kept.create(new_instance(new_id(app.revision), None));
                }
                // ...and stop old ones only while enough stay ready, the
                // ones that are not ready first.
                let min_available = wanted.saturating_sub(manifest.update.max_unavailable as usize);
                ready_count += old.iter().filter(|(r, _)| ready(r)).count();
                let mut old = old;
                old.sort_by_key(|(r, _)| ready(r));
                for (record, mod_revision) in old {
                    if !ready(&record) {
                        remove(&mut cluster, &request, &mut out, record, mod_revision);
                    } else if ready_count > min_available {
                        ready_count -= 1;
                        remove(&mut cluster, &request, &mut out, record, mod_revision);
                    }
                }
            }
            Instances::Global => {
                let eligible: BTreeSet<String> = cluster
                    .global_nodes(&request.placement)
                    .iter()
                    .map(|n| n.as_str().to_owned())
                    .collect();
                let mut covered = BTreeMap::new();
                for (record, mod_revision) in current {
                    let pinned = record.pinned_node.clone().unwrap_or_default();
                    if eligible.contains(&pinned) && !covered.contains_key(&pinned) {
                        covered.insert(pinned, ready(&record));
                        kept.keep(record, mod_revision, &adopted);
                    } else {
                        remove(&mut cluster, &request, &mut out, record, mod_revision);
                    }
                }
                for node in &eligible {
                    if !covered.contains_key(node) {
                        kept.create(new_instance(new_id(app.revision), Some(node.clone())));
                    }
                }
                // A node's old instance goes once the new one there is ready
                // (or the node no longer matches).
                for (record, mod_revision) in old {
                    let pinned = record.pinned_node.clone().unwrap_or_default();
                    if !eligible.contains(&pinned)
                        || covered.get(&pinned) == Some(&true)
                        || !ready(&record)
                    {
                        remove(&mut cluster, &request, &mut out, record, mod_revision);
                    }
                }
            }
        }

        for (record, mod_revision) in kept.adopted {
            out.changes.push(Change::Update {
                record,
                mod_revision,
            });
        }

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

        crash_loops(app, &statuses, snapshot, &mut out);
    }
    out
}

/// Runs passes against the store.
#[derive(Debug, Clone)]
pub struct Reconciler {
    store: Arc<dyn Store>,
    started: Instant,
    /// No lost node's instances are replaced this soon after the start.
    grace: Duration,
    /// In a mass silence, one lost node's instances per this interval.
    mass_silence_interval: Duration,
    mass: Arc<std::sync::Mutex<MassSilence>>,
}

#[derive(Debug, Default)]
struct MassSilence {
    active: bool,
    last_replacement: Option<Instant>,
}

fn random_id(revision: u64) -> String {
    let suffix = getrandom::u32().unwrap_or_else(|_| now_ms() as u32);
    format!("{revision}-{suffix:08x}")
}

impl Reconciler {
    /// A reconciler with the default protections: a grace period of 5 s
    /// after the start, and one node every 10 s in a mass silence.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            started: Instant::now(),
            grace: Duration::from_secs(5),
            mass_silence_interval: Duration::from_secs(10),
            mass: Arc::default(),
        }
    }

    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn with_mass_silence_interval(mut self, interval: Duration) -> Self {
        self.mass_silence_interval = interval;
        self
    }

    /// The health manager's decision for this pass, and an event when a
    /// mass silence begins or ends.
    fn lost_policy(&self, snapshot: &Snapshot, events: &mut Vec<EventRecord>) -> LostPolicy {
        if self.started.elapsed() < self.grace {
            return LostPolicy::None;
        }
        let silent: Vec<&str> = snapshot
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .filter(|n| !snapshot.alive.contains(*n))
            .collect();
        let total = snapshot.nodes.len();
        let mass = total >= 3 && silent.len() * 2 > total;
        let mut state = self.mass.lock().unwrap_or_else(|p| p.into_inner());
        if mass != state.active {
            state.active = mass;
            let message = if mass {
                format!(
                    "{} of {total} nodes went silent at once: more likely the network than the nodes, so their instances are replaced one node every {} s",
                    silent.len(),
                    self.mass_silence_interval.as_secs()
                )
            } else {
                "most nodes are heard again: lost nodes' instances are replaced at once again"
                    .to_owned()
            };
            events.push(EventRecord {
                time_ms: now_ms(),
                project: None,
                app: None,
                reason: if mass {
                    "mass-silence"
                } else {
                    "mass-silence-over"
                }
                .to_owned(),
                message,
            });
        }
        if !mass {
            return LostPolicy::All;
        }
        let due = state
            .last_replacement
            .is_none_or(|t| t.elapsed() >= self.mass_silence_interval);
        // The first silent node that still has instances, if one is due.
        let next = silent.iter().find(|node| {
            snapshot
                .instances
                .iter()
                .any(|(i, _)| i.node.as_deref() == Some(**node))
        });
        match next {
            Some(node) if due => {
                state.last_replacement = Some(Instant::now());
                LostPolicy::Only(BTreeSet::from([(*node).to_owned()]))
            }
            _ => LostPolicy::Only(BTreeSet::new()),
        }
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
                with_revisions.push((app, decode::<RevisionRecord>(&kv)?));
            }
        }
        let statuses: Vec<(StatusRecord, Revision)> =
            list_records(store, &status_keys::statuses(None)).await?;
        let statuses = statuses
            .into_iter()
            .map(|(s, revision)| {
                let i = &s.status.instance;
                let key = status_keys::status(&i.project, &i.app, &i.id);
                (s, key, revision)
            })
            .collect();
        let mut health = BTreeMap::new();
        let page = store
            .range(&keel_store::RangeRequest::prefix("/keel/health/"))
            .await?;
        for kv in &page.kvs {
            let rest = kv.key.trim_start_matches("/keel/health/");
            if let Some((project, app)) = rest.split_once('/') {
                health.insert(
                    (project.to_owned(), app.to_owned()),
                    (decode(kv)?, kv.mod_revision),
                );
            }
        }
        let instances: Vec<(InstanceRecord, Revision)> =
            list_records(store, &instance_keys::instances(None)).await?;
        let mut templates = BTreeMap::new();
        for (app, revision) in &with_revisions {
            templates.insert(
                (app.project.clone(), app.name.clone(), app.revision),
                template(revision),
            );
        }
        for (instance, _) in &instances {
            let key = (
                instance.project.clone(),
                instance.app.clone(),
                instance.revision,
            );
            if templates.contains_key(&key) {
                continue;
            }
            let revision = store.get(&keys::revision(&key.0, &key.1, key.2)).await?;
            if let Some(kv) = revision {
                let revision: RevisionRecord = decode(&kv)?;
                templates.insert(key, template(&revision));
            }
        }
        Ok(Snapshot {
            apps: with_revisions,
            instances,
            templates,
            nodes: list_records::<NodeRecord>(store, &keys::nodes())
                .await?
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
            alive: alive_nodes(store).await?,
            statuses,
            health,
            now_ms: now_ms(),
            lost: LostPolicy::All,
        })
    }

    /// One pass; returns how many changes were written.
    pub async fn pass(&self) -> Result<usize, ApiError> {
        let mut snapshot = self.snapshot().await?;
        let mut health_events = Vec::new();
        snapshot.lost = self.lost_policy(&snapshot, &mut health_events);
        let mut plan = plan(&snapshot, &mut random_id);
        plan.events.extend(health_events);
        let mut written = 0;
        for change in plan.changes {
            let txn = change.txn()?;
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
            // Events stand alone: split to fit etcd's transaction limit.
            crate::writes::write_split(self.store.as_ref(), ops).await?;
        }
        Ok(written)
    }

    /// Runs passes until the store closes: after every change under
    /// `/keel/` (events aside) and at least every `period`.
    pub fn spawn(self, period: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut watch = None;
            let mut last_prune = Instant::now();
            loop {
                if last_prune.elapsed() >= Duration::from_secs(60) {
                    last_prune = Instant::now();
                    let apps = crate::apps::Apps::new(self.store.clone());
                    match apps.prune_events(EVENTS_KEPT).await {
                        Ok(0) => {}
                        Ok(pruned) => tracing::debug!(pruned, "old events pruned"),
                        Err(error) => tracing::warn!(error = %error, "cannot prune events"),
                    }
                }
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
                // Let a burst of writes (a deploy, a round of reports) land,
                // and take it in one pass rather than one pass per write.
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Some(stream) = watch.as_mut() {
                    while let Some(Some(Ok(_))) = stream.next().now_or_never() {}
                }
            }
        })
    }
}
