//! The wire types between the controller and its agents.
//!
//! An agent holds one long-lived stream per node
//! (`GET /v1/nodes/{node}/instances/watch`, newline-delimited JSON): first a
//! [`StreamMessage::Snapshot`] of every instance the node should run, with
//! the generation (the store revision) it was read at, then one
//! [`StreamMessage::Put`] or [`StreamMessage::Delete`] per change. When the
//! stream breaks, the agent connects again and gets a new snapshot: it
//! reconciles against whole snapshots, so a lost message costs nothing.
//!
//! The agent reports the actual state of every instance it runs with
//! `POST /v1/nodes/{node}/status` ([`StatusReport`]), whole each time, so
//! the controller can always replace what it knew.
//!
//! Architecture Invariant: these types depend on the manifest and nothing
//! else of Keel; both sides compile against this one definition.

#![forbid(unsafe_code)]

pub mod logs;

use std::collections::BTreeMap;

use keel_manifest::AppManifest;
use serde::{Deserialize, Serialize};

/// Which instance: unique in the cluster.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct InstanceRef {
    pub project: String,
    pub app: String,
    pub id: String,
}

/// One instance a node should run, with everything needed to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    #[serde(flatten)]
    pub instance: InstanceRef,
    pub revision: u64,
    /// The manifest of that revision (see manifest/REFERENCE.md).
    #[schema(value_type = Object)]
    pub manifest: AppManifest,
}

impl InstanceSpec {
    /// What the container is made from: a digest of the manifest's image,
    /// command, env, resources, ports and health check. Two revisions
    /// that differ only in what the container never sees (the count,
    /// routes, placement, update and restart policy) have the same
    /// version, so an agent keeps an instance running when the controller
    /// moves it to a new revision by a scale.
    pub fn container_version(&self) -> String {
        const SHAPING: [&str; 6] = ["image", "command", "env", "resources", "ports", "health"];
        let manifest = serde_json::to_value(&self.manifest).unwrap_or_default();
        let shaping: serde_json::Map<String, serde_json::Value> = SHAPING
            .iter()
            .map(|key| {
                (
                    key.to_string(),
                    manifest.get(key).cloned().unwrap_or_default(),
                )
            })
            .collect();
        let text = serde_json::Value::Object(shaping).to_string();
        // FNV-1a: stable across processes and versions, unlike std's hasher.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{hash:016x}")
    }
}

/// One line of the desired-instances stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StreamMessage {
    /// Everything the node should run, as of `generation`.
    Snapshot {
        generation: i64,
        instances: Vec<InstanceSpec>,
    },
    /// Run this instance (new, or changed).
    /// (Boxed: a manifest is large beside the other messages.)
    Put {
        generation: i64,
        instance: Box<InstanceSpec>,
    },
    /// Stop and remove this instance.
    Delete {
        generation: i64,
        instance: InstanceRef,
    },
    /// Send this instance's log: POST it, one line per line, to
    /// `/v1/nodes/{node}/logs/{request}` (the agent only makes outbound
    /// connections, so the controller asks on the stream it already holds).
    /// Not part of the desired state: it changes no generation.
    Logs(LogRequest),
}

/// A request for one instance's log, pushed to its node's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogRequest {
    /// Names the answer: `POST /v1/nodes/{node}/logs/{request}`.
    pub request: String,
    pub instance: InstanceRef,
    /// The last this many lines; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<u32>,
    /// Keep sending new lines until the controller ends the request.
    #[serde(default)]
    pub follow: bool,
}

/// The life of an instance on its node, as its agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Pulling,
    Starting,
    Running,
    Exited,
    Failed,
}

/// The actual state of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStatus {
    #[serde(flatten)]
    pub instance: InstanceRef,
    pub state: InstanceState,
    /// Passing its readiness check (or running, when it has none): routers
    /// send traffic only to ready instances.
    pub ready: bool,
    /// How often the agent restarted it.
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it failed or exited, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Port name to the host address and port it is published on.
    #[serde(default)]
    pub ports: BTreeMap<String, String>,
    /// CPU in use, in thousandths of a core, when the runtime measures it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    /// Memory in use, in bytes (without the page cache), when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// Everything a node runs, reported whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    pub instances: Vec<InstanceStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_versions_change_with_what_the_container_sees_only() {
        let spec = |yaml: &str| InstanceSpec {
            instance: InstanceRef {
                project: "p".into(),
                app: "a".into(),
                id: "1-ab".into(),
            },
            revision: 1,
            manifest: keel_manifest::parse_yaml(yaml).expect("valid manifest"),
        };
        let base = spec("name: a\nproject: p\nimage: web:1\ninstances: 2\n");
        let scaled = spec("name: a\nproject: p\nimage: web:1\ninstances: 5\n");
        let env = spec("name: a\nproject: p\nimage: web:1\nenv:\n  A: b\n");
        let image = spec("name: a\nproject: p\nimage: web:2\n");
        assert_eq!(base.container_version(), scaled.container_version());
        assert_ne!(base.container_version(), env.container_version());
        assert_ne!(base.container_version(), image.container_version());
    }

    #[test]
    fn route_entries_without_a_listen_port_read_and_write_as_before() {
        // A table from a controller that predates plain TCP routes.
        let old = r#"{"host":"a.example.com","path":"/","tls":"off","project":"p","app":"a","port":"web","protocol":"http","backends":["10.0.0.1:8080"]}"#;
        let entry: RouteEntry = serde_json::from_str(old).expect("an old entry parses");
        assert_eq!(entry.listen_port, None);
        assert_eq!(serde_json::to_string(&entry).ok().as_deref(), Some(old));

        let tcp = RouteEntry {
            host: String::new(),
            protocol: "tcp".into(),
            listen_port: Some(5432),
            ..entry
        };
        let line = serde_json::to_string(&tcp).unwrap_or_default();
        assert!(line.ends_with(r#","listen_port":5432}"#), "{line}");
        assert_eq!(serde_json::from_str::<RouteEntry>(&line).ok(), Some(tcp));
    }

    #[test]
    fn stream_messages_are_tagged_one_line_json() {
        let message = StreamMessage::Delete {
            generation: 7,
            instance: InstanceRef {
                project: "p".into(),
                app: "a".into(),
                id: "1-ab".into(),
            },
        };
        let line = serde_json::to_string(&message).unwrap_or_default();
        assert_eq!(
            line,
            r#"{"delete":{"generation":7,"instance":{"project":"p","app":"a","id":"1-ab"}}}"#
        );
        assert_eq!(
            serde_json::from_str::<StreamMessage>(&line).ok(),
            Some(message)
        );
    }
}

/// How a route treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RouteTls {
    /// The router terminates TLS and forwards plain HTTP.
    Terminate,
    /// The router forwards the TLS stream untouched, chosen by SNI.
    Passthrough,
    /// Plain HTTP.
    Off,
}

/// One route and where its traffic may go now. A route by host has a
/// `host` (and `path`, `tls`); a plain TCP route has a `listen_port`, an
/// empty `host`, path `/` and tls `off`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    /// Empty for a plain TCP route (one with `listen_port`).
    pub host: String,
    /// Matched per path segment; `/` is everything.
    pub path: String,
    pub tls: RouteTls,
    pub project: String,
    pub app: String,
    /// The app's port name the route goes to.
    pub port: String,
    /// `http` or `tcp`.
    pub protocol: String,
    /// `address:port` of every ready instance, sorted; empty: answer 503.
    pub backends: Vec<String>,
    /// Answer plain HTTP with a 308 to HTTPS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redirect_https: bool,
    /// Send `Strict-Transport-Security` on HTTPS responses.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hsts: bool,
    /// A plain TCP route: every router listens on this port and forwards
    /// each connection, bytes untouched, to one of `backends`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 65535)]
    pub listen_port: Option<u16>,
}

/// Every route of the cluster, as of `generation` (a store revision).
/// Routers swap it in whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    pub generation: i64,
    pub routes: Vec<RouteEntry>,
    /// Stored certificates for terminated routes, keys included: only
    /// routers receive them. A terminated host without one is served a
    /// self-signed certificate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<RouteCertificate>,
}

/// A certificate chain and its private key for one host name (or a
/// `*.` wildcard), PEM encoded.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteCertificate {
    pub host: String,
    /// The leaf certificate first, then its intermediates.
    pub cert_pem: String,
    pub key_pem: String,
}

// By hand, so that a logged table never shows a private key.
impl std::fmt::Debug for RouteCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteCertificate")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// What a node offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeCapacity {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub max_instances: u32,
}

/// What an agent sends to join (`POST /v1/nodes`, with the join token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// A DNS label, unique in the cluster.
    pub name: String,
    pub region: String,
    pub zone: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub capacity: NodeCapacity,
    /// The IP address other nodes reach this node's published ports on.
    pub address: String,
}
