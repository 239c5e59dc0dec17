//! The controller: Keel's brain. It serves the REST API, owns the cluster
//! store, and (as it grows) runs the scheduler and the reconcilers.
//!
//! Architecture Invariant: the controller is the only component that opens
//! the store; agents, routers and the CLI reach state through its API.
//! Architecture Invariant: HTTP stays in `api`; `apps` and the logic under
//! it never see a request or a status code.

#![forbid(unsafe_code)]

pub mod agents;
pub mod api;
pub mod apps;
pub mod auth;
pub mod certs;
pub mod changes;
pub mod console;
mod hub;
pub mod instances;
pub mod nodes;
pub mod reconcile;
pub mod records;
pub mod routes;
mod writes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_store::StoreConfig;

pub use auth::NewToken;

/// How to run a controller.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the API listens; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Where the controller keeps its files (the embedded store, the admin
    /// token file).
    pub data_dir: PathBuf,
    /// The store; `None` is the embedded store in `data_dir/store.redb`.
    pub store: Option<StoreConfig>,
    /// A node whose heartbeats stop for this long is lost (whole seconds).
    pub node_lost_after: Duration,
    /// How many revisions of each app are kept (at least 1; the current
    /// one and the one a plain rollback goes back to are always kept).
    pub revision_history: usize,
}

impl ServerConfig {
    /// Defaults for everything but where to listen and keep files.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            data_dir: data_dir.into(),
            store: None,
            node_lost_after: Duration::from_secs(5),
            revision_history: apps::DEFAULT_REVISION_HISTORY,
        }
    }
}

/// A running controller. Dropping it does not stop it; call [`Server::shutdown`].
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    /// Set only on the start that made the admin token.
    pub new_admin_token: Option<NewToken>,
    pub admin_token_file: PathBuf,
    /// Set only on the start that made the join token.
    pub new_join_token: Option<NewToken>,
    pub join_token_file: PathBuf,
    shutdown: tokio::sync::oneshot::Sender<()>,
    stopping: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    reconciler: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(config: ServerConfig) -> anyhow::Result<Server> {
        if config.revision_history == 0 {
            anyhow::bail!("the revision history must keep at least 1 revision of each app, not 0");
        }
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!(
                "cannot create the data directory {}",
                config.data_dir.display()
            )
        })?;
        let store_config = config
            .store
            .clone()
            .unwrap_or_else(|| StoreConfig::embedded(config.data_dir.join("store.redb")));
        let store = keel_store::open(&store_config)
            .await
            .context("cannot open the cluster store")?;
        let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
        let admin_token_file = config.data_dir.join("admin.token");
        let join_token_file = config.data_dir.join("join.token");
        let (auth, new_admin_token, new_join_token) =
            auth::Auth::load_or_create(&store, &admin_token_file, &join_token_file).await?;
        let state = api::ApiState {
            apps: apps::Apps::new(store.clone()).with_revision_history(config.revision_history),
            store: store.clone(),
            nodes: Arc::new(nodes::Nodes::new(store.clone(), config.node_lost_after)),
            agents: agents::Agents::new(store.clone()),
            routes: routes::Routes::new(store.clone()),
            certs: certs::Certs::new(store.clone()),
            changes: changes::Changes::new(store.clone()),
            auth: Arc::new(auth),
            stopping: stopping_rx,
        };
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        // The grace period after a start is one lost-after period: a node
        // is declared lost only after the controller could have heard it.
        let reconciler = reconcile::Reconciler::new(store)
            .with_grace(config.node_lost_after)
            .spawn(Duration::from_secs(1));
        let app = api::router(state);
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!(%addr, "controller API listening");
        Ok(Server {
            addr,
            new_admin_token,
            admin_token_file,
            new_join_token,
            join_token_file,
            shutdown,
            stopping,
            task,
            reconciler,
        })
    }

    /// Stops accepting, finishes in-flight requests, and closes the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stopping.send(true);
        let _ = self.shutdown.send(());
        self.task.await.context("API task panicked")??;
        self.reconciler.abort();
        let _ = self.reconciler.await;
        Ok(())
    }
}
