//! Tokens stay out of what `keel server` prints and out of command lines:
//! they live in 0600 files, and every command reads them from a file or
//! the environment.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Cli;

fn keel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

/// Runs `keel server` on `dir` until its admin token file exists and its
/// API answers, stops it with SIGTERM, and returns all it printed on
/// standard output and standard error.
fn run_server(dir: &std::path::Path) -> (String, String) {
    let mut child = keel()
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let started = Instant::now();
    while !dir.join("join.token").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no join.token after 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let it print what it prints after the start.
    std::thread::sleep(Duration::from_millis(500));
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success());
    (out.join().unwrap(), err.join().unwrap())
}

fn token(dir: &std::path::Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn a_first_server_start_prints_where_the_tokens_are_and_never_the_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, stderr) = run_server(dir.path());
    let (admin, join) = (
        token(dir.path(), "admin.token"),
        token(dir.path(), "join.token"),
    );
    assert!(admin.starts_with("keel-admin-") && join.starts_with("keel-join-"));
    for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        for (kind, token) in [("admin", &admin), ("join", &join)] {
            assert!(
                !text.contains(token.as_str()),
                "the {kind} token is on {name}:\n{text}"
            );
        }
        assert!(
            !text.contains(&admin[..24]) && !text.contains(&join[..23]),
            "part of a token is on {name}:\n{text}"
        );
    }
    let admin_file = dir.path().join("admin.token").display().to_string();
    let join_file = dir.path().join("join.token").display().to_string();
    assert!(
        stdout.contains(&format!("--token-file {admin_file}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("--join-token-file {join_file}")),
        "{stdout}"
    );

    // And a second start says where they are again, still without them.
    let (stdout, stderr) = run_server(dir.path());
    assert!(stdout.contains(&admin_file), "{stdout}");
    assert!(!stdout.contains(&admin) && !stderr.contains(&admin));
}

#[test]
fn help_never_shows_a_token_from_the_environment_and_its_examples_use_files() {
    let secret = "keel-admin-this-must-not-be-printed";
    for command in ["login", "router", "agent"] {
        let output = keel()
            .args([command, "--help"])
            .env("KEEL_TOKEN", secret)
            .env("KEEL_JOIN_TOKEN", secret)
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{help}");
        assert!(!help.contains(secret), "keel {command} --help:\n{help}");
        assert!(
            help.contains("token-file"),
            "keel {command} --help:\n{help}"
        );
        assert!(
            !help.contains("$(cat"),
            "keel {command} --help puts a token on a command line:\n{help}"
        );
    }
}

#[tokio::test]
async fn login_reads_the_token_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::Process::start(
        "server",
        &[
            "server",
            "--listen",
            &format!("127.0.0.1:{}", keel_testing::free_port()),
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &dir.path().join("unused-config.toml"),
    );
    let line = server.wait_for("Keel API", Duration::from_secs(30));
    let url = line.split("Keel API: ").nth(1).unwrap().trim().to_owned();
    let admin_file = dir.path().join("admin.token");

    let cli = Cli::new();
    cli.ok(&["login", &url, "--token-file", admin_file.to_str().unwrap()])
        .await;
    cli.ok(&["projects"]).await;

    let cli = Cli::new();
    let output = cli
        .command(&["login", &url])
        .env("KEEL_TOKEN", token(dir.path(), "admin.token"))
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    cli.ok(&["projects"]).await;

    let cli = Cli::new();
    let missing = dir.path().join("no-such.token");
    let error = cli
        .fails(&["login", &url, "--token-file", missing.to_str().unwrap()])
        .await;
    assert!(
        error.contains("--token-file") && error.contains("no-such.token"),
        "{error}"
    );
    let empty = cli.write("empty.token", "\n");
    let error = cli.fails(&["login", &url, "--token-file", &empty]).await;
    assert!(error.contains("is empty"), "{error}");
    let error = cli.fails(&["login", &url]).await;
    assert!(
        error.contains("--token-file") && error.contains("KEEL_TOKEN"),
        "{error}"
    );
}

#[test]
fn revision_history_rejects_0_with_a_clear_error() {
    for command in ["server", "up"] {
        let output = keel()
            .args([command, "--revision-history", "0"])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("--revision-history") && stderr.contains("1..=100000"),
            "keel {command}: {stderr}"
        );
    }
}
