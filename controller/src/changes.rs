//! The change feed: which kinds of resource changed, as they change, for
//! clients that show the cluster live (the console) and re-read what they
//! show rather than apply deltas.
//!
//! Every open stream follows one shared store watch on everything under
//! `/keel/` (see `hub.rs`), which keeps, per kind, the last revision that
//! changed it. Each stream remembers the revisions it has reported, so it
//! says exactly which kinds changed since its last message however slowly
//! it is read, and holds no queue. Bursts (a scale writes many
//! instances) become one message.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use keel_store::Store;
use serde::Serialize;

use crate::api::ApiError;
use crate::hub::Hub;

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
    hub: Arc<Hub<Arc<KindRevisions>>>,
}

/// What the shared feed publishes: the revision it is current to, and the
/// last revision that changed each kind.
#[derive(Debug, Default)]
struct KindRevisions {
    revision: i64,
    kinds: BTreeMap<&'static str, i64>,
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

/// Notes one event; says whether it changed a kind clients see.
fn note(event: &keel_store::WatchEvent, state: &mut KindRevisions) -> bool {
    state.revision = state.revision.max(event.revision());
    match kind(&event.kv.key) {
        Some(kind) => {
            state.kinds.insert(kind, event.revision());
            true
        }
        None => false,
    }
}

impl Changes {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            hub: Arc::default(),
        }
    }

    /// A first message with nothing changed, then one per burst of
    /// changes, until the stream is dropped or the store watch ends.
    pub async fn watch(
        &self,
    ) -> Result<impl futures::Stream<Item = Changed> + Send + 'static, ApiError> {
        let store = self.store.clone();
        let feed = self.hub.subscribe(|| start_feed(store)).await?;
        let mut seen: Option<Arc<KindRevisions>> = None;
        Ok(crate::hub::follow(feed).map(move |now| {
            let changed = match &seen {
                None => BTreeSet::new(),
                Some(seen) => now
                    .kinds
                    .iter()
                    .filter(|(kind, revision)| seen.kinds.get(*kind) < Some(revision))
                    .map(|(kind, _)| *kind)
                    .collect(),
            };
            let message = Changed {
                revision: now.revision,
                changed,
            };
            seen = Some(now);
            message
        }))
    }

    /// Whether the shared change feed runs (some client follows it).
    pub async fn feed_running(&self) -> bool {
        self.hub.is_running().await
    }
}

type Feed = (
    Arc<KindRevisions>,
    std::pin::Pin<Box<dyn futures::Stream<Item = Arc<KindRevisions>> + Send>>,
);

/// The shared feed: one store watch from now on, published once per burst
/// of changes that clients see.
async fn start_feed(store: Arc<dyn Store>) -> Result<Feed, ApiError> {
    let revision = store.status().await?.revision;
    let events = store.watch(crate::records::ROOT, revision + 1).await?;
    let first = Arc::new(KindRevisions {
        revision,
        kinds: BTreeMap::new(),
    });
    let updates =
        futures::stream::unfold((events, first.clone()), |(mut events, last)| async move {
            let mut state = KindRevisions {
                revision: last.revision,
                kinds: last.kinds.clone(),
            };
            // Wait for a change clients see...
            loop {
                match events.next().await {
                    Some(Ok(event)) => {
                        if note(&event, &mut state) {
                            break;
                        }
                    }
                    // The store closed or compacted past us: the streams
                    // end and their clients open new ones.
                    _ => return None,
                }
            }
            // ...let the rest of its burst land, and say it once.
            tokio::time::sleep(SETTLE).await;
            while let Some(Some(Ok(event))) = events.next().now_or_never() {
                note(&event, &mut state);
            }
            let state = Arc::new(state);
            Some((state.clone(), (events, state)))
        });
    Ok((first, Box::pin(updates)))
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
