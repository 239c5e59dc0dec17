//! The validated manifest. Every value here has passed the validator: names
//! are well formed, numbers in range, references resolve, defaults are
//! filled in. Serialized, it is the manifest's canonical form: the same
//! shape a user writes, with every default spelled out.
//!
//! Durations are whole milliseconds in fields named `*_ms`; in the manifest
//! they are written with units under the name without the suffix
//! (`interval: 5s`), so a number is never read in a guessed unit.

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// An app as a user deploys it. Build one with [`crate::parse_yaml`],
/// [`crate::parse_json`] or `Deserialize` (which validates the same way).
///
/// Field order is the canonical JSON's key order: reordering fields changes
/// [`AppManifest::canonical_json`]'s bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppManifest {
    /// Unique in its project; a DNS label. Required.
    pub name: String,
    /// The project (tenant) the app belongs to; a DNS label. Required.
    pub project: String,
    /// The container image reference. Required.
    pub image: String,
    /// The container's command and arguments, run without a shell. Default:
    /// none, the image's own entrypoint and command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Environment variables. Default: none.
    pub env: BTreeMap<String, String>,
    /// What each instance reserves. Default: 100 millicores, 128 MB.
    pub resources: Resources,
    /// How many instances run. Default: 1.
    #[serde(flatten)]
    pub instances: Instances,
    /// The ports the container listens on. Default: none.
    pub ports: Vec<Port>,
    /// Host names (and path prefixes), or router ports, routed to a port.
    /// Default: none.
    pub routes: Vec<Route>,
    /// How readiness and liveness are probed. Default: none; an instance is
    /// ready when its container runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Which nodes instances may run on and how they spread. Default:
    /// anywhere, spread over zones, least allocated first.
    pub placement: Placement,
    /// How a new revision replaces the old one's instances. Default: one
    /// extra instance at a time, none taken down first.
    pub update: Update,
    /// What happens when a container exits. Default: always restart, after
    /// 1s doubling to 60s.
    pub restart: Restart,
}

impl AppManifest {
    /// The canonical JSON: every default spelled out, map keys sorted, fields
    /// in declaration order, no whitespace. Two manifests that mean the same
    /// (whatever their format, key order, spelling of durations or omitted
    /// defaults) give the same bytes; [`crate::parse_json`] reads it back to
    /// an equal manifest.
    ///
    /// To compare with a spec stored by another Keel version, deserialize
    /// the stored bytes and compare manifests (or re-canonicalize): a new
    /// field with a default changes the bytes but not the meaning.
    pub fn canonical_json(&self) -> Vec<u8> {
        // Serializing can only fail for a map with non-string keys or a
        // failing Serialize impl; these types have neither.
        serde_json::to_vec(self).expect("AppManifest always serializes to JSON")
    }
}

/// Reads a manifest back (a stored revision's spec, an API body) through the
/// same validator as [`crate::parse_json`], so a value that deserializes is
/// as valid as one that parsed. Problems carry no line or column here.
impl<'de> serde::Deserialize<'de> for AppManifest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let node = crate::tree::Node::deserialize(deserializer)?;
        crate::validate::manifest(&node).map_err(serde::de::Error::custom)
    }
}

/// Per instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Resources {
    /// Thousandths of a CPU core, 1..64000. Default: 100.
    pub cpu_millis: u64,
    /// Memory in MiB, 4..1048576 (1 TiB). Default: 128.
    pub memory_mb: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpu_millis: 100,
            memory_mb: 128,
        }
    }
}

/// `instances: N` or `global: true` in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    /// Exactly this many, 0..1000; 0 keeps the app defined but stopped.
    Count(u32),
    /// One on every node that matches the placement, however many there are.
    Global,
}

impl Default for Instances {
    fn default() -> Self {
        Instances::Count(1)
    }
}

/// Written as the manifest writes it: `"instances": 3` or `"global": true`.
impl Serialize for Instances {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        match self {
            Instances::Count(n) => map.serialize_entry("instances", n)?,
            Instances::Global => map.serialize_entry("global", &true)?,
        }
        map.end()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Port {
    /// Unique among the app's ports; a DNS label. Routes and health checks
    /// refer to ports by name. Required.
    pub name: String,
    /// The port the container listens on, 1..65535, unique among the app's
    /// ports. Required.
    pub port: u16,
    /// Default: http.
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2 (h2c): routable by host and path.
    #[default]
    Http,
    /// Any TCP stream: reachable through `tls: passthrough` routes (by SNI)
    /// and `listen_port` routes (plain TCP) only.
    Tcp,
}

/// How traffic reaches one of the app's ports: by host name (HTTP, HTTPS,
/// TLS passthrough by SNI) or by a port of its own on every router (plain
/// TCP). Written as the manifest writes it: a route with `listen_port` is
/// [`Route::Tcp`], any other [`Route::Host`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Route {
    Host(HostRoute),
    Tcp(TcpRoute),
}

impl Route {
    /// The name of the app's port the route goes to.
    pub fn port(&self) -> &str {
        match self {
            Route::Host(route) => &route.port,
            Route::Tcp(route) => &route.port,
        }
    }
}

/// A route chosen by host name (and, for HTTP, path prefix).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostRoute {
    /// The host name the router matches; `*.example.com` matches one label
    /// in place of the `*`. Required.
    pub host: String,
    /// A path prefix, matched per segment (`/api` matches `/api/x`, not
    /// `/apix`). Default: `/` (everything).
    pub path: String,
    /// The name of the port traffic goes to. Default: the app's only port;
    /// required when it has several.
    pub port: String,
    /// Default: off.
    pub tls: TlsMode,
    /// Plain HTTP requests for the route are answered with a permanent
    /// redirect (308) to HTTPS. Only with `tls: terminate`. Default: false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub redirect_https: bool,
    /// HTTPS responses carry `Strict-Transport-Security` (one year). Only
    /// with `tls: terminate`. Default: false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hsts: bool,
}

/// A plain TCP route: every router forwards the connections it accepts on
/// `listen_port` to a ready instance's `tcp` port, bytes untouched. The
/// router sees no host, path or TLS, so the route has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TcpRoute {
    /// The port every router listens on for this route, 1..65535; one app
    /// in the cluster at most may claim it. Required.
    pub listen_port: u16,
    /// The name of a `tcp` port traffic goes to. Default: the app's only
    /// port; required when it has several.
    pub port: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// The router terminates TLS with the route's certificate (self-signed
    /// when none was uploaded) and forwards plain HTTP.
    Terminate,
    /// The router forwards the TLS stream untouched, chosen by SNI; the app
    /// holds the certificate. No path prefix: the router cannot see paths.
    Passthrough,
    /// Plain HTTP only.
    #[default]
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    /// `http`, `tcp` or `exec` in the manifest: exactly one.
    #[serde(flatten)]
    pub probe: Probe,
    /// Time between probes, 1s..1h (`interval`). Default: 5s.
    #[serde(rename = "interval", serialize_with = "crate::duration::serialize")]
    pub interval_ms: u64,
    /// How long a probe may take, at least 100ms and less than the interval
    /// (`timeout`). Default: 2s.
    #[serde(rename = "timeout", serialize_with = "crate::duration::serialize")]
    pub timeout_ms: u64,
    /// Consecutive successes before an instance is ready, 1..100. Default: 1.
    pub healthy_threshold: u32,
    /// Consecutive failures before it is not ready and is restarted, 1..100.
    /// Default: 3.
    pub unhealthy_threshold: u32,
}

impl HealthCheck {
    pub const DEFAULT_INTERVAL_MS: u64 = 5_000;
    pub const DEFAULT_TIMEOUT_MS: u64 = 2_000;
    pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 1;
    pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// A GET that must answer 2xx or 3xx.
    Http {
        /// Port name. Default: the app's only port.
        port: String,
        /// Path and optional query. Default: `/`.
        path: String,
    },
    /// A TCP connection that must open.
    Tcp {
        /// Port name. Default: the app's only port.
        port: String,
    },
    /// A command run in the container that must exit 0. Required, non-empty.
    Exec { command: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// Every one must hold. Default: none.
    pub constraints: Vec<Constraint>,
    /// The node's region must be one of these. Default: empty, any region.
    pub regions: Vec<String>,
    /// The node's zone must be one of these. Default: empty, any zone.
    pub zones: Vec<String>,
    /// The node must have every one of these roles. Default: none.
    pub roles: Vec<String>,
    /// Put each instance in the allowed zone with the fewest of the app's
    /// instances (a preference, not a rule). Default: true.
    pub spread_zones: bool,
    /// Default: least-allocated.
    pub strategy: Strategy,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            constraints: Vec::new(),
            regions: Vec::new(),
            zones: Vec::new(),
            roles: Vec::new(),
            spread_zones: true,
            strategy: Strategy::default(),
        }
    }
}

/// A rule on a node's label, or on its `region`, `zone` or `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Constraint {
    /// A label key; `region`, `zone` and `name` mean the node's own fields.
    pub key: String,
    /// `op` and `value` (or `values` for `in`) in the manifest.
    #[serde(flatten)]
    pub op: ConstraintOp,
}

/// A node without the label fails `=`, `in` and `regex` and passes `!=`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op")]
pub enum ConstraintOp {
    #[serde(rename = "=")]
    Eq { value: String },
    #[serde(rename = "!=")]
    Ne { value: String },
    /// A non-empty list without duplicates.
    #[serde(rename = "in")]
    In { values: Vec<String> },
    /// Must match the whole value. The pattern is kept as written; compile it
    /// with [`crate::anchored_regex`], which adds the anchors.
    #[serde(rename = "regex")]
    Regex { value: String },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The node with the most free resources: load evens out.
    #[default]
    LeastAllocated,
    /// The fullest node that still fits: whole nodes stay free.
    BinPack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Update {
    /// Instances started above the desired count during an update, 0..1000.
    /// Default: 1.
    pub max_surge: u32,
    /// Instances that may be missing (stopped, not yet ready) during an
    /// update, 0..1000; not both this and `max_surge` 0. Default: 0.
    pub max_unavailable: u32,
    /// How long a new instance must stay ready before it counts as
    /// available, 0s..1h (`min_ready`). Default: 0s.
    #[serde(rename = "min_ready", serialize_with = "crate::duration::serialize")]
    pub min_ready_ms: u64,
}

impl Default for Update {
    fn default() -> Self {
        Self {
            max_surge: 1,
            max_unavailable: 0,
            min_ready_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Restart {
    /// Default: always.
    pub policy: RestartPolicy,
    /// The delay before each restart: `initial`, doubling after every
    /// failed restart up to `max`. It resets once an instance stays ready
    /// for `max`.
    pub backoff: Backoff,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit status.
    #[default]
    Always,
    /// Only after a non-zero exit status (or a failed health check).
    OnFailure,
    /// An exited instance stays exited.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Backoff {
    /// The first delay, 100ms..10m (`initial`). Default: 1s.
    #[serde(rename = "initial", serialize_with = "crate::duration::serialize")]
    pub initial_ms: u64,
    /// The cap, at least `initial` and at most 1h (`max`). Default: 60s
    /// (written `1m` in canonical form).
    #[serde(rename = "max", serialize_with = "crate::duration::serialize")]
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: 1_000,
            max_ms: 60_000,
        }
    }
}
