//! The controller's writes against a real etcd with its default settings,
//! which refuse a transaction of more than 128 operations: a node that
//! runs hundreds of instances must still be able to report them.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

use std::collections::BTreeMap;
use std::time::Duration;

use keel_controller::agents::Agents;
use keel_controller::apps::Apps;
use keel_controller::nodes::{Nodes, Registration};
use keel_controller::reconcile::Reconciler;
use keel_controller::records::NodeCapacity;
use keel_protocol::{InstanceRef, InstanceState, InstanceStatus, StatusReport};
use keel_store::StoreConfig;

#[tokio::test]
async fn a_node_reports_300_instances_to_a_default_etcd() {
    let etcd = keel_testing::EtcdServer::start().await.unwrap();
    let mut config = StoreConfig::etcd(vec![etcd.endpoint()]);
    config.auto_compaction = None;
    let store = keel_store::open(&config).await.unwrap();
    let apps = Apps::new(store.clone());
    let agents = Agents::new(store.clone());
    let nodes = Nodes::new(store.clone(), Duration::from_secs(30));
    let reconciler = Reconciler::new(store.clone());
    nodes
        .register(Registration {
            name: "big".into(),
            region: "eu".into(),
            zone: "a".into(),
            labels: BTreeMap::new(),
            roles: vec!["worker".into()],
            capacity: NodeCapacity {
                cpu_millis: 400_000,
                memory_mb: 400_000,
                max_instances: 400,
            },
            address: "127.0.0.1".into(),
        })
        .await
        .unwrap();
    apps.apply(
        keel_manifest::parse_yaml(
            "name: web\nproject: shop\nimage: keel/test-server:1\ninstances: 300\nresources:\n  cpu_millis: 10\n  memory_mb: 16\nports:\n  - name: http\n    port: 8080\n",
        )
        .unwrap(),
        None,
    )
    .await
    .unwrap();
    for _ in 0..10 {
        if reconciler.pass().await.unwrap() == 0 {
            break;
        }
    }
    let placed = agents.instances(Some(("shop", "web"))).await.unwrap();
    assert_eq!(placed.len(), 300);
    assert!(placed.iter().all(|i| i.node.as_deref() == Some("big")));

    let report = |state: InstanceState| StatusReport {
        instances: placed
            .iter()
            .map(|i| InstanceStatus {
                instance: InstanceRef {
                    project: i.project.clone(),
                    app: i.app.clone(),
                    id: i.id.clone(),
                },
                state,
                ready: state == InstanceState::Running,
                restarts: 0,
                exit_code: None,
                reason: None,
                ports: BTreeMap::from([("http".to_owned(), format!("127.0.0.1:{}", 20_000))]),
                cpu_millis: None,
                memory_bytes: None,
            })
            .collect(),
    };
    let written = agents
        .report("big", report(InstanceState::Starting))
        .await
        .unwrap();
    assert_eq!(written, 300);
    let written = agents
        .report("big", report(InstanceState::Running))
        .await
        .unwrap();
    assert_eq!(written, 300);
    let shown = agents.instances(Some(("shop", "web"))).await.unwrap();
    assert_eq!(
        shown
            .iter()
            .filter(|i| i.state == "running" && i.ready)
            .count(),
        300,
        "every reported instance shows as running and ready"
    );
}
