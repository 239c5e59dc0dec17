//! Nodes: registration with the join token, heartbeats, drain.
//!
//! Liveness rides on a store lease: each node has a key under
//! `/keel/alive/` attached to a lease of `node_lost_after` seconds, and
//! every heartbeat renews it. When heartbeats stop, the store itself deletes
//! the key, and whoever watches `/keel/alive/` (the health manager) sees
//! the node go. A controller restart gives every lease a full TTL again,
//! which is the grace period before any node can be declared lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_store::{Compare, CompareOp, LeaseId, Op, RangeRequest, Store, StoreError, Txn};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::api::{ApiError, FieldProblem};
use crate::apps::{check_name, decode, encode, list_records};
use crate::auth::{new_token, sha256_hex};
use crate::instances::{InstanceRecord, keys as instance_keys};
use crate::records::{NodeCapacity, NodeRecord, keys, now_ms};

pub use keel_protocol::Registration;

/// A node as the API shows it: its record without the credential, and its
/// status.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeView {
    pub name: String,
    pub region: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub roles: Vec<String>,
    pub capacity: NodeCapacity,
    /// What the instances placed on the node reserve, against `capacity`.
    /// Absent from the answers to heartbeats and registrations, which are
    /// too frequent to count every instance for.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub allocated: Option<Allocation>,
    pub address: String,
    /// How many desired-instance streams of the node this controller holds
    /// open (normally 1 while its agent is connected). Absent from the
    /// answers to heartbeats, registrations and drains.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub streams: Option<usize>,
    /// `ready`, `draining` or `lost`.
    #[schema(schema_with = crate::api::openapi::node_status)]
    pub status: &'static str,
    pub registered_at_ms: u64,
}

/// What the instances placed on a node reserve, in the units of its
/// capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Allocation {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub instances: u32,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Registered {
    pub node: NodeView,
    /// The node's credential for heartbeats and streams; shown only here.
    pub token: String,
}

#[derive(Debug)]
pub struct Nodes {
    store: Arc<dyn Store>,
    lost_after: Duration,
    /// Lease of each node's alive key, as this controller knows it.
    leases: Mutex<BTreeMap<String, LeaseId>>,
}

fn region_like(field: &str, value: &str, problems: &mut Vec<FieldProblem>) {
    let valid = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        problems.push(FieldProblem::new(
            field,
            format!("{value:?}: 1 to 63 letters, digits, '-', '_' or '.'"),
        ));
    }
}

/// Every problem with a registration, by field.
fn check_registration(registration: &Registration) -> Result<(), ApiError> {
    let mut problems = Vec::new();
    if let Err(ApiError::Invalid(mut p)) = check_name("name", &registration.name) {
        problems.append(&mut p);
    }
    region_like("region", &registration.region, &mut problems);
    region_like("zone", &registration.zone, &mut problems);
    for (key, value) in &registration.labels {
        region_like(&format!("labels.{key}"), key, &mut problems);
        if value.len() > 253 {
            problems.push(FieldProblem::new(
                format!("labels.{key}"),
                "value longer than 253 bytes",
            ));
        }
    }
    for (i, role) in registration.roles.iter().enumerate() {
        region_like(&format!("roles[{i}]"), role, &mut problems);
    }
    if registration.capacity.cpu_millis == 0 {
        problems.push(FieldProblem::new(
            "capacity.cpu_millis",
            "must be at least 1",
        ));
    }
    if registration.capacity.memory_mb == 0 {
        problems.push(FieldProblem::new(
            "capacity.memory_mb",
            "must be at least 1",
        ));
    }
    if registration.address.parse::<std::net::IpAddr>().is_err() {
        problems.push(FieldProblem::new(
            "address",
            format!("{:?} is not an IP address", registration.address),
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid(problems))
    }
}

impl Nodes {
    pub fn new(store: Arc<dyn Store>, lost_after: Duration) -> Self {
        Self {
            store,
            lost_after,
            leases: Mutex::new(BTreeMap::new()),
        }
    }

    /// Registers a node, or re-registers one that lost its credential (an
    /// agent reinstalled on the same machine): the old credential stops
    /// working.
    pub async fn register(&self, registration: Registration) -> Result<Registered, ApiError> {
        check_registration(&registration)?;
        let token = new_token("node").map_err(|e| ApiError::Internal(e.to_string()))?;
        let key = keys::node(&registration.name);
        let existing = self.store.get(&key).await?;
        let draining = match &existing {
            Some(kv) => decode::<NodeRecord>(kv)?.draining,
            None => false,
        };
        let record = NodeRecord {
            name: registration.name.clone(),
            region: registration.region,
            zone: registration.zone,
            labels: registration.labels,
            roles: registration.roles.into_iter().collect(),
            capacity: registration.capacity,
            address: registration.address,
            draining,
            token_sha256: sha256_hex(&token),
            registered_at_ms: now_ms(),
        };
        let compare = match &existing {
            Some(kv) => Compare::mod_revision(&key, CompareOp::Equal, kv.mod_revision),
            None => Compare::missing(&key),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([Op::put(&key, encode(&record)?)]);
        if !self.store.txn(txn).await?.succeeded {
            return Err(ApiError::Conflict(format!(
                "node {} is registering from elsewhere at the same time",
                record.name
            )));
        }
        self.heartbeat_alive(&record.name).await?;
        // Without the allocation: a fleet registering at once must not
        // read every instance once per node.
        let node = view(record, true, None);
        Ok(Registered { node, token })
    }

    /// Checks a node's credential; the admin may act for any node.
    pub async fn authenticate(&self, name: &str, token: &str) -> Result<NodeRecord, ApiError> {
        check_name("node", name)?;
        let record = self.record(name).await.map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::Unauthorized,
            other => other,
        })?;
        if sha256_hex(token) == record.token_sha256 {
            Ok(record)
        } else {
            Err(ApiError::Unauthorized)
        }
    }

    /// Renews the node's alive key, making it (and its lease) when the
    /// lease expired or this controller never had it.
    pub async fn heartbeat_alive(&self, name: &str) -> Result<(), ApiError> {
        let mut leases = self.leases.lock().await;
        if let Some(lease) = leases.get(name).copied() {
            match self.store.lease_keep_alive(lease).await {
                Ok(_) => {
                    if self.store.get(&keys::alive(name)).await?.is_some() {
                        return Ok(());
                    }
                }
                Err(StoreError::LeaseNotFound(_)) => {}
                Err(error) => return Err(error.into()),
            }
        }
        let lease = self.store.lease_grant(self.lost_after).await?;
        let value = now_ms().to_string().into_bytes();
        self.store
            .put(&keys::alive(name), value, Some(lease.id))
            .await?;
        if let Some(old) = leases.insert(name.to_owned(), lease.id) {
            let _ = self.store.lease_revoke(old).await;
        }
        Ok(())
    }

    async fn record(&self, name: &str) -> Result<NodeRecord, ApiError> {
        let kv = self.store.get(&keys::node(name)).await?;
        decode(&kv.ok_or_else(|| ApiError::NotFound(format!("node {name}")))?)
    }

    async fn view(&self, record: NodeRecord) -> Result<NodeView, ApiError> {
        let alive = self.store.get(&keys::alive(&record.name)).await?.is_some();
        let allocated = allocations(self.store.as_ref())
            .await?
            .remove(&record.name)
            .unwrap_or_default();
        Ok(view(record, alive, Some(allocated)))
    }

    /// The node without its allocation, which costs a read of every
    /// instance: for answers to heartbeats.
    pub async fn show_brief(&self, name: &str) -> Result<NodeView, ApiError> {
        check_name("node", name)?;
        let record = self.record(name).await?;
        let alive = self.store.get(&keys::alive(&record.name)).await?.is_some();
        Ok(view(record, alive, None))
    }

    pub async fn show(&self, name: &str) -> Result<NodeView, ApiError> {
        check_name("node", name)?;
        let record = self.record(name).await?;
        self.view(record).await
    }

    pub async fn list(&self) -> Result<Vec<NodeView>, ApiError> {
        let alive = alive_nodes(self.store.as_ref()).await?;
        let records: Vec<(NodeRecord, _)> =
            list_records(self.store.as_ref(), &keys::nodes()).await?;
        let mut allocated = allocations(self.store.as_ref()).await?;
        Ok(records
            .into_iter()
            .map(|(record, _)| {
                let is_alive = alive.contains(&record.name);
                let allocated = allocated.remove(&record.name).unwrap_or_default();
                view(record, is_alive, Some(allocated))
            })
            .collect())
    }

    /// Marks a node (un)draining: a draining node gets no new instances.
    pub async fn set_draining(&self, name: &str, draining: bool) -> Result<NodeView, ApiError> {
        check_name("node", name)?;
        let key = keys::node(name);
        for _ in 0..5 {
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("node {name}")))?;
            let mut record: NodeRecord = decode(&kv)?;
            record.draining = draining;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    &key,
                    CompareOp::Equal,
                    kv.mod_revision,
                )])
                .and_then([Op::put(&key, encode(&record)?)]);
            if self.store.txn(txn).await?.succeeded {
                return self.view(record).await;
            }
        }
        Err(ApiError::Conflict(format!(
            "node {name} keeps changing; try again"
        )))
    }
}

/// The names of the nodes whose heartbeats are current.
pub(crate) async fn alive_nodes(
    store: &dyn Store,
) -> Result<std::collections::BTreeSet<String>, ApiError> {
    let prefix = keys::alive_prefix();
    let page = store.range(&RangeRequest::prefix(&prefix)).await?;
    Ok(page
        .kvs
        .into_iter()
        .map(|kv| kv.key.trim_start_matches(&prefix).to_owned())
        .collect())
}

/// What the instances placed on each node reserve, by node.
async fn allocations(store: &dyn Store) -> Result<BTreeMap<String, Allocation>, ApiError> {
    let instances: Vec<(InstanceRecord, _)> =
        list_records(store, &instance_keys::instances(None)).await?;
    let mut by_node: BTreeMap<String, Allocation> = BTreeMap::new();
    for (instance, _) in instances {
        if let Some(node) = instance.node {
            let allocation = by_node.entry(node).or_default();
            allocation.cpu_millis += instance.cpu_millis;
            allocation.memory_mb += instance.memory_mb;
            allocation.instances += 1;
        }
    }
    Ok(by_node)
}

fn view(record: NodeRecord, alive: bool, allocated: Option<Allocation>) -> NodeView {
    let status = match (alive, record.draining) {
        (false, _) => "lost",
        (true, true) => "draining",
        (true, false) => "ready",
    };
    NodeView {
        name: record.name,
        region: record.region,
        zone: record.zone,
        labels: record.labels,
        roles: record.roles.into_iter().collect(),
        capacity: record.capacity,
        allocated,
        address: record.address,
        streams: None,
        status,
        registered_at_ms: record.registered_at_ms,
    }
}
