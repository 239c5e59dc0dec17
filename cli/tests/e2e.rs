//! End to end, as a user runs Keel: the `keel` binary (`up`, `server`,
//! `agent` and the client verbs) against the real Docker Engine, with the
//! workspace's test server as the app and requests through the router.
//!
//! Each test uses its own node names, project and host names, so they run
//! in parallel on one engine, and removes its containers at the end.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_agent::eventually;
use serde_json::Value;

mod common;
use common::{Cli, Process, free_port, wrk};

/// Names unique to one test run.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{}x{}", std::process::id(), nanos % 100_000)
}

async fn image() -> String {
    tokio::task::spawn_blocking(keel_testing::testserver::ensure_image)
        .await
        .expect("join")
        .expect("the test server's image builds")
}

fn manifest(
    name: &str,
    project: &str,
    host: &str,
    image: &str,
    instances: u32,
    greeting: &str,
) -> String {
    format!(
        "name: {name}\nproject: {project}\nimage: {image}\ninstances: {instances}\nenv:\n  GREETING: {greeting}\nresources:\n  cpu_millis: 50\n  memory_mb: 32\nports:\n  - name: http\n    port: 8080\nroutes:\n  - host: {host}\nhealth:\n  http:\n    path: /healthz\n  interval: 1s\n  timeout: 500ms\nupdate:\n  max_surge: 1\n  max_unavailable: 0\n"
    )
}

/// Removes every container of `project` (whatever the test left).
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = containers(&format!("keel.project={}", self.0));
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .arg("rm")
                .arg("-f")
                .args(&ids)
                .output();
        }
        // Removed behind the agents' backs, containers leave their
        // project's network behind, and Docker has only ~30 address pools.
        let networks = std::process::Command::new("docker")
            .args(["network", "ls", "-q", "--filter"])
            .arg(format!("label=keel.project={}", self.0))
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if !networks.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["network", "rm"])
                .args(&networks)
                .output();
        }
    }
}

/// Container ids with a label (`key=value`), running or not.
fn containers(label: &str) -> Vec<String> {
    let output = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={label}")])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A GET through the router, by host name: the instance that answered.
async fn through_router(
    http: &reqwest::Client,
    router: &str,
    host: &str,
) -> Result<String, String> {
    let response = http
        .get(format!("http://{router}/"))
        .header("Host", host)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    let body = response.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    let value: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    Ok(value["instance"].as_str().unwrap_or_default().to_owned())
}

/// Distinct instances answering through the router over `tries` requests.
async fn answering(
    http: &reqwest::Client,
    router: &str,
    host: &str,
    tries: usize,
) -> Result<BTreeSet<String>, String> {
    let mut seen = BTreeSet::new();
    for _ in 0..tries {
        seen.insert(through_router(http, router, host).await?);
    }
    Ok(seen)
}

/// Ready instances of an app, from `keel ps -o json`.
async fn ready(cli: &Cli, app: &str) -> Vec<Value> {
    let instances = cli.json(&["ps", app]).await;
    instances
        .as_array()
        .map(|all| all.iter().filter(|i| i["ready"] == true).cloned().collect())
        .unwrap_or_default()
}

/// `keel up` on free ports; returns it with its API URL and router address.
fn keel_up(cli: &Cli, data: &std::path::Path, node: &str) -> (Process, String, String) {
    let (api, http) = (free_port(), free_port());
    let mut up = Process::start(
        "up",
        &[
            "up",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--listen",
            &format!("127.0.0.1:{api}"),
            "--http",
            &format!("127.0.0.1:{http}"),
            "--https",
            "off",
            "--name",
            node,
        ],
        &cli.config_path(),
    );
    let line = up.wait_for("Keel API: ", Duration::from_secs(30));
    let url = line["Keel API: ".len()..]
        .split_whitespace()
        .next()
        .expect("url")
        .to_owned();
    up.wait_for("CLI context", Duration::from_secs(30));
    (up, url, format!("127.0.0.1:{http}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keel_up_deploys_scales_heals_updates_without_errors_rolls_back_and_removes() {
    let image = image().await;
    let project = unique("tour");
    let _cleanup = Cleanup(project.clone());
    let host = format!("{project}.keel.test");
    let cli = Cli::new();
    let data = tempfile::tempdir().expect("tempdir");
    let (mut up, _url, router) = keel_up(&cli, data.path(), &unique("up"));
    let http = reqwest::Client::new();

    // Deploy 3: requests by host name reach all three.
    let file = cli.write(
        "app.yaml",
        &manifest("hello", &project, &host, &image, 3, "one"),
    );
    let deployed = cli.ok(&["deploy", "-f", &file]).await;
    assert!(deployed.contains("ready 3/3"), "{deployed}");
    let seen = eventually!(Duration::from_secs(20), {
        match answering(&http, &router, &host, 30).await {
            Ok(seen) if seen.len() == 3 => Ok(seen),
            Ok(seen) => Err(format!("only {seen:?} answered")),
            Err(error) => Err(error),
        }
    });
    assert_eq!(seen.len(), 3);

    // Scale to 5 and back to 2.
    cli.ok(&["scale", "hello", "5"]).await;
    eventually!(Duration::from_secs(60), {
        match answering(&http, &router, &host, 40).await {
            Ok(seen) if seen.len() == 5 => Ok(()),
            Ok(seen) => Err(format!("{} answered", seen.len())),
            Err(error) => Err(error),
        }
    });
    cli.ok(&["scale", "hello", "2"]).await;
    eventually!(Duration::from_secs(60), {
        let up = ready(&cli, "hello").await.len();
        let containers = containers(&format!("keel.project={project}")).len();
        if up == 2 && containers == 2 {
            Ok(())
        } else {
            Err(format!("{up} ready, {containers} containers"))
        }
    });

    // A container killed behind Keel's back is replaced and serves again.
    let victim = containers(&format!("keel.project={project}"))[0].clone();
    let killed = std::process::Command::new("docker")
        .args(["kill", &victim])
        .output()
        .expect("docker kill");
    assert!(killed.status.success());
    eventually!(Duration::from_secs(60), {
        let up = ready(&cli, "hello").await;
        let restarted = up.iter().any(|i| i["restarts"].as_u64().unwrap_or(0) > 0);
        let serving = answering(&http, &router, &host, 10)
            .await
            .map(|s| s.len())
            .unwrap_or(0);
        if up.len() == 2 && serving == 2 && restarted {
            Ok(())
        } else {
            Err(format!(
                "{} ready (restarted: {restarted}), {serving} answering",
                up.len()
            ))
        }
    });

    // A rolling update under load: not one failed request.
    let target = format!("http://{router}/");
    let load = tokio::spawn({
        let host = host.clone();
        async move { wrk(&target, &host, 16, 12).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let file = cli.write(
        "app.yaml",
        &manifest("hello", &project, &host, &image, 2, "two"),
    );
    let updated = cli.ok(&["deploy", "-f", &file]).await;
    assert!(
        updated.contains("revision") && updated.contains("ready 2/2"),
        "{updated}"
    );
    let result = load.await.expect("wrk");
    assert!(result.requests > 100, "wrk ran: {}", result.text);
    assert_eq!(result.non_2xx, 0, "{}", result.text);
    assert_eq!(result.socket_errors, 0, "{}", result.text);
    // wrk closed its connections with requests in flight: none of them
    // may leave an instance counted busy in the router, which would then
    // skip it. Sequential requests reach every ready instance, each about
    // its share.
    let n = 40;
    let shares = eventually!(Duration::from_secs(30), {
        let up: BTreeSet<String> = ready(&cli, "hello")
            .await
            .iter()
            .filter_map(|i| i["id"].as_str().map(str::to_owned))
            .collect();
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        let mut failed = None;
        for _ in 0..n {
            match through_router(&http, &router, &host).await {
                Ok(instance) => *counts.entry(instance).or_default() += 1,
                Err(error) => failed = Some(error),
            }
        }
        let answered: BTreeSet<String> = counts.keys().cloned().collect();
        let floor = n / up.len().max(1) / 2;
        match failed {
            Some(error) => Err(error),
            None if answered == up && counts.values().all(|c| *c >= floor) => Ok(counts),
            None => Err(format!(
                "{n} sequential requests after wrk: {counts:?}; ready: {up:?}"
            )),
        }
    });
    assert_eq!(shares.len(), 2, "{shares:?}");

    // Rollback: the earlier manifest, as a new revision, rolled out.
    let rolled = cli.ok(&["rollback", "hello"]).await;
    assert!(rolled.contains("rolled back"), "{rolled}");
    eventually!(Duration::from_secs(60), {
        let shown = cli.json(&["app", "show", "hello"]).await;
        let revision = shown["app"]["revision"].as_u64();
        let greeting = shown["revision"]["manifest"]["env"]["GREETING"].clone();
        let all = shown["instances"].as_array().cloned().unwrap_or_default();
        let done = all.len() == 2
            && all
                .iter()
                .all(|i| i["ready"] == true && i["revision"].as_u64() == revision);
        if done && greeting == "one" {
            Ok(())
        } else {
            Err(format!("{} instances; greeting {greeting}", all.len()))
        }
    });

    // An image that does not exist: a clear failure; the app keeps serving.
    let file = cli.write(
        "bad.yaml",
        &manifest(
            "hello",
            &project,
            &host,
            "keel-e2e/no-such-image:1",
            2,
            "one",
        ),
    );
    let error = cli
        .fails(&["deploy", "-f", &file, "--timeout", "60s"])
        .await;
    assert!(error.contains("no-such-image"), "{error}");
    let serving = answering(&http, &router, &host, 10)
        .await
        .expect("still serving");
    assert_eq!(serving.len(), 2);
    cli.ok(&["rollback", "hello"]).await;

    // Remove: containers and routes gone; the host is unknown again.
    cli.ok(&["rm", "hello"]).await;
    eventually!(Duration::from_secs(60), {
        let left = containers(&format!("keel.project={project}")).len();
        let routes = cli.json(&["routes"]).await;
        let routed = routes["routes"]
            .as_array()
            .map(|r| r.iter().any(|r| r["host"] == host.as_str()))
            .unwrap_or(false);
        if left == 0 && !routed {
            Ok(())
        } else {
            Err(format!("{left} containers, routed: {routed}"))
        }
    });
    let response = http
        .get(format!("http://{router}/"))
        .header("Host", &host)
        .send()
        .await
        .expect("router answers");
    assert_eq!(response.status(), 404);

    let status = up.stop(Duration::from_secs(30));
    assert!(status.success(), "keel up exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_node_s_instances_run_again_on_the_other_and_requests_succeed_again() {
    let image = image().await;
    let project = unique("loss");
    let _cleanup = Cleanup(project.clone());
    let host = format!("{project}.keel.test");
    let cli = Cli::new();
    let data = tempfile::tempdir().expect("tempdir");
    let first = unique("a");
    let second = unique("b");
    let (_up, url, router) = keel_up(&cli, data.path(), &first);
    let join_token = data.path().join("join.token");
    let mut agent = Process::start(
        "agent-b",
        &[
            "agent",
            "--controller",
            &url,
            "--join-token-file",
            join_token.to_str().expect("utf-8"),
            "--name",
            &second,
            "--zone",
            "b",
            "--advertise-addr",
            "127.0.0.2",
            "--roles",
            "worker",
        ],
        &cli.config_path(),
    );
    eventually!(Duration::from_secs(30), {
        let nodes = cli.json(&["nodes"]).await;
        let ready = nodes
            .as_array()
            .map(|n| n.iter().filter(|n| n["status"] == "ready").count())
            .unwrap_or(0);
        if ready >= 2 {
            Ok(())
        } else {
            Err(format!("{ready} nodes ready"))
        }
    });

    let file = cli.write(
        "app.yaml",
        &manifest("spread", &project, &host, &image, 4, "x"),
    );
    cli.ok(&["deploy", "-f", &file]).await;
    let on_second = containers(&format!("keel.node={second}"));
    assert!(!on_second.is_empty(), "the app is spread over both nodes");

    // Requests run all along; failures are timed.
    let http = reqwest::Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let last_failure_ms = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let load = tokio::spawn({
        let (http, router, host, stop, last_failure_ms) = (
            http.clone(),
            router.clone(),
            host.clone(),
            stop.clone(),
            last_failure_ms.clone(),
        );
        async move {
            let mut failures = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if through_router(&http, &router, &host).await.is_err() {
                    failures += 1;
                    last_failure_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            failures
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The machine is unplugged: its agent and its containers vanish.
    let lost_at_ms = started.elapsed().as_millis() as u64;
    agent.kill();
    let _ = std::process::Command::new("docker")
        .arg("rm")
        .arg("-f")
        .args(&on_second)
        .output();
    eventually!(Duration::from_secs(60), {
        let up = ready(&cli, "spread").await;
        let elsewhere = up.iter().all(|i| i["node"] == first.as_str());
        if up.len() == 4 && elsewhere {
            Ok(())
        } else {
            Err(format!("{} ready; all on {first}: {elsewhere}", up.len()))
        }
    });
    let recovered_ms = started.elapsed().as_millis() as u64 - lost_at_ms;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let failures = load.await.expect("load");
    let last_failure = last_failure_ms.load(Ordering::Relaxed);
    let serving_again_ms = last_failure.saturating_sub(lost_at_ms);
    eprintln!(
        "node loss: {failures} failed requests, the last {serving_again_ms} ms after the loss; 4 instances ready on {first} after {recovered_ms} ms"
    );
    // Every request since the replacements were ready succeeded.
    assert!(
        last_failure <= lost_at_ms + recovered_ms,
        "requests failed after recovery"
    );
    assert_eq!(
        answering(&http, &router, &host, 20)
            .await
            .map(|s| s.len())
            .unwrap_or(0),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_data_plane_serves_while_the_controller_is_down_and_nothing_is_lost() {
    let image = image().await;
    let project = unique("cp");
    let _cleanup = Cleanup(project.clone());
    let host = format!("{project}.keel.test");
    let cli = Cli::new();
    let data = tempfile::tempdir().expect("tempdir");
    let api = format!("127.0.0.1:{}", free_port());
    let http_port = free_port();
    let router = format!("127.0.0.1:{http_port}");
    let server_args = [
        "server",
        "--data-dir",
        data.path().to_str().expect("utf-8"),
        "--listen",
        &api,
    ];
    let mut server = Process::start("server", &server_args, &cli.config_path());
    server.wait_for("Keel API", Duration::from_secs(30));
    let url = format!("http://{api}");
    let admin = data.path().join("admin.token");
    let join = data.path().join("join.token");
    cli.ok(&[
        "login",
        &url,
        "--token-file",
        admin.to_str().expect("utf-8"),
    ])
    .await;
    let node = unique("n");
    let mut agent = Process::start(
        "agent",
        &[
            "agent",
            "--controller",
            &url,
            "--join-token-file",
            join.to_str().expect("utf-8"),
            "--name",
            &node,
            "--roles",
            "worker,router",
            "--http",
            &router,
            "--https",
            "off",
        ],
        &cli.config_path(),
    );
    agent.wait_for("Router HTTP", Duration::from_secs(30));
    let file = cli.write(
        "app.yaml",
        &manifest("steady", &project, &host, &image, 2, "x"),
    );
    cli.ok(&["deploy", "-f", &file]).await;
    let http = reqwest::Client::new();
    eventually!(Duration::from_secs(20), {
        answering(&http, &router, &host, 10)
            .await
            .map(|s| s.len())
            .and_then(|n| if n == 2 { Ok(()) } else { Err(format!("{n}")) })
    });

    // The controller dies; for the next seconds every request succeeds.
    server.kill();
    let until = Instant::now() + Duration::from_secs(5);
    let mut served = 0;
    while Instant::now() < until {
        through_router(&http, &router, &host)
            .await
            .expect("served without the controller");
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served > 50);

    // Back on the same data: the app, its revision and its instances.
    let mut server = Process::start("server-again", &server_args, &cli.config_path());
    server.wait_for("Keel API", Duration::from_secs(30));
    let apps = cli.json(&["apps"]).await;
    assert!(
        apps.as_array()
            .map(|a| a.iter().any(|a| a["name"] == "steady"))
            .unwrap_or(false),
        "{apps}"
    );
    cli.ok(&["scale", "steady", "3"]).await;
    eventually!(Duration::from_secs(60), {
        let n = answering(&http, &router, &host, 30)
            .await
            .map(|s| s.len())
            .unwrap_or(0);
        if n == 3 {
            Ok(())
        } else {
            Err(format!("{n} answering"))
        }
    });
    agent.stop(Duration::from_secs(30));
    server.stop(Duration::from_secs(30));
}
