//! The embedded backend: one redb file in the data directory.
//!
//! Why redb: it is pure Rust (no C toolchain in the build), its write
//! transactions are durable when `commit` returns (copy-on-write B-trees with
//! a checksummed commit, so a `kill -9` at any moment leaves the last commit
//! intact), and readers see snapshots without blocking the writer.
//!
//! Shape: a single writer thread owns every mutation. Callers send it
//! requests; it drains whatever is queued (up to `max_batch`), applies each
//! request in order inside one redb write transaction, commits once (one
//! fsync for the whole batch: group commit), then publishes the batch's events
//! to watchers and only then answers the callers. Each request keeps its own
//! revision and its own atomicity: a request that fails validation writes
//! nothing and does not disturb the others in its batch.
//!
//! Leases live with the writer too: their deadlines are in memory (reset to a
//! full TTL when the file is reopened, as etcd does on a leader change), their
//! TTLs and attached keys are in the file, and expiry is a revoke the writer
//! performs when a deadline passes.

mod codec;
mod watch;

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use tokio::sync::oneshot;

use crate::{
    EventKind, KeyValue, Lease, LeaseId, Op, RangePage, RangeRequest, Revision, Store, StoreError,
    StoreStatus, Txn, TxnResponse, WatchEvent, WatchStream, prefix_end, ttl_secs,
};
use watch::Hub;

/// Live keys: key -> record (see `codec`).
const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
/// History: revision -> the events of that revision.
const LOG: TableDefinition<i64, &[u8]> = TableDefinition::new("log");
/// Counters: "revision", "compacted", "next_lease".
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// Leases: id -> TTL in seconds.
const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
/// Keys attached to each lease.
const LEASE_KEYS: MultimapTableDefinition<i64, &[u8]> = MultimapTableDefinition::new("lease_keys");

/// Tuning of the embedded store; the defaults suit a controller.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// At most this many requests share one commit.
    pub max_batch: usize,
    /// Batches buffered per watcher before it is considered lagging and
    /// resynchronised from the file.
    pub watch_buffer: usize,
    /// redb's page cache, in bytes.
    pub cache_size_bytes: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            watch_buffer: 1024,
            cache_size_bytes: 64 << 20,
        }
    }
}

/// The embedded store. Cheap to clone; the file closes when the last clone
/// (and the last watch) is dropped.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    db: Arc<Database>,
    hub: Arc<Hub>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel stops the writer; joining it releases the file
        // before the store is gone, so the same process can reopen it.
        self.requests.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

enum Request {
    Txn(Txn, oneshot::Sender<Result<TxnResponse, StoreError>>),
    LeaseGrant(i64, oneshot::Sender<Result<Lease, StoreError>>),
    LeaseKeepAlive(LeaseId, oneshot::Sender<Result<i64, StoreError>>),
    LeaseRevoke(LeaseId, oneshot::Sender<Result<(), StoreError>>),
    Compact(Revision, oneshot::Sender<Result<(), StoreError>>),
}

/// What the writer knows between batches; reloaded from the file after a
/// failed commit so that memory never runs ahead of disk.
struct State {
    revision: Revision,
    compacted: Revision,
    next_lease: i64,
    /// Lease id -> (TTL in seconds, deadline).
    leases: HashMap<i64, (i64, Instant)>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`. A file that is not a
    /// store, or is corrupt, gives [`StoreError::Open`] naming the path.
    pub fn open(path: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let open_error = |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| open_error(e.into()))?;
        }
        let db = Database::builder()
            .set_cache_size(options.cache_size_bytes)
            .create(&path)
            .map_err(|e| open_error(e.into()))?;
        let db = Arc::new(db);
        let state = State::load(&db, &path)?;
        let hub = Arc::new(Hub::new(state.revision, options.watch_buffer));
        let (requests, receiver) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            path: path.clone(),
            hub: hub.clone(),
            state,
            options,
        };
        let writer = std::thread::Builder::new()
            .name("keel-store-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| open_error(e.into()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                db,
                hub,
                requests: Some(requests),
                writer: Some(writer),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn call<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let requests = self.inner.requests.as_ref().ok_or(StoreError::Closed)?;
        requests
            .send(request(reply))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn io_error(&self, operation: &'static str) -> impl Fn(redb::Error) -> StoreError + '_ {
        move |e| io_error(&self.inner.path, operation, e)
    }

    fn read<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, ReadError>,
    ) -> Result<T, StoreError> {
        let txn = self
            .inner
            .db
            .begin_read()
            .map_err(|e| self.io_error(operation)(e.into()))?;
        f(&txn).map_err(|e| e.into_store_error(&self.inner.path, operation))
    }
}

/// A failure inside a read: redb's, a record that does not decode, or
/// history that is gone.
enum ReadError {
    Redb(redb::Error),
    Corrupt(Corrupt),
    Compacted(Revision),
}

/// A record that does not decode, and under which key.
struct Corrupt {
    key: String,
    detail: String,
}

impl From<Corrupt> for ReadError {
    fn from(corrupt: Corrupt) -> Self {
        ReadError::Corrupt(corrupt)
    }
}

macro_rules! from_redb {
    ($($error:ty),*) => {$(
        impl From<$error> for ReadError {
            fn from(e: $error) -> Self {
                ReadError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError
);

impl ReadError {
    fn into_store_error(self, path: &Path, operation: &'static str) -> StoreError {
        match self {
            ReadError::Redb(e) => io_error(path, operation, e),
            ReadError::Corrupt(Corrupt { key, detail }) => StoreError::Corrupt {
                path: path.to_path_buf(),
                key,
                detail,
            },
            ReadError::Compacted(oldest) => StoreError::Compacted { oldest },
        }
    }
}

fn io_error(path: &Path, operation: &'static str, e: redb::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        operation,
        source: e.into(),
    }
}

fn decode_kv(key: &[u8], record: &[u8]) -> Result<KeyValue, Corrupt> {
    let key_text = String::from_utf8_lossy(key);
    let corrupt = |detail: String| Corrupt {
        key: key_text.to_string(),
        detail,
    };
    let key = std::str::from_utf8(key).map_err(|_| corrupt("key is not UTF-8".into()))?;
    codec::decode_record(key, record).map_err(corrupt)
}

fn read_meta(txn: &redb::ReadTransaction, name: &str) -> Result<i64, ReadError> {
    match txn.open_table(META) {
        Ok(table) => Ok(table.get(name)?.map_or(0, |v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// The revision of an empty store, as in etcd.
const FIRST_REVISION: Revision = 1;

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.read("get", |txn| {
            let table = match txn.open_table(KV) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let Some(record) = table.get(key.as_bytes())? else {
                return Ok(None);
            };
            Ok(Some(decode_kv(key.as_bytes(), record.value())?))
        })
    }

    async fn range(&self, request: &RangeRequest) -> Result<RangePage, StoreError> {
        self.read("range", |txn| {
            let revision = read_meta(txn, "revision")?.max(FIRST_REVISION);
            let table = match txn.open_table(KV) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => {
                    return Ok(RangePage {
                        kvs: Vec::new(),
                        more: false,
                        revision,
                    });
                }
                Err(e) => return Err(e.into()),
            };
            let end = prefix_end(&request.prefix);
            let lower = match &request.after {
                Some(after) if after.as_str() >= request.prefix.as_str() => {
                    Bound::Excluded(after.as_bytes())
                }
                _ => Bound::Included(request.prefix.as_bytes()),
            };
            let upper = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let mut kvs = Vec::new();
            let mut more = false;
            for entry in table.range::<&[u8]>((lower, upper))? {
                let (key, record) = entry?;
                if request.limit != 0 && kvs.len() == request.limit {
                    more = true;
                    break;
                }
                kvs.push(decode_kv(key.value(), record.value())?);
            }
            Ok(RangePage {
                kvs,
                more,
                revision,
            })
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        txn.check()?;
        self.call(|reply| Request::Txn(txn, reply)).await
    }

    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError> {
        if self.inner.requests.is_none() {
            return Err(StoreError::Closed);
        }
        Ok(watch::spawn(
            Arc::downgrade(&self.inner.db),
            self.inner.path.clone(),
            self.inner.hub.clone(),
            prefix.to_owned(),
            start,
        ))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let ttl = ttl_secs(ttl);
        self.call(|reply| Request::LeaseGrant(ttl, reply)).await
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64, StoreError> {
        self.call(|reply| Request::LeaseKeepAlive(id, reply)).await
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        self.call(|reply| Request::LeaseRevoke(id, reply)).await
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.call(|reply| Request::Compact(revision, reply)).await
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        let revision = self
            .read("status", |txn| read_meta(txn, "revision"))?
            .max(FIRST_REVISION);
        let db_size_bytes = std::fs::metadata(&self.inner.path)
            .map_err(|e| StoreError::Io {
                path: self.inner.path.clone(),
                operation: "status",
                source: e.into(),
            })?
            .len();
        Ok(StoreStatus {
            revision,
            db_size_bytes,
            location: self.inner.path.display().to_string(),
        })
    }
}

impl State {
    fn load(db: &Database, path: &Path) -> Result<State, StoreError> {
        let load = || -> Result<State, ReadError> {
            let txn = db.begin_read()?;
            let mut leases = HashMap::new();
            let now = Instant::now();
            match txn.open_table(LEASES) {
                Ok(table) => {
                    for entry in table.iter()? {
                        let (id, ttl) = entry?;
                        let ttl = ttl.value();
                        leases.insert(id.value(), (ttl, now + Duration::from_secs(ttl as u64)));
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
            Ok(State {
                revision: read_meta(&txn, "revision")?.max(FIRST_REVISION),
                compacted: read_meta(&txn, "compacted")?,
                next_lease: read_meta(&txn, "next_lease")?.max(1),
                leases,
            })
        };
        load().map_err(|e| match e {
            ReadError::Redb(source) => StoreError::Open {
                path: path.to_path_buf(),
                source: source.into(),
            },
            other => other.into_store_error(path, "open"),
        })
    }
}

/// The single writer: owns the write side of the file and the lease clock.
struct Writer {
    db: Arc<Database>,
    path: PathBuf,
    hub: Arc<Hub>,
    state: State,
    options: EmbeddedOptions,
}

/// A reply held back until its batch is committed.
enum Reply {
    Txn(
        oneshot::Sender<Result<TxnResponse, StoreError>>,
        Result<TxnResponse, StoreError>,
    ),
    Lease(
        oneshot::Sender<Result<Lease, StoreError>>,
        Result<Lease, StoreError>,
    ),
    KeepAlive(
        oneshot::Sender<Result<i64, StoreError>>,
        Result<i64, StoreError>,
    ),
    Unit(
        oneshot::Sender<Result<(), StoreError>>,
        Result<(), StoreError>,
    ),
}

impl Reply {
    fn send(self) {
        // A caller that gave up (dropped its future) no longer wants the answer.
        let _ = match self {
            Reply::Txn(tx, r) => tx.send(r).is_ok(),
            Reply::Lease(tx, r) => tx.send(r).is_ok(),
            Reply::KeepAlive(tx, r) => tx.send(r).is_ok(),
            Reply::Unit(tx, r) => tx.send(r).is_ok(),
        };
    }

    fn fail(self, error: impl Fn() -> StoreError) -> Reply {
        match self {
            Reply::Txn(tx, _) => Reply::Txn(tx, Err(error())),
            Reply::Lease(tx, _) => Reply::Lease(tx, Err(error())),
            Reply::KeepAlive(tx, _) => Reply::KeepAlive(tx, Err(error())),
            Reply::Unit(tx, _) => Reply::Unit(tx, Err(error())),
        }
    }
}

/// Every table of the file, opened once per batch: opening a table is a
/// lookup in redb's table directory, too dear to repeat per request.
struct Tables<'t> {
    kv: redb::Table<'t, &'static [u8], &'static [u8]>,
    log: redb::Table<'t, i64, &'static [u8]>,
    meta: redb::Table<'t, &'static str, i64>,
    leases: redb::Table<'t, i64, i64>,
    lease_keys: redb::MultimapTable<'t, i64, &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Tables {
            kv: txn.open_table(KV)?,
            log: txn.open_table(LOG)?,
            meta: txn.open_table(META)?,
            leases: txn.open_table(LEASES)?,
            lease_keys: txn.open_multimap_table(LEASE_KEYS)?,
        })
    }
}

impl Writer {
    fn run(mut self, requests: mpsc::Receiver<Request>) {
        loop {
            let wait = self
                .next_deadline()
                .map_or(Duration::from_secs(1), |deadline| {
                    deadline.saturating_duration_since(Instant::now())
                });
            let mut batch = Vec::new();
            match requests.recv_timeout(wait) {
                Ok(request) => batch.push(request),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < self.options.max_batch {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            let expired = self.expired_leases();
            if batch.is_empty() && expired.is_empty() {
                continue;
            }
            self.apply_batch(batch, expired);
        }
        self.hub.close();
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.state
            .leases
            .values()
            .map(|(_, deadline)| *deadline)
            .min()
    }

    fn expired_leases(&self) -> Vec<i64> {
        let now = Instant::now();
        let mut ids: Vec<i64> = self
            .state
            .leases
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    fn apply_batch(&mut self, batch: Vec<Request>, expired: Vec<i64>) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut events = Vec::new();
        let result = (|| -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            let mut tables = Tables::open(&txn)?;
            for id in expired {
                tracing::debug!(lease = id, "lease expired");
                self.revoke(&mut tables, id, &mut events)?;
            }
            for request in batch {
                replies.push(self.apply(&mut tables, request, &mut events)?);
            }
            tables.meta.insert("revision", self.state.revision)?;
            tables.meta.insert("compacted", self.state.compacted)?;
            tables.meta.insert("next_lease", self.state.next_lease)?;
            drop(tables);
            txn.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.hub.publish(self.state.revision, events);
                replies.into_iter().for_each(Reply::send);
            }
            Err(error) => {
                tracing::error!(path = %self.path.display(), error = %error, "store commit failed");
                let path = self.path.clone();
                let message = error.to_string();
                let failure = || StoreError::Io {
                    path: path.clone(),
                    operation: "commit",
                    source: message.clone().into(),
                };
                for reply in replies {
                    reply.fail(failure).send();
                }
                // Requests not reached before the failure are dropped with
                // the batch; their callers see the store as closed for them.
                match State::load(&self.db, &self.path) {
                    Ok(state) => self.state = state,
                    Err(error) => tracing::error!(error = %error, "cannot reload store state"),
                }
            }
        }
    }

    /// Applies one request inside the batch's transaction. A `redb::Error`
    /// fails the whole batch; an error of the request itself is its reply.
    fn apply(
        &mut self,
        tables: &mut Tables<'_>,
        request: Request,
        events: &mut Vec<WatchEvent>,
    ) -> Result<Reply, redb::Error> {
        Ok(match request {
            Request::Txn(request, reply) => {
                let result = self.apply_txn(tables, request, events)?;
                Reply::Txn(reply, result)
            }
            Request::LeaseGrant(ttl, reply) => {
                let id = self.state.next_lease;
                self.state.next_lease += 1;
                tables.leases.insert(id, ttl)?;
                let deadline = Instant::now() + Duration::from_secs(ttl as u64);
                self.state.leases.insert(id, (ttl, deadline));
                Reply::Lease(
                    reply,
                    Ok(Lease {
                        id: LeaseId(id),
                        ttl_secs: ttl,
                    }),
                )
            }
            Request::LeaseKeepAlive(id, reply) => {
                let result = match self.state.leases.get_mut(&id.0) {
                    Some((ttl, deadline)) => {
                        *deadline = Instant::now() + Duration::from_secs(*ttl as u64);
                        Ok(*ttl)
                    }
                    None => Err(StoreError::LeaseNotFound(id)),
                };
                Reply::KeepAlive(reply, result)
            }
            Request::LeaseRevoke(id, reply) => {
                let result = if self.state.leases.contains_key(&id.0) {
                    self.revoke(tables, id.0, events)?;
                    Ok(())
                } else {
                    Err(StoreError::LeaseNotFound(id))
                };
                Reply::Unit(reply, result)
            }
            Request::Compact(revision, reply) => {
                let result = if revision > self.state.revision {
                    Err(StoreError::FutureRevision {
                        requested: revision,
                        current: self.state.revision,
                    })
                } else if revision <= self.state.compacted {
                    Err(StoreError::Compacted {
                        oldest: self.state.compacted,
                    })
                } else {
                    tables.log.retain_in(..revision, |_, _| false)?;
                    self.state.compacted = revision;
                    Ok(())
                };
                Reply::Unit(reply, result)
            }
        })
    }

    fn apply_txn(
        &mut self,
        tables: &mut Tables<'_>,
        request: Txn,
        events: &mut Vec<WatchEvent>,
    ) -> Result<Result<TxnResponse, StoreError>, redb::Error> {
        let mut succeeded = true;
        for compare in &request.compare {
            let current = match tables.kv.get(compare.key.as_bytes())? {
                Some(record) => Some(self.decode(compare.key.as_bytes(), record.value())?),
                None => None,
            };
            if !compare.holds(current.as_ref()) {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded {
            request.success
        } else {
            request.failure
        };
        // Validate before writing so that a bad request writes nothing.
        for op in &ops {
            if let Op::Put {
                lease: Some(lease), ..
            } = op
                && !self.state.leases.contains_key(&lease.0)
            {
                return Ok(Err(StoreError::LeaseNotFound(*lease)));
            }
        }
        let revision = self.state.revision + 1;
        let first_event = events.len();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let previous = match tables.kv.get(key.as_bytes())? {
                        Some(record) => Some(self.decode(key.as_bytes(), record.value())?),
                        None => None,
                    };
                    let previous_lease = previous.as_ref().and_then(|kv| kv.lease);
                    if previous_lease != lease {
                        if let Some(old) = previous_lease {
                            tables.lease_keys.remove(old.0, key.as_bytes())?;
                        }
                        if let Some(new) = lease {
                            tables.lease_keys.insert(new.0, key.as_bytes())?;
                        }
                    }
                    let kv = KeyValue {
                        create_revision: previous
                            .as_ref()
                            .map_or(revision, |kv| kv.create_revision),
                        mod_revision: revision,
                        version: previous.as_ref().map_or(1, |kv| kv.version + 1),
                        lease,
                        value,
                        key,
                    };
                    tables
                        .kv
                        .insert(kv.key.as_bytes(), codec::encode_record(&kv).as_slice())?;
                    events.push(WatchEvent {
                        kind: EventKind::Put,
                        kv,
                    });
                }
                Op::Delete { key } => {
                    if let Some(event) = self.delete_key(tables, key, revision)? {
                        events.push(event);
                    }
                }
            }
        }
        self.log_revision(tables, revision, &events[first_event..])?;
        Ok(Ok(TxnResponse {
            succeeded,
            revision: self.state.revision,
        }))
    }

    /// Records the events of a revision in history and moves the store's
    /// revision to it; a revision that changed nothing is not a revision.
    fn log_revision(
        &mut self,
        tables: &mut Tables<'_>,
        revision: Revision,
        events: &[WatchEvent],
    ) -> Result<(), redb::Error> {
        if !events.is_empty() {
            self.state.revision = revision;
            tables
                .log
                .insert(revision, codec::encode_events(events).as_slice())?;
        }
        Ok(())
    }

    fn delete_key(
        &self,
        tables: &mut Tables<'_>,
        key: String,
        revision: Revision,
    ) -> Result<Option<WatchEvent>, redb::Error> {
        let Some(record) = tables.kv.remove(key.as_bytes())? else {
            return Ok(None);
        };
        let previous = self.decode(key.as_bytes(), record.value())?;
        drop(record);
        if let Some(lease) = previous.lease {
            tables.lease_keys.remove(lease.0, key.as_bytes())?;
        }
        Ok(Some(WatchEvent {
            kind: EventKind::Delete,
            kv: KeyValue {
                key,
                value: Vec::new(),
                create_revision: 0,
                mod_revision: revision,
                version: 0,
                lease: None,
            },
        }))
    }

    /// Deletes a lease and every key attached to it, at one revision.
    fn revoke(
        &mut self,
        tables: &mut Tables<'_>,
        id: i64,
        events: &mut Vec<WatchEvent>,
    ) -> Result<(), redb::Error> {
        self.state.leases.remove(&id);
        tables.leases.remove(id)?;
        let keys: Vec<String> = tables
            .lease_keys
            .remove_all(id)?
            .map(|key| key.map(|key| String::from_utf8_lossy(key.value()).into_owned()))
            .collect::<Result<_, _>>()?;
        if keys.is_empty() {
            return Ok(());
        }
        let revision = self.state.revision + 1;
        let first_event = events.len();
        for key in keys {
            if let Some(event) = self.delete_key(tables, key, revision)? {
                events.push(event);
            }
        }
        self.log_revision(tables, revision, &events[first_event..])
    }

    /// A record the writer cannot decode is corruption; it fails the batch
    /// (as storage errors do) with the key named.
    fn decode(&self, key: &[u8], record: &[u8]) -> Result<KeyValue, redb::Error> {
        decode_kv(key, record).map_err(|Corrupt { key, detail }| {
            redb::Error::Corrupted(format!(
                "record of key {key:?} in {}: {detail}",
                self.path.display()
            ))
        })
    }
}
