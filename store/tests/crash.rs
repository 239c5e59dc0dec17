//! The embedded store survives `kill -9` at any moment.
//!
//! A child process (this same test binary, running `crash_child`) writes
//! from many tasks and prints each write the store acknowledged. The parent
//! kills it with SIGKILL at a random moment, reopens the file, and checks
//! that every acknowledged write is there and that revisions only grew. It
//! does this several times on the same file, so recovery itself is also
//! crashed into.

#![allow(clippy::unwrap_used)] // tests and benches may unwrap: a panic is their failure report

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_store::{EmbeddedOptions, EmbeddedStore, Store};
use rand::Rng;

const CHILD_ENV: &str = "KEEL_CRASH_CHILD_STORE";

/// Not a test of its own: the writer the parent runs and kills. Without the
/// environment variable it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: usize = std::env::var("KEEL_CRASH_ROUND").unwrap().parse().unwrap();
    let store = Arc::new(EmbeddedStore::open(&path, EmbeddedOptions::default()).unwrap());
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let mut tasks = Vec::new();
    for task in 0..32 {
        let (store, out) = (store.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("/crash/{round}/{task}/{i}");
                let revision = store
                    .put(&key, key.clone().into_bytes(), None)
                    .await
                    .unwrap();
                let mut out = out.lock().unwrap();
                writeln!(out, "ack {key} {revision}").unwrap();
                out.flush().unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
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
    for round in 0..4 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
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

        if std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 0 {
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
