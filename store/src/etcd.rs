//! The etcd backend: [`Store`] over a real etcd cluster (v3 API, through
//! `etcd-client`), for control planes that run several controllers against
//! one highly available store.
//!
//! etcd already has the semantics the trait promises, so most methods are a
//! translation. What this module adds is what a control plane needs on top
//! of a raw client:
//!
//! - Bounded calls. Every call, retries included, ends within
//!   `request_timeout` (`connect_timeout` for the reachability check in
//!   [`EtcdStore::connect`]); a call that could not reach etcd in that time is
//!   [`StoreError::Unreachable`], naming the endpoints.
//! - Failover. `etcd-client` balances requests over every endpoint at random
//!   and connects lazily, so with one member down some requests land on it
//!   and fail at once with a connect error. Those never left this process, so
//!   they are retried, writes included. Reads are also retried after other
//!   transient failures; a write that failed after it may have reached etcd is
//!   not (repeating it could apply it twice) and surfaces as
//!   [`StoreError::Etcd`]. As with any etcd client, a write that timed out
//!   ([`StoreError::Unreachable`]) may or may not have been applied: a write
//!   sent to a follower just as the leader died waits for the whole timeout.
//! - Watches that survive a member going away: the watch task re-creates the
//!   etcd watch from the revision after the last one it delivered, so the
//!   consumer sees no gap and no duplicate.
//!
//! Requests carry etcd's "require leader" flag: a member cut off from the
//! quorum refuses them (which is safe to retry elsewhere) instead of serving a
//! watch that silently stops.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client as etcd;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::{
    CompareOp, CompareTarget, EventKind, KeyValue, Lease, LeaseId, Op, RangePage, RangeRequest,
    Revision, Store, StoreError, StoreStatus, Txn, TxnResponse, WatchEvent, WatchStream,
    prefix_end, ttl_secs,
};

/// The first pause between two attempts of a call; it doubles up to
/// [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Events buffered between a watch task and its consumer.
const WATCH_BUFFER: usize = 256;
/// HTTP/2 pings on connections with open streams (watches), so a member that
/// vanished without closing its sockets is noticed. etcd refuses pings more
/// often than every 5 s (`--grpc-keepalive-min-time`).
const HTTP2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long to wait for etcd to report its compaction point on a watch from
/// revision 1 (see [`EtcdStore::compacted_revision`]); etcd checks waiting
/// watchers every 100 ms.
const COMPACTION_PROBE: Duration = Duration::from_secs(1);

/// etcd's messages for the errors this module translates (etcd's
/// `api/v3rpc/rpctypes`).
const LEASE_NOT_FOUND: &str = "requested lease not found";
const COMPACTED: &str = "required revision has been compacted";
const FUTURE_REVISION: &str = "required revision is a future revision";
/// Refusals etcd gives before acting on a request.
const NO_LEADER: &str = "etcdserver: no leader";
const PROPOSAL_DROPPED: &str = "raft proposal dropped";

/// Where the etcd cluster is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs of the members, such as `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// How long [`EtcdStore::connect`] waits for a member to answer.
    pub connect_timeout: Duration,
    /// How long any one operation may take, retries included.
    pub request_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// A [`Store`] on an etcd cluster. Cheap to clone: clones share the
/// connections.
#[derive(Clone)]
pub struct EtcdStore {
    /// `etcd_client::Client` is a set of handles on one balanced channel, so
    /// each call clones it instead of sharing one behind a lock.
    client: etcd::Client,
    /// The endpoints joined with ",", for errors and [`StoreStatus`].
    location: Arc<str>,
    request_timeout: Duration,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.location)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// Which failed attempts of a call may be repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Repeating the request is harmless (reads, lease renewals): retry
    /// every transient failure.
    Always,
    /// The request changes state: retry only when etcd certainly did not act
    /// on it.
    IfNotApplied,
}

/// Why a call failed, before it is turned into a [`StoreError`].
#[derive(Debug)]
enum CallError {
    /// No attempt succeeded within the budget; the last failure, if any.
    TimedOut(Option<etcd::Error>),
    /// An attempt failed in a way that retrying would not fix or that is not
    /// safe to retry.
    Failed(etcd::Error),
}

impl CallError {
    fn message_contains(&self, needle: &str) -> bool {
        match self {
            CallError::Failed(err) => {
                grpc_status(err).is_some_and(|s| s.message().contains(needle))
            }
            CallError::TimedOut(_) => false,
        }
    }
}

/// The outcome of creating an etcd watch.
enum Opened {
    /// The watch exists; events after `revision` (or from the requested start
    /// revision) will follow on `stream`.
    Live {
        stream: Box<etcd::WatchStream>,
        revision: Revision,
    },
    Compacted {
        oldest: Revision,
    },
    Canceled {
        reason: String,
    },
}

/// etcd answered, but refused (a canceled watch, a lease it would not
/// grant), with this reason.
#[derive(Debug, thiserror::Error)]
#[error("etcd refused: {reason}")]
struct Refused {
    reason: String,
}

impl EtcdStore {
    /// Connects to the cluster and checks, within `connect_timeout`, that it
    /// answers a read (so that a wrong address fails here, not at the first
    /// use). `etcd-client` itself connects lazily and would not notice.
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        let location: Arc<str> = options.endpoints.join(",").into();
        let connect_options = etcd::ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_timeout(options.request_timeout)
            .with_keep_alive(HTTP2_KEEP_ALIVE_INTERVAL, options.request_timeout)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        let client = etcd::Client::connect(options.endpoints.as_slice(), Some(connect_options))
            .await
            .map_err(|err| StoreError::Etcd {
                endpoints: location.to_string(),
                operation: "connect",
                source: Box::new(err),
            })?;
        let store = Self {
            client,
            location,
            request_timeout: options.request_timeout,
        };
        store
            .call(
                options.connect_timeout,
                Retry::Always,
                |mut client| async move {
                    client
                        .get(PROBE_KEY, Some(etcd::GetOptions::new().with_count_only()))
                        .await
                },
            )
            .await
            .map_err(|err| store.fail("connect", options.connect_timeout, err))?;
        info!(endpoints = %store.location, "connected to etcd");
        Ok(store)
    }

    /// Runs `attempt` on a fresh handle until it succeeds, fails for good,
    /// or `budget` is spent.
    async fn call<T, F, Fut>(
        &self,
        budget: Duration,
        retry: Retry,
        mut attempt: F,
    ) -> Result<T, CallError>
    where
        F: FnMut(etcd::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd::Error>>,
    {
        let deadline = Instant::now() + budget;
        let mut backoff = INITIAL_BACKOFF;
        let mut last = None;
        loop {
            let err = match tokio::time::timeout_at(deadline, attempt(self.client.clone())).await {
                Err(_elapsed) => return Err(CallError::TimedOut(last)),
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(err)) => err,
            };
            if has_in_chain::<tonic::TimeoutExpired>(&err) {
                return Err(CallError::TimedOut(Some(err)));
            }
            let retryable = match retry {
                Retry::Always => not_applied(&err) || transient(&err),
                Retry::IfNotApplied => not_applied(&err),
            };
            if !retryable {
                return Err(CallError::Failed(err));
            }
            if Instant::now() + backoff >= deadline {
                return Err(CallError::TimedOut(Some(err)));
            }
            debug!(endpoints = %self.location, error = %err, "etcd request failed; retrying");
            // The first retry goes at once: the balancer is reconnecting to
            // the member that just failed, so it picks another one if there
            // is one. Later retries back off.
            if last.is_some() {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            last = Some(err);
        }
    }

    async fn read<T, F, Fut>(&self, attempt: F) -> Result<T, CallError>
    where
        F: FnMut(etcd::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd::Error>>,
    {
        self.call(self.request_timeout, Retry::Always, attempt)
            .await
    }

    async fn write<T, F, Fut>(&self, attempt: F) -> Result<T, CallError>
    where
        F: FnMut(etcd::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd::Error>>,
    {
        self.call(self.request_timeout, Retry::IfNotApplied, attempt)
            .await
    }

    /// The store error for a failed call.
    fn fail(&self, operation: &'static str, budget: Duration, err: CallError) -> StoreError {
        match err {
            CallError::TimedOut(last) => StoreError::Unreachable {
                endpoints: self.location.to_string(),
                timeout_ms: u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
                source: last.map(|err| Box::new(err) as _),
            },
            CallError::Failed(err) => StoreError::Etcd {
                endpoints: self.location.to_string(),
                operation,
                source: Box::new(err),
            },
        }
    }

    fn fail_request(&self, operation: &'static str, err: CallError) -> StoreError {
        self.fail(operation, self.request_timeout, err)
    }

    fn key_value(&self, kv: &etcd::KeyValue) -> Result<KeyValue, StoreError> {
        let mut out = self.key_value_without_value(kv)?;
        out.value = kv.value().to_vec();
        Ok(out)
    }

    /// Like [`Self::key_value`], without copying the value.
    fn owned_key_value(&self, kv: etcd::KeyValue) -> Result<KeyValue, StoreError> {
        let mut out = self.key_value_without_value(&kv)?;
        out.value = kv.into_key_value().1;
        Ok(out)
    }

    fn key_value_without_value(&self, kv: &etcd::KeyValue) -> Result<KeyValue, StoreError> {
        let key = String::from_utf8(kv.key().to_vec()).map_err(|err| StoreError::Corrupt {
            path: PathBuf::from(&*self.location),
            key: String::from_utf8_lossy(err.as_bytes()).into_owned(),
            detail: "the key is not UTF-8".to_owned(),
        })?;
        Ok(KeyValue {
            key,
            value: Vec::new(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
        })
    }

    fn watch_event(&self, event: &etcd::Event) -> Result<WatchEvent, StoreError> {
        let kind = match event.event_type() {
            etcd::EventType::Put => EventKind::Put,
            etcd::EventType::Delete => EventKind::Delete,
        };
        let kv = event.kv().ok_or_else(|| StoreError::Corrupt {
            path: PathBuf::from(&*self.location),
            key: String::new(),
            detail: "etcd sent a watch event without a key".to_owned(),
        })?;
        // For a delete, etcd already sends the key, the delete's revision as
        // mod revision, version 0 and no value.
        Ok(WatchEvent {
            kind,
            kv: self.key_value(kv)?,
        })
    }

    /// Creates an etcd watch and waits until etcd confirms it, so that a
    /// write made after this returns is seen. Retried like a read: creating
    /// a watch changes nothing.
    async fn open_watch(
        &self,
        operation: &'static str,
        key: &str,
        options: etcd::WatchOptions,
    ) -> Result<Opened, StoreError> {
        self.read(|mut client| {
            let options = options.clone();
            async move {
                let mut stream = client.watch(key, Some(options)).await?;
                loop {
                    let Some(response) = stream.message().await? else {
                        return Err(stream_ended("watch"));
                    };
                    if response.compact_revision() > 0 {
                        return Ok(Opened::Compacted {
                            oldest: response.compact_revision(),
                        });
                    }
                    if response.canceled() {
                        let reason = response.cancel_reason().to_owned();
                        return Ok(Opened::Canceled { reason });
                    }
                    if response.created() {
                        let revision = header_revision(response.header());
                        return Ok(Opened::Live {
                            stream: Box::new(stream),
                            revision,
                        });
                    }
                }
            }
        })
        .await
        .map_err(|err| self.fail_request(operation, err))
    }

    /// A watch on every key under `prefix`, from `start` (0: from now on).
    async fn open_prefix_watch(&self, prefix: &str, start: Revision) -> Result<Opened, StoreError> {
        let mut options = etcd::WatchOptions::new().with_prefix();
        if start > 0 {
            options = options.with_start_revision(start);
        }
        self.open_watch("watch", prefix, options).await
    }

    /// The oldest revision still in etcd's history. etcd has no call that
    /// returns it, but it cancels a watch from an older revision with it.
    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        let options = etcd::WatchOptions::new().with_start_revision(1);
        let mut stream = match self.open_watch("compact", PROBE_KEY, options).await? {
            Opened::Compacted { oldest } => return Ok(oldest),
            Opened::Canceled { reason } => return Err(self.canceled("compact", reason)),
            Opened::Live { stream, .. } => stream,
        };
        // etcd confirms the watch first and cancels it on its next pass over
        // waiting watchers.
        let probe = async {
            while let Some(response) = stream.message().await? {
                if response.compact_revision() > 0 {
                    return Ok(Some(response.compact_revision()));
                }
            }
            Ok::<_, etcd::Error>(None)
        };
        match tokio::time::timeout(COMPACTION_PROBE.min(self.request_timeout), probe).await {
            Ok(Ok(Some(oldest))) => Ok(oldest),
            // Not canceled: revision 1 is still watchable, so etcd compacted
            // at most up to revision 1.
            Err(_elapsed) => Ok(1),
            Ok(Ok(None)) => {
                Err(self.fail_request("compact", CallError::Failed(stream_ended("watch"))))
            }
            Ok(Err(err)) => Err(self.fail_request("compact", CallError::Failed(err))),
        }
    }

    fn canceled(&self, operation: &'static str, reason: String) -> StoreError {
        StoreError::Etcd {
            endpoints: self.location.to_string(),
            operation,
            source: Box::new(Refused { reason }),
        }
    }

    async fn current_revision(&self, operation: &'static str) -> Result<Revision, StoreError> {
        let response = self
            .read(|mut client| async move {
                client
                    .get(PROBE_KEY, Some(etcd::GetOptions::new().with_count_only()))
                    .await
            })
            .await
            .map_err(|err| self.fail_request(operation, err))?;
        Ok(header_revision(response.header()))
    }

    /// Which lease of `txn` etcd did not find. etcd's error does not say,
    /// so with several candidates each is looked up.
    async fn missing_lease(&self, txn: &Txn) -> LeaseId {
        let mut candidates: Vec<LeaseId> = Vec::new();
        for op in txn.success.iter().chain(&txn.failure) {
            if let Op::Put {
                lease: Some(lease), ..
            } = op
                && !candidates.contains(lease)
            {
                candidates.push(*lease);
            }
        }
        if candidates.len() > 1 {
            for lease in &candidates {
                let found = self
                    .read(|mut client| async move {
                        client
                            .lease_time_to_live(lease.0, None)
                            .await
                            .map(|r| r.ttl() >= 0)
                    })
                    .await;
                match found {
                    Ok(false) => return *lease,
                    Err(err) if err.message_contains(LEASE_NOT_FOUND) => return *lease,
                    Ok(true) | Err(_) => {}
                }
            }
        }
        candidates.first().copied().unwrap_or(LeaseId(0))
    }
}

/// A key no Keel component writes, for requests that only need etcd's
/// revision or an answer.
const PROBE_KEY: &str = "\0";

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let response = self
            .read(|mut client| async move { client.get(key, None).await })
            .await
            .map_err(|err| self.fail_request("get", err))?;
        response
            .kvs()
            .first()
            .map(|kv| self.key_value(kv))
            .transpose()
    }

    async fn range(&self, request: &RangeRequest) -> Result<RangePage, StoreError> {
        let (start, end) = range_bounds(request);
        let limit = i64::try_from(request.limit).unwrap_or(i64::MAX);
        let options = etcd::GetOptions::new().with_range(end).with_limit(limit);
        let mut response = self
            .read(|mut client| {
                let (start, options) = (start.clone(), options.clone());
                async move { client.get(start, Some(options)).await }
            })
            .await
            .map_err(|err| self.fail_request("range", err))?;
        let revision = header_revision(response.header());
        let more = response.more();
        let kvs = response
            .take_kvs()
            .into_iter()
            .map(|kv| self.owned_key_value(kv))
            .collect::<Result<_, _>>()?;
        Ok(RangePage {
            kvs,
            more,
            revision,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        txn.check()?;
        let request = etcd_txn(&txn);
        let attempt = |mut client: etcd::Client| {
            let request = request.clone();
            async move { client.txn(request).await }
        };
        let read_only = txn.success.is_empty() && txn.failure.is_empty();
        let result = if read_only {
            self.read(attempt).await
        } else {
            self.write(attempt).await
        };
        match result {
            Ok(response) => Ok(TxnResponse {
                succeeded: response.succeeded(),
                revision: header_revision(response.header()),
            }),
            Err(err) if err.message_contains(LEASE_NOT_FOUND) => {
                Err(StoreError::LeaseNotFound(self.missing_lease(&txn).await))
            }
            Err(err) => Err(self.fail_request("txn", err)),
        }
    }

    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError> {
        let (sender, receiver) = mpsc::channel(WATCH_BUFFER);
        match self.open_prefix_watch(prefix, start).await? {
            Opened::Live { stream, revision } => {
                let watcher = Watcher {
                    store: self.clone(),
                    prefix: prefix.to_owned(),
                    next: start.max(0),
                    created: revision,
                    sender,
                };
                tokio::spawn(watcher.run(stream));
            }
            Opened::Compacted { oldest } => {
                // The receiver is still held here, so this cannot fail.
                let _ = sender.try_send(Err(StoreError::Compacted { oldest }));
            }
            Opened::Canceled { reason } => {
                let _ = sender.try_send(Err(self.canceled("watch", reason)));
            }
        }
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let ttl = ttl_secs(ttl);
        let response = self
            .write(|mut client| async move { client.lease_grant(ttl, None).await })
            .await
            .map_err(|err| self.fail_request("lease grant", err))?;
        if !response.error().is_empty() {
            return Err(self.canceled("lease grant", response.error().to_owned()));
        }
        Ok(Lease {
            id: LeaseId(response.id()),
            ttl_secs: response.ttl(),
        })
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64, StoreError> {
        // Renewing twice is harmless, so this is retried like a read.
        let ttl = self
            .read(|mut client| async move {
                let (mut keeper, mut responses) = match client.lease_keep_alive(id.0).await {
                    Ok(pair) => pair,
                    // etcd-client's only way of saying etcd answered TTL 0.
                    Err(etcd::Error::LeaseKeepAliveError(_)) => return Ok(None),
                    Err(err) => return Err(err),
                };
                // etcd-client already sent one keep-alive and swallowed its
                // answer (it only checks the TTL is positive); a second one
                // on the same stream tells the TTL. If the send fails, the
                // stream broke and reading it says why.
                let _ = keeper.keep_alive().await;
                match responses.message().await? {
                    Some(response) => Ok((response.ttl() > 0).then_some(response.ttl())),
                    None => Err(stream_ended("lease keep-alive")),
                }
            })
            .await
            .map_err(|err| self.fail_request("lease keep-alive", err))?;
        ttl.ok_or(StoreError::LeaseNotFound(id))
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        match self
            .write(|mut client| async move { client.lease_revoke(id.0).await })
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if err.message_contains(LEASE_NOT_FOUND) => Err(StoreError::LeaseNotFound(id)),
            Err(err) => Err(self.fail_request("lease revoke", err)),
        }
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        match self
            .write(|mut client| async move { client.compact(revision, None).await })
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if err.message_contains(COMPACTED) => Err(StoreError::Compacted {
                oldest: self.compacted_revision().await?,
            }),
            Err(err) if err.message_contains(FUTURE_REVISION) => {
                let current = self.current_revision("compact").await?;
                Err(StoreError::FutureRevision {
                    requested: revision,
                    current,
                })
            }
            Err(err) => Err(self.fail_request("compact", err)),
        }
    }

    async fn status(&self) -> Result<StoreStatus, StoreError> {
        let response = self
            .read(|mut client| async move { client.status().await })
            .await
            .map_err(|err| self.fail_request("status", err))?;
        Ok(StoreStatus {
            revision: header_revision(response.header()),
            db_size_bytes: u64::try_from(response.db_size()).unwrap_or(0),
            location: self.location.to_string(),
            write_error: None,
        })
    }
}

/// The task behind one [`WatchStream`]: forwards etcd's events one by one
/// and re-creates the etcd watch when its stream breaks.
struct Watcher {
    store: EtcdStore,
    prefix: String,
    /// The first revision not yet delivered; 0 while nothing was delivered
    /// on a watch that started live.
    next: Revision,
    /// The revision etcd was at when the current watch was created (a live
    /// watch resumes after it if nothing was delivered).
    created: Revision,
    sender: mpsc::Sender<Result<WatchEvent, StoreError>>,
}

impl Watcher {
    async fn run(mut self, mut stream: Box<etcd::WatchStream>) {
        loop {
            let message = tokio::select! {
                // The consumer dropped the stream: dropping ours cancels the
                // etcd watch.
                () = self.sender.closed() => return,
                message = stream.message() => message,
            };
            let err = match message {
                Ok(Some(response)) => {
                    if !self.forward(&response).await {
                        return;
                    }
                    continue;
                }
                Ok(None) => stream_ended("watch"),
                Err(err) => err,
            };
            let from = if self.next > 0 {
                self.next
            } else {
                self.created + 1
            };
            warn!(
                endpoints = %self.store.location, prefix = %self.prefix, from, error = %err,
                "etcd watch stream broke; watching again",
            );
            match self.store.open_prefix_watch(&self.prefix, from).await {
                Ok(Opened::Live {
                    stream: fresh,
                    revision,
                }) => {
                    stream = fresh;
                    self.created = revision;
                    self.next = from;
                }
                Ok(Opened::Compacted { oldest }) => {
                    let _ = self
                        .sender
                        .send(Err(StoreError::Compacted { oldest }))
                        .await;
                    return;
                }
                Ok(Opened::Canceled { reason }) => {
                    let _ = self
                        .sender
                        .send(Err(self.store.canceled("watch", reason)))
                        .await;
                    return;
                }
                Err(err) => {
                    let _ = self.sender.send(Err(err)).await;
                    return;
                }
            }
        }
    }

    /// Delivers the events of one response; false when the watch is over.
    async fn forward(&mut self, response: &etcd::WatchResponse) -> bool {
        if response.compact_revision() > 0 {
            let oldest = response.compact_revision();
            let _ = self
                .sender
                .send(Err(StoreError::Compacted { oldest }))
                .await;
            return false;
        }
        if response.canceled() {
            let err = self
                .store
                .canceled("watch", response.cancel_reason().to_owned());
            let _ = self.sender.send(Err(err)).await;
            return false;
        }
        // etcd never splits one revision's events over two responses, so
        // the resume point only moves between responses.
        let mut last = None;
        for event in response.events() {
            let event = match self.store.watch_event(event) {
                Ok(event) => event,
                Err(err) => {
                    let _ = self.sender.send(Err(err)).await;
                    return false;
                }
            };
            // A re-created watch replays from `next`; anything older was
            // delivered before.
            if event.revision() < self.next {
                continue;
            }
            last = Some(event.revision());
            if self.sender.send(Ok(event)).await.is_err() {
                return false;
            }
        }
        if let Some(last) = last {
            self.next = last + 1;
        }
        true
    }
}

/// The key and range end etcd reads for `request`: every key with the
/// prefix, from just after `after` on.
fn range_bounds(request: &RangeRequest) -> (Vec<u8>, Vec<u8>) {
    // etcd's conventions: key "\0" is the first key, range end "\0" means
    // "to the end of the keyspace".
    let mut start = if request.prefix.is_empty() {
        vec![0]
    } else {
        request.prefix.as_bytes().to_vec()
    };
    let end = prefix_end(&request.prefix).unwrap_or_else(|| vec![0]);
    if let Some(after) = &request.after {
        let mut next = after.as_bytes().to_vec();
        next.push(0);
        start = start.max(next);
    }
    (start, end)
}

fn etcd_txn(txn: &Txn) -> etcd::Txn {
    let compare: Vec<etcd::Compare> = txn
        .compare
        .iter()
        .map(|c| {
            let key = c.key.as_bytes();
            match &c.target {
                CompareTarget::ModRevision(op, rev) => {
                    etcd::Compare::mod_revision(key, etcd_op(*op), *rev)
                }
                CompareTarget::Version(op, version) => {
                    etcd::Compare::version(key, etcd_op(*op), *version)
                }
                CompareTarget::Value(op, value) => {
                    etcd::Compare::value(key, etcd_op(*op), value.clone())
                }
                CompareTarget::Exists => {
                    etcd::Compare::create_revision(key, etcd::CompareOp::Greater, 0)
                }
                CompareTarget::Missing => {
                    etcd::Compare::create_revision(key, etcd::CompareOp::Equal, 0)
                }
            }
        })
        .collect();
    etcd::Txn::new()
        .when(compare)
        .and_then(txn.success.iter().map(etcd_txn_op).collect::<Vec<_>>())
        .or_else(txn.failure.iter().map(etcd_txn_op).collect::<Vec<_>>())
}

fn etcd_op(op: CompareOp) -> etcd::CompareOp {
    match op {
        CompareOp::Equal => etcd::CompareOp::Equal,
        CompareOp::NotEqual => etcd::CompareOp::NotEqual,
        CompareOp::Greater => etcd::CompareOp::Greater,
        CompareOp::Less => etcd::CompareOp::Less,
    }
}

fn etcd_txn_op(op: &Op) -> etcd::TxnOp {
    match op {
        Op::Put { key, value, lease } => etcd::TxnOp::put(
            key.as_bytes(),
            value.clone(),
            lease.map(|lease| etcd::PutOptions::new().with_lease(lease.0)),
        ),
        Op::Delete { key } => etcd::TxnOp::delete(key.as_bytes(), None),
    }
}

fn header_revision(header: Option<&etcd::ResponseHeader>) -> Revision {
    header.map_or(0, |h| h.revision())
}

fn stream_ended(what: &str) -> etcd::Error {
    etcd::Error::IoError(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("etcd closed the {what} stream"),
    ))
}

fn grpc_status(err: &etcd::Error) -> Option<&tonic::Status> {
    match err {
        etcd::Error::GRpcStatus(status) => Some(status),
        _ => None,
    }
}

/// Whether `E` is among the causes of `err` (etcd-client's error does not
/// expose its causes itself, the ones it wraps do).
fn has_in_chain<E: std::error::Error + 'static>(err: &etcd::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = match err {
        etcd::Error::GRpcStatus(status) => Some(status),
        etcd::Error::TransportError(err) => Some(err),
        etcd::Error::IoError(err) => Some(err),
        _ => None,
    };
    while let Some(err) = cause {
        if err.is::<E>() {
            return true;
        }
        cause = err.source();
    }
    false
}

/// Failures after which etcd certainly did not act on the request: it never
/// left this process (the connection to the member could not be made), or
/// etcd refused it before doing anything.
fn not_applied(err: &etcd::Error) -> bool {
    has_in_chain::<tonic::ConnectError>(err)
        || grpc_status(err).is_some_and(|status| {
            status.message().contains(NO_LEADER) || status.message().contains(PROPOSAL_DROPPED)
        })
}

/// Failures that say nothing about the request itself: the member or the
/// connection failed, and another attempt may well succeed.
fn transient(err: &etcd::Error) -> bool {
    match err {
        etcd::Error::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Aborted
        ),
        etcd::Error::TransportError(_) | etcd::Error::IoError(_) | etcd::Error::WatchError(_) => {
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_testing::EtcdServer;

    async fn store_on(server: &EtcdServer) -> EtcdStore {
        let options = EtcdOptions {
            endpoints: vec![server.endpoint()],
            ..EtcdOptions::default()
        };
        EtcdStore::connect(options).await.expect("connect")
    }

    #[tokio::test]
    async fn a_txn_naming_a_revoked_lease_among_several_reports_that_one() {
        let server = EtcdServer::start().await.expect("start etcd");
        let store = store_on(&server).await;
        let live = store
            .lease_grant(Duration::from_secs(60))
            .await
            .expect("grant");
        let revoked = store
            .lease_grant(Duration::from_secs(60))
            .await
            .expect("grant");
        store.lease_revoke(revoked.id).await.expect("revoke");

        let txn = Txn::new().and_then([
            Op::put_with_lease("/a", "a", live.id),
            Op::put_with_lease("/b", "b", revoked.id),
        ]);
        match store.txn(txn).await {
            Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, revoked.id),
            other => panic!("expected LeaseNotFound({:?}), got {other:?}", revoked.id),
        }
        assert_eq!(
            store.get("/a").await.expect("get"),
            None,
            "the txn wrote nothing"
        );
    }

    #[tokio::test]
    async fn compacting_an_already_compacted_revision_names_the_oldest_one() {
        let server = EtcdServer::start().await.expect("start etcd");
        let store = store_on(&server).await;
        // A fresh etcd is at revision 1; compacting there leaves revision 1
        // as the oldest, the one case etcd's watch does not reveal.
        store.compact(1).await.expect("compact at 1");
        match store.compact(1).await {
            Err(StoreError::Compacted { oldest }) => assert_eq!(oldest, 1),
            other => panic!("expected Compacted, got {other:?}"),
        }
        let mut last = 1;
        for i in 0..5 {
            last = store.put("/k", vec![i], None).await.expect("put");
        }
        store.compact(last - 1).await.expect("compact");
        match store.compact(2).await {
            Err(StoreError::Compacted { oldest }) => assert_eq!(oldest, last - 1),
            other => panic!("expected Compacted, got {other:?}"),
        }
        match store.compact(last + 10).await {
            Err(StoreError::FutureRevision { requested, current }) => {
                assert_eq!((requested, current), (last + 10, last));
            }
            other => panic!("expected FutureRevision, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_continuation_key_past_the_prefix_reads_nothing() {
        let server = EtcdServer::start().await.expect("start etcd");
        let store = store_on(&server).await;
        for key in ["/a/1", "/a/2", "/b/1"] {
            store.put(key, b"v".to_vec(), None).await.expect("put");
        }
        let page = store
            .range(&RangeRequest::prefix("/a/").after("/b"))
            .await
            .expect("range");
        assert!(page.kvs.is_empty() && !page.more, "{page:?}");
        assert_eq!(page.revision, 4);
        let page = store
            .range(&RangeRequest::prefix("").after("/a/2"))
            .await
            .expect("range");
        let keys: Vec<&str> = page.kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["/b/1"]);
    }

    #[tokio::test]
    async fn dropping_a_watch_stream_cancels_the_etcd_watch() {
        const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";
        let server = EtcdServer::start().await.expect("start etcd");
        let store = store_on(&server).await;
        let watch = store.watch("/", 0).await.expect("watch");
        assert_eq!(server.metric(WATCHERS).await.expect("metric"), 1.0);
        drop(watch);
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.metric(WATCHERS).await.expect("metric") > 0.0 {
            assert!(
                Instant::now() < deadline,
                "etcd still serves the dropped watch"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn keep_alive_of_an_unknown_lease_is_lease_not_found() {
        let server = EtcdServer::start().await.expect("start etcd");
        let store = store_on(&server).await;
        let lease = store
            .lease_grant(Duration::from_secs(30))
            .await
            .expect("grant");
        assert_eq!(
            store.lease_keep_alive(lease.id).await.expect("keep alive"),
            30
        );
        store.lease_revoke(lease.id).await.expect("revoke");
        assert!(matches!(
            store.lease_keep_alive(lease.id).await,
            Err(StoreError::LeaseNotFound(id)) if id == lease.id
        ));
        assert!(matches!(
            store.lease_revoke(lease.id).await,
            Err(StoreError::LeaseNotFound(id)) if id == lease.id
        ));
    }

    #[test]
    fn range_bounds_cover_the_prefix_after_the_continuation_key() {
        assert_eq!(
            range_bounds(&RangeRequest::prefix("/a/")),
            (b"/a/".to_vec(), b"/a0".to_vec())
        );
        assert_eq!(
            range_bounds(&RangeRequest::prefix("/a/").after("/a/x")),
            (b"/a/x\0".to_vec(), b"/a0".to_vec())
        );
        // A continuation key before the prefix does not widen the range.
        assert_eq!(
            range_bounds(&RangeRequest::prefix("/b/").after("/a")),
            (b"/b/".to_vec(), b"/b0".to_vec())
        );
    }

    #[test]
    fn empty_prefix_is_the_whole_keyspace() {
        assert_eq!(range_bounds(&RangeRequest::prefix("")), (vec![0], vec![0]));
        assert_eq!(
            range_bounds(&RangeRequest::prefix("").after("k")),
            (b"k\0".to_vec(), vec![0])
        );
    }
}
