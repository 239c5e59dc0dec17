//! The router with real clients: curl over HTTP/1.1, HTTP/2 (TLS by ALPN
//! and cleartext prior knowledge), openssl through a passthrough route, an
//! upgraded connection, the router's own answers, limits and shutdown.

mod common;

use std::time::{Duration, Instant};

use anyhow::Context;
use common::*;
use keel_protocol::{RouteCertificate, RouteTls};
use keel_router::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn http1_and_http2_reach_the_instance_with_forwarding_headers() -> anyhow::Result<()> {
    init_tracing();
    let backend = Backend::start("b1").await?;
    let router = start_router(
        table(
            1,
            vec![route(
                "app.example.com",
                "/",
                RouteTls::Terminate,
                &[backend.addr],
            )],
        ),
        Limits::default(),
    )?;
    let http = router.addresses().http.context("http")?;
    let https = router.addresses().https.context("https")?;

    let (code, body) = curl(&[
        "-H",
        "Host: app.example.com",
        "-H",
        "X-Forwarded-For: 10.1.2.3",
        &format!("http://{http}/some/path"),
    ])
    .await?;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("b1 /some/path "), "{body}");
    assert!(
        body.contains("x-forwarded-for=10.1.2.3, 127.0.0.1 "),
        "{body}"
    );
    assert!(body.contains("x-forwarded-proto=http "), "{body}");
    assert!(body.contains("x-forwarded-host=app.example.com "), "{body}");
    assert!(
        !body.contains("x-request-id=-"),
        "a request id is added: {body}"
    );
    assert!(body.ends_with("HTTP/1.1"), "{body}");

    // HTTP/2 over TLS, chosen by ALPN, the host by SNI.
    let resolve = format!("app.example.com:{}:127.0.0.1", https.port());
    let (code, body) = curl(&[
        "--http2",
        "-k",
        "--resolve",
        &resolve,
        &format!("https://app.example.com:{}/x", https.port()),
    ])
    .await?;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("b1 /x "), "{body}");
    assert!(body.contains("x-forwarded-proto=https "), "{body}");
    assert!(body.ends_with("HTTP/2"), "{body}");

    // HTTP/2 in clear text, by prior knowledge; the request id is kept.
    let (code, body) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "X-Request-Id: abc123",
        &format!("http://app.example.com:{}/h2c", http.port()),
        "--resolve",
        &format!("app.example.com:{}:127.0.0.1", http.port()),
    ])
    .await?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("x-request-id=abc123\n"), "{body}");
    assert!(body.ends_with("HTTP/2"), "{body}");

    router.shutdown().await;
    backend.stop().await;
    Ok(())
}

#[tokio::test]
async fn routes_by_host_wildcard_and_longest_path() -> anyhow::Result<()> {
    let a = Backend::start("root").await?;
    let b = Backend::start("api").await?;
    let c = Backend::start("wild").await?;
    let router = start_router(
        table(
            1,
            vec![
                route("shop.test", "/", RouteTls::Off, &[a.addr]),
                route("shop.test", "/api", RouteTls::Off, &[b.addr]),
                route("*.shop.test", "/", RouteTls::Off, &[c.addr]),
            ],
        ),
        Limits::default(),
    )?;
    let http = router.addresses().http.context("http")?;
    let url = format!("http://{http}");
    for (host, path, expect) in [
        ("shop.test", "/", "root"),
        ("shop.test", "/api/v1", "api"),
        ("shop.test", "/apiary", "root"),
        ("SHOP.test:80", "/api", "api"),
        ("eu.shop.test", "/api", "wild"),
    ] {
        let (code, body) = curl(&["-H", &format!("Host: {host}"), &format!("{url}{path}")]).await?;
        assert_eq!(code, 200, "{host}{path}: {body}");
        assert!(
            body.starts_with(&format!("{expect} ")),
            "{host}{path}: {body}"
        );
    }
    let (code, body) = curl(&["-H", "Host: a.eu.shop.test", &format!("{url}/")]).await?;
    assert_eq!(code, 404, "a wildcard matches one label only: {body}");
    router.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_router_says_why_with_404_503_502_and_413() -> anyhow::Result<()> {
    let backend = Backend::start("b").await?;
    // A port nothing listens on: bind, learn, release.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let router = start_router(
        table(
            1,
            vec![
                route("empty.test", "/", RouteTls::Off, &[]),
                route("dead.test", "/", RouteTls::Off, &[dead]),
                route("half.test", "/", RouteTls::Off, &[dead, backend.addr]),
            ],
        ),
        Limits {
            max_body_bytes: 1_000,
            ..Limits::default()
        },
    )?;
    let url = format!("http://{}", router.addresses().http.context("http")?);
    let (code, body) = curl(&["-H", "Host: nowhere.test", &url]).await?;
    assert_eq!(
        (code, body.lines().next()),
        (404, Some("keel router: no route for this host"))
    );
    let (code, body) = curl(&["-H", "Host: empty.test", &url]).await?;
    assert_eq!(
        (code, body.lines().next()),
        (503, Some("keel router: no ready instance for this route"))
    );
    let started = Instant::now();
    let (code, body) = curl(&["-H", "Host: dead.test", &url]).await?;
    assert_eq!(
        (code, body.lines().next()),
        (
            502,
            Some("keel router: no instance of this route could be reached")
        )
    );
    assert!(started.elapsed() < Duration::from_secs(3), "no hang");
    // One instance refuses: every request is retried on the other.
    for _ in 0..10 {
        let (code, body) = curl(&["-H", "Host: half.test", &url]).await?;
        assert_eq!(code, 200, "{body}");
    }
    let big = "x".repeat(2_000);
    let (code, body) = curl(&[
        "-H",
        "Host: half.test",
        "--data-binary",
        &big,
        &format!("{url}/body"),
    ])
    .await?;
    assert_eq!(code, 413, "{body}");
    let (code, body) = curl(&[
        "-H",
        "Host: half.test",
        "--data-binary",
        "small",
        &format!("{url}/body"),
    ])
    .await?;
    assert_eq!((code, body.lines().next()), (200, Some("5")));

    // What happened shows in /metrics.
    let metrics = format!(
        "http://{}/metrics",
        router.addresses().metrics.context("metrics")?
    );
    let (code, text) = curl(&[&metrics]).await?;
    assert_eq!(code, 200);
    assert!(
        text.contains("keel_router_requests_total{route=\"half.test/\",status=\"200\"} 11"),
        "{text}"
    );
    assert!(
        text.contains("keel_router_requests_total{route=\"dead.test/\",status=\"502\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("keel_router_unrouted_requests_total 1"),
        "{text}"
    );
    assert!(
        text.contains("keel_router_request_duration_seconds_count{route=\"half.test/\"} 12"),
        "{text}"
    );
    router.shutdown().await;
    backend.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_slow_client_is_cut_off_after_the_header_timeout() -> anyhow::Result<()> {
    let router = start_router(
        table(1, vec![]),
        Limits {
            header_read_timeout_ms: 300,
            ..Limits::default()
        },
    )?;
    let mut stream = TcpStream::connect(router.addresses().http.context("http")?).await?;
    let started = Instant::now();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the router must close the connection");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250),
        "closed too early: {elapsed:?}"
    );
    router.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_upgraded_connection_carries_bytes_both_ways() -> anyhow::Result<()> {
    let backend = Backend::start("ws").await?;
    let router = start_router(
        table(
            1,
            vec![route("ws.test", "/", RouteTls::Off, &[backend.addr])],
        ),
        Limits::default(),
    )?;
    let mut stream = TcpStream::connect(router.addresses().http.context("http")?).await?;
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for message in [&b"hello"[..], b"second frame"] {
        stream.write_all(message).await?;
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await??;
        assert_eq!(back, message);
    }
    router.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn tls_passthrough_reaches_the_instance_undecrypted() -> anyhow::Result<()> {
    let (echo, _pem) = tls_echo("secure.test").await?;
    let backend = Backend::start("plain").await?;
    let router = start_router(
        table(
            1,
            vec![
                route("secure.test", "/", RouteTls::Passthrough, &[echo]),
                route("other.test", "/", RouteTls::Terminate, &[backend.addr]),
            ],
        ),
        Limits::default(),
    )?;
    let https = router.addresses().https.context("https")?;
    // timeout(1) finds openssl on the PATH; this names its package if not.
    keel_testing::tool("openssl");
    let output = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(keel_testing::tool("timeout"))
            .args([
                "10",
                "openssl",
                "s_client",
                "-quiet",
                "-no_ign_eof",
                "-connect",
                &https.to_string(),
                "-servername",
                "secure.test",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(stdin) = child.stdin.as_mut() {
            stdin.write_all(b"ping\n")?;
        }
        std::thread::sleep(Duration::from_millis(500));
        drop(child.stdin.take());
        child.wait_with_output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.contains("echo:ping"),
        "stdout: {stdout} stderr: {stderr}"
    );
    // The certificate is the instance's (rcgen's default subject), not one
    // the router made.
    assert!(stderr.contains("rcgen self signed cert"), "{stderr}");
    router.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn stored_certificates_are_served_by_sni_else_self_signed() -> anyhow::Result<()> {
    let backend = Backend::start("b").await?;
    let dir = tempfile::tempdir()?;
    let made = rcgen::generate_simple_self_signed(vec!["stored.test".to_owned()])?;
    let ca = dir.path().join("stored.pem");
    std::fs::write(&ca, made.cert.pem())?;
    let mut wire = table(
        1,
        vec![
            route("stored.test", "/", RouteTls::Terminate, &[backend.addr]),
            route("fresh.test", "/", RouteTls::Terminate, &[backend.addr]),
        ],
    );
    wire.certificates.push(RouteCertificate {
        host: "stored.test".into(),
        cert_pem: made.cert.pem(),
        key_pem: made.signing_key.serialize_pem(),
    });
    let router = start_router(wire, Limits::default())?;
    let port = router.addresses().https.context("https")?.port();
    // Verified against the stored certificate: it is the one served.
    let (code, body) = curl(&[
        "--cacert",
        &ca.display().to_string(),
        "--resolve",
        &format!("stored.test:{port}:127.0.0.1"),
        &format!("https://stored.test:{port}/"),
    ])
    .await?;
    assert_eq!(code, 200, "{body}");
    // Another host gets its own self-signed certificate, which the stored
    // one's CA does not verify.
    let (code, _) = curl(&[
        "--cacert",
        &ca.display().to_string(),
        "--resolve",
        &format!("fresh.test:{port}:127.0.0.1"),
        &format!("https://fresh.test:{port}/"),
    ])
    .await?;
    assert_eq!(code, 0, "verification must fail");
    let (code, body) = curl(&[
        "-k",
        "-v",
        "--resolve",
        &format!("fresh.test:{port}:127.0.0.1"),
        &format!("https://fresh.test:{port}/"),
    ])
    .await?;
    assert_eq!(code, 200, "{body}");
    router.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() -> anyhow::Result<()> {
    let backend = Backend::start("b").await?;
    let router = start_router(
        table(
            1,
            vec![route("slow.test", "/", RouteTls::Off, &[backend.addr])],
        ),
        Limits::default(),
    )?;
    let http = router.addresses().http.context("http")?;
    let url = format!("http://{http}/slow");
    let slow = tokio::spawn(async move { curl(&["-H", "Host: slow.test", &url]).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    router.shutdown().await;
    let (code, body) = slow.await??;
    assert_eq!(code, 200, "the request in flight completes: {body}");
    assert!(
        TcpStream::connect(http).await.is_err(),
        "nothing listens after shutdown"
    );
    Ok(())
}

#[tokio::test]
async fn bad_configuration_is_a_clear_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("routes.json");
    std::fs::write(&path, r#"{"generation": 1, "routes": [], "extra": true}"#)?;
    let error = keel_router::Router::start(keel_router::RouterConfig {
        http_addr: Some("127.0.0.1:0".parse()?),
        https_addr: None,
        source: keel_router::TableSource::file(&path),
        ..keel_router::RouterConfig::default()
    })
    .err()
    .context("a bad table must not start")?;
    let message = format!(
        "{error}: {}",
        std::error::Error::source(&error)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(message.contains("routes.json"), "{message}");
    assert!(message.contains("unknown field `extra`"), "{message}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let error = keel_router::Router::start(keel_router::RouterConfig {
        http_addr: Some(addr),
        https_addr: None,
        ..keel_router::RouterConfig::default()
    })
    .err()
    .context("a taken port must not start")?;
    assert_eq!(error.to_string(), format!("cannot listen on {addr}"));

    let error =
        serde_json::from_str::<keel_router::RouterConfig>(r#"{"limits": {"max_body_mb": 1}}"#)
            .err()
            .context("unknown config fields are errors")?;
    assert!(
        error.to_string().contains("unknown field `max_body_mb`"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn a_route_can_redirect_to_https_and_send_hsts() -> anyhow::Result<()> {
    let backend = Backend::start("b").await?;
    let mut secure = route("secure.test", "/", RouteTls::Terminate, &[backend.addr]);
    secure.redirect_https = true;
    secure.hsts = true;
    let router = start_router(table(1, vec![secure]), Limits::default())?;
    let http = router.addresses().http.context("http")?;
    let port = router.addresses().https.context("https")?.port();
    let (code, body) = curl(&[
        "-i",
        "-H",
        "Host: secure.test",
        &format!("http://{http}/a/b?c=d"),
    ])
    .await?;
    assert_eq!(code, 308, "{body}");
    assert!(
        body.to_lowercase()
            .contains("location: https://secure.test/a/b?c=d"),
        "{body}"
    );
    let (code, body) = curl(&[
        "-k",
        "-i",
        "--resolve",
        &format!("secure.test:{port}:127.0.0.1"),
        &format!("https://secure.test:{port}/"),
    ])
    .await?;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.to_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{body}"
    );
    router.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once() -> anyhow::Result<()> {
    let backend = Backend::start("b").await?;
    let router = start_router(
        table(
            1,
            vec![route("app.test", "/", RouteTls::Off, &[backend.addr])],
        ),
        Limits {
            max_connections: 2,
            ..Limits::default()
        },
    )?;
    let http = router.addresses().http.context("http")?;
    let first = TcpStream::connect(http).await?;
    let _second = TcpStream::connect(http).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(http).await?;
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), third.read_to_end(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the third connection is closed: {closed:?}"
    );
    // Room again once one closes.
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (code, body) = curl(&["-H", "Host: app.test", &format!("http://{http}/")]).await?;
    assert_eq!(code, 200, "{body}");
    let metrics = format!(
        "http://{}/metrics",
        router.addresses().metrics.context("metrics")?
    );
    let (_, text) = curl(&[&metrics]).await?;
    assert!(
        text.contains("keel_router_connections_refused_total 1"),
        "{text}"
    );
    router.shutdown().await;
    Ok(())
}
