//! What a node says about itself when it joins: flags, or a strict TOML
//! file, with capacity detected from the machine unless given.
//!
//! `keel agent` and `keel up` both build a [`NodeRegistration`] here.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use keel_agent::{NodeCapacity, NodeRegistration};
use serde::Deserialize;

/// `keel agent`'s flags. Every one may instead come from `--config FILE`;
/// a flag given on the command line wins over the file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentArgs {
    /// A TOML file with any of the keys below (controller, join_token,
    /// name, region, zone, labels, roles, advertise_addr, cpu_millis,
    /// memory_mb, max_instances, health_addr). Unknown keys are errors.
    #[arg(long, env = "KEEL_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The controller's API URL.
    #[arg(long, env = "KEEL_CONTROLLER")]
    pub controller: Option<String>,
    /// A file holding the cluster's join token (`join.token` in the
    /// controller's data directory). Wins over the other ways to give it.
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
    /// The join token itself. A command line is visible to other users of
    /// the machine: prefer --join-token-file or KEEL_JOIN_TOKEN.
    #[arg(long, env = "KEEL_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// The node's name, a DNS label unique in the cluster (default: the
    /// host name).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub region: Option<String>,
    #[arg(long)]
    pub zone: Option<String>,
    /// `key=value` pairs, comma-separated, for placement constraints.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// `worker` (runs instances) and/or `router` (serves ingress).
    #[arg(long, value_delimiter = ',')]
    pub roles: Vec<String>,
    /// The IP address other nodes and routers reach this node's published
    /// ports on (default: 127.0.0.1, which serves only this machine).
    #[arg(long)]
    pub advertise_addr: Option<IpAddr>,
    /// Offered CPU in thousandths of a core (default: every core).
    #[arg(long)]
    pub cpu_millis: Option<u64>,
    /// Offered memory in MiB (default: the machine's memory less 10%).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// At most this many instances (default: 100).
    #[arg(long)]
    pub max_instances: Option<u32>,
    /// Serve `GET /healthz` (200 while the agent's loops run) and
    /// `GET /readyz` (200 when registered, streaming its desired instances
    /// and Docker answers; 503 with the reason otherwise) on this
    /// address:port, for a supervisor. Off unless given.
    #[arg(long)]
    pub health_addr: Option<SocketAddr>,
}

/// The file form of [`AgentArgs`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    controller: Option<String>,
    join_token: Option<String>,
    name: Option<String>,
    region: Option<String>,
    zone: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    roles: Vec<String>,
    advertise_addr: Option<IpAddr>,
    cpu_millis: Option<u64>,
    memory_mb: Option<u64>,
    max_instances: Option<u32>,
    health_addr: Option<SocketAddr>,
}

/// A node's settings, resolved and checked.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub controller: String,
    pub join_token: String,
    pub registration: NodeRegistration,
    /// Where the agent answers health checks, if anywhere.
    pub health_addr: Option<SocketAddr>,
}

pub const ROLES: &[&str] = &["worker", "router"];

impl AgentArgs {
    pub fn resolve(self) -> anyhow::Result<NodeSettings> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => AgentFile::default(),
        };
        let origin = |flag: &str| match &self.config {
            Some(path) => format!(
                "--{flag} (or `{}` in {})",
                flag.replace('-', "_"),
                path.display()
            ),
            None => format!("--{flag}"),
        };
        let controller = self.controller.or(file.controller).with_context(|| {
            format!("{} is required: the controller's URL", origin("controller"))
        })?;
        if !(controller.starts_with("http://") || controller.starts_with("https://")) {
            bail!(
                "{}: {controller:?} must start with http:// or https://",
                origin("controller")
            );
        }
        let join_token = match &self.join_token_file {
            Some(path) => crate::token_from(Some(path), None, "--join-token-file", "KEEL_JOIN_TOKEN")?,
            None => self.join_token.or(file.join_token).with_context(|| {
                format!(
                    "{} is required: the cluster's join token (or --join-token-file FILE, or KEEL_JOIN_TOKEN)",
                    origin("join-token")
                )
            })?,
        };
        let name = match self.name.or(file.name) {
            Some(name) => name,
            None => host_name()?,
        };
        if !keel_manifest::is_dns_label(&name) {
            bail!(
                "{}: {name:?} is not a DNS label (lowercase letters, digits and '-', starting with a letter)",
                origin("name")
            );
        }
        let mut labels = file.labels;
        for pair in &self.labels {
            let Some((key, value)) = pair.split_once('=') else {
                bail!("--labels: {pair:?} is not key=value");
            };
            if key.is_empty() {
                bail!("--labels: {pair:?} has an empty key");
            }
            labels.insert(key.to_owned(), value.to_owned());
        }
        let mut roles = if self.roles.is_empty() {
            file.roles
        } else {
            self.roles
        };
        if roles.is_empty() {
            roles.push("worker".into());
        }
        for role in &roles {
            if !ROLES.contains(&role.as_str()) {
                bail!(
                    "{}: unknown role {role:?} (known: {})",
                    origin("roles"),
                    ROLES.join(", ")
                );
            }
        }
        roles.sort();
        roles.dedup();
        let detected = detect_capacity();
        let capacity = NodeCapacity {
            cpu_millis: self
                .cpu_millis
                .or(file.cpu_millis)
                .unwrap_or(detected.cpu_millis),
            memory_mb: self
                .memory_mb
                .or(file.memory_mb)
                .unwrap_or(detected.memory_mb),
            max_instances: self
                .max_instances
                .or(file.max_instances)
                .unwrap_or(detected.max_instances),
        };
        if capacity.cpu_millis == 0 || capacity.memory_mb == 0 || capacity.max_instances == 0 {
            bail!(
                "capacity must be more than 0 (cpu_millis {}, memory_mb {}, max_instances {})",
                capacity.cpu_millis,
                capacity.memory_mb,
                capacity.max_instances
            );
        }
        let address = self
            .advertise_addr
            .or(file.advertise_addr)
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        Ok(NodeSettings {
            controller: controller.trim_end_matches('/').to_owned(),
            join_token: join_token.trim().to_owned(),
            health_addr: self.health_addr.or(file.health_addr),
            registration: NodeRegistration {
                name,
                region: self
                    .region
                    .or(file.region)
                    .unwrap_or_else(|| "local".into()),
                zone: self.zone.or(file.zone).unwrap_or_else(|| "local-a".into()),
                labels,
                roles,
                capacity,
                address: address.to_string(),
            },
        })
    }
}

fn read_file(path: &Path) -> anyhow::Result<AgentFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    crate::config::parse_toml(path, &text)
}

fn host_name() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read the host name: give the node a --name")?;
    let name = name
        .trim()
        .split('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if keel_manifest::is_dns_label(&name) {
        Ok(name)
    } else {
        bail!("the host name {name:?} is not a DNS label: give the node a --name")
    }
}

/// Every core; the machine's memory less a tenth for the system.
pub fn detect_capacity() -> NodeCapacity {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let memory_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .unwrap_or(1024 * 1024);
    NodeCapacity {
        cpu_millis: cores * 1000,
        memory_mb: memory_kb / 1024 * 9 / 10,
        max_instances: 100,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> AgentArgs {
        AgentArgs {
            controller: Some("http://127.0.0.1:7070".into()),
            join_token: Some("t".into()),
            name: Some("node-1".into()),
            ..AgentArgs::default()
        }
    }

    #[test]
    fn flags_resolve_with_detected_capacity_and_defaults() {
        let mut args = args();
        args.labels = vec!["disk=ssd".into(), "gpu=none".into()];
        args.roles = vec!["router".into(), "worker".into(), "worker".into()];
        let settings = args.resolve().expect("valid");
        let node = settings.registration;
        assert_eq!(node.roles, ["router", "worker"]);
        assert_eq!(node.labels["disk"], "ssd");
        assert_eq!(node.address, "127.0.0.1");
        assert!(node.capacity.cpu_millis >= 1000);
        assert!(node.capacity.memory_mb > 0);
    }

    #[test]
    fn wrong_values_are_errors_that_name_the_flag() {
        type Change = Box<dyn Fn(&mut AgentArgs)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|a| a.controller = None),
                "--controller is required",
            ),
            (
                Box::new(|a| a.controller = Some("127.0.0.1:7070".into())),
                "must start with http://",
            ),
            (
                Box::new(|a| a.join_token = None),
                "--join-token is required",
            ),
            (
                Box::new(|a| a.name = Some("Node_1".into())),
                "--name: \"Node_1\" is not a DNS label",
            ),
            (
                Box::new(|a| a.labels = vec!["disk".into()]),
                "--labels: \"disk\" is not key=value",
            ),
            (
                Box::new(|a| a.roles = vec!["db".into()]),
                "unknown role \"db\"",
            ),
            (
                Box::new(|a| a.memory_mb = Some(0)),
                "capacity must be more than 0",
            ),
        ];
        for (change, expected) in cases {
            let mut args = args();
            change(&mut args);
            let error = args.resolve().expect_err(expected).to_string();
            assert!(
                error.contains(expected),
                "{error} should contain {expected}"
            );
        }
    }

    #[test]
    fn a_config_file_is_strict_and_flags_win_over_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "controller = \"http://10.0.0.1:7070\"\njoin_token = \"j\"\nname = \"n1\"\nzone = \"b\"\nroles = [\"worker\", \"router\"]\nadvertise_addr = \"127.0.0.2\"\n[labels]\ndisk = \"ssd\"\n",
        )
        .expect("write");
        let args = AgentArgs {
            config: Some(path.clone()),
            zone: Some("c".into()),
            ..AgentArgs::default()
        };
        let settings = args.resolve().expect("valid");
        assert_eq!(settings.controller, "http://10.0.0.1:7070");
        assert_eq!(settings.health_addr, None, "off unless given");
        assert_eq!(settings.registration.zone, "c");
        assert_eq!(settings.registration.address, "127.0.0.2");
        assert_eq!(settings.registration.labels["disk"], "ssd");

        std::fs::write(&path, "controller = \"http://x\"\njoin_token = \"j\"\nname = \"n1\"\nhealth_addr = \"127.0.0.1:7071\"\n")
            .expect("write");
        let from_file = AgentArgs {
            config: Some(path.clone()),
            ..AgentArgs::default()
        };
        let settings = from_file.clone().resolve().expect("valid");
        assert_eq!(
            settings.health_addr,
            Some("127.0.0.1:7071".parse().expect("address"))
        );
        let flag_wins = AgentArgs {
            health_addr: Some("127.0.0.1:7072".parse().expect("address")),
            ..from_file
        };
        assert_eq!(
            flag_wins.resolve().expect("valid").health_addr,
            Some("127.0.0.1:7072".parse().expect("address"))
        );

        std::fs::write(
            &path,
            "controller = \"http://x\"\nhealth_addr = \"localhost\"\n",
        )
        .expect("write");
        let error = AgentArgs {
            config: Some(path.clone()),
            ..AgentArgs::default()
        }
        .resolve()
        .expect_err("not an address")
        .to_string();
        assert!(
            error.contains("agent.toml") && error.contains("health_addr"),
            "{error}"
        );

        std::fs::write(
            &path,
            "controller = \"http://x\"\nadvertise = \"127.0.0.2\"\n",
        )
        .expect("write");
        let args = AgentArgs {
            config: Some(path),
            ..AgentArgs::default()
        };
        let error = args.resolve().expect_err("unknown key").to_string();
        assert!(
            error.contains("agent.toml") && error.contains("advertise"),
            "{error}"
        );
    }
}
