//! The long-running roles besides the controller: `keel agent`,
//! `keel router`, and `keel up`, which runs the controller, an agent and a
//! router in one process on one machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use keel_agent::{Agent, AgentConfig, AgentHandle, DockerConfig, DockerRuntime};
use keel_controller::{Server, ServerConfig};
use keel_router::{Router, RouterConfig, RouterHandle, TableSource};

use crate::Stop;
use crate::config::{self, Config, Context};
use crate::node_config::{AgentArgs, NodeSettings};

/// Where a node's router listens, for `keel agent --roles router`,
/// `keel router` and `keel up`.
#[derive(Debug, Clone, clap::Args)]
pub struct RouterArgs {
    /// Plain HTTP (HTTP/1.1 and h2c). `off` to disable.
    #[arg(long, default_value = "0.0.0.0:80", value_parser = parse_listen)]
    pub http: Listen,
    /// HTTPS: TLS terminated (certificates from `keel certs`, self-signed
    /// otherwise) or passed through by SNI. `off` to disable.
    #[arg(long, default_value = "0.0.0.0:443", value_parser = parse_listen)]
    pub https: Listen,
    /// Prometheus `/metrics`. Off unless given.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// The IP address plain TCP routes listen on, each on its route's
    /// `listen_port`. Default: the --http address's IP (else --https's).
    #[arg(long)]
    pub tcp_ip: Option<std::net::IpAddr>,
    /// Threads serving traffic (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub router_threads: usize,
}

/// A listener that can be turned off: `address:port`, or `off`.
#[derive(Debug, Clone, Copy)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_listen(text: &str) -> Result<Listen, String> {
    if text == "off" {
        return Ok(Listen(None));
    }
    text.parse()
        .map(|address| Listen(Some(address)))
        .map_err(|_| format!("{text:?} is not an address:port (or `off`)"))
}

fn start_router(args: &RouterArgs, source: TableSource) -> anyhow::Result<RouterHandle> {
    let config = RouterConfig {
        http_addr: args.http.0,
        https_addr: args.https.0,
        metrics_addr: args.metrics,
        tcp_ip: args.tcp_ip,
        worker_threads: args.router_threads,
        source,
        ..RouterConfig::default()
    };
    Router::start(config).context("cannot start the router")
}

fn print_router(router: &RouterHandle) {
    let addresses = router.addresses();
    if let Some(http) = addresses.http {
        println!("Router HTTP: http://{http}");
    }
    if let Some(https) = addresses.https {
        println!("Router HTTPS: https://{https}");
    }
    if let Some(metrics) = addresses.metrics {
        println!("Router metrics: http://{metrics}/metrics");
    }
    println!(
        "Router TCP routes: on {} (each route's listen_port)",
        addresses.tcp_ip
    );
}

async fn start_agent(settings: NodeSettings) -> anyhow::Result<AgentHandle> {
    let address = settings
        .registration
        .address
        .parse()
        .context("the advertise address")?;
    let runtime = DockerRuntime::connect(DockerConfig::new(
        settings.registration.name.clone(),
        address,
    ))
    .await
    .context("the agent runs containers in Docker Engine: is dockerd running? (`bash scripts/setup.sh` starts it)")?;
    let config = AgentConfig::new(
        settings.controller.clone(),
        settings.join_token.clone(),
        settings.registration,
    );
    Agent::new(config, Arc::new(runtime))
        .spawn()
        .context("cannot start the agent")
}

/// Waits until the agent holds its node's credential.
async fn credential(agent: &AgentHandle, within: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(credential) = agent.credential().await {
            return Ok(credential);
        }
        if Instant::now() >= deadline {
            bail!(
                "node {} could not register within {}s: is the controller up and the join token right? (see the log above)",
                agent.node(),
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- keel agent ----

#[derive(Debug, clap::Args)]
pub struct AgentCommand {
    #[command(flatten)]
    pub node: AgentArgs,
    #[command(flatten)]
    pub router: RouterArgs,
}

pub async fn agent(command: AgentCommand) -> anyhow::Result<()> {
    let stop = Stop::install()?;
    let settings = command.node.resolve()?;
    let name = settings.registration.name.clone();
    let controller = settings.controller.clone();
    let routes = settings.registration.roles.iter().any(|r| r == "router");
    println!(
        "Node {name} joining {controller} (region {}, zone {}, roles {}, address {})",
        settings.registration.region,
        settings.registration.zone,
        settings.registration.roles.join(","),
        settings.registration.address
    );
    let health_addr = settings.health_addr;
    let agent = start_agent(settings).await?;
    if let Some(addr) = health_addr {
        let addr = agent.serve_health(addr).await?;
        println!("Agent health: http://{addr}/healthz and http://{addr}/readyz");
    }
    let router = if routes {
        let credential = credential(&agent, Duration::from_secs(60)).await?;
        let router = start_router(
            &command.router,
            TableSource::controller(&controller, credential, &name),
        )?;
        print_router(&router);
        Some(router)
    } else {
        None
    };
    stop.wait().await?;
    println!("Stopping: instances keep running and are adopted when the agent starts again");
    if let Some(router) = router {
        router.shutdown().await;
    }
    agent.stop().await;
    Ok(())
}

// ---- keel router ----

#[derive(Debug, clap::Args)]
pub struct RouterCommand {
    /// The controller's API URL.
    #[arg(long, env = "KEEL_CONTROLLER", conflicts_with = "routes_file")]
    pub controller: Option<String>,
    /// A file holding a router node's credential or an admin token. Wins
    /// over KEEL_TOKEN.
    #[arg(long, requires = "controller")]
    pub token_file: Option<PathBuf>,
    /// The credential itself. A command line is visible to other users of
    /// the machine: prefer --token-file or KEEL_TOKEN.
    #[arg(long, env = "KEEL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The node this router serves as (it must have the `router` role).
    #[arg(long, requires = "controller")]
    pub node: Option<String>,
    /// Serve a fixed route table (RouteTable JSON) instead of the
    /// controller's: for tests and benchmarks.
    #[arg(long)]
    pub routes_file: Option<PathBuf>,
    #[command(flatten)]
    pub router: RouterArgs,
}

pub async fn router(command: RouterCommand) -> anyhow::Result<()> {
    let stop = Stop::install()?;
    let source = match (command.routes_file, command.controller) {
        (Some(file), _) => TableSource::file(file),
        (None, Some(controller)) => {
            let token = crate::token_from(
                command.token_file.as_deref(),
                command.token,
                "--token-file",
                "KEEL_TOKEN",
            )
            .context("--controller needs a token")?;
            let node = command
                .node
                .context("--node is required with --controller")?;
            TableSource::controller(controller.trim_end_matches('/'), token, node)
        }
        (None, None) => bail!(
            "say where routes come from: --controller URL --token-file FILE --node N, or --routes-file FILE"
        ),
    };
    let router = start_router(&command.router, source)?;
    print_router(&router);
    stop.wait().await?;
    println!("Stopping: finishing requests in flight");
    router.shutdown().await;
    Ok(())
}

// ---- keel up ----

#[derive(Debug, clap::Args)]
pub struct UpCommand {
    /// Where the API listens.
    #[arg(long, env = "KEEL_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// The embedded store, tokens and the node's state.
    #[arg(long, env = "KEEL_DATA_DIR", default_value_os_t = crate::default_data_dir())]
    pub data_dir: PathBuf,
    /// This machine's node name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "local")]
    pub region: String,
    #[arg(long, default_value = "local-a")]
    pub zone: String,
    /// Where the router answers HTTP. `off` to disable.
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    pub http: Listen,
    /// Where the router answers HTTPS. `off` to disable.
    #[arg(long, default_value = "127.0.0.1:8443", value_parser = parse_listen)]
    pub https: Listen,
    /// The CLI context `keel up` writes and makes current.
    #[arg(long, default_value = "local")]
    pub context_name: String,
    #[command(flatten)]
    pub history: crate::RevisionHistory,
}

pub async fn up(command: UpCommand) -> anyhow::Result<()> {
    let started = Instant::now();
    let stop = Stop::install()?;
    let mut config = ServerConfig::new(command.listen, command.data_dir.clone());
    command.history.apply(&mut config);
    let server = Server::start(config).await?;
    let url = format!("http://{}", server.addr);
    let api_ms = started.elapsed().as_millis();
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .with_context(|| format!("cannot read {}", path.display()))
    };
    let admin_token = read(&server.admin_token_file)?;
    let join_token = read(&server.join_token_file)?;
    println!("Keel API: {url} (serving after {api_ms} ms)");

    let node = AgentArgs {
        controller: Some(url.clone()),
        join_token: Some(join_token),
        name: command.name.clone(),
        region: Some(command.region.clone()),
        zone: Some(command.zone.clone()),
        roles: vec!["worker".into(), "router".into()],
        ..AgentArgs::default()
    }
    .resolve()?;
    let node_name = node.registration.name.clone();
    let agent = start_agent(node).await?;
    // The router serves as this node, with its credential, as `keel agent
    // --roles router` does.
    let credential = credential(&agent, Duration::from_secs(30)).await?;
    let router_args = RouterArgs {
        http: command.http,
        https: command.https,
        metrics: None,
        tcp_ip: None,
        router_threads: 0,
    };
    let router = start_router(
        &router_args,
        TableSource::controller(&url, credential, &node_name),
    )?;
    print_router(&router);

    let path = config::path();
    let mut cli_config = Config::load(&path).unwrap_or_default();
    cli_config.contexts.insert(
        command.context_name.clone(),
        Context {
            url: url.clone(),
            token: admin_token,
            router_http: router.addresses().http.map(|a| a.to_string()),
        },
    );
    cli_config.current = Some(command.context_name.clone());
    cli_config.save(&path)?;
    println!("Admin token: in {}", server.admin_token_file.display());
    println!(
        "CLI context {:?} saved in {}: try `keel nodes`, then `keel deploy -f app.yaml`",
        command.context_name,
        path.display()
    );
    println!(
        "Node {node_name} runs instances in Docker Engine; Ctrl-C stops Keel (instances keep running and are adopted on the next start)"
    );

    stop.wait().await?;
    println!("Stopping: finishing requests in flight");
    router.shutdown().await;
    agent.stop().await;
    server.shutdown().await
}
