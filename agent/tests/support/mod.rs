//! What the cluster tests share: what "up" means, and where things run.

#![allow(dead_code)] // each test binary uses its own part of this

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use keel_agent::docker::{DockerConfig, DockerRuntime};
use keel_agent::sim::SimInstance;
use keel_agent::testing::{ClusterConfig, Instance, NodeSpec, SimCluster};
use keel_protocol::InstanceState;

/// Zones of every test cluster.
pub const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// Long enough for any convergence in a test cluster (2 s to lose a node,
/// 100 ms to start an instance), short enough to fail fast.
pub const CONVERGE: Duration = Duration::from_secs(15);

/// Logs to the test's output when `RUST_LOG` says so.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A manifest with `instances` of `image`, and one port.
pub fn app(name: &str, image: &str, instances: u32) -> String {
    format!(
        "name: {name}\nproject: shop\nimage: {image}\ninstances: {instances}\nports:\n  - name: http\n    port: 8080\n"
    )
}

/// The app's instances once exactly `count` of them exist and all are up
/// (running and ready, as agents reported) on revision `revision` (any
/// revision when `None`); `Err` says what is off.
pub fn all_up(
    instances: Vec<Instance>,
    count: usize,
    revision: Option<u64>,
) -> Result<Vec<Instance>, String> {
    let up = instances
        .iter()
        .filter(|i| i.is_up() && revision.is_none_or(|r| i.revision == r))
        .count();
    if up == count && instances.len() == count {
        Ok(instances)
    } else {
        Err(format!(
            "{up} of {count} up (revision {revision:?}), {} in all: {instances:#?}",
            instances.len()
        ))
    }
}

/// Every instance of an app in every simulated runtime, by node.
pub fn in_runtimes(cluster: &SimCluster, app: &str) -> Vec<(String, SimInstance)> {
    cluster
        .runtimes()
        .flat_map(|(node, runtime)| {
            runtime
                .instances()
                .into_iter()
                .filter(|i| i.instance.app == app)
                .map(move |i| (node.to_owned(), i))
        })
        .collect()
}

/// How many of an app's instances the runtimes run.
pub fn running_in_runtimes(cluster: &SimCluster, app: &str) -> usize {
    in_runtimes(cluster, app)
        .iter()
        .filter(|(_, i)| i.state == InstanceState::Running)
        .count()
}

/// Instances per zone of the node they are placed on.
pub fn per_zone(cluster: &SimCluster, instances: &[Instance]) -> BTreeMap<String, usize> {
    let mut zones = BTreeMap::new();
    for instance in instances {
        let zone = instance
            .node
            .as_deref()
            .and_then(|n| cluster.node_spec(n))
            .map_or("(none)".to_owned(), |spec| spec.zone.clone());
        *zones.entry(zone).or_default() += 1;
    }
    zones
}

/// A test cluster whose one node, `node` in zone `a` on 127.0.0.1, runs a
/// Docker agent with the runtime's default settings on this machine's
/// engine.
pub async fn one_docker_node(node: &str) -> SimCluster {
    let mut cluster = SimCluster::start_with(ClusterConfig::default(), &[])
        .await
        .unwrap();
    let runtime = DockerRuntime::connect(DockerConfig::new(node, IpAddr::V4(Ipv4Addr::LOCALHOST)))
        .await
        .unwrap();
    cluster
        .add_node_with(NodeSpec::new(node, "a"), "127.0.0.1", Arc::new(runtime))
        .await
        .unwrap();
    cluster
}
