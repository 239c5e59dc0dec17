//! [`DockerRuntime`]: the [`Runtime`] over the Docker Engine API (bollard,
//! the local socket or `DOCKER_HOST`).
//!
//! What an instance becomes:
//! - a container named `keel-{node}-{project}-{app}-{id}`, labelled
//!   `keel.node`, `keel.project`, `keel.app`, `keel.instance`,
//!   `keel.revision`, plus `keel.ports` (port names) and `keel.health`
//!   (the probe) so that a restarted agent knows everything from the
//!   container alone;
//! - the image pulled first when the engine does not have it;
//! - the manifest's command, its env plus `KEEL_INSTANCE`, `KEEL_APP`,
//!   `KEEL_PROJECT`, `KEEL_NODE` and `PORT` (the first port, unless the
//!   manifest sets it), `NanoCpus` from `cpu_millis` and `Memory` from
//!   `memory_mb` (hard limits);
//! - every port published on the node's publish address (by default its
//!   advertise address) on a host port Docker chooses, reported as
//!   `advertise_addr:port`;
//! - attached to the project's network `keel-{project}` (a bridge), with
//!   the app's name as alias: instances of one project reach each other by
//!   app name, and Docker isolates bridges from each other;
//! - no Docker restart policy: the agent restarts, so the controller
//!   always knows.
//!
//! `list` sees only containers labelled with this node's name, so two
//! agents on one engine never touch each other's, and nothing without
//! Keel's labels is ever touched. `changed` follows the engine's event
//! stream (and probe outcomes).
//!
//! Health: each running instance with a health check has a prober task
//! (see [`probe`]). Until its first success it probes every 50 ms (at most
//! the interval), so an instance is ready as soon as it answers; then
//! every interval. Liveness failures count only once the instance has
//! been ready: a slow starter is never killed for being slow; it stays
//! running and not ready, with the last probe failure as its reason.
//! After `unhealthy_threshold` failures in a row the prober stops the
//! container and it is listed `exited` with reason `unhealthy: ...` and no
//! exit code (the status of a process Keel stopped is not the app's), so
//! `on-failure` restarts it too.
//!
//! Stats: a background task samples `docker stats` (one shot, with the
//! engine's previous sample for CPU) of every running instance every
//! `stats_interval`; `list` reports the latest sample.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerSummary, ContainerSummaryStateEnum, EndpointSettings, ExecConfig,
    HostConfig, NetworkCreateRequest, NetworkingConfig, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, ListContainersOptions,
    ListNetworksOptions, LogsOptions, RemoveContainerOptions, StatsOptions, StopContainerOptions,
};
use futures::StreamExt;
use keel_manifest::Probe;
use keel_protocol::logs::LineSplitter;
use keel_protocol::{InstanceRef, InstanceSpec, InstanceState};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::runtime::{LogStream, Runtime, RuntimeError, RuntimeState, display_ref};

const LABEL_NODE: &str = "keel.node";
const LABEL_PROJECT: &str = "keel.project";
const LABEL_APP: &str = "keel.app";
const LABEL_INSTANCE: &str = "keel.instance";
const LABEL_REVISION: &str = "keel.revision";
/// [`InstanceSpec::container_version`] of the spec it was made from.
const LABEL_SPEC: &str = "keel.spec";
const LABEL_PORTS: &str = "keel.ports";
const LABEL_HEALTH: &str = "keel.health";

/// Probes before the first success run at least this often.
const STARTUP_PROBE_PERIOD: Duration = Duration::from_millis(50);

/// How a node's Docker runtime behaves. [`DockerConfig::new`] gives the
/// defaults for everything but the node's name and address.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// The node's name, as registered: the `keel.node` label that scopes
    /// everything this runtime sees.
    pub node: String,
    /// The address other nodes reach this node on: published ports are
    /// reported as `advertise_addr:port`.
    pub advertise_addr: IpAddr,
    /// The host address ports are published on. Default: the advertise
    /// address; `0.0.0.0` when that address is not the machine's own
    /// (behind NAT).
    pub publish_addr: IpAddr,
    /// How long a container may take to stop after SIGTERM before it is
    /// killed. Default 10 s.
    pub stop_timeout: Duration,
    /// How often CPU and memory are sampled. Default 10 s.
    pub stats_interval: Duration,
}

impl DockerConfig {
    pub fn new(node: impl Into<String>, advertise_addr: IpAddr) -> Self {
        Self {
            node: node.into(),
            advertise_addr,
            publish_addr: advertise_addr,
            stop_timeout: Duration::from_secs(10),
            stats_interval: Duration::from_secs(10),
        }
    }
}

/// An exclusive lock on a file every agent on this machine opens, held
/// while a project network is looked up and created. `None` (no lock,
/// only the process-wide one) if the file cannot be opened.
async fn host_network_lock() -> Option<std::fs::File> {
    let path = std::env::temp_dir().join("keel-docker-networks.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ok()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match file.try_lock() {
            Ok(()) => return Some(file),
            Err(std::fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_) => return None,
        }
    }
}

/// The engine refused a container because its network is gone (removed
/// by another agent settling duplicates) or ambiguous (a duplicate not
/// yet removed).
fn network_vanished(error: &DockerError) -> bool {
    match error {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => {
            (*status_code == 404 || *status_code == 400)
                && message.contains("network")
                && (message.contains("not found") || message.contains("ambiguous"))
        }
        _ => false,
    }
}

/// Why the runtime could not reach the engine.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to the Docker Engine (DOCKER_HOST or /var/run/docker.sock)")]
    Connect(#[source] DockerError),
    #[error("the Docker Engine does not answer")]
    Ping(#[source] DockerError),
}

/// The probe of one container, as its `keel.health` label keeps it: ports
/// are container port numbers, resolved from the manifest's names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ProbeKind {
    Http { port: u16, path: String },
    Tcp { port: u16 },
    Exec { command: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProbeSpec {
    kind: ProbeKind,
    interval_ms: u64,
    timeout_ms: u64,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl ProbeSpec {
    fn from_manifest(spec: &InstanceSpec) -> Option<ProbeSpec> {
        let health = spec.manifest.health.as_ref()?;
        let port_number = |name: &str| {
            spec.manifest
                .ports
                .iter()
                .find(|p| p.name == name)
                .map_or(0, |p| p.port)
        };
        let kind = match &health.probe {
            Probe::Http { port, path } => ProbeKind::Http {
                port: port_number(port),
                path: path.clone(),
            },
            Probe::Tcp { port } => ProbeKind::Tcp {
                port: port_number(port),
            },
            Probe::Exec { command } => ProbeKind::Exec {
                command: command.clone(),
            },
        };
        Some(ProbeSpec {
            kind,
            interval_ms: health.interval_ms,
            timeout_ms: health.timeout_ms,
            healthy_threshold: health.healthy_threshold.max(1),
            unhealthy_threshold: health.unhealthy_threshold.max(1),
        })
    }
}

/// What the prober of one container found.
#[derive(Debug, Default, Clone)]
struct Health {
    ready: bool,
    /// The last probe failure (while running).
    failure: Option<String>,
    /// Set when the prober stopped the container for failing liveness.
    unhealthy: Option<String>,
}

#[derive(Debug)]
struct Prober {
    health: Arc<Mutex<Health>>,
    task: Option<JoinHandle<()>>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    cpu_millis: u64,
    memory_bytes: u64,
}

#[derive(Debug)]
struct Inner {
    docker: Docker,
    config: DockerConfig,
    /// Instances being pulled or created: no container to list yet (or
    /// one not yet started).
    /// Instances being pulled or created: revision, container version,
    /// state.
    pending: Mutex<BTreeMap<InstanceRef, (u64, String, InstanceState)>>,
    /// By container name.
    probers: Mutex<HashMap<String, Prober>>,
    /// By container name.
    samples: Mutex<HashMap<String, Sample>>,
    changed: Notify,
    /// A plain client for HTTP probes: no pooled connections to instances,
    /// no redirects followed (a 3xx passes).
    http: reqwest::Client,
    background: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in lock(&self.background).drain(..) {
            task.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code path panics while holding these locks; a map is consistent
    // after every single insert or remove.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The Docker runtime of one node. Cheap to clone: clones share the
/// engine connection, probers and samples. Dropping the last clone stops
/// its background tasks (events, stats, probes); containers keep running.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    inner: Arc<Inner>,
}

fn is_not_found(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn status_is(error: &DockerError, status: u16) -> bool {
    matches!(error, DockerError::DockerResponseServerError { status_code, .. } if *status_code == status)
}

/// `image` split for the pull API: a reference without a tag or digest
/// means `latest` (without it the engine pulls every tag).
fn pull_reference(image: &str) -> (String, String) {
    if image.contains('@') {
        return (image.to_owned(), String::new());
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rsplit_once(':') {
        Some((_, tag)) => {
            let name = &image[..image.len() - tag.len() - 1];
            (name.to_owned(), tag.to_owned())
        }
        None => (image.to_owned(), "latest".to_owned()),
    }
}

/// `Exited (3) 2 seconds ago` → 3.
fn exit_code_from_status(status: &str) -> Option<i32> {
    let rest = status.strip_prefix("Exited (")?;
    rest.split(')').next()?.parse().ok()
}

impl DockerRuntime {
    /// Connects to the local engine (`DOCKER_HOST`, or the socket at
    /// `/var/run/docker.sock`), settles on an API version both sides
    /// speak, and starts following its events. Call it inside a Tokio
    /// runtime: the runtime's background tasks live there.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// use keel_agent::docker::{DockerConfig, DockerRuntime};
    /// let runtime = DockerRuntime::connect(DockerConfig::new("node-1", "10.0.0.5".parse()?)).await?;
    /// // Agent::new(agent_config, std::sync::Arc::new(runtime)).spawn()?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(config: DockerConfig) -> Result<DockerRuntime, ConnectError> {
        let docker = Docker::connect_with_local_defaults().map_err(ConnectError::Connect)?;
        Self::with_client(docker, config).await
    }

    /// As [`DockerRuntime::connect`], with a client of the caller's.
    pub async fn with_client(
        docker: Docker,
        config: DockerConfig,
    ) -> Result<DockerRuntime, ConnectError> {
        let docker = docker
            .negotiate_version()
            .await
            .map_err(ConnectError::Ping)?;
        docker.ping().await.map_err(ConnectError::Ping)?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .build()
            .unwrap_or_default();
        let inner = Arc::new(Inner {
            docker,
            config,
            pending: Mutex::default(),
            probers: Mutex::default(),
            samples: Mutex::default(),
            changed: Notify::new(),
            http,
            background: Mutex::default(),
        });
        let events = tokio::spawn(follow_events(Arc::downgrade(&inner)));
        let stats = tokio::spawn(sample_stats(Arc::downgrade(&inner)));
        lock(&inner.background).extend([events, stats]);
        Ok(DockerRuntime { inner })
    }

    pub fn config(&self) -> &DockerConfig {
        &self.inner.config
    }

    /// The engine client, for tests and tools.
    pub fn client(&self) -> &Docker {
        &self.inner.docker
    }

    /// The container name of an instance on this node.
    pub fn container_name(&self, instance: &InstanceRef) -> String {
        container_name(&self.inner.config.node, instance)
    }

    /// The project's network.
    pub fn network_name(project: &str) -> String {
        format!("keel-{project}")
    }
}

/// Project networks are created and removed one at a time in this process
/// (agents sharing an engine in one process, as tests run them, included).
fn static_network_lock() -> &'static tokio::sync::Mutex<()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    &LOCK
}

fn container_name(node: &str, instance: &InstanceRef) -> String {
    format!(
        "keel-{node}-{}-{}-{}",
        instance.project, instance.app, instance.id
    )
}

impl Inner {
    fn set_pending(&self, spec: &InstanceSpec, state: Option<InstanceState>) {
        {
            let mut pending = lock(&self.pending);
            match state {
                Some(state) => pending.insert(
                    spec.instance.clone(),
                    (spec.revision, spec.container_version(), state),
                ),
                None => pending.remove(&spec.instance),
            };
        }
        self.changed.notify_one();
    }

    fn start_error(&self, instance: &InstanceRef, source: DockerError) -> RuntimeError {
        RuntimeError::Start {
            instance: display_ref(instance),
            source: source.into(),
        }
    }

    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(error) if is_not_found(&error) => {}
            Err(error) => {
                return Err(RuntimeError::Pull {
                    image: image.to_owned(),
                    source: error.into(),
                });
            }
        }
        let (from_image, tag) = pull_reference(image);
        let options = CreateImageOptions {
            from_image: Some(from_image),
            tag: Some(tag).filter(|t| !t.is_empty()),
            ..Default::default()
        };
        let mut progress = self.docker.create_image(Some(options), None, None);
        while let Some(step) = progress.next().await {
            if let Err(error) = step {
                return Err(RuntimeError::Pull {
                    image: image.to_owned(),
                    source: error.into(),
                });
            }
        }
        Ok(())
    }

    /// The project's network, made when missing; returns its id.
    ///
    /// Docker does not keep network names unique: agents (or starts) that
    /// create one at once can make several. Every agent settles on the
    /// same one (the lowest id), removes the others it can, and refers to
    /// the network by id from then on.
    async fn ensure_network(&self, instance: &InstanceRef) -> Result<String, RuntimeError> {
        let name = DockerRuntime::network_name(&instance.project);
        // One creation at a time in this process (agents sharing an engine
        // in one process, as tests run them, included); agents in other
        // processes are handled by settling on the lowest id.
        let _creating = static_network_lock().lock().await;
        // And one at a time on this machine: Docker lets two creates of one
        // name both succeed, and a container's start looks its network up
        // by name, so a duplicate that another agent's container holds
        // makes every later start fail as "ambiguous".
        let _host = host_network_lock().await;
        if let Some(id) = self.canonical_network(instance, &name).await? {
            return Ok(id);
        }
        let request = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".to_owned()),
            labels: Some(HashMap::from([(
                LABEL_PROJECT.to_owned(),
                instance.project.clone(),
            )])),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => {}
            Err(error) if status_is(&error, 409) => {}
            Err(error) => return Err(self.start_error(instance, error)),
        }
        self.canonical_network(instance, &name)
            .await?
            .ok_or_else(|| {
                self.start_error(
                    instance,
                    DockerError::DockerResponseServerError {
                        status_code: 404,
                        message: format!("network {name} vanished after it was created"),
                    },
                )
            })
    }

    async fn canonical_network(
        &self,
        instance: &InstanceRef,
        name: &str,
    ) -> Result<Option<String>, RuntimeError> {
        let options = ListNetworksOptions {
            filters: Some(HashMap::from([("name".to_owned(), vec![name.to_owned()])])),
        };
        let networks = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(|e| self.start_error(instance, e))?;
        // The name filter matches substrings.
        let mut ids: Vec<String> = networks
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name))
            .filter_map(|n| n.id)
            .collect();
        ids.sort();
        for duplicate in ids.iter().skip(1) {
            // In use by another agent's container, it stays; harmless.
            let _ = self.docker.remove_network(duplicate).await;
        }
        Ok(ids.into_iter().next())
    }

    fn create_body(&self, spec: &InstanceSpec, network: &str) -> ContainerCreateBody {
        let manifest = &spec.manifest;
        let instance = &spec.instance;
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        if let Some(first) = manifest.ports.first() {
            env.insert("PORT".to_owned(), first.port.to_string());
        }
        env.extend(manifest.env.clone());
        env.insert("KEEL_INSTANCE".to_owned(), instance.id.clone());
        env.insert("KEEL_APP".to_owned(), instance.app.clone());
        env.insert("KEEL_PROJECT".to_owned(), instance.project.clone());
        env.insert("KEEL_NODE".to_owned(), self.config.node.clone());
        let ports: BTreeMap<String, String> = manifest
            .ports
            .iter()
            .map(|p| (p.name.clone(), format!("{}/tcp", p.port)))
            .collect();
        let mut labels = HashMap::from([
            (LABEL_NODE.to_owned(), self.config.node.clone()),
            (LABEL_PROJECT.to_owned(), instance.project.clone()),
            (LABEL_APP.to_owned(), instance.app.clone()),
            (LABEL_INSTANCE.to_owned(), instance.id.clone()),
            (LABEL_REVISION.to_owned(), spec.revision.to_string()),
            (LABEL_SPEC.to_owned(), spec.container_version()),
            (
                LABEL_PORTS.to_owned(),
                serde_json::to_string(&ports).unwrap_or_default(),
            ),
        ]);
        if let Some(probe) = ProbeSpec::from_manifest(spec) {
            labels.insert(
                LABEL_HEALTH.to_owned(),
                serde_json::to_string(&probe).unwrap_or_default(),
            );
        }
        let bindings = ports
            .values()
            .map(|port| {
                let binding = PortBinding {
                    host_ip: Some(self.config.publish_addr.to_string()),
                    // Empty: the engine picks a free port.
                    host_port: Some(String::new()),
                };
                (port.clone(), Some(vec![binding]))
            })
            .collect();
        let memory_bytes = manifest.resources.memory_mb.saturating_mul(1 << 20);
        let nano_cpus = manifest.resources.cpu_millis.saturating_mul(1_000_000);
        ContainerCreateBody {
            image: Some(manifest.image.clone()),
            cmd: manifest.command.clone(),
            env: Some(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            exposed_ports: Some(ports.values().cloned().collect()),
            host_config: Some(HostConfig {
                memory: Some(i64::try_from(memory_bytes).unwrap_or(i64::MAX)),
                nano_cpus: Some(i64::try_from(nano_cpus).unwrap_or(i64::MAX)),
                port_bindings: Some(bindings),
                network_mode: Some(network.to_owned()),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    network.to_owned(),
                    EndpointSettings {
                        aliases: Some(vec![instance.app.clone()]),
                        ..Default::default()
                    },
                )])),
            }),
            ..Default::default()
        }
    }

    async fn start(self: &Arc<Self>, spec: &InstanceSpec) -> Result<(), RuntimeError> {
        let instance = &spec.instance;
        let name = container_name(&self.config.node, instance);
        match self.docker.inspect_container(&name, None).await {
            Ok(existing) => {
                let labels = existing
                    .config
                    .as_ref()
                    .and_then(|c| c.labels.clone())
                    .unwrap_or_default();
                // A new revision that changes nothing the container sees
                // (a scale) keeps it.
                let same_revision = labels.get(LABEL_SPEC) == Some(&spec.container_version());
                let running = existing
                    .state
                    .as_ref()
                    .and_then(|s| s.running)
                    .unwrap_or(false);
                if same_revision && running {
                    return Ok(());
                }
                if same_revision {
                    // Exited: the same container again (its log goes on).
                    lock(&self.probers).remove(&name);
                    self.set_pending(spec, Some(InstanceState::Starting));
                    let started = self.docker.start_container(&name, None).await;
                    self.set_pending(spec, None);
                    if let Err(error) = started {
                        // Whatever it was (its network removed, say), the
                        // next attempt creates it afresh.
                        let options = RemoveContainerOptions {
                            force: true,
                            ..Default::default()
                        };
                        let _ = self.docker.remove_container(&name, Some(options)).await;
                        return Err(self.start_error(instance, error));
                    }
                    self.spawn_prober(&name, &labels);
                    return Ok(());
                }
                // Another container version under this name: replaced.
                self.remove(instance).await?;
            }
            Err(error) if is_not_found(&error) => {}
            Err(error) => return Err(self.start_error(instance, error)),
        }
        self.set_pending(spec, Some(InstanceState::Pulling));
        let created = self.create_and_start(spec, &name).await;
        self.set_pending(spec, None);
        created
    }

    async fn create_and_start(
        self: &Arc<Self>,
        spec: &InstanceSpec,
        name: &str,
    ) -> Result<(), RuntimeError> {
        let instance = &spec.instance;
        self.ensure_image(&spec.manifest.image).await?;
        self.set_pending(spec, Some(InstanceState::Starting));
        // Agents of one engine that create a project's network at once
        // settle on one of the duplicates and remove the others, so the
        // network found a moment ago can vanish: find it again then.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let network = self.ensure_network(instance).await?;
            match self.create_on(spec, name, &network).await {
                Err(error) if attempts < 3 && network_vanished(&error) => {
                    tracing::debug!(instance = %display_ref(instance), %network, "project network vanished; finding it again");
                }
                Err(error) => return Err(self.start_error(instance, error)),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Creates and starts the container on `network`.
    async fn create_on(
        self: &Arc<Self>,
        spec: &InstanceSpec,
        name: &str,
        network: &str,
    ) -> Result<(), DockerError> {
        let body = self.create_body(spec, network);
        let labels = body.labels.clone().unwrap_or_default();
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        self.docker.create_container(Some(options), body).await?;
        lock(&self.probers).remove(name);
        if let Err(error) = self.docker.start_container(name, None).await {
            // Not left behind as "created": the next attempt starts
            // afresh, and the agent reports this error as the reason.
            let options = RemoveContainerOptions {
                force: true,
                ..Default::default()
            };
            let _ = self.docker.remove_container(name, Some(options)).await;
            return Err(error);
        }
        self.spawn_prober(name, &labels);
        Ok(())
    }

    /// Stops (SIGTERM, then SIGKILL after the stop timeout) and removes
    /// every container of the instance on this node, found by its labels
    /// (a container made by hand, or by another Keel version, may have
    /// another name).
    async fn remove(&self, instance: &InstanceRef) -> Result<(), RuntimeError> {
        let stop_error = |source: DockerError| RuntimeError::Stop {
            instance: display_ref(instance),
            source: source.into(),
        };
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_NODE}={}", self.config.node),
                format!("{LABEL_PROJECT}={}", instance.project),
                format!("{LABEL_APP}={}", instance.app),
                format!("{LABEL_INSTANCE}={}", instance.id),
            ],
        )]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(stop_error)?;
        let name = container_name(&self.config.node, instance);
        lock(&self.probers).remove(&name);
        lock(&self.samples).remove(&name);
        let timeout = i32::try_from(self.config.stop_timeout.as_secs()).unwrap_or(i32::MAX);
        for id in containers.into_iter().filter_map(|c| c.id) {
            let options = StopContainerOptions {
                t: Some(timeout),
                ..Default::default()
            };
            match self.docker.stop_container(&id, Some(options)).await {
                Ok(()) => {}
                Err(error) if is_not_found(&error) => continue,
                // 304: already stopped.
                Err(error) if status_is(&error, 304) => {}
                Err(error) => return Err(stop_error(error)),
            }
            let options = RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            };
            match self.docker.remove_container(&id, Some(options)).await {
                Ok(()) => {}
                Err(error) if is_not_found(&error) => {}
                // 409: a removal already in progress.
                Err(error) if status_is(&error, 409) => {}
                Err(error) => return Err(stop_error(error)),
            }
        }
        self.collect_network(&instance.project).await;
        Ok(())
    }

    /// Removes the project's network once no Keel container of the project
    /// is left on the engine (of any node sharing it): Docker's default
    /// address pools hold about 30 bridge networks, so networks of
    /// projects gone from a node must not pile up. Best effort: a start
    /// racing with this fails once and is retried, and creates it again.
    async fn collect_network(&self, project: &str) {
        let _removing = static_network_lock().lock().await;
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_owned(),
                vec![format!("{LABEL_PROJECT}={project}")],
            )])),
            ..Default::default()
        };
        match self.docker.list_containers(Some(options)).await {
            Ok(left) if left.is_empty() => {}
            _ => return,
        }
        let name = DockerRuntime::network_name(project);
        let options = ListNetworksOptions {
            filters: Some(HashMap::from([("name".to_owned(), vec![name.clone()])])),
        };
        for network in self
            .docker
            .list_networks(Some(options))
            .await
            .unwrap_or_default()
        {
            if network.name.as_deref() == Some(name.as_str())
                && let Some(id) = network.id
                && let Err(error) = self.docker.remove_network(&id).await
            {
                tracing::debug!(network = %name, error = %error, "project network not removed");
            }
        }
    }

    /// Starts probing a running container, if it has a health check and no
    /// prober yet.
    fn spawn_prober(self: &Arc<Self>, name: &str, labels: &HashMap<String, String>) {
        let Some(spec) = labels
            .get(LABEL_HEALTH)
            .and_then(|json| serde_json::from_str::<ProbeSpec>(json).ok())
        else {
            return;
        };
        let mut probers = lock(&self.probers);
        if let Some(prober) = probers.get(name) {
            let probing = prober.task.as_ref().is_some_and(|t| !t.is_finished());
            // One that stopped its container for failing liveness stays,
            // with its reason, until the next start replaces it.
            if probing || lock(&prober.health).unhealthy.is_some() {
                return;
            }
        }
        let health = Arc::new(Mutex::new(Health::default()));
        let task = tokio::spawn(probe::run(
            Arc::downgrade(self),
            name.to_owned(),
            spec,
            health.clone(),
        ));
        probers.insert(
            name.to_owned(),
            Prober {
                health,
                task: Some(task),
            },
        );
    }

    fn health(&self, name: &str) -> Option<Health> {
        lock(&self.probers)
            .get(name)
            .map(|p| lock(&p.health).clone())
    }

    fn instance_of(labels: &HashMap<String, String>) -> Option<(InstanceRef, u64)> {
        Some((
            InstanceRef {
                project: labels.get(LABEL_PROJECT)?.clone(),
                app: labels.get(LABEL_APP)?.clone(),
                id: labels.get(LABEL_INSTANCE)?.clone(),
            },
            labels.get(LABEL_REVISION)?.parse().ok()?,
        ))
    }

    async fn node_containers(
        &self,
        running_only: bool,
    ) -> Result<Vec<ContainerSummary>, DockerError> {
        let mut filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_NODE}={}", self.config.node)],
        )]);
        if running_only {
            filters.insert("status".to_owned(), vec!["running".to_owned()]);
        }
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        self.docker.list_containers(Some(options)).await
    }

    fn state_of(
        self: &Arc<Self>,
        container: &ContainerSummary,
    ) -> Option<(InstanceRef, RuntimeState)> {
        let labels = container.labels.clone().unwrap_or_default();
        let (instance, revision) = Self::instance_of(&labels)?;
        let name = container_name(&self.config.node, &instance);
        let port_names: BTreeMap<String, String> = labels
            .get(LABEL_PORTS)
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_default();
        let mut ports = BTreeMap::new();
        for published in container.ports.iter().flatten() {
            let Some(host_port) = published.public_port else {
                continue;
            };
            let key = format!("{}/tcp", published.private_port);
            if let Some((port_name, _)) = port_names.iter().find(|(_, p)| **p == key) {
                ports.insert(
                    port_name.clone(),
                    SocketAddr::new(self.config.advertise_addr, host_port).to_string(),
                );
            }
        }
        let docker_state = container.state.unwrap_or(ContainerSummaryStateEnum::EMPTY);
        let running = matches!(
            docker_state,
            ContainerSummaryStateEnum::RUNNING
                | ContainerSummaryStateEnum::PAUSED
                | ContainerSummaryStateEnum::RESTARTING
        );
        let mut state = RuntimeState {
            revision,
            spec_version: labels.get(LABEL_SPEC).cloned().unwrap_or_default(),
            state: InstanceState::Running,
            ready: false,
            exit_code: None,
            reason: None,
            ports,
            cpu_millis: None,
            memory_bytes: None,
        };
        if running {
            let has_probe = labels.contains_key(LABEL_HEALTH);
            if has_probe {
                // Adopted (the agent restarted), or started by someone
                // else: probe it from now on. A no-op while it is probed.
                self.spawn_prober(&name, &labels);
            }
            match (has_probe, self.health(&name)) {
                (false, _) => state.ready = true,
                (true, Some(health)) => {
                    state.ready = health.ready;
                    if !health.ready {
                        state.reason = health.failure.map(|f| format!("not ready: {f}"));
                    }
                }
                (true, None) => {}
            }
            if let Some(sample) = lock(&self.samples).get(&name) {
                state.cpu_millis = Some(sample.cpu_millis);
                state.memory_bytes = Some(sample.memory_bytes);
            }
        } else {
            // Its prober (if any) has nothing left to probe.
            if let Some(prober) = lock(&self.probers).get_mut(&name)
                && let Some(task) = prober.task.take()
            {
                task.abort();
            }
            let status = container.status.clone().unwrap_or_default();
            match (docker_state, self.health(&name).and_then(|h| h.unhealthy)) {
                (_, Some(unhealthy)) => {
                    state.state = InstanceState::Exited;
                    state.reason = Some(format!("unhealthy: {unhealthy}"));
                }
                (ContainerSummaryStateEnum::CREATED, None) => {
                    // Created and never started (an agent that died
                    // between the two): a failed start.
                    state.state = InstanceState::Failed;
                    state.reason = Some("created but never started".to_owned());
                }
                (ContainerSummaryStateEnum::DEAD, None) => {
                    state.state = InstanceState::Failed;
                    state.reason = Some(format!("the engine reports it dead: {status}"));
                }
                (_, None) => {
                    state.state = InstanceState::Exited;
                    state.exit_code = exit_code_from_status(&status);
                    state.reason = Some(match state.exit_code {
                        Some(code) => format!("exited with status {code}"),
                        None => format!("exited ({status})"),
                    });
                }
            }
        }
        Some((instance, state))
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    async fn start(&self, spec: &InstanceSpec) -> Result<(), RuntimeError> {
        self.inner.start(spec).await
    }

    async fn stop(&self, instance: &InstanceRef) -> Result<(), RuntimeError> {
        self.inner.remove(instance).await
    }

    async fn list(&self) -> Result<Vec<(InstanceRef, RuntimeState)>, RuntimeError> {
        let containers = self
            .inner
            .node_containers(false)
            .await
            .map_err(|e| RuntimeError::List { source: e.into() })?;
        let mut listed: BTreeMap<InstanceRef, RuntimeState> = containers
            .iter()
            .filter_map(|c| self.inner.state_of(c))
            .collect();
        for (instance, (revision, version, state)) in lock(&self.inner.pending).iter() {
            // Being pulled or created: the container, if any, is not
            // started yet.
            listed.insert(
                instance.clone(),
                RuntimeState {
                    revision: *revision,
                    spec_version: version.clone(),
                    state: *state,
                    ready: false,
                    exit_code: None,
                    reason: None,
                    ports: BTreeMap::new(),
                    cpu_millis: None,
                    memory_bytes: None,
                },
            );
        }
        Ok(listed.into_iter().collect())
    }

    async fn changed(&self) {
        self.inner.changed.notified().await;
    }

    async fn ping(&self) -> Result<(), RuntimeError> {
        self.inner
            .docker
            .ping()
            .await
            .map(|_| ())
            .map_err(|error| RuntimeError::Engine {
                source: error.into(),
            })
    }

    async fn logs(
        &self,
        instance: &InstanceRef,
        tail: Option<u32>,
        follow: bool,
    ) -> Result<LogStream, RuntimeError> {
        let name = self.container_name(instance);
        let docker = &self.inner.docker;
        if let Err(error) = docker.inspect_container(&name, None).await {
            return Err(RuntimeError::Logs {
                instance: display_ref(instance),
                source: error.into(),
            });
        }
        let options = LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            tail: tail.map_or_else(|| "all".to_owned(), |t| t.to_string()),
            ..Default::default()
        };
        let who = display_ref(instance);
        // Frames are not lines: a line may span frames, a frame hold many.
        let mut splitter = LineSplitter::default();
        let chunks = docker
            .logs(&name, Some(options))
            .map(Some)
            .chain(futures::stream::once(async { None }));
        let lines = chunks.flat_map(move |chunk| {
            let lines: Vec<Result<String, RuntimeError>> = match chunk {
                Some(Ok(output)) => splitter
                    .push(&output.into_bytes())
                    .into_iter()
                    .map(Ok)
                    .collect(),
                Some(Err(error)) => vec![Err(RuntimeError::Logs {
                    instance: who.clone(),
                    source: error.into(),
                })],
                None => splitter.finish().into_iter().map(Ok).collect(),
            };
            futures::stream::iter(lines)
        });
        Ok(Box::pin(lines))
    }
}

/// Follows the engine's events for this node's containers: every one may
/// change what `list` shows. Reconnects after a second when the stream
/// breaks (and says "changed", since events may have been missed).
async fn follow_events(inner: Weak<Inner>) {
    loop {
        let (docker, node) = match inner.upgrade() {
            Some(inner) => (inner.docker.clone(), inner.config.node.clone()),
            None => return,
        };
        let options = EventsOptions {
            filters: Some(HashMap::from([
                ("type".to_owned(), vec!["container".to_owned()]),
                ("label".to_owned(), vec![format!("{LABEL_NODE}={node}")]),
            ])),
            ..Default::default()
        };
        let mut events = docker.events(Some(options));
        if let Some(inner) = inner.upgrade() {
            inner.changed.notify_one();
        }
        while let Some(event) = events.next().await {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            match event {
                Ok(event) => {
                    let action = event.action.unwrap_or_default();
                    let name = event
                        .actor
                        .and_then(|a| a.attributes)
                        .and_then(|mut a| a.remove("name"));
                    if matches!(action.as_str(), "die" | "destroy" | "stop" | "kill" | "oom")
                        && let Some(name) = name
                    {
                        // A prober must not find an exited container
                        // "unhealthy".
                        if let Some(prober) = lock(&inner.probers).get_mut(&name)
                            && let Some(task) = prober.task.take()
                        {
                            task.abort();
                        }
                        lock(&inner.samples).remove(&name);
                    }
                    inner.changed.notify_one();
                }
                Err(error) => {
                    tracing::warn!(node = %node, error = %error, "the Docker event stream broke; reconnecting");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Samples CPU and memory of this node's running containers.
async fn sample_stats(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let interval = strong.config.stats_interval;
        let containers = strong.node_containers(true).await.unwrap_or_default();
        let docker = strong.docker.clone();
        drop(strong);
        let names: Vec<String> = containers
            .iter()
            .filter_map(|c| {
                c.names
                    .as_ref()?
                    .first()
                    .map(|n| n.trim_start_matches('/').to_owned())
            })
            .collect();
        let samples = futures::future::join_all(names.into_iter().map(|name| {
            let docker = docker.clone();
            async move {
                let options = StatsOptions {
                    stream: false,
                    one_shot: false,
                };
                let sample = docker.stats(&name, Some(options)).next().await;
                (
                    name,
                    sample.and_then(Result::ok).and_then(|s| stats_sample(&s)),
                )
            }
        }))
        .await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let fresh: HashMap<String, Sample> = samples
            .into_iter()
            .filter_map(|(n, s)| Some((n, s?)))
            .collect();
        let changed = {
            let mut kept = lock(&strong.samples);
            let changed = *kept != fresh;
            *kept = fresh;
            changed
        };
        if changed {
            // New figures go out with the next report, not a resync later.
            strong.changed.notify_one();
        }
        drop(strong);
        tokio::time::sleep(interval).await;
    }
}

fn stats_sample(stats: &bollard::models::ContainerStatsResponse) -> Option<Sample> {
    let cpu = stats.cpu_stats.as_ref()?;
    let pre = stats.precpu_stats.as_ref();
    let total = |c: &bollard::models::ContainerCpuStats| {
        c.cpu_usage
            .as_ref()
            .and_then(|u| u.total_usage)
            .unwrap_or(0)
    };
    let cpu_delta = total(cpu).saturating_sub(pre.map_or(0, total));
    let system_delta = cpu
        .system_cpu_usage
        .unwrap_or(0)
        .saturating_sub(pre.and_then(|p| p.system_cpu_usage).unwrap_or(0));
    let cpus = u64::from(cpu.online_cpus.unwrap_or(1).max(1));
    let cpu_millis = if system_delta == 0 {
        0
    } else {
        (u128::from(cpu_delta) * u128::from(cpus) * 1000 / u128::from(system_delta)) as u64
    };
    let memory = stats.memory_stats.as_ref()?;
    let cache = memory
        .stats
        .as_ref()
        .and_then(|s| s.get("inactive_file").or_else(|| s.get("cache")).copied())
        .unwrap_or(0);
    Some(Sample {
        cpu_millis,
        memory_bytes: memory.usage.unwrap_or(0).saturating_sub(cache),
    })
}

/// The health prober of one container.
mod probe {
    use super::*;

    /// Probes until aborted (the container stopped or was removed) or
    /// until it stops the container for failing liveness.
    pub(super) async fn run(
        inner: Weak<Inner>,
        name: String,
        spec: ProbeSpec,
        health: Arc<Mutex<Health>>,
    ) {
        let interval = Duration::from_millis(spec.interval_ms);
        let timeout = Duration::from_millis(spec.timeout_ms);
        let startup_period = STARTUP_PROBE_PERIOD.min(interval);
        let mut successes = 0u32;
        let mut failures = 0u32;
        let mut been_ready = false;
        let mut target: Option<Target> = None;
        loop {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            if target.is_none() {
                target = Target::of(&strong, &name).await;
            }
            let outcome = match &target {
                Some(target) => {
                    match tokio::time::timeout(timeout, attempt(&strong, &name, &spec.kind, target))
                        .await
                    {
                        Ok(outcome) => outcome,
                        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
                    }
                }
                None => Err("the container has no address yet".to_owned()),
            };
            // Decided under the lock, acted on after it (no guard may be
            // held across an await).
            let (changed, unhealthy) = {
                let mut h = lock(&health);
                match outcome {
                    Ok(()) => {
                        failures = 0;
                        successes = successes.saturating_add(1);
                        let mut changed = h.failure.take().is_some();
                        if !h.ready && successes >= spec.healthy_threshold {
                            h.ready = true;
                            been_ready = true;
                            changed = true;
                        }
                        (changed, None)
                    }
                    Err(why) => {
                        successes = 0;
                        failures = failures.saturating_add(1);
                        let mut changed = false;
                        if h.failure.as_deref() != Some(&why) {
                            changed = !h.ready;
                            h.failure = Some(why.clone());
                        }
                        if been_ready && failures >= spec.unhealthy_threshold {
                            h.ready = false;
                            let reason =
                                format!("{failures} failed probes in a row, the last: {why}");
                            h.unhealthy = Some(reason.clone());
                            (true, Some(reason))
                        } else {
                            (changed, None)
                        }
                    }
                }
            };
            if let Some(reason) = unhealthy {
                tracing::info!(container = %name, reason = %reason, "liveness failed; stopping the container");
                stop_unhealthy(&strong, &name).await;
                strong.changed.notify_one();
                return;
            }
            if changed {
                strong.changed.notify_one();
            }
            drop(strong);
            tokio::time::sleep(if been_ready { interval } else { startup_period }).await;
        }
    }

    async fn stop_unhealthy(inner: &Inner, name: &str) {
        let timeout = i32::try_from(inner.config.stop_timeout.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptions {
            t: Some(timeout),
            ..Default::default()
        };
        if let Err(error) = inner.docker.stop_container(name, Some(options)).await
            && !is_not_found(&error)
            && !status_is(&error, 304)
        {
            tracing::warn!(container = %name, error = %error, "cannot stop an unhealthy container");
        }
    }

    /// Where HTTP and TCP probes go.
    #[derive(Debug)]
    struct Target {
        /// Container port (`8080/tcp`) to the address it is published on.
        published: HashMap<String, SocketAddr>,
        /// Its address on the project network.
        container_ip: Option<IpAddr>,
    }

    impl Target {
        async fn of(inner: &Inner, name: &str) -> Option<Target> {
            let inspected = inner.docker.inspect_container(name, None).await.ok()?;
            let settings = inspected.network_settings?;
            let host = if inner.config.publish_addr.is_unspecified() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                inner.config.publish_addr
            };
            let published = settings
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(port, bindings)| {
                    let host_port = bindings?.first()?.host_port.as_ref()?.parse().ok()?;
                    Some((port, SocketAddr::new(host, host_port)))
                })
                .collect();
            let container_ip = settings
                .networks
                .unwrap_or_default()
                .values()
                .find_map(|n| n.ip_address.as_ref()?.parse().ok());
            Some(Target {
                published,
                container_ip,
            })
        }
    }

    async fn attempt(
        inner: &Inner,
        name: &str,
        kind: &ProbeKind,
        target: &Target,
    ) -> Result<(), String> {
        match kind {
            ProbeKind::Http { port, path } => {
                // Through the published address, as a router would reach it.
                let addr = target
                    .published
                    .get(&format!("{port}/tcp"))
                    .ok_or_else(|| format!("port {port} is not published"))?;
                let response = inner
                    .http
                    .get(format!("http://{addr}{path}"))
                    .send()
                    .await
                    .map_err(|e| format!("GET {path}: {}", crate::runtime::error_chain(&e)))?;
                let status = response.status();
                if status.is_success() || status.is_redirection() {
                    Ok(())
                } else {
                    Err(format!("GET {path} answered {status}"))
                }
            }
            ProbeKind::Tcp { port } => {
                // To the container itself: Docker's proxy behind a
                // published port accepts connections whether or not the
                // app listens, so a connect there proves nothing.
                let addr = match target.container_ip {
                    Some(ip) => SocketAddr::new(ip, *port),
                    None => *target
                        .published
                        .get(&format!("{port}/tcp"))
                        .ok_or_else(|| format!("port {port} is not reachable"))?,
                };
                tokio::net::TcpStream::connect(addr)
                    .await
                    .map(drop)
                    .map_err(|e| format!("connect to port {port}: {e}"))
            }
            ProbeKind::Exec { command } => {
                let exec = inner
                    .docker
                    .create_exec(
                        name,
                        ExecConfig {
                            attach_stdout: Some(true),
                            attach_stderr: Some(true),
                            cmd: Some(command.clone()),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| format!("cannot run {command:?}: {e}"))?;
                let mut output_tail = String::new();
                if let bollard::exec::StartExecResults::Attached { mut output, .. } = inner
                    .docker
                    .start_exec(&exec.id, None)
                    .await
                    .map_err(|e| format!("cannot run {command:?}: {e}"))?
                {
                    while let Some(Ok(chunk)) = output.next().await {
                        output_tail.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
                        if output_tail.len() > 512 {
                            output_tail.drain(..output_tail.len() - 256);
                        }
                    }
                }
                let inspected = inner
                    .docker
                    .inspect_exec(&exec.id)
                    .await
                    .map_err(|e| format!("cannot inspect {command:?}: {e}"))?;
                match inspected.exit_code {
                    Some(0) => Ok(()),
                    code => Err(format!(
                        "{command:?} exited with {}: {}",
                        code.map_or_else(|| "no status".to_owned(), |c| c.to_string()),
                        output_tail.trim()
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_split_for_the_pull_api() {
        assert_eq!(pull_reference("nginx"), ("nginx".into(), "latest".into()));
        assert_eq!(
            pull_reference("nginx:1.27"),
            ("nginx".into(), "1.27".into())
        );
        assert_eq!(
            pull_reference("localhost:5000/team/web"),
            ("localhost:5000/team/web".into(), "latest".into())
        );
        assert_eq!(
            pull_reference("localhost:5000/team/web:2"),
            ("localhost:5000/team/web".into(), "2".into())
        );
        assert_eq!(
            pull_reference("web@sha256:abc"),
            ("web@sha256:abc".into(), String::new())
        );
    }

    #[test]
    fn cpu_is_the_share_of_the_machine_since_the_previous_sample_and_memory_excludes_cache() {
        let cpu = |total, system| bollard::models::ContainerCpuStats {
            cpu_usage: Some(bollard::models::ContainerCpuUsage {
                total_usage: Some(total),
                ..Default::default()
            }),
            system_cpu_usage: Some(system),
            online_cpus: Some(4),
            ..Default::default()
        };
        let stats = bollard::models::ContainerStatsResponse {
            // A quarter of all 4 cores' time since the last sample: 1 core.
            cpu_stats: Some(cpu(3_000, 10_000)),
            precpu_stats: Some(cpu(1_000, 2_000)),
            memory_stats: Some(bollard::models::ContainerMemoryStats {
                usage: Some(50 << 20),
                stats: Some(HashMap::from([("inactive_file".to_owned(), 10 << 20)])),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            stats_sample(&stats),
            Some(Sample {
                cpu_millis: 1_000,
                memory_bytes: 40 << 20
            })
        );
    }

    #[test]
    fn a_probe_keeps_container_port_numbers_in_its_label() {
        let manifest = keel_manifest::parse_yaml(
            "name: web\nproject: shop\nimage: web:1\nports:\n  - name: admin\n    port: 9090\n  - name: http\n    port: 8080\nhealth:\n  http:\n    port: http\n    path: /ready\n  interval: 3s\n",
        )
        .map_err(|e| e.to_string());
        let spec = InstanceSpec {
            instance: InstanceRef {
                project: "shop".into(),
                app: "web".into(),
                id: "1-ab".into(),
            },
            revision: 1,
            manifest: manifest.unwrap_or_else(|e| panic!("{e}")),
        };
        let probe = ProbeSpec::from_manifest(&spec);
        assert_eq!(
            probe.map(|p| (p.kind, p.interval_ms, p.unhealthy_threshold)),
            Some((
                ProbeKind::Http {
                    port: 8080,
                    path: "/ready".into()
                },
                3_000,
                3
            ))
        );
    }

    #[test]
    fn exit_codes_come_from_the_status_text() {
        assert_eq!(exit_code_from_status("Exited (3) 2 seconds ago"), Some(3));
        assert_eq!(
            exit_code_from_status("Exited (137) About a minute ago"),
            Some(137)
        );
        assert_eq!(exit_code_from_status("Up 3 seconds"), None);
    }
}
