//! `keel`: one binary for every role of a Keel cloud.
//!
//! Today it has the controller (`keel server`); the agent, the router,
//! `keel up` and the client verbs join it with their issues.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keel_controller::{Server, ServerConfig};
use keel_store::StoreConfig;

#[derive(Debug, Parser)]
#[command(
    name = "keel",
    version,
    about = "Keel: a self-hosted container cloud in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller: the REST API over the cluster store.
    #[command(
        after_help = "Examples:\n  keel server\n  keel server --listen 0.0.0.0:7070 --data-dir /var/lib/keel\n  keel server --etcd http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379"
    )]
    Server(ServerArgs),
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
}

/// `/var/lib/keel` for root (a service), `~/.local/share/keel` otherwise.
fn default_data_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    match home {
        Some(home) if home != std::path::Path::new("/root") => home.join(".local/share/keel"),
        _ => PathBuf::from("/var/lib/keel"),
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
    match cli.command {
        Command::Server(args) => server(args).await,
    }
}

async fn server(args: ServerArgs) -> anyhow::Result<()> {
    let store = (!args.etcd.is_empty()).then(|| StoreConfig::etcd(args.etcd.clone()));
    let mut config = ServerConfig::new(args.listen, args.data_dir.clone());
    config.store = store;
    config.node_lost_after = std::time::Duration::from_secs(args.node_lost_after);
    let server = Server::start(config).await?;
    println!("Keel API: http://{}", server.addr);
    match &server.new_admin_token {
        Some(new) => {
            println!("Admin token (shown once, also in {}):", new.file.display());
            println!("  {}", new.token);
        }
        None => println!("Admin token: in {}", server.admin_token_file.display()),
    }
    match &server.new_join_token {
        Some(new) => println!(
            "Join token for agents (also in {}):\n  {}",
            new.file.display(),
            new.token
        ),
        None => println!("Join token: in {}", server.join_token_file.display()),
    }
    println!(
        "Console: http://{}/ (sign in with the admin token)",
        server.addr
    );
    wait_for_signal().await?;
    println!("Stopping: finishing requests in flight");
    server.shutdown().await
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot watch Ctrl-C")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
