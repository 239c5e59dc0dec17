//! The control-plane benchmark behind `bench/control-plane.sh`: one real
//! controller (`keel server`, embedded store, default settings: nodes are
//! lost after 5 s) in a child process, and 1,000 simulated nodes in this
//! process (one agent each, heartbeats every second, over loopback HTTP).
//!
//! It measures, in order:
//! 1. how long the nodes take to register and be ready;
//! 2. the latency of `POST /v1/apps` creating many small apps (2 instances
//!    each), one request at a time, while the fleet heartbeats and the
//!    controller places and the agents start what came before;
//! 3. the time from applying one large app (1,000 instances, one per node)
//!    to every instance reported running and ready through the API;
//! 4. the time from unplugging a node (its agent killed: no more
//!    heartbeats, connections dropped) to every instance it ran reported
//!    running and ready elsewhere, for three nodes one after the other;
//! 5. the controller's resident memory (`VmRSS` of the child process, read
//!    from `/proc`; the agents are not in it), and its peak (`VmHWM`).
//!
//! The simulated runtime starts an instance in 100 ms. Last line:
//! `RESULT control_plane apply_p99_ms=N node_loss_to_replaced_s=N controller_rss_mb=N`
//! (the worst of the node losses). Goals: apply p99 < 20 ms, node loss to
//! replaced < 7 s, RSS < 100 MB.
//!
//! `--quick`: 50 nodes, 50 apps, a 50-instance app and one node loss, for
//! CI; its figures mean little (dev profile). `--keel PATH` names the
//! `keel` binary (default: the one beside this example's target directory,
//! which `bench/control-plane.sh` builds first).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use keel_agent::testing::{Admin, Instance, ms, percentile};
use keel_agent::{
    Agent, AgentConfig, AgentHandle, NodeCapacity, NodeRegistration, SimConfig, SimRuntime,
};
use tokio::io::{AsyncBufReadExt, BufReader};

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

struct Plan {
    nodes: usize,
    small_apps: usize,
    big_app: u32,
    losses: usize,
}

const FULL: Plan = Plan {
    nodes: 1_000,
    small_apps: 500,
    big_app: 1_000,
    losses: 3,
};

const QUICK: Plan = Plan {
    nodes: 50,
    small_apps: 50,
    big_app: 50,
    losses: 1,
};

/// The controller in its child process.
struct ControllerProcess {
    child: tokio::process::Child,
    pid: u32,
    url: String,
    admin_token: String,
    join_token: String,
    _dir: tempfile::TempDir,
}

fn default_keel_binary() -> anyhow::Result<PathBuf> {
    // target/<profile>/examples/control_plane_bench -> target/<profile>/keel
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot tell the target directory from this example's path")?;
    Ok(profile_dir.join("keel"))
}

async fn start_controller(keel: &Path) -> anyhow::Result<ControllerProcess> {
    ensure!(
        keel.exists(),
        "no keel binary at {} (build it: cargo build -p keel, or pass --keel PATH)",
        keel.display()
    );
    let dir = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(keel)
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", keel.display()))?;
    let pid = child.id().context("the controller exited at once")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("the controller did not say where it listens within 30 s")??
            .context("the controller exited before it listened")?;
        if let Some(url) = line.strip_prefix("Keel API: ") {
            break url.trim().to_owned();
        }
    };
    // Keep reading, so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let read = |name: &str| -> anyhow::Result<String> {
        let path = dir.path().join(name);
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_owned())
    };
    Ok(ControllerProcess {
        child,
        pid,
        url,
        admin_token: read("admin.token")?,
        join_token: read("join.token")?,
        _dir: dir,
    })
}

/// `VmRSS` and `VmHWM` of a process, in MiB.
fn memory_mb(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kb: f64 = line
            .trim_start_matches(name)
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn spawn_agent(
    controller: &ControllerProcess,
    i: usize,
) -> anyhow::Result<(AgentHandle, SimRuntime)> {
    let address = format!("10.{}.{}.{}", i / 62_500, (i / 250) % 250, i % 250 + 1);
    let runtime = SimRuntime::new(
        SimConfig::new(address.clone()).with_start_delay(Duration::from_millis(100)),
    );
    let node = NodeRegistration {
        name: format!("node-{i:04}"),
        region: "bench".to_owned(),
        zone: ZONES[i % ZONES.len()].to_owned(),
        labels: BTreeMap::new(),
        roles: vec!["worker".to_owned()],
        capacity: NodeCapacity {
            cpu_millis: 16_000,
            memory_mb: 32_768,
            max_instances: 100,
        },
        address,
    };
    let config = AgentConfig::new(controller.url.clone(), controller.join_token.clone(), node);
    let agent = Agent::new(config, Arc::new(runtime.clone())).spawn()?;
    Ok((agent, runtime))
}

/// Waits until `done` holds for the instances of every app (all of them
/// at once, one request), polling every 100 ms; returns how long it took
/// from `since`.
async fn wait_instances(
    admin: &Admin,
    since: Instant,
    limit: Duration,
    what: &str,
    mut done: impl FnMut(&[Instance]) -> Result<(), String>,
) -> anyhow::Result<Duration> {
    loop {
        let value = admin.get("/v1/instances").await?;
        let instances: Vec<Instance> = serde_json::from_value(value)?;
        match done(&instances) {
            Ok(()) => return Ok(since.elapsed()),
            Err(why) if since.elapsed() > limit => {
                bail!("{what}: not within {limit:?}: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn small_app(i: usize) -> String {
    format!(
        "name: app-{i:04}\nproject: bench\nimage: bench/small:{i}\ninstances: 2\nresources:\n  cpu_millis: 10\n  memory_mb: 16\nports:\n  - name: http\n    port: 8080\n"
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let keel = match args.iter().position(|a| a == "--keel") {
        Some(i) => PathBuf::from(args.get(i + 1).context("--keel needs a path")?),
        None => default_keel_binary()?,
    };
    let plan = if quick { QUICK } else { FULL };
    let mut controller = start_controller(&keel).await?;
    let admin = Admin::new(controller.url.clone(), controller.admin_token.clone());
    println!(
        "controller: {} (pid {}), {} simulated nodes in {} zones",
        controller.url,
        controller.pid,
        plan.nodes,
        ZONES.len()
    );
    let rss_at = |phase: &str| -> anyhow::Result<()> {
        let (rss, _) = memory_mb(controller.pid)?;
        // Mostly the agents' connections: the controller's memory grows
        // with them.
        let fds = std::fs::read_dir(format!("/proc/{}/fd", controller.pid))?.count();
        println!("  controller resident memory {phase}: {rss:.1} MiB ({fds} open descriptors)");
        Ok(())
    };
    rss_at("at start")?;

    // 1. The fleet joins.
    let started = Instant::now();
    let mut agents: BTreeMap<String, AgentHandle> = BTreeMap::new();
    let mut runtimes: BTreeMap<String, SimRuntime> = BTreeMap::new();
    for i in 0..plan.nodes {
        let (agent, runtime) = spawn_agent(&controller, i)?;
        runtimes.insert(agent.node().to_owned(), runtime);
        agents.insert(agent.node().to_owned(), agent);
    }
    loop {
        let nodes = admin.nodes().await?;
        let ready = nodes.iter().filter(|n| n.status == "ready").count();
        if ready == plan.nodes {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "only {ready} of {} nodes ready after 120 s",
            plan.nodes
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "nodes registered and ready: {} in {:.2} s",
        plan.nodes,
        started.elapsed().as_secs_f64()
    );
    // Let every agent settle into its stream and first report.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_at("with the fleet connected")?;

    // 2. Create-app latency, one request at a time.
    let mut latencies = Vec::with_capacity(plan.small_apps);
    let applying = Instant::now();
    for i in 0..plan.small_apps {
        let sent = Instant::now();
        let applied = admin.apply(&small_app(i)).await?;
        latencies.push(sent.elapsed());
        ensure!(applied["created"] == true, "app-{i:04}: {applied}");
    }
    latencies.sort();
    let apply_p50 = percentile(&latencies, 0.50);
    let apply_p99 = percentile(&latencies, 0.99);
    println!(
        "create app (POST /v1/apps, {} apps one at a time): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        plan.small_apps,
        ms(apply_p50),
        ms(apply_p99),
        ms(latencies.last().copied().unwrap_or_default())
    );
    let small_total = plan.small_apps * 2;
    let small_up = wait_instances(
        &admin,
        applying,
        Duration::from_secs(120),
        "small apps",
        |all| {
            let up = all
                .iter()
                .filter(|i| i.project == "bench" && i.is_up())
                .count();
            if up == small_total {
                Ok(())
            } else {
                Err(format!("{up} of {small_total} up"))
            }
        },
    )
    .await?;
    println!(
        "small apps: all {small_total} instances running and ready {:.2} s after the first apply",
        small_up.as_secs_f64()
    );
    rss_at("with the small apps running")?;

    // 3. One large app, from apply to all running.
    let big = plan.big_app as usize;
    let applied = Instant::now();
    admin
        .apply(&format!(
            "name: big\nproject: fleet\nimage: bench/big:1\ninstances: {}\nresources:\n  cpu_millis: 10\n  memory_mb: 16\nports:\n  - name: http\n    port: 8080\n",
            plan.big_app
        ))
        .await?;
    let big_up = wait_instances(
        &admin,
        applied,
        Duration::from_secs(120),
        "big app",
        |all| {
            let up = all.iter().filter(|i| i.app == "big" && i.is_up()).count();
            if up == big {
                Ok(())
            } else {
                Err(format!("{up} of {big} up"))
            }
        },
    )
    .await?;
    println!(
        "apply to all running: {big} instances in {:.2} s",
        big_up.as_secs_f64()
    );

    // 4. Node losses, one at a time.
    let mut losses = Vec::new();
    for round in 0..plan.losses {
        let value = admin.get("/v1/instances").await?;
        let before: Vec<Instance> = serde_json::from_value(value)?;
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for instance in &before {
            if let Some(node) = instance.node.as_deref()
                && agents.contains_key(node)
            {
                *per_node.entry(node).or_default() += 1;
            }
        }
        let (victim, count) = per_node
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(node, n)| ((*node).to_owned(), *n))
            .context("no instances to lose")?;
        let lost: BTreeSet<String> = before
            .iter()
            .filter(|i| i.node.as_deref() == Some(victim.as_str()))
            .map(|i| format!("{}/{}/{}", i.project, i.app, i.id))
            .collect();
        let expected = before.len();
        let killed = Instant::now();
        if let Some(agent) = agents.remove(&victim) {
            agent.kill();
        }
        runtimes.remove(&victim);
        let took = wait_instances(
            &admin,
            killed,
            Duration::from_secs(60),
            "node loss",
            |all| {
                let still = all
                    .iter()
                    .filter(|i| lost.contains(&format!("{}/{}/{}", i.project, i.app, i.id)))
                    .count();
                let up = all.iter().filter(|i| i.is_up()).count();
                if still == 0 && up == expected && all.len() == expected {
                    Ok(())
                } else {
                    Err(format!("{still} still on {victim}; {up} of {expected} up"))
                }
            },
        )
        .await?;
        println!(
            "node loss {}: {victim} with {count} instances; all running elsewhere {:.2} s after it was unplugged",
            round + 1,
            took.as_secs_f64()
        );
        losses.push(took);
    }
    let worst_loss = losses.iter().max().copied().unwrap_or_default();

    // 5. The controller's memory, with everything deployed.
    let (rss, peak) = memory_mb(controller.pid)?;
    let running: usize = runtimes.values().map(SimRuntime::running).sum();
    println!(
        "controller memory: {rss:.1} MiB resident (peak {peak:.1} MiB) with {} nodes and {running} instances",
        agents.len()
    );

    for agent in agents.into_values() {
        agent.kill();
    }
    controller.child.start_kill()?;
    let _ = controller.child.wait().await;
    println!(
        "RESULT control_plane apply_p99_ms={:.1} node_loss_to_replaced_s={:.2} controller_rss_mb={:.0}",
        ms(apply_p99),
        worst_loss.as_secs_f64(),
        rss
    );
    Ok(())
}
