//! The agent on the real Docker Engine: a real controller in-process
//! (the `SimCluster` harness) with agents on `DockerRuntime`, running the
//! `keel-testserver` image built from this workspace.
//!
//! Every test uses node and project names of its own (so tests run in
//! parallel, and two agents never share a label or a network), and
//! removes the containers and networks it made, whatever the outcome.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

mod support;

use std::collections::HashMap;
use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_agent::docker::{DockerConfig, DockerRuntime};
use keel_agent::eventually;
use keel_agent::testing::{ClusterConfig, Instance, NodeSpec, SimCluster};
use keel_agent::{Runtime, RuntimeError, RuntimeState};
use keel_protocol::{InstanceRef, InstanceSpec};

/// Container starts and probes take longer than simulated ones.
const CONVERGE: Duration = Duration::from_secs(30);

/// A name no other test (or test process) uses: a DNS label.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn docker(args: &[&str]) -> (bool, String) {
    let output = Command::new("docker").args(args).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
    )
}

/// Removes what a test made: its nodes' containers, its projects'
/// networks, and containers it named itself. Declared before the cluster,
/// so it runs after the cluster (and its agents) are gone.
struct Cleanup {
    nodes: Vec<String>,
    projects: Vec<String>,
    containers: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut ids = Vec::new();
        for node in &self.nodes {
            let (_, listed) =
                docker(&["ps", "-aq", "--filter", &format!("label=keel.node={node}")]);
            ids.extend(listed.lines().map(str::to_owned));
        }
        ids.extend(self.containers.iter().cloned());
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids.iter().map(String::as_str));
            docker(&args);
        }
        for project in &self.projects {
            remove_networks(&format!("keel-{project}"));
        }
    }
}

/// Removes every network of exactly this name, by id: Docker allows
/// several of one name, and `network rm NAME` refuses when it is ambiguous.
fn remove_networks(name: &str) {
    let (_, listed) = docker(&["network", "ls", "--format", "{{.ID}} {{.Name}}"]);
    for line in listed.lines() {
        if let Some((id, found)) = line.split_once(' ')
            && found == name
        {
            docker(&["network", "rm", id]);
        }
    }
}

async fn image() -> String {
    tokio::task::spawn_blocking(keel_testing::testserver::ensure_image)
        .await
        .unwrap()
        .unwrap()
}

async fn runtime(node: &str, address: &str) -> DockerRuntime {
    let mut config = DockerConfig::new(node, address.parse::<IpAddr>().unwrap());
    config.stop_timeout = Duration::from_secs(2);
    config.stats_interval = Duration::from_millis(500);
    DockerRuntime::connect(config).await.unwrap()
}

/// A controller and one Docker agent per `(node, zone, address)`.
async fn cluster(nodes: &[(&str, &str, &str)]) -> (SimCluster, Vec<DockerRuntime>) {
    let mut cluster = SimCluster::start_with(ClusterConfig::default(), &[])
        .await
        .unwrap();
    let mut runtimes = Vec::new();
    for (node, zone, address) in nodes {
        let runtime = runtime(node, address).await;
        runtimes.push(runtime.clone());
        cluster
            .add_node_with(NodeSpec::new(*node, *zone), *address, Arc::new(runtime))
            .await
            .unwrap();
    }
    (cluster, runtimes)
}

/// The test server as an app: one `http` port, an HTTP health check every
/// second, restarts after 300 ms.
/// What most tests start from: one node on this engine (127.0.0.1) with a
/// Docker agent, a fresh project, the test server's image, and a cleanup
/// that removes what the test leaves.
struct OneNode {
    image: String,
    node: String,
    project: String,
    _cleanup: Cleanup,
    cluster: SimCluster,
    runtimes: Vec<DockerRuntime>,
}

async fn one_node() -> OneNode {
    support::logs();
    let image = image().await;
    let (node, project) = (unique("n"), unique("p"));
    let _cleanup = Cleanup {
        nodes: vec![node.clone()],
        projects: vec![project.clone()],
        containers: vec![],
    };
    let (cluster, runtimes) = cluster(&[(&node, "a", "127.0.0.1")]).await;
    OneNode {
        image,
        node,
        project,
        _cleanup,
        cluster,
        runtimes,
    }
}

fn app(project: &str, name: &str, image: &str, instances: u32, extra: &str) -> String {
    format!(
        "name: {name}\nproject: {project}\nimage: {image}\ninstances: {instances}\n\
         ports:\n  - name: http\n    port: 8080\n\
         health:\n  http:\n    path: /healthz\n  interval: 1s\n  timeout: 500ms\n  unhealthy_threshold: 2\n\
         restart:\n  backoff:\n    initial: 300ms\n    max: 2s\n{extra}"
    )
}

/// Deploys `web` from the test image with `count` instances (and
/// `extra` manifest lines) and waits until all are up.
async fn deploy_web(
    cluster: &SimCluster,
    project: &str,
    image: &str,
    count: u32,
    extra: &str,
) -> Vec<Instance> {
    cluster
        .admin()
        .apply(&app(project, "web", image, count, extra))
        .await
        .unwrap();
    up(cluster, project, "web", count as usize).await
}

async fn up(cluster: &SimCluster, project: &str, app: &str, count: usize) -> Vec<Instance> {
    eventually!(CONVERGE, {
        let instances = cluster.admin().instances(project, app).await.unwrap();
        let up = instances.iter().filter(|i| i.is_up()).count();
        if up == count && instances.len() == count {
            Ok(instances)
        } else {
            Err(format!("{up} of {count} up: {instances:#?}"))
        }
    })
}

async fn http(method: reqwest::Method, url: &str) -> anyhow::Result<(u16, String)> {
    let response = reqwest::Client::new()
        .request(method, url)
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    Ok((response.status().as_u16(), response.text().await?))
}

async fn inspect(
    runtime: &DockerRuntime,
    instance: &Instance,
) -> bollard::models::ContainerInspectResponse {
    let name = runtime.container_name(&InstanceRef {
        project: instance.project.clone(),
        app: instance.app.clone(),
        id: instance.id.clone(),
    });
    runtime
        .client()
        .inspect_container(&name, None)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_runs_with_its_env_limits_and_labels_and_answers_on_its_published_port() {
    let OneNode {
        image,
        node,
        project,
        _cleanup,
        cluster,
        runtimes,
    } = one_node().await;
    let extra = "env:\n  GREETING: hello world\nresources:\n  cpu_millis: 250\n  memory_mb: 64\n";
    let instance = deploy_web(&cluster, &project, &image, 1, extra)
        .await
        .remove(0);

    let address = &instance.ports["http"];
    assert!(address.starts_with("127.0.0.1:"), "published on {address}");
    let (status, body) = http(reqwest::Method::GET, &format!("http://{address}/"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["instance"], instance.id.as_str());
    let env = &answer["env"];
    assert_eq!(env["GREETING"], "hello world");
    assert_eq!(env["KEEL_APP"], "web");
    assert_eq!(env["KEEL_PROJECT"], project.as_str());
    assert_eq!(env["KEEL_NODE"], node.as_str());
    assert_eq!(env["PORT"], "8080");

    let inspected = inspect(&runtimes[0], &instance).await;
    let host = inspected.host_config.unwrap();
    assert_eq!(host.nano_cpus, Some(250_000_000));
    assert_eq!(host.memory, Some(64 << 20));
    let networks = inspected.network_settings.unwrap().networks.unwrap();
    assert_eq!(
        networks.keys().collect::<Vec<_>>(),
        [&format!("keel-{project}")],
        "on its project's network only"
    );
    // The agent restarts, not Docker.
    let policy = host
        .restart_policy
        .and_then(|p| p.name)
        .map(|n| n.to_string())
        .unwrap_or_default();
    assert!(
        policy.is_empty() || policy == "no",
        "restart policy {policy:?}"
    );
    let labels = inspected.config.unwrap().labels.unwrap();
    for (key, value) in [
        ("keel.node", node.as_str()),
        ("keel.project", project.as_str()),
        ("keel.app", "web"),
        ("keel.instance", instance.id.as_str()),
        ("keel.revision", "1"),
    ] {
        assert_eq!(
            labels.get(key).map(String::as_str),
            Some(value),
            "label {key}"
        );
    }

    // Stats reach the instance view.
    eventually!(CONVERGE, {
        let instance = cluster
            .admin()
            .instances(&project, "web")
            .await
            .unwrap()
            .remove(0);
        match instance.memory_bytes {
            Some(memory) if memory > 0 && instance.cpu_millis.is_some() => Ok(()),
            _ => Err(format!("no stats yet: {instance:?}")),
        }
    });

    // Scaled to nothing: the container goes, and with the project's last
    // container, its network.
    cluster.admin().scale(&project, "web", 0).await.unwrap();
    eventually!(CONVERGE, {
        let (_, containers) =
            docker(&["ps", "-aq", "--filter", &format!("label=keel.node={node}")]);
        let (_, networks) = docker(&["network", "ls", "--format", "{{.Name}}"]);
        let network = format!("keel-{project}");
        if containers.is_empty() && !networks.lines().any(|n| n == network) {
            Ok(())
        } else {
            Err(format!(
                "left: containers {containers:?}, networks {networks:?}"
            ))
        }
    });
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_is_restarted_by_the_agent_after_its_backoff() {
    let OneNode {
        image,
        node: _,
        project,
        _cleanup,
        cluster,
        runtimes,
    } = one_node().await;
    let instance = deploy_web(&cluster, &project, &image, 1, "")
        .await
        .remove(0);
    let before = inspect(&runtimes[0], &instance).await;

    let (status, _) = http(
        reqwest::Method::POST,
        &format!("http://{}/crash?code=3", instance.ports["http"]),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);

    let restarted = eventually!(CONVERGE, {
        let instance = cluster
            .admin()
            .instances(&project, "web")
            .await
            .unwrap()
            .remove(0);
        if instance.restarts == 1 && instance.is_up() {
            Ok(instance)
        } else {
            Err(format!("not restarted and up: {instance:?}"))
        }
    });
    let after = inspect(&runtimes[0], &restarted).await;
    assert_eq!(before.id, after.id, "the same container, started again");
    assert_eq!(
        after.restart_count,
        Some(0),
        "Docker restarted nothing itself"
    );
    let state = after.state.unwrap();
    let finished = state.finished_at.unwrap();
    let started = state.started_at.unwrap();
    assert_ne!(before.state.unwrap().started_at.unwrap(), started);
    // The restart waited for the backoff (300 ms, jitter-free here).
    let gap = parse_time(&started) - parse_time(&finished);
    assert!(gap >= 0.25, "restarted {gap:.3} s after it exited");
    cluster.shutdown().await.unwrap();
}

/// Seconds since midnight of a Docker RFC 3339 time (enough for a gap).
fn parse_time(time: &str) -> f64 {
    let clock = time.split('T').nth(1).unwrap().trim_end_matches('Z');
    let mut parts = clock.split(':');
    let hours: f64 = parts.next().unwrap().parse().unwrap();
    let minutes: f64 = parts.next().unwrap().parse().unwrap();
    let seconds: f64 = parts.next().unwrap().parse().unwrap();
    hours * 3600.0 + minutes * 60.0 + seconds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_stops_the_instance_and_the_agent_restarts_it() {
    support::logs();
    let image = image().await;
    let (node, project) = (unique("n"), unique("p"));
    let _cleanup = Cleanup {
        nodes: vec![node.clone()],
        projects: vec![project.clone()],
        containers: vec![],
    };
    let (cluster, _runtimes) = cluster(&[(&node, "a", "127.0.0.1")]).await;
    let instance = deploy_web(&cluster, &project, &image, 1, "")
        .await
        .remove(0);
    let (status, _) = http(
        reqwest::Method::POST,
        &format!("http://{}/health/fail", instance.ports["http"]),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);

    let unhealthy = eventually!(CONVERGE, {
        let instance = cluster
            .admin()
            .instances(&project, "web")
            .await
            .unwrap()
            .remove(0);
        match &instance.reason {
            Some(reason) if reason.starts_with("unhealthy: ") => Ok(instance),
            _ => Err(format!("not stopped as unhealthy: {instance:?}")),
        }
    });
    assert!(!unhealthy.ready);
    assert!(
        unhealthy.reason.as_ref().unwrap().contains("500"),
        "{unhealthy:?}"
    );
    // A new process is healthy again.
    let restarted = eventually!(CONVERGE, {
        let instance = cluster
            .admin()
            .instances(&project, "web")
            .await
            .unwrap()
            .remove(0);
        if instance.restarts >= 1 && instance.is_up() {
            Ok(instance)
        } else {
            Err(format!("not restarted and up: {instance:?}"))
        }
    });
    let (status, _) = http(
        reqwest::Method::GET,
        &format!("http://{}/healthz", restarted.ports["http"]),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_its_containers_without_restarting_them() {
    let OneNode {
        image,
        node,
        project,
        _cleanup,
        mut cluster,
        runtimes,
    } = one_node().await;
    let instances = deploy_web(&cluster, &project, &image, 2, "").await;
    let mut before = Vec::new();
    for instance in &instances {
        let inspected = inspect(&runtimes[0], instance).await;
        before.push((inspected.id, inspected.state.unwrap().started_at));
    }

    cluster.stop_agent(&node).await.unwrap();
    drop(runtimes);
    // A new process: a new connection to the engine, no memory of probes.
    let fresh = runtime(&node, "127.0.0.1").await;
    cluster
        .start_agent_with(&node, Arc::new(fresh.clone()))
        .unwrap();
    eventually!(CONVERGE, {
        let status = cluster.agent(&node).unwrap().status();
        if status.streaming && status.reported {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    });
    // Probed again by the new agent, and still the same processes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = up(&cluster, &project, "web", 2).await;
    for (instance, (id, started_at)) in again.iter().zip(&before) {
        assert_eq!(instance.restarts, 0, "{instance:?}");
        let inspected = inspect(&fresh, instance).await;
        assert_eq!(&inspected.id, id, "same container");
        assert_eq!(
            &inspected.state.unwrap().started_at,
            started_at,
            "not restarted"
        );
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_keeps_running_containers_and_a_changed_env_replaces_them() {
    let OneNode {
        image,
        node: _,
        project,
        _cleanup,
        cluster,
        runtimes,
    } = one_node().await;
    let instances = deploy_web(&cluster, &project, &image, 2, "").await;
    let mut before = Vec::new();
    for instance in &instances {
        let inspected = inspect(&runtimes[0], instance).await;
        before.push((
            instance.id.clone(),
            inspected.id,
            inspected.state.unwrap().started_at,
        ));
    }

    // A scale is a new revision the containers never see: the two that
    // run stay the same processes, and one more starts.
    cluster.admin().scale(&project, "web", 3).await.unwrap();
    let scaled = up(&cluster, &project, "web", 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (instance_id, container, started_at) in &before {
        let instance = scaled
            .iter()
            .find(|i| &i.id == instance_id)
            .expect("the instance is kept");
        let inspected = inspect(&runtimes[0], instance).await;
        assert_eq!(&inspected.id, container, "same container");
        assert_eq!(
            &inspected.state.unwrap().started_at,
            started_at,
            "not restarted"
        );
    }

    // A changed env is a new container for every instance.
    cluster
        .admin()
        .apply(&app(&project, "web", &image, 3, "env:\n  WAVE: two\n"))
        .await
        .unwrap();
    eventually!(CONVERGE, {
        let now = cluster.admin().instances(&project, "web").await.unwrap();
        let kept = now
            .iter()
            .filter(|i| before.iter().any(|(id, _, _)| id == &i.id))
            .count();
        let ready = now.iter().filter(|i| i.is_up()).count();
        if kept == 0 && ready == 3 {
            Ok(())
        } else {
            Err(format!("{kept} old, {ready} up"))
        }
    });
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unassigned_keel_container_is_removed_and_others_are_untouched() {
    support::logs();
    let image = image().await;
    let (node, other_node) = (unique("n"), unique("n"));
    let (stray, foreign, neighbour) = (unique("stray"), unique("foreign"), unique("neighbour"));
    let _cleanup = Cleanup {
        nodes: vec![node.clone(), other_node.clone()],
        projects: vec![],
        containers: vec![stray.clone(), foreign.clone(), neighbour.clone()],
    };
    let keel_labels = |node: &str| {
        [
            format!("keel.node={node}"),
            "keel.project=gone".to_owned(),
            "keel.app=old".to_owned(),
            format!("keel.instance={}", unique("i")),
            "keel.revision=1".to_owned(),
        ]
    };
    let run = |name: &str, labels: &[String]| {
        let mut args = vec!["run", "-d", "--name", name];
        for label in labels {
            args.extend(["--label", label.as_str()]);
        }
        args.push(&image);
        let (ok, _) = docker(&args);
        assert!(ok, "docker run {name}");
    };
    // Keel's labels for this node, but assigned nowhere.
    run(&stray, &keel_labels(&node));
    // No Keel labels at all.
    run(&foreign, &[]);
    // Keel's labels, for another node on this engine.
    run(&neighbour, &keel_labels(&other_node));

    let (cluster, _runtimes) = cluster(&[(&node, "a", "127.0.0.1")]).await;
    eventually!(CONVERGE, {
        let (_, id) = docker(&["ps", "-aq", "--filter", &format!("name={stray}")]);
        if id.is_empty() {
            Ok(())
        } else {
            Err(format!("{stray} is still there"))
        }
    });
    // A moment more for any mistaken stop to happen.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for name in [&foreign, &neighbour] {
        let (_, state) = docker(&["inspect", "-f", "{{.State.Running}}", name]);
        assert_eq!(state, "true", "{name} was touched");
    }
    cluster.shutdown().await.unwrap();
}

/// Counts starts, to see how often a failing one is tried again.
#[derive(Debug)]
struct Counting {
    inner: DockerRuntime,
    starts: Arc<AtomicUsize>,
}

#[async_trait]
impl Runtime for Counting {
    async fn start(&self, spec: &InstanceSpec) -> Result<(), RuntimeError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        self.inner.start(spec).await
    }
    async fn stop(&self, instance: &InstanceRef) -> Result<(), RuntimeError> {
        self.inner.stop(instance).await
    }
    async fn list(&self) -> Result<Vec<(InstanceRef, RuntimeState)>, RuntimeError> {
        self.inner.list().await
    }
    async fn changed(&self) {
        self.inner.changed().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpullable_image_is_a_clear_failure_retried_with_backoff() {
    support::logs();
    let (node, project) = (unique("n"), unique("p"));
    let _cleanup = Cleanup {
        nodes: vec![node.clone()],
        projects: vec![project.clone()],
        containers: vec![],
    };
    let mut cluster = SimCluster::start_with(ClusterConfig::default(), &[])
        .await
        .unwrap();
    let starts = Arc::new(AtomicUsize::new(0));
    let counting = Counting {
        inner: runtime(&node, "127.0.0.1").await,
        starts: starts.clone(),
    };
    cluster
        .add_node_with(NodeSpec::new(&node, "a"), "127.0.0.1", Arc::new(counting))
        .await
        .unwrap();
    // A registry on a closed loopback port: refused at once.
    let image = "127.0.0.1:9/keel-tests/missing:1";
    let manifest = format!(
        "name: web\nproject: {project}\nimage: {image}\nrestart:\n  backoff:\n    initial: 500ms\n    max: 10s\n"
    );
    cluster.admin().apply(&manifest).await.unwrap();
    let failed = eventually!(CONVERGE, {
        let instances = cluster.admin().instances(&project, "web").await.unwrap();
        match instances.first() {
            Some(i) if i.state == "failed" => Ok(i.clone()),
            other => Err(format!("not failed: {other:?}")),
        }
    });
    let reason = failed.reason.unwrap();
    assert!(
        reason.contains(&format!("cannot pull image {image}")),
        "{reason}"
    );
    assert!(
        reason.len() > format!("cannot pull image {image}").len() + 2,
        "no cause: {reason}"
    );
    // Retried, but with backoff: 500 ms doubling gives at most 4 more
    // attempts in 4 s; a tight loop would make hundreds.
    let first = starts.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let retries = starts.load(Ordering::SeqCst) - first;
    assert!((1..=5).contains(&retries), "{retries} attempts in 4 s");
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_networks_let_siblings_reach_each_other_by_name_and_no_one_else() {
    support::logs();
    let image = image().await;
    let (node, project_a, project_b) = (unique("n"), unique("pa"), unique("pb"));
    let _cleanup = Cleanup {
        nodes: vec![node.clone()],
        projects: vec![project_a.clone(), project_b.clone()],
        containers: vec![],
    };
    let (cluster, runtimes) = cluster(&[(&node, "a", "127.0.0.1")]).await;
    for (project, name) in [
        (&project_a, "web"),
        (&project_a, "client"),
        (&project_b, "secret"),
    ] {
        cluster
            .admin()
            .apply(&app(project, name, &image, 1, ""))
            .await
            .unwrap();
    }
    let client = up(&cluster, &project_a, "client", 1).await.remove(0);
    up(&cluster, &project_a, "web", 1).await;
    let secret = up(&cluster, &project_b, "secret", 1).await.remove(0);
    let client_container = runtimes[0].container_name(&InstanceRef {
        project: client.project.clone(),
        app: client.app.clone(),
        id: client.id.clone(),
    });
    let secret_ip: String = inspect(&runtimes[0], &secret)
        .await
        .network_settings
        .unwrap()
        .networks
        .unwrap()
        .values()
        .find_map(|n| n.ip_address.clone())
        .unwrap();
    let check = |url: String| {
        let (ok, _) = docker(&[
            "exec",
            &client_container,
            "/keel-testserver",
            "check",
            &url,
            "--timeout-ms",
            "1000",
        ]);
        ok
    };
    assert!(check("http://web:8080/healthz".into()), "a sibling by name");
    assert!(
        !check("http://secret:8080/healthz".into()),
        "another project's app by name"
    );
    assert!(
        !check(format!("http://{secret_ip}:8080/healthz")),
        "another project's app by address"
    );
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_one_engine_each_run_only_their_own_containers() {
    support::logs();
    let image = image().await;
    let (one, two, project) = (unique("n"), unique("n"), unique("p"));
    let _cleanup = Cleanup {
        nodes: vec![one.clone(), two.clone()],
        projects: vec![project.clone()],
        containers: vec![],
    };
    let (cluster, _runtimes) = cluster(&[(&one, "a", "127.0.0.1"), (&two, "b", "127.0.0.2")]).await;
    let instances = deploy_web(&cluster, &project, &image, 4, "").await;
    // Stable: neither agent stops the other's containers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for instance in &instances {
        let node = instance.node.clone().unwrap();
        let address = if node == one {
            "127.0.0.1"
        } else {
            "127.0.0.2"
        };
        let published = &instance.ports["http"];
        assert!(
            published.starts_with(&format!("{address}:")),
            "{instance:?}"
        );
        let (status, body) = http(reqwest::Method::GET, &format!("http://{published}/"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert!(body.contains(&instance.id), "{body}");
        *per_node.entry(node).or_default() += 1;
    }
    assert_eq!(per_node.len(), 2, "spread over both zones: {per_node:?}");
    for (node, count) in &per_node {
        let (_, ids) = docker(&["ps", "-q", "--filter", &format!("label=keel.node={node}")]);
        assert_eq!(ids.lines().count(), *count, "containers of {node}");
    }
    let again = up(&cluster, &project, "web", 4).await;
    assert!(again.iter().all(|i| i.restarts == 0), "{again:#?}");
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_logs_merge_its_instances_lines_and_follow_new_ones() {
    support::logs();
    let image = image().await;
    let (node, project) = (unique("n"), unique("p"));
    let _cleanup = Cleanup {
        nodes: vec![node.clone()],
        projects: vec![project.clone()],
        containers: vec![],
    };
    let (cluster, _runtimes) = cluster(&[(&node, "a", "127.0.0.1")]).await;
    let instances = deploy_web(&cluster, &project, &image, 2, "").await;

    let logs = cluster
        .admin()
        .logs(&project, "web", Some(100))
        .await
        .unwrap();
    for instance in &instances {
        let line = format!(
            "[{}] keel-testserver listening on 0.0.0.0:8080",
            instance.id
        );
        assert!(logs.contains(&line), "no {line:?} in:\n{logs}");
    }

    let mut follow = cluster.admin().follow_logs(&project, "web").await.unwrap();
    let marker = unique("marker");
    let target = &instances[1];
    // The request reaches the agent asynchronously: print until seen.
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + CONVERGE;
    let wanted = format!("[{}] {marker}", target.id);
    while !seen.contains(&wanted) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {wanted:?} in:\n{seen}"
        );
        http(
            reqwest::Method::GET,
            &format!("http://{}/print?line={marker}", target.ports["http"]),
        )
        .await
        .unwrap();
        if let Ok(Ok(Some(chunk))) =
            tokio::time::timeout(Duration::from_millis(500), follow.chunk()).await
        {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    drop(follow);
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_tcp_probes_decide_readiness_and_a_failing_exec_probe_restarts() {
    support::logs();
    let image = image().await;
    let (node, project) = (unique("n"), unique("p"));
    let _cleanup = Cleanup {
        nodes: vec![node.clone()],
        projects: vec![project.clone()],
        containers: vec![],
    };
    let (cluster, _runtimes) = cluster(&[(&node, "a", "127.0.0.1")]).await;
    let base = |name: &str, probe: &str| {
        format!(
            "name: {name}\nproject: {project}\nimage: {image}\n\
             ports:\n  - name: http\n    port: 8080\n\
             health:\n{probe}  interval: 1s\n  timeout: 900ms\n  unhealthy_threshold: 2\n\
             restart:\n  backoff:\n    initial: 300ms\n    max: 2s\n"
        )
    };
    let exec =
        "  exec:\n    command: [/keel-testserver, check, \"http://127.0.0.1:8080/healthz\"]\n";
    let tcp = "  tcp:\n    port: http\n";
    cluster.admin().apply(&base("checked", exec)).await.unwrap();
    cluster.admin().apply(&base("plain", tcp)).await.unwrap();
    up(&cluster, &project, "plain", 1).await;
    let checked = up(&cluster, &project, "checked", 1).await.remove(0);

    let (status, _) = http(
        reqwest::Method::POST,
        &format!("http://{}/health/fail", checked.ports["http"]),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let unhealthy = eventually!(CONVERGE, {
        let instance = cluster
            .admin()
            .instances(&project, "checked")
            .await
            .unwrap()
            .remove(0);
        match &instance.reason {
            Some(reason) if reason.starts_with("unhealthy: ") => Ok(instance),
            _ => Err(format!("not stopped as unhealthy: {instance:?}")),
        }
    });
    // The probe's own words: the check command's status and output.
    let reason = unhealthy.reason.unwrap();
    assert!(
        reason.contains("exited with 1") && reason.contains("500"),
        "{reason}"
    );
    eventually!(CONVERGE, {
        let instance = cluster
            .admin()
            .instances(&project, "checked")
            .await
            .unwrap()
            .remove(0);
        if instance.restarts >= 1 && instance.is_up() {
            Ok(())
        } else {
            Err(format!("not restarted and up: {instance:?}"))
        }
    });
    cluster.shutdown().await.unwrap();
}
