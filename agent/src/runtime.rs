//! The side effects of running instances on a node, behind one trait.
//!
//! The agent decides *what* should run (the controller's desired set, the
//! restart policy); a [`Runtime`] knows *how*: pull the image, create and
//! start the container with its labels, publish its ports, probe its
//! health, stop and remove it, and say what exists. The simulated runtime
//! ([`crate::sim::SimRuntime`]) implements it in memory; a Docker runtime
//! implements it over the Engine API (containers labelled with the
//! instance's project, app, id and revision, so that `list` finds them
//! again after the agent restarts).
//!
//! Every method is idempotent and level-triggered, so the agent can call
//! them again after any failure or restart without keeping a journal.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;
use keel_protocol::{InstanceRef, InstanceSpec, InstanceState};

/// The cause of a runtime failure, as the engine gave it.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What a runtime knows of one instance, now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeState {
    /// The revision of the app it was started from (a container label for
    /// Docker), so a changed spec is noticed.
    pub revision: u64,
    /// What it was started from ([`InstanceSpec::container_version`]): a
    /// spec with another version replaces it; a new revision with the
    /// same version (a scale) keeps it running.
    pub spec_version: String,
    /// `Pulling`, `Starting`, `Running`, `Exited` or `Failed`.
    pub state: InstanceState,
    /// Passing its readiness check (or running, when the app has none). The
    /// runtime probes: it has the spec and the network namespace.
    pub ready: bool,
    /// Set once it exited.
    pub exit_code: Option<i32>,
    /// Why it exited or failed, in words (`"exited with status 3"`,
    /// `"unhealthy: 3 failed probes"`).
    pub reason: Option<String>,
    /// Port name to the `address:port` it is published on.
    pub ports: BTreeMap<String, String>,
    /// CPU in use, in thousandths of a core, when the runtime measures it
    /// (sampled: it may lag the rest of the state by a few seconds).
    pub cpu_millis: Option<u64>,
    /// Memory in use, in bytes (without the page cache), when measured.
    pub memory_bytes: Option<u64>,
}

/// An instance's log, one line per item (without its newline).
pub type LogStream = Pin<Box<dyn Stream<Item = Result<String, RuntimeError>> + Send>>;

/// Runs instances on one node.
///
/// Contract, for every implementation:
/// - [`Runtime::start`] makes an instance run. An instance the runtime
///   does not have is created (its image pulled first); one that exists and
///   has exited or failed is started again; one that is starting or running
///   is left alone. It returns once the instance is created and started,
///   not once it is ready: readiness shows in [`Runtime::list`].
/// - [`Runtime::stop`] stops and removes an instance; stopping one the
///   runtime does not have succeeds.
/// - [`Runtime::list`] is every instance the runtime has (including exited
///   ones and ones the agent did not start in this life), as it is now.
/// - An instance whose liveness check fails is stopped by the runtime and
///   listed as `Exited` with the reason; the agent's restart policy decides
///   what happens next. The runtime never restarts anything on its own.
#[async_trait]
pub trait Runtime: Send + Sync + std::fmt::Debug + 'static {
    /// Makes the instance run (see the trait's contract).
    async fn start(&self, spec: &InstanceSpec) -> Result<(), RuntimeError>;

    /// Stops and removes the instance, if the runtime has it.
    async fn stop(&self, instance: &InstanceRef) -> Result<(), RuntimeError>;

    /// Every instance the runtime has, with its state.
    async fn list(&self) -> Result<Vec<(InstanceRef, RuntimeState)>, RuntimeError>;

    /// Resolves when the state [`Runtime::list`] shows may have changed on
    /// its own (an instance became ready, or exited): the engine's event
    /// stream for Docker, the next timed transition for the simulation.
    /// Cancel-safe. The default never resolves; the agent then notices such
    /// changes at its resync interval.
    async fn changed(&self) {
        std::future::pending::<()>().await;
    }

    /// Whether the engine answers now (`docker ping` for Docker): the
    /// agent's readiness check asks it. The default always answers.
    async fn ping(&self) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// The instance's log: the last `tail` lines (all with `None`), then,
    /// with `follow`, new lines as they are written until the stream is
    /// dropped. The default has no logs to give.
    async fn logs(
        &self,
        instance: &InstanceRef,
        tail: Option<u32>,
        follow: bool,
    ) -> Result<LogStream, RuntimeError> {
        let _ = (tail, follow);
        Err(RuntimeError::Logs {
            instance: display_ref(instance),
            source: "this runtime keeps no logs".into(),
        })
    }
}

/// A runtime operation that failed, with the engine's cause.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot pull image {image}")]
    Pull {
        image: String,
        #[source]
        source: BoxError,
    },
    #[error("cannot start instance {instance}")]
    Start {
        instance: String,
        #[source]
        source: BoxError,
    },
    #[error("cannot stop instance {instance}")]
    Stop {
        instance: String,
        #[source]
        source: BoxError,
    },
    #[error("cannot list the node's instances")]
    List {
        #[source]
        source: BoxError,
    },
    #[error("the container engine does not answer")]
    Engine {
        #[source]
        source: BoxError,
    },
    #[error("cannot read the logs of instance {instance}")]
    Logs {
        instance: String,
        #[source]
        source: BoxError,
    },
}

/// `project/app/id`: how errors and logs name an instance.
pub fn display_ref(instance: &InstanceRef) -> String {
    format!("{}/{}/{}", instance.project, instance.app, instance.id)
}

/// An error with each of its causes, `": "`-separated: the reason an
/// instance failed, as the user reads it in the instance view.
pub fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
