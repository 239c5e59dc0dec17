//! `keel`: one binary for every role of a Keel cloud.
//!
//! - `keel server`: the controller;
//! - the client verbs (`keel login`, `deploy`, `apps`, `ps`, ...) in
//!   `client.rs`, over the API client in `api.rs`, with contexts kept in
//!   `config.rs` and printing in `output.rs`.

#![forbid(unsafe_code)]

mod api;
mod client;
mod config;
mod node_config;
mod output;
mod roles;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use client::Session;
use output::Format;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keel_controller::{Server, ServerConfig};
use keel_store::StoreConfig;

#[derive(Debug, Parser)]
#[command(
    name = "keel",
    version,
    about = "Keel: a self-hosted container cloud in one binary",
    after_help = "Get started:\n  keel up                      # the whole cloud on this machine\n  keel deploy -f app.yaml      # deploy an app and wait until it serves\n  keel apps                    # what runs\n\nEnvironment: KEEL_URL and KEEL_TOKEN override the context; KEEL_CONFIG names the config file."
)]
struct Cli {
    /// The cluster to talk to (see `keel context`); default: the current one.
    #[arg(long, global = true, env = "KEEL_CONTEXT")]
    context: Option<String>,
    /// How to print results: tables for people, json or yaml for scripts.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller: the REST API over the cluster store.
    #[command(
        after_help = "Examples:\n  keel server\n  keel server --listen 0.0.0.0:7070 --data-dir /var/lib/keel\n  keel server --etcd http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379\n\nThe first start writes the admin token to admin.token and the join token to join.token\nin the data directory (mode 0600) and prints where they are, never the tokens."
    )]
    Server(ServerArgs),
    /// The whole cloud on this machine: controller (embedded store), agent
    /// and router in one process.
    #[command(
        after_help = "Examples:\n  keel up\n  keel up --data-dir /tmp/keel --http 127.0.0.1:9080 --https off\n\nWrites the CLI context `local`, so `keel` commands work at once. Starting again on\nthe same data directory brings every app back."
    )]
    Up(roles::UpCommand),
    /// Run a node's agent: join the cluster and run its instances in Docker.
    #[command(
        after_help = "Examples:\n  keel agent --controller http://10.0.0.1:7070 --join-token-file /var/lib/keel/join.token --name node-2 --zone b\n  keel agent --config /etc/keel/agent.toml\n  KEEL_JOIN_TOKEN=... keel agent --controller URL --roles worker,router --advertise-addr 10.0.0.7"
    )]
    Agent(roles::AgentCommand),
    /// Run a router on its own: HTTP/HTTPS/TCP ingress for the cluster.
    #[command(
        after_help = "Examples:\n  keel router --controller http://10.0.0.1:7070 --token-file /etc/keel/edge-1.token --node edge-1\n  keel router --routes-file table.json --http 127.0.0.1:8080 --https off"
    )]
    Router(roles::RouterCommand),
    /// Save a cluster's URL and token as a context and make it current.
    #[command(
        after_help = "Examples:\n  keel login http://127.0.0.1:7070 --token-file /var/lib/keel/admin.token\n  KEEL_TOKEN=... keel login https://keel.example.com --name prod"
    )]
    Login {
        /// The controller's API URL.
        url: String,
        /// A file holding the admin token (`admin.token` in the
        /// controller's data directory). Wins over KEEL_TOKEN.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The admin token itself. A command line is visible to other
        /// users of the machine: prefer --token-file or KEEL_TOKEN.
        #[arg(long, env = "KEEL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The context's name (default: the URL's host and port).
        #[arg(long)]
        name: Option<String>,
    },
    /// List, switch or remove the clusters this CLI knows.
    #[command(
        after_help = "Examples:\n  keel context\n  keel context use prod\n  keel context rm old-lab"
    )]
    Context {
        #[command(subcommand)]
        action: Option<ContextAction>,
    },
    /// Deploy an app from its manifest and follow the rollout until it serves.
    #[command(
        after_help = "Examples:\n  keel deploy -f app.yaml\n  keel deploy -f app.json --timeout 10m\n  cat app.yaml | keel deploy -f - --no-wait\n\nExits non-zero with the reason when the rollout fails or times out."
    )]
    Deploy {
        /// The manifest, YAML or JSON (`-` for standard input).
        #[arg(short, long)]
        file: PathBuf,
        #[command(flatten)]
        follow: Follow,
    },
    /// List apps with their revision and ready instances.
    #[command(after_help = "Examples:\n  keel apps\n  keel apps --project shop -o json")]
    Apps {
        #[arg(short, long)]
        project: Option<String>,
    },
    /// Show one app.
    #[command(
        after_help = "Examples:\n  keel app show web\n  keel app show web --project shop -o yaml"
    )]
    App {
        #[command(subcommand)]
        action: AppAction,
    },
    /// List instances: where they run, their state, restarts and address.
    #[command(after_help = "Examples:\n  keel ps\n  keel ps web\n  keel ps --project shop -o json")]
    Ps {
        app: Option<String>,
        #[arg(short, long)]
        project: Option<String>,
    },
    /// Set an app's instance count (a new revision; rolled out as an update).
    #[command(
        after_help = "Examples:\n  keel scale web 5\n  keel scale web 0    # keep the app, stop its instances"
    )]
    Scale {
        app: String,
        #[arg(value_parser = clap::value_parser!(u32).range(0..=1000))]
        instances: u32,
        #[arg(short, long)]
        project: Option<String>,
    },
    /// Replace every instance, a few at a time, as an update would.
    #[command(after_help = "Examples:\n  keel restart web\n  keel restart web --no-wait")]
    Restart {
        app: String,
        #[arg(short, long)]
        project: Option<String>,
        #[command(flatten)]
        follow: Follow,
    },
    /// Deploy an earlier revision's manifest again (default: the one before).
    #[command(
        after_help = "Examples:\n  keel rollback web\n  keel rollback web 3\n  keel rollback web --no-wait"
    )]
    Rollback {
        app: String,
        revision: Option<u64>,
        #[arg(short, long)]
        project: Option<String>,
        #[command(flatten)]
        follow: Follow,
    },
    /// Print an app's logs, from all its instances.
    #[command(after_help = "Examples:\n  keel logs web\n  keel logs web -f --tail 20")]
    Logs {
        app: String,
        /// Keep printing new lines as they are written.
        #[arg(short, long)]
        follow: bool,
        /// Lines from the end of each instance's log.
        #[arg(long, default_value_t = 100)]
        tail: u32,
        #[arg(short, long)]
        project: Option<String>,
    },
    /// Delete an app: its instances stop and its routes go.
    #[command(after_help = "Examples:\n  keel rm web\n  keel rm web --project shop")]
    Rm {
        app: String,
        #[arg(short, long)]
        project: Option<String>,
    },
    /// List the cluster's nodes.
    #[command(after_help = "Examples:\n  keel nodes\n  keel nodes -o json")]
    Nodes,
    /// Show, drain or undrain a node.
    #[command(
        after_help = "Examples:\n  keel node show node-1\n  keel node drain node-1\n  keel node undrain node-1"
    )]
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// List the route table: host names, paths and where they go.
    #[command(after_help = "Examples:\n  keel routes\n  keel routes -o yaml")]
    Routes,
    /// Store, list and remove TLS certificates for routes that terminate TLS.
    #[command(
        after_help = "Examples:\n  keel certs add shop.example.com --cert fullchain.pem --key privkey.pem\n  keel certs ls\n  keel certs rm shop.example.com"
    )]
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// List what happened and why: placements, replacements, failures.
    #[command(after_help = "Examples:\n  keel events\n  keel events web --limit 20")]
    Events {
        app: Option<String>,
        #[arg(short, long)]
        project: Option<String>,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
    },
    /// List projects (tenants) and how many apps each has.
    #[command(after_help = "Examples:\n  keel projects")]
    Projects,
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  keel completions bash > /etc/bash_completion.d/keel\n  keel completions zsh > \"${fpath[1]}/_keel\""
    )]
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
enum ContextAction {
    /// List contexts (the default).
    Ls,
    /// Make a context current.
    Use { name: String },
    /// Forget a context.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
enum AppAction {
    /// An app's revision, instances, routes, history and events.
    Show {
        app: String,
        #[arg(short, long)]
        project: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CertsAction {
    /// Store a certificate chain and its key for a host (`*.example.com`
    /// for a wildcard); it replaces one stored for the same host.
    Add {
        host: String,
        /// PEM: the leaf certificate first, then its intermediates.
        #[arg(long)]
        cert: PathBuf,
        /// PEM: the private key.
        #[arg(long)]
        key: PathBuf,
    },
    /// List stored certificates (never their keys).
    Ls,
    /// Remove a host's certificate.
    Rm { host: String },
}

#[derive(Debug, Subcommand)]
enum NodeAction {
    /// A node's labels, capacity and instances.
    Show { node: String },
    /// Move a node's instances elsewhere and place nothing new on it.
    Drain { node: String },
    /// Let a drained node take instances again.
    Undrain { node: String },
}

/// `90s`, `5m`, `1h`, `1500ms`: the manifest's duration syntax.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .ok_or_else(|| format!("{text:?} has no unit: write 90s, 5m or 1h"))?;
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write 90s, 5m or 1h"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value * 60),
        "h" => Duration::from_secs(value * 3600),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    if duration.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(duration)
}

/// How a command that changes an app follows the rollout it starts.
#[derive(Debug, clap::Args)]
struct Follow {
    /// Return once the revision is recorded, without following the rollout.
    #[arg(long)]
    no_wait: bool,
    /// How long to follow the rollout before giving up, e.g. 90s, 5m.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
}

impl Follow {
    fn options(&self) -> client::WaitOptions {
        client::WaitOptions {
            wait: !self.no_wait,
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// Address the API listens on.
    #[arg(long, env = "KEEL_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Directory for the embedded store and the admin token.
    #[arg(long, env = "KEEL_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Use an etcd cluster instead of the embedded store (comma-separated
    /// client URLs).
    #[arg(long, env = "KEEL_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Seconds without a heartbeat after which a node is lost and its
    /// instances are replaced elsewhere.
    #[arg(long, env = "KEEL_NODE_LOST_AFTER", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    node_lost_after: u64,
    #[command(flatten)]
    history: RevisionHistory,
}

/// How many revisions of each app the controller keeps (`keel server` and
/// `keel up`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct RevisionHistory {
    /// Revisions kept per app; older ones are deleted. The current
    /// revision and the one `keel rollback` goes back to are always kept.
    #[arg(long = "revision-history", env = "KEEL_REVISION_HISTORY", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) revisions: u64,
}

impl RevisionHistory {
    pub(crate) fn apply(self, config: &mut ServerConfig) {
        // At most 100 000 (checked by the parser), so it fits any usize.
        config.revision_history = usize::try_from(self.revisions).unwrap_or(usize::MAX);
    }
}

/// A token from a file (`flag`, which wins) or from the command line or
/// the environment variable `env`; an error naming both when neither
/// gives one.
pub(crate) fn token_from(
    file: Option<&std::path::Path>,
    value: Option<String>,
    flag: &str,
    env: &str,
) -> anyhow::Result<String> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("{flag}: cannot read {}", path.display()))?,
        None => value.with_context(|| format!("give the token with {flag} FILE or {env}"))?,
    };
    let token = token.trim();
    if token.is_empty() {
        match file {
            Some(path) => anyhow::bail!("{flag}: {} is empty", path.display()),
            None => anyhow::bail!("the token given in {env} is empty"),
        }
    }
    Ok(token.to_owned())
}

/// `/var/lib/keel` for root (a service), `~/.local/share/keel` otherwise.
pub(crate) fn default_data_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    match home {
        Some(home) if home != std::path::Path::new("/root") => home.join(".local/share/keel"),
        _ => PathBuf::from("/var/lib/keel"),
    }
}

/// mimalloc rather than glibc's allocator: the router allocates and frees
/// small buffers per request, and glibc's trimming (madvise) and
/// consolidation showed in its profile; `bench/router.sh` measures the
/// router with the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's tuning for `keel server` (the controller alone): return freed
/// pages to the OS at once (`MIMALLOC_PURGE_DELAY=0`, default 10 ms) and
/// when a thread ends (`MIMALLOC_ABANDONED_PAGE_PURGE=1`), and commit
/// memory as it is used rather than whole segments and arenas up front
/// (`MIMALLOC_EAGER_COMMIT=0`, `MIMALLOC_ARENA_EAGER_COMMIT=0`). With 1,000
/// nodes (`bench/control-plane.sh`) the first two cut the controller's
/// resident memory from 171 to about 140 MB and the last two to about
/// 113 MB. The router keeps the defaults, where fewer madvise calls are
/// what mimalloc was chosen for. mimalloc reads its options from the
/// environment when the process starts, and setting them from code would
/// need `unsafe`, so the process runs itself again with them set (same
/// PID, same arguments). An operator's own `MIMALLOC_PURGE_DELAY` wins.
fn tune_allocator_for_the_controller() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("MIMALLOC_PURGE_DELAY", "0")
        .env("MIMALLOC_ABANDONED_PAGE_PURGE", "1")
        .env("MIMALLOC_EAGER_COMMIT", "0")
        .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
        .exec();
    // exec returns only when it failed: run on with the defaults.
    tracing::warn!(error = %error, "cannot restart with the controller's allocator settings");
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Server(_)) {
        tune_allocator_for_the_controller();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let format = cli.output;
    let context = cli.context.as_deref();
    let session = || Session::open(context, format);
    match cli.command {
        Command::Server(args) => server(args).await,
        Command::Up(command) => roles::up(command).await,
        Command::Agent(command) => roles::agent(command).await,
        Command::Router(command) => roles::router(command).await,
        Command::Login {
            url,
            token_file,
            token,
            name,
        } => {
            let token = token_from(token_file.as_deref(), token, "--token-file", "KEEL_TOKEN")?;
            client::login(&url, &token, name).await
        }
        Command::Context { action } => match action.unwrap_or(ContextAction::Ls) {
            ContextAction::Ls => client::contexts(format),
            ContextAction::Use { name } => client::use_context(&name),
            ContextAction::Rm { name } => client::remove_context(&name),
        },
        Command::Deploy { file, follow } => {
            let options = client::DeployOptions {
                file,
                follow: follow.options(),
            };
            client::deploy(&session()?, options).await
        }
        Command::Apps { project } => client::apps(&session()?, project.as_deref()).await,
        Command::App {
            action: AppAction::Show { app, project },
        } => client::app_show(&session()?, &app, project.as_deref()).await,
        Command::Ps { app, project } => {
            client::ps(&session()?, app.as_deref(), project.as_deref()).await
        }
        Command::Scale {
            app,
            instances,
            project,
        } => client::scale(&session()?, &app, project.as_deref(), instances).await,
        Command::Restart {
            app,
            project,
            follow,
        } => client::restart(&session()?, &app, project.as_deref(), follow.options()).await,
        Command::Rollback {
            app,
            revision,
            project,
            follow,
        } => {
            let options = follow.options();
            client::rollback(&session()?, &app, project.as_deref(), revision, options).await
        }
        Command::Logs {
            app,
            follow,
            tail,
            project,
        } => client::logs(&session()?, &app, project.as_deref(), follow, tail).await,
        Command::Rm { app, project } => client::remove(&session()?, &app, project.as_deref()).await,
        Command::Nodes => client::nodes(&session()?).await,
        Command::Node { action } => match action {
            NodeAction::Show { node } => client::node_show(&session()?, &node).await,
            NodeAction::Drain { node } => client::node_drain(&session()?, &node, true).await,
            NodeAction::Undrain { node } => client::node_drain(&session()?, &node, false).await,
        },
        Command::Routes => client::routes(&session()?).await,
        Command::Certs { action } => match action {
            CertsAction::Add { host, cert, key } => {
                client::certs_add(&session()?, &host, &cert, &key).await
            }
            CertsAction::Ls => client::certs_list(&session()?).await,
            CertsAction::Rm { host } => client::certs_remove(&session()?, &host).await,
        },
        Command::Events {
            app,
            project,
            limit,
        } => client::events(&session()?, app.as_deref(), project.as_deref(), limit).await,
        Command::Projects => client::projects(&session()?).await,
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "keel", &mut std::io::stdout());
            Ok(())
        }
    }
}

async fn server(args: ServerArgs) -> anyhow::Result<()> {
    // Before anything is printed: whoever reads the URL may signal at once.
    let stop = Stop::install()?;
    let store = (!args.etcd.is_empty()).then(|| StoreConfig::etcd(args.etcd.clone()));
    let mut config = ServerConfig::new(args.listen, args.data_dir.clone());
    config.store = store;
    config.node_lost_after = std::time::Duration::from_secs(args.node_lost_after);
    args.history.apply(&mut config);
    let server = Server::start(config).await?;
    println!("Keel API: http://{}", server.addr);
    print_tokens(&server);
    stop.wait().await?;
    println!("Stopping: finishing requests in flight");
    server.shutdown().await
}

/// Where the tokens are and how to use them. Never the tokens: standard
/// output ends up in logs and terminals' scrollback.
fn print_tokens(server: &Server) {
    let url = format!("http://{}", server.addr);
    let admin = server.admin_token_file.display();
    let join = server.join_token_file.display();
    let made = |new: bool| if new { "made now, in" } else { "in" };
    println!(
        "Admin token: {} {admin} (mode 0600)",
        made(server.new_admin_token.is_some())
    );
    println!(
        "Join token for agents: {} {join} (mode 0600)",
        made(server.new_join_token.is_some())
    );
    println!("Log in: keel login {url} --token-file {admin}");
    println!("Add a node: keel agent --controller {url} --join-token-file {join}");
    println!("Console: {url}/ (sign in with the admin token from {admin})");
}

/// SIGTERM or Ctrl-C, watched from the moment it is installed.
#[derive(Debug)]
struct Stop {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Stop {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot watch Ctrl-C")?,
        })
    }

    async fn wait(mut self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        Ok(())
    }
}
