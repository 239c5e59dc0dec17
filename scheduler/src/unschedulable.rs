//! Why nothing fits: every node is counted under the first filter it fails.

use std::collections::BTreeMap;
use std::fmt;

use crate::types::{Node, NodeStatus, Placement};

/// Why one node cannot take an instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The node is lost.
    NotReady,
    Draining,
    MissingRole(String),
    /// The node's region is not one of these.
    Region(Vec<String>),
    /// The node's zone is not one of these.
    Zone(Vec<String>),
    /// A constraint the node fails, described as what the node is like
    /// (`label disk != ssd`).
    Constraint(String),
    InsufficientCpu,
    InsufficientMemory,
    MaxInstances,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotReady => f.write_str("not ready"),
            Reason::Draining => f.write_str("draining"),
            Reason::MissingRole(role) => write!(f, "missing role {role}"),
            Reason::Region(allowed) => not_one_of(f, "region", allowed),
            Reason::Zone(allowed) => not_one_of(f, "zone", allowed),
            Reason::Constraint(unmet) => f.write_str(unmet),
            Reason::InsufficientCpu => f.write_str("insufficient cpu"),
            Reason::InsufficientMemory => f.write_str("insufficient memory"),
            Reason::MaxInstances => f.write_str("max instances reached"),
        }
    }
}

fn not_one_of(f: &mut fmt::Formatter<'_>, what: &str, allowed: &[String]) -> fmt::Result {
    match allowed {
        [one] => write!(f, "{what} != {one}"),
        many => write!(f, "{what} not in [{}]", many.join(", ")),
    }
}

/// No node can take the instance: how many nodes there are and, per reason,
/// how many fail for it. Displays as
/// `0/12 nodes: 7 insufficient memory, 5 zone != eu-1b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    /// Every node the scheduler knows, whatever its status.
    pub nodes: usize,
    /// Sorted by count, most first, then by the reason's text. The counts add
    /// up to `nodes`.
    pub reasons: Vec<(Reason, usize)>,
}

impl Unschedulable {
    pub(crate) fn from_counts(
        nodes: usize,
        counts: impl IntoIterator<Item = (Reason, usize)>,
    ) -> Self {
        let mut reasons: Vec<(String, Reason, usize)> = counts
            .into_iter()
            .map(|(r, n)| (r.to_string(), r, n))
            .collect();
        reasons.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        Self {
            nodes,
            reasons: reasons.into_iter().map(|(_, r, n)| (r, n)).collect(),
        }
    }

    /// How many nodes could take the instance; 0 unless the counts were built
    /// by hand.
    pub fn fitting(&self) -> usize {
        self.nodes
            .saturating_sub(self.reasons.iter().map(|(_, n)| n).sum())
    }
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} nodes", self.fitting(), self.nodes)?;
        for (i, (reason, n)) in self.reasons.iter().enumerate() {
            write!(f, "{}{n} {reason}", if i == 0 { ": " } else { ", " })?;
        }
        Ok(())
    }
}

impl std::error::Error for Unschedulable {}

/// A failed filter, cheap to count; turned into a [`Reason`] once per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Fail {
    NotReady,
    Draining,
    Role(usize),
    Region,
    Zone,
    Constraint(usize),
    Cpu,
    Memory,
    MaxInstances,
}

impl Fail {
    pub(crate) fn reason(self, placement: &Placement) -> Reason {
        match self {
            Fail::NotReady => Reason::NotReady,
            Fail::Draining => Reason::Draining,
            Fail::Role(i) => Reason::MissingRole(placement.roles[i].clone()),
            Fail::Region => Reason::Region(placement.regions.clone()),
            Fail::Zone => Reason::Zone(placement.zones.clone()),
            Fail::Constraint(i) => Reason::Constraint(placement.constraints[i].unmet()),
            Fail::Cpu => Reason::InsufficientCpu,
            Fail::Memory => Reason::InsufficientMemory,
            Fail::MaxInstances => Reason::MaxInstances,
        }
    }
}

pub(crate) fn status_failure(node: &Node) -> Option<Fail> {
    match node.status {
        NodeStatus::Ready => None,
        NodeStatus::Draining => Some(Fail::Draining),
        NodeStatus::Lost => Some(Fail::NotReady),
    }
}

/// The first placement rule the node fails, whatever its status and load:
/// what the signature cache remembers per node.
pub(crate) fn static_failure(node: &Node, placement: &Placement) -> Option<Fail> {
    if let Some(i) = placement.roles.iter().position(|r| !node.roles.contains(r)) {
        return Some(Fail::Role(i));
    }
    if !placement.regions.is_empty() && !placement.regions.contains(&node.region) {
        return Some(Fail::Region);
    }
    if !placement.zones.is_empty() && !placement.zones.contains(&node.zone) {
        return Some(Fail::Zone);
    }
    placement
        .constraints
        .iter()
        .position(|c| !c.matches(node))
        .map(Fail::Constraint)
}

/// Counts failures and turns them into an [`Unschedulable`].
pub(crate) fn explain(
    nodes: usize,
    failures: impl IntoIterator<Item = Fail>,
    placement: &Placement,
) -> Unschedulable {
    let mut counts: BTreeMap<Fail, usize> = BTreeMap::new();
    for fail in failures {
        *counts.entry(fail).or_default() += 1;
    }
    // Distinct failures may read the same (a `region` constraint and the
    // region list), so merge by reason.
    let mut merged: BTreeMap<Reason, usize> = BTreeMap::new();
    for (fail, n) in counts {
        *merged.entry(fail.reason(placement)).or_default() += n;
    }
    Unschedulable::from_counts(nodes, merged)
}
