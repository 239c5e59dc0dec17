//! The embedded backend: one redb file in the data directory.
//!
//! Why redb: it is pure Rust (no C toolchain in the build), its write
//! transactions are durable when `commit` returns (copy-on-write B-trees with
//! a checksummed commit, so a `kill -9` at any moment leaves the last commit
//! intact), and readers see snapshots without blocking the writer.
//!
//! Shape: a single writer thread owns every mutation. Callers send it
//! requests; it drains whatever is queued (up to `max_batch`), applies each
//! request in order inside one redb write transaction, appends the batch's
//! effects to the write-ahead log (one fsync for the whole batch: group
//! commit, see `wal`), commits the transaction, then publishes the batch's
//! events to watchers and only then answers the callers. Each request keeps
//! its own revision and its own atomicity: a request that fails validation
//! writes nothing and does not disturb the others in its batch.
//!
//! A write that fails (a full disk) acknowledges nothing and leaves nothing
//! behind, in the file or in memory; the writer carries on, reports why in
//! `status().write_error`, and writes again once the disk does.
//!
//! Leases live with the writer too: their deadlines are in memory (reset to a
//! full TTL when the file is reopened, as etcd does on a leader change), their
//! TTLs and attached keys are in the file, and expiry is a revoke the writer
//! performs when a deadline passes.

mod codec;
mod wal;
mod watch;

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition, WriteTransaction,
};
use tokio::sync::oneshot;

use crate::{
    EventKind, KeyValue, Lease, LeaseId, Op, RangePage, RangeRequest, Revision, Store, StoreError,
    StoreStatus, Txn, TxnResponse, WatchEvent, WatchStream, prefix_end, ttl_secs,
};
use wal::{Effect, Wal};
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
    db: Arc<DbSlot>,
    hub: Arc<Hub>,
    /// Why the writer cannot make writes durable, while it cannot.
    write_error: Arc<Mutex<Option<String>>>,
    /// Bytes of live frames in the write-ahead log.
    log_bytes: Arc<AtomicU64>,
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

/// The open database. After a failed write redb refuses every later
/// operation until the file is reopened, so the writer swaps in a fresh
/// handle; while it has none (the reopen itself failed), reads fail too.
#[derive(Debug)]
struct DbSlot(RwLock<Option<Arc<Database>>>);

impl DbSlot {
    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, Option<Arc<Database>>> {
        // The slot holds one value that is replaced whole: a poisoned lock
        // still holds a consistent one.
        self.0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn current(&self) -> Option<Arc<Database>> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The database for a read, or an error saying why there is none.
    fn get(&self, path: &Path, operation: &'static str) -> Result<Arc<Database>, StoreError> {
        self.current().ok_or_else(|| StoreError::Io {
            path: path.to_path_buf(),
            operation,
            source: "the store file is being reopened after a failed write".into(),
        })
    }
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
        let wal_path = wal_path(&path);
        let wal_error = |e: std::io::Error| StoreError::Open {
            path: wal_path.clone(),
            source: e.into(),
        };
        let (mut wal, payloads) = Wal::open(&wal_path).map_err(wal_error)?;
        if !payloads.is_empty() {
            tracing::info!(path = %wal_path.display(), frames = payloads.len(), "replaying the write-ahead log");
            recover(&db, &payloads, &wal_path, redb::Durability::Immediate)?;
            wal.reset();
        }
        let state = State::load(&db, &path)?;
        let db = Arc::new(DbSlot(RwLock::new(Some(Arc::new(db)))));
        let hub = Arc::new(Hub::new(state.revision, options.watch_buffer));
        let write_error = Arc::new(Mutex::new(None));
        let log_bytes = Arc::new(AtomicU64::new(0));
        let (requests, receiver) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            path: path.clone(),
            wal,
            last_checkpoint: Instant::now(),
            failing: false,
            write_error: write_error.clone(),
            log_bytes: log_bytes.clone(),
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
                write_error,
                log_bytes,
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
        let db = self.inner.db.get(&self.inner.path, operation)?;
        let txn = db
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

/// The write-ahead log beside the store file: `store.redb` has
/// `store.redb.wal`.
fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".wal");
    PathBuf::from(name)
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
        // The revision last published is the one last made durable, and
        // knowing it needs no read: status answers while the file is being
        // reopened after a failed write.
        let revision = self.inner.hub.revision();
        let write_error = self
            .inner
            .write_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let size = |path: &Path| {
            std::fs::metadata(path)
                .map(|m| m.len())
                .map_err(|e| StoreError::Io {
                    path: path.to_path_buf(),
                    operation: "status",
                    source: e.into(),
                })
        };
        // The log's live frames count: they are data the file does not hold
        // yet. Its preallocated room (bounded by the checkpoint size) does
        // not.
        let db_size_bytes = size(&self.inner.path)? + self.inner.log_bytes.load(Ordering::Relaxed);
        Ok(StoreStatus {
            revision,
            db_size_bytes,
            location: self.inner.path.display().to_string(),
            write_error,
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
    db: Arc<DbSlot>,
    path: PathBuf,
    wal: Wal,
    last_checkpoint: Instant,
    /// A write failed and no checkpoint has succeeded since: checkpoints
    /// are retried every `RETRY_INTERVAL` until one does.
    failing: bool,
    write_error: Arc<Mutex<Option<String>>>,
    log_bytes: Arc<AtomicU64>,
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

    /// The reply to a request that was not applied: the error.
    fn refuse(request: Request, error: &impl Fn() -> StoreError) -> Reply {
        match request {
            Request::Txn(_, tx) => Reply::Txn(tx, Err(error())),
            Request::LeaseGrant(_, tx) => Reply::Lease(tx, Err(error())),
            Request::LeaseKeepAlive(_, tx) => Reply::KeepAlive(tx, Err(error())),
            Request::LeaseRevoke(_, tx) | Request::Compact(_, tx) => Reply::Unit(tx, Err(error())),
        }
    }

    fn fail(self, error: &impl Fn() -> StoreError) -> Reply {
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

    /// The one place the tables change, live and in recovery alike.
    fn apply(&mut self, effect: &Effect) -> Result<(), redb::Error> {
        match effect {
            Effect::PutKv { key, record } => {
                self.kv.insert(key.as_slice(), record.as_slice())?;
            }
            Effect::DeleteKv { key } => {
                self.kv.remove(key.as_slice())?;
            }
            Effect::PutLog { revision, events } => {
                self.log.insert(*revision, events.as_slice())?;
            }
            Effect::TrimLog { below } => self.log.retain_in(..*below, |_, _| false)?,
            Effect::PutLease { id, ttl } => {
                self.leases.insert(*id, *ttl)?;
            }
            Effect::DeleteLease { id } => {
                self.leases.remove(*id)?;
                self.lease_keys.remove_all(*id)?;
            }
            Effect::AddLeaseKey { id, key } => {
                self.lease_keys.insert(*id, key.as_slice())?;
            }
            Effect::RemoveLeaseKey { id, key } => {
                self.lease_keys.remove(*id, key.as_slice())?;
            }
            Effect::Meta {
                revision,
                compacted,
                next_lease,
            } => {
                self.meta.insert("revision", *revision)?;
                self.meta.insert("compacted", *compacted)?;
                self.meta.insert("next_lease", *next_lease)?;
            }
        }
        Ok(())
    }
}

/// One batch in the making: its tables and the log frame of its effects
/// (encoded after room for the frame's header, so that the append does not
/// copy it).
struct Batch<'t> {
    tables: Tables<'t>,
    frame: Vec<u8>,
}

impl Batch<'_> {
    fn effect(&mut self, effect: Effect) -> Result<(), redb::Error> {
        effect.encode(&mut self.frame);
        self.tables.apply(&effect)
    }

    fn get(&self, key: &[u8], writer: &Writer) -> Result<Option<KeyValue>, redb::Error> {
        match self.tables.kv.get(key)? {
            Some(record) => Ok(Some(writer.decode(key, record.value())?)),
            None => Ok(None),
        }
    }
}

/// Replays the effects of a log's frames over the file, committing them with
/// `durability`: durably when opening, without a sync when reopening after
/// a failed write (the frames stay in the log, which is what is durable).
fn recover(
    db: &Database,
    payloads: &[Vec<u8>],
    wal_path: &Path,
    durability: redb::Durability,
) -> Result<(), StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: wal_path.to_path_buf(),
        key: "write-ahead log frame".into(),
        detail,
    };
    let replay = || -> Result<Result<(), String>, redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(durability)?;
        let mut tables = Tables::open(&txn)?;
        for payload in payloads {
            let effects = match Effect::decode_all(payload) {
                Ok(effects) => effects,
                Err(detail) => return Ok(Err(detail)),
            };
            for effect in &effects {
                tables.apply(effect)?;
            }
        }
        drop(tables);
        txn.commit()?;
        Ok(Ok(()))
    };
    match replay() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(detail)) => Err(corrupt(detail)),
        Err(e) => Err(StoreError::Open {
            path: wal_path.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// How often the file itself is made durable (a checkpoint), after which
/// the write-ahead log starts empty again.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);
const CHECKPOINT_LOG_BYTES: u64 = 64 << 20;
/// After a failed write, how often the writer tries a checkpoint (and so
/// learns whether the disk takes writes again) while no request comes.
const RETRY_INTERVAL: Duration = Duration::from_millis(200);
/// How long a reopen waits for readers to let go of the failed handle.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// An error and its sources, `: `-separated: the message a caller or a
/// readiness check gets, which must say what the disk said.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(error) = source {
        let text = error.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = error.source();
    }
    message
}

/// Why a batch failed.
enum BatchError {
    /// redb failed: the handle may refuse every later operation.
    Redb(redb::Error),
    /// The log append failed; the batch's transaction was rolled back.
    Log(std::io::Error),
}

impl Writer {
    fn run(mut self, requests: mpsc::Receiver<Request>) {
        loop {
            let mut wait = self
                .next_deadline()
                .map_or(Duration::from_secs(1), |deadline| {
                    deadline.saturating_duration_since(Instant::now())
                });
            if self.wal.len() > 0 {
                wait = wait.min(CHECKPOINT_INTERVAL.saturating_sub(self.last_checkpoint.elapsed()));
            }
            if self.failing {
                wait = wait.min(RETRY_INTERVAL.saturating_sub(self.last_checkpoint.elapsed()));
            }
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
            // Under a stream of failing batches too: a failure does not
            // postpone the retry that may end it.
            let checkpoint_due = if self.failing {
                self.last_checkpoint.elapsed() >= RETRY_INTERVAL
            } else {
                self.wal.len() > 0
                    && (self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
                        || self.wal.len() >= CHECKPOINT_LOG_BYTES)
            };
            if checkpoint_due {
                self.checkpoint();
            }
            let expired = if !self.failing {
                self.expired_leases()
            } else {
                // Expiry is a write too; it waits until writes work again.
                Vec::new()
            };
            if batch.is_empty() && expired.is_empty() {
                continue;
            }
            self.apply_batch(batch, expired);
        }
        // A clean close leaves the file current and no log beside it, so a
        // stopped store is the one file.
        self.checkpoint();
        if !self.failing
            && let Err(error) = std::fs::remove_file(self.wal.path())
        {
            tracing::warn!(path = %self.wal.path().display(), error = %error, "cannot remove the emptied write-ahead log");
        }
        self.hub.close();
    }

    /// Makes the file itself durable and empties the log. A checkpoint is a
    /// transaction of its own, with no effects: a crash after it and before
    /// the log's new pass begins replays the previous pass over a file
    /// that holds exactly that pass's outcome, which changes nothing.
    fn checkpoint(&mut self) {
        // Attempts count, so that a failing one is retried at its interval.
        self.last_checkpoint = Instant::now();
        if self.db.current().is_none()
            && let Err(error) = self.reopen()
        {
            self.fail("reopen", &error);
            return;
        }
        let Some(db) = self.db.current() else {
            return;
        };
        let committed = (|| -> Result<(), redb::Error> {
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            txn.commit()?;
            Ok(())
        })();
        drop(db);
        match committed {
            Ok(()) => {
                self.wal.reset();
                self.log_bytes.store(0, Ordering::Relaxed);
                if std::mem::take(&mut self.failing) {
                    tracing::info!(path = %self.path.display(), "the store writes again");
                    *self.lock_write_error() = None;
                }
            }
            Err(error) => {
                tracing::error!(path = %self.path.display(), error = %error, "store checkpoint failed");
                self.fail("checkpoint", &error);
                // redb refuses everything after a failed write until the
                // file is reopened.
                if let Err(error) = self.reopen() {
                    tracing::error!(path = %self.path.display(), error = %error, "cannot reopen the store file; retrying");
                }
            }
        }
    }

    fn lock_write_error(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.write_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a failed write: `status()` reports it, the file is reopened
    /// before the next batch, and checkpoints are retried until one works.
    fn fail(&mut self, operation: &str, error: &dyn std::error::Error) {
        *self.lock_write_error() = Some(format!(
            "{operation} of store file {} failed: {}",
            self.path.display(),
            error_chain(error)
        ));
        self.failing = true;
    }

    /// Replaces the database handle with a fresh one over the last durable
    /// state: redb rolls the file back to its last durable commit and the
    /// live frames of the log (every acknowledged batch since) are replayed
    /// over it. Memory is reloaded from the result, so nothing that failed
    /// survives in it.
    fn reopen(&mut self) -> Result<(), StoreError> {
        let old = self.db.lock().take();
        if let Some(mut old) = old {
            // Readers hold the handle only for the length of a read.
            let started = Instant::now();
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(shared) if started.elapsed() < REOPEN_WAIT => {
                        old = shared;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(shared) => {
                        *self.db.lock() = Some(shared);
                        return Err(StoreError::Io {
                            path: self.path.clone(),
                            operation: "reopen",
                            source: "readers still hold the store file".into(),
                        });
                    }
                }
            }
        }
        let db = Database::builder()
            .set_cache_size(self.options.cache_size_bytes)
            .create(&self.path)
            .map_err(|e| StoreError::Open {
                path: self.path.clone(),
                source: e.into(),
            })?;
        let payloads = self.wal.live_payloads().map_err(|e| StoreError::Open {
            path: self.wal.path().to_path_buf(),
            source: e.into(),
        })?;
        recover(&db, &payloads, self.wal.path(), redb::Durability::None)?;
        self.state = State::load(&db, &self.path)?;
        *self.db.lock() = Some(Arc::new(db));
        tracing::info!(path = %self.path.display(), frames = payloads.len(), "store file reopened after a failed write");
        Ok(())
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

    /// Applies a batch in one redb transaction, appends its effects to the
    /// log (one sync), commits the transaction (no sync), publishes its
    /// events and answers its callers. The append comes before the commit
    /// so that a failed append leaves nothing behind: the transaction is
    /// dropped (rolled back), memory is reloaded from the file, and every
    /// caller of the batch gets the error.
    fn apply_batch(&mut self, requests: Vec<Request>, expired: Vec<i64>) {
        if self.db.current().is_none()
            && let Err(error) = self.reopen()
        {
            self.fail("reopen", &error);
            let failure = self.failure("reopen", &error);
            for request in requests {
                Reply::refuse(request, &failure).send();
            }
            return;
        }
        let mut replies = Vec::with_capacity(requests.len());
        let mut events = Vec::new();
        let mut appended = None;
        let result = (|| -> Result<(), BatchError> {
            let db = self
                .db
                .current()
                .ok_or_else(|| BatchError::Redb(redb::StorageError::PreviousIo.into()))?;
            let mut txn = db.begin_write().map_err(|e| BatchError::Redb(e.into()))?;
            txn.set_durability(redb::Durability::None)
                .map_err(|e| BatchError::Redb(e.into()))?;
            let frame = {
                let mut batch = Batch {
                    tables: Tables::open(&txn).map_err(BatchError::Redb)?,
                    frame: Wal::frame_buffer(),
                };
                let mut requests = requests.into_iter();
                let applied = (|| -> Result<(), redb::Error> {
                    for id in expired {
                        tracing::debug!(lease = id, "lease expired");
                        self.revoke(&mut batch, id, &mut events)?;
                    }
                    for request in requests.by_ref() {
                        replies.push(self.apply(&mut batch, request, &mut events)?);
                    }
                    batch.effect(Effect::Meta {
                        revision: self.state.revision,
                        compacted: self.state.compacted,
                        next_lease: self.state.next_lease,
                    })
                })();
                if let Err(error) = applied {
                    // Requests not reached are answered with the error too.
                    let failure = self.failure("commit", &error);
                    for request in requests {
                        replies.push(Reply::refuse(request, &failure));
                    }
                    return Err(BatchError::Redb(error));
                }
                batch.frame
            };
            let mut frame = frame;
            self.wal.append(&mut frame).map_err(BatchError::Log)?;
            appended = Some(frame.len() as u64);
            txn.commit().map_err(|e| BatchError::Redb(e.into()))
        })();
        let error = match result {
            Ok(()) => {
                self.log_bytes.store(self.wal.len(), Ordering::Relaxed);
                self.hub.publish(self.state.revision, events);
                replies.into_iter().for_each(Reply::send);
                return;
            }
            Err(error) => error,
        };
        let (operation, failure) = match &error {
            BatchError::Log(error) => {
                tracing::error!(path = %self.wal.path().display(), error = %error, "write-ahead log append failed; the batch is rolled back");
                (
                    "write-ahead log append",
                    self.failure("write-ahead log append", error),
                )
            }
            BatchError::Redb(error) => {
                tracing::error!(path = %self.path.display(), error = %error, "store commit failed");
                ("commit", self.failure("commit", error))
            }
        };
        for reply in replies {
            reply.fail(&failure).send();
        }
        if let Some(frame_bytes) = appended {
            self.wal.discard_last(frame_bytes);
        }
        self.log_bytes.store(self.wal.len(), Ordering::Relaxed);
        match error {
            BatchError::Log(error) => {
                self.fail(operation, &error);
                // The transaction was dropped unapplied: the file is as it
                // was before the batch, and so is memory once reloaded.
                match self.db.current().map(|db| State::load(&db, &self.path)) {
                    Some(Ok(state)) => self.state = state,
                    Some(Err(error)) => {
                        tracing::error!(error = %error, "cannot reload store state");
                        *self.db.lock() = None;
                    }
                    None => {}
                }
            }
            BatchError::Redb(error) => {
                self.fail(operation, &error);
                // redb may refuse everything from now on; reopening also
                // puts memory back at the last durable state.
                if let Err(error) = self.reopen() {
                    tracing::error!(path = %self.path.display(), error = %error, "cannot reopen the store file; retrying");
                }
            }
        }
    }

    fn failure(
        &self,
        operation: &'static str,
        error: &dyn std::error::Error,
    ) -> impl Fn() -> StoreError + use<> {
        let path = self.path.clone();
        let message = error_chain(error);
        move || StoreError::Io {
            path: path.clone(),
            operation,
            source: message.clone().into(),
        }
    }

    /// Applies one request inside the batch's transaction. A `redb::Error`
    /// fails the whole batch; an error of the request itself is its reply.
    fn apply(
        &mut self,
        batch: &mut Batch<'_>,
        request: Request,
        events: &mut Vec<WatchEvent>,
    ) -> Result<Reply, redb::Error> {
        Ok(match request {
            Request::Txn(request, reply) => {
                let result = self.apply_txn(batch, request, events)?;
                Reply::Txn(reply, result)
            }
            Request::LeaseGrant(ttl, reply) => {
                let id = self.state.next_lease;
                self.state.next_lease += 1;
                batch.effect(Effect::PutLease { id, ttl })?;
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
                    self.revoke(batch, id.0, events)?;
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
                    batch.effect(Effect::TrimLog { below: revision })?;
                    self.state.compacted = revision;
                    Ok(())
                };
                Reply::Unit(reply, result)
            }
        })
    }

    fn apply_txn(
        &mut self,
        batch: &mut Batch<'_>,
        request: Txn,
        events: &mut Vec<WatchEvent>,
    ) -> Result<Result<TxnResponse, StoreError>, redb::Error> {
        let mut succeeded = true;
        for compare in &request.compare {
            let current = batch.get(compare.key.as_bytes(), self)?;
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
                    let previous = batch.get(key.as_bytes(), self)?;
                    let previous_lease = previous.as_ref().and_then(|kv| kv.lease);
                    if previous_lease != lease {
                        if let Some(old) = previous_lease {
                            let key = key.as_bytes().to_vec();
                            batch.effect(Effect::RemoveLeaseKey { id: old.0, key })?;
                        }
                        if let Some(new) = lease {
                            let key = key.as_bytes().to_vec();
                            batch.effect(Effect::AddLeaseKey { id: new.0, key })?;
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
                    let record = codec::encode_record(&kv);
                    batch.effect(Effect::PutKv {
                        key: kv.key.as_bytes().to_vec(),
                        record,
                    })?;
                    events.push(WatchEvent {
                        kind: EventKind::Put,
                        kv,
                    });
                }
                Op::Delete { key } => {
                    if let Some(event) = self.delete_key(batch, key, revision)? {
                        events.push(event);
                    }
                }
            }
        }
        self.log_revision(batch, revision, &events[first_event..])?;
        Ok(Ok(TxnResponse {
            succeeded,
            revision: self.state.revision,
        }))
    }

    /// Records the events of a revision in history and moves the store's
    /// revision to it; a revision that changed nothing is not a revision.
    fn log_revision(
        &mut self,
        batch: &mut Batch<'_>,
        revision: Revision,
        events: &[WatchEvent],
    ) -> Result<(), redb::Error> {
        if !events.is_empty() {
            self.state.revision = revision;
            batch.effect(Effect::PutLog {
                revision,
                events: codec::encode_events(events),
            })?;
        }
        Ok(())
    }

    fn delete_key(
        &self,
        batch: &mut Batch<'_>,
        key: String,
        revision: Revision,
    ) -> Result<Option<WatchEvent>, redb::Error> {
        let Some(previous) = batch.get(key.as_bytes(), self)? else {
            return Ok(None);
        };
        batch.effect(Effect::DeleteKv {
            key: key.as_bytes().to_vec(),
        })?;
        if let Some(lease) = previous.lease {
            batch.effect(Effect::RemoveLeaseKey {
                id: lease.0,
                key: key.as_bytes().to_vec(),
            })?;
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
        batch: &mut Batch<'_>,
        id: i64,
        events: &mut Vec<WatchEvent>,
    ) -> Result<(), redb::Error> {
        self.state.leases.remove(&id);
        let keys: Vec<String> = batch
            .tables
            .lease_keys
            .get(id)?
            .map(|key| key.map(|key| String::from_utf8_lossy(key.value()).into_owned()))
            .collect::<Result<_, _>>()?;
        let revision = self.state.revision + 1;
        let first_event = events.len();
        for key in keys {
            if let Some(event) = self.delete_key(batch, key, revision)? {
                events.push(event);
            }
        }
        batch.effect(Effect::DeleteLease { id })?;
        self.log_revision(batch, revision, &events[first_event..])
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
