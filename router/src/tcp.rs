//! Plain TCP routes: for every `listen_port` in the route table, a listener
//! on the router's TCP address that forwards each connection, bytes
//! untouched and in both directions, to a ready instance of the route.
//!
//! Apart from the HTTP data plane on purpose: it has its own runtime, its
//! own compiled table (port to route) swapped in whole like the HTTP one,
//! and its own per-instance state (open connections, the "refused, skip it
//! for a moment" mark) that outlives swaps. What it shares with the rest of
//! the router is the wire table it is given ([`TcpRoutes::apply`]), the
//! limits and the metrics registry.
//!
//! Listeners follow the table: a port is bound when it appears and closed
//! when it goes (connections already open keep running until they end). A
//! port that cannot be bound (another process has it, or the router's own
//! HTTP port) is logged and counted, never fatal, and tried again on every
//! table and every [`RETRY_BIND`].

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use keel_protocol::RouteTable;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::RouterError;
use crate::config::{Balance, Limits};
use crate::metrics::{PortMetrics, TcpMetrics};
use crate::table::{Counted, InFlight};

/// How often ports that could not be bound are tried again, besides on
/// every new table.
const RETRY_BIND: Duration = Duration::from_secs(5);

/// Connections waiting to be accepted, per listen port.
const BACKLOG: i32 = 1024;

/// What the TCP side needs from the router's configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The address every listen port is bound on.
    pub ip: IpAddr,
    pub balance: Balance,
    pub limits: Limits,
    /// Threads of the TCP runtime.
    pub threads: usize,
    /// How long open connections may run on after shutdown began.
    pub grace: Duration,
}

/// One instance a TCP route can send to; shared by every table that has
/// its address.
#[derive(Debug)]
struct Backend {
    addr: String,
    /// Connections open to it now (for least-connections balancing); only
    /// [`InFlight`] changes it.
    open: AtomicUsize,
    /// Milliseconds since the router started before which it is skipped.
    down_until_ms: AtomicU64,
}

/// One listen port's route as one table has it.
#[derive(Debug)]
struct Route {
    /// `project/app`, for logs.
    app: String,
    backends: Vec<Arc<Backend>>,
    next: AtomicUsize,
}

impl Route {
    /// An instance not yet `tried`, balanced by open connections (see
    /// [`crate::table::pick`]).
    fn pick(&self, balance: Balance, now_ms: u64, tried: &[Arc<Backend>]) -> Option<&Arc<Backend>> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        crate::table::pick(&self.backends, start, balance, now_ms, |b| {
            !tried.iter().any(|t| Arc::ptr_eq(t, b))
        })
    }
}

impl Counted for Backend {
    fn in_flight_counter(&self) -> &AtomicUsize {
        &self.open
    }
}

impl crate::table::Candidate for Backend {
    fn down_until_ms(&self) -> u64 {
        self.down_until_ms.load(Ordering::Relaxed)
    }
}

/// The compiled TCP table: listen port to route.
type Table = HashMap<u16, Arc<Route>>;

/// The listeners, and what they should be.
#[derive(Debug, Default)]
struct Listeners {
    /// The ports of the last table.
    desired: BTreeSet<u16>,
    /// Accept loops of the ports bound now.
    bound: HashMap<u16, JoinHandle<()>>,
    /// Ports that could not be bound, so that the failure is logged once
    /// (and its recovery once), not on every retry.
    failing: BTreeSet<u16>,
    /// Shutdown began: bind nothing more.
    stopped: bool,
}

#[derive(Debug)]
struct Inner {
    settings: Settings,
    runtime: tokio::runtime::Handle,
    table: ArcSwap<Table>,
    backends: Mutex<HashMap<String, Weak<Backend>>>,
    listeners: Mutex<Listeners>,
    metrics: Arc<TcpMetrics>,
    /// Client connections open now, every port together.
    active: AtomicUsize,
    started: Instant,
}

/// The TCP side of a running router. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct TcpRoutes {
    inner: Arc<Inner>,
}

impl TcpRoutes {
    /// Starts the TCP runtime, with no listener until a table is applied.
    /// The returned receiver fires once shutdown (on `stop`) has finished:
    /// listeners closed, open connections ended or cut after the grace.
    pub fn start(
        settings: Settings,
        metrics: Arc<TcpMetrics>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(TcpRoutes, oneshot::Receiver<()>), RouterError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.threads.max(1))
            .thread_name("keel-router-tcp")
            .enable_all()
            .build()
            .map_err(RouterError::Runtime)?;
        let inner = Arc::new(Inner {
            settings,
            runtime: runtime.handle().clone(),
            table: ArcSwap::from_pointee(Table::new()),
            backends: Mutex::new(HashMap::new()),
            listeners: Mutex::new(Listeners::default()),
            metrics,
            active: AtomicUsize::new(0),
            started: Instant::now(),
        });
        let (finished, finished_rx) = oneshot::channel();
        let control = inner.clone();
        std::thread::Builder::new()
            .name("keel-router-tcp-control".into())
            .spawn(move || {
                runtime.block_on(async {
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep(RETRY_BIND) => control.reconcile(),
                            () = crate::stopped(&mut stop) => break,
                        }
                    }
                    control.close_all();
                    let deadline = Instant::now() + control.settings.grace;
                    while control.active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
                // Cuts what is still open.
                runtime.shutdown_background();
                let _ = finished.send(());
            })
            .map_err(RouterError::Runtime)?;
        Ok((TcpRoutes { inner }, finished_rx))
    }

    /// Takes a new table: its TCP routes serve new connections from now
    /// on, and listeners are opened and closed to match its ports before
    /// this returns (a closed listener's accept loop ends moments later).
    pub fn apply(&self, wire: &RouteTable) {
        let inner = &self.inner;
        let mut table = Table::new();
        for entry in &wire.routes {
            let Some(port) = entry.listen_port else {
                continue;
            };
            let app = format!("{}/{}", entry.project, entry.app);
            if let Some(first) = table.get(&port) {
                // The controller gives a port one owner; a hand-written
                // table may not.
                tracing::warn!(port, app, kept = %first.app, "two TCP routes for one listen port; keeping the first");
                continue;
            }
            let backends = entry.backends.iter().map(|a| inner.backend(a)).collect();
            table.insert(
                port,
                Arc::new(Route {
                    app,
                    backends,
                    next: AtomicUsize::new(0),
                }),
            );
        }
        let ports: BTreeSet<u16> = table.keys().copied().collect();
        inner.table.store(Arc::new(table));
        inner
            .backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, b| b.strong_count() > 0);
        inner.lock_listeners().desired = ports;
        inner.reconcile();
    }
}

impl Inner {
    fn lock_listeners(&self) -> std::sync::MutexGuard<'_, Listeners> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn backend(&self, addr: &str) -> Arc<Backend> {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(backend) = backends.get(addr).and_then(Weak::upgrade) {
            return backend;
        }
        let backend = Arc::new(Backend {
            addr: addr.to_owned(),
            open: AtomicUsize::new(0),
            down_until_ms: AtomicU64::new(0),
        });
        backends.insert(addr.to_owned(), Arc::downgrade(&backend));
        backend
    }

    /// Opens and closes listeners to match the desired ports; level
    /// triggered, so calling it again only retries what failed.
    fn reconcile(self: &Arc<Self>) {
        let mut listeners = self.lock_listeners();
        if listeners.stopped {
            return;
        }
        let Listeners {
            desired,
            bound,
            failing,
            ..
        } = &mut *listeners;
        bound.retain(|port, accept| {
            if desired.contains(port) {
                return true;
            }
            // Only the accept loop ends: connections are tasks of their own.
            accept.abort();
            self.metrics.port(*port).set_listening(false);
            tracing::info!(port, "TCP route gone; listener closed");
            false
        });
        failing.retain(|port| desired.contains(port));
        for &port in desired.iter() {
            if bound.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(self.settings.ip, port);
            let metrics = self.metrics.port(port);
            match bind(addr) {
                Ok(listener) => {
                    if failing.remove(&port) {
                        tracing::info!(%addr, "TCP route's port is free now; listening");
                    } else {
                        tracing::info!(%addr, "listening for a TCP route");
                    }
                    metrics.set_listening(true);
                    let accept =
                        self.runtime
                            .spawn(accept_loop(self.clone(), port, listener, metrics));
                    bound.insert(port, accept);
                }
                Err(error) => {
                    metrics.listen_error();
                    if failing.insert(port) {
                        tracing::error!(
                            %addr,
                            %error,
                            retry_every_s = RETRY_BIND.as_secs(),
                            "cannot listen for a TCP route; its connections are not served \
                             until the port is free"
                        );
                    }
                }
            }
        }
    }

    fn close_all(&self) {
        let mut listeners = self.lock_listeners();
        listeners.stopped = true;
        for (port, accept) in listeners.bound.drain() {
            accept.abort();
            self.metrics.port(port).set_listening(false);
        }
    }
}

/// A listening socket on `addr`. `SO_REUSEADDR` lets a port come back
/// while connections of its previous listener linger in TIME_WAIT; without
/// `SO_REUSEPORT`, a port another socket listens on (the router's own HTTP
/// listeners included) is refused rather than shared.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

async fn accept_loop(
    inner: Arc<Inner>,
    port: u16,
    listener: std::net::TcpListener,
    metrics: Arc<PortMetrics>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(port, %error, "cannot serve a TCP route's listener");
            metrics.set_listening(false);
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(serve(inner.clone(), port, client, peer, metrics.clone()));
            }
            Err(error) => {
                // Out of file descriptors, mostly: let some close.
                tracing::warn!(port, %error, "accepting a TCP connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A client connection counted as open, until it ends however it ends.
struct Open<'a> {
    active: &'a AtomicUsize,
    metrics: &'a PortMetrics,
}

impl<'a> Open<'a> {
    /// `None`, and the connection counted as refused, when the router has
    /// `max_connections` TCP connections open already.
    fn new(inner: &'a Inner, metrics: &'a PortMetrics) -> Option<Self> {
        let max = inner.settings.limits.max_connections;
        if inner.active.fetch_add(1, Ordering::Relaxed) >= max {
            inner.active.fetch_sub(1, Ordering::Relaxed);
            metrics.refused();
            return None;
        }
        metrics.opened();
        Some(Open {
            active: &inner.active,
            metrics,
        })
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.metrics.closed();
    }
}

async fn serve(
    inner: Arc<Inner>,
    port: u16,
    mut client: TcpStream,
    peer: SocketAddr,
    metrics: Arc<PortMetrics>,
) {
    metrics.accepted();
    let Some(_open) = Open::new(&inner, &metrics) else {
        return;
    };
    // The table now, not the one the listener was opened with: a changed
    // set of instances applies to the next connection.
    let route = inner.table.load().get(&port).cloned();
    let connected = match &route {
        Some(route) => connect(&inner, route, port, &metrics).await,
        None => None,
    };
    let Some((mut upstream, backend)) = connected else {
        // Dropping the client closes it: with nothing to forward to, an
        // open connection would only make the client wait.
        metrics.no_backend();
        tracing::debug!(port, %peer, "no ready instance; TCP connection closed");
        return;
    };
    // Counted on its instance, for least-connections balancing, until the
    // connection ends however it ends.
    let _open_on_instance = InFlight::new(backend.clone());
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Each direction ends on its own: an EOF from one side becomes a
    // shutdown of the other's sending half, so a client that half-closes
    // still gets its answer.
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            tracing::debug!(port, %peer, backend = %backend.addr, sent, received, "TCP connection done");
        }
        Err(error) => {
            tracing::debug!(port, %peer, backend = %backend.addr, %error, "TCP connection ended with an error");
        }
    }
}

/// A connection to one of the route's instances: each is tried at most
/// once, in the balancing order; one that refuses or does not answer in
/// time is marked down for `backend_down_ms` and the next is tried.
async fn connect(
    inner: &Inner,
    route: &Route,
    port: u16,
    metrics: &PortMetrics,
) -> Option<(TcpStream, Arc<Backend>)> {
    let limits = &inner.settings.limits;
    let timeout = Duration::from_millis(limits.connect_timeout_ms);
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    while let Some(backend) = route
        .pick(inner.settings.balance, inner.now_ms(), &tried)
        .cloned()
    {
        let error = match crate::upstream::connect_stream(None, &backend.addr, timeout).await {
            Ok(stream) => return Some((stream, backend)),
            Err(error) => error,
        };
        metrics.upstream_error();
        backend
            .down_until_ms
            .store(inner.now_ms() + limits.backend_down_ms, Ordering::Relaxed);
        tracing::warn!(port, app = %route.app, backend = %backend.addr, %error, source = ?std::error::Error::source(&error), "cannot reach an instance for a TCP route; trying the next");
        tried.push(backend);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(addrs: &[&str]) -> Route {
        Route {
            app: "p/a".into(),
            backends: addrs
                .iter()
                .map(|a| {
                    Arc::new(Backend {
                        addr: (*a).to_owned(),
                        open: AtomicUsize::new(0),
                        down_until_ms: AtomicU64::new(0),
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    #[test]
    fn each_instance_is_tried_once_the_down_last() {
        let r = route(&["a", "b", "c"]);
        r.backends[0].down_until_ms.store(100, Ordering::Relaxed);
        let mut tried = Vec::new();
        while let Some(b) = r.pick(Balance::RoundRobin, 10, &tried).cloned() {
            tried.push(b);
        }
        let order: Vec<&str> = tried.iter().map(|b| b.addr.as_str()).collect();
        assert_eq!(order.len(), 3);
        assert_eq!(order[2], "a", "the one marked down comes last: {order:?}");
    }

    #[test]
    fn least_connections_prefers_the_idle_and_round_robin_takes_turns() {
        let r = route(&["a", "b", "c"]);
        r.backends[0].open.store(3, Ordering::Relaxed);
        r.backends[2].open.store(1, Ordering::Relaxed);
        for _ in 0..4 {
            let b = r
                .pick(Balance::LeastOutstanding, 0, &[])
                .map(|b| b.addr.clone());
            assert_eq!(b.as_deref(), Some("b"));
        }
        let turns: BTreeSet<String> = (0..3)
            .filter_map(|_| r.pick(Balance::RoundRobin, 0, &[]).map(|b| b.addr.clone()))
            .collect();
        assert_eq!(turns.len(), 3);
        assert!(route(&[]).pick(Balance::RoundRobin, 0, &[]).is_none());
    }
}
