//! `keel server` as a user runs it: the real binary, its output, its exit.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

#[tokio::test]
async fn server_prints_its_url_and_token_serves_the_api_and_stops_on_sigterm() {
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
    assert!(lines.next().unwrap().unwrap().contains("shown once"));
    let token = lines.next().unwrap().unwrap().trim().to_owned();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin.token"))
            .unwrap()
            .trim(),
        token
    );

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
