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
