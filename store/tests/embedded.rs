//! What only the embedded backend has to prove: it keeps everything across a
//! reopen, refuses a bad file with an error naming it, catches a lagging
//! watcher up from the file, and stays bounded in size under compaction.

#![allow(clippy::unwrap_used)] // tests and benches may unwrap: a panic is their failure report

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keel_store::{
    AutoCompaction, EmbeddedOptions, EmbeddedStore, EventKind, Store, StoreConfig, StoreError,
};

fn open(path: &std::path::Path) -> EmbeddedStore {
    EmbeddedStore::open(path, EmbeddedOptions::default()).expect("open store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_keys_revisions_history_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/store.redb");
    let (revision, lease) = {
        let store = open(&path);
        store.put("/a", b"1".to_vec(), None).await.unwrap();
        let lease = store.lease_grant(Duration::from_secs(2)).await.unwrap();
        store
            .put("/leased", b"x".to_vec(), Some(lease.id))
            .await
            .unwrap();
        (store.put("/a", b"2".to_vec(), None).await.unwrap(), lease)
    };

    let files: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(files.len(), 1, "a closed store is one file: {files:?}");
    let store = open(&path);
    let kv = store.get("/a").await.unwrap().expect("key survives reopen");
    assert_eq!(
        (kv.value.as_slice(), kv.version, kv.mod_revision),
        (&b"2"[..], 2, revision)
    );
    assert_eq!(store.status().await.unwrap().revision, revision);
    assert_eq!(
        store.put("/b", b"3".to_vec(), None).await.unwrap(),
        revision + 1
    );

    let mut watch = store.watch("/a", 1).await.unwrap();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.kv.value, b"1", "history survives reopen");

    // The lease survived with a fresh TTL and still expires.
    assert!(store.get("/leased").await.unwrap().is_some());
    let mut deletes = store.watch("/leased", 0).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), deletes.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.kind, EventKind::Delete);
    assert!(matches!(
        store.lease_keep_alive(lease.id).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

#[test]
fn a_file_that_is_not_a_store_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();

    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![0xA5; 64 * 1024]).unwrap();
    let truncated = dir.path().join("truncated.redb");
    {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let store = open(&truncated);
            for i in 0..200 {
                store
                    .put(&format!("/k/{i}"), vec![1; 512], None)
                    .await
                    .unwrap();
            }
        });
    }
    let len = std::fs::metadata(&truncated).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let directory = dir.path().join("a-directory");
    std::fs::create_dir(&directory).unwrap();

    for path in [&garbage, &truncated, &directory] {
        match EmbeddedStore::open(path, EmbeddedOptions::default()) {
            Err(error @ StoreError::Open { .. }) => {
                assert!(
                    error.to_string().contains(&path.display().to_string()),
                    "{error}"
                );
            }
            Err(other) => panic!("{}: expected an open error, got {other}", path.display()),
            Ok(_) => panic!("{}: opened a file that is not a store", path.display()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_watcher_catches_up_from_the_file_without_gap() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        watch_buffer: 2,
        ..EmbeddedOptions::default()
    };
    let store = Arc::new(EmbeddedStore::open(dir.path().join("s.redb"), options).unwrap());
    let mut watch = store.watch("/lag/", 0).await.unwrap();

    // Many writers, so batches arrive faster than a consumer that sleeps.
    let mut writers = Vec::new();
    for w in 0..16 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..25 {
                store
                    .put(&format!("/lag/{w}/{i}"), vec![], None)
                    .await
                    .unwrap();
            }
        }));
    }
    let mut revisions = Vec::new();
    while revisions.len() < 400 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("events keep coming")
            .expect("watch open")
            .expect("no error: lag is absorbed");
        revisions.push(event.revision());
        if revisions.len() % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(
        revisions.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap, no duplicate"
    );
}

/// Writes `revisions` 4 KiB values over 16 keys and returns the store's size at rest.
async fn grow(store: Arc<dyn Store>, revisions: usize) -> u64 {
    let mut writers = Vec::new();
    for w in 0..16 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for _ in 0..revisions / 16 {
                store
                    .put(&format!("/big/{w}"), vec![w as u8; 4096], None)
                    .await
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    // Let a checkpoint empty the write-ahead log, so that the size is the
    // file's own and not how much log happened to be pending.
    tokio::time::sleep(Duration::from_millis(800)).await;
    store.status().await.unwrap().db_size_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_compaction_keeps_the_file_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bounded.redb");
    let mut off = StoreConfig::embedded(dir.path().join("unbounded.redb"));
    off.auto_compaction = None;
    let mut on = StoreConfig::embedded(&path);
    on.auto_compaction = Some(AutoCompaction {
        retain_revisions: 100,
        interval: Duration::from_millis(20),
    });
    assert!(
        StoreConfig::embedded(&path).auto_compaction.is_some(),
        "on by default"
    );

    let unbounded_size = grow(keel_store::open(&off).await.unwrap(), 4000).await;
    let bounded = keel_store::open(&on).await.unwrap();
    let bounded_size = grow(bounded.clone(), 4000).await;
    assert!(
        bounded_size * 4 < unbounded_size,
        "with compaction {bounded_size} bytes, without {unbounded_size} bytes"
    );
    let mut watch = bounded.watch("/big/", 1).await.unwrap();
    assert!(matches!(
        watch.next().await,
        Some(Err(StoreError::Compacted { .. }))
    ));
    drop(watch);

    // The compactor holds no strong reference: dropping the store closes
    // the file, so it can be opened again at once.
    drop(bounded);
    tokio::time::sleep(Duration::from_millis(100)).await;
    EmbeddedStore::open(&path, EmbeddedOptions::default()).expect("reopen after drop");
}
