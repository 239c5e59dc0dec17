//! The app reconciler against a real embedded store: apps become placed
//! instances, spread over zones; scaling, node loss, global apps, new
//! revisions and unschedulable apps behave as a user expects.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keel_controller::apps::Apps;
use keel_controller::instances::{InstanceRecord, keys};
use keel_controller::nodes::{Nodes, Registration};
use keel_controller::reconcile::Reconciler;
use keel_controller::records::NodeCapacity;
use keel_store::{RangeRequest, Store, StoreConfig};

struct Cluster {
    store: Arc<dyn Store>,
    apps: Apps,
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
            .apply(keel_manifest::parse_yaml(yaml).unwrap())
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

#[tokio::test]
async fn a_new_revision_replaces_the_old_instances() {
    let c = Cluster::start().await;
    c.apply(&app("web", "instances: 3\n")).await;
    c.converge().await;
    c.apply(&app("web", "instances: 3\nenv:\n  COLOUR: blue\n"))
        .await;
    c.converge().await;
    let instances = c.instances("web").await;
    assert_eq!(instances.len(), 3);
    assert!(instances.iter().all(|i| i.revision == 2), "{instances:?}");
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
    let reconciler = Reconciler::new(store.clone());
    for (name, zone) in [("keep-1", "eu-a"), ("keep-2", "eu-b"), ("dies", "eu-c")] {
        nodes
            .register(Registration {
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
            })
            .await
            .unwrap();
    }
    apps.apply(keel_manifest::parse_yaml(&app("web", "instances: 3\n")).unwrap())
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
