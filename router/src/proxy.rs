//! The request path: find the route, pick an instance, forward on a pooled
//! connection, give the connection back when the response is read.
//!
//! Every answer the router makes itself is short plain text that says why:
//! 404 (no route for the host), 503 (no ready instance, or no table yet),
//! 502 (the instance failed), 504 (the instance did not answer in time),
//! 413 (body too large).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::{Balance, Limits};
use crate::metrics::Global;
use crate::pool::UpBody;
use crate::table::{Backend, Registry, Route, Table, normalize_host};

pub(crate) type RespBody = Either<UpstreamBody, Full<Bytes>>;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// State shared by every worker.
#[derive(Debug)]
pub(crate) struct Shared {
    pub table: arc_swap::ArcSwap<Table>,
    pub registry: Registry,
    pub balance: Balance,
    pub limits: Limits,
    pub global: Global,
    epoch: Instant,
    request_ids: AtomicU64,
    /// Random per start, so request ids of two routers never collide.
    id_prefix: u64,
}

impl Shared {
    pub fn new(balance: Balance, limits: Limits) -> Self {
        use std::hash::{BuildHasher, RandomState};
        Self {
            table: arc_swap::ArcSwap::from_pointee(Table::default()),
            registry: Registry::default(),
            balance,
            limits,
            global: Global::default(),
            epoch: Instant::now(),
            request_ids: AtomicU64::new(0),
            id_prefix: RandomState::new().hash_one(std::process::id()),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn swap(&self, wire: &keel_protocol::RouteTable) {
        let table = self
            .registry
            .compile(wire, self.limits.max_idle_per_backend);
        self.table.store(Arc::new(table));
    }

    fn request_id(&self) -> HeaderValue {
        let n = self.request_ids.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:016x}{:08x}", self.id_prefix, n);
        HeaderValue::from_maybe_shared(Bytes::from(id))
            .unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

/// What a request needs to know about its client connection.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    /// The client's IP, ready to go into `X-Forwarded-For`.
    pub client_ip: HeaderValue,
    pub tls: bool,
}

fn text(status: StatusCode, body: &'static str) -> Response<RespBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Serves one request; never fails (failures are answers).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    let host = req.uri().host().or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let Some(host) = host else {
        shared.global.unrouted.fetch_add(1, Ordering::Relaxed);
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "keel router: the request names no host\n",
        ));
    };
    let host = normalize_host(host);
    let found = {
        let table = shared.table.load();
        if table.generation.is_none() {
            Err(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "keel router: no route table yet\n",
            ))
        } else {
            table.find(&host, req.uri().path()).cloned().ok_or_else(|| {
                text(
                    StatusCode::NOT_FOUND,
                    "keel router: no route for this host\n",
                )
            })
        }
    };
    let route = match found {
        Ok(route) => route,
        Err(response) => {
            shared.global.unrouted.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                target: "keel_router::access",
                host = %host,
                path = req.uri().path(),
                status = response.status().as_u16(),
                "no route"
            );
            return Ok(response);
        }
    };
    if route.redirect_https && !conn.tls {
        let target = format!(
            "https://{host}{}",
            req.uri().path_and_query().map_or("/", |p| p.as_str())
        );
        let mut response = text(
            StatusCode::PERMANENT_REDIRECT,
            "keel router: this route is served over HTTPS only\n",
        );
        if let Ok(location) = HeaderValue::from_str(&target) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        route
            .metrics
            .record(response.status().as_u16(), start.elapsed());
        return Ok(response);
    }
    drop(host);
    let method = req.method().clone();
    let mut upstream = None;
    let mut response = forward(&shared, &conn, &route, req, &mut upstream).await;
    if route.hsts && conn.tls {
        response.headers_mut().insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    let elapsed = start.elapsed();
    route.metrics.record(response.status().as_u16(), elapsed);
    tracing::info!(
        target: "keel_router::access",
        route = %route.label,
        method = %method,
        status = response.status().as_u16(),
        upstream = upstream.as_ref().map_or("-", |b: &Arc<Backend>| b.addr.as_str()),
        duration_us = elapsed.as_micros() as u64,
    );
    Ok(response)
}

/// Why an instance could not be reached; the instance counts as down.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("connecting timed out")]
    Timeout,
    #[error("connecting failed")]
    Io(#[source] std::io::Error),
    #[error("the HTTP/1.1 handshake failed")]
    Handshake(#[source] hyper::Error),
}

async fn connect(
    limits: &Limits,
    backend: &Backend,
    upgrades: bool,
) -> Result<SendRequest<UpBody>, ConnectError> {
    let connecting = async {
        match backend.socket {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect(backend.addr.as_str()).await,
        }
    };
    let stream = tokio::time::timeout(Duration::from_millis(limits.connect_timeout_ms), connecting)
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Io)?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    if upgrades {
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
    } else {
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    Ok(sender)
}

/// Removes what belongs to one hop only: `Connection` and the headers it
/// names, and the other hop-by-hop headers.
fn strip_hop_headers(headers: &mut hyper::HeaderMap, keep_upgrade: bool) {
    if let Some(connection) = headers.remove(header::CONNECTION) {
        if let Ok(names) = connection.to_str() {
            for name in names.split(',').map(str::trim) {
                if keep_upgrade && name.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    headers.remove(name);
                }
            }
        }
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TE);
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

async fn forward(
    shared: &Shared,
    conn: &ConnInfo,
    route: &Arc<Route>,
    mut req: Request<Incoming>,
    upstream: &mut Option<Arc<Backend>>,
) -> Response<RespBody> {
    if route.backends.is_empty() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "keel router: no ready instance for this route\n",
        );
    }
    if route.tls == keel_protocol::RouteTls::Passthrough || route.tcp {
        return text(
            StatusCode::NOT_FOUND,
            "keel router: this host is TLS passthrough only; use https\n",
        );
    }
    let limits = &shared.limits;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes) {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "keel router: the request body is larger than this route accepts\n",
        );
    }
    let upgrade = req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    let request_id = match parts.headers.get(&X_REQUEST_ID) {
        Some(id) => id.clone(),
        None => {
            let id = shared.request_id();
            parts.headers.insert(&X_REQUEST_ID, id.clone());
            id
        }
    };
    strip_hop_headers(&mut parts.headers, upgrade);
    // HTTP/2 (and absolute-form HTTP/1.1) carry the host in the URI;
    // instances get origin-form and a Host header.
    if let Some(authority) = parts.uri.authority() {
        if !parts.headers.contains_key(header::HOST)
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, value);
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if let Ok(uri) = path.parse::<Uri>() {
            parts.uri = uri;
        }
    }
    parts.version = Version::HTTP_11;
    if let Some(host) = parts.headers.get(header::HOST).cloned() {
        parts.headers.insert(&X_FORWARDED_HOST, host);
    }
    match parts.headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Occupied(mut entry) => {
            let mut joined = entry.get().as_bytes().to_vec();
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(conn.client_ip.as_bytes());
            if let Ok(value) = HeaderValue::from_bytes(&joined) {
                entry.insert(value);
            }
        }
        header::Entry::Vacant(entry) => {
            entry.insert(conn.client_ip.clone());
        }
    }
    parts.headers.insert(
        &X_FORWARDED_PROTO,
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    let mut req = Request::from_parts(parts, Limited::new(body, limits.max_body_bytes as usize));

    let now_ms = shared.now_ms();
    let mut failed: Option<Arc<Backend>> = None;
    // Two instances at most; a pooled connection found closed before the
    // request was written costs an attempt of its own but no instance.
    let mut instances_tried = 0;
    for _ in 0..4 {
        if instances_tried == 2 {
            break;
        }
        let Some(backend) = route.pick(shared.balance, now_ms, failed.as_ref()).cloned() else {
            break;
        };
        let pooled = if upgrade { None } else { backend.pool.take() };
        let mut sender = match pooled {
            Some(sender) => sender,
            None => {
                instances_tried += 1;
                match connect(limits, &backend, upgrade).await {
                    Ok(sender) => sender,
                    Err(error) => {
                        route.metrics.upstream_error();
                        backend
                            .down_until_ms
                            .store(shared.now_ms() + limits.backend_down_ms, Ordering::Relaxed);
                        tracing::warn!(
                            route = %route.label,
                            upstream = %backend.addr,
                            error = %error,
                            source = ?std::error::Error::source(&error),
                            "instance unreachable; skipping it for a while"
                        );
                        failed = Some(backend);
                        continue;
                    }
                }
            }
        };
        backend.outstanding.fetch_add(1, Ordering::Relaxed);
        let sent = tokio::time::timeout(
            Duration::from_millis(limits.response_timeout_ms),
            sender.try_send_request(req),
        )
        .await;
        match sent {
            Ok(Ok(mut response)) => {
                *upstream = Some(backend.clone());
                if response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(client_upgrade) = client_upgrade
                {
                    let instance_upgrade = hyper::upgrade::on(&mut response);
                    tokio::spawn(async move {
                        let (Ok(client), Ok(instance)) =
                            tokio::join!(client_upgrade, instance_upgrade)
                        else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(client),
                            &mut TokioIo::new(instance),
                        )
                        .await;
                    });
                }
                let (mut parts, body) = response.into_parts();
                if parts.headers.contains_key(header::CONNECTION) {
                    strip_hop_headers(
                        &mut parts.headers,
                        parts.status == StatusCode::SWITCHING_PROTOCOLS,
                    );
                }
                parts.headers.remove(&KEEP_ALIVE);
                parts.headers.insert(&X_REQUEST_ID, request_id);
                let body = UpstreamBody {
                    inner: body,
                    sender: (!upgrade).then_some(sender),
                    backend,
                    done: false,
                };
                return Response::from_parts(parts, Either::Left(body));
            }
            Ok(Err(mut error)) => {
                backend.outstanding.fetch_sub(1, Ordering::Relaxed);
                match error.take_message() {
                    // Never written: the pooled connection had closed.
                    // Safe to send again, whatever the method.
                    Some(message) => {
                        req = message;
                        continue;
                    }
                    None => {
                        route.metrics.upstream_error();
                        let error = error.into_error();
                        tracing::warn!(
                            route = %route.label,
                            upstream = %backend.addr,
                            error = %error,
                            "instance failed the request"
                        );
                        *upstream = Some(backend);
                        return if error.is_body_write_aborted() || limited(&error) {
                            text(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                "keel router: the request body is larger than this route accepts\n",
                            )
                        } else {
                            text(
                                StatusCode::BAD_GATEWAY,
                                "keel router: the instance failed to answer\n",
                            )
                        };
                    }
                }
            }
            Err(_) => {
                backend.outstanding.fetch_sub(1, Ordering::Relaxed);
                route.metrics.upstream_error();
                *upstream = Some(backend);
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    "keel router: the instance did not answer in time\n",
                );
            }
        }
    }
    text(
        StatusCode::BAD_GATEWAY,
        "keel router: no instance of this route could be reached\n",
    )
}

/// Whether a failed request failed because its body passed the limit.
fn limited(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// An instance's response body on its way to the client. When it has been
/// read to the end, its connection goes back to the pool; dropped early
/// (the client went away), the connection is closed with it.
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    inner: Incoming,
    sender: Option<SendRequest<UpBody>>,
    backend: Arc<Backend>,
    done: bool,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.done = true,
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.done = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        self.backend.outstanding.fetch_sub(1, Ordering::Relaxed);
        if (self.done || self.inner.is_end_stream())
            && let Some(sender) = self.sender.take()
        {
            self.backend.pool.put(sender);
        }
    }
}
