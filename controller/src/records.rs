//! What the controller keeps in the cluster store, and under which keys.
//!
//! Records are JSON (readable with `etcdctl get`, versioned by serde's
//! strictness: an unknown field in a stored record is an error, not a
//! silent loss). Wire types of the API are in `api`; these are the stored
//! ones, and the two may diverge.

use keel_manifest::AppManifest;
use serde::{Deserialize, Serialize};

/// Every key the controller writes starts with this.
pub const ROOT: &str = "/keel/";

pub mod keys {
    pub fn admin_token() -> String {
        "/keel/auth/admin".to_owned()
    }
    pub fn join_token() -> String {
        "/keel/auth/join".to_owned()
    }
    pub fn node(name: &str) -> String {
        format!("/keel/nodes/{name}")
    }
    pub fn nodes() -> String {
        "/keel/nodes/".to_owned()
    }
    /// Present while the node heartbeats: attached to a lease that each
    /// heartbeat renews, so the store deletes it when heartbeats stop.
    pub fn alive(name: &str) -> String {
        format!("/keel/alive/{name}")
    }
    pub fn alive_prefix() -> String {
        "/keel/alive/".to_owned()
    }
    pub fn project(name: &str) -> String {
        format!("/keel/projects/{name}")
    }
    pub fn projects() -> String {
        "/keel/projects/".to_owned()
    }
    pub fn app(project: &str, app: &str) -> String {
        format!("/keel/apps/{project}/{app}")
    }
    /// All apps, or the apps of one project.
    pub fn apps(project: Option<&str>) -> String {
        match project {
            Some(project) => format!("/keel/apps/{project}/"),
            None => "/keel/apps/".to_owned(),
        }
    }
    /// Present from the commit of an app's deletion until its revisions are
    /// gone (see `Apps::delete`).
    pub fn app_deletion(project: &str, app: &str) -> String {
        format!("{}{project}/{app}", app_deletions())
    }
    pub fn app_deletions() -> String {
        "/keel/app-deletions/".to_owned()
    }
    /// Zero-padded so that key order is revision order.
    pub fn revision(project: &str, app: &str, revision: u64) -> String {
        format!("/keel/revisions/{project}/{app}/{revision:012}")
    }
    pub fn revisions(project: &str, app: &str) -> String {
        format!("/keel/revisions/{project}/{app}/")
    }
    /// Events are keyed by the store revision just before the write that
    /// makes them (so key order is time order), a random nonce (two writers
    /// may read the same revision) and an index within the write.
    pub fn event(sequence: u64, nonce: u32, index: usize) -> String {
        format!("/keel/events/{sequence:016}-{nonce:08x}-{index:03}")
    }
    pub fn events() -> String {
        "/keel/events/".to_owned()
    }
    /// Which app serves a host and path prefix: one owner each, taken in
    /// the same transaction as the revision that routes it.
    pub fn route_claim(host: &str, path: &str) -> String {
        format!("{}{host}{path}", route_claims())
    }
    pub fn route_claims() -> String {
        "/keel/route-claims/".to_owned()
    }
    /// Which app a plain TCP route's listen port belongs to: one owner in
    /// the cluster, since every router listens on it. Taken like a route
    /// claim.
    pub fn listen_port_claim(port: u16) -> String {
        format!("{}{port}", listen_port_claims())
    }
    pub fn listen_port_claims() -> String {
        "/keel/listen-port-claims/".to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// Hex SHA-256 of the token; the token itself is never stored.
    pub sha256: String,
}

/// What a node is and offers, as its agent registered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub name: String,
    pub region: String,
    pub zone: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub roles: std::collections::BTreeSet<String>,
    pub capacity: NodeCapacity,
    /// Where the node's published ports are reached from other nodes.
    pub address: String,
    /// An operator asked for no new work here.
    #[serde(default)]
    pub draining: bool,
    /// Hex SHA-256 of the node's credential.
    pub token_sha256: String,
    pub registered_at_ms: u64,
}

pub use keel_protocol::NodeCapacity;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectRecord {
    pub name: String,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppRecord {
    pub project: String,
    pub name: String,
    /// The revision the app should run now.
    pub revision: u64,
    /// The highest revision number given out (rollback makes a new one).
    pub latest_revision: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case", tag = "kind")]
pub enum RevisionCause {
    /// A manifest was applied.
    Apply,
    /// An older revision's manifest was deployed again.
    Rollback { to_revision: u64 },
    /// Only the instance count changed (`POST .../scale`).
    Scale { instances: u32 },
    /// A rolling restart: the same manifest, every instance replaced
    /// (`POST .../restart`).
    Restart,
}

/// One immutable revision of an app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevisionRecord {
    pub revision: u64,
    pub created_at_ms: u64,
    pub cause: RevisionCause,
    #[schema(value_type = crate::api::openapi::AppManifest)]
    pub manifest: AppManifest,
    /// How many rolling restarts the app had when this revision was made.
    /// Part of what an instance runs (see `reconcile::template`): a restart
    /// increments it, so no instance of an earlier revision is adopted and
    /// every one is replaced; every other change carries it over.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schema(nullable = false)]
    pub restarts: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventRecord {
    pub time_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    #[schema(nullable = false)]
    pub project: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    #[schema(nullable = false)]
    pub app: Option<String>,
    /// A short machine-readable word: `app-created`, `revision-created`, ...
    pub reason: String,
    pub message: String,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
