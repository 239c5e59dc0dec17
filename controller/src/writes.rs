//! Writes of many independent records, split to fit a store transaction.
//!
//! etcd refuses a transaction of more than `--max-txn-ops` operations (128
//! by default), so a write of more records than that must be split or it
//! fails on the etcd backend while passing on the embedded one. Only
//! records that stand alone are written this way (each instance's reported
//! status, each event): every record is still written atomically, and a
//! reader may see some of a batch before the rest, which is what it would
//! see of reports or events arriving one after the other. Writes whose
//! parts depend on each other (an app with its revision, a compare-and-swap
//! on an instance) stay in one transaction and are small by construction.

use keel_store::{Op, Store, Txn};

use crate::api::ApiError;

/// The most operations one transaction carries: etcd's default limit.
pub const MAX_TXN_OPS: usize = 128;

/// Writes independent operations in as few transactions as the limit
/// allows, in order; returns the revision of the last one (`None` when
/// there was nothing to write).
pub async fn write_split(store: &dyn Store, ops: Vec<Op>) -> Result<Option<i64>, ApiError> {
    let mut revision = None;
    let mut ops = ops.into_iter();
    loop {
        let batch: Vec<Op> = ops.by_ref().take(MAX_TXN_OPS).collect();
        if batch.is_empty() {
            return Ok(revision);
        }
        revision = Some(store.txn(Txn::new().and_then(batch)).await?.revision);
    }
}
