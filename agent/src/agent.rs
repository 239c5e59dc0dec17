//! The agent: registration, heartbeats, the desired-instances stream, the
//! reconciler that drives the runtime, and status reports.
//!
//! Four tasks per node, sharing the node's credential:
//! - **heartbeat**: every `heartbeat_interval`, so the controller keeps the
//!   node alive;
//! - **stream**: holds `GET /v1/nodes/{node}/instances/watch` and keeps the
//!   desired set (a snapshot replaces it whole; puts and deletes amend it),
//!   reconnecting with capped, jittered exponential backoff whenever the
//!   stream breaks;
//! - **reconciler**: level-triggered: lists the runtime, starts what is
//!   desired and missing, stops what runs and is not desired, restarts what
//!   exited under the app's restart policy, and publishes the report;
//! - **reporter**: posts the report whenever it changed, and at least every
//!   `report_interval`.
//!
//! [`AgentHandle::serve_health`] adds a listener for a supervisor:
//! `GET /healthz` is 200 while those four loops run and the reconciler
//! finishes a pass at least every three resync intervals (a supervisor
//! that restarts the agent on a 503 cures a wedged or dead agent, and a
//! lost controller is no reason to restart it); `GET /readyz` is 200 when,
//! besides, the node is registered, its desired-instances stream is open
//! and has delivered a snapshot, and the container engine answers a ping
//! (within 2 s); otherwise 503 with the reason as a line of text.
//!
//! Until the first snapshot arrives the reconciler touches nothing, so an
//! agent that restarts (or cannot reach the controller) adopts what already
//! runs instead of stopping it. When the controller is unreachable, the last
//! desired set stays in force: running instances keep running.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};

use futures::StreamExt;
use keel_manifest::RestartPolicy;
use keel_protocol::{
    InstanceRef, InstanceSpec, InstanceState, InstanceStatus, LogRequest, StatusReport,
    StreamMessage,
};
use tokio::sync::{Mutex, watch};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::client::{CallError, Controller, ControllerError, LineDecoder, NodeRegistration};
use crate::runtime::{Runtime, RuntimeError, RuntimeState, display_ref, error_chain};

/// A stream silent this long (three keepalive periods) is dead.
const STREAM_SILENCE: Duration = Duration::from_secs(30);

/// `GET /readyz` waits this long for the container engine's answer.
const ENGINE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// A health check connection serves one request within this long.
const HEALTH_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Capped exponential backoff: `initial`, doubling to `max`, each delay
/// jittered down by up to half so that a fleet does not retry in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

/// The state of one backoff sequence.
#[derive(Debug)]
struct Retry {
    config: Backoff,
    next: Duration,
    seed: u64,
}

impl Retry {
    fn new(config: Backoff, seed: u64) -> Self {
        Self {
            config,
            next: config.initial,
            seed: seed | 1,
        }
    }

    fn reset(&mut self) {
        self.next = self.config.initial;
    }

    fn delay(&mut self) -> Duration {
        // xorshift64: deterministic per node, different across nodes.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.next;
        self.next = (self.next * 2).min(self.config.max);
        let half = base / 2;
        let jitter_ms = (half.as_millis() as u64).max(1);
        half + Duration::from_millis(self.seed % jitter_ms)
    }
}

fn seed(name: &str) -> u64 {
    // FNV-1a.
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How to run one node's agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The controller's API, e.g. `http://10.0.0.1:7070`.
    pub controller_url: String,
    /// The cluster's join token, for registration.
    pub join_token: String,
    /// What the node is and offers.
    pub node: NodeRegistration,
    /// Default 1 s; keep it well under the controller's `node_lost_after`.
    pub heartbeat_interval: Duration,
    /// A report is sent at least this often, changed or not. Default 5 s.
    pub report_interval: Duration,
    /// The runtime is listed at least this often, for runtimes whose
    /// `changed` does not see every change. Default 10 s.
    pub resync_interval: Duration,
    /// Between attempts to register, to reconnect the stream and to resend
    /// a report. Default 200 ms doubling to 5 s.
    pub retry: Backoff,
    /// Each call but the stream. Default 10 s.
    pub request_timeout: Duration,
    /// Runtime operations (starts, stops) in flight at once. Default 16.
    pub max_concurrent_ops: usize,
    /// How long a ready instance that is no longer desired keeps running
    /// before it is stopped. It left the route table in the same store
    /// revision that took it off this node, so routers stop sending it
    /// new requests within milliseconds; this lets the ones in flight
    /// finish (a rolling update or a scale-down drops none). Default 2 s.
    pub stop_drain: Duration,
}

impl AgentConfig {
    pub fn new(
        controller_url: impl Into<String>,
        join_token: impl Into<String>,
        node: NodeRegistration,
    ) -> Self {
        Self {
            controller_url: controller_url.into(),
            join_token: join_token.into(),
            node,
            heartbeat_interval: Duration::from_secs(1),
            report_interval: Duration::from_secs(5),
            resync_interval: Duration::from_secs(10),
            retry: Backoff::default(),
            request_timeout: Duration::from_secs(10),
            max_concurrent_ops: 16,
            stop_drain: Duration::from_secs(2),
        }
    }
}

/// What an agent is doing, for tests and diagnostics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// It holds a credential.
    pub registered: bool,
    /// Its stream is open and has delivered a snapshot.
    pub streaming: bool,
    /// The generation of the last stream message applied.
    pub generation: Option<i64>,
    /// How many instances it should run.
    pub desired: usize,
    /// The last report was accepted.
    pub reported: bool,
}

/// The desired set, as the stream has built it.
#[derive(Debug, Default)]
struct Desired {
    /// A snapshot has been received: until then, nothing is started or
    /// stopped.
    synced: bool,
    instances: BTreeMap<InstanceRef, Arc<InstanceSpec>>,
}

#[derive(Debug)]
struct Shared {
    config: AgentConfig,
    controller: Controller,
    runtime: Arc<dyn Runtime>,
    credential: Mutex<Option<String>>,
    desired: watch::Sender<Desired>,
    report: watch::Sender<StatusReport>,
    status: watch::Sender<AgentStatus>,
    shutdown: watch::Receiver<bool>,
    /// When the reconciler last finished a pass (or started).
    last_pass: std::sync::Mutex<Instant>,
}

/// Resolves when shutdown is asked for (or the handle is gone).
async fn shutdown_requested(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

impl Shared {
    fn node(&self) -> &str {
        &self.config.node.name
    }

    /// `GET /healthz`: why the agent is not alive, if it is not. `loops`
    /// are its long-lived tasks, which end only at shutdown (or by a
    /// panic).
    fn liveness(&self, loops: &[AbortHandle]) -> Result<(), String> {
        let ended = loops.iter().filter(|l| l.is_finished()).count();
        if ended > 0 {
            return Err(format!(
                "{ended} of the agent's {} loops ended",
                loops.len()
            ));
        }
        let since = self
            .last_pass
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed();
        let limit = self.config.resync_interval * 3;
        if since > limit {
            return Err(format!(
                "the reconciler has not finished a pass for {} ms (it should at least every {} ms)",
                since.as_millis(),
                self.config.resync_interval.as_millis()
            ));
        }
        Ok(())
    }

    /// `GET /readyz`: why the agent is not ready, if it is not.
    async fn readiness(&self, loops: &[AbortHandle]) -> Result<(), String> {
        self.liveness(loops)?;
        let status = self.status.borrow().clone();
        if !status.registered {
            return Err(format!(
                "not registered with the controller at {}",
                self.controller.url()
            ));
        }
        if !status.streaming {
            return Err(format!(
                "the desired-instances stream from {} is not connected",
                self.controller.url()
            ));
        }
        match tokio::time::timeout(ENGINE_PING_TIMEOUT, self.runtime.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error_chain(&error)),
            Err(_) => Err(format!(
                "the container engine did not answer within {} s",
                ENGINE_PING_TIMEOUT.as_secs()
            )),
        }
    }

    /// `Some(output)`, or `None` if shutdown came first.
    async fn unless_shutdown<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = shutdown_requested(self.shutdown.clone()) => None,
            output = work => Some(output),
        }
    }

    /// The node's credential, registering first if there is none (one
    /// registration at a time; retried with backoff until it succeeds).
    /// `None` on shutdown.
    async fn credential(&self) -> Option<String> {
        let mut held = self.unless_shutdown(self.credential.lock()).await?;
        if let Some(credential) = held.as_ref() {
            return Some(credential.clone());
        }
        let mut retry = Retry::new(self.config.retry, seed(self.node()));
        let mut failing = false;
        loop {
            let attempt = self
                .controller
                .register(&self.config.join_token, &self.config.node);
            match self.unless_shutdown(attempt).await? {
                Ok(token) => {
                    tracing::info!(node = %self.node(), controller = %self.controller.url(), "registered");
                    *held = Some(token.clone());
                    self.status.send_modify(|s| s.registered = true);
                    return Some(token);
                }
                Err(error) => {
                    if failing {
                        tracing::debug!(error = %error_chain(&error), "registration failed again");
                    } else {
                        tracing::warn!(error = %error_chain(&error), "registration failed; retrying");
                        failing = true;
                    }
                }
            }
            self.unless_shutdown(tokio::time::sleep(retry.delay()))
                .await?;
        }
    }

    /// Forgets a credential the controller refused, so the next call
    /// registers again; unless another task already did.
    async fn refused(&self, credential: &str) {
        let mut held = self.credential.lock().await;
        if held.as_deref() == Some(credential) {
            tracing::warn!(node = %self.node(), "the controller refused the node credential; registering again");
            *held = None;
            self.status.send_modify(|s| s.registered = false);
        }
    }

    async fn heartbeats(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            if self.unless_shutdown(tick.tick()).await.is_none() {
                return;
            }
            let Some(credential) = self.credential().await else {
                return;
            };
            let beat = self.controller.heartbeat(self.node(), &credential);
            match self.unless_shutdown(beat).await {
                None => return,
                Some(Ok(())) => {
                    if failing {
                        tracing::info!(node = %self.node(), "heartbeats go through again");
                        failing = false;
                    }
                }
                Some(Err(error)) if error.is_unauthorized() => self.refused(&credential).await,
                Some(Err(error)) => {
                    if !failing {
                        tracing::warn!(error = %error_chain(&error), "heartbeat failed");
                        failing = true;
                    }
                }
            }
        }
    }

    async fn stream(self: Arc<Self>) {
        let mut retry = Retry::new(self.config.retry, seed(self.node()).rotate_left(17));
        // Breaks in a row without a snapshot between them.
        let mut failures = 0u32;
        loop {
            let Some(credential) = self.credential().await else {
                return;
            };
            let Some((ended, synced)) = self
                .unless_shutdown(self.session(&credential, &mut retry))
                .await
            else {
                return;
            };
            self.status.send_modify(|s| s.streaming = false);
            if ended.is_unauthorized() {
                // Registering again comes next; the backoff below keeps a
                // controller that refuses every credential from a storm.
                self.refused(&credential).await;
            }
            failures = if synced { 1 } else { failures + 1 };
            // A stream that ends once is normal (a controller restarting);
            // say so loudly only when it keeps failing.
            if failures == 3 {
                tracing::warn!(error = %error_chain(&ended), "the desired-instances stream keeps failing; retrying");
            } else {
                tracing::debug!(error = %error_chain(&ended), "desired-instances stream ended; reconnecting");
            }
            let delay = retry.delay();
            if self
                .unless_shutdown(tokio::time::sleep(delay))
                .await
                .is_none()
            {
                return;
            }
        }
    }

    /// One stream, from connect to its end: why it ended, and whether it
    /// delivered a snapshot.
    async fn session(
        self: &Arc<Self>,
        credential: &str,
        retry: &mut Retry,
    ) -> (ControllerError, bool) {
        let wrap = |source| ControllerError::Watch {
            node: self.node().to_owned(),
            source,
        };
        let mut response = match self.controller.watch(self.node(), credential).await {
            Ok(response) => response,
            Err(error) => return (error, false),
        };
        let mut decoder = LineDecoder::default();
        let mut synced = false;
        loop {
            // The controller sends a blank line every 10 s when it has
            // nothing to say: silence this long is a dead connection.
            let chunk = match tokio::time::timeout(STREAM_SILENCE, response.chunk()).await {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Ok(None)) => return (wrap(CallError::Ended), synced),
                Ok(Err(error)) => return (wrap(CallError::Transport(error)), synced),
                Err(_) => {
                    return (
                        wrap(CallError::Silent {
                            seconds: STREAM_SILENCE.as_secs(),
                        }),
                        synced,
                    );
                }
            };
            let messages = match decoder.feed(&chunk) {
                Ok(messages) => messages,
                Err(error) => return (wrap(error), synced),
            };
            for message in messages {
                match message {
                    StreamMessage::Logs(request) => {
                        self.serve_logs(request, credential.to_owned());
                        continue;
                    }
                    StreamMessage::Snapshot { .. } => {
                        retry.reset();
                        synced = true;
                    }
                    StreamMessage::Put { .. } | StreamMessage::Delete { .. } => {}
                }
                self.apply(message);
            }
        }
    }

    /// Answers a log request in a task of its own: the instance's log,
    /// POSTed line by line for as long as the controller takes it (a
    /// followed log ends when the controller ends the request, or at
    /// shutdown).
    fn serve_logs(self: &Arc<Self>, request: LogRequest, credential: String) {
        let shared = self.clone();
        tokio::spawn(async move {
            let instance = request.instance.clone();
            let lines = match shared
                .runtime
                .logs(&instance, request.tail, request.follow)
                .await
            {
                Ok(lines) => lines,
                Err(error) => {
                    let line = format!("keel: {}", error_chain(&error));
                    Box::pin(futures::stream::once(async move { Ok(line) }))
                }
            };
            // A read error ends the log with the reason as its last line.
            let body = lines.scan(false, |failed, line| {
                if *failed {
                    return futures::future::ready(None);
                }
                let text = match line {
                    Ok(line) => format!("{line}\n"),
                    Err(error) => {
                        *failed = true;
                        format!("keel: {}\n", error_chain(&error))
                    }
                };
                futures::future::ready(Some(Ok::<_, std::convert::Infallible>(text)))
            });
            let sent = shared.controller.send_logs(
                shared.node(),
                &credential,
                &request.request,
                reqwest::Body::wrap_stream(body),
            );
            if let Some(Err(error)) = shared.unless_shutdown(sent).await {
                tracing::debug!(instance = %display_ref(&instance), error = %error_chain(&error), "log request ended");
            }
        });
    }

    fn apply(&self, message: StreamMessage) {
        let generation = match message {
            StreamMessage::Snapshot {
                generation,
                instances,
            } => {
                self.desired.send_modify(|desired| {
                    desired.synced = true;
                    desired.instances = instances
                        .into_iter()
                        .map(|spec| (spec.instance.clone(), Arc::new(spec)))
                        .collect();
                });
                generation
            }
            StreamMessage::Put {
                generation,
                instance,
            } => {
                let spec: InstanceSpec = *instance;
                self.desired.send_if_modified(|desired| {
                    let spec = Arc::new(spec);
                    let old = desired
                        .instances
                        .insert(spec.instance.clone(), spec.clone());
                    // A record's other changes (its scheduling notes) come
                    // as puts too; they change nothing here.
                    old.is_none_or(|old| old != spec)
                });
                generation
            }
            StreamMessage::Delete {
                generation,
                instance,
            } => {
                self.desired
                    .send_if_modified(|desired| desired.instances.remove(&instance).is_some());
                generation
            }
            // Answered by `serve_logs`; never part of the desired set.
            StreamMessage::Logs(_) => return,
        };
        let desired = self.desired.borrow().instances.len();
        self.status.send_modify(|s| {
            s.streaming = true;
            s.generation = Some(generation);
            s.desired = desired;
        });
    }

    async fn reporter(self: Arc<Self>) {
        let mut reports = self.report.subscribe();
        let mut retry = Retry::new(self.config.retry, seed(self.node()).rotate_left(31));
        let mut last_sent: Option<StatusReport> = None;
        let mut due = Instant::now();
        let mut failing = false;
        loop {
            let current = reports.borrow_and_update().clone();
            if last_sent.as_ref() == Some(&current) && Instant::now() < due {
                let wait = async {
                    tokio::select! {
                        changed = reports.changed() => changed.is_ok(),
                        () = tokio::time::sleep_until(due) => true,
                    }
                };
                match self.unless_shutdown(wait).await {
                    Some(true) => continue,
                    _ => return,
                }
            }
            let Some(credential) = self.credential().await else {
                return;
            };
            let sent = self.controller.report(self.node(), &credential, &current);
            match self.unless_shutdown(sent).await {
                None => return,
                Some(Ok(())) => {
                    last_sent = Some(current);
                    due = Instant::now() + self.config.report_interval;
                    retry.reset();
                    failing = false;
                    self.status.send_modify(|s| s.reported = true);
                }
                Some(Err(error)) => {
                    self.status.send_modify(|s| s.reported = false);
                    if error.is_unauthorized() {
                        self.refused(&credential).await;
                    }
                    if !failing {
                        tracing::warn!(error = %error_chain(&error), "status report failed; retrying");
                        failing = true;
                    }
                    let delay = retry.delay();
                    if self
                        .unless_shutdown(tokio::time::sleep(delay))
                        .await
                        .is_none()
                    {
                        return;
                    }
                }
            }
        }
    }
}

/// What the agent asked of the runtime for one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Start,
    /// Started again after it exited: counts as a restart.
    Restart,
    /// Another revision under the same name: stop, then start.
    Replace,
    Stop,
}

/// Restart bookkeeping of one instance.
#[derive(Debug)]
struct Restarts {
    count: u32,
    delay: Duration,
    /// When the next start is allowed, once it has exited or failed.
    due: Option<Instant>,
    ready_since: Option<Instant>,
    /// Why the last start failed (no instance exists to list).
    failed_start: Option<String>,
    revision: u64,
}

impl Restarts {
    fn new(spec: &InstanceSpec) -> Self {
        Self {
            count: 0,
            delay: Duration::from_millis(spec.manifest.restart.backoff.initial_ms),
            due: None,
            ready_since: None,
            failed_start: None,
            revision: spec.revision,
        }
    }

    /// Schedules the next attempt (if none is) and says whether it is due.
    fn due(&mut self, now: Instant) -> bool {
        let due = *self.due.get_or_insert(now + self.delay);
        now >= due
    }

    fn attempted(&mut self, spec: &InstanceSpec) {
        self.due = None;
        let max = Duration::from_millis(spec.manifest.restart.backoff.max_ms);
        self.delay = (self.delay * 2).min(max);
    }
}

/// Whether the restart policy starts an exited (or failed) instance again.
fn wants_restart(policy: RestartPolicy, state: &RuntimeState) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => {
            state.state == InstanceState::Failed || state.exit_code != Some(0)
        }
        RestartPolicy::Never => false,
    }
}

type Done = (InstanceRef, Operation, Result<(), RuntimeError>);

struct Reconciler {
    shared: Arc<Shared>,
    desired: watch::Receiver<Desired>,
    ops: JoinSet<Done>,
    in_flight: BTreeSet<InstanceRef>,
    restarts: BTreeMap<InstanceRef, Restarts>,
}

impl Reconciler {
    async fn run(mut self) {
        let mut resync = Instant::now();
        loop {
            // The next restart that falls due. One already due that a pass
            // did not act on waits for an operation to finish (it was in
            // flight, or the budget was spent), and that wakes the loop.
            let now = Instant::now();
            let wake = self
                .restarts
                .values()
                .filter_map(|r| r.due)
                .filter(|due| *due > now)
                .chain([resync])
                .min()
                .unwrap_or(resync);
            let runtime = self.shared.runtime.clone();
            tokio::select! {
                biased;
                () = shutdown_requested(self.shared.shutdown.clone()) => break,
                Some(done) = self.ops.join_next(), if !self.ops.is_empty() => {
                    if let Ok(done) = done {
                        self.finished(done);
                    }
                }
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = runtime.changed() => {}
                () = tokio::time::sleep_until(wake) => {}
            }
            if Instant::now() >= resync {
                resync = Instant::now() + self.shared.config.resync_interval;
            }
            self.pass().await;
            *self
                .shared
                .last_pass
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        }
        // Graceful: let what was asked of the runtime finish.
        while self.ops.join_next().await.is_some() {}
    }

    fn finished(&mut self, (instance, operation, result): Done) {
        self.in_flight.remove(&instance);
        let restarts = self.restarts.get_mut(&instance);
        match (result, restarts) {
            (Ok(()), Some(restarts)) => {
                restarts.failed_start = None;
                if operation == Operation::Restart {
                    restarts.count += 1;
                }
            }
            (Ok(()), None) => {}
            (Err(error), restarts) => {
                let reason = error_chain(&error);
                tracing::debug!(instance = %display_ref(&instance), ?operation, error = %reason, "runtime operation failed");
                if let Some(restarts) = restarts
                    && operation != Operation::Stop
                {
                    restarts.failed_start = Some(reason);
                }
            }
        }
    }

    fn spawn(
        &mut self,
        instance: InstanceRef,
        operation: Operation,
        spec: Option<Arc<InstanceSpec>>,
    ) {
        self.spawn_after(instance, operation, spec, Duration::ZERO);
    }

    /// [`Reconciler::spawn`], the operation starting after `delay`.
    fn spawn_after(
        &mut self,
        instance: InstanceRef,
        operation: Operation,
        spec: Option<Arc<InstanceSpec>>,
        delay: Duration,
    ) {
        self.in_flight.insert(instance.clone());
        let runtime = self.shared.runtime.clone();
        self.ops.spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let result = match (operation, spec) {
                (Operation::Stop, _) | (_, None) => runtime.stop(&instance).await,
                (Operation::Replace, Some(spec)) => match runtime.stop(&instance).await {
                    Ok(()) => runtime.start(&spec).await,
                    Err(error) => Err(error),
                },
                (Operation::Start | Operation::Restart, Some(spec)) => runtime.start(&spec).await,
            };
            (instance, operation, result)
        });
    }

    /// One level-triggered pass: close the gap between the desired set and
    /// what the runtime has, then publish the report.
    async fn pass(&mut self) {
        let observed = match self.shared.runtime.list().await {
            Ok(observed) => observed,
            Err(error) => {
                tracing::warn!(node = %self.shared.node(), error = %error_chain(&error), "cannot list the runtime");
                return;
            }
        };
        let now = Instant::now();
        let (synced, desired) = {
            let desired = self.desired.borrow_and_update();
            (desired.synced, desired.instances.clone())
        };
        let observed_map: BTreeMap<&InstanceRef, &RuntimeState> =
            observed.iter().map(|(r, s)| (r, s)).collect();
        if synced {
            self.restarts.retain(|r, _| desired.contains_key(r));
            let mut budget = self
                .shared
                .config
                .max_concurrent_ops
                .saturating_sub(self.ops.len());
            for (instance, spec) in &desired {
                if budget == 0 {
                    break;
                }
                if self.in_flight.contains(instance) {
                    continue;
                }
                let restarts = self
                    .restarts
                    .entry(instance.clone())
                    .or_insert_with(|| Restarts::new(spec));
                if restarts.revision != spec.revision {
                    *restarts = Restarts::new(spec);
                }
                let operation = match observed_map.get(instance) {
                    None if restarts.failed_start.is_some() => {
                        // A start that failed (an image that does not
                        // pull) is tried again with the restart backoff,
                        // whatever the policy: it never ran.
                        if !restarts.due(now) {
                            continue;
                        }
                        restarts.attempted(spec);
                        Operation::Start
                    }
                    None => Operation::Start,
                    // One revision is one manifest, so the digest is taken
                    // only when the revisions differ.
                    Some(state)
                        if state.revision != spec.revision
                            && state.spec_version != spec.container_version() =>
                    {
                        Operation::Replace
                    }
                    Some(state)
                        if matches!(state.state, InstanceState::Exited | InstanceState::Failed) =>
                    {
                        restarts.ready_since = None;
                        if !wants_restart(spec.manifest.restart.policy, state) || !restarts.due(now)
                        {
                            continue;
                        }
                        restarts.attempted(spec);
                        Operation::Restart
                    }
                    Some(state) => {
                        // Starting or running: no restart is pending, and
                        // a delay earned by crashing is forgiven once it
                        // has stayed ready for the cap.
                        restarts.due = None;
                        if state.ready {
                            let since = *restarts.ready_since.get_or_insert(now);
                            let max = Duration::from_millis(spec.manifest.restart.backoff.max_ms);
                            if now.saturating_duration_since(since) >= max {
                                restarts.delay =
                                    Duration::from_millis(spec.manifest.restart.backoff.initial_ms);
                            }
                        } else {
                            restarts.ready_since = None;
                        }
                        continue;
                    }
                };
                budget -= 1;
                self.spawn(instance.clone(), operation, Some(spec.clone()));
            }
            for (instance, state) in &observed {
                if budget == 0 {
                    break;
                }
                if !desired.contains_key(instance) && !self.in_flight.contains(instance) {
                    budget -= 1;
                    // Only an instance that may be serving needs draining.
                    let drain = if state.ready {
                        self.shared.config.stop_drain
                    } else {
                        Duration::ZERO
                    };
                    self.spawn_after(instance.clone(), Operation::Stop, None, drain);
                }
            }
        }
        self.publish(&observed, &desired);
    }

    /// The whole report: what the runtime has, and the desired instances
    /// whose start failed (they exist nowhere else).
    fn publish(
        &self,
        observed: &[(InstanceRef, RuntimeState)],
        desired: &BTreeMap<InstanceRef, Arc<InstanceSpec>>,
    ) {
        let mut instances: Vec<InstanceStatus> = observed
            .iter()
            .map(|(instance, state)| InstanceStatus {
                instance: instance.clone(),
                state: state.state,
                ready: state.ready,
                restarts: self.restarts.get(instance).map_or(0, |r| r.count),
                exit_code: state.exit_code,
                reason: state.reason.clone(),
                ports: state.ports.clone(),
                cpu_millis: state.cpu_millis,
                memory_bytes: state.memory_bytes,
            })
            .collect();
        let listed: BTreeSet<&InstanceRef> = observed.iter().map(|(r, _)| r).collect();
        for (instance, restarts) in &self.restarts {
            if let Some(reason) = &restarts.failed_start
                && desired.contains_key(instance)
                && !listed.contains(instance)
            {
                instances.push(InstanceStatus {
                    instance: instance.clone(),
                    state: InstanceState::Failed,
                    ready: false,
                    restarts: restarts.count,
                    exit_code: None,
                    reason: Some(reason.clone()),
                    ports: BTreeMap::new(),
                    cpu_millis: None,
                    memory_bytes: None,
                });
            }
        }
        instances.sort_by(|a, b| a.instance.cmp(&b.instance));
        let report = StatusReport { instances };
        self.shared.report.send_if_modified(|current| {
            if *current == report {
                false
            } else {
                *current = report;
                true
            }
        });
    }
}

/// A node agent, ready to run.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    runtime: Arc<dyn Runtime>,
    http: Option<reqwest::Client>,
}

/// Errors building an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot build the HTTP client")]
    Http(#[source] reqwest::Error),
    #[error("cannot listen for health checks on {addr}")]
    HealthListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Agent {
    pub fn new(config: AgentConfig, runtime: Arc<dyn Runtime>) -> Self {
        Self {
            config,
            runtime,
            http: None,
        }
    }

    /// Uses this HTTP client (and its connection pool) instead of one of
    /// the agent's own.
    pub fn with_http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// Starts the agent's tasks on the current Tokio runtime.
    pub fn spawn(self) -> Result<AgentHandle, AgentError> {
        let http = match self.http {
            Some(http) => http,
            None => reqwest::Client::builder()
                .connect_timeout(self.config.request_timeout)
                // HTTP/2 without TLS (h2c): the stream and every other call
                // share one connection, and the controller, which holds a
                // connection of every node, holds half as many.
                .http2_prior_knowledge()
                .pool_max_idle_per_host(1)
                .build()
                .map_err(AgentError::Http)?,
        };
        let controller = Controller::new(
            &self.config.controller_url,
            http,
            self.config.request_timeout,
        );
        let (stop, shutdown) = watch::channel(false);
        let (desired, desired_rx) = watch::channel(Desired::default());
        let (status, status_rx) = watch::channel(AgentStatus::default());
        let node = self.config.node.name.clone();
        let shared = Arc::new(Shared {
            config: self.config,
            controller,
            runtime: self.runtime,
            credential: Mutex::new(None),
            desired,
            report: watch::Sender::new(StatusReport {
                instances: Vec::new(),
            }),
            status,
            shutdown,
            last_pass: std::sync::Mutex::new(Instant::now()),
        });
        let reconciler = Reconciler {
            shared: shared.clone(),
            desired: desired_rx,
            ops: JoinSet::new(),
            in_flight: BTreeSet::new(),
            restarts: BTreeMap::new(),
        };
        let tasks = vec![
            tokio::spawn(shared.clone().heartbeats()),
            tokio::spawn(shared.clone().stream()),
            tokio::spawn(shared.clone().reporter()),
            tokio::spawn(reconciler.run()),
        ];
        Ok(AgentHandle {
            node,
            stop,
            status: status_rx,
            tasks,
            health: std::sync::Mutex::new(Vec::new()),
            shared,
        })
    }
}

/// A running agent. Dropping it kills the agent (see [`AgentHandle::kill`]).
#[derive(Debug)]
pub struct AgentHandle {
    node: String,
    stop: watch::Sender<bool>,
    status: watch::Receiver<AgentStatus>,
    tasks: Vec<JoinHandle<()>>,
    /// Health listeners ([`AgentHandle::serve_health`]).
    health: std::sync::Mutex<Vec<JoinHandle<()>>>,
    shared: Arc<Shared>,
}

impl AgentHandle {
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node's credential, once registered: a router on the same node
    /// (`keel agent --roles router`) reads the route table with it. It
    /// changes only if the controller forgot the node and it registered
    /// again.
    pub async fn credential(&self) -> Option<String> {
        self.shared.credential.lock().await.clone()
    }

    /// What the agent is doing now.
    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// Serves `GET /healthz` and `GET /readyz` on `addr` (see the module
    /// doc) until the agent stops; returns the address it listens on
    /// (port 0 picks a free one). Plain HTTP/1.1, one request per
    /// connection, for a supervisor on this machine.
    pub async fn serve_health(&self, addr: SocketAddr) -> Result<SocketAddr, AgentError> {
        let listen_error = |source| AgentError::HealthListen { addr, source };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(listen_error)?;
        let bound = listener.local_addr().map_err(listen_error)?;
        let loops = self.tasks.iter().map(JoinHandle::abort_handle).collect();
        let task = tokio::spawn(serve_health(listener, self.shared.clone(), loops));
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
        Ok(bound)
    }

    fn stop_health(&self) {
        let tasks = std::mem::take(
            &mut *self
                .health
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for task in tasks {
            task.abort();
        }
    }

    /// Stops the agent gracefully: it closes its stream, stops heartbeats
    /// and reports, and waits for runtime operations in flight. Instances
    /// keep running (a new agent on the same runtime adopts them).
    pub async fn stop(mut self) {
        self.stop_health();
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }

    /// Kills the agent at once, as if the machine were unplugged: no more
    /// heartbeats, the stream and every connection drop, operations in
    /// flight are abandoned, and the agent's hold on the runtime goes.
    pub fn kill(mut self) {
        self.stop_health();
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.stop_health();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Accepts health check connections until aborted; each connection's
/// task lives in the set, so aborting this drops them too.
async fn serve_health(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    loops: Vec<AbortHandle>,
) {
    let loops: Arc<[AbortHandle]> = loops.into();
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, most likely: wait, not spin.
                tracing::warn!(error = %error, "cannot accept a health check connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (shared, loops) = (shared.clone(), loops.clone());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<_>| {
                let (shared, loops) = (shared.clone(), loops.clone());
                async move { Ok::<_, Infallible>(health_answer(&shared, &loops, &request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(HEALTH_REQUEST_TIMEOUT, connection).await;
        });
    }
}

/// The answer to one health check request.
async fn health_answer<B>(
    shared: &Shared,
    loops: &[AbortHandle],
    request: &Request<B>,
) -> Response<Full<Bytes>> {
    let readiness = match request.uri().path() {
        "/healthz" => false,
        "/readyz" => true,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found: GET /healthz or /readyz\n",
            );
        }
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET (or HEAD)\n");
    }
    let outcome = if readiness {
        shared.readiness(loops).await
    } else {
        shared.liveness(loops)
    };
    match outcome {
        Ok(()) => text(StatusCode::OK, "ok\n"),
        Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_below_each_step() {
        let mut retry = Retry::new(
            Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_millis(800),
            },
            seed("node-1"),
        );
        let steps = [100u64, 200, 400, 800, 800, 800];
        for step in steps {
            let delay = retry.delay().as_millis() as u64;
            assert!(
                (step / 2..step).contains(&delay),
                "{delay} ms not in [{}, {step})",
                step / 2
            );
        }
        retry.reset();
        assert!(retry.delay() < Duration::from_millis(100));
    }

    #[test]
    fn restart_policies() {
        let exited = |code| RuntimeState {
            revision: 1,
            spec_version: String::new(),
            state: InstanceState::Exited,
            ready: false,
            exit_code: Some(code),
            reason: None,
            ports: BTreeMap::new(),
            cpu_millis: None,
            memory_bytes: None,
        };
        assert!(wants_restart(RestartPolicy::Always, &exited(0)));
        assert!(!wants_restart(RestartPolicy::OnFailure, &exited(0)));
        assert!(wants_restart(RestartPolicy::OnFailure, &exited(2)));
        assert!(!wants_restart(RestartPolicy::Never, &exited(2)));
    }
}
