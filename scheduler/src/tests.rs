use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::*;

const SMALL: Resources = Resources::new(100, 128);

fn node(id: &str, region: &str, zone: &str) -> Node {
    Node::new(id, region, zone, Resources::new(1000, 1024), 10)
}

fn cluster(nodes: impl IntoIterator<Item = Node>) -> Cluster {
    let mut c = Cluster::new();
    for n in nodes {
        c.add_node(n);
    }
    c
}

/// Nine nodes: eu-1a/b/c with n1..n3 each.
fn three_zones() -> Cluster {
    cluster(
        ["a", "b", "c"].iter().flat_map(|z| {
            (1..=3).map(move |i| node(&format!("{z}{i}"), "eu-1", &format!("eu-1{z}")))
        }),
    )
}

fn request(app: &str, placement: Placement) -> AppRequest {
    AppRequest {
        placement,
        ..AppRequest::new(app, SMALL)
    }
}

fn spread() -> Placement {
    Placement {
        spread_zones: true,
        ..Placement::default()
    }
}

fn unschedulable(c: &mut Cluster, placement: Placement) -> String {
    match c.place_one(&request("web", placement)) {
        Ok(node) => panic!("expected no node to fit, got {node}"),
        Err(e) => e.to_string(),
    }
}

fn zone_of(c: &Cluster, id: &NodeId) -> String {
    c.node(id).map(|n| n.zone.clone()).unwrap_or_default()
}

fn histogram(items: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for i in items {
        *h.entry(i).or_default() += 1;
    }
    h
}

#[test]
fn draining_and_lost_nodes_are_reported_and_get_nothing() {
    let mut c = cluster([
        node("n1", "eu-1", "eu-1a").with_status(NodeStatus::Draining),
        node("n2", "eu-1", "eu-1a").with_status(NodeStatus::Lost),
        node("n3", "eu-1", "eu-1a"),
    ]);
    for _ in 0..5 {
        let placed = c.place_one(&request("web", spread())).expect("n3 is ready");
        assert_eq!(placed.as_str(), "n3");
    }
    c.set_status(&"n3".into(), NodeStatus::Draining)
        .expect("n3 exists");
    assert_eq!(
        unschedulable(&mut c, spread()),
        "0/3 nodes: 2 draining, 1 not ready"
    );
    c.set_status(&"n1".into(), NodeStatus::Ready)
        .expect("n1 exists");
    assert_eq!(
        c.place_one(&request("web", spread()))
            .expect("n1 is back")
            .as_str(),
        "n1"
    );
}

#[test]
fn missing_role_is_reported() {
    let mut c = cluster([
        node("n1", "eu-1", "eu-1a").with_role("router"),
        node("n2", "eu-1", "eu-1a"),
    ]);
    let placement = Placement {
        roles: vec!["worker".into()],
        ..spread()
    };
    assert_eq!(
        unschedulable(&mut c, placement),
        "0/2 nodes: 2 missing role worker"
    );
    c.add_node(node("n2", "eu-1", "eu-1a").with_role("worker"));
    let placement = Placement {
        roles: vec!["worker".into()],
        ..spread()
    };
    assert_eq!(
        c.place_one(&request("web", placement))
            .expect("n2 is a worker")
            .as_str(),
        "n2"
    );
}

#[test]
fn region_and_zone_filters_are_reported() {
    let mut c = cluster([node("n1", "eu-1", "eu-1a"), node("n2", "us-1", "us-1a")]);
    let one = Placement {
        regions: vec!["ap-1".into()],
        ..spread()
    };
    assert_eq!(unschedulable(&mut c, one), "0/2 nodes: 2 region != ap-1");
    let two = Placement {
        regions: vec!["ap-1".into(), "sa-1".into()],
        ..spread()
    };
    assert_eq!(
        unschedulable(&mut c, two),
        "0/2 nodes: 2 region not in [ap-1, sa-1]"
    );
    let zone = Placement {
        regions: vec!["eu-1".into()],
        zones: vec!["eu-1b".into()],
        ..spread()
    };
    assert_eq!(
        unschedulable(&mut c, zone),
        "0/2 nodes: 1 region != eu-1, 1 zone != eu-1b"
    );

    let us = Placement {
        regions: vec!["us-1".into()],
        ..spread()
    };
    for _ in 0..3 {
        assert_eq!(
            c.place_one(&request("web", us.clone()))
                .expect("n2 fits")
                .as_str(),
            "n2"
        );
    }
}

#[test]
fn label_constraints_filter_and_are_reported() {
    let regex = |r: &str| regex::Regex::new(r).expect("valid regex");
    let mut c = cluster([
        node("ssd-v3", "eu-1", "eu-1a")
            .with_label("disk", "ssd")
            .with_label("gen", "v3"),
        node("hdd-v2", "eu-1", "eu-1a")
            .with_label("disk", "hdd")
            .with_label("gen", "v2"),
        node("bare", "eu-1", "eu-1a"),
    ]);
    let only = |constraint: Constraint| Placement {
        constraints: vec![constraint],
        ..spread()
    };

    let cases = [
        (
            Constraint::eq("disk", "ssd"),
            &["ssd-v3"][..],
            "2 label disk != ssd, 1 not ready",
        ),
        // `!=` lets a node without the label through.
        (
            Constraint::ne("disk", "hdd"),
            &["bare", "ssd-v3"],
            "2 not ready, 1 label disk = hdd",
        ),
        (
            Constraint::is_in("gen", ["v3", "v4"]),
            &["ssd-v3"],
            "2 label gen not in [v3, v4], 1 not ready",
        ),
        (
            Constraint::regex("gen", regex("^v[34]$")),
            &["ssd-v3"],
            "2 label gen !~ ^v[34]$, 1 not ready",
        ),
        (
            Constraint::eq("name", "hdd-v2"),
            &["hdd-v2"],
            "2 name != hdd-v2, 1 not ready",
        ),
        (Constraint::ne("zone", "eu-1a"), &[], "3 zone = eu-1a"),
    ];
    for (constraint, fit, reasons) in cases {
        let description = format!("{constraint:?}");
        let placement = only(constraint);
        let ids: Vec<NodeId> = fit.iter().map(|&id| NodeId::from(id)).collect();
        assert_eq!(c.global_nodes(&placement), ids, "{description}");
        match c.place_one(&request("probe", placement.clone())) {
            Ok(n) => {
                assert!(fit.contains(&n.as_str()), "{description}: placed on {n}");
                c.release(&"probe".into(), &n, SMALL).expect("just placed");
            }
            Err(e) => assert!(fit.is_empty(), "{description}: {e}"),
        }
        // With the matching nodes lost, the others say which rule they fail.
        let mut rest = cluster(c.nodes().map(|n| {
            let status = if fit.contains(&n.id.as_str()) {
                NodeStatus::Lost
            } else {
                n.status
            };
            n.clone().with_status(status)
        }));
        assert_eq!(
            unschedulable(&mut rest, placement),
            format!("0/3 nodes: {reasons}"),
            "{description}"
        );
    }
}

#[test]
fn capacity_filters_are_reported_and_release_frees_capacity() {
    let mut c = cluster([
        Node::new("cpu", "eu-1", "eu-1a", Resources::new(250, 10_000), 100),
        Node::new("mem", "eu-1", "eu-1a", Resources::new(10_000, 300), 100),
        Node::new("count", "eu-1", "eu-1a", Resources::new(10_000, 10_000), 2),
    ]);
    let web = request("web", spread());
    let placed = c.place(&web, 6).expect("2 instances fit on each node");
    assert_eq!(
        histogram(placed.iter().map(|n| n.to_string()))
            .values()
            .collect::<Vec<_>>(),
        [&2, &2, &2]
    );
    for n in c.nodes() {
        let a = c.allocated(&n.id).expect("known node");
        assert!(a.resources.cpu_millis <= n.capacity.cpu_millis);
        assert!(a.resources.memory_mb <= n.capacity.memory_mb);
        assert!(a.instances <= n.max_instances);
    }
    assert_eq!(
        unschedulable(&mut c, spread()),
        "0/3 nodes: 1 insufficient cpu, 1 insufficient memory, 1 max instances reached"
    );

    c.release(&"web".into(), &"mem".into(), SMALL)
        .expect("web runs on mem");
    assert_eq!(c.allocated(&"mem".into()).expect("known").resources, SMALL);
    assert_eq!(
        c.place_one(&web).expect("mem has room again").as_str(),
        "mem"
    );
}

#[test]
fn unschedulable_shape_counts_sorted_by_count_then_text() {
    let mut nodes: Vec<Node> = (0..7)
        .map(|i| {
            Node::new(
                format!("b{i}"),
                "eu-1",
                "eu-1b",
                Resources::new(1000, 64),
                10,
            )
        })
        .collect();
    nodes.extend((0..5).map(|i| node(&format!("a{i}"), "eu-1", "eu-1a")));
    let mut c = cluster(nodes);
    let placement = Placement {
        zones: vec!["eu-1b".into()],
        ..spread()
    };
    assert_eq!(
        unschedulable(&mut c, placement),
        "0/12 nodes: 7 insufficient memory, 5 zone != eu-1b"
    );

    let tie = Unschedulable::from_counts(4, [(Reason::NotReady, 2), (Reason::Draining, 2)]);
    assert_eq!(tie.to_string(), "0/4 nodes: 2 draining, 2 not ready");
    assert_eq!(Unschedulable::from_counts(0, []).to_string(), "0/0 nodes");
}

#[test]
fn instances_spread_evenly_over_zones_then_nodes() {
    let mut c = three_zones();
    let placed = c.place(&request("web", spread()), 9).expect("room for 9");
    let zones = histogram(placed.iter().map(|n| zone_of(&c, n)));
    assert_eq!(
        zones.values().collect::<Vec<_>>(),
        [&3, &3, &3],
        "{zones:?}"
    );
    let nodes = histogram(placed.iter().map(|n| n.to_string()));
    assert_eq!(nodes.len(), 9, "one per node: {nodes:?}");

    // A second app spreads the same way, on its own counts.
    let placed = c.place(&request("api", spread()), 6).expect("room for 6");
    let zones = histogram(placed.iter().map(|n| zone_of(&c, n)));
    assert_eq!(
        zones.values().collect::<Vec<_>>(),
        [&2, &2, &2],
        "{zones:?}"
    );
}

#[test]
fn without_zone_spread_instances_follow_free_capacity() {
    let nodes = || {
        cluster([
            Node::new("a1", "eu-1", "eu-1a", Resources::new(4000, 4096), 10),
            Node::new("a2", "eu-1", "eu-1a", Resources::new(4000, 4096), 10),
            Node::new("b1", "eu-1", "eu-1b", Resources::new(1000, 1024), 10),
        ])
    };
    let zones = |c: &Cluster, placed: &[NodeId]| histogram(placed.iter().map(|n| zone_of(c, n)));

    let mut c = nodes();
    let placed = c
        .place(&request("web", Placement::default()), 2)
        .expect("room");
    assert_eq!(zones(&c, &placed), BTreeMap::from([("eu-1a".into(), 2)]));

    let mut c = nodes();
    let placed = c.place(&request("web", spread()), 2).expect("room");
    let expected = BTreeMap::from([("eu-1a".into(), 1), ("eu-1b".into(), 1)]);
    assert_eq!(zones(&c, &placed), expected);
}

#[test]
fn zone_spread_moves_on_when_a_zone_is_full() {
    let mut c = cluster([
        Node::new("a1", "eu-1", "eu-1a", Resources::new(1000, 1024), 1),
        node("b1", "eu-1", "eu-1b"),
    ]);
    let placed = c
        .place(&request("web", spread()), 4)
        .expect("b1 takes the rest");
    let zones = histogram(placed.iter().map(|n| zone_of(&c, n)));
    assert_eq!(
        zones,
        BTreeMap::from([("eu-1a".into(), 1), ("eu-1b".into(), 3)])
    );
}

#[test]
fn node_spread_holds_in_zones_too_large_to_scan() {
    // 200 nodes in one zone: more than the exact-scan limit, so the walk of
    // the zone's ordered index chooses.
    for strategy in [Strategy::LeastAllocated, Strategy::BinPack] {
        let mut c = cluster((0..200).map(|i| node(&format!("n{i}"), "eu-1", "eu-1a")));
        let req = AppRequest {
            strategy,
            ..request("web", spread())
        };
        let placed = c.place(&req, 200).expect("room");
        let nodes = histogram(placed.iter().map(|n| n.to_string()));
        assert_eq!(nodes.len(), 200, "{strategy:?}: one per node");
        let placed = c.place(&req, 200).expect("room");
        let nodes = histogram(placed.iter().map(|n| n.to_string()));
        assert_eq!(
            nodes.len(),
            200,
            "{strategy:?}: a second round, one per node again"
        );
    }
}

#[test]
fn least_allocated_and_bin_pack_choose_different_nodes() {
    let base = || {
        let mut c = cluster([node("busy", "eu-1", "eu-1a"), node("idle", "eu-1", "eu-1a")]);
        c.assign(&"other".into(), &"busy".into(), Resources::new(500, 100))
            .expect("busy exists");
        c
    };
    let least = request("web", spread());
    assert_eq!(base().place_one(&least).expect("fits").as_str(), "idle");
    let pack = AppRequest {
        strategy: Strategy::BinPack,
        ..request("web", spread())
    };
    assert_eq!(base().place_one(&pack).expect("fits").as_str(), "busy");

    // Bin-packing fills one node with different apps before using the next.
    let mut c = base();
    for i in 0..5 {
        let app = AppRequest {
            strategy: Strategy::BinPack,
            ..request(&format!("app{i}"), spread())
        };
        assert_eq!(c.place_one(&app).expect("fits").as_str(), "busy", "app{i}");
    }
    let app = AppRequest {
        strategy: Strategy::BinPack,
        ..request("app5", spread())
    };
    assert_eq!(
        c.place_one(&app).expect("fits").as_str(),
        "idle",
        "busy is at 1000 millicores"
    );
}

#[test]
fn place_is_all_or_nothing() {
    let mut c = cluster([Node::new(
        "n1",
        "eu-1",
        "eu-1a",
        Resources::new(250, 1000),
        10,
    )]);
    let err = c
        .place(&request("web", spread()), 3)
        .expect_err("only 2 fit");
    assert_eq!(err.to_string(), "0/1 nodes: 1 insufficient cpu");
    assert_eq!(c.allocated(&"n1".into()), Some(Allocation::default()));
    assert_eq!(c.instances_of(&"web".into(), &"n1".into()), 0);
    assert_eq!(
        c.place(&request("web", spread()), 2).expect("2 fit").len(),
        2
    );
}

#[test]
fn release_rejects_what_was_not_allocated() {
    let mut c = cluster([node("n1", "eu-1", "eu-1a")]);
    c.place_one(&request("web", spread())).expect("fits");
    assert!(matches!(
        c.release(&"web".into(), &"n9".into(), SMALL),
        Err(ClusterError::UnknownNode { .. })
    ));
    assert!(matches!(
        c.release(&"api".into(), &"n1".into(), SMALL),
        Err(ClusterError::NoInstance { .. })
    ));
    assert!(matches!(
        c.release(&"web".into(), &"n1".into(), Resources::new(5000, 1)),
        Err(ClusterError::ReleaseExceedsAllocation { .. })
    ));
    c.release(&"web".into(), &"n1".into(), SMALL)
        .expect("web runs on n1");
    assert!(matches!(
        c.release(&"web".into(), &"n1".into(), SMALL),
        Err(ClusterError::NoInstance { .. })
    ));
    assert_eq!(c.allocated(&"n1".into()), Some(Allocation::default()));
}

#[test]
fn replacing_a_node_keeps_its_allocations_and_rematches_it() {
    let mut c = cluster([node("n1", "eu-1", "eu-1a"), node("n2", "eu-1", "eu-1b")]);
    let ssd = Placement {
        constraints: vec![Constraint::eq("disk", "ssd")],
        ..spread()
    };
    assert_eq!(
        unschedulable(&mut c, ssd.clone()),
        "0/2 nodes: 2 label disk != ssd"
    );
    c.place(&request("web", spread()), 2).expect("room");
    c.add_node(node("n1", "eu-1", "eu-1a").with_label("disk", "ssd"));
    assert_eq!(c.allocated(&"n1".into()).expect("known").instances, 1);
    assert_eq!(
        c.place_one(&request("db", ssd))
            .expect("n1 has ssd now")
            .as_str(),
        "n1"
    );

    // Removing a node forgets its instances: spread counts them no more.
    c.remove_node(&"n2".into()).expect("n2 exists");
    c.add_node(node("n2", "eu-1", "eu-1b"));
    assert_eq!(
        c.place_one(&request("web", spread()))
            .expect("fits")
            .as_str(),
        "n2"
    );
}

#[test]
fn global_apps_run_on_every_ready_matching_node() {
    let mut c = cluster([
        node("n1", "eu-1", "eu-1a").with_role("router"),
        node("n2", "eu-1", "eu-1b").with_role("router"),
        node("n3", "eu-1", "eu-1b")
            .with_role("router")
            .with_status(NodeStatus::Draining),
        node("n4", "eu-1", "eu-1c"),
        Node::new("n5", "eu-1", "eu-1c", Resources::new(10, 10), 10).with_role("router"),
    ]);
    let placement = Placement {
        roles: vec!["router".into()],
        ..Placement::default()
    };
    let nodes = c.global_nodes(&placement);
    assert_eq!(nodes, ["n1", "n2", "n5"].map(NodeId::from));

    let req = request("router", placement);
    for n in &nodes[..2] {
        c.place_on(&req, n).expect("fits");
        assert_eq!(c.instances_of(&req.app, n), 1);
    }
    match c.place_on(&req, &nodes[2]) {
        Err(ClusterError::NodeUnfit { reason, .. }) => {
            assert_eq!(reason.to_string(), "0/1 nodes: 1 insufficient cpu");
        }
        other => panic!("expected n5 to be too small, got {other:?}"),
    }
}

fn random_node(rng: &mut StdRng, i: usize) -> Node {
    let zone = ["eu-1a", "eu-1b", "us-1a"][rng.random_range(0..3)];
    let mut n = Node::new(
        format!("n{i}"),
        &zone[..4],
        zone,
        Resources::new(rng.random_range(0..4000), rng.random_range(0..8192)),
        rng.random_range(0..20),
    );
    if rng.random_bool(0.4) {
        n = n.with_label("disk", "ssd");
    }
    n
}

/// Random placements, releases, status changes and node churn, on zones
/// large enough for both the exact scan and the ordered walk: every placed
/// instance fits where it went, nothing is refused while a node fits, and
/// the incremental indexes always match a recomputation.
#[test]
fn random_placements_never_exceed_capacity() {
    const NODES: usize = 300;
    let mut rng = StdRng::seed_from_u64(0x6b65656c);
    let mut c = Cluster::new();
    for i in 0..NODES {
        c.add_node(random_node(&mut rng, i));
    }
    let placements = [
        Placement::default(),
        spread(),
        Placement {
            constraints: vec![Constraint::eq("disk", "ssd")],
            ..spread()
        },
        Placement {
            regions: vec!["us-1".into()],
            ..Placement::default()
        },
        Placement {
            constraints: vec![Constraint::ne("zone", "eu-1a")],
            ..spread()
        },
    ];
    // Instances placed, so that some can be released again.
    let mut running: Vec<(AppId, NodeId, Resources)> = Vec::new();
    let (mut placed, mut refused) = (0, 0);
    for step in 0..10_000 {
        match rng.random_range(0..100) {
            0..=69 => {
                let req = AppRequest {
                    app: format!("app{}", rng.random_range(0..40)).into(),
                    resources: Resources::new(rng.random_range(0..500), rng.random_range(0..1024)),
                    placement: placements[rng.random_range(0..placements.len())].clone(),
                    strategy: if rng.random_bool(0.5) {
                        Strategy::BinPack
                    } else {
                        Strategy::LeastAllocated
                    },
                };
                // Ready and allowed by the placement, whatever the load.
                let allowed = c.global_nodes(&req.placement);
                let fits = |n: &Node, before: Allocation, r: Resources| {
                    allowed.contains(&n.id)
                        && before.instances < n.max_instances
                        && before.resources.cpu_millis + r.cpu_millis <= n.capacity.cpu_millis
                        && before.resources.memory_mb + r.memory_mb <= n.capacity.memory_mb
                };
                match c.place_one(&req) {
                    Ok(node) => {
                        let n = c.node(&node).expect("known");
                        let after = c.allocated(&node).expect("known");
                        let before = Allocation {
                            resources: Resources::new(
                                after.resources.cpu_millis - req.resources.cpu_millis,
                                after.resources.memory_mb - req.resources.memory_mb,
                            ),
                            instances: after.instances - 1,
                        };
                        assert!(
                            fits(n, before, req.resources),
                            "step {step}: {node} did not fit {req:?}"
                        );
                        running.push((req.app, node, req.resources));
                        placed += 1;
                    }
                    Err(e) => {
                        let fitting = c
                            .nodes()
                            .find(|n| fits(n, c.allocated(&n.id).expect("known"), req.resources));
                        assert!(fitting.is_none(), "step {step}: {fitting:?} fit but {e}");
                        assert_eq!(e.nodes, c.len());
                        refused += 1;
                    }
                }
            }
            70..=89 if !running.is_empty() => {
                let (app, node, r) = running.swap_remove(rng.random_range(0..running.len()));
                c.release(&app, &node, r).expect("it runs there");
            }
            90..=96 => {
                let id = NodeId::from(format!("n{}", rng.random_range(0..NODES)));
                let status = [NodeStatus::Ready, NodeStatus::Draining, NodeStatus::Lost]
                    [rng.random_range(0..3)];
                if c.node(&id).is_some() {
                    c.set_status(&id, status).expect("known node");
                }
            }
            97 => {
                // A node leaves with its instances, or comes back.
                let i = rng.random_range(0..NODES);
                let id = NodeId::from(format!("n{i}"));
                if c.remove_node(&id).is_ok() {
                    running.retain(|(_, on, _)| *on != id);
                } else {
                    c.add_node(random_node(&mut rng, i));
                }
            }
            _ => {
                // A node changes labels and zone, keeping its instances.
                let i = rng.random_range(0..NODES);
                if let Some(old) = c.node(&NodeId::from(format!("n{i}"))) {
                    let (capacity, max_instances) = (old.capacity, old.max_instances);
                    c.add_node(Node {
                        capacity,
                        max_instances,
                        ..random_node(&mut rng, i)
                    });
                }
            }
        }
        if step % 200 == 0 {
            c.check_indexes();
            for n in c.nodes() {
                let a = c.allocated(&n.id).expect("known");
                let mine = running.iter().filter(|(_, on, _)| *on == n.id);
                let cpu: u64 = mine.clone().map(|(_, _, r)| r.cpu_millis).sum();
                let memory: u64 = mine.clone().map(|(_, _, r)| r.memory_mb).sum();
                assert_eq!(
                    a.resources,
                    Resources::new(cpu, memory),
                    "step {step}: {}",
                    n.id
                );
                assert_eq!(a.instances as usize, mine.count());
                assert!(cpu <= n.capacity.cpu_millis && memory <= n.capacity.memory_mb);
                assert!(a.instances <= n.max_instances);
            }
        }
    }
    assert!(
        placed > 1000 && refused > 100,
        "placed {placed}, refused {refused}"
    );
}
