//! The change feed: which kinds of resource changed, as they change, for
//! clients that show the cluster live (the console) and re-read what they
//! show rather than apply deltas.
//!
//! Each stream holds its own store watch on everything under `/keel/`
//! from the revision it was opened at, so it misses nothing and needs no
//! shared state; the cost is one watch per open console, which is what a
//! human-facing view can afford. Bursts (a scale writes many instances)
//! become one message.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use keel_store::Store;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::api::ApiError;

/// One message of the change feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Changed {
    /// The store revision the message is current to.
    pub revision: i64,
    /// Which kinds of resource changed: `projects`, `apps` (an app, its
    /// revisions or its health), `instances` (placement or reported
    /// state), `nodes` (registration, drain or liveness), `events`. The
    /// first message has none: re-read everything from there.
    pub changed: BTreeSet<&'static str>,
}

/// How long a burst of changes may take to land before it is reported.
const SETTLE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct Changes {
    store: Arc<dyn Store>,
}

/// The kind of resource a key belongs to, if clients see it.
fn kind(key: &str) -> Option<&'static str> {
    let rest = key.strip_prefix(crate::records::ROOT)?;
    let kind = match rest.split('/').next()? {
        "projects" => "projects",
        "apps" | "revisions" | "health" => "apps",
        "instances" | "status" => "instances",
        "nodes" | "alive" => "nodes",
        "events" => "events",
        _ => return None,
    };
    Some(kind)
}

fn note(event: keel_store::WatchEvent, message: &mut Changed) {
    message.revision = message.revision.max(event.revision());
    if let Some(kind) = kind(&event.kv.key) {
        message.changed.insert(kind);
    }
}

impl Changes {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// A first message with nothing changed, then one per burst of
    /// changes, until the receiver is dropped or the store watch ends.
    pub async fn watch(&self) -> Result<mpsc::Receiver<Changed>, ApiError> {
        let revision = self.store.status().await?.revision;
        let mut events = self.store.watch(crate::records::ROOT, revision + 1).await?;
        let (tx, rx) = mpsc::channel(16);
        let _ = tx.try_send(Changed {
            revision,
            changed: BTreeSet::new(),
        });
        tokio::spawn(async move {
            loop {
                let mut message = Changed {
                    revision,
                    changed: BTreeSet::new(),
                };
                // Wait for a change clients see...
                while message.changed.is_empty() {
                    let event = tokio::select! {
                        event = events.next() => event,
                        () = tx.closed() => return,
                    };
                    match event {
                        Some(Ok(event)) => note(event, &mut message),
                        // The store closed or compacted past us: the stream
                        // ends and the client opens a new one.
                        _ => return,
                    }
                }
                // ...let the rest of its burst land, and say it once.
                tokio::time::sleep(SETTLE).await;
                while let Some(Some(Ok(event))) = events.next().now_or_never() {
                    note(event, &mut message);
                }
                if tx.send(message).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::kind;

    #[test]
    fn keys_map_to_the_kinds_clients_show() {
        assert_eq!(kind("/keel/apps/shop/web"), Some("apps"));
        assert_eq!(kind("/keel/revisions/shop/web/000000000001"), Some("apps"));
        assert_eq!(kind("/keel/status/shop/web/1-ab"), Some("instances"));
        assert_eq!(kind("/keel/alive/node-1"), Some("nodes"));
        assert_eq!(
            kind("/keel/events/0000000000000001-00000000-000"),
            Some("events")
        );
        assert_eq!(kind("/keel/auth/admin"), None);
        assert_eq!(kind("/elsewhere/apps/x"), None);
    }
}
