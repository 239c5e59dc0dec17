//! The scheduler benchmark behind `bench/scheduler.sh`: places 1,000,000
//! instances (10,000 apps of 100) on 10,000 nodes in 3 regions of 3 zones, in
//! one process, and reports placements per second and how much slower the
//! last tenth of the placements is than the first (the cost of a placement
//! must not grow with how many are already placed).
//!
//! Every app spreads over zones and needs the `worker` role; six in ten also
//! have constraints (`disk=ssd` on a third of the nodes, a region, `tier !=
//! batch`, a regex on `gen`), and one in ten bin-packs. Afterwards it checks
//! that every instance was placed, that no node is over capacity and that each
//! app is spread evenly over its zones and never twice on a node.
//!
//! `--quick` places 20,000 instances on 1,000 nodes, for CI; its figures mean
//! little (it runs in the dev profile).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use keel_scheduler::{
    AppRequest, Cluster, Constraint, Node, NodeId, Placement, Resources, Strategy,
};

const REGIONS: [&str; 3] = ["eu-1", "us-1", "ap-1"];
const ZONES: [&str; 3] = ["a", "b", "c"];
const INSTANCE: Resources = Resources::new(100, 128);
const NODE_CAPACITY: Resources = Resources::new(16_000, 32_768);
const NODE_MAX_INSTANCES: u32 = 150;
const PER_APP: usize = 100;

fn node(i: usize) -> Node {
    let region = REGIONS[i % 3];
    let zone = format!("{region}{}", ZONES[(i / 3) % 3]);
    // Labels vary across the 9 zones, so every zone has some of each.
    let disk = ["ssd", "hdd", "hdd"][(i / 9) % 3];
    let tier = if (i / 27) % 10 < 1 { "batch" } else { "web" };
    let generation = ["v2", "v3", "v4"][(i / 270) % 3];
    Node::new(
        format!("node-{i:05}"),
        region,
        zone,
        NODE_CAPACITY,
        NODE_MAX_INSTANCES,
    )
    .with_label("disk", disk)
    .with_label("tier", tier)
    .with_label("gen", generation)
    .with_role("worker")
}

fn app(i: usize, gen_regex: &regex::Regex) -> AppRequest {
    let region = REGIONS[(i / 10) % 3].to_owned();
    let mut placement = Placement {
        roles: vec!["worker".into()],
        spread_zones: true,
        ..Placement::default()
    };
    match i % 10 {
        4 | 5 => placement.constraints.push(Constraint::eq("disk", "ssd")),
        6 => placement.regions.push(region),
        7 => placement.constraints.push(Constraint::ne("tier", "batch")),
        8 => placement
            .constraints
            .push(Constraint::regex("gen", gen_regex.clone())),
        9 => {
            placement.regions.push(region);
            placement.constraints.push(Constraint::eq("disk", "ssd"));
        }
        _ => {}
    }
    AppRequest {
        app: format!("app-{i:05}").into(),
        resources: INSTANCE,
        placement,
        strategy: if i % 10 == 3 {
            Strategy::BinPack
        } else {
            Strategy::LeastAllocated
        },
    }
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (node_count, app_count) = if quick {
        (1_000, 200)
    } else {
        (10_000, 10_000)
    };
    let gen_regex = regex::Regex::new("^v[34]$").context("benchmark regex")?;

    let mut cluster = Cluster::new();
    let nodes: Vec<Node> = (0..node_count).map(node).collect();
    let zone_of: HashMap<NodeId, String> = nodes
        .iter()
        .map(|n| (n.id.clone(), n.zone.clone()))
        .collect();
    for n in &nodes {
        cluster.add_node(n.clone());
    }
    let requests: Vec<AppRequest> = (0..app_count).map(|i| app(i, &gen_regex)).collect();
    println!(
        "placing {} instances ({app_count} apps x {PER_APP}) on {node_count} nodes in {} zones",
        app_count * PER_APP,
        REGIONS.len() * ZONES.len()
    );

    // Time each tenth of the apps separately, in the CPU time of this thread
    // where Linux tells it, so that other work on the machine does not count.
    let clock = Clock::new();
    let tenth = app_count / 10;
    let mut tenths: Vec<Duration> = Vec::with_capacity(10);
    let mut plans: Vec<Vec<NodeId>> = Vec::with_capacity(app_count);
    let wall = Instant::now();
    let mut started = clock.now();
    for (i, req) in requests.iter().enumerate() {
        match cluster.place(req, PER_APP) {
            Ok(plan) => plans.push(plan),
            Err(why) => bail!(
                "{} did not fit after {} instances: {why}",
                req.app,
                i * PER_APP
            ),
        }
        if (i + 1) % tenth == 0 {
            let now = clock.now();
            tenths.push(now.saturating_sub(started));
            started = now;
        }
    }
    let wall = wall.elapsed();
    let total: Duration = tenths.iter().sum();
    for (i, t) in tenths.iter().enumerate() {
        let per = t.as_secs_f64() * 1e9 / (tenth * PER_APP) as f64;
        println!("tenth {:>2}: {per:>7.0} ns per placement", i + 1);
    }
    println!(
        "{:.2} s of {}, {:.2} s of wall time",
        total.as_secs_f64(),
        clock.name(),
        wall.as_secs_f64()
    );

    check(&cluster, &nodes, &requests, &plans, &zone_of)?;
    println!("checked: all placed, no node over capacity, every app spread over zones and nodes");

    let placements_per_s = (app_count * PER_APP) as f64 / total.as_secs_f64();
    // Every tenth places the same number of instances, so the ratio of the
    // times is the ratio of the times per placement.
    let first = tenths.first().context("no tenth timed")?.as_secs_f64();
    let last = tenths.last().context("no tenth timed")?.as_secs_f64();
    println!(
        "RESULT scheduler placements_per_s={placements_per_s:.0} first10_vs_last10={:.2}",
        last / first
    );
    Ok(())
}

/// The thread's CPU time from `/proc/thread-self/schedstat` (Linux), else
/// wall time.
struct Clock {
    cpu: bool,
    start: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            cpu: Self::cpu_time().is_some(),
            start: Instant::now(),
        }
    }

    fn name(&self) -> &'static str {
        if self.cpu {
            "thread CPU time"
        } else {
            "wall time"
        }
    }

    fn now(&self) -> Duration {
        match Self::cpu_time() {
            Some(t) if self.cpu => t,
            _ => self.start.elapsed(),
        }
    }

    fn cpu_time() -> Option<Duration> {
        let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        let nanos = stat.split_whitespace().next()?.parse().ok()?;
        Some(Duration::from_nanos(nanos))
    }
}

/// Every instance placed, no node over capacity, each app's zones within one
/// instance of each other and no app twice on a node.
fn check(
    cluster: &Cluster,
    nodes: &[Node],
    requests: &[AppRequest],
    plans: &[Vec<NodeId>],
    zone_of: &HashMap<NodeId, String>,
) -> anyhow::Result<()> {
    let mut instances = 0;
    for n in nodes {
        let a = cluster.allocated(&n.id).context("node vanished")?;
        ensure!(
            a.resources.cpu_millis <= n.capacity.cpu_millis
                && a.resources.memory_mb <= n.capacity.memory_mb
                && a.instances <= n.max_instances,
            "{} is over capacity: {a:?}",
            n.id
        );
        instances += a.instances as usize;
    }
    ensure!(
        instances == requests.len() * PER_APP,
        "{instances} instances allocated"
    );
    for (req, plan) in requests.iter().zip(plans) {
        ensure!(
            plan.len() == PER_APP,
            "{} has {} instances",
            req.app,
            plan.len()
        );
        let mut per_zone: HashMap<&str, usize> = HashMap::new();
        let mut per_node: HashMap<&NodeId, usize> = HashMap::new();
        for id in plan {
            *per_zone
                .entry(zone_of.get(id).context("unknown node")?)
                .or_default() += 1;
            *per_node.entry(id).or_default() += 1;
        }
        let zones = if req.placement.regions.is_empty() {
            9
        } else {
            3
        };
        let (min, max) = (per_zone.values().min(), per_zone.values().max());
        ensure!(
            per_zone.len() == zones && max.zip(min).is_some_and(|(max, min)| max - min <= 1),
            "{} is not spread over its {zones} zones: {per_zone:?}",
            req.app
        );
        ensure!(
            per_node.values().all(|&n| n == 1),
            "{} runs twice on a node",
            req.app
        );
    }
    Ok(())
}
