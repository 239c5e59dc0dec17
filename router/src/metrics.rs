//! Prometheus metrics: plain atomics updated on the request path (no locks,
//! no allocation), rendered as text when `/metrics` is scraped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::table::Table;

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Per route; shared by every table that has the route.
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    /// Indexed by status code - 100.
    statuses: Box<[AtomicU64]>,
    buckets: [AtomicU64; BUCKETS_S.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
    upstream_errors: AtomicU64,
}

impl Default for RouteMetrics {
    fn default() -> Self {
        Self {
            statuses: (100..600).map(|_| AtomicU64::new(0)).collect(),
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            upstream_errors: AtomicU64::new(0),
        }
    }
}

impl RouteMetrics {
    pub fn record(&self, status: u16, elapsed: Duration) {
        if let Some(counter) = self.statuses.get(usize::from(status).wrapping_sub(100)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS_S.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Router-wide figures.
#[derive(Debug, Default)]
pub(crate) struct Global {
    pub active_connections: AtomicI64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Requests no route took: unknown host (404), no table yet, bad
    /// requests.
    pub unrouted: AtomicU64,
    /// Plain TCP routes, by listen port (`crate::tcp`).
    pub tcp: Arc<TcpMetrics>,
}

/// Plain TCP routes' figures, by listen port. A port keeps its counters
/// for as long as the router runs, so they never go back (at most one
/// entry per port number).
#[derive(Debug, Default)]
pub(crate) struct TcpMetrics {
    ports: Mutex<BTreeMap<u16, Arc<PortMetrics>>>,
}

impl TcpMetrics {
    pub fn port(&self, port: u16) -> Arc<PortMetrics> {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports.entry(port).or_default().clone()
    }

    fn snapshot(&self) -> Vec<(u16, Arc<PortMetrics>)> {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports.iter().map(|(p, m)| (*p, m.clone())).collect()
    }
}

/// One listen port's figures.
#[derive(Debug, Default)]
pub(crate) struct PortMetrics {
    listening: AtomicBool,
    listen_errors: AtomicU64,
    active: AtomicI64,
    accepted: AtomicU64,
    refused: AtomicU64,
    no_backend: AtomicU64,
    upstream_errors: AtomicU64,
}

impl PortMetrics {
    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Relaxed);
    }
    pub fn listen_error(&self) {
        self.listen_errors.fetch_add(1, Ordering::Relaxed);
    }
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }
    pub fn opened(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }
    pub fn closed(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
    pub fn no_backend(&self) {
        self.no_backend.fetch_add(1, Ordering::Relaxed);
    }
    pub fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }
}

fn render_tcp(tcp: &TcpMetrics, out: &mut String) {
    let ports = tcp.snapshot();
    type Figure = fn(&PortMetrics) -> String;
    let families: [(&str, &str, &str, Figure); 7] = [
        (
            "keel_router_tcp_listening",
            "gauge",
            "1 while the router listens on a TCP route's port; 0 when it cannot (in use) or the route is gone.",
            |m| u8::from(m.listening.load(Ordering::Relaxed)).to_string(),
        ),
        (
            "keel_router_tcp_listen_errors_total",
            "counter",
            "Failed attempts to listen on a TCP route's port.",
            |m| m.listen_errors.load(Ordering::Relaxed).to_string(),
        ),
        (
            "keel_router_tcp_connections_active",
            "gauge",
            "TCP route connections open now, by listen port.",
            |m| m.active.load(Ordering::Relaxed).to_string(),
        ),
        (
            "keel_router_tcp_connections_total",
            "counter",
            "TCP route connections accepted, by listen port.",
            |m| m.accepted.load(Ordering::Relaxed).to_string(),
        ),
        (
            "keel_router_tcp_connections_refused_total",
            "counter",
            "TCP route connections closed at once: too many open.",
            |m| m.refused.load(Ordering::Relaxed).to_string(),
        ),
        (
            "keel_router_tcp_no_backend_total",
            "counter",
            "TCP route connections closed because no instance was ready or reachable.",
            |m| m.no_backend.load(Ordering::Relaxed).to_string(),
        ),
        (
            "keel_router_tcp_upstream_errors_total",
            "counter",
            "Failed attempts to connect to an instance for a TCP route, by listen port.",
            |m| m.upstream_errors.load(Ordering::Relaxed).to_string(),
        ),
    ];
    for (name, kind, help, figure) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (port, m) in &ports {
            let _ = writeln!(out, "{name}{{port=\"{port}\"}} {}", figure(m));
        }
    }
}

/// The Prometheus text exposition of everything.
pub(crate) fn render(global: &Global, table: &Table) -> String {
    let mut out = String::with_capacity(4096);
    let _ = writeln!(
        out,
        "# HELP keel_router_active_connections Client connections open now.\n\
         # TYPE keel_router_active_connections gauge\n\
         keel_router_active_connections {}",
        global.active_connections.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP keel_router_connections_total Client connections accepted.\n\
         # TYPE keel_router_connections_total counter\n\
         keel_router_connections_total {}\n\
         # HELP keel_router_connections_refused_total Client connections closed at once: too many open.\n\
         # TYPE keel_router_connections_refused_total counter\n\
         keel_router_connections_refused_total {}\n\
         # HELP keel_router_unrouted_requests_total Requests that matched no route.\n\
         # TYPE keel_router_unrouted_requests_total counter\n\
         keel_router_unrouted_requests_total {}",
        global.connections_total.load(Ordering::Relaxed),
        global.connections_refused.load(Ordering::Relaxed),
        global.unrouted.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP keel_router_route_generation The route table's generation.\n\
         # TYPE keel_router_route_generation gauge\n\
         keel_router_route_generation {}",
        table.generation.unwrap_or(-1)
    );
    out.push_str(
        "# HELP keel_router_requests_total Requests by route and status.\n\
         # TYPE keel_router_requests_total counter\n",
    );
    for route in &table.routes {
        for (i, counter) in route.metrics.statuses.iter().enumerate() {
            let n = counter.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "keel_router_requests_total{{route=\"{}\",status=\"{}\"}} {n}",
                    route.label,
                    i + 100
                );
            }
        }
    }
    out.push_str(
        "# HELP keel_router_upstream_errors_total Failed attempts to reach an instance, by route.\n\
         # TYPE keel_router_upstream_errors_total counter\n",
    );
    for route in &table.routes {
        let _ = writeln!(
            out,
            "keel_router_upstream_errors_total{{route=\"{}\"}} {}",
            route.label,
            route.metrics.upstream_errors.load(Ordering::Relaxed)
        );
    }
    out.push_str(
        "# HELP keel_router_request_duration_seconds Time to the response head, by route.\n\
         # TYPE keel_router_request_duration_seconds histogram\n",
    );
    for route in &table.routes {
        let m = &route.metrics;
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_S.iter().zip(&m.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "keel_router_request_duration_seconds_bucket{{route=\"{}\",le=\"{bound}\"}} {cumulative}",
                route.label
            );
        }
        let count = m.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "keel_router_request_duration_seconds_bucket{{route=\"{0}\",le=\"+Inf\"}} {count}\n\
             keel_router_request_duration_seconds_sum{{route=\"{0}\"}} {1}\n\
             keel_router_request_duration_seconds_count{{route=\"{0}\"}} {count}",
            route.label,
            m.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        );
    }
    out.push_str(
        "# HELP keel_router_instance_requests_in_flight Requests (and TLS passthrough connections) an instance is serving now, by route and instance address; an instance in two routes shows its one count under each.\n\
         # TYPE keel_router_instance_requests_in_flight gauge\n",
    );
    for route in &table.routes {
        for backend in &route.backends {
            let _ = writeln!(
                out,
                "keel_router_instance_requests_in_flight{{route=\"{}\",instance=\"{}\"}} {}",
                route.label,
                backend.addr,
                backend.in_flight()
            );
        }
    }
    render_tcp(&global.tcp, &mut out);
    out
}
