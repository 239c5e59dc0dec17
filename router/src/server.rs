//! Listeners and workers: each worker thread has its own event loop and
//! its own listening sockets (SO_REUSEPORT, so the kernel spreads
//! connections), and serves every connection it accepts to the end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::RouterError;
use crate::proxy::{ConnInfo, Shared, handle};
use crate::tls::{Prefixed, read_client_hello, sni};

/// Binds `addr` so that several workers can listen on it.
pub(crate) fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, RouterError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_error = |source| RouterError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(bind_error)?;
    socket.set_reuse_address(true).map_err(bind_error)?;
    socket.set_reuse_port(true).map_err(bind_error)?;
    socket.set_nonblocking(true).map_err(bind_error)?;
    socket.bind(&addr.into()).map_err(bind_error)?;
    socket.listen(4096).map_err(bind_error)?;
    Ok(socket.into())
}

/// What one worker serves.
#[derive(Debug)]
pub(crate) struct WorkerListeners {
    pub http: Option<std::net::TcpListener>,
    pub https: Option<std::net::TcpListener>,
}

/// Decrements the active connection count when the connection ends, and
/// holds the worker's drain channel open until then.
struct Active {
    shared: Arc<Shared>,
    _drain: mpsc::Sender<()>,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.shared
            .global
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

fn http_builder(shared: &Shared) -> auto::Builder<TokioExecutor> {
    let limits = &shared.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .max_buf_size(limits.max_header_bytes.max(8192))
        // One flat buffer and send(2) rather than writev(2): a response
        // head and a small body are copied once in user space, which costs
        // less than the kernel's vectored path (measured with perf).
        .writev(false)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_millis(limits.idle_timeout_ms / 2))
        .keep_alive_timeout(Duration::from_millis(limits.idle_timeout_ms / 2));
    builder
}

/// Runs worker `index` until `stop`, then drains for up to `grace`.
pub(crate) fn run_worker(
    index: usize,
    shared: Arc<Shared>,
    listeners: WorkerListeners,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: watch::Receiver<bool>,
    grace: Duration,
) -> Result<(), RouterError> {
    crate::pool::set_worker(index);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RouterError::Runtime)?;
    runtime.block_on(async move {
        let builder = Arc::new(http_builder(&shared));
        let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
        let mut loops = Vec::new();
        if let Some(listener) = listeners.http {
            let listener = TcpListener::from_std(listener).map_err(RouterError::Runtime)?;
            loops.push(tokio::spawn(accept_loop(
                listener,
                shared.clone(),
                builder.clone(),
                None,
                stop.clone(),
                drain_tx.clone(),
            )));
        }
        if let Some(listener) = listeners.https {
            let listener = TcpListener::from_std(listener).map_err(RouterError::Runtime)?;
            loops.push(tokio::spawn(accept_loop(
                listener,
                shared.clone(),
                builder.clone(),
                tls,
                stop.clone(),
                drain_tx.clone(),
            )));
        }
        drop(drain_tx);
        for accept in loops {
            let _ = accept.await;
        }
        // Every connection holds a sender: `recv` returns `None` once the
        // last one has finished.
        let _ = tokio::time::timeout(grace, drain_rx.recv()).await;
        Ok(())
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
    drain: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = crate::stopped(&mut stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, usually: wait rather than spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let global = &shared.global;
        let open = global.active_connections.fetch_add(1, Ordering::Relaxed);
        let active = Active {
            shared: shared.clone(),
            _drain: drain.clone(),
        };
        if open >= shared.limits.max_connections as i64 {
            global.connections_refused.fetch_add(1, Ordering::Relaxed);
            drop(active);
            continue;
        }
        global.connections_total.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let client_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let shared = shared.clone();
        let builder = builder.clone();
        let stop = stop.clone();
        match &tls {
            None => {
                tokio::spawn(async move {
                    let info = Arc::new(ConnInfo {
                        client_ip,
                        tls: false,
                    });
                    serve_http(TokioIo::new(stream), shared, info, &builder, stop).await;
                    drop(active);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    serve_tls(stream, client_ip, shared, acceptor, &builder, stop).await;
                    drop(active);
                });
            }
        }
    }
}

async fn serve_http<I>(
    io: TokioIo<I>,
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    builder: &auto::Builder<TokioExecutor>,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| handle(shared.clone(), info.clone(), req));
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = crate::stopped(&mut stop) => {
            // Finish what is in flight, take nothing new.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

async fn serve_tls(
    mut stream: TcpStream,
    client_ip: HeaderValue,
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    builder: &auto::Builder<TokioExecutor>,
    stop: watch::Receiver<bool>,
) {
    let handshake_timeout = Duration::from_millis(shared.limits.header_read_timeout_ms);
    let hello = match tokio::time::timeout(handshake_timeout, read_client_hello(&mut stream)).await
    {
        Ok(Ok(hello)) => hello,
        Ok(Err(error)) => {
            tracing::debug!(%error, "no TLS ClientHello");
            return;
        }
        Err(_) => return,
    };
    let host = sni(&hello);
    let passthrough = host.as_deref().and_then(|host| {
        let table = shared.table.load();
        table
            .for_sni(host)
            .filter(|r| r.tls == keel_protocol::RouteTls::Passthrough)
            .cloned()
    });
    if let Some(route) = passthrough {
        passthrough_connection(stream, hello, &shared, &route).await;
        return;
    }
    let tls = match tokio::time::timeout(
        handshake_timeout,
        acceptor.accept(Prefixed::new(hello, stream)),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%error, host = host.as_deref(), "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let info = Arc::new(ConnInfo {
        client_ip,
        tls: true,
    });
    serve_http(TokioIo::new(tls), shared, info, builder, stop).await;
}

/// Carries a TLS stream to an instance untouched.
async fn passthrough_connection(
    mut client: TcpStream,
    hello: Vec<u8>,
    shared: &Shared,
    route: &Arc<crate::table::Route>,
) {
    let start = std::time::Instant::now();
    let now_ms = shared.now_ms();
    let mut failed = None;
    for _ in 0..2 {
        let Some(backend) = route.pick(shared.balance, now_ms, failed.as_ref()).cloned() else {
            break;
        };
        let connected = crate::upstream::connect_stream(
            backend.socket,
            &backend.addr,
            Duration::from_millis(shared.limits.connect_timeout_ms),
        )
        .await;
        let mut instance = match connected {
            Ok(instance) => instance,
            Err(_) => {
                route.metrics.upstream_error();
                backend.down_until_ms.store(
                    shared.now_ms() + shared.limits.backend_down_ms,
                    Ordering::Relaxed,
                );
                tracing::warn!(route = %route.label, upstream = %backend.addr, "instance unreachable; skipping it for a while");
                failed = Some(backend);
                continue;
            }
        };
        let _ = instance.set_nodelay(true);
        let in_flight = crate::table::InFlight::new(backend.clone());
        let copied = async {
            instance.write_all(&hello).await?;
            tokio::io::copy_bidirectional(&mut client, &mut instance).await
        }
        .await;
        drop(in_flight);
        tracing::info!(
            target: "keel_router::access",
            route = %route.label,
            upstream = %backend.addr,
            passthrough = true,
            bytes_in = copied.as_ref().map_or(0, |c| c.0),
            bytes_out = copied.as_ref().map_or(0, |c| c.1),
            duration_us = start.elapsed().as_micros() as u64,
        );
        return;
    }
    // No instance: close; TLS has no way to say 503 without a certificate.
    tracing::info!(
        target: "keel_router::access",
        route = %route.label,
        passthrough = true,
        "no reachable instance; connection closed"
    );
}

/// What the control listener answers: `/metrics` (Prometheus text),
/// `/healthz` (the process serves: always 200) and `/readyz` (200 once the
/// router has a route table, from its file or from the controller at
/// least once; 503 before), each with a short body that says why.
fn control_answer(path: &str, shared: &Shared) -> (hyper::StatusCode, &'static str, String) {
    use hyper::StatusCode;
    const TEXT: &str = "text/plain; charset=utf-8";
    let table = shared.table.load();
    match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::metrics::render(&shared.global, &table),
        ),
        "/healthz" => (StatusCode::OK, TEXT, "ok: the router is serving\n".into()),
        "/readyz" => match (table.generation, shared.stream_error()) {
            (Some(generation), None) => (
                StatusCode::OK,
                TEXT,
                format!("ready: serving route table generation {generation}\n"),
            ),
            (Some(generation), Some(error)) => (
                StatusCode::OK,
                TEXT,
                format!(
                    "ready: serving route table generation {generation}; \
                     the controller stream is down ({error}), reconnecting\n"
                ),
            ),
            (None, None) => (
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "not ready: no route table received from the controller yet\n".into(),
            ),
            (None, Some(error)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!(
                    "not ready: no route table received from the controller yet; \
                     last error: {error}\n"
                ),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `stop`.
pub(crate) async fn serve_metrics(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = crate::stopped(&mut stop) => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (status, content_type, body) = control_answer(req.uri().path(), &shared);
                    let mut response =
                        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                    *response.status_mut() = status;
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        HeaderValue::from_static(content_type),
                    );
                    std::future::ready(Ok::<_, std::convert::Infallible>(response))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
