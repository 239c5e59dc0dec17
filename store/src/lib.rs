//! The cluster store: every piece of cluster state (nodes, projects, apps,
//! revisions, instances, routes, events) lives behind the one [`Store`] trait.
//!
//! The semantics are etcd's, because a control plane needs exactly them:
//! a cluster-wide revision that every write increases, per-key create/mod
//! revisions and versions, compare-then-act transactions, prefix watches that
//! resume from a revision with no gap and no duplicate, leases whose expiry
//! deletes their keys, and compaction of history.
//!
//! Two backends implement it:
//! - [`EmbeddedStore`]: a single redb file, for one controller (the default);
//! - [`EtcdStore`]: a real etcd cluster, for several controllers.
//!
//! The conformance suite in `tests/conformance` runs every semantic against both.
//!
//! Architecture Invariant: this crate knows nothing of Keel's resources. Keys
//! are strings and values are bytes; what they mean belongs to the controller.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;

mod compactor;
mod embedded;
mod error;
mod etcd;

pub use compactor::{AutoCompaction, spawn_auto_compaction};
pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use error::StoreError;
pub use etcd::{EtcdOptions, EtcdStore};

/// A cluster-wide revision. Every write (a put, a delete, or a transaction
/// with at least one write) increases it by one; reads never do.
pub type Revision = i64;

/// The id of a lease, chosen by the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

/// One key with its value and its bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision at which the key was last created.
    pub create_revision: Revision,
    /// The revision of the last write to the key.
    pub mod_revision: Revision,
    /// How many times the key was written since it was created (1 after the
    /// first put); 0 in a delete event.
    pub version: i64,
    pub lease: Option<LeaseId>,
}

/// Which keys a range reads, and how many.
#[derive(Debug, Clone, Default)]
pub struct RangeRequest {
    /// Every key that starts with this; an empty prefix is the whole keyspace.
    pub prefix: String,
    /// Start strictly after this key (the continuation from an earlier page).
    pub after: Option<String>,
    /// At most this many keys; 0 means no limit.
    pub limit: usize,
}

impl RangeRequest {
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            ..Self::default()
        }
    }

    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    pub fn after(mut self, key: impl Into<String>) -> Self {
        self.after = Some(key.into());
        self
    }
}

/// One page of a range, in key order.
#[derive(Debug, Clone)]
pub struct RangePage {
    pub kvs: Vec<KeyValue>,
    /// More keys match after the last one of this page.
    pub more: bool,
    /// The store's revision when the page was read.
    pub revision: Revision,
}

impl RangePage {
    /// The request for the page after this one, if there is one.
    pub fn next(&self, request: &RangeRequest) -> Option<RangeRequest> {
        let last = self.kvs.last()?;
        self.more.then(|| RangeRequest {
            prefix: request.prefix.clone(),
            after: Some(last.key.clone()),
            limit: request.limit,
        })
    }
}

/// A comparison operator for [`Compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

impl CompareOp {
    fn holds<T: Ord + ?Sized>(self, actual: &T, expected: &T) -> bool {
        match self {
            CompareOp::Equal => actual == expected,
            CompareOp::NotEqual => actual != expected,
            CompareOp::Greater => actual > expected,
            CompareOp::Less => actual < expected,
        }
    }
}

/// What a [`Compare`] looks at. A missing key has mod revision 0 and
/// version 0, and no value compare on it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    ModRevision(CompareOp, Revision),
    Version(CompareOp, i64),
    Value(CompareOp, Vec<u8>),
    Exists,
    Missing,
}

/// One condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub target: CompareTarget,
}

impl Compare {
    pub fn mod_revision(key: impl Into<String>, op: CompareOp, revision: Revision) -> Self {
        Self {
            key: key.into(),
            target: CompareTarget::ModRevision(op, revision),
        }
    }
    pub fn version(key: impl Into<String>, op: CompareOp, version: i64) -> Self {
        Self {
            key: key.into(),
            target: CompareTarget::Version(op, version),
        }
    }
    pub fn value(key: impl Into<String>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            target: CompareTarget::Value(op, value.into()),
        }
    }
    pub fn exists(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            target: CompareTarget::Exists,
        }
    }
    pub fn missing(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            target: CompareTarget::Missing,
        }
    }

    /// Whether the comparison holds for the key's current state.
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        match (&self.target, current) {
            (CompareTarget::Exists, kv) => kv.is_some(),
            (CompareTarget::Missing, kv) => kv.is_none(),
            (CompareTarget::ModRevision(op, want), kv) => {
                op.holds(&kv.map_or(0, |kv| kv.mod_revision), want)
            }
            (CompareTarget::Version(op, want), kv) => {
                op.holds(&kv.map_or(0, |kv| kv.version), want)
            }
            (CompareTarget::Value(op, want), Some(kv)) => op.holds(kv.value.as_slice(), want),
            (CompareTarget::Value(..), None) => false,
        }
    }
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }
    pub fn put_with_lease(
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        }
    }
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }
}

/// If every compare holds, apply `success`, otherwise `failure`, atomically
/// and at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, compare: impl IntoIterator<Item = Compare>) -> Self {
        self.compare.extend(compare);
        self
    }
    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.success.extend(ops);
        self
    }
    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.failure.extend(ops);
        self
    }

    /// A branch may write each key once (etcd's rule, kept by both
    /// backends): two writes to one key in one revision have no order.
    pub fn check(&self) -> Result<(), StoreError> {
        for branch in [&self.success, &self.failure] {
            let mut keys = std::collections::HashSet::new();
            for op in branch {
                let key = match op {
                    Op::Put { key, .. } | Op::Delete { key } => key,
                };
                if !keys.insert(key.as_str()) {
                    return Err(StoreError::DuplicateKey { key: key.clone() });
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every compare held (and so `success` was applied).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeleteResponse {
    pub deleted: bool,
    pub revision: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For a delete, `kv` carries the key, the
/// revision of the delete as `mod_revision`, and zero or empty elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

impl WatchEvent {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// Every event after the start revision, in revision order, then live. It
/// ends with an error only: [`StoreError::Compacted`] when the start
/// revision is no longer in history, or a backend error; the caller resumes
/// by watching again from the revision after the last event it saw.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl_secs: i64,
}

/// What an operator wants to see of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    pub revision: Revision,
    /// The size of the backing file (embedded) or database (etcd), in bytes.
    pub db_size_bytes: u64,
    /// Where the store is: a file path or the etcd endpoints.
    pub location: String,
    /// Why the store cannot accept writes right now (for example, the
    /// embedded store's log could not be written because the disk is full),
    /// or `None` when it can. Readiness checks report this without writing.
    pub write_error: Option<String>,
}

/// The cluster store. See the crate documentation for the semantics.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    async fn range(&self, request: &RangeRequest) -> Result<RangePage, StoreError>;

    /// Puts a value, optionally attached to a lease; returns the new revision.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let op = Op::Put {
            key: key.to_owned(),
            value,
            lease,
        };
        Ok(self.txn(Txn::new().and_then([op])).await?.revision)
    }

    /// Deletes a key. Deleting a missing key is not a write: the revision
    /// does not move.
    async fn delete(&self, key: &str) -> Result<DeleteResponse, StoreError> {
        let response = self
            .txn(
                Txn::new()
                    .when([Compare::exists(key)])
                    .and_then([Op::delete(key)]),
            )
            .await?;
        Ok(DeleteResponse {
            deleted: response.succeeded,
            revision: response.revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;

    /// Watches every key under `prefix`, from revision `start` on (0: from
    /// the next write on).
    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError>;

    async fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError>;

    /// Renews a lease for its whole TTL; returns that TTL.
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64, StoreError>;

    /// Revokes a lease and deletes every key attached to it, at one revision.
    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError>;

    /// Forgets history before `revision`: watches from an older revision
    /// get [`StoreError::Compacted`].
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    async fn status(&self) -> Result<StoreStatus, StoreError>;
}

/// Which backend a store lives on.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A single file (created with its parent directories when missing).
    Embedded {
        path: PathBuf,
        options: EmbeddedOptions,
    },
    Etcd(EtcdOptions),
}

/// How to open the cluster store: a backend, and automatic compaction,
/// which is on unless set to `None`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: Backend,
    pub auto_compaction: Option<AutoCompaction>,
}

impl StoreConfig {
    /// The embedded store in the file at `path`, with default settings.
    pub fn embedded(path: impl Into<PathBuf>) -> Self {
        Self {
            backend: Backend::Embedded {
                path: path.into(),
                options: EmbeddedOptions::default(),
            },
            auto_compaction: Some(AutoCompaction::default()),
        }
    }

    /// An etcd cluster at `endpoints`, with default timeouts.
    pub fn etcd(endpoints: Vec<String>) -> Self {
        Self {
            backend: Backend::Etcd(EtcdOptions {
                endpoints,
                ..EtcdOptions::default()
            }),
            auto_compaction: Some(AutoCompaction::default()),
        }
    }
}

/// Opens the store a config names and starts its automatic compaction,
/// which ends by itself when the store is dropped. Needs a Tokio runtime.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    let store: Arc<dyn Store> = match &config.backend {
        Backend::Embedded { path, options } => {
            Arc::new(EmbeddedStore::open(path, options.clone())?)
        }
        Backend::Etcd(options) => Arc::new(EtcdStore::connect(options.clone()).await?),
    };
    if let Some(policy) = config.auto_compaction {
        spawn_auto_compaction(&store, policy);
    }
    Ok(store)
}

/// The end of the key range that holds every key starting with `prefix`:
/// the prefix with its last byte increased, `None` for "no end".
pub(crate) fn prefix_end(prefix: &str) -> Option<Vec<u8>> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Lease TTLs are whole seconds on both backends (etcd's unit), at least one.
pub(crate) fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_below_ff() {
        assert_eq!(prefix_end("/apps/"), Some(b"/apps0".to_vec()));
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("a\u{7f}"), Some(b"a\x80".to_vec()));
    }

    #[test]
    fn missing_key_compares_as_revision_and_version_zero() {
        assert!(Compare::mod_revision("k", CompareOp::Equal, 0).holds(None));
        assert!(Compare::version("k", CompareOp::Equal, 0).holds(None));
        assert!(!Compare::value("k", CompareOp::NotEqual, b"x".to_vec()).holds(None));
        assert!(Compare::missing("k").holds(None));
    }
}
