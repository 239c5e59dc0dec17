//! The router fed by the controller: a real controller (the `SimCluster`
//! harness) streams the table; the router keeps serving the last table
//! while the controller is gone and picks up the next when it is back.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use common::*;
use keel_agent::eventually;
use keel_agent::testing::{NodeSpec, SimCluster};
use keel_router::{Router, RouterConfig, TableSource};

/// The status curl gets for `host` through the router.
async fn status(http: SocketAddr, host: &str) -> u16 {
    curl(&["-H", &format!("Host: {host}"), &format!("http://{http}/")])
        .await
        .map_or(0, |(code, _)| code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_controller_and_outlives_it() -> anyhow::Result<()> {
    init_tracing();
    let mut cluster = SimCluster::start(&[
        NodeSpec::new("worker-1", "a"),
        NodeSpec::new("edge-1", "a").role("router"),
    ])
    .await?;
    let router = Router::start(RouterConfig {
        http_addr: Some("127.0.0.1:0".parse()?),
        https_addr: None,
        worker_threads: 1,
        source: TableSource::controller(
            cluster.admin().base_url(),
            cluster.admin().token(),
            "edge-1",
        ),
        ..RouterConfig::default()
    })?;
    let http = router.addresses().http.context("http")?;
    eventually!(Duration::from_secs(10), {
        match router.generation() {
            Some(_) => Ok(()),
            None => Err("no table yet"),
        }
    });
    assert_eq!(status(http, "shop.example.com").await, 404);

    cluster
        .admin()
        .apply(
            "name: web\nproject: shop\nimage: nginx:1\ninstances: 2\n\
             ports:\n  - name: http\n    port: 8080\n\
             routes:\n  - host: shop.example.com\n    port: http\n",
        )
        .await?;
    // Simulated instances publish addresses no one listens on: the route
    // is there (not 404) and its instances are unreachable (502).
    eventually!(Duration::from_secs(15), {
        match status(http, "shop.example.com").await {
            502 => Ok(()),
            other => Err(format!("status {other}")),
        }
    });
    let generation = router.generation();

    cluster.stop_controller().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status(http, "shop.example.com").await, 502, "the last table serves");
    assert_eq!(router.generation(), generation);

    cluster.start_controller().await?;
    cluster.admin().scale("shop", "web", 0).await?;
    eventually!(Duration::from_secs(20), {
        match status(http, "shop.example.com").await {
            503 => Ok(()),
            other => Err(format!("status {other}")),
        }
    });
    router.shutdown().await;
    cluster.shutdown().await?;
    Ok(())
}
