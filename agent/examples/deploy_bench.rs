//! The deploy benchmark behind `bench/deploy.sh`: a real controller
//! in-process (the `SimCluster` harness, embedded store) and one agent on
//! the real Docker Engine (`DockerRuntime`, node address 127.0.0.1), with
//! the `keel-testserver` image already built.
//!
//! Each run measures, one after the other:
//! - **keel**: from `POST /v1/apps` of an app with 3 instances (one port,
//!   an HTTP health check on `/healthz`) to the API showing all 3 running
//!   and ready (polled every 5 ms); the app is then deleted and its
//!   containers gone before the next step. The project has another app
//!   running throughout, so its network exists, as the baseline's does
//!   (a project's first deploy also creates its network: about 50 to
//!   100 ms more here);
//! - **docker**: the same by hand: three `docker run -d -p 127.0.0.1::8080`
//!   at once (the CLI, on a network of the benchmark's), then `docker
//!   port` and an HTTP GET of `/healthz` on each, every 5 ms, until all
//!   three answer 200.
//!
//! Last line: `RESULT deploy ready_p50_ms=N docker_baseline_p50_ms=N ratio=R`
//! (ratio = keel p50 / docker p50). Goals: ready p50 < 800 ms, ratio < 1.5.
//! `--quick`: 3 runs instead of 20, for CI.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_agent::docker::{DockerConfig, DockerRuntime};
use keel_agent::testing::{ClusterConfig, NodeSpec, SimCluster, ms, percentile};

const POLL: Duration = Duration::from_millis(5);
const TIMEOUT: Duration = Duration::from_secs(60);

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .context("cannot run docker")?;
    if !output.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Removes the benchmark's containers and networks, whatever happened.
struct Cleanup {
    node: String,
    networks: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for filter in [
            format!("label=keel.node={}", self.node),
            format!("label=keel-bench={}", self.node),
        ] {
            if let Ok(ids) = docker(&["ps", "-aq", "--filter", &filter]) {
                let ids: Vec<&str> = ids.lines().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids);
                    let _ = docker(&args);
                }
            }
        }
        // By id: Docker allows several networks of one name, and `network
        // rm NAME` refuses when it is ambiguous.
        let listed =
            docker(&["network", "ls", "--format", "{{.ID}} {{.Name}}"]).unwrap_or_default();
        for line in listed.lines() {
            if let Some((id, name)) = line.split_once(' ')
                && self.networks.iter().any(|n| n == name)
            {
                let _ = docker(&["network", "rm", id]);
            }
        }
    }
}

async fn keel_run(
    cluster: &SimCluster,
    project: &str,
    app: &str,
    image: &str,
) -> anyhow::Result<Duration> {
    let manifest = format!(
        "name: {app}\nproject: {project}\nimage: {image}\ninstances: 3\n\
         ports:\n  - name: http\n    port: 8080\n\
         health:\n  http:\n    path: /healthz\n  interval: 1s\n  timeout: 500ms\n"
    );
    let admin = cluster.admin();
    let start = Instant::now();
    admin.apply(&manifest).await?;
    loop {
        let instances = admin.instances(project, app).await?;
        if instances.len() == 3 && instances.iter().all(|i| i.is_up()) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > TIMEOUT {
            bail!("not ready within {TIMEOUT:?}: {instances:#?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn delete_and_wait(
    cluster: &SimCluster,
    project: &str,
    app: &str,
    node: &str,
) -> anyhow::Result<()> {
    cluster
        .admin()
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/projects/{project}/apps/{app}"),
            None,
        )
        .await?;
    let start = Instant::now();
    loop {
        let ids = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=keel.node={node}"),
            "--filter",
            &format!("label=keel.app={app}"),
        ])?;
        if ids.is_empty() {
            return Ok(());
        }
        if start.elapsed() > TIMEOUT {
            bail!("containers of {app} still there after {TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn healthy(http: &reqwest::Client, address: &str) -> bool {
    match http.get(format!("http://{address}/healthz")).send().await {
        Ok(response) => response.status().is_success(),
        Err(_) => false,
    }
}

async fn docker_run(image: &str, network: &str, label: &str) -> anyhow::Result<Duration> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_millis(500))
        .build()?;
    let start = Instant::now();
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let args: Vec<String> = [
                "run",
                "-d",
                "--network",
                network,
                "--label",
                label,
                "-p",
                "127.0.0.1::8080",
                image,
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                docker(&args)
            })
        })
        .collect();
    let mut ids = Vec::new();
    for run in runs {
        ids.push(run.await??);
    }
    let mut addresses = Vec::new();
    for id in &ids {
        let id = id.clone();
        let port =
            tokio::task::spawn_blocking(move || docker(&["port", &id, "8080/tcp"])).await??;
        addresses.push(port.lines().next().unwrap_or_default().to_owned());
    }
    let mut pending: Vec<String> = addresses;
    loop {
        let mut still = Vec::new();
        for address in pending {
            if !healthy(&http, &address).await {
                still.push(address);
            }
        }
        pending = still;
        if pending.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > TIMEOUT {
            bail!("docker run baseline not healthy within {TIMEOUT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 3 } else { 20 };
    let image = tokio::task::spawn_blocking(keel_testing::testserver::ensure_image).await??;
    let node = format!("bench{}", std::process::id());
    let project = format!("bench{}", std::process::id());
    let baseline_network = format!("keel-bench-{}", std::process::id());
    let _cleanup = Cleanup {
        node: node.clone(),
        networks: vec![format!("keel-{project}"), baseline_network.clone()],
    };
    docker(&["network", "create", &baseline_network])?;

    let mut cluster = SimCluster::start_with(ClusterConfig::default(), &[]).await?;
    let mut config = DockerConfig::new(&node, "127.0.0.1".parse()?);
    config.stop_timeout = Duration::from_secs(2);
    let runtime = DockerRuntime::connect(config).await?;
    cluster
        .add_node_with(NodeSpec::new(&node, "a"), "127.0.0.1", Arc::new(runtime))
        .await?;

    // Keeps the project's network, as the baseline's is kept.
    let anchor = keel_run(&cluster, &project, "anchor", &image).await?;
    println!(
        "project's first app (creates its network): {:.1} ms",
        ms(anchor)
    );

    let mut keel = Vec::new();
    let mut baseline = Vec::new();
    let label = format!("keel-bench={node}");
    for run in 0..runs {
        let app = format!("web{run}");
        let took = keel_run(&cluster, &project, &app, &image).await?;
        delete_and_wait(&cluster, &project, &app, &node).await?;
        let base = docker_run(&image, &baseline_network, &label).await?;
        let ids = docker(&["ps", "-aq", "--filter", &format!("label={label}")])?;
        let mut args = vec!["rm", "-f"];
        args.extend(ids.lines());
        docker(&args)?;
        println!(
            "run {run:>2}: keel apply to 3 ready {:>7.1} ms, docker run + probe {:>7.1} ms",
            ms(took),
            ms(base)
        );
        keel.push(took);
        baseline.push(base);
    }
    keel.sort();
    baseline.sort();
    let (keel_p50, keel_p99) = (percentile(&keel, 0.5), percentile(&keel, 0.99));
    let (base_p50, base_p99) = (percentile(&baseline, 0.5), percentile(&baseline, 0.99));
    println!(
        "keel:   p50 {:.1} ms, p99 {:.1} ms\ndocker: p50 {:.1} ms, p99 {:.1} ms",
        ms(keel_p50),
        ms(keel_p99),
        ms(base_p50),
        ms(base_p99)
    );
    cluster.shutdown().await?;
    println!(
        "RESULT deploy ready_p50_ms={:.0} docker_baseline_p50_ms={:.0} ratio={:.2}",
        ms(keel_p50),
        ms(base_p50),
        keel_p50.as_secs_f64() / base_p50.as_secs_f64().max(1e-9)
    );
    Ok(())
}
