//! Watches on the embedded store.
//!
//! The writer publishes each committed batch to the [`Hub`] under its lock,
//! together with the batch's revision. A watch registers under the same lock
//! and learns the revision R it starts to receive live events after; it then
//! replays history up to and including R from a read snapshot (which holds
//! every commit up to R, since the writer commits before it publishes), and
//! goes on with the live batches. Nothing falls between the two, and a
//! revision is never delivered twice because the watch remembers the next
//! revision it owes and skips anything older.
//!
//! A watcher that does not keep up is not allowed to hold memory without
//! bound: when its buffer is full the hub drops it, and the watch task
//! registers again and catches up from the file. Only when the history it
//! needs was compacted in the meantime does the consumer see an error.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use redb::{Database, ReadableDatabase};

use super::DbSlot;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Corrupt, LOG, ReadError, codec, read_meta};
use crate::{Revision, StoreError, WatchEvent, WatchStream};

type Batch = Arc<[WatchEvent]>;

#[derive(Debug)]
pub(super) struct Hub {
    inner: Mutex<HubInner>,
    buffer: usize,
}

#[derive(Debug)]
struct HubInner {
    revision: Revision,
    closed: bool,
    subscribers: Vec<Subscriber>,
}

#[derive(Debug)]
struct Subscriber {
    prefix: String,
    sender: mpsc::Sender<Batch>,
}

impl Hub {
    pub(super) fn new(revision: Revision, buffer: usize) -> Self {
        Self {
            inner: Mutex::new(HubInner {
                revision,
                closed: false,
                subscribers: Vec::new(),
            }),
            buffer: buffer.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
        // A panic while holding this lock cannot leave the list half-edited
        // in a way that matters (at worst a subscriber is kept or dropped),
        // so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Delivers a committed batch (every event of revisions up to
    /// `revision`) to the subscribers whose prefix matches.
    pub(super) fn publish(&self, revision: Revision, events: Vec<WatchEvent>) {
        let mut inner = self.lock();
        inner.revision = revision;
        if events.is_empty() {
            return;
        }
        let all: Batch = events.into();
        inner.subscribers.retain(|subscriber| {
            let batch: Batch = if subscriber.prefix.is_empty() {
                all.clone()
            } else {
                let matching: Vec<WatchEvent> = all
                    .iter()
                    .filter(|event| event.kv.key.starts_with(&subscriber.prefix))
                    .cloned()
                    .collect();
                if matching.is_empty() {
                    return true;
                }
                matching.into()
            };
            // Full: the watcher lags and resynchronises from the file.
            // Closed: the watch was dropped.
            subscriber.sender.try_send(batch).is_ok()
        });
    }

    /// The revision of the last published batch: the last one made durable.
    pub(super) fn revision(&self) -> Revision {
        self.lock().revision
    }

    pub(super) fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.subscribers.clear();
    }

    /// Registers a subscriber; returns its receiver and the revision after
    /// which it receives every batch, or `None` when the store is closed.
    fn subscribe(&self, prefix: &str) -> Option<(mpsc::Receiver<Batch>, Revision)> {
        let mut inner = self.lock();
        if inner.closed {
            return None;
        }
        let (sender, receiver) = mpsc::channel(self.buffer);
        inner.subscribers.push(Subscriber {
            prefix: prefix.to_owned(),
            sender,
        });
        Some((receiver, inner.revision))
    }
}

/// Starts a watch task and returns the consumer's end of it.
pub(super) fn spawn(
    db: Weak<DbSlot>,
    path: PathBuf,
    hub: Arc<Hub>,
    prefix: String,
    start: Revision,
) -> WatchStream {
    let (out, events) = mpsc::channel(256);
    tokio::spawn(async move {
        if let Err(error) = run(db, path, hub, prefix, start, &out).await {
            let _ = out.send(Err(error)).await;
        }
    });
    Box::pin(ReceiverStream::new(events))
}

/// The consumer dropped its stream: the watch simply ends.
struct Gone;

async fn run(
    db: Weak<DbSlot>,
    path: PathBuf,
    hub: Arc<Hub>,
    prefix: String,
    start: Revision,
    out: &mpsc::Sender<Result<WatchEvent, StoreError>>,
) -> Result<(), StoreError> {
    let mut next = start;
    loop {
        let Some((mut live, registered)) = hub.subscribe(&prefix) else {
            return Err(StoreError::Closed);
        };
        if next == 0 {
            next = registered + 1;
        }
        if next <= registered {
            let db = db
                .upgrade()
                .ok_or(StoreError::Closed)?
                .get(&path, "watch replay")?;
            let (path, prefix, out) = (path.clone(), prefix.clone(), out.clone());
            let replayed = tokio::task::spawn_blocking(move || {
                replay(&db, &path, &prefix, next, registered, &out)
            })
            .await
            .map_err(|_| StoreError::Closed)?;
            match replayed {
                Ok(Ok(())) => next = registered + 1,
                Ok(Err(Gone)) => return Ok(()),
                Err(error) => return Err(error),
            }
        }
        while let Some(batch) = live.recv().await {
            let mut last = None;
            for event in batch.iter().filter(|event| event.revision() >= next) {
                last = Some(event.revision());
                if out.send(Ok(event.clone())).await.is_err() {
                    return Ok(());
                }
            }
            if let Some(last) = last {
                next = last + 1;
            }
        }
        // The hub dropped us: either we lagged (register again and catch
        // up from the file) or the store closed (the next subscribe says so).
        tracing::debug!(prefix = %prefix, next, "watcher lagged; resynchronising from history");
    }
}

/// Sends every event of revisions `from..=to` under `prefix` from one read
/// snapshot of the file.
fn replay(
    db: &Database,
    path: &std::path::Path,
    prefix: &str,
    from: Revision,
    to: Revision,
    out: &mpsc::Sender<Result<WatchEvent, StoreError>>,
) -> Result<Result<(), Gone>, StoreError> {
    let read = || -> Result<Result<(), Gone>, ReadError> {
        let txn = db.begin_read()?;
        let compacted = read_meta(&txn, "compacted")?;
        if from < compacted {
            return Err(ReadError::Compacted(compacted));
        }
        let log = match txn.open_table(LOG) {
            Ok(log) => log,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Ok(())),
            Err(e) => return Err(e.into()),
        };
        for entry in log.range(from..=to)? {
            let (revision, bytes) = entry?;
            let events = codec::decode_events(bytes.value()).map_err(|detail| Corrupt {
                key: format!("history of revision {}", revision.value()),
                detail,
            })?;
            for event in events
                .into_iter()
                .filter(|event| event.kv.key.starts_with(prefix))
            {
                if out.blocking_send(Ok(event)).is_err() {
                    return Ok(Err(Gone));
                }
            }
        }
        Ok(Ok(()))
    };
    read().map_err(|e| e.into_store_error(path, "watch replay"))
}
