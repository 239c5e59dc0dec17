//! The tree to an [`AppManifest`], collecting every problem on the way.
//!
//! Each section is checked independently and falls back to its default when
//! it is wrong, so one mistake does not hide the next. Cross-field checks
//! (routes and health checks naming ports, timeout below interval) run only
//! on values that were valid themselves, so one mistake is one problem.

use std::collections::BTreeMap;

use crate::duration;
use crate::error::{ManifestErrors, Problem};
use crate::names;
use crate::tree::{Describe, Node, Pos, Value};
use crate::types::{
    AppManifest, Backoff, Constraint, ConstraintOp, HealthCheck, HostRoute, Instances, Placement,
    Port, Probe, Protocol, Resources, Restart, RestartPolicy, Route, Strategy, TcpRoute, TlsMode,
    Update,
};

pub(crate) fn manifest(root: &Node) -> Result<AppManifest, ManifestErrors> {
    let mut cx = Cx::default();
    let manifest = cx.manifest(root);
    if cx.problems.is_empty() {
        Ok(manifest)
    } else {
        Err(ManifestErrors::new(cx.problems))
    }
}

/// Validates and also returns the problems, for callers that merge them with
/// the front end's.
pub(crate) fn check(root: &Node) -> (AppManifest, Vec<Problem>) {
    let mut cx = Cx::default();
    let manifest = cx.manifest(root);
    (manifest, cx.problems)
}

/// Appends a map key to a path: `.key`, or `["odd key"]` when it is not a
/// plain word, so that every path reads back unambiguously.
pub(crate) fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        path.push_str(&format!("[{key:?}]"));
    }
}

fn child(path: &str, key: &str) -> String {
    let mut p = path.to_owned();
    push_key(&mut p, key);
    p
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

const TOP_FIELDS: &[&str] = &[
    "name",
    "project",
    "image",
    "command",
    "env",
    "resources",
    "instances",
    "global",
    "ports",
    "routes",
    "health",
    "placement",
    "update",
    "restart",
];

// Defaults live with the types (`Default` impls and `HealthCheck`'s
// constants), next to the doc comments that promise them.
const MAX_INSTANCES: i128 = 1000;
const SECOND: u64 = 1_000;
const HOUR: u64 = 3_600_000;

/// A map's known fields (first occurrence of each), after its keys were
/// checked.
struct Obj<'a> {
    path: String,
    pos: Pos,
    fields: Vec<(&'static str, &'a Node)>,
}

impl<'a> Obj<'a> {
    /// The field's value, treating an explicit null like an absent field
    /// (`health:` with nothing under it is no health check).
    fn get(&self, name: &str) -> Option<&'a Node> {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, node)| *node)
            .filter(|node| node.value != Value::Null)
    }

    fn path(&self, name: &str) -> String {
        child(&self.path, name)
    }
}

/// What a route or health check resolved its port reference to.
struct PortRef<'a> {
    name: &'a str,
    protocol: Protocol,
}

/// The ports as written, for resolving references; `None` when the list
/// could not be read well enough to say that a name is missing from it.
struct KnownPorts<'a> {
    ports: Option<Vec<PortRef<'a>>>,
}

impl KnownPorts<'_> {
    fn names(&self) -> String {
        let names: Vec<&str> = self.ports.iter().flatten().map(|p| p.name).collect();
        names.join(", ")
    }
}

#[derive(Default)]
struct Cx {
    problems: Vec<Problem>,
}

impl Cx {
    fn report(&mut self, path: &str, pos: Pos, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.to_owned(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
        });
    }

    /// "expected X, got Y"; silent for a node the front end already reported.
    fn expected(&mut self, node: &Node, path: &str, what: &str) {
        if node.value != Value::Invalid {
            let message = format!("expected {what}, got {}", Describe(&node.value));
            self.report(path, node.pos, message);
        }
    }

    fn required<'a>(&mut self, obj: &Obj<'a>, name: &str) -> Option<&'a Node> {
        let node = obj.get(name);
        if node.is_none() {
            let explicit_null = obj.fields.iter().find(|(n, _)| *n == name);
            match explicit_null {
                Some((_, null)) => self.report(&obj.path(name), null.pos, "is required, got null"),
                None => self.report(&obj.path(name), obj.pos, "required field is missing"),
            }
        }
        node
    }

    // ---- maps and their keys ------------------------------------------

    /// A map's entries with string keys, each with its key's position;
    /// duplicate and non-string keys are reported and left out.
    fn entries<'a>(&mut self, node: &'a Node, path: &str) -> Option<Vec<(&'a str, Pos, &'a Node)>> {
        let Value::Map(raw) = &node.value else {
            self.expected(node, path, "a map");
            return None;
        };
        let mut seen: BTreeMap<&str, Pos> = BTreeMap::new();
        let mut entries = Vec::with_capacity(raw.len());
        for (key, value) in raw {
            let name = match &key.value {
                Value::Str(s) => s.as_str(),
                Value::Invalid => continue,
                // A YAML key like `8080:` is a number; its name is its text.
                Value::Bool(_, raw) | Value::Int(_, raw) | Value::Float(raw) => raw.as_str(),
                Value::Null | Value::Seq(_) | Value::Map(_) => {
                    let message = format!("keys must be strings, got {}", Describe(&key.value));
                    self.report(path, key.pos, message);
                    continue;
                }
            };
            if let Some(first) = seen.get(name) {
                let message = format!("duplicate key; it is set already on line {}", first.line);
                self.report(&child(path, name), key.pos, message);
                continue;
            }
            seen.insert(name, key.pos);
            entries.push((name, key.pos, value));
        }
        Some(entries)
    }

    /// A map whose keys must be among `allowed`.
    fn object<'a>(
        &mut self,
        node: &'a Node,
        path: &str,
        allowed: &[&'static str],
    ) -> Option<Obj<'a>> {
        let entries = self.entries(node, path)?;
        let mut fields = Vec::with_capacity(entries.len());
        for (name, key_pos, value) in entries {
            match allowed.iter().find(|a| **a == name) {
                Some(known) => fields.push((*known, value)),
                None => {
                    let mut message =
                        format!("unknown field; expected one of {}", allowed.join(", "));
                    if let Some(close) = suggest(name, allowed) {
                        message.push_str(&format!(" (did you mean {close}?)"));
                    }
                    self.report(&child(path, name), key_pos, message);
                }
            }
        }
        Some(Obj {
            path: path.to_owned(),
            pos: node.pos,
            fields,
        })
    }

    // ---- scalars -------------------------------------------------------

    fn string<'a>(&mut self, node: &'a Node, path: &str) -> Option<&'a str> {
        match &node.value {
            Value::Str(s) => Some(s),
            _ => {
                self.expected(node, path, "a string");
                None
            }
        }
    }

    /// A string checked by `check` (a name, a host).
    fn named(
        &mut self,
        node: &Node,
        path: &str,
        check: fn(&str) -> Result<(), String>,
    ) -> Option<String> {
        let s = self.string(node, path)?;
        match check(s) {
            Ok(()) => Some(s.to_owned()),
            Err(message) => {
                self.report(path, node.pos, message);
                None
            }
        }
    }

    /// Free text (env values, arguments, label values): numbers and booleans
    /// are taken as written, so `PORT: 8080` is "8080" and `V: 1.10` "1.10".
    fn text(&mut self, node: &Node, path: &str) -> Option<String> {
        match node.scalar_text() {
            Some(s) if s.contains('\0') => {
                self.report(path, node.pos, "must not contain a NUL character");
                None
            }
            Some(s) => Some(s.to_owned()),
            None if node.value == Value::Null => {
                self.report(
                    path,
                    node.pos,
                    "expected a string, got null (write \"\" for empty)",
                );
                None
            }
            None => {
                self.expected(node, path, "a string");
                None
            }
        }
    }

    fn int(&mut self, node: &Node, path: &str, lo: i128, hi: i128) -> Option<i128> {
        match &node.value {
            Value::Int(n, _) if (lo..=hi).contains(n) => Some(*n),
            Value::Int(_, raw) => {
                self.report(path, node.pos, format!("must be {lo}..{hi}, got {raw}"));
                None
            }
            _ => {
                self.expected(node, path, "an integer");
                None
            }
        }
    }

    fn int_field<T: TryFrom<i128>>(
        &mut self,
        obj: &Obj<'_>,
        name: &str,
        lo: i128,
        hi: i128,
        default: T,
    ) -> T {
        obj.get(name)
            .and_then(|node| self.int(node, &obj.path(name), lo, hi))
            .and_then(|n| T::try_from(n).ok())
            .unwrap_or(default)
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.value {
            Value::Bool(b, _) => Some(*b),
            _ => {
                self.expected(node, path, "true or false");
                None
            }
        }
    }

    fn choice<T: Copy>(&mut self, node: &Node, path: &str, options: &[(&str, T)]) -> Option<T> {
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        let names = names.join(", ");
        let Value::Str(s) = &node.value else {
            self.expected(node, path, &format!("one of {names}"));
            return None;
        };
        match options.iter().find(|(name, _)| name == s) {
            Some((_, value)) => Some(*value),
            None => {
                self.report(path, node.pos, format!("must be one of {names}; got {s:?}"));
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, path: &str, lo_ms: u64, hi_ms: u64) -> Option<u64> {
        let Value::Str(s) = &node.value else {
            self.expected(node, path, duration::FORMAT_HINT);
            return None;
        };
        match duration::parse_ms(s) {
            Ok(ms) if (lo_ms..=hi_ms).contains(&ms) => Some(ms),
            Ok(_) => {
                let (lo, hi) = (duration::format_ms(lo_ms), duration::format_ms(hi_ms));
                self.report(path, node.pos, format!("must be {lo}..{hi}, got {s}"));
                None
            }
            Err(message) => {
                self.report(path, node.pos, message);
                None
            }
        }
    }

    fn list<'a>(&mut self, node: &'a Node, path: &str) -> Option<&'a [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            _ => {
                self.expected(node, path, "a list");
                None
            }
        }
    }

    /// A list of names checked by `check`, each at most once.
    fn name_list(
        &mut self,
        node: Option<&Node>,
        path: &str,
        check: fn(&str) -> Result<(), String>,
    ) -> Vec<String> {
        let Some(items) = node.and_then(|n| self.list(n, path)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let item_path = index(path, i);
            if let Some(name) = self.named(item, &item_path, check) {
                if names.contains(&name) {
                    self.report(&item_path, item.pos, format!("{name:?} is listed twice"));
                } else {
                    names.push(name);
                }
            }
        }
        names
    }

    /// A command: a non-empty list of arguments, never a string to split.
    fn command(&mut self, node: &Node, path: &str) -> Option<Vec<String>> {
        if let Value::Str(s) = &node.value {
            let message = format!(
                "expected a list of arguments like [\"/bin/web\", \"--port\", \"8080\"], got \
                 string {s:?}; a single string is not split (there is no shell)"
            );
            self.report(path, node.pos, message);
            return None;
        }
        let items = self.list(node, path)?;
        if items.is_empty() {
            self.report(path, node.pos, "must not be empty");
            return None;
        }
        let args: Vec<Option<String>> = items
            .iter()
            .enumerate()
            .map(|(i, item)| self.text(item, &index(path, i)))
            .collect();
        args.into_iter().collect()
    }

    // ---- the manifest --------------------------------------------------

    fn manifest(&mut self, root: &Node) -> AppManifest {
        let top = match &root.value {
            Value::Map(_) => self.object(root, "", TOP_FIELDS),
            Value::Null => {
                let message = "the manifest is empty; it needs at least name, project and image";
                self.report("", root.pos, message);
                None
            }
            _ => {
                let what = "a map of manifest fields (name, project, image, ...)";
                self.expected(root, "", what);
                None
            }
        };
        // Without a top-level map there is nothing more to report, and every
        // section below falls back to its default.
        let field = |name: &str| top.as_ref().and_then(|t| t.get(name));
        let required = |cx: &mut Cx, name: &str| top.as_ref().and_then(|t| cx.required(t, name));
        let name = required(self, "name").and_then(|n| self.named(n, "name", names::dns_label));
        let project =
            required(self, "project").and_then(|n| self.named(n, "project", names::dns_label));
        let image = required(self, "image").and_then(|n| self.named(n, "image", names::image));
        let instances = match &top {
            Some(top) => self.instances(top),
            None => Instances::default(),
        };
        let (ports, known) = self.ports(field("ports"));
        AppManifest {
            name: name.unwrap_or_default(),
            project: project.unwrap_or_default(),
            image: image.unwrap_or_default(),
            command: field("command").and_then(|n| self.command(n, "command")),
            env: self.env(field("env")),
            resources: self.resources(field("resources")),
            instances,
            routes: self.routes(field("routes"), &known),
            health: field("health").and_then(|n| self.health(n, &known)),
            ports,
            placement: self.placement(field("placement"), "placement"),
            update: self.update(field("update"), "update"),
            restart: self.restart(field("restart"), "restart"),
        }
    }

    fn env(&mut self, node: Option<&Node>) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let Some(entries) = node.and_then(|n| self.entries(n, "env")) else {
            return env;
        };
        for (key, key_pos, value) in entries {
            let path = child("env", key);
            if let Err(message) = names::env_name(key) {
                self.report(&path, key_pos, message);
                continue;
            }
            if let Some(text) = self.text(value, &path) {
                env.insert(key.to_owned(), text);
            }
        }
        env
    }

    fn resources(&mut self, node: Option<&Node>) -> Resources {
        let default = Resources::default();
        let Some(obj) =
            node.and_then(|n| self.object(n, "resources", &["cpu_millis", "memory_mb"]))
        else {
            return default;
        };
        Resources {
            cpu_millis: self.int_field(&obj, "cpu_millis", 1, 64_000, default.cpu_millis),
            memory_mb: self.int_field(&obj, "memory_mb", 4, 1_048_576, default.memory_mb),
        }
    }

    fn instances(&mut self, top: &Obj<'_>) -> Instances {
        let count = match top.get("instances") {
            Some(n) => self.int(n, "instances", 0, MAX_INSTANCES),
            None => None,
        };
        let count = count.and_then(|n| u32::try_from(n).ok());
        let global = top
            .get("global")
            .and_then(|node| self.boolean(node, "global"));
        if global != Some(true) {
            return count.map_or_else(Instances::default, Instances::Count);
        }
        if let (Some(_), Some(node)) = (top.get("instances"), top.get("global")) {
            self.report(
                "global",
                node.pos,
                "set instances or global: true, not both (global runs one instance on every \
                 node that matches the placement)",
            );
        }
        Instances::Global
    }

    fn ports<'a>(&mut self, node: Option<&'a Node>) -> (Vec<Port>, KnownPorts<'a>) {
        let mut ports = Vec::new();
        let mut refs: Option<Vec<PortRef<'a>>> = Some(Vec::new());
        let Some(items) = node.and_then(|n| self.list(n, "ports")) else {
            // A list that is not one: references to it cannot be judged.
            let known = if node.is_some() { None } else { refs };
            return (ports, KnownPorts { ports: known });
        };
        let mut numbers: BTreeMap<u16, usize> = BTreeMap::new();
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let path = index("ports", i);
            let Some(obj) = self.object(item, &path, &["name", "port", "protocol"]) else {
                refs = None;
                continue;
            };
            let protocol = obj
                .get("protocol")
                .and_then(|n| {
                    self.choice(
                        n,
                        &obj.path("protocol"),
                        &[("http", Protocol::Http), ("tcp", Protocol::Tcp)],
                    )
                })
                .unwrap_or_default();
            let name_node = self.required(&obj, "name");
            let raw_name = name_node.and_then(|n| match &n.value {
                Value::Str(s) => Some(s.as_str()),
                _ => None,
            });
            let name = name_node.and_then(|n| self.named(n, &obj.path("name"), names::dns_label));
            match raw_name {
                // Even a malformed name is what routes refer to: a route to
                // it is not also reported as a route to nowhere.
                Some(raw) => {
                    if let Some(first) = names.get(raw) {
                        if let Some(n) = name_node {
                            let message =
                                format!("duplicate port name {raw:?}; ports[{first}] has it");
                            self.report(&obj.path("name"), n.pos, message);
                        }
                    } else {
                        names.insert(raw, i);
                        if let Some(refs) = &mut refs {
                            refs.push(PortRef {
                                name: raw,
                                protocol,
                            });
                        }
                    }
                }
                None => refs = None,
            }
            let number = self
                .required(&obj, "port")
                .and_then(|n| self.int(n, &obj.path("port"), 1, 65_535).map(|v| (n, v)))
                .and_then(|(n, v)| u16::try_from(v).ok().map(|v| (n, v)));
            if let Some((n, number)) = number {
                if let Some(first) = numbers.get(&number) {
                    let message = format!("port {number} is already used by ports[{first}]");
                    self.report(&obj.path("port"), n.pos, message);
                } else {
                    numbers.insert(number, i);
                }
            }
            if let (Some(name), Some((_, port))) = (name, number) {
                ports.push(Port {
                    name,
                    port,
                    protocol,
                });
            }
        }
        (ports, KnownPorts { ports: refs })
    }

    /// A route's or health check's port: the one named, or the app's only
    /// port when none is named.
    fn port_ref<'p>(
        &mut self,
        given: Option<&Node>,
        owner: &Obj<'_>,
        known: &'p KnownPorts<'_>,
    ) -> Option<&'p PortRef<'p>> {
        let path = owner.path("port");
        let ports = known.ports.as_ref()?;
        match given {
            Some(node) => {
                let name = self.string(node, &path)?;
                let found = ports.iter().find(|p| p.name == name);
                if found.is_none() {
                    let message = if ports.is_empty() {
                        format!("no port named {name:?}: the app has no ports")
                    } else {
                        format!(
                            "no port named {name:?}; the app's ports are {}",
                            known.names()
                        )
                    };
                    self.report(&path, node.pos, message);
                }
                found
            }
            None => match ports.as_slice() {
                [only] => Some(only),
                [] => {
                    self.report(&path, owner.pos, "needs a port, and the app has no ports");
                    None
                }
                _ => {
                    let message = format!(
                        "required when the app has more than one port ({})",
                        known.names()
                    );
                    self.report(&path, owner.pos, message);
                    None
                }
            },
        }
    }

    fn routes(&mut self, node: Option<&Node>, known: &KnownPorts<'_>) -> Vec<Route> {
        const FIELDS: &[&str] = &[
            "host",
            "path",
            "port",
            "tls",
            "redirect_https",
            "hsts",
            "listen_port",
        ];
        let mut routes: Vec<Route> = Vec::new();
        let Some(items) = node.and_then(|n| self.list(n, "routes")) else {
            return routes;
        };
        // (host, path, passthrough, index) of the valid host routes so far.
        let mut seen: Vec<(String, String, bool, usize)> = Vec::new();
        // listen port -> index of the route that has it.
        let mut listening: BTreeMap<u16, usize> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let path = index("routes", i);
            let Some(obj) = self.object(item, &path, FIELDS) else {
                continue;
            };
            let route = match obj.get("listen_port") {
                Some(listen_node) => self
                    .tcp_route(&obj, listen_node, known, &mut listening, i)
                    .map(Route::Tcp),
                None => self.host_route(&obj, known, &mut seen, i).map(Route::Host),
            };
            routes.extend(route);
        }
        routes
    }

    /// A route with `listen_port`: raw TCP on a router port of its own.
    fn tcp_route(
        &mut self,
        obj: &Obj<'_>,
        listen_node: &Node,
        known: &KnownPorts<'_>,
        listening: &mut BTreeMap<u16, usize>,
        i: usize,
    ) -> Option<TcpRoute> {
        let listen_path = obj.path("listen_port");
        let listen_port = self
            .int(listen_node, &listen_path, 1, 65_535)
            .and_then(|n| u16::try_from(n).ok());
        // The router forwards the bytes as they come: it sees no host,
        // path or TLS, so a field that would choose or change them is a
        // mistake, not something to ignore.
        let mut ok = true;
        for (name, why) in [
            (
                "host",
                "the route is chosen by its port, not by a host name (drop host, or drop \
                 listen_port to route by host)",
            ),
            ("path", "the router forwards raw TCP and never sees a path"),
            (
                "tls",
                "the router forwards the TCP stream untouched (TLS included); tls is for \
                 routes by host",
            ),
            (
                "redirect_https",
                "the router forwards raw TCP and never sees an HTTP request",
            ),
            (
                "hsts",
                "the router forwards raw TCP and never sees an HTTP response",
            ),
        ] {
            if let Some(node) = obj.get(name) {
                self.report(
                    &obj.path(name),
                    node.pos,
                    format!("not allowed with listen_port: {why}"),
                );
                ok = false;
            }
        }
        let port_node = obj.get("port");
        let port = self.port_ref(port_node, obj, known);
        if let Some(port) = port
            && port.protocol != Protocol::Tcp
        {
            let message = format!(
                "port {:?} is http: a listen_port route forwards raw TCP and needs a port with \
                 `protocol: tcp` (route an http port by host)",
                port.name
            );
            self.report(
                &obj.path("port"),
                port_node.map_or(obj.pos, |n| n.pos),
                message,
            );
            ok = false;
        }
        let listen_port = listen_port?;
        if let Some(first) = listening.get(&listen_port) {
            let message = format!("routes[{first}] already listens on port {listen_port}");
            self.report(&listen_path, listen_node.pos, message);
            return None;
        }
        listening.insert(listen_port, i);
        let port = port?;
        ok.then(|| TcpRoute {
            listen_port,
            port: port.name.to_owned(),
        })
    }

    /// A route by host name (and path prefix).
    fn host_route(
        &mut self,
        obj: &Obj<'_>,
        known: &KnownPorts<'_>,
        seen: &mut Vec<(String, String, bool, usize)>,
        i: usize,
    ) -> Option<HostRoute> {
        let host = match obj.fields.iter().find(|(n, _)| *n == "host") {
            Some(_) => self.required(obj, "host"),
            None => {
                self.report(
                    &obj.path("host"),
                    obj.pos,
                    "required field is missing (or listen_port, for a plain TCP route)",
                );
                None
            }
        };
        let host = host.and_then(|n| self.named(n, &obj.path("host"), names::hostname));
        let prefix = match obj.get("path") {
            Some(n) => self.named(n, &obj.path("path"), names::path_prefix),
            None => Some("/".to_owned()),
        };
        let tls = match obj.get("tls") {
            Some(n) => self.choice(
                n,
                &obj.path("tls"),
                &[
                    ("terminate", TlsMode::Terminate),
                    ("passthrough", TlsMode::Passthrough),
                    ("off", TlsMode::Off),
                ],
            ),
            None => Some(TlsMode::default()),
        };
        let port_node = obj.get("port");
        let port = self.port_ref(port_node, obj, known);
        match (port, tls) {
            (Some(port), Some(tls))
                if port.protocol == Protocol::Tcp && tls != TlsMode::Passthrough =>
            {
                let message = format!(
                    "port {:?} is tcp: only a `tls: passthrough` route (chosen by SNI) or a \
                     route with `listen_port` (plain TCP) can reach a tcp port; an HTTP route \
                     needs an http port",
                    port.name
                );
                self.report(
                    &obj.path("port"),
                    port_node.map_or(obj.pos, |n| n.pos),
                    message,
                );
            }
            _ => {}
        }
        match (tls, &prefix, obj.get("path")) {
            (Some(TlsMode::Passthrough), Some(p), Some(n)) if p != "/" => self.report(
                &obj.path("path"),
                n.pos,
                "a passthrough route cannot have a path prefix: the router does not \
                 decrypt the traffic, so it never sees the path",
            ),
            _ => {}
        }
        // Both act on HTTP the router decrypts: meaningless otherwise.
        let mut flag = |name: &str| -> bool {
            let Some(node) = obj.get(name) else {
                return false;
            };
            let value = self.boolean(node, &obj.path(name)).unwrap_or(false);
            if value && tls.is_some_and(|t| t != TlsMode::Terminate) {
                self.report(
                    &obj.path(name),
                    node.pos,
                    format!("{name} needs `tls: terminate`: only then does the router serve HTTPS for the route"),
                );
            }
            value
        };
        let redirect_https = flag("redirect_https");
        let hsts = flag("hsts");
        let (Some(host), Some(prefix), Some(port), Some(tls)) = (host, prefix, port, tls) else {
            return None;
        };
        let passthrough = tls == TlsMode::Passthrough;
        for (h, p, other_passthrough, j) in seen.iter() {
            if *h != host {
                continue;
            }
            let message = if *p == prefix {
                format!("routes[{j}] already routes host {host} path {prefix}")
            } else if passthrough || *other_passthrough {
                format!(
                    "host {host} has a passthrough route and another one (routes[{j}]): a \
                     passthrough host is chosen by SNI before any path is seen, so it can \
                     have only one route"
                )
            } else {
                continue;
            };
            self.report(&obj.path, obj.pos, message);
            break;
        }
        seen.push((host.clone(), prefix.clone(), passthrough, i));
        Some(HostRoute {
            host,
            path: prefix,
            port: port.name.to_owned(),
            tls,
            redirect_https,
            hsts,
        })
    }

    fn health(&mut self, node: &Node, known: &KnownPorts<'_>) -> Option<HealthCheck> {
        const FIELDS: &[&str] = &[
            "http",
            "tcp",
            "exec",
            "interval",
            "timeout",
            "healthy_threshold",
            "unhealthy_threshold",
        ];
        let obj = self.object(node, "health", FIELDS)?;
        let mut probe_kind: Option<&str> = None;
        let mut probe: Option<Probe> = None;
        let mut probe_ok = true;
        for kind in ["http", "tcp", "exec"] {
            let Some(node) = obj.get(kind) else {
                continue;
            };
            if let Some(first) = probe_kind {
                let message =
                    format!("only one of http, tcp or exec may be set, and {first} is already");
                self.report(&obj.path(kind), node.pos, message);
                continue;
            }
            probe_kind = Some(kind);
            probe = self.probe(kind, node, &obj.path(kind), known);
            probe_ok = probe.is_some();
        }
        if probe_kind.is_none() {
            self.report("health", obj.pos, "needs exactly one of http, tcp or exec");
        }
        let interval = obj
            .get("interval")
            .map(|n| self.duration(n, "health.interval", SECOND, HOUR));
        let timeout = obj
            .get("timeout")
            .map(|n| self.duration(n, "health.timeout", 100, HOUR));
        let interval_ms = interval.unwrap_or(Some(HealthCheck::DEFAULT_INTERVAL_MS));
        let timeout_ms = timeout.unwrap_or(Some(HealthCheck::DEFAULT_TIMEOUT_MS));
        let timeout_too_long = match (interval_ms, timeout_ms) {
            (Some(i), Some(t)) if t >= i => Some((duration::format_ms(i), duration::format_ms(t))),
            _ => None,
        };
        if let Some((i, t)) = timeout_too_long {
            match (obj.get("timeout"), obj.get("interval")) {
                (Some(n), _) => self.report(
                    "health.timeout",
                    n.pos,
                    format!("must be shorter than interval ({i}), got {t}"),
                ),
                (None, Some(n)) => self.report(
                    "health.interval",
                    n.pos,
                    format!(
                        "must be longer than timeout ({t}, the default); set a shorter timeout"
                    ),
                ),
                (None, None) => {}
            }
        }
        let healthy_threshold = self.int_field(
            &obj,
            "healthy_threshold",
            1,
            100,
            HealthCheck::DEFAULT_HEALTHY_THRESHOLD,
        );
        let unhealthy_threshold = self.int_field(
            &obj,
            "unhealthy_threshold",
            1,
            100,
            HealthCheck::DEFAULT_UNHEALTHY_THRESHOLD,
        );
        if !probe_ok {
            return None;
        }
        Some(HealthCheck {
            probe: probe?,
            interval_ms: interval_ms.unwrap_or(HealthCheck::DEFAULT_INTERVAL_MS),
            timeout_ms: timeout_ms.unwrap_or(HealthCheck::DEFAULT_TIMEOUT_MS),
            healthy_threshold,
            unhealthy_threshold,
        })
    }

    fn probe(
        &mut self,
        kind: &str,
        node: &Node,
        path: &str,
        known: &KnownPorts<'_>,
    ) -> Option<Probe> {
        match kind {
            "http" => {
                let obj = self.object(node, path, &["port", "path"])?;
                let check_path = match obj.get("path") {
                    Some(n) => self.named(n, &obj.path("path"), names::http_check_path),
                    None => Some("/".to_owned()),
                };
                let port_node = obj.get("port");
                let port = self.port_ref(port_node, &obj, known)?;
                if port.protocol == Protocol::Tcp {
                    let message = format!(
                        "port {:?} is tcp; an http check needs an http port (a tcp check only \
                         opens a connection)",
                        port.name
                    );
                    self.report(
                        &obj.path("port"),
                        port_node.map_or(obj.pos, |n| n.pos),
                        message,
                    );
                    return None;
                }
                Some(Probe::Http {
                    port: port.name.to_owned(),
                    path: check_path?,
                })
            }
            "tcp" => {
                let obj = self.object(node, path, &["port"])?;
                let port = self.port_ref(obj.get("port"), &obj, known)?;
                Some(Probe::Tcp {
                    port: port.name.to_owned(),
                })
            }
            _ => {
                let obj = self.object(node, path, &["command"])?;
                let command_node = self.required(&obj, "command")?;
                let command = self.command(command_node, &obj.path("command"))?;
                Some(Probe::Exec { command })
            }
        }
    }

    fn placement(&mut self, node: Option<&Node>, path: &str) -> Placement {
        const FIELDS: &[&str] = &[
            "constraints",
            "regions",
            "zones",
            "roles",
            "spread_zones",
            "strategy",
        ];
        let mut placement = Placement::default();
        let Some(obj) = node.and_then(|n| self.object(n, path, FIELDS)) else {
            return placement;
        };
        if let Some(items) = obj
            .get("constraints")
            .and_then(|n| self.list(n, &obj.path("constraints")))
        {
            for (i, item) in items.iter().enumerate() {
                let item_path = index(&obj.path("constraints"), i);
                if let Some(constraint) = self.constraint(item, &item_path) {
                    placement.constraints.push(constraint);
                }
            }
        }
        placement.regions = self.name_list(
            obj.get("regions"),
            &obj.path("regions"),
            names::topology_name,
        );
        placement.zones =
            self.name_list(obj.get("zones"), &obj.path("zones"), names::topology_name);
        placement.roles =
            self.name_list(obj.get("roles"), &obj.path("roles"), names::topology_name);
        if let Some(n) = obj.get("spread_zones") {
            placement.spread_zones = self
                .boolean(n, &obj.path("spread_zones"))
                .unwrap_or(placement.spread_zones);
        }
        if let Some(n) = obj.get("strategy") {
            placement.strategy = self
                .choice(
                    n,
                    &obj.path("strategy"),
                    &[
                        ("least-allocated", Strategy::LeastAllocated),
                        ("bin-pack", Strategy::BinPack),
                    ],
                )
                .unwrap_or_default();
        }
        placement
    }

    fn constraint(&mut self, node: &Node, path: &str) -> Option<Constraint> {
        #[derive(Clone, Copy, PartialEq)]
        enum Op {
            Eq,
            Ne,
            In,
            Regex,
        }
        let obj = self.object(node, path, &["key", "op", "value", "values"])?;
        let key = self
            .required(&obj, "key")
            .and_then(|n| self.named(n, &obj.path("key"), names::label_key));
        let op = self.required(&obj, "op").and_then(|n| {
            self.choice(
                n,
                &obj.path("op"),
                &[
                    ("=", Op::Eq),
                    ("!=", Op::Ne),
                    ("in", Op::In),
                    ("regex", Op::Regex),
                ],
            )
        })?;
        let op = if op == Op::In {
            if let Some(n) = obj.get("value") {
                self.report(
                    &obj.path("value"),
                    n.pos,
                    "op: in takes `values`, a list, not `value`",
                );
            }
            let list_node = self.required(&obj, "values")?;
            let list_path = obj.path("values");
            let items = self.list(list_node, &list_path)?;
            if items.is_empty() {
                self.report(&list_path, list_node.pos, "must list at least one value");
                return None;
            }
            let mut values: Vec<String> = Vec::with_capacity(items.len());
            let mut ok = true;
            for (i, item) in items.iter().enumerate() {
                match self.text(item, &index(&list_path, i)) {
                    Some(v) if values.contains(&v) => {
                        self.report(
                            &index(&list_path, i),
                            item.pos,
                            format!("{v:?} is listed twice"),
                        );
                        ok = false;
                    }
                    Some(v) => values.push(v),
                    None => ok = false,
                }
            }
            ok.then_some(ConstraintOp::In { values })?
        } else {
            if let Some(n) = obj.get("values") {
                self.report(
                    &obj.path("values"),
                    n.pos,
                    "`values` is for op: in; this op takes one `value`",
                );
            }
            let value_node = self.required(&obj, "value")?;
            let value = self.text(value_node, &obj.path("value"))?;
            match op {
                Op::Eq => ConstraintOp::Eq { value },
                Op::Ne => ConstraintOp::Ne { value },
                Op::In | Op::Regex => {
                    if let Err(why) = crate::check_regex(&value) {
                        self.report(
                            &obj.path("value"),
                            value_node.pos,
                            format!("invalid regex: {why}"),
                        );
                        return None;
                    }
                    ConstraintOp::Regex { value }
                }
            }
        };
        Some(Constraint { key: key?, op })
    }

    fn update(&mut self, node: Option<&Node>, path: &str) -> Update {
        let default = Update::default();
        let Some(obj) =
            node.and_then(|n| self.object(n, path, &["max_surge", "max_unavailable", "min_ready"]))
        else {
            return default;
        };
        let surge = obj
            .get("max_surge")
            .map(|n| self.int(n, &obj.path("max_surge"), 0, MAX_INSTANCES));
        let unavailable = obj
            .get("max_unavailable")
            .map(|n| self.int(n, &obj.path("max_unavailable"), 0, MAX_INSTANCES));
        if let (Some(0), Some(0)) = (
            surge.unwrap_or(Some(default.max_surge.into())),
            unavailable.unwrap_or(Some(default.max_unavailable.into())),
        ) {
            let (field, at) = match obj.get("max_surge") {
                Some(n) => ("max_surge", n.pos),
                None => (
                    "max_unavailable",
                    obj.get("max_unavailable").map_or(obj.pos, |n| n.pos),
                ),
            };
            self.report(
                &obj.path(field),
                at,
                "max_surge and max_unavailable cannot both be 0: an update could neither start \
                 a new instance nor stop an old one",
            );
        }
        let to_u32 = |v: Option<Option<i128>>, default: u32| {
            v.flatten()
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(default)
        };
        let min_ready_ms = obj
            .get("min_ready")
            .and_then(|n| self.duration(n, &obj.path("min_ready"), 0, HOUR))
            .unwrap_or(default.min_ready_ms);
        Update {
            max_surge: to_u32(surge, default.max_surge),
            max_unavailable: to_u32(unavailable, default.max_unavailable),
            min_ready_ms,
        }
    }

    fn restart(&mut self, node: Option<&Node>, path: &str) -> Restart {
        let mut restart = Restart::default();
        let Some(obj) = node.and_then(|n| self.object(n, path, &["policy", "backoff"])) else {
            return restart;
        };
        if let Some(n) = obj.get("policy") {
            restart.policy = self
                .choice(
                    n,
                    &obj.path("policy"),
                    &[
                        ("always", RestartPolicy::Always),
                        ("on-failure", RestartPolicy::OnFailure),
                        ("never", RestartPolicy::Never),
                    ],
                )
                .unwrap_or_default();
        }
        let backoff_path = obj.path("backoff");
        let Some(backoff) = obj
            .get("backoff")
            .and_then(|n| self.object(n, &backoff_path, &["initial", "max"]))
        else {
            return restart;
        };
        let initial = backoff
            .get("initial")
            .map(|n| self.duration(n, &backoff.path("initial"), 100, 10 * 60 * SECOND));
        let max = backoff
            .get("max")
            .map(|n| self.duration(n, &backoff.path("max"), SECOND, HOUR));
        let default = Backoff::default();
        let initial_ms = initial.unwrap_or(Some(default.initial_ms));
        let max_ms = max.unwrap_or(Some(default.max_ms));
        let initial_above_max = match (initial_ms, max_ms) {
            (Some(i), Some(m)) if i > m => Some((duration::format_ms(i), duration::format_ms(m))),
            _ => None,
        };
        if let Some((i, m)) = initial_above_max {
            match (backoff.get("max"), backoff.get("initial")) {
                (Some(n), _) => self.report(
                    &backoff.path("max"),
                    n.pos,
                    format!("must be at least initial ({i}), got {m}"),
                ),
                (None, Some(n)) => self.report(
                    &backoff.path("initial"),
                    n.pos,
                    format!("must be at most max ({m}, the default), got {i}"),
                ),
                (None, None) => {}
            }
        }
        restart.backoff = Backoff {
            initial_ms: initial_ms.unwrap_or(default.initial_ms),
            max_ms: max_ms.unwrap_or(default.max_ms),
        };
        restart
    }
}

/// The allowed name closest to a mistyped one, if any is close: within two
/// edits, or one a prefix of the other (`memory` for `memory_mb`).
fn suggest<'a>(name: &str, allowed: &[&'a str]) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase();
    allowed
        .iter()
        .map(|a| (edit_distance(&lower, a), *a))
        .filter(|(d, a)| {
            *d <= 2 || (lower.len() >= 3 && (a.starts_with(&lower) || lower.starts_with(a)))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_are_close_names_only() {
        let fields = ["cpu_millis", "memory_mb"];
        assert_eq!(suggest("memory", &fields), Some("memory_mb"));
        assert_eq!(suggest("memroy_mb", &fields), Some("memory_mb"));
        assert_eq!(suggest("cpu", &fields), Some("cpu_millis"));
        assert_eq!(suggest("Memory_MB", &fields), Some("memory_mb"));
        assert_eq!(suggest("disk", &fields), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn paths_quote_keys_that_are_not_plain_words() {
        let mut path = String::new();
        push_key(&mut path, "env");
        push_key(&mut path, "FOO");
        assert_eq!(path, "env.FOO");
        push_key(&mut path, "a b");
        assert_eq!(path, "env.FOO[\"a b\"]");
    }
}
