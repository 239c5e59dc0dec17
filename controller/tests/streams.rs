//! The long-lived streams the controller serves: agents' desired-instance
//! streams leave no subscriber behind when their connections end; routers'
//! route-table streams and the change feed share one store watch however
//! many clients follow them, and a client that reads slowly holds nobody
//! up and is resynced to the newest state.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use keel_controller::agents::Agents;
use keel_controller::apps::Apps;
use keel_controller::changes::{Changed, Changes};
use keel_controller::routes::Routes;
use keel_protocol::RouteTable;
use keel_store::{
    DeleteResponse, KeyValue, Lease, LeaseId, RangePage, RangeRequest, Revision, Store,
    StoreConfig, StoreError, StoreStatus, Txn, TxnResponse, WatchStream,
};
use serde_json::Value;

/// The real embedded store, counting the watches opened on it.
#[derive(Debug)]
struct CountingStore {
    inner: Arc<dyn Store>,
    watches: AtomicUsize,
}

#[async_trait::async_trait]
impl Store for CountingStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn range(&self, request: &RangeRequest) -> Result<RangePage, StoreError> {
        self.inner.range(request).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.inner.txn(txn).await
    }
    async fn delete(&self, key: &str) -> Result<DeleteResponse, StoreError> {
        self.inner.delete(key).await
    }
    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError> {
        self.watches.fetch_add(1, Ordering::SeqCst);
        self.inner.watch(prefix, start).await
    }
    async fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64, StoreError> {
        self.inner.lease_keep_alive(id).await
    }
    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        self.inner.lease_revoke(id).await
    }
    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }
    async fn status(&self) -> Result<StoreStatus, StoreError> {
        self.inner.status().await
    }
}

async fn counting_store(dir: &tempfile::TempDir) -> Arc<CountingStore> {
    let inner = keel_store::open(&StoreConfig::embedded(dir.path().join("s.redb")))
        .await
        .unwrap();
    Arc::new(CountingStore {
        inner,
        watches: AtomicUsize::new(0),
    })
}

/// Polls `check` every 20 ms for up to 10 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next message of a stream, within 10 s.
async fn next<T>(stream: &mut (impl Stream<Item = T> + Unpin)) -> T {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a message within 10 s")
        .expect("the stream goes on")
}

fn routed_app(i: usize) -> keel_manifest::AppManifest {
    keel_manifest::parse_yaml(&format!(
        "name: web-{i}\nproject: shop\nimage: keel/test-server:1\ninstances: 0\nports:\n  - name: http\n    port: 8080\nroutes:\n  - host: web-{i}.example.com\n"
    ))
    .unwrap()
}

fn table(line: &[u8]) -> RouteTable {
    serde_json::from_slice(line).unwrap()
}

#[tokio::test]
async fn ten_thousand_node_stream_connections_leave_no_subscriber_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = counting_store(&dir).await;
    let agents = Agents::new(store);
    let held = agents.watch("n1").await.unwrap();
    for _ in 0..10_000 {
        let mut stream = agents.watch("n1").await.unwrap();
        assert!(matches!(
            next(&mut stream).await,
            keel_protocol::StreamMessage::Snapshot { .. }
        ));
        drop(stream);
    }
    assert_eq!(
        agents.open_streams(Some("n1")),
        1,
        "only the stream still held is subscribed"
    );
    drop(held);
    assert_eq!(agents.open_streams(None), 0);
}

/// Over HTTP, as an operator sees it: `GET /v1/nodes/{node}` counts the
/// node's open streams, and a stream whose connection ends is no longer
/// counted.
#[tokio::test]
async fn an_operator_sees_a_nodes_open_streams_and_reconnects_do_not_pile_up() {
    let dir = tempfile::tempdir().unwrap();
    let server = support::start_server(dir.path()).await;
    let admin = server.new_admin_token.as_ref().unwrap().token.clone();
    let join = server.new_join_token.as_ref().unwrap().token.clone();
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let registered: Value = client
        .post(format!("{base}/v1/nodes"))
        .bearer_auth(&join)
        .header("content-type", "application/json")
        .body(r#"{"name":"n1","region":"eu","zone":"a","labels":{},"roles":["worker"],"capacity":{"cpu_millis":4000,"memory_mb":8192,"max_instances":50},"address":"127.0.0.2"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let credential = registered["token"].as_str().unwrap().to_owned();
    let streams = async || -> u64 {
        let node: Value = client
            .get(format!("{base}/v1/nodes/n1"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        node["streams"]
            .as_u64()
            .expect("the node view counts streams")
    };
    assert_eq!(streams().await, 0);
    for _ in 0..300 {
        // A fresh connection each time, as an agent's reconnect loop makes.
        let mut response = reqwest::Client::new()
            .get(format!("{base}/v1/nodes/n1/instances/watch"))
            .bearer_auth(&credential)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        let first = response.chunk().await.unwrap().unwrap();
        assert!(first.starts_with(b"{\"snapshot\""), "{first:?}");
    }
    let held = client
        .get(format!("{base}/v1/nodes/n1/instances/watch"))
        .bearer_auth(&credential)
        .send()
        .await
        .unwrap();
    eventually("one open stream", async || streams().await == 1).await;
    drop(held);
    eventually("no open stream", async || streams().await == 0).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_router_shares_one_store_watch_and_a_slow_one_is_resynced() {
    let dir = tempfile::tempdir().unwrap();
    let store = counting_store(&dir).await;
    let routes = Routes::new(store.clone());
    let apps = Apps::new(store.clone());
    let mut routers = Vec::new();
    for _ in 0..50 {
        let mut stream = Box::pin(routes.watch().await.unwrap());
        assert!(table(&next(&mut stream).await).routes.is_empty());
        routers.push(stream);
    }
    assert_eq!(
        store.watches.load(Ordering::SeqCst),
        1,
        "50 routers, one store watch"
    );
    // One router stops reading; the others go on and see every change.
    let mut slow = routers.pop().unwrap();
    for i in 0..20 {
        apps.apply(routed_app(i), None).await.unwrap();
        for router in &mut routers {
            loop {
                if table(&next(router).await).routes.len() == i + 1 {
                    break;
                }
            }
        }
    }
    // The slow one, reading again, gets the newest table at once rather
    // than the backlog of the 20 it missed.
    let caught_up = table(&next(&mut slow).await);
    assert_eq!(caught_up.routes.len(), 20);
    assert_eq!(store.watches.load(Ordering::SeqCst), 1);
    // The last router gone, the shared watch stops; the next one starts a
    // new one.
    drop(routers);
    drop(slow);
    eventually("the route feed stops", async || {
        !routes.feed_running().await
    })
    .await;
    let mut again = Box::pin(routes.watch().await.unwrap());
    assert_eq!(table(&next(&mut again).await).routes.len(), 20);
    assert_eq!(store.watches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn every_live_view_shares_one_store_watch_and_a_slow_one_misses_no_kind() {
    let dir = tempfile::tempdir().unwrap();
    let store = counting_store(&dir).await;
    let changes = Changes::new(store.clone());
    let apps = Apps::new(store.clone());
    let mut views = Vec::new();
    for _ in 0..50 {
        let mut stream = Box::pin(changes.watch().await.unwrap());
        let first: Changed = next(&mut stream).await;
        assert!(first.changed.is_empty());
        views.push(stream);
    }
    assert_eq!(
        store.watches.load(Ordering::SeqCst),
        1,
        "50 views, one store watch"
    );
    let mut slow = views.pop().unwrap();
    // An app (project, app and revision) first, then an unrelated burst of
    // instance statuses; the readers see each.
    apps.apply(routed_app(0), None).await.unwrap();
    for view in &mut views {
        while !next(view).await.changed.contains("apps") {}
    }
    for i in 0..40 {
        store
            .put(
                &format!("/keel/status/shop/web-0/{i}"),
                b"{}".to_vec(),
                None,
            )
            .await
            .unwrap();
    }
    let revision = store.status().await.unwrap().revision;
    for view in &mut views {
        let message = loop {
            let message = next(view).await;
            if message.revision == revision {
                break message;
            }
        };
        assert!(message.changed.contains("instances"), "{message:?}");
        assert!(!message.changed.contains("apps"), "{message:?}");
    }
    // The slow view gets one message with everything it missed, current
    // to the newest revision.
    let caught_up = next(&mut slow).await;
    assert_eq!(caught_up.revision, revision);
    assert!(caught_up.changed.contains("apps"), "{caught_up:?}");
    assert!(caught_up.changed.contains("instances"), "{caught_up:?}");
    assert!(caught_up.changed.contains("projects"), "{caught_up:?}");
    assert_eq!(store.watches.load(Ordering::SeqCst), 1);
}
