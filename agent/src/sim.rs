//! A simulated runtime: deterministic, in memory, no containers.
//!
//! It lets the control plane be tested and benchmarked with thousands of
//! nodes in one process. Nothing runs and nothing sleeps per instance: each
//! instance is a start time, and its state is computed from the clock when
//! it is listed (`starting` until `start_delay` has passed, then `running`
//! and ready, then `exited` if a crash rule says so). [`Runtime::changed`]
//! is one timer, until the next of those transitions.
//!
//! Failure injection goes by image name, so that a test chooses it per app
//! with nothing but a manifest:
//! - an image containing [`SimConfig::unpullable_marker`] (`unpullable`)
//!   fails to pull;
//! - one containing [`SimConfig::never_ready_marker`] (`unready`) runs but
//!   never passes its readiness check;
//! - one matching a [`CrashRule`] (by default `crashing`: after 500 ms,
//!   status 3) exits on its own after running that long.
//!
//! [`SimRuntime::set_engine_answering`] makes the whole engine stop
//! answering (`ping` and `list` fail), as a stopped dockerd would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use keel_protocol::{InstanceRef, InstanceSpec, InstanceState};
use tokio::time::Instant;

use crate::runtime::{LogStream, Runtime, RuntimeError, RuntimeState, display_ref};

/// How a simulated node behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The node's address, which published ports are reported on.
    pub address: String,
    /// How long an instance is `starting` before it runs and is ready.
    pub start_delay: Duration,
    /// An image whose reference contains this fails to pull.
    pub unpullable_marker: String,
    /// An image whose reference contains this runs but is never ready.
    pub never_ready_marker: String,
    /// Images that exit on their own.
    pub crashes: Vec<CrashRule>,
    /// Host ports are given out from here up, one per published port.
    pub first_host_port: u16,
}

/// Instances of images containing `image_contains` exit with `exit_code`
/// after running for `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashRule {
    pub image_contains: String,
    pub after: Duration,
    pub exit_code: i32,
}

impl SimConfig {
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            start_delay: Duration::from_millis(100),
            unpullable_marker: "unpullable".to_owned(),
            never_ready_marker: "unready".to_owned(),
            crashes: vec![CrashRule {
                image_contains: "crashing".to_owned(),
                after: Duration::from_millis(500),
                exit_code: 3,
            }],
            first_host_port: 30_000,
        }
    }

    pub fn with_start_delay(mut self, start_delay: Duration) -> Self {
        self.start_delay = start_delay;
        self
    }
}

/// The pull failure the simulation reports for an unpullable image.
#[derive(Debug, thiserror::Error)]
#[error("manifest unknown: the registry has no such image (simulated)")]
pub struct SimPullError;

/// One simulated instance, as a test inspects it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimInstance {
    pub instance: InstanceRef,
    pub revision: u64,
    pub image: String,
    pub state: InstanceState,
    pub ready: bool,
    /// How many times it was started (1, plus one per restart).
    pub starts: u32,
}

#[derive(Debug)]
struct Entry {
    revision: u64,
    version: String,
    image: String,
    started_at: Instant,
    starts: u32,
    ports: BTreeMap<String, String>,
    never_ready: bool,
    crash: Option<(Duration, i32)>,
}

impl Entry {
    fn state(&self, now: Instant, start_delay: Duration) -> RuntimeState {
        let elapsed = now.saturating_duration_since(self.started_at);
        let (state, ready, exit_code, reason) = match self.crash {
            _ if elapsed < start_delay => (InstanceState::Starting, false, None, None),
            Some((after, code)) if elapsed >= start_delay + after => (
                InstanceState::Exited,
                false,
                Some(code),
                Some(format!("exited with status {code} (simulated crash)")),
            ),
            _ => (InstanceState::Running, !self.never_ready, None, None),
        };
        RuntimeState {
            revision: self.revision,
            spec_version: self.version.clone(),
            state,
            ready,
            exit_code,
            reason,
            ports: self.ports.clone(),
            cpu_millis: None,
            memory_bytes: None,
        }
    }

    /// The next moment its state changes, if one is still ahead.
    fn next_transition(&self, now: Instant, start_delay: Duration) -> Option<Instant> {
        let ready_at = self.started_at + start_delay;
        if ready_at > now {
            return Some(ready_at);
        }
        let (after, _) = self.crash?;
        let crash_at = ready_at + after;
        (crash_at > now).then_some(crash_at)
    }
}

#[derive(Debug)]
struct State {
    instances: BTreeMap<InstanceRef, Entry>,
    next_port: u32,
    /// Set by [`SimRuntime::set_engine_answering`].
    engine_down: bool,
}

/// What the simulation reports while its engine does not answer.
#[derive(Debug, thiserror::Error)]
#[error("the engine does not answer (simulated)")]
pub struct SimEngineDown;

/// The simulated runtime. Cheap to share: clones see the same node.
#[derive(Debug, Clone)]
pub struct SimRuntime {
    config: Arc<SimConfig>,
    state: Arc<Mutex<State>>,
}

impl SimRuntime {
    pub fn new(config: SimConfig) -> Self {
        let next_port = u32::from(config.first_host_port);
        Self {
            config: Arc::new(config),
            state: Arc::new(Mutex::new(State {
                instances: BTreeMap::new(),
                next_port,
                engine_down: false,
            })),
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; if one ever did, the
        // map is still consistent (every update is one insert or remove).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every instance the node has, for tests to inspect.
    pub fn instances(&self) -> Vec<SimInstance> {
        let now = Instant::now();
        let state = self.lock();
        state
            .instances
            .iter()
            .map(|(instance, entry)| {
                let current = entry.state(now, self.config.start_delay);
                SimInstance {
                    instance: instance.clone(),
                    revision: entry.revision,
                    image: entry.image.clone(),
                    state: current.state,
                    ready: current.ready,
                    starts: entry.starts,
                }
            })
            .collect()
    }

    /// Makes the engine answer again (`true`) or stop answering: then
    /// `ping` and `list` fail, and what runs keeps running.
    pub fn set_engine_answering(&self, answering: bool) {
        self.lock().engine_down = !answering;
    }

    /// How many instances are running now.
    pub fn running(&self) -> usize {
        self.instances()
            .iter()
            .filter(|i| i.state == InstanceState::Running)
            .count()
    }

    fn crash_rule(&self, image: &str) -> Option<(Duration, i32)> {
        self.config
            .crashes
            .iter()
            .find(|rule| image.contains(&rule.image_contains))
            .map(|rule| (rule.after, rule.exit_code))
    }
}

#[async_trait]
impl Runtime for SimRuntime {
    async fn start(&self, spec: &InstanceSpec) -> Result<(), RuntimeError> {
        let image = &spec.manifest.image;
        if image.contains(&self.config.unpullable_marker) {
            return Err(RuntimeError::Pull {
                image: image.clone(),
                source: Box::new(SimPullError),
            });
        }
        let now = Instant::now();
        let start_delay = self.config.start_delay;
        let crash = self.crash_rule(image);
        let version = spec.container_version();
        let mut state = self.lock();
        if let Some(entry) = state.instances.get_mut(&spec.instance) {
            let current = entry.state(now, start_delay).state;
            let stopped = matches!(current, InstanceState::Exited | InstanceState::Failed);
            if entry.version == version && !stopped {
                return Ok(());
            }
            if entry.version == version {
                // `docker start` on an exited container: same ports.
                entry.started_at = now;
                entry.starts += 1;
                return Ok(());
            }
            // Another container version under the same name: replaced
            // below.
            state.instances.remove(&spec.instance);
        }
        let mut ports = BTreeMap::new();
        for port in &spec.manifest.ports {
            let host_port = state.next_port;
            state.next_port += 1;
            ports.insert(
                port.name.clone(),
                format!("{}:{host_port}", self.config.address),
            );
        }
        state.instances.insert(
            spec.instance.clone(),
            Entry {
                revision: spec.revision,
                version,
                image: image.clone(),
                started_at: now,
                starts: 1,
                ports,
                never_ready: image.contains(&self.config.never_ready_marker),
                crash,
            },
        );
        tracing::trace!(instance = %display_ref(&spec.instance), "sim: started");
        Ok(())
    }

    async fn stop(&self, instance: &InstanceRef) -> Result<(), RuntimeError> {
        self.lock().instances.remove(instance);
        Ok(())
    }

    async fn ping(&self) -> Result<(), RuntimeError> {
        if self.lock().engine_down {
            return Err(RuntimeError::Engine {
                source: Box::new(SimEngineDown),
            });
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<(InstanceRef, RuntimeState)>, RuntimeError> {
        let now = Instant::now();
        let state = self.lock();
        if state.engine_down {
            return Err(RuntimeError::List {
                source: Box::new(SimEngineDown),
            });
        }
        Ok(state
            .instances
            .iter()
            .map(|(instance, entry)| (instance.clone(), entry.state(now, self.config.start_delay)))
            .collect())
    }

    /// A line per start, and one more when it crashed: what a simulated
    /// app would have printed. `follow` changes nothing (the stream ends).
    async fn logs(
        &self,
        instance: &InstanceRef,
        tail: Option<u32>,
        _follow: bool,
    ) -> Result<LogStream, RuntimeError> {
        let now = Instant::now();
        let lines: Vec<String> = {
            let state = self.lock();
            let Some(entry) = state.instances.get(instance) else {
                return Err(RuntimeError::Logs {
                    instance: display_ref(instance),
                    source: "no such instance on this node".into(),
                });
            };
            let mut lines: Vec<String> = (1..=entry.starts)
                .map(|n| {
                    format!(
                        "sim: {} started ({} of revision {}, start {n})",
                        instance.id, entry.image, entry.revision
                    )
                })
                .collect();
            if let Some(code) = entry.state(now, self.config.start_delay).exit_code {
                lines.push(format!("sim: {} exited with status {code}", instance.id));
            }
            lines
        };
        let skip = tail.map_or(0, |t| lines.len().saturating_sub(t as usize));
        Ok(Box::pin(futures::stream::iter(
            lines.into_iter().skip(skip).map(Ok),
        )))
    }

    async fn changed(&self) {
        let next = {
            let now = Instant::now();
            let state = self.lock();
            state
                .instances
                .values()
                .filter_map(|entry| entry.next_transition(now, self.config.start_delay))
                .min()
        };
        match next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending::<()>().await,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec(id: &str, image: &str) -> InstanceSpec {
        let manifest = keel_manifest::parse_yaml(&format!(
            "name: web\nproject: shop\nimage: {image}\nports:\n  - name: http\n    port: 8080\n"
        ))
        .unwrap();
        InstanceSpec {
            instance: InstanceRef {
                project: "shop".into(),
                app: "web".into(),
                id: id.into(),
            },
            revision: 1,
            manifest,
        }
    }

    fn sim() -> SimRuntime {
        SimRuntime::new(SimConfig::new("10.0.0.7").with_start_delay(Duration::from_millis(200)))
    }

    #[tokio::test(start_paused = true)]
    async fn instances_start_then_run_and_are_ready_after_the_delay() {
        let sim = sim();
        sim.start(&spec("1-a", "nginx:1")).await.unwrap();
        let (_, state) = sim.list().await.unwrap().remove(0);
        assert_eq!((state.state, state.ready), (InstanceState::Starting, false));
        assert_eq!(state.ports["http"], "10.0.0.7:30000");
        sim.changed().await; // exactly the start delay, on the paused clock
        let (_, state) = sim.list().await.unwrap().remove(0);
        assert_eq!((state.state, state.ready), (InstanceState::Running, true));
        // Nothing is ahead any more: changed() waits for ever.
        let waited = tokio::time::timeout(Duration::from_secs(3600), sim.changed()).await;
        assert!(waited.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn start_is_idempotent_and_stop_removes() {
        let sim = sim();
        let web = spec("1-a", "nginx:1");
        sim.start(&web).await.unwrap();
        sim.start(&web).await.unwrap();
        assert_eq!(sim.instances().len(), 1);
        assert_eq!(sim.instances()[0].starts, 1);
        sim.start(&spec("1-b", "nginx:1")).await.unwrap();
        let ports: Vec<String> = sim
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|(_, s)| s.ports["http"].clone())
            .collect();
        assert_eq!(ports, ["10.0.0.7:30000", "10.0.0.7:30001"]);
        sim.stop(&web.instance).await.unwrap();
        sim.stop(&web.instance).await.unwrap();
        assert_eq!(sim.instances().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn injected_failures_fail_pulls_crash_and_never_ready() {
        let sim = sim();
        let error = sim
            .start(&spec("1-a", "registry/unpullable:1"))
            .await
            .unwrap_err();
        assert_eq!(
            crate::runtime::error_chain(&error),
            "cannot pull image registry/unpullable:1: manifest unknown: the registry has no such image (simulated)"
        );
        assert!(sim.instances().is_empty(), "nothing was created");

        sim.start(&spec("1-b", "sim/unready:1")).await.unwrap();
        sim.start(&spec("1-c", "sim/crashing:1")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let states: Vec<_> = sim
            .instances()
            .into_iter()
            .map(|i| (i.state, i.ready))
            .collect();
        assert_eq!(
            states,
            [
                (InstanceState::Running, false),
                (InstanceState::Running, true)
            ]
        );
        sim.changed().await; // the crash, 500 ms after it ran
        let crashed = sim.list().await.unwrap().remove(1).1;
        assert_eq!(
            (crashed.state, crashed.exit_code),
            (InstanceState::Exited, Some(3))
        );
        // Starting an exited instance starts it again, with the same ports.
        sim.start(&spec("1-c", "sim/crashing:1")).await.unwrap();
        let again = sim.list().await.unwrap().remove(1).1;
        assert_eq!(again.state, InstanceState::Starting);
        assert_eq!(again.ports, crashed.ports);
        assert_eq!(sim.instances()[1].starts, 2);
    }
}
