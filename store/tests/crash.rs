//! The embedded store survives `kill -9` at any moment.
//!
//! A child process (the `crash_child` example) writes
//! from many tasks and prints each write the store acknowledged. The parent
//! kills it with SIGKILL at a random moment, reopens the file, and checks
//! that every acknowledged write is there and that revisions only grew. It
//! does this several times on the same file, so recovery itself is also
//! crashed into.

#![allow(clippy::unwrap_used)] // tests and benches may unwrap: a panic is their failure report

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_store::{EmbeddedOptions, EmbeddedStore, Store};
use rand::Rng;

/// Builds the `crash_child` example with the profile and target dir this
/// test was built with (a no-op when it is current) and returns its path.
/// Building it here, rather than relying on `cargo test` having built the
/// examples, keeps `cargo test --test crash` and nextest working from a clean
/// target, and never runs a stale child.
fn crash_child() -> PathBuf {
    // This test runs as <target>/<profile dir>/deps/crash-<hash>.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()).unwrap() {
        "debug" => "dev",
        other => other,
    };
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "keel-store",
            "--example",
            "crash_child",
        ])
        .arg("--profile")
        .arg(profile)
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .unwrap();
    assert!(status.success(), "building the crash_child example failed");
    profile_dir
        .join("examples")
        .join(format!("crash_child{}", std::env::consts::EXE_SUFFIX))
}

/// Whether the write-ahead log holds frames to replay: its file is reused
/// and never empty, so this reads its layout (see `embedded/wal.rs`): the
/// frame at offset 16 carries the epoch the header at offset 8 names.
fn log_has_live_frames(wal: &Path) -> bool {
    let Ok(bytes) = std::fs::read(wal) else {
        return false;
    };
    bytes.len() >= 40 && bytes[..8] == *b"KEELWAL2" && bytes[8..16] == bytes[24..32]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let mut rng = rand::rng();
    let mut last_revision = 0;
    let mut total_acked = 0;
    let wal = dir.path().join("store.redb.wal");
    let mut rounds_recovered_from_log = 0;
    let child_binary = crash_child();
    for round in 0..4 {
        let mut child = Command::new(&child_binary)
            .env("KEEL_CRASH_CHILD_STORE", &path)
            .env("KEEL_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let kill_after = Duration::from_millis(rng.random_range(300..1500));
        let reader = std::thread::spawn(move || {
            let mut acked: HashMap<String, i64> = HashMap::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ack ") {
                    let (key, revision) = rest.split_once(' ').unwrap();
                    acked.insert(key.to_owned(), revision.parse().unwrap());
                }
            }
            acked
        });
        let started = Instant::now();
        while started.elapsed() < kill_after {
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        assert!(
            !acked.is_empty(),
            "round {round}: the child acknowledged no write"
        );

        if log_has_live_frames(&wal) {
            rounds_recovered_from_log += 1;
        }
        let store = EmbeddedStore::open(&path, EmbeddedOptions::default()).unwrap();
        let status = store.status().await.unwrap();
        for (key, revision) in &acked {
            let kv = store.get(key).await.unwrap().unwrap_or_else(|| {
                panic!("round {round}: acknowledged write {key} at revision {revision} is lost")
            });
            assert_eq!(kv.mod_revision, *revision, "{key}");
            assert_eq!(kv.value, key.as_bytes());
        }
        let max_acked = *acked.values().max().unwrap();
        assert!(
            status.revision >= max_acked,
            "round {round}: revision went back"
        );
        assert!(
            status.revision > last_revision,
            "round {round}: revisions are monotonic"
        );
        // The store keeps working after recovery.
        let next = store.put("/after-crash", vec![], None).await.unwrap();
        assert_eq!(next, status.revision + 1);
        last_revision = next;
        total_acked += acked.len();
    }
    eprintln!(
        "{total_acked} acknowledged writes survived 4 kills; {rounds_recovered_from_log} recoveries replayed the write-ahead log"
    );
    // Checkpoints come every 500 ms and writes never stop, so a kill finds
    // an unreplayed log almost always: recovery really was exercised.
    assert!(
        rounds_recovered_from_log > 0,
        "no kill found a write-ahead log to replay"
    );
}
