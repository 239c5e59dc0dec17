//! Work that touches many keys, on a real etcd with its default limits
//! (at most 128 operations in a transaction): event pruning, deleting an
//! app with a long history, and the revision history that each app keeps.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

use std::sync::Arc;

use keel_controller::apps::Apps;
use keel_controller::records::{EventRecord, keys};
use keel_store::{Op, Store, StoreConfig, Txn};

async fn etcd() -> (keel_testing::EtcdServer, Arc<dyn Store>) {
    keel_testing::init_tracing();
    let server = keel_testing::EtcdServer::start().await.unwrap();
    let store = keel_store::open(&StoreConfig::etcd(vec![server.endpoint()]))
        .await
        .unwrap();
    (server, store)
}

fn manifest(name: &str, round: usize) -> keel_manifest::AppManifest {
    let text = format!(
        "name: {name}\nproject: shop\nimage: keel/test-server:1\ninstances: 1\nenv:\n  ROUND: \"{round}\"\n"
    );
    keel_manifest::parse(&text, keel_manifest::Format::Yaml).unwrap()
}

fn round(revision: &keel_controller::records::RevisionRecord) -> String {
    revision.manifest.env["ROUND"].clone()
}

#[tokio::test]
async fn pruning_a_thousand_excess_events_succeeds_on_etcd() {
    let (_etcd, store) = etcd().await;
    let apps = Apps::new(store.clone());
    // 1,010 events written directly, 100 to a transaction, oldest first.
    let events: Vec<(String, Vec<u8>)> = (0..1010u64)
        .map(|i| {
            let event = EventRecord {
                time_ms: i,
                project: Some("p".into()),
                app: None,
                reason: "test".into(),
                message: format!("event {i}"),
            };
            (
                keys::event(i + 1, 0, 0),
                serde_json::to_vec(&event).unwrap(),
            )
        })
        .collect();
    for chunk in events.chunks(100) {
        store
            .txn(Txn::new().and_then(chunk.iter().map(|(k, v)| Op::put(k, v.clone()))))
            .await
            .unwrap();
    }
    assert_eq!(apps.prune_events(10).await.unwrap(), 1000);
    let left = apps.events(None, None, 10_000).await.unwrap();
    let messages: Vec<_> = left.iter().map(|e| e.message.clone()).collect();
    assert_eq!(
        messages,
        (1000..1010)
            .map(|i| format!("event {i}"))
            .collect::<Vec<_>>(),
        "the newest ten stay, in order"
    );
}

#[tokio::test]
async fn deleting_an_app_with_300_revisions_succeeds_on_etcd_and_leaves_nothing() {
    let (_etcd, store) = etcd().await;
    let apps = Apps::new(store.clone()).with_revision_history(1000);
    for i in 0..300 {
        apps.apply(manifest("web", i), None).await.unwrap();
    }
    assert_eq!(apps.revisions("shop", "web").await.unwrap().len(), 300);
    apps.delete("shop", "web").await.unwrap();
    let left = store
        .range(&keel_store::RangeRequest::prefix("/keel/revisions/"))
        .await
        .unwrap();
    assert!(left.kvs.is_empty(), "{} revisions left", left.kvs.len());
    let marks = store
        .range(&keel_store::RangeRequest::prefix("/keel/app-deletions/"))
        .await
        .unwrap();
    assert!(marks.kvs.is_empty(), "the deletion is marked as finished");
    assert!(apps.app("shop", "web").await.is_err());
}

#[tokio::test]
async fn a_deletion_interrupted_after_its_commit_is_harmless_and_finished_later() {
    let (_etcd, store) = etcd().await;
    let apps = Apps::new(store.clone());
    for name in ["web", "api"] {
        for i in 0..3 {
            apps.apply(manifest(name, i), None).await.unwrap();
        }
    }
    // What a crash right after the commit point leaves: no app records,
    // the marks, and every revision.
    for name in ["web", "api"] {
        store
            .txn(Txn::new().and_then([
                Op::delete(keys::app("shop", name)),
                Op::put(keys::app_deletion("shop", name), Vec::new()),
            ]))
            .await
            .unwrap();
    }
    // A new app of the same name starts a history of its own.
    let applied = apps.apply(manifest("web", 7), None).await.unwrap();
    assert_eq!(applied.revision.revision, 1);
    let revisions = apps.revisions("shop", "web").await.unwrap();
    assert_eq!(
        revisions.iter().map(round).collect::<Vec<_>>(),
        ["7"],
        "none of the old app's revisions show"
    );
    // The periodic housekeeping finishes the other one.
    apps.prune_events(1000).await.unwrap();
    let left = store
        .range(&keel_store::RangeRequest::prefix(keys::revisions(
            "shop", "api",
        )))
        .await
        .unwrap();
    assert!(left.kvs.is_empty(), "{} revisions left", left.kvs.len());
    let marks = store
        .range(&keel_store::RangeRequest::prefix("/keel/app-deletions/"))
        .await
        .unwrap();
    assert!(marks.kvs.is_empty());
    assert_eq!(apps.revisions("shop", "web").await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_app_keeps_its_newest_revisions_and_rollback_still_works() {
    let (_etcd, store) = etcd().await;
    let apps = Apps::new(store.clone()).with_revision_history(50);
    for i in 1..=60 {
        apps.apply(manifest("web", i), None).await.unwrap();
    }
    let revisions = apps.revisions("shop", "web").await.unwrap();
    let numbers: Vec<u64> = revisions.iter().map(|r| r.revision).collect();
    assert_eq!(numbers, (11..=60).collect::<Vec<_>>());
    let app = apps.app("shop", "web").await.unwrap();
    assert_eq!(app.revision, 60, "the current one is kept");
    assert!(numbers.contains(&59), "and the rollback target");

    let rolled = apps.rollback("shop", "web", None).await.unwrap();
    assert_eq!(rolled.revision.revision, 61);
    assert_eq!(round(&rolled.revision), "59");
    let numbers: Vec<u64> = apps
        .revisions("shop", "web")
        .await
        .unwrap()
        .iter()
        .map(|r| r.revision)
        .collect();
    assert_eq!(numbers, (12..=61).collect::<Vec<_>>());

    let error = apps.rollback("shop", "web", Some(3)).await.unwrap_err();
    assert!(error.to_string().contains("pruned"), "{error}");
    let back = apps.rollback("shop", "web", Some(12)).await.unwrap();
    assert_eq!(round(&back.revision), "12");
}

#[tokio::test]
async fn a_history_of_one_still_keeps_the_rollback_target() {
    let (_etcd, store) = etcd().await;
    let apps = Apps::new(store).with_revision_history(1);
    for i in 1..=5 {
        apps.apply(manifest("web", i), None).await.unwrap();
    }
    let numbers: Vec<u64> = apps
        .revisions("shop", "web")
        .await
        .unwrap()
        .iter()
        .map(|r| r.revision)
        .collect();
    assert_eq!(numbers, [4, 5]);
    let rolled = apps.rollback("shop", "web", None).await.unwrap();
    assert_eq!(round(&rolled.revision), "4");
}
