//! Automatic compaction: keeps the last `retain_revisions` revisions of
//! history and forgets the rest, so a store does not grow without bound.
//! One loop serves both backends because it only uses the [`Store`] trait.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::{Revision, Store};

/// How much history to keep, and how often to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoCompaction {
    /// Revisions of history kept behind the current one: a watcher that fell
    /// this far behind can still resume without a full resync.
    pub retain_revisions: i64,
    pub interval: Duration,
}

impl Default for AutoCompaction {
    fn default() -> Self {
        Self {
            retain_revisions: 10_000,
            interval: Duration::from_secs(60),
        }
    }
}

impl AutoCompaction {
    /// The revision to compact to when the store is at `current`, if it
    /// moved past `last_compacted`.
    pub fn target(&self, current: Revision, last_compacted: Revision) -> Option<Revision> {
        let target = current - self.retain_revisions;
        (target > last_compacted).then_some(target)
    }
}

/// Runs [`AutoCompaction`] until the store is dropped (the task holds only
/// a weak reference, so it never keeps a store open) or the returned handle
/// is aborted. Failures are logged and retried at the next tick.
pub fn spawn_auto_compaction(
    store: &Arc<dyn Store>,
    policy: AutoCompaction,
) -> tokio::task::JoinHandle<()> {
    let store: Weak<dyn Store> = Arc::downgrade(store);
    tokio::spawn(async move {
        let mut last_compacted: Revision = 0;
        let mut tick = tokio::time::interval(policy.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(store) = store.upgrade() else { return };
            let status = match store.status().await {
                Ok(status) => status,
                Err(error) => {
                    tracing::warn!(error = %error, "auto-compaction: cannot read store status");
                    continue;
                }
            };
            let Some(target) = policy.target(status.revision, last_compacted) else {
                continue;
            };
            match store.compact(target).await {
                Ok(()) => {
                    tracing::debug!(revision = target, "auto-compaction: compacted");
                    last_compacted = target;
                }
                Err(crate::StoreError::Compacted { oldest }) => last_compacted = oldest,
                Err(error) => tracing::warn!(error = %error, "auto-compaction failed"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacts_only_once_history_exceeds_retention() {
        let policy = AutoCompaction {
            retain_revisions: 100,
            interval: Duration::from_secs(1),
        };
        assert_eq!(policy.target(50, 0), None);
        assert_eq!(policy.target(150, 0), Some(50));
        assert_eq!(policy.target(150, 50), None);
        assert_eq!(policy.target(151, 50), Some(51));
    }
}
