//! `keel server` as a user runs it: the real binary, its output, its exit.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

#[tokio::test]
async fn server_prints_its_url_and_token_file_serves_the_api_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = keel()
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = lines.next().unwrap().unwrap();
    let url = url
        .strip_prefix("Keel API: ")
        .expect("first line names the API URL")
        .to_owned();
    let admin_file = dir.path().join("admin.token");
    assert_eq!(
        lines.next().unwrap().unwrap(),
        format!(
            "Admin token: made now, in {} (mode 0600)",
            admin_file.display()
        )
    );
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let token = std::fs::read_to_string(&admin_file)
        .unwrap()
        .trim()
        .to_owned();

    let client = reqwest::Client::new();
    let response = client
        .get(format!("{url}/v1/projects"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = client
        .get(format!("{url}/v1/projects"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    // SIGTERM: a graceful stop with exit code 0.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "keel server exited with {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "keel server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_flags_are_a_clear_error_and_a_non_zero_exit() {
    let output = keel()
        .args(["server", "--listen", "not-an-address"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--listen") && stderr.contains("not-an-address"),
        "{stderr}"
    );

    let output = keel()
        .args(["server", "--node-lost-after", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--node-lost-after") && stderr.contains("1..=3600"),
        "{stderr}"
    );

    let output = keel().args(["server", "--colour", "red"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--colour"));
}

#[test]
fn an_unusable_data_dir_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let output = keel()
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
}

/// Starts `keel server` on `dir`; returns the child, its URL and the admin
/// token (from the token file, so it works on restarts too).
fn start_server(dir: &std::path::Path) -> (std::process::Child, String, String) {
    let mut child = keel()
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("Keel API: ")
        .unwrap()
        .to_owned();
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let token = std::fs::read_to_string(dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    (child, url, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_at_any_moment_loses_nothing_acknowledged_and_converges() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, token) = start_server(dir.path());
    let client = reqwest::Client::new();
    let join = std::fs::read_to_string(dir.path().join("join.token"))
        .unwrap()
        .trim()
        .to_owned();
    for (name, zone) in [("n1", "a"), ("n2", "b")] {
        let registration = format!(
            r#"{{"name":"{name}","region":"r","zone":"{zone}","capacity":{{"cpu_millis":64000,"memory_mb":65536,"max_instances":1000}},"address":"127.0.0.1"}}"#
        );
        let response = client
            .post(format!("{url}/v1/nodes"))
            .bearer_auth(&join)
            .body(registration)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }

    // Four writers apply apps (and new revisions of them) until the kill;
    // each remembers what was acknowledged.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u64,
    >::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, url, token, acked) =
            (client.clone(), url.clone(), token.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("app-{w}-{}", i % 10);
                let manifest = format!("name: {name}\nproject: crash\nimage: keel/test-server:1\ninstances: 2\nenv:\n  ROUND: \"{i}\"\n");
                let Ok(response) = client.post(format!("{url}/v1/apps")).bearer_auth(&token).body(manifest).send().await else {
                    return;
                };
                if !response.status().is_success() {
                    return;
                }
                let body: serde_json::Value = response.json().await.unwrap();
                let revision = body["app"]["revision"].as_u64().unwrap();
                acked.lock().unwrap().insert(name, revision);
            }
        }));
    }
    let kill_after = Duration::from_millis(300 + (std::process::id() as u64 % 700));
    tokio::time::sleep(kill_after).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged before the kill"
    );

    let (mut child, url, token) = start_server(dir.path());
    for (name, revision) in &acked {
        let response = client
            .get(format!("{url}/v1/projects/crash/apps/{name}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "acknowledged app {name} is lost");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["app"]["revision"].as_u64().unwrap() >= *revision,
            "{name}: revision went back"
        );
    }
    // Every loop converges again: each app gets its two instances placed
    // (the nodes are still within their lease after the restart).
    let started = std::time::Instant::now();
    loop {
        let instances: serde_json::Value = client
            .get(format!("{url}/v1/instances?project=crash"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let placed = instances
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["node"].is_string())
            .count();
        let apps: serde_json::Value = client
            .get(format!("{url}/v1/apps?project=crash"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let current: usize = apps.as_array().unwrap().len() * 2;
        if placed >= current && current >= acked.len() * 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no convergence: {placed} placed of {current}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
