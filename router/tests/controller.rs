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
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NO_ROUTE: &str = "keel router: no route for this host";
const NO_INSTANCE: &str = "keel router: no ready instance for this route";

/// A router on free loopback ports (HTTPS too when `https`) that follows
/// `cluster`'s controller as node `edge-1`.
fn follow(cluster: &SimCluster, https: bool) -> anyhow::Result<keel_router::RouterHandle> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    Ok(Router::start(RouterConfig {
        http_addr: Some(any),
        https_addr: https.then_some(any),
        metrics_addr: Some(any),
        worker_threads: 1,
        source: TableSource::controller(
            cluster.admin().base_url(),
            cluster.admin().token(),
            "edge-1",
        ),
        ..RouterConfig::default()
    })?)
}

/// The first line curl gets for `host` through the router.
async fn answer(http: SocketAddr, host: &str) -> String {
    curl(&["-H", &format!("Host: {host}"), &format!("http://{http}/")])
        .await
        .map_or_else(
            |e| e.to_string(),
            |(_, body)| body.lines().next().unwrap_or("").to_owned(),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_controller_and_outlives_it() -> anyhow::Result<()> {
    init_tracing();
    let mut cluster = SimCluster::start(&[
        NodeSpec::new("worker-1", "a"),
        NodeSpec::new("edge-1", "a").role("router"),
    ])
    .await?;
    let router = follow(&cluster, true)?;
    let http = router.addresses().http.context("http")?;
    eventually!(Duration::from_secs(10), {
        match router.generation() {
            Some(_) => Ok(()),
            None => Err("no table yet"),
        }
    });
    assert_eq!(answer(http, "shop.example.com").await, NO_ROUTE);

    cluster
        .admin()
        .apply(
            "name: web\nproject: shop\nimage: nginx:1\ninstances: 2\n\
             ports:\n  - name: http\n    port: 8080\n\
             routes:\n  - host: shop.example.com\n    port: http\n",
        )
        .await?;
    // Simulated instances publish made-up addresses: what answers there
    // (nothing, usually: 502) does not matter, only that the router has
    // the route and its ready instances.
    let forwarded = |a: &str| a != NO_ROUTE && a != NO_INSTANCE;
    eventually!(Duration::from_secs(15), {
        match answer(http, "shop.example.com").await {
            a if forwarded(&a) => Ok(()),
            other => Err(other),
        }
    });

    // A certificate stored through the API reaches the router, which
    // serves it by SNI; the admin never sees its key again.
    let made = rcgen::generate_simple_self_signed(vec!["shop.example.com".to_owned()])?;
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, made.cert.pem())?;
    let body = serde_json::json!({
        "host": "shop.example.com",
        "cert_pem": made.cert.pem(),
        "key_pem": made.signing_key.serialize_pem(),
    });
    cluster
        .admin()
        .call(
            reqwest::Method::POST,
            "/v1/certs",
            Some(("application/json", body.to_string())),
        )
        .await?;
    // A key that is not the certificate's is refused, by field.
    let other = rcgen::generate_simple_self_signed(vec!["shop.example.com".to_owned()])?;
    let wrong = serde_json::json!({
        "host": "shop.example.com",
        "cert_pem": made.cert.pem(),
        "key_pem": other.signing_key.serialize_pem(),
    });
    let refused = cluster
        .admin()
        .call(
            reqwest::Method::POST,
            "/v1/certs",
            Some(("application/json", wrong.to_string())),
        )
        .await
        .err()
        .context("a mismatched key must be refused")?
        .to_string();
    assert!(
        refused.contains("400") && refused.contains("key_pem"),
        "{refused}"
    );
    let listed = cluster.admin().get("/v1/certs").await?.to_string();
    assert!(
        listed.contains("fingerprint_sha256") && !listed.contains("PRIVATE KEY"),
        "{listed}"
    );
    let table = cluster.admin().get("/v1/routes").await?.to_string();
    assert!(!table.contains("PRIVATE KEY"), "{table}");
    let port = router.addresses().https.context("https")?.port();
    let (ca, resolve, url) = (
        ca.display().to_string(),
        format!("shop.example.com:{port}:127.0.0.1"),
        format!("https://shop.example.com:{port}/"),
    );
    eventually!(Duration::from_secs(10), {
        // Verified against the uploaded certificate: a status means the
        // handshake succeeded.
        match curl(&["--cacert", &ca, "--resolve", &resolve, &url]).await {
            Ok((code, _)) if code > 0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let generation = router.generation();

    cluster.stop_controller().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = answer(http, "shop.example.com").await;
    assert!(forwarded(&a), "the last table serves: {a}");
    assert_eq!(router.generation(), generation);

    cluster.start_controller().await?;
    cluster.admin().scale("shop", "web", 0).await?;
    eventually!(Duration::from_secs(20), {
        match answer(http, "shop.example.com").await {
            a if a == NO_INSTANCE => Ok(()),
            other => Err(other),
        }
    });
    router.shutdown().await;
    cluster.shutdown().await?;
    Ok(())
}

/// A plain TCP route declared in a manifest: the router, fed by the
/// controller, listens on its port once the app is deployed, carries bytes
/// to the instance (a simulated one whose published address is a real echo
/// server on loopback), and closes the port when the app is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_port_route_from_a_manifest_is_served_then_closed() -> anyhow::Result<()> {
    init_tracing();
    let echo = TcpEcho::start("db-1").await?;
    let mut cluster = SimCluster::start(&[]).await?;
    let runtime = keel_agent::SimRuntime::new(keel_agent::SimConfig {
        first_host_port: echo.addr.port(),
        ..keel_agent::SimConfig::new("127.0.0.1")
    });
    cluster
        .add_node_with(
            NodeSpec::new("edge-1", "a").role("router"),
            "127.0.0.1",
            std::sync::Arc::new(runtime),
        )
        .await?;
    let router = follow(&cluster, false)?;
    let port = free_port()?;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    cluster
        .admin()
        .apply(&format!(
            "name: db\nproject: shop\nimage: postgres:17\n\
             ports:\n  - {{name: pg, port: 5432, protocol: tcp}}\n\
             routes:\n  - listen_port: {port}\n"
        ))
        .await?;
    let answer = eventually!(Duration::from_secs(15), {
        // Until the instance is ready the router accepts and closes.
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(listen).await?;
            stream.write_all(b"ping").await?;
            stream.shutdown().await?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await?;
            anyhow::Ok(answer)
        };
        match attempt.await {
            Ok(answer) if !answer.is_empty() => Ok(answer),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(answer, "pingdb-1 saw 4 bytes\n");

    cluster
        .admin()
        .call(reqwest::Method::DELETE, "/v1/projects/shop/apps/db", None)
        .await?;
    eventually!(Duration::from_secs(15), {
        match tokio::net::TcpStream::connect(listen).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            other => Err(format!("still listening: {other:?}")),
        }
    });
    router.shutdown().await;
    cluster.shutdown().await?;
    echo.stop();
    Ok(())
}

/// `count` backends on consecutive loopback ports (a simulated node gives
/// out published ports in order from its first), each named `b{port}`.
async fn consecutive_backends(count: u16) -> anyhow::Result<Vec<Backend>> {
    for attempt in 0..50u16 {
        let base = 20_000 + (std::process::id() as u16 % 200 + attempt * 211) % 200 * 150;
        let free = (base..base + count)
            .all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
        if !free {
            continue;
        }
        let mut backends = Vec::new();
        for port in base..base + count {
            match Backend::start_on(
                SocketAddr::from(([127, 0, 0, 1], port)),
                &format!("b{port}"),
            )
            .await
            {
                Ok(backend) => backends.push(backend),
                Err(_) => break,
            }
        }
        if backends.len() == usize::from(count) {
            return Ok(backends);
        }
        for backend in backends {
            backend.stop().await;
        }
    }
    anyhow::bail!("no {count} consecutive free loopback ports")
}

/// Scaled up and down through the controller's stream (3, 6, 1, 3, as a
/// user would), with clients leaving mid-request at every step: after
/// each step every instance the route table lists gets its share of
/// sequential requests, the one kept through the scale down included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_instance_gets_its_share_through_scaling() -> anyhow::Result<()> {
    init_tracing();
    const HOST: &str = "scale.example.com";
    // 3 + 3 started, 5 stopped, 2 started: 8 published ports, and spares.
    let backends = consecutive_backends(10).await?;
    let mut cluster = SimCluster::start(&[]).await?;
    let runtime = keel_agent::SimRuntime::new(keel_agent::SimConfig {
        first_host_port: backends[0].addr.port(),
        ..keel_agent::SimConfig::new("127.0.0.1")
    });
    cluster
        .add_node_with(
            NodeSpec::new("edge-1", "a").role("router"),
            "127.0.0.1",
            std::sync::Arc::new(runtime),
        )
        .await?;
    let router = follow(&cluster, false)?;
    let http = router.addresses().http.context("http")?;
    cluster
        .admin()
        .apply(&format!(
            "name: web\nproject: shop\nimage: nginx:1\ninstances: 3\n\
             ports:\n  - name: http\n    port: 8080\n\
             routes:\n  - host: {HOST}\n    port: http\n"
        ))
        .await?;
    let mut previous = std::collections::BTreeSet::new();
    for step in [3, 6, 1, 3] {
        if step != 3 || !previous.is_empty() {
            cluster.admin().scale("shop", "web", step).await?;
        }
        // The router's table lists as many instances as were asked for.
        let listed = eventually!(Duration::from_secs(20), {
            let listed: std::collections::BTreeSet<String> = metrics_text(&router)
                .await
                .map(|text| in_flight(&text).into_keys().collect())
                .unwrap_or_default();
            if listed.len() == step as usize && listed != previous {
                Ok(listed)
            } else {
                Err(format!(
                    "{} listed, {step} asked for: {listed:?}",
                    listed.len()
                ))
            }
        });
        let names: std::collections::BTreeSet<String> = listed
            .iter()
            .map(|addr| format!("b{}", addr.rsplit(':').next().unwrap_or_default()))
            .collect();
        // Clients that leave mid-request, one after another and at once.
        abandon(http, HOST, false).await?;
        abandon(http, HOST, true).await?;
        let burst: Vec<_> = (0..3)
            .map(|i| tokio::spawn(async move { abandon(http, HOST, i % 2 == 0).await }))
            .collect();
        for client in burst {
            client.await??;
        }
        wait_idle(&router).await?;
        let n = 10 * step as usize;
        let counts = shares(http, HOST, n).await?;
        assert_every_share(&counts, &names, n);
        previous = listed;
    }
    router.shutdown().await;
    cluster.shutdown().await?;
    for backend in backends {
        backend.stop().await;
    }
    Ok(())
}
