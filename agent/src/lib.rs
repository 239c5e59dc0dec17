//! Keel's node agent: it registers its node with the controller, keeps it
//! alive with heartbeats, holds the node's desired-instances stream, drives
//! a [`Runtime`] toward that desired set, and reports what actually runs.
//!
//! - [`runtime`]: the [`Runtime`] trait, the side effects of running
//!   instances.
//! - [`docker`]: [`DockerRuntime`], the real one: containers in the node's
//!   Docker Engine, health probes, stats and logs.
//! - [`sim`]: [`SimRuntime`], a deterministic in-memory runtime with
//!   failure injection, so the control plane can be tested and benchmarked
//!   with thousands of nodes in one process.
//! - [`Agent`]: the control loops (heartbeat, stream, reconciler, reporter);
//!   see `agent.rs` for how they fit together.
//! - `testing` (cargo feature `testing`): the in-process cluster harness, a
//!   real controller and simulated agents over loopback HTTP.
//!
//! ## On Docker
//!
//! A node agent process is, in essence:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use keel_agent::{Agent, AgentConfig, DockerConfig, DockerRuntime, NodeCapacity, NodeRegistration};
//! let address: std::net::IpAddr = "10.0.0.5".parse()?;
//! let runtime = DockerRuntime::connect(DockerConfig::new("node-1", address)).await?;
//! let node = NodeRegistration {
//!     name: "node-1".into(),
//!     region: "eu-1".into(),
//!     zone: "eu-1a".into(),
//!     labels: Default::default(),
//!     roles: vec!["worker".into()],
//!     capacity: NodeCapacity { cpu_millis: 4_000, memory_mb: 8_192, max_instances: 100 },
//!     address: address.to_string(),
//! };
//! let config = AgentConfig::new("http://10.0.0.1:7070", "keel-join-...", node);
//! let agent = Agent::new(config, Arc::new(runtime)).spawn()?;
//! // ... until a signal: agent.stop().await (containers keep running).
//! # Ok(()) }
//! ```
//!
//! The runtime finds its containers by the `keel.node` label alone, so
//! the agent can restart at any time and adopt what runs; see
//! [`docker`] for what an instance becomes, how health is probed, and
//! why liveness counts only after an instance was first ready.
//!
//! Architecture Invariant: the agent talks to the controller over its HTTP
//! API only. The library proper depends on `keel-protocol` and
//! `keel-manifest` and on no other Keel crate: never on `keel-controller`
//! or `keel-store`. Only the `testing` feature (the harness, for tests and
//! benchmarks) links the controller.

#![forbid(unsafe_code)]

mod agent;
mod client;
pub mod docker;
pub mod runtime;
pub mod sim;
#[cfg(feature = "testing")]
pub mod testing;

pub use agent::{Agent, AgentConfig, AgentError, AgentHandle, AgentStatus, Backoff};
pub use client::{CallError, ControllerError, NodeCapacity, NodeRegistration};
pub use docker::{DockerConfig, DockerRuntime};
pub use runtime::{LogStream, Runtime, RuntimeError, RuntimeState};
pub use sim::{SimConfig, SimRuntime};
