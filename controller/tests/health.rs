//! `/healthz` and `/readyz`, the probes a supervisor polls: no token, and
//! readiness follows the real store.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

mod support;

use keel_controller::{Server, ServerConfig};
use reqwest::StatusCode;
use serde_json::Value;

async fn probe(server: &Server, path: &str) -> (StatusCode, Value) {
    let response = reqwest::get(format!("http://{}{path}", server.addr))
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn both_probes_answer_200_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = support::start_server(dir.path()).await;
    for path in ["/healthz", "/readyz"] {
        let (status, body) = probe(&server, path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(body["status"], "ok", "{path}");
        assert!(body.get("reason").is_none(), "{path}: {body}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn readiness_is_a_503_with_the_reason_when_the_store_stops_answering() {
    keel_testing::init_tracing();
    let mut etcd = keel_testing::EtcdServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut store = keel_store::StoreConfig::etcd(vec![etcd.endpoint()]);
    if let keel_store::Backend::Etcd(options) = &mut store.backend {
        options.request_timeout = std::time::Duration::from_millis(1000);
    }
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
    config.store = Some(store);
    let server = Server::start(config).await.unwrap();
    let (status, _) = probe(&server, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "ready while etcd runs");

    etcd.kill();
    let (status, body) = probe(&server, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not_ready");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("cluster store"), "{reason}");
    assert!(
        reason.contains(&etcd.endpoint()) || reason.contains("did not answer"),
        "the reason says which store: {reason}"
    );
    let (status, body) = probe(&server, "/healthz").await;
    assert_eq!(status, StatusCode::OK, "the process still serves: {body}");
}
