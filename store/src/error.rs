use std::path::PathBuf;

use crate::{LeaseId, Revision};

/// Every way a store operation can fail. Each variant names what failed and
/// where (the file or the endpoints), and keeps the source error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("store file {path} failed during {operation}")]
    Io {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("store file {path} holds a corrupt record under {key:?}: {detail}")]
    Corrupt {
        path: PathBuf,
        key: String,
        detail: String,
    },

    #[error("cannot reach etcd at {endpoints} within {timeout_ms} ms")]
    Unreachable {
        endpoints: String,
        timeout_ms: u64,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    #[error("etcd at {endpoints} failed during {operation}")]
    Etcd {
        endpoints: String,
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error(
        "history before revision {oldest} was compacted; watch again from revision {oldest} or later"
    )]
    Compacted { oldest: Revision },

    #[error("revision {requested} is in the future (the store is at revision {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },

    #[error("lease {} not found (expired or revoked)", .0.0)]
    LeaseNotFound(LeaseId),

    #[error("a transaction branch writes key {key:?} twice")]
    DuplicateKey { key: String },

    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    /// Errors after which the same request may succeed later (the backend
    /// was unreachable), as opposed to errors in the request itself.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unreachable { .. } | StoreError::Etcd { .. } | StoreError::Closed
        )
    }
}
