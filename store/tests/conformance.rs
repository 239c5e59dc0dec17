//! The store conformance suite: every semantic of the `Store` trait, run
//! against the embedded backend and against a real etcd server. A behaviour
//! that differs between the two is a bug in one of them.

#![allow(clippy::unwrap_used)] // tests and benches may unwrap: a panic is their failure report

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keel_store::{
    Compare, CompareOp, EmbeddedOptions, EmbeddedStore, EtcdOptions, EtcdStore, EventKind, LeaseId,
    Op, RangeRequest, Store, StoreError, Txn, WatchEvent, WatchStream,
};

/// A store under test and whatever keeps it alive.
struct Backend {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
    _etcd: Option<keel_testing::EtcdServer>,
}

impl Backend {
    async fn embedded() -> Backend {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = EmbeddedStore::open(dir.path().join("store.redb"), EmbeddedOptions::default())
            .expect("open embedded store");
        Backend {
            store: Arc::new(store),
            _dir: Some(dir),
            _etcd: None,
        }
    }

    async fn etcd() -> Backend {
        let server = keel_testing::EtcdServer::start().await.expect("start etcd");
        let options = EtcdOptions {
            endpoints: vec![server.endpoint()],
            ..EtcdOptions::default()
        };
        let store = EtcdStore::connect(options).await.expect("connect to etcd");
        Backend {
            store: Arc::new(store),
            _dir: None,
            _etcd: Some(server),
        }
    }
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let backend = super::Backend::embedded().await;
                    super::$check(backend.store.clone()).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let backend = super::Backend::etcd().await;
                    super::$check(backend.store.clone()).await;
                }
            )*
        }
    };
}

conformance!(
    put_get_delete_keep_revisions_and_versions,
    only_writes_move_the_revision,
    range_pages_through_a_prefix,
    txn_compares_every_target,
    txn_with_a_bad_op_writes_nothing,
    concurrent_compare_and_swap_loses_no_update,
    watch_replays_history_then_goes_live,
    watch_resumes_after_a_disconnect_without_gap_or_duplicate,
    watch_keeps_order_under_concurrent_writers,
    watch_from_a_compacted_revision_is_an_error_naming_the_oldest,
    compact_rejects_a_future_revision,
    lease_expiry_deletes_keys_and_watchers_see_it,
    lease_keep_alive_and_revoke,
    status_reports_revision_size_and_location,
);

const WAIT: Duration = Duration::from_secs(10);

async fn next_event(watch: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(WAIT, watch.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(error))) => panic!("watch failed: {error}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {WAIT:?}"),
    }
}

async fn next_events(watch: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        events.push(next_event(watch).await);
    }
    events
}

/// Asserts that nothing more arrives for a short while.
async fn assert_quiet(watch: &mut WatchStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), watch.next()).await {
        panic!("unexpected watch item: {item:?}");
    }
}

fn keys(events: &[WatchEvent]) -> Vec<(EventKind, String)> {
    events.iter().map(|e| (e.kind, e.kv.key.clone())).collect()
}

async fn put_get_delete_keep_revisions_and_versions(store: Arc<dyn Store>) {
    let r1 = store.put("/a", b"one".to_vec(), None).await.unwrap();
    let kv = store.get("/a").await.unwrap().expect("key after put");
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.version,
            kv.create_revision,
            kv.mod_revision
        ),
        (&b"one"[..], 1, r1, r1)
    );

    let r2 = store.put("/a", b"two".to_vec(), None).await.unwrap();
    assert_eq!(r2, r1 + 1);
    let kv = store
        .get("/a")
        .await
        .unwrap()
        .expect("key after second put");
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.version,
            kv.create_revision,
            kv.mod_revision
        ),
        (&b"two"[..], 2, r1, r2)
    );

    let deleted = store.delete("/a").await.unwrap();
    assert!(deleted.deleted);
    assert_eq!(deleted.revision, r2 + 1);
    assert_eq!(store.get("/a").await.unwrap(), None);

    let again = store.delete("/a").await.unwrap();
    assert!(!again.deleted, "deleting a missing key deletes nothing");
    assert_eq!(again.revision, deleted.revision, "and is not a write");

    let r4 = store.put("/a", b"three".to_vec(), None).await.unwrap();
    let kv = store.get("/a").await.unwrap().expect("key after re-create");
    assert_eq!(
        (kv.version, kv.create_revision),
        (1, r4),
        "a re-created key starts over"
    );
    assert_eq!(store.get("/missing").await.unwrap(), None);
}

async fn only_writes_move_the_revision(store: Arc<dyn Store>) {
    let before = store.status().await.unwrap().revision;
    store.get("/x").await.unwrap();
    store.range(&RangeRequest::prefix("/")).await.unwrap();
    assert_eq!(store.status().await.unwrap().revision, before);

    let txn = Txn::new().and_then([
        Op::put("/x/1", "a"),
        Op::put("/x/2", "b"),
        Op::put("/x/3", "c"),
    ]);
    let response = store.txn(txn).await.unwrap();
    assert!(response.succeeded);
    assert_eq!(
        response.revision,
        before + 1,
        "one transaction is one revision"
    );
    let page = store.range(&RangeRequest::prefix("/x/")).await.unwrap();
    assert!(page.kvs.iter().all(|kv| kv.mod_revision == before + 1));
    assert_eq!(page.revision, before + 1);

    // A transaction whose branch has no write does not move the revision.
    let response = store
        .txn(
            Txn::new()
                .when([Compare::missing("/x/1")])
                .and_then([Op::put("/x/9", "z")]),
        )
        .await
        .unwrap();
    assert!(!response.succeeded);
    assert_eq!(response.revision, before + 1);
}

async fn range_pages_through_a_prefix(store: Arc<dyn Store>) {
    for i in 0..25 {
        store
            .put(&format!("/r/{i:02}"), format!("v{i}").into_bytes(), None)
            .await
            .unwrap();
    }
    // Neighbours that share a string prefix but are outside "/r/".
    store.put("/r", b"parent".to_vec(), None).await.unwrap();
    store.put("/r0", b"sibling".to_vec(), None).await.unwrap();
    store.put("/q/z", b"before".to_vec(), None).await.unwrap();

    let request = RangeRequest::prefix("/r/").limit(10);
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut next = Some(request.clone());
    while let Some(request) = next {
        let page = store.range(&request).await.unwrap();
        pages.push((page.kvs.len(), page.more));
        seen.extend(page.kvs.iter().map(|kv| kv.key.clone()));
        next = page.next(&request);
    }
    assert_eq!(pages, vec![(10, true), (10, true), (5, false)]);
    let expected: Vec<String> = (0..25).map(|i| format!("/r/{i:02}")).collect();
    assert_eq!(seen, expected, "every key once, in key order");

    let all = store.range(&RangeRequest::prefix("/r/")).await.unwrap();
    assert_eq!(
        (all.kvs.len(), all.more),
        (25, false),
        "limit 0 means no limit"
    );
    assert_eq!(all.kvs[3].value, b"v3");

    let everything = store.range(&RangeRequest::prefix("")).await.unwrap();
    assert_eq!(
        everything.kvs.len(),
        28,
        "an empty prefix is the whole keyspace"
    );
    assert_eq!(everything.kvs[0].key, "/q/z");

    let after = store
        .range(&RangeRequest::prefix("/r/").after("/r/22"))
        .await
        .unwrap();
    let after: Vec<&str> = after.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(after, vec!["/r/23", "/r/24"]);
}

async fn txn_compares_every_target(store: Arc<dyn Store>) {
    let r1 = store.put("/t", b"v1".to_vec(), None).await.unwrap();
    store.put("/t", b"v2".to_vec(), None).await.unwrap();

    let cases: Vec<(Compare, bool)> = vec![
        (Compare::mod_revision("/t", CompareOp::Equal, r1), false),
        (Compare::mod_revision("/t", CompareOp::Equal, r1 + 1), true),
        (Compare::mod_revision("/t", CompareOp::Greater, r1), true),
        (Compare::mod_revision("/t", CompareOp::Less, r1 + 1), false),
        (Compare::mod_revision("/t", CompareOp::NotEqual, r1), true),
        (Compare::version("/t", CompareOp::Equal, 2), true),
        (Compare::version("/t", CompareOp::Greater, 2), false),
        (Compare::version("/t", CompareOp::Less, 3), true),
        (Compare::value("/t", CompareOp::Equal, "v2"), true),
        (Compare::value("/t", CompareOp::Equal, "v1"), false),
        (Compare::value("/t", CompareOp::Greater, "v1"), true),
        (Compare::value("/t", CompareOp::NotEqual, "v2"), false),
        (Compare::exists("/t"), true),
        (Compare::missing("/t"), false),
        (Compare::exists("/nope"), false),
        (Compare::missing("/nope"), true),
        (Compare::mod_revision("/nope", CompareOp::Equal, 0), true),
        (Compare::version("/nope", CompareOp::Equal, 0), true),
    ];
    for (i, (compare, holds)) in cases.into_iter().enumerate() {
        let key = format!("/result/{i}");
        let txn = Txn::new()
            .when([compare.clone()])
            .and_then([Op::put(&key, "then")])
            .or_else([Op::put(&key, "else")]);
        let response = store.txn(txn).await.unwrap();
        assert_eq!(response.succeeded, holds, "{compare:?}");
        let written = store.get(&key).await.unwrap().expect("one branch wrote");
        assert_eq!(
            written.value,
            if holds {
                b"then".to_vec()
            } else {
                b"else".to_vec()
            },
            "{compare:?}"
        );
    }

    // Several compares must all hold.
    let txn = Txn::new()
        .when([
            Compare::exists("/t"),
            Compare::value("/t", CompareOp::Equal, "v1"),
        ])
        .and_then([Op::delete("/t")]);
    assert!(!store.txn(txn).await.unwrap().succeeded);
    assert!(store.get("/t").await.unwrap().is_some());
}

async fn txn_with_a_bad_op_writes_nothing(store: Arc<dyn Store>) {
    let before = store.put("/keep", b"before".to_vec(), None).await.unwrap();
    let txn = Txn::new().and_then([
        Op::put("/keep", "after"),
        Op::put_with_lease("/leased", "x", LeaseId(424_242)),
    ]);
    match store.txn(txn).await {
        Err(StoreError::LeaseNotFound(LeaseId(424_242))) => {}
        other => panic!("expected lease not found, got {other:?}"),
    }
    assert_eq!(
        store.get("/keep").await.unwrap().expect("kept").value,
        b"before"
    );
    assert_eq!(store.get("/leased").await.unwrap(), None);
    assert_eq!(
        store.status().await.unwrap().revision,
        before,
        "no revision for a failed txn"
    );
    let twice = Txn::new().and_then([Op::put("/keep", "a"), Op::delete("/keep")]);
    match store.txn(twice).await {
        Err(error @ StoreError::DuplicateKey { .. }) => {
            assert!(error.to_string().contains("/keep"))
        }
        other => panic!("expected a duplicate-key error, got {other:?}"),
    }
    assert_eq!(
        store.get("/keep").await.unwrap().expect("kept").value,
        b"before"
    );
    match store
        .put("/leased", b"x".to_vec(), Some(LeaseId(424_242)))
        .await
    {
        Err(error @ StoreError::LeaseNotFound(_)) => {
            assert!(error.to_string().contains("424242"), "{error}");
        }
        other => panic!("expected lease not found, got {other:?}"),
    }
}

async fn concurrent_compare_and_swap_loses_no_update(store: Arc<dyn Store>) {
    const TASKS: usize = 32;
    const INCREMENTS: usize = 10;
    store.put("/counter", b"0".to_vec(), None).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0usize;
            for _ in 0..INCREMENTS {
                loop {
                    let kv = store.get("/counter").await.unwrap().expect("counter");
                    let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            "/counter",
                            CompareOp::Equal,
                            kv.mod_revision,
                        )])
                        .and_then([Op::put("/counter", (n + 1).to_string())]);
                    if store.txn(txn).await.unwrap().succeeded {
                        break;
                    }
                    conflicts += 1;
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for task in tasks {
        conflicts += task.await.unwrap();
    }
    let kv = store.get("/counter").await.unwrap().expect("counter");
    assert_eq!(kv.value, (TASKS * INCREMENTS).to_string().into_bytes());
    assert_eq!(kv.version as usize, TASKS * INCREMENTS + 1);
    assert!(
        conflicts > 0,
        "the tasks really raced (no conflict means the test proves nothing)"
    );
}

async fn watch_replays_history_then_goes_live(store: Arc<dyn Store>) {
    let start = store.put("/w/a", b"1".to_vec(), None).await.unwrap();
    store.put("/other", b"x".to_vec(), None).await.unwrap();
    store.put("/w/b", b"2".to_vec(), None).await.unwrap();
    store.delete("/w/a").await.unwrap();

    let mut watch = store.watch("/w/", start).await.unwrap();
    let history = next_events(&mut watch, 3).await;
    assert_eq!(
        keys(&history),
        vec![
            (EventKind::Put, "/w/a".into()),
            (EventKind::Put, "/w/b".into()),
            (EventKind::Delete, "/w/a".into())
        ]
    );
    assert_eq!(history[0].revision(), start);
    assert_eq!(history[0].kv.value, b"1");
    assert_eq!(
        (history[2].kv.version, history[2].kv.create_revision),
        (0, 0)
    );
    assert!(
        history
            .windows(2)
            .all(|w| w[0].revision() < w[1].revision())
    );

    let live = store.put("/w/c", b"3".to_vec(), None).await.unwrap();
    let event = next_event(&mut watch).await;
    assert_eq!(
        (event.kind, event.kv.key.as_str(), event.revision()),
        (EventKind::Put, "/w/c", live)
    );
    store.put("/other", b"y".to_vec(), None).await.unwrap();
    assert_quiet(&mut watch).await;

    // Revision 0 means "from the next write on".
    let mut from_now = store.watch("/w/", 0).await.unwrap();
    assert_quiet(&mut from_now).await;
    let next = store.put("/w/d", b"4".to_vec(), None).await.unwrap();
    assert_eq!(next_event(&mut from_now).await.revision(), next);
    assert_eq!(next_event(&mut watch).await.revision(), next);
}

async fn watch_resumes_after_a_disconnect_without_gap_or_duplicate(store: Arc<dyn Store>) {
    let start = store.status().await.unwrap().revision + 1;
    for i in 0..10 {
        store
            .put(&format!("/res/{i}"), b"v".to_vec(), None)
            .await
            .unwrap();
    }
    let mut watch = store.watch("/res/", start).await.unwrap();
    let first = next_events(&mut watch, 5).await;
    drop(watch);
    for i in 10..15 {
        store
            .put(&format!("/res/{i}"), b"v".to_vec(), None)
            .await
            .unwrap();
    }
    let resume_from = first.last().unwrap().revision() + 1;
    let mut watch = store.watch("/res/", resume_from).await.unwrap();
    let rest = next_events(&mut watch, 10).await;
    assert_quiet(&mut watch).await;
    let all: Vec<String> = first
        .iter()
        .chain(&rest)
        .map(|e| e.kv.key.clone())
        .collect();
    let expected: Vec<String> = (0..15).map(|i| format!("/res/{i}")).collect();
    assert_eq!(all, expected);
}

async fn watch_keeps_order_under_concurrent_writers(store: Arc<dyn Store>) {
    const WRITERS: usize = 8;
    const PUTS: usize = 40;
    let mut watch = store.watch("/cw/", 0).await.unwrap();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..PUTS {
                let value = format!("{i}").into_bytes();
                revisions.push(store.put(&format!("/cw/{w}"), value, None).await.unwrap());
            }
            revisions
        }));
    }
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    acknowledged.sort_unstable();

    let events = next_events(&mut watch, WRITERS * PUTS).await;
    assert_quiet(&mut watch).await;
    let revisions: Vec<i64> = events.iter().map(WatchEvent::revision).collect();
    assert_eq!(
        revisions, acknowledged,
        "every acknowledged write once, in revision order"
    );
    // Per key, values arrive in the order they were written.
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for event in &events {
        let value: i64 = std::str::from_utf8(&event.kv.value)
            .unwrap()
            .parse()
            .unwrap();
        let previous = last.insert(event.kv.key.clone(), value).unwrap_or(-1);
        assert_eq!(value, previous + 1, "{}", event.kv.key);
    }
}

async fn watch_from_a_compacted_revision_is_an_error_naming_the_oldest(store: Arc<dyn Store>) {
    let first = store.put("/c/a", b"1".to_vec(), None).await.unwrap();
    store.put("/c/a", b"2".to_vec(), None).await.unwrap();
    let third = store.put("/c/a", b"3".to_vec(), None).await.unwrap();
    store.compact(third).await.unwrap();

    let mut watch = store.watch("/c/", first).await.unwrap();
    match tokio::time::timeout(WAIT, watch.next()).await {
        Ok(Some(Err(error @ StoreError::Compacted { oldest }))) => {
            assert_eq!(oldest, third);
            assert!(error.to_string().contains(&third.to_string()), "{error}");
        }
        other => panic!("expected a compacted error, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, watch.next())
            .await
            .expect("watch ends")
            .is_none(),
        "a compacted watch ends"
    );

    let mut watch = store.watch("/c/", third).await.unwrap();
    let event = next_event(&mut watch).await;
    assert_eq!(
        (event.revision(), event.kv.value.as_slice()),
        (third, &b"3"[..])
    );

    match store.compact(first).await {
        Err(StoreError::Compacted { oldest }) => assert_eq!(oldest, third),
        other => panic!("compacting again below the compacted revision: {other:?}"),
    }
}

async fn compact_rejects_a_future_revision(store: Arc<dyn Store>) {
    let current = store.put("/f", b"1".to_vec(), None).await.unwrap();
    match store.compact(current + 100).await {
        Err(StoreError::FutureRevision {
            requested,
            current: at,
        }) => {
            assert_eq!((requested, at), (current + 100, current));
        }
        other => panic!("expected a future-revision error, got {other:?}"),
    }
}

async fn lease_expiry_deletes_keys_and_watchers_see_it(store: Arc<dyn Store>) {
    let lease = store.lease_grant(Duration::from_secs(2)).await.unwrap();
    assert!(lease.ttl_secs >= 2);
    store
        .put("/l/a", b"a".to_vec(), Some(lease.id))
        .await
        .unwrap();
    store
        .put("/l/b", b"b".to_vec(), Some(lease.id))
        .await
        .unwrap();
    store.put("/l/free", b"c".to_vec(), None).await.unwrap();
    assert_eq!(
        store.get("/l/a").await.unwrap().expect("leased key").lease,
        Some(lease.id)
    );

    let mut watch = store.watch("/l/", 0).await.unwrap();
    let deletes = next_events(&mut watch, 2).await;
    assert!(deletes.iter().all(|e| e.kind == EventKind::Delete));
    let mut deleted: Vec<&str> = deletes.iter().map(|e| e.kv.key.as_str()).collect();
    deleted.sort_unstable();
    assert_eq!(deleted, vec!["/l/a", "/l/b"]);
    assert_eq!(
        deletes[0].revision(),
        deletes[1].revision(),
        "an expiry is one revision"
    );

    assert_eq!(store.get("/l/a").await.unwrap(), None);
    assert!(
        store.get("/l/free").await.unwrap().is_some(),
        "keys without the lease stay"
    );
    match store.lease_keep_alive(lease.id).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, lease.id),
        other => panic!("keep-alive of an expired lease: {other:?}"),
    }
}

async fn lease_keep_alive_and_revoke(store: Arc<dyn Store>) {
    let lease = store.lease_grant(Duration::from_secs(2)).await.unwrap();
    store
        .put("/k/a", b"a".to_vec(), Some(lease.id))
        .await
        .unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(store.lease_keep_alive(lease.id).await.unwrap() >= 2);
    }
    assert!(
        store.get("/k/a").await.unwrap().is_some(),
        "kept alive for twice its TTL"
    );

    let mut watch = store.watch("/k/", 0).await.unwrap();
    store.lease_revoke(lease.id).await.unwrap();
    let event = next_event(&mut watch).await;
    assert_eq!(
        (event.kind, event.kv.key.as_str()),
        (EventKind::Delete, "/k/a")
    );
    assert_eq!(store.get("/k/a").await.unwrap(), None);
    assert!(matches!(
        store.lease_revoke(lease.id).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        store.put("/k/b", b"b".to_vec(), Some(lease.id)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

async fn status_reports_revision_size_and_location(store: Arc<dyn Store>) {
    let revision = store.put("/s", vec![7; 4096], None).await.unwrap();
    let status = store.status().await.unwrap();
    assert_eq!(status.revision, revision);
    assert!(status.db_size_bytes > 0);
    assert!(!status.location.is_empty());
}
