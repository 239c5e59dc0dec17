//! Test harnesses shared by Keel's crates: real etcd servers and clusters on
//! loopback, each in its own temporary directory.
//!
//! The etcd backend is only trustworthy if it is tested against etcd itself
//! (its errors, its failover, its watch protocol), so these start the real
//! binary: `$KEEL_ETCD_BIN`, or `etcd` on the `PATH`.
//!
//! Everything listens on 127.0.0.1 only. A server is killed (SIGKILL) and its
//! directory removed when it is dropped; only processes started here are ever
//! signalled, by their own handle.
//!
//! [`testserver::ensure_image`] builds the `keel-testserver` image that
//! Docker tests, benchmarks and the README tour run.
//!
//! Architecture Invariant: this crate depends on no Keel crate, so any of
//! them can use it in its tests. (It builds `keel-testserver` by running
//! cargo, not by linking it.)

#![forbid(unsafe_code)]

pub mod testserver;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a new server (or every member of a new cluster) may take to
/// become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Starting again on fresh ports covers the race in [`free_port`].
const START_ATTEMPTS: usize = 3;
const HEALTH_POLL: Duration = Duration::from_millis(50);
/// What etcd logs when a port it was given is taken.
const ADDRESS_IN_USE: &str = "address already in use";
/// Lines of the etcd log quoted in an error.
const LOG_TAIL_LINES: usize = 30;

/// A TCP port on 127.0.0.1 that was free a moment ago. Racy by nature:
/// another process may take it before it is used.
pub fn free_port() -> u16 {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|err| panic!("cannot bind a port on 127.0.0.1: {err}"))
}

/// Sends `tracing` output to the test's captured output, filtered by
/// `RUST_LOG` (default: warnings). Call it first in a test; repeated calls
/// are harmless.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Fails only when a subscriber is already installed, which is fine.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The Debian package of each tool the tests run (scripts/setup.sh installs
/// them all).
const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("chromedriver", "chromium-driver"),
    ("curl", "curl"),
    ("docker", "docker.io"),
    ("etcd", "etcd-server"),
    ("haproxy", "haproxy"),
    ("kill", "procps"),
    ("nginx", "nginx"),
    ("openssl", "openssl"),
    ("timeout", "coreutils"),
    ("wrk", "wrk"),
];

/// A tool a test runs, found on the `PATH`. When it is missing, the test
/// stops with one line that names the Debian package to install, rather
/// than a "No such file or directory" from the first spawn.
pub fn tool(name: &str) -> PathBuf {
    let package = TOOL_PACKAGES.iter().find(|(tool, _)| *tool == name).map_or(
        "(unknown: add it to keel_testing's TOOL_PACKAGES)",
        |(_, package)| *package,
    );
    find_on_path(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed: install the Debian package {package} \
             (bash scripts/setup.sh test installs everything the tests use)"
        )
    })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The etcd binary to run.
fn etcd_binary() -> PathBuf {
    std::env::var_os("KEEL_ETCD_BIN").map_or_else(|| tool("etcd"), PathBuf::from)
}

/// A token unique to this process and call, so members of different test
/// clusters never mistake each other for peers.
fn cluster_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "keel-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One member's name and ports, chosen before any member starts because
/// each must know all the others.
#[derive(Debug, Clone)]
struct MemberSpec {
    name: String,
    client_port: u16,
    peer_port: u16,
}

impl MemberSpec {
    fn new(index: usize) -> Self {
        Self {
            name: format!("member{index}"),
            client_port: free_port(),
            peer_port: free_port(),
        }
    }

    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// One etcd process with its data directory and log.
#[derive(Debug)]
pub struct EtcdServer {
    name: String,
    client_port: u16,
    /// `None` once killed.
    child: Option<Child>,
    log: PathBuf,
    /// Removed on drop, after the process is gone.
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts a single-member cluster and waits until it serves requests.
    pub async fn start() -> anyhow::Result<EtcdServer> {
        let mut cluster = EtcdCluster::start(1).await?;
        cluster
            .members
            .pop()
            .context("a one-member cluster has no member")
    }

    /// The client URL, such as `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The member name given to etcd (`member0`, `member1`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Kills the process now (SIGKILL, no chance to clean up, as in a crash)
    /// and waits for it to exit. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only if the process already exited, which is what we want.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// The value of one of etcd's Prometheus metrics on this member (from
    /// `GET /metrics`), summed over its label sets; 0 if it has none. For
    /// example `etcd_debugging_mvcc_watcher_total` counts the watches this
    /// member serves.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let body = http_get(self.client_port, "/metrics").await?;
        let mut total = 0.0;
        for line in body.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            // The name must end here: followed by labels or by the value.
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                continue;
            }
            let value = rest.rsplit(' ').next().unwrap_or_default();
            total += value
                .parse::<f64>()
                .with_context(|| format!("metric line {line:?} from {}", self.endpoint()))?;
        }
        Ok(total)
    }

    /// The last lines etcd logged, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    fn spawn(spec: &MemberSpec, initial_cluster: &str, token: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("keel-etcd-{}-", spec.name))
            .tempdir()
            .context("create a temporary directory for etcd")?;
        let log = dir.path().join("etcd.log");
        let log_file =
            File::create(&log).with_context(|| format!("create the etcd log {}", log.display()))?;
        let stderr = log_file
            .try_clone()
            .context("duplicate the etcd log handle")?;
        let binary = etcd_binary();
        let child = Command::new(&binary)
            .arg("--name")
            .arg(&spec.name)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(spec.client_url())
            .arg("--advertise-client-urls")
            .arg(spec.client_url())
            .arg("--listen-peer-urls")
            .arg(spec.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(spec.peer_url())
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(token)
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            // ETCD_* variables from the caller's environment would add
            // settings the test did not ask for (or clash with the flags).
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {} (set KEEL_ETCD_BIN to the etcd binary)",
                    binary.display()
                )
            })?;
        Ok(Self {
            name: spec.name.clone(),
            client_port: spec.client_port,
            child: Some(child),
            log,
            dir,
        })
    }

    /// Fails if the process exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if let Some(status) = child.try_wait().context("check the etcd process")? {
            bail!(
                "etcd {} exited with {status} before becoming healthy; log tail:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Several etcd members forming one cluster.
#[derive(Debug)]
pub struct EtcdCluster {
    pub members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one is healthy.
    pub async fn start(n: usize) -> anyhow::Result<EtcdCluster> {
        if n == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        let mut attempt = 1;
        loop {
            match Self::try_start(n).await {
                Ok(cluster) => return Ok(cluster),
                // A port taken between `free_port` and etcd's bind shows as an
                // early exit; fresh ports fix that.
                Err(err)
                    if attempt < START_ATTEMPTS && format!("{err:#}").contains(ADDRESS_IN_USE) =>
                {
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn try_start(n: usize) -> anyhow::Result<EtcdCluster> {
        let specs: Vec<MemberSpec> = (0..n).map(MemberSpec::new).collect();
        let initial_cluster = specs
            .iter()
            .map(|spec| format!("{}={}", spec.name, spec.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let token = cluster_token();
        let mut members = Vec::with_capacity(n);
        for spec in &specs {
            members.push(EtcdServer::spawn(spec, &initial_cluster, &token)?);
        }
        wait_healthy(&mut members).await?;
        Ok(EtcdCluster { members })
    }

    /// The client URLs of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }
}

/// Waits until every member answers `GET /health` with `"health":"true"`,
/// which etcd only does once the cluster has a leader and can serve a
/// linearizable read. Members start in parallel and none is healthy before a
/// quorum is up, so an early exit of any member is checked all along.
async fn wait_healthy(members: &mut [EtcdServer]) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut healthy = vec![false; members.len()];
    let mut last = String::from("no answer yet");
    loop {
        for (member, healthy) in members.iter_mut().zip(&mut healthy) {
            member.check_running()?;
            if !*healthy {
                match health(member.client_port).await {
                    Ok(body) if body.contains(r#""health":"true""#) => *healthy = true,
                    Ok(body) => last = format!("{}: {body}", member.name),
                    Err(err) => last = format!("{}: {err:#}", member.name),
                }
            }
        }
        if healthy.iter().all(|h| *h) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let tails: Vec<String> = members
                .iter()
                .map(|m| format!("--- {} ({}):\n{}", m.name, m.endpoint(), m.log_tail()))
                .collect();
            bail!(
                "etcd not healthy within {} s (last answer from {last}); log tails:\n{}",
                START_TIMEOUT.as_secs(),
                tails.join("\n")
            );
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// One `GET /health` on the client port; the response body.
async fn health(port: u16) -> anyhow::Result<String> {
    http_get(port, "/health").await
}

/// One HTTP/1.0 GET on a client port (etcd serves HTTP and gRPC on the same
/// port); the response body. HTTP/1.0 so the body is never chunked.
async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .with_context(|| format!("GET {path} on port {port} timed out"))??;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok(body.trim().to_owned())
}

/// The last [`LOG_TAIL_LINES`] lines of a log file (reads at most its last
/// 64 KiB).
fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_can_be_bound() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).expect("bind the port");
    }

    #[tokio::test]
    async fn a_killed_server_stops_answering() {
        let mut server = EtcdServer::start().await.expect("start etcd");
        let port = server.client_port;
        assert!(health(port).await.expect("health").contains("true"));
        assert!(server.is_running());
        server.kill();
        assert!(!server.is_running());
        assert!(
            health(port).await.is_err(),
            "nothing listens after the kill"
        );
    }

    #[tokio::test]
    async fn metrics_are_read_by_name() {
        let server = EtcdServer::start().await.expect("start etcd");
        assert_eq!(
            server
                .metric("etcd_server_has_leader")
                .await
                .expect("metric"),
            1.0
        );
        assert_eq!(
            server.metric("etcd_no_such_metric").await.expect("metric"),
            0.0
        );
    }

    #[tokio::test]
    async fn dropping_a_server_removes_its_directory() {
        let server = EtcdServer::start().await.expect("start etcd");
        let dir = server.data_dir();
        assert!(dir.exists());
        drop(server);
        assert!(!dir.exists());
    }
}
