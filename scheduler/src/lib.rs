//! Keel's scheduler: decides which node each instance of an app runs on.
//!
//! It is a pure decision: a [`Cluster`] snapshot (nodes, what is allocated on
//! them, how each app is spread) goes in, node ids come out. The
//! controller's reconciler builds a fresh `Cluster` from its snapshot of the
//! store on every pass (its nodes with [`Cluster::add_node`], what is already
//! placed with [`Cluster::assign`]), places the pending instances
//! ([`Cluster::place_one`], [`Cluster::place_on`]), releases what it removes
//! ([`Cluster::release`]), writes the plan to the store, and drops the
//! `Cluster` with the pass. Building it is linear in nodes and instances;
//! the structures below keep each placement within a pass cheap, so a
//! deploy of thousands of instances is one pass. Keeping one `Cluster` alive across passes, fed
//! by store events ([`Cluster::set_status`] and the rest), is what the API
//! allows but not what the controller does.
//!
//! Architecture Invariant: this crate does no I/O and depends on no store,
//! HTTP, async runtime or clock, and on no other Keel crate. The controller
//! converts its records into the types here; manifests are validated (regexes
//! compiled, names checked) before they get here.
//!
//! # What it decides
//!
//! Filters, in the order a failure is reported: the node is ready (not
//! draining, not lost); it has the placement's roles; its region and zone are
//! allowed; it passes every label constraint (`=`, `!=`, `in`, regex; the keys
//! `region`, `zone` and `name` mean the node's own fields); it has the cpu,
//! memory and instance slot free.
//!
//! Scores: first spread the app over zones (the allowed zone with the fewest
//! of its instances, ties by the most room for another one), then over the
//! nodes of that zone (the fewest of its instances), then the app's
//! [`Strategy`]: least allocated (the most free) or bin-packing (the least
//! free that still fits). "Free" is measured in the request's dominant
//! resource, the one it needs the largest share of what the cluster has free,
//! because that is the one that runs out first. Zone spread is a preference,
//! not a rule: when a zone is full the instance goes to the next one.
//!
//! When nothing fits, [`Unschedulable`] counts every node under the first
//! filter it fails: `0/12 nodes: 7 insufficient memory, 5 zone != eu-1b`.
//!
//! # Why placement cost does not grow with the cluster or with what is placed
//!
//! A placement never looks at every node. Four structures make that so:
//!
//! - **Zones**: nodes are bucketed by (region, zone).
//! - **Signatures**: the static part of a placement (roles, regions, zones,
//!   constraints) is evaluated once per distinct placement, not per app and
//!   not per instance, into a bitset over nodes. Apps with the same placement
//!   share it; a node that joins or changes is evaluated against every cached
//!   one. The cache is bounded (1024 placements) and rebuilt on demand.
//! - **Candidates**: in each zone, one per distinct set of nodes that some
//!   cached placement allows there, shared by every placement that allows the
//!   same nodes (no constraint, `region = eu-1` and `role = worker` are often
//!   all "every node of eu-1a"). Each keeps what its schedulable nodes (ready,
//!   below `max_instances`) have free together, and when it has more than 64
//!   nodes, those nodes in two ordered sets keyed by (free cpu, free memory,
//!   slot) and (free memory, free cpu, slot). Allocating or releasing moves
//!   the node in the candidates of its zone that hold it: O(k log n) with k
//!   the distinct node sets it belongs to (at most 4 in the benchmark),
//!   whatever the number of apps or instances. A full node leaves the sets,
//!   so it is never walked past.
//! - **Per-app counts**: each app has its instance count per zone, and each
//!   node a small map from app to instances on it, so the spread of a
//!   candidate is two O(1) lookups whatever the app's size.
//!
//! Choosing costs O(zones) to pick the zone, then either an exact scan of
//! the placement's candidates there (at most 64) or a walk of their ordered
//! set from the strategy's best end. Keying on free amounts rather than on an
//! allocated fraction lets the walk start at the first node with enough of
//! the dominant resource (a range seek) instead of stepping over every node
//! too full for the request, which for bin-packing would be most of a full
//! cluster. It takes the first node that also has enough of the other
//! resource and holds no more than the app's average count there (exact
//! spread until every node has one); if the front is crowded with the app, it
//! stops after 256 fitting nodes and takes the one with the fewest: a bounded
//! sample, like Kubernetes' `percentageOfNodesToScore`.
//!
//! Candidates hold only nodes their placement allows, so a walk never skips
//! a node for its labels. A first version walked one order per zone and
//! skipped excluded nodes by bitset; in the benchmark its walks grew from 18
//! to 220 steps per placement as the nodes that constrained apps may use
//! filled up and the front of the order became nodes they may not use.
//!
//! A node that joins, leaves or changes marks its zone's candidates stale;
//! they are rebuilt, once, before the next placement (O(placements x zone
//! size)), so a burst of joins costs one rebuild per zone.
//!
//! Known limits: a walk skips nodes short of the *other* resource one by one,
//! so candidates full of nodes with cpu but no memory (or the reverse) are
//! walked linearly for a request that orders by cpu; k grows with the number
//! of distinct node sets that placements carve out of a zone; a new placement
//! costs one pass over the nodes; and a failure costs a pass over every node
//! to explain itself. All of these are rare or bounded by configuration, not
//! by how much is placed.
//!
//! Node and app names are reference-counted strings (cheap to clone into a
//! plan); inside, nodes and apps are dense `u32` slots, so no hot path hashes
//! a string.

#![forbid(unsafe_code)]

mod cluster;
mod error;
mod types;
mod unschedulable;

#[cfg(test)]
mod tests;

pub use cluster::{Allocation, Cluster};
pub use error::ClusterError;
pub use types::{
    AppId, AppRequest, Constraint, ConstraintOp, Node, NodeId, NodeStatus, Placement, Resources,
    Strategy,
};
pub use unschedulable::{Reason, Unschedulable};
