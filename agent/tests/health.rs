//! The agent's health listener, asked over HTTP as a supervisor asks it:
//! `/readyz` follows the controller (not registered, connected, stream
//! gone) and the container engine, while `/healthz` stays 200 throughout,
//! because none of that is cured by restarting the agent.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keel_agent::eventually;
use keel_agent::testing::{ClusterConfig, NodeSpec, SimCluster};
use keel_agent::{
    Agent, AgentConfig, NodeCapacity, NodeRegistration, Runtime, RuntimeError, RuntimeState,
};
use keel_protocol::{InstanceRef, InstanceSpec};

use support::CONVERGE;

/// `GET http://addr{path}`: the status and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Waits until `path` answers `status`, and returns its body.
async fn answers(addr: SocketAddr, path: &str, status: u16) -> String {
    eventually!(CONVERGE, {
        let (got, body) = get(addr, path).await;
        if got == status {
            Ok(body)
        } else {
            Err(format!("GET {path}: {got} {body:?}, waiting for {status}"))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_controller_and_the_engine_while_healthz_stays_ok() {
    support::logs();
    let mut cluster = SimCluster::start_with(ClusterConfig::default(), &[])
        .await
        .unwrap();
    // The controller is down before the agent starts: nothing to register
    // with.
    cluster.stop_controller().await.unwrap();
    cluster
        .spawn_node(NodeSpec::new("node-1", "zone-a"))
        .await
        .unwrap();
    let agent = cluster.agent("node-1").unwrap();
    let addr = agent
        .serve_health(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();

    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not registered with the controller at http://"),
        "{body}"
    );
    let (status, body) = get(addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    cluster.start_controller().await.unwrap();
    assert_eq!(answers(addr, "/readyz", 200).await, "ok\n");

    // The engine stops answering: not ready, yet alive.
    let runtime = cluster.runtime("node-1").unwrap().clone();
    runtime.set_engine_answering(false);
    let body = answers(addr, "/readyz", 503).await;
    assert!(
        body.contains("the container engine does not answer"),
        "{body}"
    );
    assert_eq!(get(addr, "/healthz").await.0, 200);
    runtime.set_engine_answering(true);
    answers(addr, "/readyz", 200).await;

    // The controller goes: the stream is gone, the agent lives on.
    cluster.stop_controller().await.unwrap();
    let body = answers(addr, "/readyz", 503).await;
    assert!(body.contains("desired-instances stream"), "{body}");
    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));

    // Back again.
    cluster.start_controller().await.unwrap();
    answers(addr, "/readyz", 200).await;

    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 404, "{body}");
    cluster.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_stops_answering_health_checks() {
    support::logs();
    let mut cluster = SimCluster::start(&[NodeSpec::new("node-1", "zone-a")])
        .await
        .unwrap();
    let addr = cluster
        .agent("node-1")
        .unwrap()
        .serve_health(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    answers(addr, "/readyz", 200).await;
    cluster.kill_node("node-1").unwrap();
    eventually!(CONVERGE, {
        match reqwest::Client::new()
            .get(format!("http://{addr}/healthz"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
        {
            Err(error) if error.is_connect() => Ok(()),
            other => Err(format!("still answering: {other:?}")),
        }
    });
    cluster.shutdown().await.unwrap();
}

/// On Docker, readiness asks the real engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_docker_readyz_is_ok_once_connected() {
    support::logs();
    let node = format!("nh{}", std::process::id());
    let cluster = support::one_docker_node(&node).await;
    let addr = cluster
        .agent(&node)
        .unwrap()
        .serve_health(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    assert_eq!(answers(addr, "/readyz", 200).await, "ok\n");
    cluster.shutdown().await.unwrap();
}

/// A runtime whose `list` answers (mode 0), hangs, or panics, as the test
/// says.
#[derive(Debug, Default)]
struct Faulty {
    mode: AtomicU8,
}

const HANG: u8 = 1;
const PANIC: u8 = 2;

#[async_trait]
impl Runtime for Faulty {
    async fn start(&self, _spec: &InstanceSpec) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn stop(&self, _instance: &InstanceRef) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn list(&self) -> Result<Vec<(InstanceRef, RuntimeState)>, RuntimeError> {
        match self.mode.load(Ordering::SeqCst) {
            HANG => std::future::pending().await,
            PANIC => panic!("the runtime panicked (on purpose)"),
            _ => Ok(Vec::new()),
        }
    }
}

/// An agent on `runtime` with no controller to reach (liveness does not
/// depend on one), resyncing every 100 ms, and its health listener.
async fn lonely_agent(name: &str, runtime: Arc<Faulty>) -> (keel_agent::AgentHandle, SocketAddr) {
    let registration = NodeRegistration {
        name: name.into(),
        region: "local".into(),
        zone: "a".into(),
        labels: BTreeMap::new(),
        roles: vec!["worker".into()],
        capacity: NodeCapacity {
            cpu_millis: 1000,
            memory_mb: 1024,
            max_instances: 10,
        },
        address: "127.0.0.1".into(),
    };
    let mut config = AgentConfig::new("http://127.0.0.1:9", "token", registration);
    config.resync_interval = Duration::from_millis(100);
    let agent = Agent::new(config, runtime).spawn().unwrap();
    let addr = agent
        .serve_health(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    (agent, addr)
}

/// Liveness is about the agent itself: a reconciler stuck in a runtime
/// call, or a loop that died, fails `/healthz` (a restart cures those).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_when_the_reconciler_is_stuck_or_a_loop_died() {
    support::logs();
    let stuck = Arc::new(Faulty::default());
    let (agent, addr) = lonely_agent("node-1", stuck.clone()).await;
    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    stuck.mode.store(HANG, Ordering::SeqCst);
    let body = answers(addr, "/healthz", 503).await;
    assert!(
        body.starts_with("the reconciler has not finished a pass for"),
        "{body}"
    );
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");

    let panicking = Arc::new(Faulty::default());
    panicking.mode.store(PANIC, Ordering::SeqCst);
    let (agent_2, addr_2) = lonely_agent("node-2", panicking).await;
    // (Printing the panic, with its backtrace, may take longer than the
    // reconciler's 300 ms allowance: "has not finished a pass" may come
    // first.)
    eventually!(CONVERGE, {
        match get(addr_2, "/healthz").await {
            (503, body) if body == "1 of the agent's 4 loops ended\n" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    agent.kill();
    agent_2.kill();
}
