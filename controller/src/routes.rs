//! The route table: every route of every app with the addresses of its
//! ready instances, computed from the store, and published to routers as a
//! stream that sends the whole table again whenever it changes.
//!
//! Routers swap the table in whole, so each message is self-contained: a
//! router that missed one loses nothing by taking the next.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use keel_manifest::{Protocol, Route, TlsMode};
use keel_protocol::{InstanceRef, RouteEntry, RouteTable, RouteTls};
use keel_store::{Revision, Store};
use tokio::sync::mpsc;

use crate::agents::{StatusRecord, status_keys};
use crate::api::ApiError;
use crate::apps::{decode, list_records};
use crate::instances::{InstanceRecord, keys as instance_keys};
use crate::records::{AppRecord, RevisionRecord, keys};

#[derive(Debug, Clone)]
pub struct Routes {
    store: Arc<dyn Store>,
}

impl Routes {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
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

    /// The table now, then again each time it changes, until the receiver
    /// is dropped or the store closes.
    pub async fn watch(&self) -> Result<mpsc::Receiver<RouteTable>, ApiError> {
        let first = self.table_for_routers().await?;
        let mut changes = self.store.watch("/keel/", first.generation + 1).await?;
        let (tx, rx) = mpsc::channel(4);
        let _ = tx.try_send(first.clone());
        let this = self.clone();
        tokio::spawn(async move {
            let mut last = (first.routes, first.certificates);
            loop {
                // Wait for a change that can move the table...
                let relevant = loop {
                    let event = tokio::select! {
                        event = changes.next() => event,
                        () = tx.closed() => return,
                    };
                    match event {
                        Some(Ok(event)) if moves_routes(&event.kv.key) => break true,
                        Some(Ok(_)) => continue,
                        _ => break false,
                    }
                };
                if !relevant {
                    return;
                }
                // ...let its burst land, then compute once.
                tokio::time::sleep(Duration::from_millis(10)).await;
                while let Some(Some(Ok(_))) = changes.next().now_or_never() {}
                let Ok(table) = this.table_for_routers().await else {
                    return;
                };
                if (&table.routes, &table.certificates) != (&last.0, &last.1) {
                    last = (table.routes.clone(), table.certificates.clone());
                    if tx.send(table).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
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
