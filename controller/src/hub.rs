//! One store watch shared by every client of a feed (the routers' route
//! table, the change feed), fanned out to their connections.
//!
//! A feed's producer (a store watch turned into a stream of whole values)
//! runs once, however many clients follow it, and only while at least one
//! does: the first subscriber starts it, the last one to leave stops it,
//! and when the producer ends (the store closed, or history was compacted
//! under it) every client's stream ends, so clients reconnect to a fresh
//! one. Each value is self-contained (a whole table; what changed as of a
//! revision), so the hub keeps only the latest: a connection that reads
//! slowly skips to the newest value when it reads again (it is resynced),
//! never holds anyone else up, and costs the same memory however far
//! behind it is.

use std::future::Future;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::{Mutex, watch};

use crate::api::ApiError;

/// A feed of values of type `T`, shared by its subscribers.
#[derive(Debug)]
pub(crate) struct Hub<T> {
    running: Arc<Mutex<Option<Arc<watch::Sender<T>>>>>,
}

impl<T> Default for Hub<T> {
    fn default() -> Self {
        Self {
            running: Arc::default(),
        }
    }
}

impl<T: Send + Sync + 'static> Hub<T> {
    /// Follows the running feed, or starts it with `start` (its first
    /// value and the stream of the next ones) when none runs.
    pub(crate) async fn subscribe<S, Fut>(
        &self,
        start: impl FnOnce() -> Fut,
    ) -> Result<watch::Receiver<T>, ApiError>
    where
        Fut: Future<Output = Result<(T, S), ApiError>>,
        S: Stream<Item = T> + Send + Unpin + 'static,
    {
        let mut running = self.running.lock().await;
        if let Some(feed) = running.as_ref() {
            return Ok(feed.subscribe());
        }
        let (first, mut updates) = start().await?;
        let (feed, receiver) = watch::channel(first);
        let feed = Arc::new(feed);
        *running = Some(feed.clone());
        drop(running);
        let slot = self.running.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    update = updates.next() => match update {
                        Some(value) => {
                            feed.send_replace(value);
                        }
                        None => break,
                    },
                    () = feed.closed() => {
                        // Subscribing takes the same lock, so nobody can
                        // join between this check and the stop.
                        let mut running = slot.lock().await;
                        if feed.receiver_count() == 0 {
                            *running = None;
                            return;
                        }
                    }
                }
            }
            let mut running = slot.lock().await;
            if running.as_ref().is_some_and(|r| Arc::ptr_eq(r, &feed)) {
                *running = None;
            }
            // Dropping the sender ends every subscriber's stream.
        });
        Ok(receiver)
    }

    /// Whether a producer runs (some client follows the feed).
    pub(crate) async fn is_running(&self) -> bool {
        self.running.lock().await.is_some()
    }
}

/// A subscriber's values: the current one at once, then the latest each
/// time it changes (intermediate values a slow reader missed are skipped),
/// until the feed ends.
pub(crate) fn follow<T: Clone + Send + Sync + 'static>(
    receiver: watch::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::unfold((receiver, true), |(mut receiver, first)| async move {
        if !first && receiver.changed().await.is_err() {
            return None;
        }
        let value = receiver.borrow_and_update().clone();
        Some((value, (receiver, false)))
    })
}
