//! The route table as the data plane uses it: compiled from the wire
//! `RouteTable` into maps by host, with per-instance state (connection
//! pool, requests in flight, passive health) and per-route metrics that
//! survive table swaps, so that a swap never costs a warm connection.
//!
//! Requests in flight are counted only through [`InFlight`], whose `Drop`
//! takes the count back: a request that ends in any way (answered, failed,
//! timed out, or dropped because its client went away) can never leave
//! its instance looking busy, which least-outstanding balancing would
//! otherwise avoid for good.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use keel_protocol::{RouteCertificate, RouteTable, RouteTls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::Balance;
use crate::metrics::RouteMetrics;
use crate::pool::Pool;

/// One instance a route can send to.
#[derive(Debug)]
pub(crate) struct Backend {
    /// `address:port` as published.
    pub addr: String,
    /// Parsed once; `None` when the address is a name, resolved per connect.
    pub socket: Option<SocketAddr>,
    /// Requests (and passthrough connections) in flight; only
    /// [`InFlight`] changes it.
    outstanding: AtomicUsize,
    /// Milliseconds since the router started before which this instance is
    /// skipped (it refused a connection).
    pub down_until_ms: AtomicU64,
    pub pool: Pool,
}

impl Backend {
    /// Requests (and passthrough connections) it is serving now.
    pub fn in_flight(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// Something whose work in flight is counted, for balancing: an HTTP
/// route's instance counts requests, a TCP route's open connections.
pub(crate) trait Counted {
    fn in_flight_counter(&self) -> &AtomicUsize;
}

impl Counted for Backend {
    fn in_flight_counter(&self) -> &AtomicUsize {
        &self.outstanding
    }
}

/// One unit of work counted on its instance for as long as this lives.
/// Hold it wherever the work is (the request's future, then the response
/// body, then a tunnel), so that however the work ends, even by its
/// future being dropped mid-way, the count comes back down.
#[derive(Debug)]
pub(crate) struct InFlight<B: Counted = Backend> {
    backend: Arc<B>,
}

impl<B: Counted> InFlight<B> {
    pub fn new(backend: Arc<B>) -> Self {
        backend.in_flight_counter().fetch_add(1, Ordering::Relaxed);
        Self { backend }
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }
}

impl<B: Counted> Drop for InFlight<B> {
    fn drop(&mut self) {
        self.backend
            .in_flight_counter()
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// One route with the instances it may go to now.
#[derive(Debug)]
pub(crate) struct Route {
    /// `host/path` as the access log and metrics name the route.
    pub label: String,
    pub path: String,
    pub tls: RouteTls,
    pub tcp: bool,
    pub redirect_https: bool,
    pub hsts: bool,
    pub backends: Vec<Arc<Backend>>,
    next: AtomicUsize,
    pub metrics: Arc<RouteMetrics>,
}

impl Route {
    /// The instance a request goes to (see [`pick`]), other than `exclude`
    /// (the one that just failed).
    pub fn pick(
        &self,
        balance: Balance,
        now_ms: u64,
        exclude: Option<&Arc<Backend>>,
    ) -> Option<&Arc<Backend>> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        pick(&self.backends, start, balance, now_ms, |b| {
            exclude.is_none_or(|e| !Arc::ptr_eq(e, b))
        })
    }
}

/// What balancing needs to know of an instance; HTTP routes count
/// requests in flight, TCP routes open connections.
pub(crate) trait Candidate: Counted {
    /// Milliseconds since the router started before which it is skipped.
    fn down_until_ms(&self) -> u64;

    fn load(&self) -> usize {
        self.in_flight_counter().load(Ordering::Relaxed)
    }
}

impl Candidate for Backend {
    fn down_until_ms(&self) -> u64 {
        self.down_until_ms.load(Ordering::Relaxed)
    }
}

/// Chooses among the `usable` of `backends`, skipping those marked down:
/// with round robin any of them, with least outstanding one of those with
/// the least load. Among those equally good the `start`-th (modulo their
/// number) is taken, so a caller that passes a counter spreads its picks
/// evenly over all of them; taking the first one found from a rotating
/// start instead would give the instance after a busy one a double share.
/// When every usable one is down, one is chosen anyway (in turn): a
/// refused connection answers faster than a 503 would help, and that is
/// how a recovered instance is noticed.
pub(crate) fn pick<B: Candidate>(
    backends: &[Arc<B>],
    start: usize,
    balance: Balance,
    now_ms: u64,
    usable: impl Fn(&Arc<B>) -> bool,
) -> Option<&Arc<B>> {
    let load = |b: &B| match balance {
        Balance::RoundRobin => 0,
        Balance::LeastOutstanding => b.load(),
    };
    let up = |b: &&Arc<B>| usable(b) && b.down_until_ms() <= now_ms;
    let mut least = usize::MAX;
    let mut ties = 0usize;
    let mut first = None;
    for backend in backends.iter().filter(up) {
        let l = load(backend);
        if l < least {
            least = l;
            ties = 1;
            first = Some(backend);
        } else if l == least {
            ties += 1;
        }
    }
    if ties > 0 {
        // Loads may move between the two passes: then the first found
        // with the least load stands in.
        let nth = start % ties;
        return backends
            .iter()
            .filter(up)
            .filter(|b| load(b) <= least)
            .nth(nth)
            .or(first);
    }
    let n = backends.len();
    (0..n)
        .map(|i| &backends[(start + i) % n])
        .find(|b| usable(b))
}

/// The routes of one host, longest path first.
#[derive(Debug, Default)]
pub(crate) struct HostRoutes {
    routes: Vec<Arc<Route>>,
}

impl HostRoutes {
    /// Longest prefix, matched per segment: `/api` matches `/api` and
    /// `/api/x`, never `/apix`.
    fn find(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| {
            let prefix = r.path.as_str();
            prefix == "/"
                || (path.starts_with(prefix)
                    && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/' | b'?')))
        })
    }

    /// The route that decides a TLS connection by SNI (before any path is
    /// known): the host's root, else its shortest path.
    fn for_sni(&self) -> Option<&Arc<Route>> {
        self.routes.last()
    }
}

/// The compiled table.
#[derive(Debug, Default)]
pub(crate) struct Table {
    /// `None` until a first table arrived: until then the router answers
    /// 503, not 404, because it does not know yet.
    pub generation: Option<i64>,
    exact: HashMap<String, HostRoutes>,
    /// `*.example.com` is stored under `example.com`.
    wildcard: HashMap<String, HostRoutes>,
    certs: HashMap<String, Arc<CertifiedKey>>,
    pub routes: Vec<Arc<Route>>,
}

impl Table {
    fn host_routes(&self, host: &str) -> Option<&HostRoutes> {
        if let Some(routes) = self.exact.get(host) {
            return Some(routes);
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent)
    }

    /// The route for a request, by host (exact, then `*.` one label deep)
    /// and longest path prefix. `host` must be lower case without port.
    pub fn find(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        self.host_routes(host)?.find(path)
    }

    pub fn has_host(&self, host: &str) -> bool {
        self.host_routes(host).is_some()
    }

    pub fn for_sni(&self, host: &str) -> Option<&Arc<Route>> {
        self.host_routes(host)?.for_sni()
    }

    /// A stored certificate for `host`: exact, then wildcard.
    pub fn cert(&self, host: &str) -> Option<&Arc<CertifiedKey>> {
        if let Some(cert) = self.certs.get(host) {
            return Some(cert);
        }
        let (_, parent) = host.split_once('.')?;
        self.certs.get(&format!("*.{parent}"))
    }
}

/// What outlives a table: instances' pools and health, routes' metrics.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    backends: Mutex<HashMap<String, Weak<Backend>>>,
    metrics: Mutex<HashMap<String, Weak<RouteMetrics>>>,
}

/// `host` lower-cased and without a port; borrowed when it already is.
pub(crate) fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let host = match host.rfind(':') {
        // An IPv6 literal keeps its colons; only a port after `]` goes.
        Some(i)
            if !host[i..].contains(']') && (host.starts_with('[') || !host[..i].contains(':')) =>
        {
            &host[..i]
        }
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

fn normalize_path(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else if trimmed.starts_with('/') {
        trimmed.to_owned()
    } else {
        format!("/{trimmed}")
    }
}

impl Registry {
    fn backend(&self, addr: &str, max_idle: usize) -> Arc<Backend> {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(backend) = backends.get(addr).and_then(Weak::upgrade) {
            return backend;
        }
        let backend = Arc::new(Backend {
            addr: addr.to_owned(),
            socket: addr.parse().ok(),
            outstanding: AtomicUsize::new(0),
            down_until_ms: AtomicU64::new(0),
            pool: Pool::new(max_idle),
        });
        backends.insert(addr.to_owned(), Arc::downgrade(&backend));
        backend
    }

    fn metrics(&self, label: &str) -> Arc<RouteMetrics> {
        let mut metrics = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = metrics.get(label).and_then(Weak::upgrade) {
            return m;
        }
        let m = Arc::new(RouteMetrics::default());
        metrics.insert(label.to_owned(), Arc::downgrade(&m));
        m
    }

    /// Forgets what no table refers to any more.
    fn sweep(&self) {
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, b| b.strong_count() > 0);
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, m| m.strong_count() > 0);
    }

    /// Compiles a wire table. Bad certificates are skipped with a warning
    /// (their hosts get a self-signed one): one bad entry must not stop
    /// the others from being served.
    pub fn compile(&self, wire: &RouteTable, max_idle: usize) -> Table {
        let mut table = Table {
            generation: Some(wire.generation),
            ..Table::default()
        };
        for entry in &wire.routes {
            if entry.listen_port.is_some() {
                continue; // plain TCP: served by `crate::tcp`, not by host
            }
            let host = normalize_host(&entry.host).into_owned();
            let path = normalize_path(&entry.path);
            let label = format!("{host}{path}");
            let route = Arc::new(Route {
                metrics: self.metrics(&label),
                label,
                path,
                tls: entry.tls,
                tcp: entry.protocol == "tcp",
                redirect_https: entry.redirect_https,
                hsts: entry.hsts,
                backends: entry
                    .backends
                    .iter()
                    .map(|addr| self.backend(addr, max_idle))
                    .collect(),
                next: AtomicUsize::new(0),
            });
            let map = match host.strip_prefix("*.") {
                Some(parent) => table.wildcard.entry(parent.to_owned()).or_default(),
                None => table.exact.entry(host).or_default(),
            };
            map.routes.push(route.clone());
            table.routes.push(route);
        }
        for map in table.exact.values_mut().chain(table.wildcard.values_mut()) {
            map.routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        }
        for cert in &wire.certificates {
            match certified_key(cert) {
                Ok(key) => {
                    table
                        .certs
                        .insert(normalize_host(&cert.host).into_owned(), Arc::new(key));
                }
                Err(error) => {
                    tracing::warn!(host = %cert.host, %error, "skipping a stored certificate");
                }
            }
        }
        self.sweep();
        table
    }
}

/// Why a stored certificate cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cert_pem holds no certificate")]
    NoCertificate,
    #[error("cert_pem is not PEM")]
    CertPem(#[source] rustls::pki_types::pem::Error),
    #[error("key_pem holds no usable private key")]
    KeyPem(#[source] rustls::pki_types::pem::Error),
    #[error("key_pem: unsupported key type")]
    KeyType(#[source] rustls::Error),
    #[error("key_pem does not match the certificate")]
    Mismatch(#[source] rustls::Error),
}

/// Parses a PEM chain and key into what rustls serves, checking that the
/// key belongs to the leaf.
pub fn certified_key(cert: &RouteCertificate) -> Result<CertifiedKey, CertError> {
    let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(CertError::CertPem)?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).map_err(CertError::KeyPem)?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => CertError::Mismatch(e),
        other => CertError::KeyType(other),
    })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_protocol::RouteEntry;

    fn entry(host: &str, path: &str, backends: &[&str]) -> RouteEntry {
        RouteEntry {
            host: host.into(),
            path: path.into(),
            tls: RouteTls::Off,
            project: "p".into(),
            app: "a".into(),
            port: "http".into(),
            protocol: "http".into(),
            backends: backends.iter().map(|b| (*b).to_owned()).collect(),
            redirect_https: false,
            hsts: false,
            listen_port: None,
        }
    }

    fn table(routes: Vec<RouteEntry>) -> Table {
        Registry::default().compile(
            &RouteTable {
                generation: 1,
                routes,
                certificates: vec![],
            },
            8,
        )
    }

    #[test]
    fn host_exact_then_one_label_wildcard() {
        let t = table(vec![
            entry("a.example.com", "/", &[]),
            entry("*.example.com", "/", &[]),
        ]);
        assert_eq!(
            t.find("a.example.com", "/").map(|r| r.label.as_str()),
            Some("a.example.com/")
        );
        assert_eq!(
            t.find("b.example.com", "/x").map(|r| r.label.as_str()),
            Some("*.example.com/")
        );
        assert!(t.find("x.b.example.com", "/").is_none());
        assert!(t.find("example.com", "/").is_none());
    }

    #[test]
    fn longest_prefix_per_segment() {
        let t = table(vec![
            entry("h", "/", &[]),
            entry("h", "/api/", &[]),
            entry("h", "/api/v2", &[]),
        ]);
        let label = |p: &str| t.find("h", p).map(|r| r.label.clone());
        assert_eq!(label("/api/v2/x").as_deref(), Some("h/api/v2"));
        assert_eq!(label("/api/v2").as_deref(), Some("h/api/v2"));
        assert_eq!(label("/api/v20").as_deref(), Some("h/api"));
        assert_eq!(label("/apix").as_deref(), Some("h/"));
        assert_eq!(label("/api?q=1").as_deref(), Some("h/api"));
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("::1"), "::1");
    }

    #[test]
    fn least_outstanding_prefers_the_idle_and_skips_the_down() {
        let t = table(vec![entry(
            "h",
            "/",
            &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
        )]);
        let route = t.find("h", "/").expect("route");
        route.backends[0].outstanding.store(5, Ordering::Relaxed);
        route.backends[1]
            .down_until_ms
            .store(1_000, Ordering::Relaxed);
        for _ in 0..5 {
            let b = route
                .pick(Balance::LeastOutstanding, 10, None)
                .expect("backend");
            assert_eq!(b.addr, "127.0.0.1:3");
        }
        // Once the down mark expires, the idle ones share.
        let picks: std::collections::BTreeSet<_> = (0..4)
            .filter_map(|_| route.pick(Balance::LeastOutstanding, 2_000, None))
            .map(|b| b.addr.clone())
            .collect();
        assert_eq!(picks.len(), 2);
        // Round robin visits all.
        let picks: std::collections::BTreeSet<_> = (0..3)
            .filter_map(|_| route.pick(Balance::RoundRobin, 2_000, None))
            .map(|b| b.addr.clone())
            .collect();
        assert_eq!(picks.len(), 3);
    }

    #[test]
    fn ties_are_spread_evenly_around_a_busy_instance() {
        let t = table(vec![entry(
            "h",
            "/",
            &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"],
        )]);
        let route = t.find("h", "/").expect("route");
        let busy = InFlight::new(route.backends[0].clone());
        for balance in [Balance::LeastOutstanding, Balance::RoundRobin] {
            let mut picks = std::collections::BTreeMap::<String, usize>::new();
            for _ in 0..30 {
                let b = route.pick(balance, 0, None).expect("backend");
                *picks.entry(b.addr.clone()).or_default() += 1;
            }
            let shares: Vec<usize> = picks.values().copied().collect();
            match balance {
                // The busy one is avoided and the others share evenly,
                // the one after it no more than the rest.
                Balance::LeastOutstanding => assert_eq!(shares, [10, 10, 10], "{picks:?}"),
                Balance::RoundRobin => assert!(
                    shares.len() == 4 && shares.iter().all(|n| (7..=8).contains(n)),
                    "{picks:?}"
                ),
            }
        }
        drop(busy);
        assert_eq!(route.backends[0].in_flight(), 0);
    }

    #[test]
    fn an_in_flight_count_is_taken_back_however_the_request_ends() {
        let t = table(vec![entry("h", "/", &["127.0.0.1:1"])]);
        let backend = t.find("h", "/").expect("route").backends[0].clone();
        let guard = InFlight::new(backend.clone());
        assert_eq!(backend.in_flight(), 1);
        // A request future dropped mid-way (its client went away) drops
        // its guard with it.
        let abandoned = async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        };
        drop(abandoned);
        assert_eq!(backend.in_flight(), 0);
    }

    #[test]
    fn backends_survive_a_swap() {
        let registry = Registry::default();
        let wire = |backends: &[&str]| RouteTable {
            generation: 1,
            routes: vec![entry("h", "/", backends)],
            certificates: vec![],
        };
        let first = registry.compile(&wire(&["127.0.0.1:1"]), 8);
        let second = registry.compile(&wire(&["127.0.0.1:1", "127.0.0.1:2"]), 8);
        let a = &first.find("h", "/").expect("route").backends[0];
        let b = &second.find("h", "/").expect("route").backends[0];
        assert!(Arc::ptr_eq(a, b));
        // The count carried over is the live one: a request that began
        // under the first table ends under the second.
        let request = InFlight::new(a.clone());
        let third = registry.compile(&wire(&["127.0.0.1:2", "127.0.0.1:1"]), 8);
        let c = &third.find("h", "/").expect("route").backends[1];
        assert_eq!(c.in_flight(), 1);
        drop(request);
        assert_eq!(c.in_flight(), 0);
        assert!(Arc::ptr_eq(
            &first.routes[0].metrics,
            &second.routes[0].metrics
        ));
    }
}
