//! A standalone router over a route table file, for benchmarks and manual
//! tests until `keel router` wires the same library.
//!
//! ```text
//! cargo run --release -p keel-router --example router -- \
//!     --table routes.json --http 127.0.0.1:8080 --https 127.0.0.1:8443 --workers 1
//! ```
//! Stops gracefully on SIGTERM or Ctrl-C. Logs go to stderr (`RUST_LOG`,
//! default `warn`; `keel_router::access=info` for the access log).

use std::net::SocketAddr;

use anyhow::{Context, bail};
use keel_router::{Router, RouterConfig, TableSource};

// As in the `keel` binary: the allocator is part of what is measured.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = RouterConfig {
        http_addr: None,
        https_addr: None,
        ..RouterConfig::default()
    };
    let mut table = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        let addr = |v: String| -> anyhow::Result<SocketAddr> {
            v.parse()
                .with_context(|| format!("{v} is not an address:port"))
        };
        match flag.as_str() {
            "--table" => table = Some(value()?),
            "--http" => config.http_addr = Some(addr(value()?)?),
            "--https" => config.https_addr = Some(addr(value()?)?),
            "--metrics" => config.metrics_addr = Some(addr(value()?)?),
            "--workers" => config.worker_threads = value()?.parse().context("--workers")?,
            other => {
                bail!("unknown flag {other}; flags: --table --http --https --metrics --workers")
            }
        }
    }
    let Some(table) = table else {
        bail!("--table FILE (a RouteTable JSON file) is required");
    };
    config.source = TableSource::file(table);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let handle = Router::start(config)?;
        let addresses = handle.addresses();
        eprintln!("router listening: {addresses:?}");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        handle.shutdown().await;
        Ok(())
    })
}
