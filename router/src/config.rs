//! The router's configuration: strict (unknown fields are errors), with
//! units in the names and defaults that suit a production node.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use keel_protocol::RouteTable;
use serde::Deserialize;

/// Everything [`crate::Router::start`] needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge). `None`: off.
    pub http_addr: Option<SocketAddr>,
    /// TLS: terminated (HTTP/1.1 or HTTP/2 by ALPN) or passed through by
    /// SNI. `None`: off.
    pub https_addr: Option<SocketAddr>,
    /// Prometheus `/metrics`. `None`: off.
    pub metrics_addr: Option<SocketAddr>,
    /// The IP address plain TCP routes listen on, each on its route's
    /// `listen_port`. `None`: the IP of `http_addr` (else of `https_addr`,
    /// else every address).
    pub tcp_ip: Option<IpAddr>,
    /// Threads serving traffic, each with its own listener (SO_REUSEPORT)
    /// and its own event loop. `0`: one per CPU.
    pub worker_threads: usize,
    /// Where the route table comes from.
    pub source: TableSource,
    /// How a request picks among a route's ready instances.
    pub balance: Balance,
    pub limits: Limits,
    /// How long [`crate::RouterHandle::shutdown`] waits for in-flight
    /// requests before it closes what is left.
    pub shutdown_grace_ms: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            http_addr: Some(SocketAddr::from(([0, 0, 0, 0], 80))),
            https_addr: Some(SocketAddr::from(([0, 0, 0, 0], 443))),
            metrics_addr: None,
            tcp_ip: None,
            worker_threads: 0,
            source: TableSource::Fixed(RouteTable {
                generation: 0,
                routes: Vec::new(),
                certificates: Vec::new(),
            }),
            balance: Balance::default(),
            limits: Limits::default(),
            shutdown_grace_ms: 10_000,
        }
    }
}

/// Limits against abuse and against instances that hang.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (request line and headers) accepted; larger
    /// ones get 431. HTTP/1.1 cannot go below 8192.
    pub max_header_bytes: usize,
    /// Largest request body, for every route; a larger declared length gets
    /// 413 before anything reaches the instance.
    pub max_body_bytes: u64,
    /// A client must send a whole request head within this, or the
    /// connection is closed (slowloris). For HTTP/1.1 it is also how long an
    /// idle keep-alive connection waits for its next request.
    pub header_read_timeout_ms: u64,
    /// HTTP/2: a connection whose peer does not answer a ping within this
    /// is closed.
    pub idle_timeout_ms: u64,
    /// Connecting to an instance; past it the instance counts as failed.
    pub connect_timeout_ms: u64,
    /// From sending a request to an instance to its response head; past it
    /// the client gets 504.
    pub response_timeout_ms: u64,
    /// Client connections open at once, all workers together; more are
    /// closed at once.
    pub max_connections: usize,
    /// How long an instance that refused a connection is skipped.
    pub backend_down_ms: u64,
    /// Idle pooled connections kept per instance and worker.
    pub max_idle_per_backend: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            connect_timeout_ms: 2_000,
            response_timeout_ms: 60_000,
            max_connections: 20_000,
            backend_down_ms: 2_000,
            max_idle_per_backend: 256,
        }
    }
}

/// How a request picks among a route's ready instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each instance in turn.
    RoundRobin,
    /// The instance with the fewest requests in flight, ties broken in
    /// turn. The default: it is round robin while instances are equally
    /// fast, and steers away from one that slows down.
    #[default]
    LeastOutstanding,
}

/// Where the route table comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TableSource {
    /// A table given in code (tests).
    Fixed(RouteTable),
    /// A `RouteTable` JSON file, read once at start (tests, benchmarks).
    File(PathBuf),
    /// The controller's `GET /v1/routes/watch` stream.
    Controller(ControllerSource),
}

impl TableSource {
    /// The controller's route stream, as the router of node `node`, with
    /// that node's credential (or the admin token).
    pub fn controller(
        url: impl Into<String>,
        token: impl Into<String>,
        node: impl Into<String>,
    ) -> Self {
        TableSource::Controller(ControllerSource {
            url: url.into(),
            token: token.into(),
            node: node.into(),
            reconnect_max_ms: 5_000,
            silence_timeout_ms: default_silence_timeout_ms(),
            max_line_bytes: default_max_line_bytes(),
        })
    }

    /// A `RouteTable` JSON file.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        TableSource::File(path.into())
    }
}

/// The controller stream's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSource {
    /// The controller's base URL, e.g. `http://10.0.0.1:7070`. Plain
    /// `http://` only for now: the HTTP client is built without TLS, as the
    /// agent's is, until the cluster CA arrives.
    pub url: String,
    /// A router node's credential or the admin token.
    pub token: String,
    /// The router's node name (it must have the `router` role).
    pub node: String,
    /// Reconnect backoff doubles from 100 ms up to this.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// The controller sends a keepalive line every 10 s; after this much
    /// silence the connection is taken for dead and opened again.
    #[serde(default = "default_silence_timeout_ms")]
    pub silence_timeout_ms: u64,
    /// The longest line (one whole route table, certificates included)
    /// taken from the stream; a longer one is an error, the connection is
    /// dropped and opened again, so a broken or hostile controller cannot
    /// make the router buffer without bound.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: u64,
}

fn default_reconnect_max_ms() -> u64 {
    5_000
}

fn default_silence_timeout_ms() -> u64 {
    30_000
}

/// 64 MiB: thousands of routes and certificates with their keys.
fn default_max_line_bytes() -> u64 {
    64 * 1024 * 1024
}
