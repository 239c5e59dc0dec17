use crate::types::{AppId, NodeId, Resources};
use crate::unschedulable::Unschedulable;

/// A change to the snapshot that does not apply to it. Placement failures of
/// [`Cluster::place`](crate::Cluster::place) are [`Unschedulable`] instead.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("node {node} is not in the cluster")]
    UnknownNode { node: NodeId },
    #[error("app {app} has no instance on node {node}")]
    NoInstance { app: AppId, node: NodeId },
    #[error(
        "releasing {} millicores and {} MB of app {app} on node {node} is more than the node has allocated",
        resources.cpu_millis,
        resources.memory_mb
    )]
    ReleaseExceedsAllocation {
        app: AppId,
        node: NodeId,
        resources: Resources,
    },
    #[error("node {node} cannot take an instance of app {app}")]
    NodeUnfit {
        app: AppId,
        node: NodeId,
        #[source]
        reason: Unschedulable,
    },
}
