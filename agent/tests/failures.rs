//! When things break: nodes unplugged or cut off, the controller down, an
//! image that does not pull, an instance that crashes, an agent restarted.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use keel_agent::eventually;
use keel_agent::testing::{SimCluster, nodes_in_zones};
use keel_protocol::InstanceState;
use support::{CONVERGE, ZONES, all_up, app, in_runtimes, running_in_runtimes};

/// The node holding the most of the app's instances.
fn busiest(instances: &[keel_agent::testing::Instance]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for instance in instances {
        *counts.entry(instance.node.as_deref().unwrap()).or_default() += 1;
    }
    let (node, _) = counts.into_iter().max_by_key(|(_, n)| *n).unwrap();
    node.to_owned()
}

#[tokio::test]
async fn a_lost_node_s_instances_run_again_elsewhere_within_a_bound() {
    support::logs();
    let mut cluster = SimCluster::start(&nodes_in_zones(24, &ZONES))
        .await
        .unwrap();
    cluster
        .admin()
        .apply(&app("web", "nginx:1", 30))
        .await
        .unwrap();
    let before = eventually!(CONVERGE, {
        all_up(
            cluster.admin().instances("shop", "web").await.unwrap(),
            30,
            None,
        )
    });
    let victim = busiest(&before);
    let lost: BTreeSet<String> = before
        .iter()
        .filter(|i| i.node.as_deref() == Some(victim.as_str()))
        .map(|i| i.id.clone())
        .collect();
    assert!(!lost.is_empty());

    let killed = Instant::now();
    cluster.kill_node(&victim).unwrap();
    // node_lost_after (2 s) to notice, then a reconcile pass, a start
    // (100 ms) and a report: 5 s is a generous bound.
    let bound = cluster.config().node_lost_after + Duration::from_secs(3);
    let after = eventually!(bound, {
        all_up(
            cluster.admin().instances("shop", "web").await.unwrap(),
            30,
            None,
        )
        .and_then(|after| {
            let left: Vec<&String> = after
                .iter()
                .filter(|i| lost.contains(&i.id))
                .map(|i| &i.id)
                .collect();
            if left.is_empty() {
                Ok(after)
            } else {
                Err(format!("still shown on {victim}: {left:?}"))
            }
        })
    });
    let took = killed.elapsed();
    assert!(
        after
            .iter()
            .all(|i| i.node.as_deref() != Some(victim.as_str())),
        "nothing is placed on {victim}: {after:#?}"
    );
    assert_eq!(running_in_runtimes(&cluster, "web"), 30);
    let nodes = cluster.admin().nodes().await.unwrap();
    let status = nodes.iter().find(|n| n.name == victim).unwrap();
    assert_eq!(status.status, "lost");
    let events = cluster.admin().events("shop", "web").await.unwrap();
    assert!(
        events
            .iter()
            .any(|(reason, message)| reason == "instance-replaced" && message.contains(&victim)),
        "the replacement is an event: {events:?}"
    );
    eprintln!("{} instances replaced in {took:?}", lost.len());
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cut_off_node_keeps_running_then_stops_what_was_replaced_when_it_returns() {
    let mut cluster = SimCluster::start(&nodes_in_zones(24, &ZONES))
        .await
        .unwrap();
    cluster
        .admin()
        .apply(&app("web", "nginx:1", 12))
        .await
        .unwrap();
    let before = eventually!(CONVERGE, {
        all_up(
            cluster.admin().instances("shop", "web").await.unwrap(),
            12,
            None,
        )
    });
    let victim = busiest(&before);
    let stranded = cluster.runtime(&victim).unwrap().running();
    assert!(stranded > 0);

    cluster.partition(&victim).unwrap();
    eventually!(CONVERGE, {
        all_up(
            cluster.admin().instances("shop", "web").await.unwrap(),
            12,
            None,
        )
        .and_then(|instances| {
            if instances
                .iter()
                .any(|i| i.node.as_deref() == Some(victim.as_str()))
            {
                Err(format!("still placed on {victim}"))
            } else {
                Ok(())
            }
        })
    });
    // Cut off, the node cannot know: it keeps what it ran.
    assert_eq!(cluster.runtime(&victim).unwrap().running(), stranded);

    cluster.heal(&victim).unwrap();
    eventually!(CONVERGE, {
        let left = cluster.runtime(&victim).unwrap().instances().len();
        let total = running_in_runtimes(&cluster, "web");
        let nodes = cluster.admin().nodes().await.unwrap();
        let status = &nodes.iter().find(|n| n.name == victim).unwrap().status;
        if left == 0 && total == 12 && status == "ready" {
            Ok(())
        } else {
            Err(format!(
                "{left} left on {victim} ({status}), {total} running in all"
            ))
        }
    });
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_cluster_rides_out_a_controller_restart_and_loses_nothing() {
    let mut cluster = SimCluster::start(&nodes_in_zones(24, &ZONES))
        .await
        .unwrap();
    let admin = cluster.admin().clone();
    admin.apply(&app("web", "nginx:1", 12)).await.unwrap();
    admin.apply(&app("api", "shop/api:7", 6)).await.unwrap();
    let web = eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 12, None)
    });
    let api = eventually!(CONVERGE, {
        all_up(admin.instances("shop", "api").await.unwrap(), 6, None)
    });
    let placements = |instances: &[keel_agent::testing::Instance]| -> BTreeSet<(String, String)> {
        instances
            .iter()
            .map(|i| (i.id.clone(), i.node.clone().unwrap()))
            .collect()
    };

    cluster.kill_controller().await.unwrap();
    // Longer than node_lost_after: agents must not give up on what runs.
    tokio::time::sleep(cluster.config().node_lost_after + Duration::from_millis(500)).await;
    assert_eq!(running_in_runtimes(&cluster, "web"), 12);
    assert_eq!(running_in_runtimes(&cluster, "api"), 6);

    cluster.start_controller().await.unwrap();
    let admin = cluster.admin().clone();
    let web_after = eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 12, None)
    });
    let api_after = eventually!(CONVERGE, {
        all_up(admin.instances("shop", "api").await.unwrap(), 6, None)
    });
    assert_eq!(
        placements(&web_after),
        placements(&web),
        "same instances, same nodes"
    );
    assert_eq!(placements(&api_after), placements(&api));
    let nodes = admin.nodes().await.unwrap();
    assert!(
        nodes.iter().all(|n| n.status == "ready"),
        "every node came back: {nodes:?}"
    );
    // Nothing was restarted or started twice.
    for (node, instance) in in_runtimes(&cluster, "web")
        .into_iter()
        .chain(in_runtimes(&cluster, "api"))
    {
        assert_eq!(instance.starts, 1, "{} on {node}", instance.instance.id);
    }
    // And the restarted controller drives the agents: a scale goes through.
    admin.scale("shop", "web", 15).await.unwrap();
    eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 15, None)
    });
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unpullable_image_shows_as_failed_with_the_reason() {
    let cluster = SimCluster::start(&nodes_in_zones(12, &ZONES))
        .await
        .unwrap();
    cluster
        .admin()
        .apply(&app("web", "registry.example.com/shop/unpullable:1", 2))
        .await
        .unwrap();
    let failed = eventually!(CONVERGE, {
        let instances = cluster.admin().instances("shop", "web").await.unwrap();
        if instances.len() == 2 && instances.iter().all(|i| i.state == "failed") {
            Ok(instances)
        } else {
            Err(format!("{instances:#?}"))
        }
    });
    for instance in &failed {
        assert!(!instance.ready);
        let reason = instance.reason.as_deref().unwrap_or_default();
        assert!(
            reason.starts_with("cannot pull image registry.example.com/shop/unpullable:1: ")
                && reason.contains("manifest unknown"),
            "{reason}"
        );
    }
    // Fixing the image fixes the app.
    cluster
        .admin()
        .apply(&app("web", "registry.example.com/shop/web:1", 2))
        .await
        .unwrap();
    eventually!(CONVERGE, {
        all_up(
            cluster.admin().instances("shop", "web").await.unwrap(),
            2,
            Some(2),
        )
    });
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crashing_instance_is_restarted_under_its_policy_and_counted() {
    let cluster = SimCluster::start(&nodes_in_zones(6, &ZONES)).await.unwrap();
    let admin = cluster.admin();
    // The simulation crashes `crashing` images 500 ms after they run, with
    // status 3.
    let restarting = format!(
        "{}restart:\n  policy: on-failure\n  backoff:\n    initial: 100ms\n    max: 1s\n",
        app("worker", "shop/crashing:1", 1)
    );
    admin.apply(&restarting).await.unwrap();
    let instance = eventually!(CONVERGE, {
        let instances = admin.instances("shop", "worker").await.unwrap();
        match instances.first() {
            Some(i) if i.restarts >= 2 => Ok(i.clone()),
            _ => Err(format!("{instances:#?}")),
        }
    });
    let node = instance.node.clone().unwrap();
    let runtime = cluster.runtime(&node).unwrap();
    let started = runtime.instances()[0].starts;
    assert!(started >= 3, "started {started} times");
    // The restarts the agent counts are what tells the controller the app
    // is crash-looping.
    eventually!(CONVERGE, {
        let events = admin.events("shop", "worker").await.unwrap();
        if events
            .iter()
            .any(|(reason, message)| reason == "degraded" && message.contains(&instance.id))
        {
            Ok(())
        } else {
            Err(format!("no degraded event: {events:?}"))
        }
    });

    let never = format!(
        "{}restart:\n  policy: never\n",
        app("batch", "shop/crashing:2", 1)
    );
    admin.apply(&never).await.unwrap();
    let exited = eventually!(CONVERGE, {
        let instances = admin.instances("shop", "batch").await.unwrap();
        match instances.first() {
            Some(i) if i.state == "exited" => Ok(i.clone()),
            _ => Err(format!("{instances:#?}")),
        }
    });
    assert_eq!(exited.exit_code, Some(3));
    assert!(
        exited
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("status 3"),
        "{exited:?}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let still = admin.instances("shop", "batch").await.unwrap();
    assert_eq!(
        (still[0].state.as_str(), still[0].restarts),
        ("exited", 0),
        "never means never"
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restarted_agent_adopts_what_runs_instead_of_restarting_it() {
    let mut cluster = SimCluster::start(&nodes_in_zones(6, &ZONES)).await.unwrap();
    cluster
        .admin()
        .apply(&app("web", "nginx:1", 6))
        .await
        .unwrap();
    let before = eventually!(CONVERGE, {
        all_up(
            cluster.admin().instances("shop", "web").await.unwrap(),
            6,
            None,
        )
    });
    let node = busiest(&before);
    cluster.stop_agent(&node).await.unwrap();
    let held = cluster.runtime(&node).unwrap().instances();
    assert!(held.iter().all(|i| i.state == InstanceState::Running));
    cluster.start_agent(&node).unwrap();
    eventually!(CONVERGE, {
        match cluster.agent(&node) {
            Some(agent) if agent.status().streaming && agent.status().reported => Ok(()),
            other => Err(format!("{:?}", other.map(|a| a.status()))),
        }
    });
    let after = eventually!(CONVERGE, {
        all_up(
            cluster.admin().instances("shop", "web").await.unwrap(),
            6,
            None,
        )
    });
    assert_eq!(
        after.iter().map(|i| &i.id).collect::<BTreeSet<_>>(),
        before.iter().map(|i| &i.id).collect::<BTreeSet<_>>()
    );
    let now = cluster.runtime(&node).unwrap().instances();
    assert_eq!(
        now.iter()
            .map(|i| (&i.instance.id, i.starts))
            .collect::<Vec<_>>(),
        held.iter().map(|i| (&i.instance.id, 1)).collect::<Vec<_>>(),
        "the same instances, each started once"
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn nodes_that_boot_before_the_controller_join_once_it_is_up() {
    let mut cluster = SimCluster::start(&nodes_in_zones(6, &ZONES)).await.unwrap();
    cluster.stop_controller().await.unwrap();
    for spec in nodes_in_zones(12, &ZONES).into_iter().skip(6) {
        cluster.spawn_node(spec).await.unwrap();
    }
    // They retry with backoff meanwhile; give them time to back off.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!cluster.agent("node-011").unwrap().status().registered);

    cluster.start_controller().await.unwrap();
    eventually!(CONVERGE, {
        let nodes = cluster.admin().nodes().await.unwrap();
        let ready = nodes.iter().filter(|n| n.status == "ready").count();
        if ready == 12 {
            Ok(())
        } else {
            Err(format!("{ready} of 12 ready: {nodes:?}"))
        }
    });
    // And they take work.
    cluster
        .admin()
        .apply(&app("web", "nginx:1", 12))
        .await
        .unwrap();
    let instances = eventually!(CONVERGE, {
        all_up(
            cluster.admin().instances("shop", "web").await.unwrap(),
            12,
            None,
        )
    });
    let nodes: BTreeSet<&str> = instances.iter().filter_map(|i| i.node.as_deref()).collect();
    assert_eq!(nodes.len(), 12, "one on every node, the late ones too");
    cluster.shutdown().await.unwrap();
}
