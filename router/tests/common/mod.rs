//! Shared test support: real backends on loopback (HTTP, upgrade echo, TLS
//! echo), route tables, a router started on free ports, and real clients
//! (curl, openssl, wrk) run as processes.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use keel_protocol::{RouteEntry, RouteTable, RouteTls};
use keel_router::{Limits, Router, RouterConfig, RouterHandle, TableSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// An HTTP backend on loopback that says who it is and what it got:
/// `name path x-forwarded-for=.. x-forwarded-proto=.. x-forwarded-host=..
/// x-request-id=..`. `/slow` answers after 500 ms; `/body` answers with the
/// length of the request body. An `Upgrade` request is answered 101 and the
/// connection then echoes bytes.
pub struct Backend {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> anyhow::Result<Backend> {
        Self::start_on("127.0.0.1:0".parse()?, name).await
    }

    pub async fn start_on(addr: SocketAddr, name: &str) -> anyhow::Result<Backend> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let name: Arc<str> = name.into();
        let task = tokio::spawn(async move {
            let mut connections = Vec::new();
            loop {
                let mut stop_rx2 = stop_rx.clone();
                let stopped = async move {
                    let _ = stop_rx2.wait_for(|s| *s).await;
                };
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = stopped => break,
                };
                let Ok((stream, _)) = accepted else { continue };
                let name = name.clone();
                let mut stop_rx = stop_rx.clone();
                connections.push(tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| serve(name.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades();
                    tokio::pin!(conn);
                    let stopped = async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    };
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = stopped => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                }));
            }
            for c in connections {
                let _ = c.await;
            }
        });
        Ok(Backend { addr, stop, task })
    }

    /// Stops gracefully: requests in flight finish, idle keep-alive
    /// connections are closed, the port is released.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn serve(
    name: Arc<str>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(hyper::header::CONNECTION, "upgrade".parse().expect("value"));
        headers.insert(hyper::header::UPGRADE, "websocket".parse().expect("value"));
        return Ok(response);
    }
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let text = format!(
        "{name} {} x-forwarded-for={} x-forwarded-proto={} x-forwarded-host={} x-request-id={}\n",
        req.uri().path(),
        header("x-forwarded-for"),
        header("x-forwarded-proto"),
        header("x-forwarded-host"),
        header("x-request-id"),
    );
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if req.uri().path() == "/body" {
        let body = req.into_body().collect().await?.to_bytes();
        return Ok(Response::new(Full::new(Bytes::from(format!(
            "{}\n",
            body.len()
        )))));
    }
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// A TLS server that echoes what it reads, prefixed with `echo:`, with a
/// self-signed certificate for `host`; returns its address and the
/// certificate's PEM.
pub async fn tls_echo(host: &str) -> anyhow::Result<(SocketAddr, String)> {
    let made = rcgen::generate_simple_self_signed(vec![host.to_owned()])?;
    let pem = made.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![made.cert.der().clone()], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut out = b"echo:".to_vec();
                    out.extend_from_slice(&buf[..n]);
                    if tls.write_all(&out).await.is_err() || tls.flush().await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok((addr, pem))
}

pub fn route(host: &str, path: &str, tls: RouteTls, backends: &[SocketAddr]) -> RouteEntry {
    RouteEntry {
        host: host.to_owned(),
        path: path.to_owned(),
        tls,
        project: "shop".to_owned(),
        app: "web".to_owned(),
        port: "http".to_owned(),
        protocol: "http".to_owned(),
        backends: backends.iter().map(|a| a.to_string()).collect(),
        redirect_https: false,
        hsts: false,
        listen_port: None,
    }
}

pub fn table(generation: i64, routes: Vec<RouteEntry>) -> RouteTable {
    RouteTable {
        generation,
        routes,
        certificates: Vec::new(),
    }
}

/// A router on free loopback ports (HTTP, HTTPS, metrics), one worker.
pub fn start_router(table: RouteTable, limits: Limits) -> anyhow::Result<RouterHandle> {
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    Ok(Router::start(RouterConfig {
        http_addr: Some(any),
        https_addr: Some(any),
        metrics_addr: Some(any),
        worker_threads: 1,
        source: TableSource::Fixed(table),
        limits,
        shutdown_grace_ms: 5_000,
        ..RouterConfig::default()
    })?)
}

/// Runs a client program to the end (on a blocking thread).
pub async fn run(program: &str, args: &[String]) -> anyhow::Result<Output> {
    let program = program.to_owned();
    let args = args.to_vec();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(keel_testing::tool(&program))
            .args(&args)
            .output()
            .with_context(|| format!("cannot run {program}"))
    })
    .await??;
    Ok(output)
}

/// `curl -sS` with `args`; returns (status code, body).
pub async fn curl(args: &[&str]) -> anyhow::Result<(u16, String)> {
    let mut full: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        "-w".into(),
        "\n%{http_code} %{http_version}".into(),
    ];
    full.extend(args.iter().map(|a| (*a).to_owned()));
    let output = run("curl", &full).await?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, tail) = stdout.rsplit_once('\n').with_context(|| {
        format!(
            "curl said: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let code: u16 = tail
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let version = tail.split_whitespace().nth(1).unwrap_or("");
    Ok((code, format!("{body}\nHTTP/{version}")))
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A plain TCP route on the router's `listen_port`.
pub fn tcp_route(listen_port: u16, backends: &[SocketAddr]) -> RouteEntry {
    RouteEntry {
        host: String::new(),
        port: "tcp".to_owned(),
        protocol: "tcp".to_owned(),
        listen_port: Some(listen_port),
        ..route("", "/", RouteTls::Off, backends)
    }
}

/// A TCP backend on loopback: echoes every chunk at once, and when the
/// client shuts down its sending half answers `{name} saw {n} bytes\n` and
/// closes. `connections` counts the connections it accepted.
pub struct TcpEcho {
    pub addr: SocketAddr,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpEcho {
    pub async fn start(name: &str) -> anyhow::Result<TcpEcho> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        let name: Arc<str> = name.into();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let name = name.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut total = 0usize;
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => {
                                total += n;
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                    let _ = stream
                        .write_all(format!("{name} saw {total} bytes\n").as_bytes())
                        .await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(TcpEcho {
            addr,
            connections,
            task,
        })
    }

    /// Stops accepting and releases the port (open connections run on).
    pub fn stop(self) {
        self.task.abort();
    }
}

/// A loopback port nothing listens on (free when this returns).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The router's `/metrics` text.
pub async fn metrics_text(router: &RouterHandle) -> anyhow::Result<String> {
    let addr = router.addresses().metrics.context("metrics")?;
    let (code, body) = curl(&[&format!("http://{addr}/metrics")]).await?;
    anyhow::ensure!(code == 200, "/metrics answered {code}: {body}");
    Ok(body)
}

/// The value of one sample in a `/metrics` text (`name{labels}` exactly).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Every instance's requests in flight, by address, from a `/metrics`
/// text (`keel_router_instance_requests_in_flight`).
pub fn in_flight(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    metrics
        .lines()
        .filter_map(|line| {
            let labels = line.strip_prefix("keel_router_instance_requests_in_flight{")?;
            let (labels, value) = labels.rsplit_once("} ")?;
            let instance = labels.split("instance=\"").nth(1)?.split('"').next()?;
            Some((instance.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Waits (up to 10 s) until no instance of the router has a request in
/// flight; fails naming the counts that stayed.
pub async fn wait_idle(router: &RouterHandle) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let counts = in_flight(&metrics_text(router).await?);
        anyhow::ensure!(!counts.is_empty(), "no instance in /metrics");
        if counts.values().all(|n| *n == 0.0) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "requests stay counted in flight after their clients left: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request to the backends' `/slow` (500 ms) whose client gives up after
/// 150 ms and closes its connection, over HTTP/1.1 or HTTP/2 (cleartext,
/// prior knowledge).
pub async fn abandon(http: SocketAddr, host: &str, http2: bool) -> anyhow::Result<()> {
    let url = format!("http://{host}:{}/slow", http.port());
    let resolve = format!("{host}:{}:{}", http.port(), http.ip());
    let version = if http2 {
        "--http2-prior-knowledge"
    } else {
        "--http1.1"
    };
    let output = run(
        "curl",
        &[
            "-sS".into(),
            "--max-time".into(),
            "0.15".into(),
            version.into(),
            "--resolve".into(),
            resolve,
            url,
        ],
    )
    .await?;
    // 28: curl's "operation timed out", i.e. it gave up as asked.
    anyhow::ensure!(
        output.status.code() == Some(28),
        "curl should have given up: {:?} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Sends `n` requests one after another (one keep-alive connection) and
/// counts which backend answered each, by the first word of its answer.
pub async fn shares(
    http: SocketAddr,
    host: &str,
    n: usize,
) -> anyhow::Result<std::collections::BTreeMap<String, usize>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let response = client
            .get(format!("http://{http}/"))
            .header("Host", host)
            .send()
            .await?;
        let status = response.status();
        let body = response.text().await?;
        anyhow::ensure!(status.is_success(), "{status}: {body}");
        let name = body
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        *counts.entry(name).or_insert(0) += 1;
    }
    Ok(counts)
}

/// Every one of `expected` backends got at least half its even share of
/// `n` sequential requests (and nothing else answered).
pub fn assert_every_share(
    counts: &std::collections::BTreeMap<String, usize>,
    expected: &std::collections::BTreeSet<String>,
    n: usize,
) {
    let floor = n / expected.len() / 2;
    let answered: std::collections::BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(
        &answered, expected,
        "the instances that answered {n} sequential requests: {counts:?}"
    );
    assert!(
        counts.values().all(|c| *c >= floor),
        "each instance should get about {} of {n} sequential requests (at least {floor}): {counts:?}",
        n / expected.len()
    );
}
