//! The etcd backend against real etcd processes that fail: a member of a
//! three-member cluster killed under load, an address where nothing
//! listens, a single server killed after the store connected.
//!
//! What a user would notice is checked: writes and reads go on, watches see
//! every write exactly once and in order, and a store that cannot reach etcd
//! says so, naming the endpoints, within a bounded time instead of hanging.

use std::time::Duration;

use futures::StreamExt;
use keel_store::{
    Compare, EtcdOptions, EtcdStore, EventKind, Op, RangeRequest, Revision, Store, StoreError, Txn,
    WatchStream,
};
use keel_testing::{EtcdCluster, EtcdServer, free_port};
use tokio::time::Instant;

const PREFIX: &str = "/cluster/";
/// How long a write may take to get through while the cluster recovers
/// from losing a member (a leader election takes one to two seconds).
const WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a watch may take to deliver an event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn key(i: usize) -> String {
    format!("{PREFIX}{i:03}")
}

fn value(i: usize) -> Vec<u8> {
    format!("value {i}").into_bytes()
}

/// Creates `key` once, retrying while etcd is unavailable; the revision it
/// was created at, and how many attempts failed. A retried attempt cannot
/// create the key twice (it only puts if the key is missing), so even when
/// a failed attempt did reach etcd the key has exactly one creation.
async fn create(store: &EtcdStore, key: &str, value: Vec<u8>) -> (Revision, usize) {
    let deadline = Instant::now() + WRITE_DEADLINE;
    let mut failures = 0;
    loop {
        let txn = Txn::new()
            .when([Compare::missing(key)])
            .and_then([Op::put(key, value.clone())]);
        match store.txn(txn).await {
            Ok(response) if response.succeeded => return (response.revision, failures),
            Ok(_) => {
                // An earlier attempt that reported a failure was applied.
                let kv = store
                    .get(key)
                    .await
                    .expect("read back a created key")
                    .expect("the key");
                assert_eq!(kv.value, value, "{key} holds what was written");
                return (kv.create_revision, failures);
            }
            Err(err) if err.is_unavailable() && Instant::now() < deadline => {
                eprintln!("write of {key} failed, retrying: {err:#?}");
                failures += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("write of {key} failed for good: {err:?}"),
        }
    }
}

/// The next `n` events of `watch`, which must all arrive in time.
async fn next_events(watch: &mut WatchStream, n: usize) -> Vec<(EventKind, String, Revision)> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        let item = tokio::time::timeout(EVENT_TIMEOUT, watch.next())
            .await
            .unwrap_or_else(|_| panic!("no event within {EVENT_TIMEOUT:?} after {events:?}"))
            .unwrap_or_else(|| panic!("the watch ended after {events:?}"));
        let event = item.unwrap_or_else(|err| panic!("the watch failed after {events:?}: {err:?}"));
        events.push((event.kind, event.kv.key.clone(), event.revision()));
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_member_cluster_keeps_serving_after_a_member_is_killed() {
    keel_testing::init_tracing();
    let mut cluster = EtcdCluster::start(3)
        .await
        .expect("start a three-member etcd cluster");
    let options = EtcdOptions {
        endpoints: cluster.endpoints(),
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(3),
    };
    let store = EtcdStore::connect(options)
        .await
        .expect("connect to the cluster");

    // Each watch goes to a member picked at random; open watches until the
    // member about to be killed (the first endpoint) serves some of them, so
    // the test always covers a watch whose member dies.
    let doomed = &cluster.members[0];
    let mut watches = Vec::new();
    while doomed
        .metric("etcd_debugging_mvcc_watcher_total")
        .await
        .expect("watcher count")
        < 2.0
    {
        assert!(
            watches.len() < 64,
            "no watch landed on {} after 64 tries",
            doomed.name()
        );
        watches.push(store.watch(PREFIX, 0).await.expect("watch"));
    }
    // And one that replays history from before the kill.
    let first = store.status().await.expect("status").revision + 1;
    let mut replay = store
        .watch(PREFIX, first)
        .await
        .expect("watch from a revision");

    let mut created = Vec::new();
    let mut failures = 0;
    for i in 0..20 {
        let (revision, failed) = create(&store, &key(i), value(i)).await;
        created.push(revision);
        failures += failed;
    }
    assert_eq!(failures, 0, "no write fails while every member is up");

    cluster.members[0].kill();
    for i in 20..60 {
        let (revision, failed) = create(&store, &key(i), value(i)).await;
        created.push(revision);
        failures += failed;
    }
    eprintln!("{failures} write attempts failed while the cluster lost a member");
    // A marker written last: anything a watch delivers between the writes
    // above and this would be a duplicate or a stray.
    let (end, _) = create(&store, &format!("{PREFIX}end"), b"end".to_vec()).await;

    // Every value is there, on every read path.
    for (i, &revision) in created.iter().enumerate() {
        let kv = store
            .get(&key(i))
            .await
            .expect("get")
            .expect("the key exists");
        assert_eq!(kv.value, value(i));
        assert_eq!(kv.create_revision, revision);
    }
    let page = store
        .range(&RangeRequest::prefix(PREFIX))
        .await
        .expect("range");
    assert!(!page.more);
    let keys: Vec<String> = page.kvs.iter().map(|kv| kv.key.clone()).collect();
    let mut expected_keys: Vec<String> = (0..60).map(key).collect();
    expected_keys.push(format!("{PREFIX}end"));
    assert_eq!(keys, expected_keys);

    // Every watch saw each write exactly once, in order, then the marker.
    let mut expected: Vec<(EventKind, String, Revision)> = (0..60)
        .map(|i| (EventKind::Put, key(i), created[i]))
        .collect();
    expected.push((EventKind::Put, format!("{PREFIX}end"), end));
    for (n, watch) in watches.iter_mut().chain([&mut replay]).enumerate() {
        assert_eq!(
            next_events(watch, expected.len()).await,
            expected,
            "watch {n}"
        );
    }

    // The dead member is still in the endpoint list: requests keep working.
    for _ in 0..20 {
        store.status().await.expect("status with a member down");
        store
            .get(&key(0))
            .await
            .expect("get with a member down")
            .expect("the key");
    }
}

#[tokio::test]
async fn connecting_where_nothing_listens_fails_in_bounded_time_naming_the_endpoint() {
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let connect_timeout = Duration::from_millis(500);
    let options = EtcdOptions {
        endpoints: vec![endpoint.clone()],
        connect_timeout,
        request_timeout: Duration::from_secs(1),
    };
    let started = Instant::now();
    let err = EtcdStore::connect(options)
        .await
        .expect_err("nothing listens there");
    let elapsed = started.elapsed();

    assert!(
        matches!(err, StoreError::Unreachable { .. }),
        "unexpected error: {err:?}"
    );
    assert!(
        err.to_string().contains(&endpoint),
        "{err} names {endpoint}"
    );
    assert!(err.is_unavailable());
    assert!(
        elapsed < connect_timeout * 3,
        "connect gave up after {elapsed:?}"
    );
}

#[tokio::test]
async fn connecting_succeeds_when_one_of_the_endpoints_is_dead() {
    let server = EtcdServer::start().await.expect("start etcd");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let options = EtcdOptions {
        endpoints: vec![dead.clone(), server.endpoint()],
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(3),
    };
    let store = EtcdStore::connect(options)
        .await
        .expect("connect through the live endpoint");
    for i in 0..20 {
        store.put(&key(i), value(i), None).await.expect("put");
        assert_eq!(
            store
                .get(&key(i))
                .await
                .expect("get")
                .expect("the key")
                .value,
            value(i)
        );
    }
    let status = store.status().await.expect("status");
    assert_eq!(status.location, format!("{dead},{}", server.endpoint()));
}

#[tokio::test]
async fn requests_to_a_killed_server_fail_in_bounded_time_naming_the_endpoint() {
    keel_testing::init_tracing();
    let mut server = EtcdServer::start().await.expect("start etcd");
    let endpoint = server.endpoint();
    let request_timeout = Duration::from_secs(1);
    let options = EtcdOptions {
        endpoints: vec![endpoint.clone()],
        connect_timeout: Duration::from_secs(3),
        request_timeout,
    };
    let store = EtcdStore::connect(options).await.expect("connect");
    store.put("/k", b"v".to_vec(), None).await.expect("put");
    let mut watch = store.watch("/", 0).await.expect("watch");

    server.kill();

    let started = Instant::now();
    let err = store.get("/k").await.expect_err("the server is gone");
    let elapsed = started.elapsed();
    assert!(
        err.to_string().contains(&endpoint),
        "{err} names {endpoint}"
    );
    assert!(err.is_unavailable(), "unexpected error: {err:?}");
    assert!(
        elapsed < request_timeout * 3,
        "get gave up after {elapsed:?}"
    );

    let err = store
        .put("/k", b"w".to_vec(), None)
        .await
        .expect_err("the server is gone");
    assert!(
        err.to_string().contains(&endpoint),
        "{err} names {endpoint}"
    );

    // The watch cannot resume anywhere: it ends with an error, not silence.
    let started = Instant::now();
    let item = tokio::time::timeout(request_timeout * 3, watch.next())
        .await
        .expect("the watch reports the loss in bounded time");
    match item {
        Some(Err(err)) => {
            assert!(err.is_unavailable(), "unexpected error: {err:?}");
            assert!(
                err.to_string().contains(&endpoint),
                "{err} names {endpoint}"
            );
        }
        other => panic!("expected a watch error, got {other:?}"),
    }
    assert!(
        watch.next().await.is_none(),
        "the watch ends after its error"
    );
    assert!(started.elapsed() < request_timeout * 3);
}
