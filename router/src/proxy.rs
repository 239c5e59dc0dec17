//! The request path: find the route, pick an instance, forward on a pooled
//! connection, give the connection back when the response is read.
//!
//! Every answer the router makes itself is short plain text that says why:
//! 404 (no route for the host), 503 (no ready instance, or no table yet),
//! 502 (the instance failed), 504 (the instance did not answer in time),
//! 413 (body too large).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use crate::config::{Balance, Limits};
use crate::metrics::Global;
use crate::table::{Backend, InFlight, Registry, Route, Table, normalize_host};
use crate::upstream::{self, Conn, ExchangeError, RequestBody, UpstreamBody};

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
    /// Why the controller stream is down now (its last error), for
    /// `/readyz`; `None` while it is up or when there is no stream.
    stream_error: std::sync::Mutex<Option<String>>,
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
            stream_error: std::sync::Mutex::new(None),
            epoch: Instant::now(),
            request_ids: AtomicU64::new(0),
            id_prefix: RandomState::new().hash_one(std::process::id()),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// `now_ms` of an instant already read, to spare a clock read.
    pub fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    pub fn swap(&self, wire: &keel_protocol::RouteTable) {
        let table = self
            .registry
            .compile(wire, self.limits.max_idle_per_backend);
        self.table.store(Arc::new(table));
    }

    pub fn set_stream_error(&self, error: Option<String>) {
        *self.stream_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    pub fn stream_error(&self) -> Option<String> {
        self.stream_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
    let mut response = forward(&shared, &conn, &route, req, start, &mut upstream).await;
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

/// Headers that belong to one hop only, whatever `Connection` says;
/// `Upgrade` is passed on when the request is an upgrade.
fn hop_by_hop(name: &HeaderName, upgrade: bool) -> bool {
    name == header::CONNECTION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == header::TE
        || (!upgrade && name == header::UPGRADE)
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
    start: Instant,
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
    // hyper has read the declared length into the body's size hint.
    let framing = RequestBody::of(req.method(), req.body());
    if matches!(framing, RequestBody::Length(n) if n > limits.max_body_bytes) {
        return too_large();
    }
    let upgrade = req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    // The client's id is passed on as it is; otherwise one is added.
    let (request_id, new_id) = match headers.get(&X_REQUEST_ID) {
        Some(id) => (id.clone(), false),
        None => (shared.request_id(), true),
    };
    // HTTP/2 (and absolute-form HTTP/1.1) carry the host in the URI;
    // instances get origin-form and a Host header.
    let host = headers.get(header::HOST).map(HeaderValue::as_bytes);
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    let forwarded_for = headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes);
    // Headers the client's `Connection` names belong to its hop only.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let skip = |name: &HeaderName| {
        hop_by_hop(name, upgrade)
            // The router answers `Expect: 100-continue` itself (hyper
            // does, when the body is first read).
            || name == header::EXPECT
            // The framing to the instance is the router's (`request_head`).
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            // Set below, from what the router saw.
            || name == X_FORWARDED_FOR
            || name == X_FORWARDED_HOST
            || name == X_FORWARDED_PROTO
            || (!named.is_empty() && named.contains(name) && !(upgrade && name == header::UPGRADE))
    };
    let head = upstream::request_head(
        &parts.method,
        parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        headers,
        skip,
        &upstream::Added {
            host: if host.is_none() { authority } else { None },
            forwarded_host: host.or(authority),
            forwarded_for,
            client_ip: conn.client_ip.as_bytes(),
            proto: if conn.tls { b"https" } else { b"http" },
            request_id: new_id.then_some(request_id.as_bytes()),
            upgrade,
        },
        framing,
    );
    let mut body = Limited::new(
        body,
        usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX),
    );
    let has_body = framing != RequestBody::None;
    let head_request = parts.method == Method::HEAD;
    // RFC 9110 §9.2.2: these may be sent twice with the effect of once.
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );

    let now_ms = shared.ms_at(start);
    let mut failed: Option<Arc<Backend>> = None;
    // Two instances at most. A pooled connection the instance had closed
    // costs an attempt of its own but no instance.
    let mut instances_tried = 0;
    for _ in 0..4 {
        if instances_tried == 2 {
            break;
        }
        let Some(backend) = route.pick(shared.balance, now_ms, failed.as_ref()).cloned() else {
            break;
        };
        let mut instance = match backend.pool.take() {
            Some(instance) => instance,
            None => {
                instances_tried += 1;
                let timeout = Duration::from_millis(limits.connect_timeout_ms);
                match upstream::connect_stream(backend.socket, &backend.addr, timeout).await {
                    Ok(stream) => Conn::new(stream),
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
        // Counted from here until the response body is done or dropped;
        // if the client goes away first, hyper drops this future and the
        // guard with it.
        let in_flight = InFlight::new(backend.clone());
        let exchanged = tokio::time::timeout(
            Duration::from_millis(limits.response_timeout_ms),
            upstream::exchange(
                &mut instance,
                &head,
                has_body.then_some((&mut body, framing)),
                head_request,
            ),
        )
        .await;
        let error = match exchanged {
            Ok(Ok(head)) => {
                *upstream = Some(backend);
                return response(instance, head, in_flight, request_id, client_upgrade);
            }
            Ok(Err(error)) => error,
            Err(_) => {
                drop(in_flight);
                route.metrics.upstream_error();
                *upstream = Some(backend);
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    "keel router: the instance did not answer in time\n",
                );
            }
        };
        drop(in_flight);
        if let ExchangeError::NoResponse(_) = &error
            && !has_body
        {
            if instance.reused {
                // The instance had closed this idle connection: it never
                // read the request. Send it again, on a new connection.
                continue;
            }
            if idempotent && failed.is_none() {
                route.metrics.upstream_error();
                tracing::warn!(
                    route = %route.label,
                    upstream = %backend.addr,
                    error = %error,
                    "instance closed the connection without answering; retrying on another"
                );
                failed = Some(backend);
                continue;
            }
        }
        route.metrics.upstream_error();
        tracing::warn!(
            route = %route.label,
            upstream = %backend.addr,
            error = %error,
            source = ?std::error::Error::source(&error),
            "instance failed the request"
        );
        *upstream = Some(backend);
        return match error {
            ExchangeError::BodyTooLarge => too_large(),
            ExchangeError::ClientBody(_) => text(
                StatusCode::BAD_REQUEST,
                "keel router: the request body could not be read from the client\n",
            ),
            _ => text(
                StatusCode::BAD_GATEWAY,
                "keel router: the instance failed to answer\n",
            ),
        };
    }
    text(
        StatusCode::BAD_GATEWAY,
        "keel router: no instance of this route could be reached\n",
    )
}

fn too_large() -> Response<RespBody> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        "keel router: the request body is larger than this route accepts\n",
    )
}

/// The client's response from an instance's response head; the body is
/// read from `instance` as the client takes it. A 101 hands both
/// connections to a tunnel of their own.
fn response(
    mut instance: Conn,
    head: upstream::Head,
    in_flight: InFlight,
    request_id: HeaderValue,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<RespBody> {
    let switching = head.status == StatusCode::SWITCHING_PROTOCOLS;
    let body = if switching {
        // A tunnel is not a request in flight: it may stay open for hours.
        drop(in_flight);
        let Some(client_upgrade) = client_upgrade else {
            return text(
                StatusCode::BAD_GATEWAY,
                "keel router: the instance switched protocols unasked\n",
            );
        };
        let early = instance.take_buffered();
        tokio::spawn(async move {
            let Ok(client) = client_upgrade.await else {
                return;
            };
            let mut client = TokioIo::new(client);
            if !early.is_empty() && client.write_all(&early).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut client, &mut instance.stream).await;
        });
        Either::Right(Full::new(Bytes::new()))
    } else {
        Either::Left(UpstreamBody::new(instance, &head, in_flight))
    };
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    let headers = response.headers_mut();
    *headers = head.headers;
    if headers.contains_key(header::CONNECTION) {
        strip_hop_headers(headers, switching);
    }
    headers.remove(&KEEP_ALIVE);
    if headers.remove(header::TRANSFER_ENCODING).is_some() {
        // The body is handed on decoded; the client's side frames it.
        headers.remove(header::CONTENT_LENGTH);
    }
    headers.insert(&X_REQUEST_ID, request_id);
    response
}
