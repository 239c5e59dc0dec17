//! The in-process cluster harness: a real controller (embedded store in a
//! temporary directory) and N simulated agents, talking real HTTP over
//! loopback. For tests and benchmarks, behind the `testing` feature; it is
//! test support, so it reports failures with `anyhow`.
//!
//! Each agent reaches the controller through a small TCP proxy of its own.
//! That is how the harness cuts connections the way a network does: a
//! partitioned node's proxy drops its connections and refuses new ones,
//! and [`SimCluster::stop_controller`] cuts every proxy first, so the
//! controller's graceful shutdown is not kept waiting by agents' streams
//! that never end on their own.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use keel_agent::testing::{SimCluster, nodes_in_zones};
//! let cluster = SimCluster::start(&nodes_in_zones(9, &["a", "b", "c"])).await?;
//! cluster.admin().apply("name: web\nproject: shop\nimage: nginx:1\ninstances: 3\n").await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use keel_controller::{Server, ServerConfig};
use serde::Deserialize;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{Agent, AgentConfig, AgentHandle, Backoff, NodeCapacity, NodeRegistration};
use crate::{Runtime, SimConfig, SimRuntime};

/// Polls `$check` (a block evaluating to `Ok(value)` when the condition
/// holds, `Err(why)` while it does not) every 50 ms until it holds, and
/// yields the value; panics with the last `why` after `$within`.
///
/// ```ignore
/// let running = eventually!(Duration::from_secs(10), {
///     let instances = cluster.admin().instances("shop", "web").await?;
///     let up = instances.iter().filter(|i| i.is_up()).count();
///     if up == 3 { Ok(instances) } else { Err(format!("{up} of 3 up")) }
/// });
/// ```
#[macro_export]
macro_rules! eventually {
    ($within:expr, $check:block) => {{
        let within: ::std::time::Duration = $within;
        let deadline = ::tokio::time::Instant::now() + within;
        loop {
            match $check {
                ::std::result::Result::Ok(value) => break value,
                ::std::result::Result::Err(why) => {
                    if ::tokio::time::Instant::now() >= deadline {
                        panic!("not within {within:?}: {why}");
                    }
                    ::tokio::time::sleep(::std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }};
}

/// One simulated node to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub region: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub roles: Vec<String>,
    pub capacity: NodeCapacity,
}

impl NodeSpec {
    /// A `worker` in region `sim` with 4 cores, 8 GiB and room for 100
    /// instances.
    pub fn new(name: impl Into<String>, zone: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            region: "sim".to_owned(),
            zone: zone.into(),
            labels: BTreeMap::new(),
            roles: vec!["worker".to_owned()],
            capacity: NodeCapacity {
                cpu_millis: 4_000,
                memory_mb: 8_192,
                max_instances: 100,
            },
        }
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.roles.push(role.into());
        self
    }

    pub fn capacity(mut self, capacity: NodeCapacity) -> Self {
        self.capacity = capacity;
        self
    }
}

/// The `p` quantile (0 to 1) of `sorted` by nearest rank, for the
/// benchmarks; zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds, fractional, for the benchmarks' figures.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `count` nodes named `node-000`, `node-001`, ..., dealt round-robin over
/// `zones`.
pub fn nodes_in_zones(count: usize, zones: &[&str]) -> Vec<NodeSpec> {
    (0..count)
        .map(|i| NodeSpec::new(format!("node-{i:03}"), zones[i % zones.len().max(1)]))
        .collect()
}

/// Timings of a harness cluster: short, so tests are fast.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Controller: a node is lost after this long without heartbeats
    /// (whole seconds). Default 2 s.
    pub node_lost_after: Duration,
    /// Agents. Default 250 ms.
    pub heartbeat_interval: Duration,
    /// Agents: a report at least this often. Default 1 s.
    pub report_interval: Duration,
    /// Agents: reconnects and retries. Default 50 ms doubling to 500 ms.
    pub retry: Backoff,
    /// Simulated runtimes: `starting` for this long. Default 100 ms.
    pub start_delay: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_lost_after: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(250),
            report_interval: Duration::from_secs(1),
            retry: Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(500),
            },
            start_delay: Duration::from_millis(100),
        }
    }
}

/// An instance as `GET /v1/projects/{p}/apps/{a}/instances` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Instance {
    pub project: String,
    pub app: String,
    pub id: String,
    pub revision: u64,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub pending_reason: Option<String>,
    pub state: String,
    pub ready: bool,
    pub restarts: u32,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, String>,
    #[serde(default)]
    pub cpu_millis: Option<u64>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

impl Instance {
    /// Running and ready, as its agent reported.
    pub fn is_up(&self) -> bool {
        self.state == "running" && self.ready
    }
}

/// A node as `GET /v1/nodes` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Node {
    pub name: String,
    pub region: String,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub roles: Vec<String>,
    pub address: String,
    pub status: String,
}

/// The admin's client of the controller's API.
#[derive(Debug, Clone)]
pub struct Admin {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Admin {
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            token: token.into(),
            http: reqwest::Client::new(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The admin token, for clients the test starts itself (the CLI, the
    /// console).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Any call; the JSON answer on 2xx, an error with the body otherwise.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(30));
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Applies a YAML manifest; returns what the API says it did.
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::POST,
            "/v1/apps",
            Some(("application/yaml", yaml.to_owned())),
        )
        .await
    }

    /// Applies a JSON manifest.
    pub async fn apply_json(&self, manifest: &Value) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::POST,
            "/v1/apps",
            Some(("application/json", manifest.to_string())),
        )
        .await
    }

    /// The current revision's manifest of an app.
    pub async fn manifest(&self, project: &str, app: &str) -> anyhow::Result<Value> {
        let view = self
            .get(&format!("/v1/projects/{project}/apps/{app}"))
            .await?;
        Ok(view["revision"]["manifest"].clone())
    }

    /// Scales an app (`POST .../scale`): a new revision with only the
    /// count changed.
    pub async fn scale(&self, project: &str, app: &str, instances: u32) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/projects/{project}/apps/{app}/scale"),
            Some((
                "application/json",
                serde_json::json!({ "instances": instances }).to_string(),
            )),
        )
        .await
    }

    /// Rolls back to the revision before the current one.
    pub async fn rollback(&self, project: &str, app: &str) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/projects/{project}/apps/{app}/rollback"),
            None,
        )
        .await
    }

    pub async fn instances(&self, project: &str, app: &str) -> anyhow::Result<Vec<Instance>> {
        let value = self
            .get(&format!("/v1/projects/{project}/apps/{app}/instances"))
            .await?;
        Ok(serde_json::from_value(value)?)
    }

    /// An app's merged logs (`GET .../logs`), whole: without `follow`, the
    /// response ends once every instance's log is sent.
    pub async fn logs(
        &self,
        project: &str,
        app: &str,
        tail: Option<u32>,
    ) -> anyhow::Result<String> {
        let mut path = format!("/v1/projects/{project}/apps/{app}/logs");
        if let Some(tail) = tail {
            path.push_str(&format!("?tail={tail}"));
        }
        match self.get(&path).await? {
            Value::String(text) => Ok(text),
            other => Ok(other.to_string()),
        }
    }

    /// Follows an app's logs: the response, to read chunk by chunk.
    pub async fn follow_logs(&self, project: &str, app: &str) -> anyhow::Result<reqwest::Response> {
        let path = format!("/v1/projects/{project}/apps/{app}/logs?follow=true&tail=0");
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        if !response.status().is_success() {
            bail!("GET {path}: {}", response.status());
        }
        Ok(response)
    }

    pub async fn nodes(&self) -> anyhow::Result<Vec<Node>> {
        Ok(serde_json::from_value(self.get("/v1/nodes").await?)?)
    }

    /// An app's events, oldest first: (reason, message).
    pub async fn events(&self, project: &str, app: &str) -> anyhow::Result<Vec<(String, String)>> {
        let value = self
            .get(&format!(
                "/v1/events?project={project}&app={app}&limit=1000"
            ))
            .await?;
        Ok(value
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .map(|e| {
                        (
                            e["reason"].as_str().unwrap_or_default().to_owned(),
                            e["message"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// A TCP forwarder in front of the controller, one per agent: the harness's
/// network. `None` as target is a cut: connections are dropped, new ones
/// closed at once.
#[derive(Debug)]
struct Proxy {
    addr: SocketAddr,
    target: watch::Sender<Option<SocketAddr>>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: Option<SocketAddr>) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (target, targets) = watch::channel(target);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut targets = targets.clone();
                let Some(to) = *targets.borrow_and_update() else {
                    continue; // dropped: the client sees the connection close
                };
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(to).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = targets.changed() => {}
                    }
                });
            }
        });
        Ok(Proxy { addr, target, task })
    }

    fn set(&self, to: Option<SocketAddr>) {
        self.target.send_if_modified(|target| {
            let changed = *target != to;
            *target = to;
            changed
        });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set(None);
        self.task.abort();
    }
}

#[derive(Debug)]
struct SimNode {
    spec: NodeSpec,
    /// Set when the node runs the simulated runtime.
    sim: Option<SimRuntime>,
    runtime: Arc<dyn Runtime>,
    address: String,
    agent: Option<AgentHandle>,
    proxy: Proxy,
    partitioned: bool,
}

/// A controller and simulated agents in this process (see the module doc).
#[derive(Debug)]
pub struct SimCluster {
    config: ClusterConfig,
    dir: tempfile::TempDir,
    controller: Option<Controller>,
    addr: SocketAddr,
    admin: Admin,
    join_token: String,
    nodes: BTreeMap<String, SimNode>,
    /// Node addresses are 10.0.x.y, one per node ever added.
    added: u32,
}

fn server_config(
    config: &ClusterConfig,
    listen: SocketAddr,
    dir: &std::path::Path,
) -> ServerConfig {
    let mut server = ServerConfig::new(listen, dir);
    server.node_lost_after = config.node_lost_after;
    server
}

/// A controller on Tokio threads of its own, as if it were its own
/// process: stopping it drops every task it had, so its store closes even
/// if some task of the controller would have held it open.
#[derive(Debug)]
struct Controller {
    /// Always `Some` but while stopping or dropping.
    runtime: Option<tokio::runtime::Runtime>,
    server: Option<Server>,
    addr: SocketAddr,
}

impl Controller {
    /// Starts a controller on `listen` (or, when that port is taken, on
    /// another). Retries while the data directory's store is still held
    /// by a controller that is closing.
    async fn start(
        config: &ClusterConfig,
        listen: SocketAddr,
        dir: &std::path::Path,
    ) -> anyhow::Result<Controller> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("controller")
            .enable_all()
            .build()?;
        // From here on, dropping `controller` shuts the runtime down the
        // way an async context allows.
        let mut controller = Controller {
            runtime: Some(runtime),
            server: None,
            addr: listen,
        };
        let mut listen = listen;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let start = Server::start(server_config(config, listen, dir));
            let started = match &controller.runtime {
                Some(runtime) => runtime.spawn(start).await?,
                None => bail!("the controller's runtime is gone"),
            };
            match started {
                Ok(server) => {
                    controller.addr = server.addr;
                    controller.server = Some(server);
                    return Ok(controller);
                }
                Err(error)
                    if error.to_string().starts_with("cannot listen") && listen.port() != 0 =>
                {
                    tracing::debug!(error = %error, "the old port is taken; using another");
                    listen.set_port(0);
                }
                Err(error) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(
                        error = format!("{error:#}"),
                        "the controller cannot start yet"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops it: gracefully (requests in flight finish, then the store
    /// closes), or not (its threads and tasks are dropped where they are,
    /// as in a crash; what the store acknowledged is durable).
    async fn stop(mut self, graceful: bool) -> anyhow::Result<()> {
        let (Some(runtime), server) = (self.runtime.take(), self.server.take()) else {
            return Ok(());
        };
        let stopped = match server {
            Some(server) if graceful => {
                let shutdown = runtime.spawn(server.shutdown());
                match tokio::time::timeout(Duration::from_secs(30), shutdown).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(panicked)) => Err(panicked.into()),
                    Err(_) => Err(anyhow::anyhow!("the controller did not stop within 30 s")),
                }
            }
            _ => Ok(()),
        };
        tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(10)))
            .await?;
        stopped
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl SimCluster {
    /// A cluster with [`ClusterConfig::default`] timings; returns once
    /// every node is registered and ready.
    pub async fn start(nodes: &[NodeSpec]) -> anyhow::Result<SimCluster> {
        Self::start_with(ClusterConfig::default(), nodes).await
    }

    pub async fn start_with(
        config: ClusterConfig,
        nodes: &[NodeSpec],
    ) -> anyhow::Result<SimCluster> {
        let dir = tempfile::tempdir()?;
        let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
        let controller = Controller::start(&config, listen, dir.path()).await?;
        let server = controller
            .server
            .as_ref()
            .context("a started controller has its server")?;
        let token = server
            .new_admin_token
            .as_ref()
            .context("a new controller makes an admin token")?
            .token
            .clone();
        let join_token = server
            .new_join_token
            .as_ref()
            .context("a new controller makes a join token")?
            .token
            .clone();
        let addr = server.addr;
        let mut cluster = SimCluster {
            config,
            dir,
            controller: Some(controller),
            addr,
            admin: Admin::new(format!("http://{addr}"), token),
            join_token,
            nodes: BTreeMap::new(),
            added: 0,
        };
        for spec in nodes {
            cluster.spawn_node(spec.clone()).await?;
        }
        cluster
            .wait_ready(nodes.iter().map(|n| n.name.clone()))
            .await?;
        Ok(cluster)
    }

    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The controller's address (the admin's; agents go through proxies).
    pub fn controller_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn node_names(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// A node's simulated runtime, to see what it really runs (`None` for
    /// a node on another runtime).
    pub fn runtime(&self, node: &str) -> Option<&SimRuntime> {
        self.nodes.get(node).and_then(|n| n.sim.as_ref())
    }

    /// Every simulated node's runtime.
    pub fn runtimes(&self) -> impl Iterator<Item = (&str, &SimRuntime)> {
        self.nodes
            .iter()
            .filter_map(|(name, n)| Some((name.as_str(), n.sim.as_ref()?)))
    }

    /// The spec a node was started with.
    pub fn node_spec(&self, node: &str) -> Option<&NodeSpec> {
        self.nodes.get(node).map(|n| &n.spec)
    }

    /// The handle of a node's agent (to read its status).
    pub fn agent(&self, node: &str) -> Option<&AgentHandle> {
        self.nodes.get(node).and_then(|n| n.agent.as_ref())
    }

    /// Adds a node and starts its agent, without waiting for it to join
    /// (the controller may be down).
    pub async fn spawn_node(&mut self, spec: NodeSpec) -> anyhow::Result<()> {
        let index = self.added;
        let address = format!("10.0.{}.{}", index / 250, index % 250 + 1);
        let sim = SimRuntime::new(
            SimConfig::new(address.clone()).with_start_delay(self.config.start_delay),
        );
        self.spawn_node_on(spec, address, Arc::new(sim.clone()), Some(sim))
            .await
    }

    /// Adds a node on a runtime of the caller's (a `DockerRuntime`),
    /// registered with `address`, without waiting for it to join.
    pub async fn spawn_node_with(
        &mut self,
        spec: NodeSpec,
        address: impl Into<String>,
        runtime: Arc<dyn Runtime>,
    ) -> anyhow::Result<()> {
        self.spawn_node_on(spec, address.into(), runtime, None)
            .await
    }

    /// [`SimCluster::spawn_node_with`], then waits until it is ready.
    pub async fn add_node_with(
        &mut self,
        spec: NodeSpec,
        address: impl Into<String>,
        runtime: Arc<dyn Runtime>,
    ) -> anyhow::Result<()> {
        let name = spec.name.clone();
        self.spawn_node_with(spec, address, runtime).await?;
        self.wait_ready([name]).await
    }

    async fn spawn_node_on(
        &mut self,
        spec: NodeSpec,
        address: String,
        runtime: Arc<dyn Runtime>,
        sim: Option<SimRuntime>,
    ) -> anyhow::Result<()> {
        if self.nodes.contains_key(&spec.name) {
            bail!("node {} is already in the cluster", spec.name);
        }
        self.added += 1;
        let target = self.controller.as_ref().map(Controller::addr);
        let proxy = Proxy::start(target).await?;
        let mut node = SimNode {
            spec,
            sim,
            runtime,
            address,
            agent: None,
            proxy,
            partitioned: false,
        };
        node.agent = Some(self.agent_for(&node)?);
        self.nodes.insert(node.spec.name.clone(), node);
        Ok(())
    }

    fn agent_for(&self, node: &SimNode) -> anyhow::Result<AgentHandle> {
        let spec = &node.spec;
        let registration = NodeRegistration {
            name: spec.name.clone(),
            region: spec.region.clone(),
            zone: spec.zone.clone(),
            labels: spec.labels.clone(),
            roles: spec.roles.clone(),
            capacity: spec.capacity,
            address: node.address.clone(),
        };
        let mut config = AgentConfig::new(
            format!("http://{}", node.proxy.addr),
            self.join_token.clone(),
            registration,
        );
        config.heartbeat_interval = self.config.heartbeat_interval;
        config.report_interval = self.config.report_interval;
        config.retry = self.config.retry;
        config.request_timeout = Duration::from_secs(5);
        Ok(Agent::new(config, node.runtime.clone()).spawn()?)
    }

    /// Waits until the API shows these nodes `ready`.
    async fn wait_ready(&self, names: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
        let names: BTreeSet<String> = names.into_iter().collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready: BTreeSet<String> = self
                .admin
                .nodes()
                .await?
                .into_iter()
                .filter(|n| n.status == "ready")
                .map(|n| n.name)
                .collect();
            let missing: Vec<&String> = names.difference(&ready).collect();
            if missing.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("nodes not ready after 30 s: {missing:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Adds a node and waits until it is ready.
    pub async fn add_node(&mut self, spec: NodeSpec) -> anyhow::Result<()> {
        let name = spec.name.clone();
        self.spawn_node(spec).await?;
        self.wait_ready([name]).await
    }

    /// Unplugs a node: its agent dies at once, its connections drop, and
    /// its runtime (with everything it ran) is gone.
    pub fn kill_node(&mut self, name: &str) -> anyhow::Result<()> {
        let mut node = self
            .nodes
            .remove(name)
            .with_context(|| format!("no node {name}"))?;
        if let Some(agent) = node.agent.take() {
            agent.kill();
        }
        node.proxy.set(None);
        Ok(())
    }

    /// Stops a node's agent gracefully; what it runs keeps running.
    pub async fn stop_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get_mut(name)
            .with_context(|| format!("no node {name}"))?;
        if let Some(agent) = node.agent.take() {
            agent.stop().await;
        }
        Ok(())
    }

    /// Starts a new agent on a node whose agent was stopped, on the same
    /// runtime (an agent upgrade: it finds what runs and adopts it).
    pub fn start_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let runtime = self
            .nodes
            .get(name)
            .with_context(|| format!("no node {name}"))?
            .runtime
            .clone();
        self.start_agent_with(name, runtime)
    }

    /// Starts a new agent on a node whose agent was stopped, on a new
    /// runtime (a `DockerRuntime` connected again, as after a restart of
    /// the agent's process).
    pub fn start_agent_with(
        &mut self,
        name: &str,
        runtime: Arc<dyn Runtime>,
    ) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get_mut(name)
            .with_context(|| format!("no node {name}"))?;
        if node.agent.is_some() {
            bail!("node {name} has an agent running");
        }
        node.runtime = runtime;
        let node = &self.nodes[name];
        let agent = self.agent_for(node)?;
        if let Some(node) = self.nodes.get_mut(name) {
            node.agent = Some(agent);
        }
        Ok(())
    }

    /// Cuts a node off the controller (its connections drop; new ones
    /// fail); the agent and its instances keep running.
    pub fn partition(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get_mut(name)
            .with_context(|| format!("no node {name}"))?;
        node.partitioned = true;
        node.proxy.set(None);
        Ok(())
    }

    /// Ends a partition.
    pub fn heal(&mut self, name: &str) -> anyhow::Result<()> {
        let target = self.controller.as_ref().map(Controller::addr);
        let node = self
            .nodes
            .get_mut(name)
            .with_context(|| format!("no node {name}"))?;
        node.partitioned = false;
        node.proxy.set(target);
        Ok(())
    }

    /// Stops the controller gracefully: every agent's connection is cut
    /// first (a stream never ends on its own, and a graceful shutdown waits
    /// for it), then it finishes what is in flight and closes its store.
    /// Agents keep running and retrying; so do their instances.
    pub async fn stop_controller(&mut self) -> anyhow::Result<()> {
        self.cut_agents();
        match self.controller.take() {
            Some(controller) => controller.stop(true).await,
            None => Ok(()),
        }
    }

    /// Kills the controller: its connections drop and its tasks vanish
    /// where they are, as when its process dies.
    pub async fn kill_controller(&mut self) -> anyhow::Result<()> {
        self.cut_agents();
        match self.controller.take() {
            Some(controller) => controller.stop(false).await,
            None => Ok(()),
        }
    }

    fn cut_agents(&self) {
        for node in self.nodes.values() {
            node.proxy.set(None);
        }
    }

    /// Starts the controller again on the same data directory (and the
    /// same port when it is free), and reconnects the agents' network.
    pub async fn start_controller(&mut self) -> anyhow::Result<()> {
        if self.controller.is_some() {
            bail!("the controller is running");
        }
        let controller = Controller::start(&self.config, self.addr, self.dir.path()).await?;
        let addr = controller.addr();
        self.addr = addr;
        self.admin = Admin::new(format!("http://{addr}"), self.admin.token.clone());
        for node in self.nodes.values() {
            if !node.partitioned {
                node.proxy.set(Some(addr));
            }
        }
        self.controller = Some(controller);
        Ok(())
    }

    /// [`SimCluster::kill_controller`] then [`SimCluster::start_controller`].
    pub async fn restart_controller(&mut self) -> anyhow::Result<()> {
        self.kill_controller().await?;
        self.start_controller().await
    }

    /// Kills every agent and stops the controller.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for node in self.nodes.values_mut() {
            if let Some(agent) = node.agent.take() {
                agent.kill();
            }
        }
        self.stop_controller().await
    }
}
