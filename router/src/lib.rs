//! Keel's router: HTTP, HTTPS, TLS-passthrough and plain TCP ingress to
//! the ready instances of every app, on any node with the `router` role.
//!
//! It is fed by the controller's route table stream (or a fixed table for
//! tests and benchmarks) and swaps each table in atomically: requests in
//! flight and open connections keep the route and instance they started
//! with, and instances' connection pools and health marks carry over to
//! the next table. When the controller is unreachable the last table keeps
//! serving.
//!
//! ```no_run
//! # async fn example() -> Result<(), keel_router::RouterError> {
//! use keel_router::{Router, RouterConfig, TableSource};
//! let handle = Router::start(RouterConfig {
//!     source: TableSource::controller("http://10.0.0.1:7070", "keel-node-...", "edge-1"),
//!     ..RouterConfig::default()
//! })?;
//! println!("serving on {:?}", handle.addresses());
//! handle.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Architecture Invariant: the router never opens the cluster store and
//! depends on no controller crate: what it knows comes over the API
//! (`keel-protocol` types only).

mod config;
mod metrics;
mod pool;
mod proxy;
mod server;
mod source;
mod table;
mod tcp;
mod tls;
mod upstream;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use config::{Balance, ControllerSource, Limits, RouterConfig, TableSource};
use keel_protocol::RouteTable;
pub use table::{CertError, certified_key};
pub use tls::{SelfSignedError, self_signed};
use tokio::sync::{oneshot, watch};

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here.
    let _ = stop.wait_for(|s| *s).await;
}

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the router's threads")]
    Runtime(#[source] std::io::Error),
    #[error("cannot read the route table file {path}")]
    TableFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the route table file {path} is not a valid route table")]
    TableJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot set up TLS")]
    Tls(#[source] rustls::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Where a running router listens (ports resolved when 0 was asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterAddresses {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// Where plain TCP routes listen, each on its own `listen_port`.
    pub tcp_ip: IpAddr,
}

/// The router; see [`Router::start`].
#[derive(Debug)]
pub struct Router;

/// A running router.
#[derive(Debug)]
pub struct RouterHandle {
    addresses: RouterAddresses,
    shared: Arc<proxy::Shared>,
    tcp: tcp::TcpRoutes,
    stop: watch::Sender<bool>,
    done: Vec<oneshot::Receiver<()>>,
}

impl Router {
    /// Binds the listeners and starts serving on threads of its own (so it
    /// may be called from inside or outside an async runtime). Returns once
    /// every listener is bound; with a fixed or file source the table is
    /// in place by then, with the controller source the router answers 503
    /// until the first table arrives.
    pub fn start(config: RouterConfig) -> Result<RouterHandle, RouterError> {
        let workers = match config.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        if config.limits.max_connections == 0 {
            return Err(RouterError::Config(
                "limits.max_connections must be at least 1".into(),
            ));
        }
        let shared = Arc::new(proxy::Shared::new(config.balance, config.limits.clone()));
        let first_table = match &config.source {
            TableSource::Fixed(table) => Some(table.clone()),
            TableSource::File(path) => Some(source::read_file(path)?),
            TableSource::Controller(_) => None,
        };
        if let Some(table) = &first_table {
            shared.swap(table);
        }

        // Bind everything first, so that a bad address fails `start`.
        let mut per_worker: Vec<server::WorkerListeners> = (0..workers)
            .map(|_| server::WorkerListeners {
                http: None,
                https: None,
            })
            .collect();
        let mut bind_all =
            |addr: Option<SocketAddr>,
             slot: fn(&mut server::WorkerListeners) -> &mut Option<std::net::TcpListener>|
             -> Result<Option<SocketAddr>, RouterError> {
                let Some(mut addr) = addr else {
                    return Ok(None);
                };
                for worker in per_worker.iter_mut() {
                    let listener = server::bind(addr)?;
                    // Port 0: every worker takes the port the first one got.
                    addr = listener
                        .local_addr()
                        .map_err(|source| RouterError::Bind { addr, source })?;
                    *slot(worker) = Some(listener);
                }
                Ok(Some(addr))
            };
        let http = bind_all(config.http_addr, |w| &mut w.http)?;
        let https = bind_all(config.https_addr, |w| &mut w.https)?;
        let metrics_listener = match config.metrics_addr {
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|source| RouterError::Bind { addr, source })?;
                listener
                    .set_nonblocking(true)
                    .map_err(|source| RouterError::Bind { addr, source })?;
                Some(listener)
            }
            None => None,
        };
        let metrics = match &metrics_listener {
            Some(listener) => Some(listener.local_addr().map_err(RouterError::Runtime)?),
            None => None,
        };
        let tls = match https {
            Some(_) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                tls::server_config(shared.clone()).map_err(RouterError::Tls)?,
            ))),
            None => None,
        };

        let (stop, stop_rx) = watch::channel(false);
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        let mut done = Vec::new();

        let tcp_ip = config
            .tcp_ip
            .or(config.http_addr.map(|a| a.ip()))
            .or(config.https_addr.map(|a| a.ip()))
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let (tcp, tcp_done) = tcp::TcpRoutes::start(
            tcp::Settings {
                ip: tcp_ip,
                balance: config.balance,
                limits: config.limits.clone(),
                threads: workers,
                grace,
            },
            shared.global.tcp.clone(),
            stop_rx.clone(),
        )?;
        done.push(tcp_done);
        if let Some(table) = &first_table {
            tcp.apply(table);
        }

        for (i, listeners) in per_worker.into_iter().enumerate() {
            let (finished, finished_rx) = oneshot::channel();
            done.push(finished_rx);
            let shared = shared.clone();
            let tls = tls.clone();
            let stop = stop_rx.clone();
            std::thread::Builder::new()
                .name(format!("keel-router-{i}"))
                .spawn(move || {
                    if let Err(error) = server::run_worker(i, shared, listeners, tls, stop, grace) {
                        tracing::error!(%error, "router worker failed");
                    }
                    let _ = finished.send(());
                })
                .map_err(RouterError::Runtime)?;
        }

        // The control thread: the table stream and `/metrics`, apart from
        // the workers so that neither waits on traffic.
        let (finished, finished_rx) = oneshot::channel();
        done.push(finished_rx);
        let controller = match &config.source {
            TableSource::Controller(source) => Some(source.clone()),
            _ => None,
        };
        let control_shared = shared.clone();
        let control_tcp = tcp.clone();
        let control_stop = stop_rx.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RouterError::Runtime)?;
        std::thread::Builder::new()
            .name("keel-router-control".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let mut tasks = Vec::new();
                    if let Some(source) = controller {
                        tasks.push(tokio::spawn(source::follow(
                            control_shared.clone(),
                            control_tcp,
                            source,
                            control_stop.clone(),
                        )));
                    }
                    if let Some(listener) = metrics_listener {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => tasks.push(tokio::spawn(server::serve_metrics(
                                listener,
                                control_shared.clone(),
                                control_stop.clone(),
                            ))),
                            Err(error) => tracing::error!(%error, "cannot serve /metrics"),
                        }
                    }
                    for task in tasks {
                        let _ = task.await;
                    }
                });
                let _ = finished.send(());
            })
            .map_err(RouterError::Runtime)?;

        Ok(RouterHandle {
            addresses: RouterAddresses {
                http,
                https,
                metrics,
                tcp_ip,
            },
            shared,
            tcp,
            stop,
            done,
        })
    }
}

impl RouterHandle {
    pub fn addresses(&self) -> RouterAddresses {
        self.addresses
    }

    /// Swaps in a table, as a stream update would (for a fixed source; with
    /// the controller source the next update replaces it).
    pub fn replace_table(&self, table: &RouteTable) {
        self.shared.swap(table);
        self.tcp.apply(table);
    }

    /// The generation of the table being served; `None` before the first.
    pub fn generation(&self) -> Option<i64> {
        self.shared.table.load().generation
    }

    /// Stops taking connections, lets requests in flight and open TCP
    /// route connections finish (up to `shutdown_grace_ms`), then closes
    /// what is left and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for done in self.done {
            let _ = done.await;
        }
    }
}
