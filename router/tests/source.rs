//! The router's table source as a supervisor sees it: `/healthz` and
//! `/readyz` on the metrics listener, and a controller stream that sends a
//! line longer than the router accepts (it must not buffer it without
//! bound, but drop the connection, say why, and connect again).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use common::*;
use keel_agent::eventually;
use keel_router::{ControllerSource, Limits, Router, RouterConfig, TableSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// `GET path` on the router's metrics listener: (status, body).
async fn control(router: &keel_router::RouterHandle, path: &str) -> anyhow::Result<(u16, String)> {
    let addr = router.addresses().metrics.context("metrics")?;
    let (code, body) = curl(&[&format!("http://{addr}{path}")]).await?;
    Ok((code, body))
}

#[tokio::test]
async fn a_router_with_a_table_is_healthy_and_ready() -> anyhow::Result<()> {
    init_tracing();
    let router = start_router(table(3, vec![]), Limits::default())?;
    let (code, body) = control(&router, "/healthz").await?;
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ok"), "{body}");
    let (code, body) = control(&router, "/readyz").await?;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("ready: serving route table generation 3"),
        "{body}"
    );
    let (code, body) = control(&router, "/nope").await?;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("/readyz"), "{body}");
    router.shutdown().await;
    Ok(())
}

/// What the fake controller saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// Bytes of the over-long line written before the router hung up.
    first_sent: AtomicU64,
}

/// How much of the over-long line the fake controller offers at most.
const OFFERED: u64 = 256 * 1024 * 1024;

/// A controller that answers `GET /v1/routes/watch`: on the first
/// connection with one line that never ends (up to [`OFFERED`] bytes), on
/// the next ones, once `go` is notified, with a valid table.
async fn fake_controller(seen: Arc<Seen>, go: Arc<Notify>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let n = seen.connections.fetch_add(1, Ordering::SeqCst);
            let (seen, go) = (seen.clone(), go.clone());
            tokio::spawn(async move {
                let _ = answer(stream, n, &seen, &go).await;
            });
        }
    });
    Ok(addr)
}

async fn answer(mut stream: TcpStream, n: usize, seen: &Seen, go: &Notify) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut buf).await?;
        anyhow::ensure!(read > 0, "closed before a request");
        head.extend_from_slice(&buf[..read]);
    }
    if n > 0 {
        go.notified().await;
    }
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await?;
    if n > 0 {
        let line = b"{\"generation\":7,\"routes\":[],\"certificates\":[]}\n";
        stream
            .write_all(format!("{:x}\r\n", line.len()).as_bytes())
            .await?;
        stream.write_all(line).await?;
        stream.write_all(b"\r\n").await?;
        // Held open, as the controller holds its stream.
        tokio::time::sleep(Duration::from_secs(60)).await;
        return Ok(());
    }
    let chunk = vec![b'x'; 64 * 1024];
    let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
    framed.extend_from_slice(&chunk);
    framed.extend_from_slice(b"\r\n");
    let mut sent = 0;
    while sent < OFFERED {
        if stream.write_all(&framed).await.is_err() {
            break;
        }
        sent += chunk.len() as u64;
        seen.first_sent.store(sent, Ordering::SeqCst);
    }
    // Everything offered and the router still reading: hold it open.
    tokio::time::sleep(Duration::from_secs(60)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_line_is_dropped_named_and_followed_by_a_reconnect() -> anyhow::Result<()> {
    init_tracing();
    let seen = Arc::new(Seen::default());
    let go = Arc::new(Notify::new());
    let controller = fake_controller(seen.clone(), go.clone()).await?;
    let max_line_bytes: u64 = 1024 * 1024;
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let router = Router::start(RouterConfig {
        http_addr: Some(any),
        https_addr: None,
        metrics_addr: Some(any),
        worker_threads: 1,
        source: TableSource::Controller(ControllerSource {
            url: format!("http://{controller}"),
            token: "t".into(),
            node: "edge-1".into(),
            reconnect_max_ms: 200,
            silence_timeout_ms: 30_000,
            max_line_bytes,
        }),
        ..RouterConfig::default()
    })?;
    let (code, body) = control(&router, "/healthz").await?;
    assert_eq!(code, 200, "{body}");

    // The router hangs up on the line and comes back for another table.
    eventually!(Duration::from_secs(20), {
        match seen.connections.load(Ordering::SeqCst) {
            n if n >= 2 => Ok(()),
            _ => Err(format!(
                "no reconnect yet; {} bytes of one line sent",
                seen.first_sent.load(Ordering::SeqCst)
            )),
        }
    });
    // What it took of the line is the limit and what the sockets hold,
    // not everything it was offered.
    let sent = seen.first_sent.load(Ordering::SeqCst);
    assert!(
        sent <= max_line_bytes + 32 * 1024 * 1024,
        "the router read {sent} bytes of one line"
    );
    // Not ready, and it says why, naming the limit.
    let (code, body) = control(&router, "/readyz").await?;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("no route table") && body.contains("max_line_bytes (1048576 bytes)"),
        "{body}"
    );
    let (code, body) = control(&router, "/healthz").await?;
    assert_eq!(code, 200, "{body}");

    // A good table on the new connection: ready.
    go.notify_waiters();
    go.notify_one();
    eventually!(Duration::from_secs(10), {
        match control(&router, "/readyz").await {
            Ok((200, body)) if body.contains("generation 7") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(router.generation(), Some(7));
    router.shutdown().await;
    Ok(())
}
