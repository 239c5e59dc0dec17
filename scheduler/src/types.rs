//! The scheduler's own view of nodes and requests. The controller converts its
//! stored records into these; nothing here is serialized.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Cloning is a reference-count increment, so plans can hand out ids
        /// freely.
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn new(id: impl Into<Arc<str>>) -> Self {
                Self(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.into())
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id.into())
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

typed_id!(
    /// A node's name, unique in the cluster.
    NodeId
);
typed_id!(
    /// An app's identity. Instances of one app are spread over zones and nodes.
    AppId
);

/// An amount of the resources that are reserved per instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

impl Resources {
    pub const fn new(cpu_millis: u64, memory_mb: u64) -> Self {
        Self {
            cpu_millis,
            memory_mb,
        }
    }
}

/// Whether a node takes new instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum NodeStatus {
    /// Heartbeating and accepting work.
    #[default]
    Ready,
    /// Still running its instances but taking no new ones.
    Draining,
    /// Heartbeats stopped. Its instances stay allocated until the controller
    /// releases them (it replaces them elsewhere).
    Lost,
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub region: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub roles: BTreeSet<String>,
    pub capacity: Resources,
    /// How many instances the node runs at most, whatever their size; 0 means
    /// none.
    pub max_instances: u32,
    pub status: NodeStatus,
}

impl Node {
    /// A ready node with no labels and no roles.
    pub fn new(
        id: impl Into<NodeId>,
        region: impl Into<String>,
        zone: impl Into<String>,
        capacity: Resources,
        max_instances: u32,
    ) -> Self {
        Self {
            id: id.into(),
            region: region.into(),
            zone: zone.into(),
            labels: BTreeMap::new(),
            roles: BTreeSet::new(),
            capacity,
            max_instances,
            status: NodeStatus::Ready,
        }
    }

    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn with_role(mut self, role: impl Into<String>) -> Self {
        self.roles.insert(role.into());
        self
    }

    pub fn with_status(mut self, status: NodeStatus) -> Self {
        self.status = status;
        self
    }

    /// The value a constraint key refers to: the pseudo-keys `region`, `zone`
    /// and `name` name the node's own fields (so a label with one of those
    /// names cannot be constrained), anything else is a label.
    pub(crate) fn value_of(&self, key: &str) -> Option<&str> {
        match key {
            "region" => Some(&self.region),
            "zone" => Some(&self.zone),
            "name" => Some(self.id.as_str()),
            _ => self.labels.get(key).map(String::as_str),
        }
    }
}

/// A rule on one node value (a label, or `region`, `zone`, `name`).
#[derive(Debug, Clone)]
pub struct Constraint {
    pub key: String,
    pub op: ConstraintOp,
}

/// How a [`Constraint`] compares. A node without the label fails `Eq`, `In`
/// and `Regex` and passes `Ne`.
#[derive(Debug, Clone)]
pub enum ConstraintOp {
    Eq(String),
    Ne(String),
    In(Vec<String>),
    /// Matched anywhere in the value, as `regex` does; the manifest parser
    /// anchors it if it wants whole-value matches.
    Regex(regex::Regex),
}

impl Constraint {
    pub fn new(key: impl Into<String>, op: ConstraintOp) -> Self {
        Self {
            key: key.into(),
            op,
        }
    }

    pub fn eq(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self::new(key, ConstraintOp::Eq(value.into()))
    }

    pub fn ne(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self::new(key, ConstraintOp::Ne(value.into()))
    }

    pub fn is_in<S: Into<String>>(
        key: impl Into<String>,
        values: impl IntoIterator<Item = S>,
    ) -> Self {
        Self::new(
            key,
            ConstraintOp::In(values.into_iter().map(Into::into).collect()),
        )
    }

    pub fn regex(key: impl Into<String>, regex: regex::Regex) -> Self {
        Self::new(key, ConstraintOp::Regex(regex))
    }

    pub(crate) fn matches(&self, node: &Node) -> bool {
        let value = node.value_of(&self.key);
        match &self.op {
            ConstraintOp::Eq(want) => value == Some(want.as_str()),
            ConstraintOp::Ne(unwanted) => value != Some(unwanted.as_str()),
            ConstraintOp::In(wanted) => value.is_some_and(|v| wanted.iter().any(|w| w == v)),
            ConstraintOp::Regex(re) => value.is_some_and(|v| re.is_match(v)),
        }
    }

    /// What a node that fails this constraint is like, e.g. `label disk != ssd`.
    pub(crate) fn unmet(&self) -> String {
        let subject = match self.key.as_str() {
            "region" | "zone" | "name" => self.key.clone(),
            key => format!("label {key}"),
        };
        match &self.op {
            ConstraintOp::Eq(v) => format!("{subject} != {v}"),
            ConstraintOp::Ne(v) => format!("{subject} = {v}"),
            ConstraintOp::In(vs) => format!("{subject} not in [{}]", vs.join(", ")),
            ConstraintOp::Regex(re) => format!("{subject} !~ {}", re.as_str()),
        }
    }
}

/// Where an app's instances may run. Every part must hold (an empty list
/// allows everything).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub constraints: Vec<Constraint>,
    /// The node's region must be one of these.
    pub regions: Vec<String>,
    /// The node's zone must be one of these.
    pub zones: Vec<String>,
    /// The node must have every one of these roles.
    pub roles: Vec<String>,
    /// Put each instance in the eligible zone with the fewest instances of the
    /// app. It is a preference: a full zone does not stop placement elsewhere.
    pub spread_zones: bool,
}

/// Which of the fitting nodes an instance prefers, once spread is satisfied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The node with the most free resources: load evens out.
    #[default]
    LeastAllocated,
    /// The fullest node that still fits: whole nodes stay free for big
    /// instances, or to be turned off.
    BinPack,
}

/// One app's instances to place: all of the same size, under one placement.
#[derive(Debug, Clone)]
pub struct AppRequest {
    pub app: AppId,
    /// What each instance reserves.
    pub resources: Resources,
    pub placement: Placement,
    pub strategy: Strategy,
}

impl AppRequest {
    pub fn new(app: impl Into<AppId>, resources: Resources) -> Self {
        Self {
            app: app.into(),
            resources,
            placement: Placement::default(),
            strategy: Strategy::default(),
        }
    }
}
