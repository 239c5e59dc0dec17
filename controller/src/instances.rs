//! Instances: one placement of one revision of an app on one node.
//!
//! The reconciler creates and deletes instance records; the scheduler
//! fills in their node. Agents (later) read the instances of their node and
//! report each one's actual state beside it.

use serde::{Deserialize, Serialize};

pub mod keys {
    pub fn instance(project: &str, app: &str, id: &str) -> String {
        format!("/keel/instances/{project}/{app}/{id}")
    }
    /// All instances, or those of one app.
    pub fn instances(app: Option<(&str, &str)>) -> String {
        match app {
            Some((project, app)) => format!("/keel/instances/{project}/{app}/"),
            None => "/keel/instances/".to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    /// Unique within the app: `{revision}-{random}`.
    pub id: String,
    pub project: String,
    pub app: String,
    pub revision: u64,
    /// Where it runs; `None` while no node fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// For a global app, the node this instance belongs to from birth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_node: Option<String>,
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub created_at_ms: u64,
    /// Why it is not placed yet, as the scheduler counted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
}

impl InstanceRecord {
    pub fn key(&self) -> String {
        keys::instance(&self.project, &self.app, &self.id)
    }
}
