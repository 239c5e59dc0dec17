//! The snapshot and its incremental indexes; see the crate documentation for
//! why they are shaped this way.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};

use crate::error::ClusterError;
use crate::types::{AppId, AppRequest, Node, NodeId, NodeStatus, Placement, Resources, Strategy};
use crate::unschedulable::{Fail, Unschedulable, explain, static_failure, status_failure};

/// Candidates of at most this many nodes are scanned exactly; larger ones
/// keep their nodes in order and are walked.
const SCAN_LIMIT: usize = 64;
/// How many fitting nodes a walk looks at, at most, for one with few enough
/// instances of the app before it settles for the one with the fewest.
const NODE_SPREAD_SAMPLE: usize = 256;
/// Distinct placements remembered; past this the cache starts again.
const MAX_SIGNATURES: usize = 1024;

/// What ordered candidates hold per node: (free amount of the resource the
/// order is by, free amount of the other one, slot).
type Key = (u64, u64, u32);

/// Multiplicative hashing for the dense `u32` app indexes of the per-node
/// maps: these are looked up once per candidate, and SipHash's protection
/// against chosen keys buys nothing for indexes we hand out ourselves.
#[derive(Default, Clone, Copy)]
struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, i: u32) {
        self.0 = (self.0 ^ u64::from(i)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IndexMap = HashMap<u32, u32, BuildHasherDefault<IndexHasher>>;

/// What a node has allocated, as [`Cluster::allocated`] reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocation {
    pub resources: Resources,
    pub instances: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Free {
    cpu: u64,
    memory: u64,
    instances: u64,
}

impl Free {
    fn add(&mut self, free: Resources, instances: u32) {
        self.cpu += free.cpu_millis;
        self.memory += free.memory_mb;
        self.instances += u64::from(instances);
    }

    fn sub(&mut self, free: Resources, instances: u32) {
        self.cpu -= free.cpu_millis;
        self.memory -= free.memory_mb;
        self.instances -= u64::from(instances);
    }

    /// How many more instances of `r` would fit if this were one node.
    fn room(&self, r: Resources) -> u64 {
        let room = self.instances;
        // A resource the request does not need does not limit it.
        let cpu = self.cpu.checked_div(r.cpu_millis).unwrap_or(u64::MAX);
        let memory = self.memory.checked_div(r.memory_mb).unwrap_or(u64::MAX);
        room.min(cpu).min(memory)
    }
}

struct NodeState {
    node: Node,
    zone: usize,
    used: Resources,
    instances: u32,
    /// App index to how many of its instances run here.
    apps: IndexMap,
    /// Counted in its candidates: ready and below `max_instances`.
    indexed: bool,
    /// The candidates of its zone that hold it.
    indexes: Vec<u32>,
}

impl NodeState {
    fn new(node: Node) -> Self {
        Self {
            node,
            zone: 0,
            used: Resources::default(),
            instances: 0,
            apps: IndexMap::default(),
            indexed: false,
            indexes: Vec::new(),
        }
    }

    fn free(&self) -> Resources {
        Resources {
            cpu_millis: self
                .node
                .capacity
                .cpu_millis
                .saturating_sub(self.used.cpu_millis),
            memory_mb: self
                .node
                .capacity
                .memory_mb
                .saturating_sub(self.used.memory_mb),
        }
    }

    fn free_instances(&self) -> u32 {
        self.node.max_instances.saturating_sub(self.instances)
    }

    fn schedulable(&self) -> bool {
        self.node.status == NodeStatus::Ready && self.instances < self.node.max_instances
    }

    fn capacity_failure(&self, r: Resources) -> Option<Fail> {
        let free = self.free();
        if free.cpu_millis < r.cpu_millis {
            Some(Fail::Cpu)
        } else if free.memory_mb < r.memory_mb {
            Some(Fail::Memory)
        } else if self.instances >= self.node.max_instances {
            Some(Fail::MaxInstances)
        } else {
            None
        }
    }

    fn failure(&self, req: &AppRequest) -> Option<Fail> {
        status_failure(&self.node)
            .or_else(|| static_failure(&self.node, &req.placement))
            .or_else(|| self.capacity_failure(req.resources))
    }

    fn app_count(&self, app: u32) -> u32 {
        self.apps.get(&app).copied().unwrap_or(0)
    }
}

struct Zone {
    region: String,
    name: String,
    nodes: Vec<u32>,
    /// One per distinct set of this zone's nodes that some cached placement
    /// allows: placements that allow the same nodes here share one.
    candidates: Vec<Candidates>,
    candidates_of: HashMap<Vec<u32>, u32>,
    /// Nodes came or went: `candidates` is rebuilt before the next choice.
    dirty: bool,
}

impl Zone {
    fn new(region: &str, name: &str) -> Self {
        Self {
            region: region.to_owned(),
            name: name.to_owned(),
            nodes: Vec::new(),
            candidates: Vec::new(),
            candidates_of: HashMap::new(),
            dirty: true,
        }
    }
}

/// Some nodes of a zone, what the schedulable ones have free together, and
/// if there are more than `SCAN_LIMIT` of them, the schedulable ones ordered
/// by what they have free.
struct Candidates {
    /// Sorted slots.
    members: Vec<u32>,
    free: Free,
    ordered: bool,
    /// By (free cpu, free memory, slot).
    by_cpu: BTreeSet<Key>,
    /// By (free memory, free cpu, slot).
    by_memory: BTreeSet<Key>,
}

impl Candidates {
    fn insert(&mut self, free: Resources, free_instances: u32, slot: u32) {
        self.free.add(free, free_instances);
        if self.ordered {
            self.by_cpu.insert(Dim::Cpu.key(free, slot));
            self.by_memory.insert(Dim::Memory.key(free, slot));
        }
    }

    fn remove(&mut self, free: Resources, free_instances: u32, slot: u32) {
        self.free.sub(free, free_instances);
        if self.ordered {
            self.by_cpu.remove(&Dim::Cpu.key(free, slot));
            self.by_memory.remove(&Dim::Memory.key(free, slot));
        }
    }
}

/// Which resource a request orders its candidates by: the one it needs the
/// largest share of (of what the cluster has free), since that is the one
/// that runs out first.
#[derive(Debug, Clone, Copy)]
enum Dim {
    Cpu,
    Memory,
}

impl Dim {
    fn for_request(r: Resources, free: Free) -> Self {
        let cpu_share = u128::from(r.cpu_millis) * u128::from(free.memory);
        let memory_share = u128::from(r.memory_mb) * u128::from(free.cpu);
        if cpu_share >= memory_share {
            Dim::Cpu
        } else {
            Dim::Memory
        }
    }

    /// (amount of the ordering resource, amount of the other one).
    fn split(self, r: Resources) -> (u64, u64) {
        match self {
            Dim::Cpu => (r.cpu_millis, r.memory_mb),
            Dim::Memory => (r.memory_mb, r.cpu_millis),
        }
    }

    fn key(self, free: Resources, slot: u32) -> Key {
        let (ordering, other) = self.split(free);
        (ordering, other, slot)
    }

    fn index(self, candidates: &Candidates) -> &BTreeSet<Key> {
        match self {
            Dim::Cpu => &candidates.by_cpu,
            Dim::Memory => &candidates.by_memory,
        }
    }
}

struct AppState {
    id: AppId,
    /// Instances per zone index.
    zones: Vec<u32>,
    instances: u64,
}

/// The nodes a distinct placement allows, whatever their status and load.
struct Signature {
    placement: Placement,
    /// One bit per slot.
    bits: Vec<u64>,
    /// Per zone index, its candidates in the zone (`None`: no node there).
    zones: Vec<Option<u32>>,
}

impl Signature {
    fn contains(&self, slot: u32) -> bool {
        let slot = slot as usize;
        self.bits
            .get(slot / 64)
            .is_some_and(|w| (w >> (slot % 64)) & 1 == 1)
    }

    fn set(&mut self, slot: u32, member: bool) {
        let i = slot as usize;
        if self.bits.len() <= i / 64 {
            self.bits.resize(i / 64 + 1, 0);
        }
        if member {
            self.bits[i / 64] |= 1 << (i % 64);
        } else {
            self.bits[i / 64] &= !(1 << (i % 64));
        }
    }

    fn candidates(&self, zone: usize) -> Option<u32> {
        self.zones.get(zone).copied().flatten()
    }
}

/// What a walk of ordered candidates looks for.
#[derive(Clone, Copy)]
struct Walk {
    app: u32,
    /// The request's amount of the resource the index does not order by.
    need_other: u64,
    /// Instances of the app on a node that end the walk there.
    good_enough: u32,
}

/// A chosen node and how it ranks.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    slot: u32,
    /// Instances of the app already on the node.
    count: u32,
    key: Key,
}

impl Candidate {
    fn better_than(&self, other: &Candidate, strategy: Strategy) -> bool {
        match self.count.cmp(&other.count) {
            Ordering::Less => true,
            Ordering::Greater => false,
            Ordering::Equal => match strategy {
                Strategy::LeastAllocated => self.key > other.key,
                Strategy::BinPack => self.key < other.key,
            },
        }
    }
}

/// The scheduler's snapshot of the cluster: its nodes, what is allocated on
/// them and, per app, how its instances are spread. Every change is
/// incremental, so one `Cluster` lives as long as the controller's scheduler
/// and follows the store's events.
pub struct Cluster {
    /// Indexed by slot; a removed node's slot is reused.
    nodes: Vec<Option<NodeState>>,
    free_slots: Vec<u32>,
    slot_of: HashMap<NodeId, u32>,
    zones: Vec<Zone>,
    zone_of: HashMap<(String, String), usize>,
    /// Indexed by app index; an app with no instance left is forgotten.
    apps: Vec<Option<AppState>>,
    free_apps: Vec<u32>,
    app_of: HashMap<AppId, u32>,
    signatures: Vec<Signature>,
    signature_of: HashMap<String, usize>,
    /// What all indexed nodes have free, together.
    free: Free,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.slot_of.len())
            .field("zones", &self.zones.len())
            .field("apps", &self.app_of.len())
            .field("signatures", &self.signatures.len())
            .finish_non_exhaustive()
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    pub fn new() -> Self {
        Self {
            nodes: Vec::new(),
            free_slots: Vec::new(),
            slot_of: HashMap::new(),
            zones: Vec::new(),
            zone_of: HashMap::new(),
            apps: Vec::new(),
            free_apps: Vec::new(),
            app_of: HashMap::new(),
            signatures: Vec::new(),
            signature_of: HashMap::new(),
            free: Free::default(),
        }
    }

    /// How many nodes the cluster has, whatever their status.
    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().flatten().map(|n| &n.node)
    }

    pub fn node(&self, id: &NodeId) -> Option<&Node> {
        self.state(id).map(|n| &n.node)
    }

    /// What is allocated on a node, or `None` if it is unknown.
    pub fn allocated(&self, id: &NodeId) -> Option<Allocation> {
        self.state(id).map(|n| Allocation {
            resources: n.used,
            instances: n.instances,
        })
    }

    /// How many instances of `app` the node runs.
    pub fn instances_of(&self, app: &AppId, node: &NodeId) -> u32 {
        match (self.app_of.get(app), self.state(node)) {
            (Some(&app), Some(n)) => n.app_count(app),
            _ => 0,
        }
    }

    /// Adds a node, or replaces the description of a node with the same id
    /// (labels, zone, capacity, status...) keeping what is allocated on it.
    pub fn add_node(&mut self, node: Node) {
        match self.slot_of.get(&node.id) {
            Some(&slot) => {
                if let Some(mut state) = self.detach(slot) {
                    state.node = node;
                    self.attach(slot, state);
                }
            }
            None => {
                let slot = match self.free_slots.pop() {
                    Some(slot) => slot,
                    None => {
                        self.nodes.push(None);
                        // More than 4 billion nodes are not a cluster we serve.
                        u32::try_from(self.nodes.len() - 1).unwrap_or(u32::MAX)
                    }
                };
                self.slot_of.insert(node.id.clone(), slot);
                self.attach(slot, NodeState::new(node));
            }
        }
    }

    /// Forgets a node and everything allocated on it (its instances no longer
    /// count towards their apps' spread).
    pub fn remove_node(&mut self, id: &NodeId) -> Result<Node, ClusterError> {
        let slot = self.slot(id)?;
        let state = self.detach(slot).ok_or_else(|| unknown(id))?;
        self.slot_of.remove(id);
        self.free_slots.push(slot);
        for &app in state.apps.keys() {
            self.forget_app_if_empty(app);
        }
        Ok(state.node)
    }

    /// Marks a node ready, draining or lost. Only ready nodes get new
    /// instances; what runs on the others stays allocated until released.
    pub fn set_status(&mut self, id: &NodeId, status: NodeStatus) -> Result<(), ClusterError> {
        let slot = self.slot(id)?;
        self.unindex(slot);
        if let Some(n) = self.nodes[slot as usize].as_mut() {
            n.node.status = status;
        }
        self.index(slot);
        Ok(())
    }

    /// Records an instance that already runs on a node (when the snapshot is
    /// loaded from the store), without checking placement or capacity: what
    /// runs, runs.
    pub fn assign(
        &mut self,
        app: &AppId,
        node: &NodeId,
        resources: Resources,
    ) -> Result<(), ClusterError> {
        let slot = self.slot(node)?;
        let app = self.app_index(app);
        self.commit(slot, app, resources);
        Ok(())
    }

    /// Frees what one instance of `app` reserved on `node`.
    pub fn release(
        &mut self,
        app: &AppId,
        node: &NodeId,
        resources: Resources,
    ) -> Result<(), ClusterError> {
        let slot = self.slot(node)?;
        let no_instance = || ClusterError::NoInstance {
            app: app.clone(),
            node: node.clone(),
        };
        let app_index = *self.app_of.get(app).ok_or_else(no_instance)?;
        let state = self.nodes[slot as usize]
            .as_ref()
            .ok_or_else(|| unknown(node))?;
        if state.app_count(app_index) == 0 {
            return Err(no_instance());
        }
        if state.used.cpu_millis < resources.cpu_millis
            || state.used.memory_mb < resources.memory_mb
        {
            return Err(ClusterError::ReleaseExceedsAllocation {
                app: app.clone(),
                node: node.clone(),
                resources,
            });
        }
        self.uncommit(slot, app_index, resources);
        self.forget_app_if_empty(app_index);
        Ok(())
    }

    /// Places one instance: on the eligible zone with the fewest instances of
    /// the app (if the placement spreads over zones), on the node there with
    /// the fewest instances of the app, then the one the strategy prefers.
    pub fn place_one(&mut self, req: &AppRequest) -> Result<NodeId, Unschedulable> {
        let signature = self.signature(&req.placement);
        self.refresh();
        let app = self.app_index(&req.app);
        match self.choose(signature, app, req) {
            Some(slot) => {
                self.commit(slot, app, req.resources);
                Ok(self.id_of(slot))
            }
            None => {
                self.forget_app_if_empty(app);
                Err(self.explain(req))
            }
        }
    }

    /// Places `count` instances, one after the other as [`Cluster::place_one`]
    /// would, or none: if one does not fit, those already placed by this call
    /// are released and the error says why the last one did not fit.
    pub fn place(&mut self, req: &AppRequest, count: usize) -> Result<Vec<NodeId>, Unschedulable> {
        let signature = self.signature(&req.placement);
        self.refresh();
        let app = self.app_index(&req.app);
        let mut placed = Vec::with_capacity(count);
        for _ in 0..count {
            match self.choose(signature, app, req) {
                Some(slot) => {
                    self.commit(slot, app, req.resources);
                    placed.push(slot);
                }
                None => {
                    let why = self.explain(req);
                    for slot in placed {
                        self.uncommit(slot, app, req.resources);
                    }
                    self.forget_app_if_empty(app);
                    return Err(why);
                }
            }
        }
        if placed.is_empty() {
            self.forget_app_if_empty(app);
        }
        Ok(placed.into_iter().map(|slot| self.id_of(slot)).collect())
    }

    /// Places one instance on the given node if it passes every filter, e.g.
    /// for a global app.
    pub fn place_on(&mut self, req: &AppRequest, node: &NodeId) -> Result<(), ClusterError> {
        let slot = self.slot(node)?;
        let state = self.nodes[slot as usize]
            .as_ref()
            .ok_or_else(|| unknown(node))?;
        if let Some(fail) = state.failure(req) {
            return Err(ClusterError::NodeUnfit {
                app: req.app.clone(),
                node: node.clone(),
                reason: explain(1, [fail], &req.placement),
            });
        }
        let app = self.app_index(&req.app);
        self.commit(slot, app, req.resources);
        Ok(())
    }

    /// The nodes a global app (one instance per matching node) should run
    /// on: every ready node its placement allows, by id. Capacity is not
    /// considered here; [`Cluster::place_on`] checks it per node.
    pub fn global_nodes(&self, placement: &Placement) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self
            .nodes
            .iter()
            .flatten()
            .filter(|n| {
                n.node.status == NodeStatus::Ready && static_failure(&n.node, placement).is_none()
            })
            .map(|n| n.node.id.clone())
            .collect();
        nodes.sort_unstable();
        nodes
    }

    fn state(&self, id: &NodeId) -> Option<&NodeState> {
        let slot = *self.slot_of.get(id)?;
        self.nodes.get(slot as usize)?.as_ref()
    }

    fn slot(&self, id: &NodeId) -> Result<u32, ClusterError> {
        self.slot_of.get(id).copied().ok_or_else(|| unknown(id))
    }

    fn id_of(&self, slot: u32) -> NodeId {
        match &self.nodes[slot as usize] {
            Some(n) => n.node.id.clone(),
            // Slots handed out by `choose` always hold a node.
            None => NodeId::from(""),
        }
    }

    fn app_index(&mut self, app: &AppId) -> u32 {
        if let Some(&i) = self.app_of.get(app) {
            return i;
        }
        let state = AppState {
            id: app.clone(),
            zones: vec![0; self.zones.len()],
            instances: 0,
        };
        let i = match self.free_apps.pop() {
            Some(i) => {
                self.apps[i as usize] = Some(state);
                i
            }
            None => {
                self.apps.push(Some(state));
                u32::try_from(self.apps.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.app_of.insert(app.clone(), i);
        i
    }

    fn forget_app_if_empty(&mut self, app: u32) {
        let Some(slot) = self.apps.get_mut(app as usize) else {
            return;
        };
        if let Some(state) = slot.take_if(|a| a.instances == 0) {
            self.app_of.remove(&state.id);
            self.free_apps.push(app);
        }
    }

    fn zone_index(&mut self, region: &str, zone: &str) -> usize {
        if let Some(&z) = self.zone_of.get(&(region.to_owned(), zone.to_owned())) {
            return z;
        }
        let z = self.zones.len();
        self.zones.push(Zone::new(region, zone));
        self.zone_of.insert((region.to_owned(), zone.to_owned()), z);
        for app in self.apps.iter_mut().flatten() {
            app.zones.push(0);
        }
        z
    }

    /// The cached signature of a placement, computed (one pass over the
    /// nodes) the first time it is seen.
    fn signature(&mut self, placement: &Placement) -> usize {
        let key = signature_key(placement);
        if let Some(&i) = self.signature_of.get(&key) {
            return i;
        }
        if self.signatures.len() >= MAX_SIGNATURES {
            self.signatures.clear();
            self.signature_of.clear();
            for zone in &mut self.zones {
                zone.dirty = true;
            }
        }
        let mut signature = Signature {
            placement: placement.clone(),
            bits: Vec::new(),
            zones: vec![None; self.zones.len()],
        };
        for (z, zone) in self.zones.iter_mut().enumerate() {
            let mut members = Vec::new();
            for &slot in &zone.nodes {
                let Some(n) = self.nodes[slot as usize].as_ref() else {
                    continue;
                };
                if static_failure(&n.node, placement).is_none() {
                    signature.set(slot, true);
                    members.push(slot);
                }
            }
            members.sort_unstable();
            // A dirty zone is rebuilt from the bits before it is used.
            if !zone.dirty {
                signature.zones[z] = candidates_for(zone, &mut self.nodes, members);
            }
        }
        let i = self.signatures.len();
        self.signatures.push(signature);
        self.signature_of.insert(key, i);
        i
    }

    /// Rebuilds the candidate indexes of zones whose nodes changed.
    fn refresh(&mut self) {
        for (z, zone) in self.zones.iter_mut().enumerate() {
            if !zone.dirty {
                continue;
            }
            zone.dirty = false;
            zone.candidates.clear();
            zone.candidates_of.clear();
            for &slot in &zone.nodes {
                if let Some(n) = self.nodes[slot as usize].as_mut() {
                    n.indexes.clear();
                }
            }
            for signature in &mut self.signatures {
                let mut members: Vec<u32> = zone
                    .nodes
                    .iter()
                    .copied()
                    .filter(|&s| signature.contains(s))
                    .collect();
                members.sort_unstable();
                if signature.zones.len() <= z {
                    signature.zones.resize(z + 1, None);
                }
                signature.zones[z] = candidates_for(zone, &mut self.nodes, members);
            }
        }
    }

    /// Puts a node's state into `slot`; its zone's candidates are rebuilt
    /// before the next choice.
    fn attach(&mut self, slot: u32, mut state: NodeState) {
        let zone = self.zone_index(&state.node.region, &state.node.zone);
        state.zone = zone;
        state.indexed = false;
        state.indexes.clear();
        for (&app, &count) in &state.apps {
            if let Some(Some(a)) = self.apps.get_mut(app as usize) {
                a.zones[zone] += count;
                a.instances += u64::from(count);
            }
        }
        for signature in &mut self.signatures {
            signature.set(
                slot,
                static_failure(&state.node, &signature.placement).is_none(),
            );
        }
        self.zones[zone].nodes.push(slot);
        self.zones[zone].dirty = true;
        self.nodes[slot as usize] = Some(state);
        self.index(slot);
    }

    /// Takes a node's state out of `slot`.
    fn detach(&mut self, slot: u32) -> Option<NodeState> {
        self.unindex(slot);
        let state = self.nodes.get_mut(slot as usize)?.take()?;
        for (&app, &count) in &state.apps {
            if let Some(Some(a)) = self.apps.get_mut(app as usize) {
                a.zones[state.zone] -= count;
                a.instances -= u64::from(count);
            }
        }
        for signature in &mut self.signatures {
            signature.set(slot, false);
        }
        let zone = &mut self.zones[state.zone];
        zone.nodes.retain(|&s| s != slot);
        zone.dirty = true;
        Some(state)
    }

    /// Adds a node to its candidates (their free capacity, and their order
    /// if they keep one) if it can take instances.
    fn index(&mut self, slot: u32) {
        let Some(n) = self.nodes[slot as usize].as_mut() else {
            return;
        };
        if n.indexed || !n.schedulable() {
            return;
        }
        n.indexed = true;
        let (free, free_instances) = (n.free(), n.free_instances());
        let zone = &mut self.zones[n.zone];
        if !zone.dirty {
            for &i in &n.indexes {
                zone.candidates[i as usize].insert(free, free_instances, slot);
            }
        }
        self.free.add(free, free_instances);
    }

    fn unindex(&mut self, slot: u32) {
        let Some(n) = self.nodes[slot as usize].as_mut() else {
            return;
        };
        if !n.indexed {
            return;
        }
        n.indexed = false;
        let (free, free_instances) = (n.free(), n.free_instances());
        let zone = &mut self.zones[n.zone];
        if !zone.dirty {
            for &i in &n.indexes {
                zone.candidates[i as usize].remove(free, free_instances, slot);
            }
        }
        self.free.sub(free, free_instances);
    }

    fn commit(&mut self, slot: u32, app: u32, r: Resources) {
        self.unindex(slot);
        let Some(n) = self.nodes[slot as usize].as_mut() else {
            return;
        };
        n.used.cpu_millis += r.cpu_millis;
        n.used.memory_mb += r.memory_mb;
        n.instances += 1;
        *n.apps.entry(app).or_default() += 1;
        if let Some(Some(a)) = self.apps.get_mut(app as usize) {
            a.zones[n.zone] += 1;
            a.instances += 1;
        }
        self.index(slot);
    }

    /// The inverse of `commit`; the caller checked that it applies.
    fn uncommit(&mut self, slot: u32, app: u32, r: Resources) {
        self.unindex(slot);
        let Some(n) = self.nodes[slot as usize].as_mut() else {
            return;
        };
        n.used.cpu_millis -= r.cpu_millis;
        n.used.memory_mb -= r.memory_mb;
        n.instances -= 1;
        if let Some(count) = n.apps.get_mut(&app) {
            *count -= 1;
            if *count == 0 {
                n.apps.remove(&app);
            }
        }
        if let Some(Some(a)) = self.apps.get_mut(app as usize) {
            a.zones[n.zone] -= 1;
            a.instances -= 1;
        }
        self.index(slot);
    }

    /// The node the next instance goes to, or `None` if no node fits.
    fn choose(&self, signature: usize, app: u32, req: &AppRequest) -> Option<u32> {
        let signature = &self.signatures[signature];
        let per_zone = match self.apps.get(app as usize) {
            Some(Some(a)) => a.zones.as_slice(),
            _ => &[],
        };
        let dim = Dim::for_request(req.resources, self.free);
        let candidates = |z: usize| {
            signature
                .candidates(z)
                .map(|i| &self.zones[z].candidates[i as usize])
        };
        let eligible = |z: &usize| candidates(*z).is_some_and(|c| c.free.instances > 0);

        if !req.placement.spread_zones {
            let mut best: Option<Candidate> = None;
            for z in (0..self.zones.len()).filter(eligible) {
                let in_zone = per_zone.get(z).copied().unwrap_or(0);
                let c = self.best_in_zone(z, signature, app, in_zone, req, dim);
                if let Some(c) = c.filter(|c| best.is_none_or(|b| c.better_than(&b, req.strategy)))
                {
                    best = Some(c);
                }
            }
            return best.map(|c| c.slot);
        }

        // The zone with the fewest instances of the app, ties by the most
        // room for it on the nodes it may use; a zone where nothing fits is
        // passed over for the next.
        let count = |z: usize| per_zone.get(z).copied().unwrap_or(0);
        let room = |z: usize| candidates(z).map_or(0, |c| c.free.room(req.resources));
        let rank = |a: &usize, b: &usize| {
            let (za, zb) = (&self.zones[*a], &self.zones[*b]);
            count(*a)
                .cmp(&count(*b))
                .then_with(|| Reverse(room(*a)).cmp(&Reverse(room(*b))))
                .then_with(|| (&za.region, &za.name).cmp(&(&zb.region, &zb.name)))
        };
        let mut tried: Vec<usize> = Vec::new();
        loop {
            let z = (0..self.zones.len())
                .filter(eligible)
                .filter(|z| !tried.contains(z))
                .min_by(rank)?;
            let in_zone = per_zone.get(z).copied().unwrap_or(0);
            if let Some(c) = self.best_in_zone(z, signature, app, in_zone, req, dim) {
                return Some(c.slot);
            }
            tried.push(z);
        }
    }

    /// The best node of one zone for the request; `in_zone` is how many
    /// instances the app has in the zone.
    fn best_in_zone(
        &self,
        z: usize,
        signature: &Signature,
        app: u32,
        in_zone: u32,
        req: &AppRequest,
        dim: Dim,
    ) -> Option<Candidate> {
        let zone = &self.zones[z];
        let candidates = &zone.candidates[signature.candidates(z)? as usize];
        let members = &candidates.members;
        if !candidates.ordered {
            let mut best: Option<Candidate> = None;
            for &slot in members {
                let Some(n) = self.nodes[slot as usize].as_ref() else {
                    continue;
                };
                if !n.indexed || n.capacity_failure(req.resources).is_some() {
                    continue;
                }
                let c = Candidate {
                    slot,
                    count: n.app_count(app),
                    key: dim.key(n.free(), slot),
                };
                if best.is_none_or(|b| c.better_than(&b, req.strategy)) {
                    best = Some(c);
                }
            }
            return best;
        }
        // Some matching node has at most the average count, so settling for
        // that keeps the spread even; below the first round it is exact.
        let good_enough = in_zone / u32::try_from(members.len()).unwrap_or(u32::MAX);
        let (need, need_other) = dim.split(req.resources);
        let fitting = dim.index(candidates).range((need, 0, 0)..);
        let walk = Walk {
            app,
            need_other,
            good_enough,
        };
        match req.strategy {
            Strategy::LeastAllocated => self.walk(fitting.rev(), walk),
            Strategy::BinPack => self.walk(fitting, walk),
        }
    }

    /// Goes through ordered candidates from the one the strategy likes best, and
    /// takes the first that fits with no more than `good_enough` instances of
    /// the app; failing that, the one with the fewest among the first
    /// `NODE_SPREAD_SAMPLE` that fit.
    fn walk<'a>(&self, keys: impl Iterator<Item = &'a Key>, walk: Walk) -> Option<Candidate> {
        let Walk {
            app,
            need_other,
            good_enough,
        } = walk;
        let mut best: Option<Candidate> = None;
        let mut looked_at = 0;
        for &key in keys {
            let (_, free_other, slot) = key;
            if free_other < need_other {
                continue;
            }
            let Some(n) = self.nodes[slot as usize].as_ref() else {
                continue;
            };
            let count = n.app_count(app);
            if count <= good_enough {
                return Some(Candidate { slot, count, key });
            }
            if best.is_none_or(|b| count < b.count) {
                best = Some(Candidate { slot, count, key });
            }
            looked_at += 1;
            if looked_at >= NODE_SPREAD_SAMPLE {
                break;
            }
        }
        best
    }

    /// Why no node fits: one pass over every node (only on failure).
    fn explain(&self, req: &AppRequest) -> Unschedulable {
        let nodes = self.nodes.iter().flatten();
        explain(
            self.len(),
            nodes.filter_map(|n| n.failure(req)),
            &req.placement,
        )
    }
}

#[cfg(test)]
impl Cluster {
    /// Panics where an incremental index disagrees with a recomputation from
    /// the nodes themselves.
    pub(crate) fn check_indexes(&self) {
        let mut free = Free::default();
        let mut per_app: HashMap<u32, Vec<u32>> = HashMap::new();
        for n in self.nodes.iter().flatten() {
            assert_eq!(n.indexed, n.schedulable(), "{}", n.node.id);
            if n.indexed {
                free.add(n.free(), n.free_instances());
            }
            for (&app, &count) in &n.apps {
                let zones = per_app
                    .entry(app)
                    .or_insert_with(|| vec![0; self.zones.len()]);
                zones[n.zone] += count;
            }
        }
        assert_eq!(free, self.free);
        for (i, app) in self.apps.iter().enumerate() {
            let Some(app) = app else { continue };
            let zones = per_app
                .remove(&(i as u32))
                .unwrap_or_else(|| vec![0; self.zones.len()]);
            assert_eq!(app.zones, zones, "app {}", app.id);
            assert_eq!(
                app.instances,
                zones.iter().map(|&c| u64::from(c)).sum::<u64>()
            );
        }
        assert!(
            per_app.is_empty(),
            "instances of forgotten apps: {per_app:?}"
        );
        for (z, zone) in self
            .zones
            .iter()
            .enumerate()
            .filter(|(_, zone)| !zone.dirty)
        {
            for signature in &self.signatures {
                let mut members: Vec<u32> = zone
                    .nodes
                    .iter()
                    .copied()
                    .filter(|&slot| {
                        let n = self.nodes[slot as usize]
                            .as_ref()
                            .expect("zone node exists");
                        static_failure(&n.node, &signature.placement).is_none()
                    })
                    .collect();
                members.sort_unstable();
                let Some(i) = signature.candidates(z) else {
                    assert!(members.is_empty());
                    continue;
                };
                let candidates = &zone.candidates[i as usize];
                assert_eq!(candidates.members, members);
                let (mut free, mut keys) = (Free::default(), BTreeSet::new());
                for &slot in &members {
                    let n = self.nodes[slot as usize].as_ref().expect("member exists");
                    assert!(n.indexes.contains(&i));
                    if n.indexed {
                        free.add(n.free(), n.free_instances());
                        keys.insert(Dim::Cpu.key(n.free(), slot));
                    }
                }
                assert_eq!(candidates.free, free);
                if candidates.ordered {
                    assert_eq!(candidates.by_cpu, keys);
                    assert_eq!(candidates.by_memory.len(), keys.len());
                }
            }
        }
    }
}

/// The zone's candidates made of exactly `members` (sorted), shared with
/// any placement that allows the same nodes there; `None` if there are none.
fn candidates_for(
    zone: &mut Zone,
    nodes: &mut [Option<NodeState>],
    members: Vec<u32>,
) -> Option<u32> {
    if members.is_empty() {
        return None;
    }
    if let Some(&i) = zone.candidates_of.get(&members) {
        return Some(i);
    }
    let i = u32::try_from(zone.candidates.len()).unwrap_or(u32::MAX);
    let mut candidates = Candidates {
        members: members.clone(),
        free: Free::default(),
        ordered: members.len() > SCAN_LIMIT,
        by_cpu: BTreeSet::new(),
        by_memory: BTreeSet::new(),
    };
    for &slot in &members {
        let Some(n) = nodes[slot as usize].as_mut() else {
            continue;
        };
        n.indexes.push(i);
        if n.indexed {
            candidates.insert(n.free(), n.free_instances(), slot);
        }
    }
    zone.candidates.push(candidates);
    zone.candidates_of.insert(members, i);
    Some(i)
}

fn unknown(id: &NodeId) -> ClusterError {
    ClusterError::UnknownNode { node: id.clone() }
}

/// A placement's identity for the signature cache: its rules in a canonical
/// order (the order of rules changes which one a failure names, not which
/// nodes match), every string length-prefixed so that no two placements
/// collide.
fn signature_key(p: &Placement) -> String {
    fn list(out: &mut String, tag: char, items: &[String]) {
        let mut items: Vec<&String> = items.iter().collect();
        items.sort_unstable();
        items.dedup();
        let _ = write!(out, "{tag}{}", items.len());
        for item in items {
            let _ = write!(out, ":{}:{item}", item.len());
        }
    }
    let mut key = String::new();
    list(&mut key, 'o', &p.roles);
    list(&mut key, 'r', &p.regions);
    list(&mut key, 'z', &p.zones);
    let mut constraints: Vec<String> = p
        .constraints
        .iter()
        .map(|c| {
            let mut s = String::new();
            list(&mut s, 'k', std::slice::from_ref(&c.key));
            match &c.op {
                crate::ConstraintOp::Eq(v) => list(&mut s, '=', std::slice::from_ref(v)),
                crate::ConstraintOp::Ne(v) => list(&mut s, '!', std::slice::from_ref(v)),
                crate::ConstraintOp::In(vs) => list(&mut s, 'i', vs),
                crate::ConstraintOp::Regex(re) => {
                    list(&mut s, '~', &[re.as_str().to_owned()]);
                }
            }
            s
        })
        .collect();
    constraints.sort_unstable();
    list(&mut key, 'c', &constraints);
    key
}
