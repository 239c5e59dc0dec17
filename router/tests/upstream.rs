//! The router's HTTP/1.1 to instances, against scripted instances that
//! answer byte for byte what a test tells them: every way a response body
//! can be framed, connection reuse, and instances that drop requests or
//! close idle connections.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use common::*;
use keel_protocol::RouteTls;
use keel_router::{Limits, RouterHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a scripted instance does with one request.
#[derive(Clone, Copy)]
enum Reply {
    /// Writes these bytes and keeps the connection for the next request.
    Keep(&'static str),
    /// Writes these bytes and closes the connection.
    Close(&'static str),
    /// Writes these bytes, then closes the connection after a moment
    /// without saying so (an instance's idle timeout).
    CloseLater(&'static str),
    /// Closes the connection without answering.
    Drop,
}

/// An instance on loopback that reads whole requests (head and
/// `Content-Length` body) and answers each as `script` says for its
/// request line. It counts connections and requests.
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    async fn start(script: fn(&str) -> Reply) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, script, r.clone()));
            }
        });
        Ok(Self {
            addr,
            connections,
            requests,
            task,
        })
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, script: fn(&str) -> Reply, requests: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    loop {
        // One request head, then its body by Content-Length.
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_owned())
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + length);
        requests.fetch_add(1, Ordering::SeqCst);
        let line = head.lines().next().unwrap_or_default().to_owned();
        match script(&line) {
            Reply::Keep(bytes) => {
                if stream.write_all(bytes.as_bytes()).await.is_err() {
                    return;
                }
            }
            Reply::Close(bytes) => {
                let _ = stream.write_all(bytes.as_bytes()).await;
                return;
            }
            Reply::CloseLater(bytes) => {
                let _ = stream.write_all(bytes.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                return;
            }
            Reply::Drop => return,
        }
    }
}

/// A router with one route, `host` to `instance`, and its base URL.
fn route_to(host: &str, instance: SocketAddr) -> anyhow::Result<(RouterHandle, String)> {
    let router = start_router(
        table(1, vec![route(host, "/", RouteTls::Off, &[instance])]),
        Limits::default(),
    )?;
    let base = format!("http://{}", router.addresses().http.context("http")?);
    Ok((router, base))
}

fn framings(line: &str) -> Reply {
    if line.starts_with("GET /chunked ") {
        Reply::Keep(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;note=x\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n",
        )
    } else if line.starts_with("GET /close ") {
        Reply::Close("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
    } else if line.starts_with("GET /http10 ") {
        Reply::Close("HTTP/1.0 200 OK\r\n\r\nold style")
    } else if line.starts_with("GET /interim ") {
        Reply::Keep(
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
        )
    } else if line.starts_with("GET /nocontent ") {
        Reply::Keep("HTTP/1.1 204 No Content\r\n\r\n")
    } else if line.starts_with("GET /garbage ") {
        Reply::Close("SSH-2.0-OpenSSH_9.2\r\n\r\n")
    } else if line.starts_with("GET /short ") {
        Reply::Close("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    } else {
        // GET and HEAD /length, and POST bodies.
        Reply::Keep("HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-Instance: s\r\n\r\nhello, world")
    }
}

#[tokio::test]
async fn every_response_framing_reaches_the_client_intact() -> anyhow::Result<()> {
    let instance = Scripted::start(framings).await?;
    let (router, url) = route_to("f.test", instance.addr)?;
    let get = |path: &str| {
        let url = format!("{url}{path}");
        async move { curl(&["-H", "Host: f.test", &url]).await }
    };
    assert_eq!(
        get("/chunked").await?,
        (200, "hello world\nHTTP/1.1".into())
    );
    assert_eq!(
        get("/close").await?,
        (200, "until the end\nHTTP/1.1".into())
    );
    assert_eq!(get("/http10").await?, (200, "old style\nHTTP/1.1".into()));
    assert_eq!(get("/interim").await?, (200, "final\nHTTP/1.1".into()));
    assert_eq!(get("/nocontent").await?, (204, "\nHTTP/1.1".into()));
    assert_eq!(
        get("/length").await?,
        (200, "hello, world\nHTTP/1.1".into())
    );
    // The same through HTTP/2, which frames bodies its own way.
    let (code, body) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: f.test",
        &format!("{url}/chunked"),
    ])
    .await?;
    assert_eq!((code, body.as_str()), (200, "hello world\nHTTP/2"));
    // HEAD: the instance's length, no body.
    let (code, head) = curl(&["-I", "-H", "Host: f.test", &format!("{url}/length")]).await?;
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 12"),
        "{head}"
    );
    assert!(head.contains("x-instance: s"), "{head}");
    // What an instance gets wrong is a 502 (or a cut connection when the
    // body breaks off after the head went out), never a hang.
    let (code, body) = get("/garbage").await?;
    assert_eq!(
        (code, body.lines().next()),
        (502, Some("keel router: the instance failed to answer"))
    );
    let short = run(
        "curl",
        &[
            "-sS".into(),
            "--max-time".into(),
            "10".into(),
            "-H".into(),
            "Host: f.test".into(),
            format!("{url}/short"),
        ],
    )
    .await?;
    // curl says "partial file" (18) or "empty reply" (52), depending on
    // whether the head had gone out before the body broke off.
    assert!(
        matches!(short.status.code(), Some(18 | 52)),
        "curl sees the response cut short: {short:?}"
    );
    router.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn connections_to_an_instance_are_reused() -> anyhow::Result<()> {
    let instance = Scripted::start(framings).await?;
    let (router, base) = route_to("f.test", instance.addr)?;
    let url = format!("{base}/length");
    for i in 0..20 {
        // Each curl is a new client connection; the instance's is pooled.
        let (code, body) = if i % 2 == 0 {
            curl(&["-H", "Host: f.test", &url]).await?
        } else {
            curl(&["-H", "Host: f.test", "--data-binary", "some body", &url]).await?
        };
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(instance.requests.load(Ordering::SeqCst), 20);
    assert_eq!(
        instance.connections.load(Ordering::SeqCst),
        1,
        "one connection carried every request"
    );
    router.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn idle_connections_the_instance_closed_are_not_used() -> anyhow::Result<()> {
    // Every response claims keep-alive, and the instance closes the
    // connection 20 ms later: each request must find a fresh connection,
    // even one with a body, which the router could not send twice.
    let instance =
        Scripted::start(|_| Reply::CloseLater("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
            .await?;
    let (router, base) = route_to("i.test", instance.addr)?;
    let url = format!("{base}/");
    for _ in 0..10 {
        let (code, body) = curl(&["-H", "Host: i.test", "--data-binary", "payload", &url]).await?;
        assert_eq!((code, body.as_str()), (200, "ok\nHTTP/1.1"));
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(instance.requests.load(Ordering::SeqCst), 10);
    assert_eq!(instance.connections.load(Ordering::SeqCst), 10);
    router.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_dropped_request_is_retried_only_when_idempotent() -> anyhow::Result<()> {
    let dropper = Scripted::start(|_| Reply::Drop).await?;
    let good = Backend::start("good").await?;
    let router = start_router(
        table(
            1,
            vec![
                route("both.test", "/", RouteTls::Off, &[dropper.addr, good.addr]),
                route("drop.test", "/", RouteTls::Off, &[dropper.addr]),
            ],
        ),
        Limits::default(),
    )?;
    let url = format!("http://{}/", router.addresses().http.context("http")?);
    // GET and PUT may be sent twice: the other instance answers them all.
    for i in 0..10 {
        let method = if i % 2 == 0 { "GET" } else { "PUT" };
        let (code, body) = curl(&["-X", method, "-H", "Host: both.test", &url]).await?;
        assert_eq!(code, 200, "{method}: {body}");
        assert!(body.starts_with("good "), "{body}");
    }
    assert!(
        dropper.requests.load(Ordering::SeqCst) > 0,
        "the dropping instance was tried"
    );
    // A POST is not sent again: the instance may have acted on it.
    let before = dropper.requests.load(Ordering::SeqCst);
    let (code, body) = curl(&["-X", "POST", "-H", "Host: drop.test", &url]).await?;
    assert_eq!(
        (code, body.lines().next()),
        (502, Some("keel router: the instance failed to answer"))
    );
    assert_eq!(dropper.requests.load(Ordering::SeqCst), before + 1);
    // With no other instance, a GET ends in a 502 too, after one retry.
    let (code, _) = curl(&["-H", "Host: drop.test", &url]).await?;
    assert_eq!(code, 502);
    router.shutdown().await;
    good.stop().await;
    Ok(())
}
