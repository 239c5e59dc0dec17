//! The embedded store on a disk that fills up, for real: a small tmpfs that
//! the test mounts (it must run as root) and fills with a filler file.
//!
//! While the disk is full, writes fail with an error that says so, and
//! `status().write_error` says why; the writer stays alive and answers. Once
//! the filler is removed, writes succeed again without reopening the store,
//! `write_error` goes back to `None`, every acknowledged write is there and
//! no write that failed is, before and after reopening the file.

#![allow(clippy::unwrap_used)] // tests and benches may unwrap: a panic is their failure report

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keel_store::{EmbeddedOptions, EmbeddedStore, Store, StoreError};

/// A tmpfs of a fixed size mounted on a temporary directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_mib: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mib}m"))
            .arg("keel-store-disk-full")
            .arg(dir.path())
            .output();
        match mounted {
            Ok(output) if output.status.success() => SmallDisk { dir },
            Ok(output) => panic!(
                "this test needs to mount a small tmpfs to fill up, and `mount -t tmpfs` failed \
                 (run it as root, where mounting is allowed): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => panic!(
                "this test needs to mount a small tmpfs to fill up, and `mount` could not run: {error}"
            ),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(self.dir.path()).status();
        if !matches!(unmounted, Ok(status) if status.success()) {
            eprintln!(
                "cannot unmount {}: {unmounted:?}",
                self.dir.path().display()
            );
        }
    }
}

/// Writes a file until the disk has no room left; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in [1 << 20, 4096] {
        let bytes = vec![0xaa; chunk];
        loop {
            match file.write_all(&bytes) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
                Err(error) => panic!("filling the disk: {error}"),
            }
        }
    }
    path
}

/// An error and its sources, as a user reads them.
fn message(error: &StoreError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(error) = source {
        text = format!("{text}: {error}");
        source = error.source();
    }
    text
}

const NO_SPACE: &str = "No space left on device";

/// Every acknowledged write is there with its revision; no failed one is.
async fn check(store: &EmbeddedStore, acked: &BTreeMap<String, i64>, failed: &[String]) {
    for (key, revision) in acked {
        let kv =
            store.get(key).await.unwrap().unwrap_or_else(|| {
                panic!("acknowledged write {key} at revision {revision} is lost")
            });
        assert_eq!(kv.mod_revision, *revision, "{key}");
        assert_eq!(kv.value, value(key), "{key}");
    }
    for key in failed {
        assert!(
            store.get(key).await.unwrap().is_none(),
            "{key} was written although its put failed"
        );
    }
}

fn value(key: &str) -> Vec<u8> {
    let mut value = key.as_bytes().to_vec();
    value.resize(4096, b'v');
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_clearly_and_the_store_writes_again_when_space_returns() {
    let disk = SmallDisk::mount(24);
    let path = disk.path().join("store.redb");
    let store = EmbeddedStore::open(&path, EmbeddedOptions::default()).unwrap();
    let mut acked = BTreeMap::new();
    let mut failed = Vec::new();
    for i in 0..200 {
        let key = format!("/before/{i}");
        acked.insert(
            key.clone(),
            store.put(&key, value(&key), None).await.unwrap(),
        );
    }
    assert_eq!(store.status().await.unwrap().write_error, None);

    let filler = fill(disk.path());
    // Writes go on while the log has room it already owns; then they fail.
    let mut first_error = None;
    for i in 0..100_000 {
        let key = format!("/full/{i}");
        match store.put(&key, value(&key), None).await {
            Ok(revision) => {
                acked.insert(key, revision);
            }
            Err(error) => {
                failed.push(key);
                first_error = Some(error);
                break;
            }
        }
    }
    let error = first_error.expect("writes to a full disk never failed");
    let text = message(&error);
    assert!(
        text.contains(NO_SPACE) && text.contains(&path.display().to_string()),
        "the error names the file and says the disk is full: {text}"
    );

    // Until space returns, writes keep failing, each answered (the writer
    // is alive), and the status says why without writing.
    let mut reported = None;
    for i in 0..50 {
        let key = format!("/still-full/{i}");
        let put = tokio::time::timeout(Duration::from_secs(30), store.put(&key, value(&key), None))
            .await
            .expect("a write to a full disk was never answered");
        match put {
            Ok(revision) => {
                acked.insert(key, revision);
            }
            Err(_) => failed.push(key),
        }
        let status = store.status().await.unwrap();
        if let Some(why) = status.write_error {
            reported = Some(why);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let why = reported.expect("status().write_error stayed None while the disk was full");
    assert!(
        why.contains(NO_SPACE),
        "write_error says the disk is full: {why}"
    );

    // Stay full across several checkpoints, which fail too: redb refuses
    // every operation after a failed write until the file is reopened, and
    // the reopen may itself fail for want of space.
    let full_since = Instant::now();
    let mut i = 0;
    while full_since.elapsed() < Duration::from_secs(2) {
        let key = format!("/long-full/{i}");
        i += 1;
        let put = tokio::time::timeout(Duration::from_secs(30), store.put(&key, value(&key), None))
            .await
            .expect("a write to a full disk was never answered");
        match put {
            Ok(revision) => {
                acked.insert(key, revision);
            }
            Err(_) => failed.push(key),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    std::fs::remove_file(&filler).unwrap();
    // Writes succeed again, without reopening the store.
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        let key = format!("/space-back/{attempt}");
        attempt += 1;
        match store.put(&key, value(&key), None).await {
            Ok(revision) => {
                acked.insert(key, revision);
                break;
            }
            Err(error) => {
                failed.push(key);
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "writes still fail 30 s after space returned: {}",
                    message(&error)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let started = Instant::now();
    while let Some(why) = store.status().await.unwrap().write_error {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "write_error still set 30 s after space returned: {why}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..200 {
        let key = format!("/after/{i}");
        acked.insert(
            key.clone(),
            store.put(&key, value(&key), None).await.unwrap(),
        );
    }
    assert!(!failed.is_empty());
    check(&store, &acked, &failed).await;

    // And the same once the file is reopened from disk.
    drop(store);
    let store = EmbeddedStore::open(&path, EmbeddedOptions::default()).unwrap();
    check(&store, &acked, &failed).await;
    let revision = store.status().await.unwrap().revision;
    assert_eq!(revision, *acked.values().max().unwrap());
    drop(store);
}
