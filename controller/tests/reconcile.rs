//! The app reconciler against a real embedded store: apps become placed
//! instances, spread over zones; scaling, node loss, global apps, new
//! revisions and unschedulable apps behave as a user expects.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_controller::agents::Agents;
use keel_controller::apps::Apps;
use keel_controller::instances::{InstanceRecord, keys};
use keel_controller::nodes::{Nodes, Registration};
use keel_controller::reconcile::Reconciler;
use keel_controller::records::NodeCapacity;
use keel_protocol::{InstanceRef, InstanceState, InstanceStatus, StatusReport};
use keel_store::{RangeRequest, Store, StoreConfig};

struct Cluster {
    store: Arc<dyn Store>,
    apps: Apps,
    agents: Agents,
    nodes: Nodes,
    reconciler: Reconciler,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Nine nodes: three in each of three zones.
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let store = keel_store::open(&StoreConfig::embedded(dir.path().join("s.redb")))
            .await
            .unwrap();
        let cluster = Cluster {
            apps: Apps::new(store.clone()),
            agents: Agents::new(store.clone()),
            nodes: Nodes::new(store.clone(), Duration::from_secs(30)),
            reconciler: Reconciler::new(store.clone()),
            store,
            _dir: dir,
        };
        for zone in ["a", "b", "c"] {
            for i in 0..3 {
                cluster
                    .register(&format!("n-{zone}{i}"), &format!("eu-{zone}"))
                    .await;
            }
        }
        cluster
    }

    async fn register(&self, name: &str, zone: &str) {
        let registration = Registration {
            name: name.into(),
            region: "eu".into(),
            zone: zone.into(),
            labels: BTreeMap::from([(
                "disk".to_owned(),
                if name.ends_with('0') { "ssd" } else { "hdd" }.to_owned(),
            )]),
            roles: vec!["worker".into()],
            capacity: NodeCapacity {
                cpu_millis: 2000,
                memory_mb: 4096,
                max_instances: 10,
            },
            address: "127.0.0.1".into(),
        };
        self.nodes.register(registration).await.unwrap();
    }

    async fn apply(&self, yaml: &str) {
        self.apps
            .apply(keel_manifest::parse_yaml(yaml).unwrap(), None)
            .await
            .unwrap();
    }

    /// Passes until nothing changes (at most 10).
    async fn converge(&self) {
        for _ in 0..10 {
            if self.reconciler.pass().await.unwrap() == 0 {
                return;
            }
        }
        panic!("the reconciler did not converge in 10 passes");
    }

    async fn instances(&self, app: &str) -> Vec<InstanceRecord> {
        let page = self
            .store
            .range(&RangeRequest::prefix(keys::instances(Some(("shop", app)))))
            .await
            .unwrap();
        page.kvs
            .iter()
            .map(|kv| serde_json::from_slice(&kv.value).unwrap())
            .collect()
    }

    /// Instances per zone letter, as `{"a": 2, ...}`.
    async fn per_zone(&self, app: &str) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for instance in self.instances(app).await {
            let node = instance.node.expect("placed");
            *out.entry(node[2..3].to_owned()).or_default() += 1;
        }
        out
    }
}

fn app(name: &str, extra: &str) -> String {
    format!(
        "name: {name}\nproject: shop\nimage: keel/test-server:1\nresources:\n  cpu_millis: 100\n  memory_mb: 128\n{extra}"
    )
}

#[tokio::test]
async fn instances_are_created_spread_over_zones_and_scaled() {
    let c = Cluster::start().await;
    c.apply(&app("web", "instances: 6\n")).await;
    c.converge().await;
    let zones = c.per_zone("web").await;
    assert_eq!(
        zones,
        BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 2)])
    );
    let nodes: std::collections::BTreeSet<_> = c
        .instances("web")
        .await
        .into_iter()
        .map(|i| i.node)
        .collect();
    assert_eq!(nodes.len(), 6, "spread over nodes within zones too");

    c.apply(&app("web", "instances: 2\n")).await;
    c.converge().await;
    assert_eq!(c.instances("web").await.len(), 2);
    c.apply(&app("web", "instances: 0\n")).await;
    c.converge().await;
    assert!(
        c.instances("web").await.is_empty(),
        "0 instances: defined but stopped"
    );
}

/// Reports every placed instance of an app as running and ready (what the
/// agents would say), or as crash-looping.
async fn report(c: &Cluster, app: &str, restarts: u32) {
    let mut by_node: BTreeMap<String, Vec<InstanceStatus>> = BTreeMap::new();
    for i in c.instances(app).await {
        let Some(node) = i.node.clone() else { continue };
        by_node.entry(node).or_default().push(InstanceStatus {
            instance: InstanceRef {
                project: i.project,
                app: i.app,
                id: i.id,
            },
            state: if restarts == 0 {
                InstanceState::Running
            } else {
                InstanceState::Starting
            },
            ready: restarts == 0,
            restarts,
            exit_code: (restarts > 0).then_some(137),
            reason: (restarts > 0).then(|| "out of memory".to_owned()),
            ports: BTreeMap::new(),
            cpu_millis: None,
            memory_bytes: None,
        });
    }
    for (node, instances) in by_node {
        c.agents
            .report(&node, StatusReport { instances })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_rolling_update_keeps_enough_ready_and_never_surges_past_the_limit() {
    let c = Cluster::start().await;
    c.apply(&app("web", "instances: 3\n")).await;
    c.converge().await;
    report(&c, "web", 0).await;
    c.converge().await;

    // Default update: max_surge 1, max_unavailable 0.
    c.apply(&app("web", "instances: 3\nenv:\n  COLOUR: blue\n"))
        .await;
    let mut steps = 0;
    loop {
        c.converge().await;
        let instances = c.instances("web").await;
        let ready = c
            .agents
            .instances(Some(("shop", "web")))
            .await
            .unwrap()
            .iter()
            .filter(|i| i.ready)
            .count();
        assert!(
            instances.len() <= 4,
            "never more than count + max_surge: {instances:?}"
        );
        assert!(
            ready >= 3,
            "never fewer ready than count - max_unavailable ({ready})"
        );
        if instances.iter().all(|i| i.revision == 2) && instances.len() == 3 {
            break;
        }
        // The agents report the new ones ready; only then may old ones go.
        report(&c, "web", 0).await;
        steps += 1;
        assert!(steps < 10, "the update does not finish");
    }
    assert_eq!(steps, 3, "one instance at a time");
}

#[tokio::test]
async fn without_reports_the_old_revision_keeps_running() {
    let c = Cluster::start().await;
    c.apply(&app("web", "instances: 2\n")).await;
    c.converge().await;
    report(&c, "web", 0).await;
    c.apply(
        &app("web", "instances: 2\nimage: keel/test-server:2\n")
            .replace("image: keel/test-server:1\n", ""),
    )
    .await;
    c.converge().await;
    let revisions: Vec<u64> = c
        .instances("web")
        .await
        .iter()
        .map(|i| i.revision)
        .collect();
    assert_eq!(
        revisions.iter().filter(|r| **r == 1).count(),
        2,
        "{revisions:?}: the old ones stay until new ones are ready"
    );
    assert_eq!(
        revisions.iter().filter(|r| **r == 2).count(),
        1,
        "{revisions:?}: one surge instance"
    );
}

#[tokio::test]
async fn a_crash_loop_marks_the_app_degraded_with_the_reason_and_recovery_clears_it() {
    let c = Cluster::start().await;
    c.apply(&app("web", "instances: 2\n")).await;
    c.converge().await;
    report(&c, "web", 4).await;
    c.converge().await;
    let events = c.apps.events(Some("shop"), Some("web"), 100).await.unwrap();
    let degraded: Vec<_> = events.iter().filter(|e| e.reason == "degraded").collect();
    assert_eq!(degraded.len(), 1, "{events:?}");
    assert!(
        degraded[0]
            .message
            .contains("restarted 4 times; last exit code 137: out of memory"),
        "{}",
        degraded[0].message
    );

    report(&c, "web", 0).await;
    c.converge().await;
    let events = c.apps.events(Some("shop"), Some("web"), 100).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.reason == "recovered").count(), 1);
    assert_eq!(
        events.iter().filter(|e| e.reason == "degraded").count(),
        1,
        "no repeat while nothing changes"
    );
}
#[tokio::test]
async fn constraints_are_respected_and_impossible_apps_say_why() {
    let c = Cluster::start().await;
    let ssd = "instances: 3\nplacement:\n  constraints:\n    - key: disk\n      op: \"=\"\n      value: ssd\n";
    c.apply(&app("db", ssd)).await;
    c.converge().await;
    let nodes: Vec<String> = c
        .instances("db")
        .await
        .into_iter()
        .map(|i| i.node.unwrap())
        .collect();
    assert!(
        nodes.iter().all(|n| n.ends_with('0')),
        "only ssd nodes: {nodes:?}"
    );

    c.apply(
        &app("huge", "instances: 1\nresources:\n  cpu_millis: 64000\n")
            .replace("resources:\n  cpu_millis: 100\n  memory_mb: 128\n", ""),
    )
    .await;
    c.converge().await;
    let huge = c.instances("huge").await;
    assert_eq!(huge.len(), 1);
    assert_eq!(huge[0].node, None);
    assert_eq!(
        huge[0].pending_reason.as_deref(),
        Some("0/9 nodes: 9 insufficient cpu")
    );
    let events = c
        .apps
        .events(Some("shop"), Some("huge"), 100)
        .await
        .unwrap();
    let unschedulable: Vec<_> = events
        .iter()
        .filter(|e| e.reason == "unschedulable")
        .collect();
    assert_eq!(
        unschedulable.len(),
        1,
        "one event per reason, not one per pass"
    );
    assert!(
        unschedulable[0]
            .message
            .contains("0/9 nodes: 9 insufficient cpu")
    );
}

#[tokio::test]
async fn global_apps_follow_the_nodes_that_match() {
    let c = Cluster::start().await;
    c.apply(&app(
        "agent-sidecar",
        "global: true\nplacement:\n  zones: [eu-a, eu-b]\n",
    ))
    .await;
    c.converge().await;
    let instances = c.instances("agent-sidecar").await;
    assert_eq!(instances.len(), 6, "one on each of the six matching nodes");
    assert!(instances.iter().all(|i| i.node == i.pinned_node));

    c.register("n-a9", "eu-a").await;
    c.converge().await;
    assert_eq!(
        c.instances("agent-sidecar").await.len(),
        7,
        "a node that joins gets one"
    );
}

#[tokio::test]
async fn instances_on_a_lost_node_are_replaced_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let store = keel_store::open(&StoreConfig::embedded(dir.path().join("s.redb")))
        .await
        .unwrap();
    let apps = Apps::new(store.clone());
    // A node lost after 1 s of silence: two nodes keep beating, one stops.
    let nodes = Nodes::new(store.clone(), Duration::from_secs(1));
    let reconciler = Reconciler::new(store.clone()).with_grace(Duration::ZERO);
    for (name, zone) in [("keep-1", "eu-a"), ("keep-2", "eu-b"), ("dies", "eu-c")] {
        register_plain(&nodes, name, zone).await;
    }
    apps.apply(
        keel_manifest::parse_yaml(&app("web", "instances: 3\n")).unwrap(),
        None,
    )
    .await
    .unwrap();
    reconciler.pass().await.unwrap();
    let on = |instances: &[InstanceRecord], node: &str| {
        instances
            .iter()
            .filter(|i| i.node.as_deref() == Some(node))
            .count()
    };
    let read = || async {
        let page = store
            .range(&RangeRequest::prefix(keys::instances(Some((
                "shop", "web",
            )))))
            .await
            .unwrap();
        page.kvs
            .iter()
            .map(|kv| serde_json::from_slice(&kv.value).unwrap())
            .collect::<Vec<InstanceRecord>>()
    };
    assert_eq!(on(&read().await, "dies"), 1);

    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        nodes.heartbeat_alive("keep-1").await.unwrap();
        nodes.heartbeat_alive("keep-2").await.unwrap();
    }
    for _ in 0..5 {
        reconciler.pass().await.unwrap();
    }
    let instances = read().await;
    assert_eq!(instances.len(), 3);
    assert_eq!(on(&instances, "dies"), 0, "{instances:?}");
    let events = apps.events(Some("shop"), Some("web"), 100).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.reason == "instance-replaced" && e.message.contains("dies"))
    );
}

/// Registers a node with no labels or roles and room for 20 instances.
async fn register_plain(nodes: &Nodes, name: &str, zone: &str) {
    let registration = Registration {
        name: name.into(),
        region: "eu".into(),
        zone: zone.into(),
        labels: BTreeMap::new(),
        roles: vec![],
        capacity: NodeCapacity {
            cpu_millis: 4000,
            memory_mb: 8192,
            max_instances: 20,
        },
        address: "127.0.0.1".into(),
    };
    nodes.register(registration).await.unwrap();
}

/// Three nodes that heartbeat by hand, a 1 s lost-after, and an app on them.
async fn small_cluster(
    reconciler: impl FnOnce(Arc<dyn Store>) -> Reconciler,
    nodes: usize,
) -> (tempfile::TempDir, Arc<dyn Store>, Apps, Nodes, Reconciler) {
    let dir = tempfile::tempdir().unwrap();
    let store = keel_store::open(&StoreConfig::embedded(dir.path().join("s.redb")))
        .await
        .unwrap();
    let apps = Apps::new(store.clone());
    let node_api = Nodes::new(store.clone(), Duration::from_secs(1));
    for i in 0..nodes {
        register_plain(&node_api, &format!("n{i}"), &format!("z{i}")).await;
    }
    let reconciler = reconciler(store.clone());
    apps.apply(
        keel_manifest::parse_yaml(&app("web", &format!("instances: {}\n", nodes * 2))).unwrap(),
        None,
    )
    .await
    .unwrap();
    reconciler.pass().await.unwrap();
    (dir, store, apps, node_api, reconciler)
}

async fn instances_on(store: &Arc<dyn Store>, node: &str) -> usize {
    let page = store
        .range(&RangeRequest::prefix(keys::instances(Some((
            "shop", "web",
        )))))
        .await
        .unwrap();
    page.kvs
        .iter()
        .map(|kv| serde_json::from_slice::<InstanceRecord>(&kv.value).unwrap())
        .filter(|i| i.node.as_deref() == Some(node))
        .count()
}

#[tokio::test]
async fn no_node_is_declared_lost_during_the_grace_period_after_a_start() {
    let (_dir, store, _apps, _nodes, reconciler) = small_cluster(
        |s| Reconciler::new(s).with_grace(Duration::from_secs(60)),
        3,
    )
    .await;
    // Nobody beats: every node falls silent after 1 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for _ in 0..3 {
        reconciler.pass().await.unwrap();
    }
    assert_eq!(
        instances_on(&store, "n0").await,
        2,
        "kept through the grace period"
    );
}

#[tokio::test]
async fn a_mass_silence_replaces_one_node_at_a_time_and_says_why() {
    let (_dir, store, apps, nodes, reconciler) = small_cluster(
        |s| {
            Reconciler::new(s)
                .with_grace(Duration::ZERO)
                .with_mass_silence_interval(Duration::from_secs(60))
        },
        4,
    )
    .await;
    // Only n3 keeps beating: three of four nodes go silent at once.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        nodes.heartbeat_alive("n3").await.unwrap();
    }
    for _ in 0..4 {
        reconciler.pass().await.unwrap();
    }
    let silent_with_instances =
        futures::future::join_all(["n0", "n1", "n2"].map(|n| instances_on(&store, n))).await;
    assert_eq!(
        silent_with_instances.iter().filter(|n| **n == 0).count(),
        1,
        "one silent node emptied, the others wait: {silent_with_instances:?}"
    );
    let events = apps.events(None, None, 100).await.unwrap();
    let mass: Vec<_> = events
        .iter()
        .filter(|e| e.reason == "mass-silence")
        .collect();
    assert_eq!(mass.len(), 1, "{events:?}");
    assert!(
        mass[0].message.contains("3 of 4 nodes went silent at once"),
        "{}",
        mass[0].message
    );
}
