//! The route table: every route of every app with the addresses of its
//! ready instances, computed from the store, and published to routers as a
//! stream that sends the whole table again whenever it changes.
//!
//! Routers swap the table in whole, so each message is self-contained: a
//! router that missed one loses nothing by taking the next. That is what
//! lets every router share one store watch and one computation of the
//! table per change (see `hub.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use keel_manifest::{Protocol, Route, TlsMode};
use keel_protocol::{InstanceRef, RouteEntry, RouteTable, RouteTls};
use keel_store::{Revision, Store};

use crate::agents::{StatusRecord, status_keys};
use crate::api::ApiError;
use crate::apps::{decode, list_records};
use crate::hub::Hub;
use crate::instances::{InstanceRecord, keys as instance_keys};
use crate::records::{AppRecord, RevisionRecord, keys};

#[derive(Debug, Clone)]
pub struct Routes {
    store: Arc<dyn Store>,
    /// The route-table feed every router's stream follows.
    hub: Arc<Hub<bytes::Bytes>>,
}

impl Routes {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            hub: Arc::default(),
        }
    }

    /// The table as routers get it: with the stored certificates and their
    /// keys.
    pub async fn table_for_routers(&self) -> Result<RouteTable, ApiError> {
        let mut table = self.table().await?;
        table.certificates = crate::certs::Certs::new(self.store.clone())
            .for_routers()
            .await?;
        Ok(table)
    }

    /// The table as the store holds it now, without certificates (they
    /// carry private keys, which only routers get).
    pub async fn table(&self) -> Result<RouteTable, ApiError> {
        let store = self.store.as_ref();
        let generation = store.status().await?.revision;
        let apps: Vec<(AppRecord, Revision)> = list_records(store, &keys::apps(None)).await?;
        let instances: Vec<(InstanceRecord, Revision)> =
            list_records(store, &instance_keys::instances(None)).await?;
        let statuses: Vec<(StatusRecord, Revision)> =
            list_records(store, &status_keys::statuses(None)).await?;
        let statuses: BTreeMap<InstanceRef, StatusRecord> = statuses
            .into_iter()
            .map(|(s, _)| (s.status.instance.clone(), s))
            .collect();
        // Ready instances of each app, with the ports their agents published.
        let mut ready: BTreeMap<(String, String), Vec<&StatusRecord>> = BTreeMap::new();
        for (instance, _) in &instances {
            let reference = InstanceRef {
                project: instance.project.clone(),
                app: instance.app.clone(),
                id: instance.id.clone(),
            };
            if let Some(status) = statuses.get(&reference)
                && status.status.ready
                && instance.node.as_deref() == Some(status.node.as_str())
            {
                ready
                    .entry((instance.project.clone(), instance.app.clone()))
                    .or_default()
                    .push(status);
            }
        }
        let mut routes = Vec::new();
        for (app, _) in apps {
            let Some(kv) = store
                .get(&keys::revision(&app.project, &app.name, app.revision))
                .await?
            else {
                continue;
            };
            let revision: RevisionRecord = decode(&kv)?;
            let manifest = &revision.manifest;
            let serving = ready.get(&(app.project.clone(), app.name.clone()));
            for route in &manifest.routes {
                let port = route.port();
                let protocol = manifest
                    .ports
                    .iter()
                    .find(|p| p.name == port)
                    .map_or(Protocol::Http, |p| p.protocol);
                let mut backends: Vec<String> = serving
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.status.ports.get(port).cloned())
                    .collect();
                backends.sort();
                let mut entry = RouteEntry {
                    host: String::new(),
                    path: "/".to_owned(),
                    tls: RouteTls::Off,
                    project: app.project.clone(),
                    app: app.name.clone(),
                    port: port.to_owned(),
                    protocol: match protocol {
                        Protocol::Http => "http",
                        Protocol::Tcp => "tcp",
                    }
                    .to_owned(),
                    backends,
                    redirect_https: false,
                    hsts: false,
                    listen_port: None,
                };
                match route {
                    Route::Host(route) => {
                        entry.host = route.host.clone();
                        entry.path = route.path.clone();
                        entry.tls = match route.tls {
                            TlsMode::Terminate => RouteTls::Terminate,
                            TlsMode::Passthrough => RouteTls::Passthrough,
                            TlsMode::Off => RouteTls::Off,
                        };
                        entry.redirect_https = route.redirect_https;
                        entry.hsts = route.hsts;
                    }
                    Route::Tcp(route) => entry.listen_port = Some(route.listen_port),
                }
                routes.push(entry);
            }
        }
        // Plain TCP routes (no host) first, by port; then by host and path.
        routes.sort_by(|a, b| {
            (&a.host, &a.path, a.listen_port).cmp(&(&b.host, &b.path, b.listen_port))
        });
        Ok(RouteTable {
            generation,
            routes,
            certificates: Vec::new(),
        })
    }

    /// The table now, then again each time it changes, as JSON lines,
    /// until the stream is dropped or the store watch ends. Every router
    /// follows one shared store watch and one computation of the table per
    /// change; a router that reads slowly gets the newest table when it
    /// reads again.
    pub async fn watch(
        &self,
    ) -> Result<impl futures::Stream<Item = bytes::Bytes> + Send + 'static, ApiError> {
        let this = self.clone();
        let feed = self.hub.subscribe(|| this.start_feed()).await?;
        Ok(crate::hub::follow(feed))
    }

    /// Whether the shared route-table feed runs (some router follows it).
    pub async fn feed_running(&self) -> bool {
        self.hub.is_running().await
    }

    /// The shared feed: the table now, and a stream of the tables that
    /// differ from the one before, from one store watch.
    async fn start_feed(
        self,
    ) -> Result<
        (
            bytes::Bytes,
            std::pin::Pin<Box<dyn futures::Stream<Item = bytes::Bytes> + Send>>,
        ),
        ApiError,
    > {
        let first = self.table_for_routers().await?;
        let changes = self.store.watch("/keel/", first.generation + 1).await?;
        let line = table_line(&first)?;
        let last = (first.routes, first.certificates);
        let updates = futures::stream::unfold(
            (changes, self, last),
            |(mut changes, this, mut last)| async move {
                loop {
                    // Wait for a change that can move the table...
                    loop {
                        match changes.next().await {
                            Some(Ok(event)) if moves_routes(&event.kv.key) => break,
                            Some(Ok(_)) => continue,
                            _ => return None,
                        }
                    }
                    // ...let its burst land, then compute once.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    while let Some(Some(Ok(_))) = changes.next().now_or_never() {}
                    let table = match this.table_for_routers().await {
                        Ok(table) => table,
                        Err(error) => {
                            tracing::warn!(error = %error, "cannot compute the route table; route streams end");
                            return None;
                        }
                    };
                    if (&table.routes, &table.certificates) == (&last.0, &last.1) {
                        continue;
                    }
                    let line = table_line(&table).ok()?;
                    last = (table.routes, table.certificates);
                    return Some((line, (changes, this, last)));
                }
            },
        );
        Ok((line, Box::pin(updates)))
    }
}

/// A table as one line of the stream.
fn table_line(table: &RouteTable) -> Result<bytes::Bytes, ApiError> {
    let mut line = serde_json::to_vec(table).map_err(|e| ApiError::Internal(e.to_string()))?;
    line.push(b'\n');
    Ok(bytes::Bytes::from(line))
}

/// Keys whose changes can change the route table.
fn moves_routes(key: &str) -> bool {
    [
        "/keel/apps/",
        "/keel/revisions/",
        "/keel/instances/",
        "/keel/status/",
        "/keel/certs/",
    ]
    .iter()
    .any(|prefix| key.starts_with(prefix))
}
