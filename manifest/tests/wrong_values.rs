//! Every field that can be wrong, with wrong values: each case must give
//! exactly one problem (no cascades), naming the field's path, its line, and
//! saying what is wrong.

#![allow(clippy::unwrap_used)]

use keel_manifest::{Problem, parse_yaml};

/// Lines 1-3; a case's own text starts on line 4.
const BASE: &str = "name: web\nproject: acme\nimage: nginx:1.27\n";

/// Two ports (lines 4-6), for cases about routes and health checks, whose
/// own text then starts on line 7.
const PORTS: &str =
    "ports:\n  - {name: web, port: 8080}\n  - {name: db, port: 5432, protocol: tcp}\n";

struct Case {
    yaml: String,
    path: &'static str,
    line: usize,
    message: &'static str,
}

fn case(extra: &str, path: &'static str, line: usize, message: &'static str) -> Case {
    Case {
        yaml: format!("{BASE}{extra}"),
        path,
        line,
        message,
    }
}

fn with_ports(extra: &str, path: &'static str, line: usize, message: &'static str) -> Case {
    case(&format!("{PORTS}{extra}"), path, line, message)
}

fn whole(yaml: &str, path: &'static str, line: usize, message: &'static str) -> Case {
    Case {
        yaml: yaml.to_owned(),
        path,
        line,
        message,
    }
}

fn problems(yaml: &str) -> Vec<Problem> {
    match parse_yaml(yaml) {
        Ok(m) => panic!("accepted:\n{yaml}\nas {m:?}"),
        Err(errors) => errors.into_problems(),
    }
}

fn check(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for c in &cases {
        let found = problems(&c.yaml);
        let ok = found.len() == 1
            && found[0].path == c.path
            && found[0].line == c.line
            && found[0].message.contains(c.message);
        if !ok {
            let found: Vec<String> = found.iter().map(ToString::to_string).collect();
            failures.push(format!(
                "--- manifest:\n{}\nwanted one problem: {}:{} ... {}\nfound:\n{}",
                c.yaml,
                c.line,
                c.path,
                c.message,
                found.join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn names_project_and_image() {
    let long = "a".repeat(64);
    check(vec![
        whole(
            "project: acme\nimage: nginx\n",
            "name",
            1,
            "required field is missing",
        ),
        whole(
            "name: ~\nproject: acme\nimage: nginx\n",
            "name",
            1,
            "is required, got null",
        ),
        whole(
            "name: Web\nproject: acme\nimage: nginx\n",
            "name",
            1,
            "must be a DNS label",
        ),
        whole(
            "name: web_app\nproject: acme\nimage: nginx\n",
            "name",
            1,
            "got \"web_app\"",
        ),
        whole(
            "name: 1web\nproject: acme\nimage: nginx\n",
            "name",
            1,
            "starting with a letter",
        ),
        whole(
            "name: web-\nproject: acme\nimage: nginx\n",
            "name",
            1,
            "not ending with '-'",
        ),
        whole(
            &format!("name: {long}\nproject: acme\nimage: nginx\n"),
            "name",
            1,
            "1 to 63",
        ),
        whole(
            "name: 5\nproject: acme\nimage: nginx\n",
            "name",
            1,
            "expected a string, got integer 5",
        ),
        whole(
            "name: [web]\nproject: acme\nimage: nginx\n",
            "name",
            1,
            "expected a string, got a list",
        ),
        whole(
            "name: web\nimage: nginx\n",
            "project",
            1,
            "required field is missing",
        ),
        whole(
            "name: web\nproject: Acme\nimage: nginx\n",
            "project",
            2,
            "must be a DNS label",
        ),
        whole(
            "name: web\nproject: true\nimage: nginx\n",
            "project",
            2,
            "got boolean true",
        ),
        whole(
            "name: web\nproject: acme\n",
            "image",
            1,
            "required field is missing",
        ),
        whole(
            "name: web\nproject: acme\nimage: \"\"\n",
            "image",
            3,
            "got an empty string",
        ),
        whole(
            "name: web\nproject: acme\nimage: nginx latest\n",
            "image",
            3,
            "whitespace",
        ),
        whole(
            "name: web\nproject: acme\nimage: {repo: nginx}\n",
            "image",
            3,
            "got a map",
        ),
    ]);
}

#[test]
fn unknown_fields_at_each_level() {
    check(vec![
        case(
            "imagee: x\n",
            "imagee",
            4,
            "unknown field; expected one of name, project, image,",
        ),
        case(
            "replicas: 3\n",
            "replicas",
            4,
            "unknown field; expected one of",
        ),
        case(
            "resources:\n  memory: 5\n",
            "resources.memory",
            5,
            "unknown field; expected one of cpu_millis, memory_mb (did you mean memory_mb?)",
        ),
        case(
            "ports:\n  - {name: web, port: 80, proto: tcp}\n",
            "ports[0].proto",
            5,
            "(did you mean protocol?)",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: web, hostname: b}\n",
            "routes[0].hostname",
            8,
            "expected one of host, path, port, tls",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  path: /x\n",
            "health.path",
            9,
            "unknown field",
        ),
        with_ports(
            "health:\n  http: {port: web, url: /x}\n",
            "health.http.url",
            8,
            "expected one of port, path",
        ),
        with_ports(
            "health:\n  tcp: {port: web, path: /}\n",
            "health.tcp.path",
            8,
            "expected one of port",
        ),
        case(
            "health:\n  exec: {command: [true], shell: sh}\n",
            "health.exec.shell",
            5,
            "expected one of command",
        ),
        case(
            "placement:\n  region: eu-1\n",
            "placement.region",
            5,
            "(did you mean regions?)",
        ),
        case(
            "placement:\n  constraints:\n    - {key: disk, op: \"=\", value: x, extra: 1}\n",
            "placement.constraints[0].extra",
            6,
            "expected one of key, op, value, values",
        ),
        case(
            "update:\n  maxSurge: 2\n",
            "update.maxSurge",
            5,
            "(did you mean max_surge?)",
        ),
        case(
            "restart:\n  policy: always\n  backoff:\n    factor: 2\n",
            "restart.backoff.factor",
            7,
            "expected one of initial, max",
        ),
        case(
            "restart:\n  restart_policy: never\n",
            "restart.restart_policy",
            5,
            "expected one of policy, backoff",
        ),
    ]);
}

#[test]
fn instances_and_global() {
    check(vec![
        case(
            "instances: three\n",
            "instances",
            4,
            "expected an integer, got string \"three\"",
        ),
        case(
            "instances: 1001\n",
            "instances",
            4,
            "must be 0..1000, got 1001",
        ),
        case("instances: -1\n", "instances", 4, "must be 0..1000, got -1"),
        case(
            "instances: 2.5\n",
            "instances",
            4,
            "expected an integer, got float 2.5",
        ),
        case("instances: 3.0\n", "instances", 4, "got float 3.0"),
        case("instances: [1]\n", "instances", 4, "got a list"),
        case(
            "instances: 99999999999999999999999\n",
            "instances",
            4,
            "must be 0..1000",
        ),
        case(
            "global: yes\n",
            "global",
            4,
            "expected true or false, got string \"yes\"",
        ),
        case(
            "global: 1\n",
            "global",
            4,
            "expected true or false, got integer 1",
        ),
        case(
            "instances: 2\nglobal: true\n",
            "global",
            5,
            "set instances or global: true, not both",
        ),
    ]);
}

#[test]
fn command_and_env() {
    check(vec![
        case(
            "command: /bin/web --port 80\n",
            "command",
            4,
            "a single string is not split",
        ),
        case("command: []\n", "command", 4, "must not be empty"),
        case(
            "command: [web, {a: b}]\n",
            "command[1]",
            4,
            "expected a string, got a map",
        ),
        case("command:\n  - web\n  - ~\n", "command[1]", 6, "got null"),
        case("command: [\"a\\0b\"]\n", "command[0]", 4, "NUL"),
        case("env: [A, B]\n", "env", 4, "expected a map, got a list"),
        case(
            "env: FOO=bar\n",
            "env",
            4,
            "expected a map, got string \"FOO=bar\"",
        ),
        case(
            "env:\n  1FOO: x\n",
            "env.1FOO",
            5,
            "must match [A-Za-z_][A-Za-z0-9_]*",
        ),
        case("env:\n  FOO-BAR: x\n", "env.FOO-BAR", 5, "got \"FOO-BAR\""),
        case("env:\n  \"A B\": x\n", "env[\"A B\"]", 5, "got \"A B\""),
        case(
            "env:\n  FOO: [1, 2]\n",
            "env.FOO",
            5,
            "expected a string, got a list",
        ),
        case(
            "env:\n  FOO:\n",
            "env.FOO",
            5,
            "got null (write \"\" for empty)",
        ),
        case(
            "env:\n  FOO: a\n  BAR: b\n  FOO: c\n",
            "env.FOO",
            7,
            "duplicate key; it is set already on line 5",
        ),
    ]);
}

#[test]
fn resources() {
    check(vec![
        case(
            "resources: 5\n",
            "resources",
            4,
            "expected a map, got integer 5",
        ),
        case(
            "resources:\n  cpu_millis: 0\n",
            "resources.cpu_millis",
            5,
            "must be 1..64000, got 0",
        ),
        case(
            "resources:\n  cpu_millis: 64001\n",
            "resources.cpu_millis",
            5,
            "must be 1..64000, got 64001",
        ),
        case(
            "resources:\n  cpu_millis: \"100\"\n",
            "resources.cpu_millis",
            5,
            "expected an integer, got string \"100\"",
        ),
        case(
            "resources:\n  cpu_millis: 0.5\n",
            "resources.cpu_millis",
            5,
            "got float 0.5",
        ),
        case(
            "resources:\n  memory_mb: 3\n",
            "resources.memory_mb",
            5,
            "must be 4..1048576, got 3",
        ),
        case(
            "resources:\n  memory_mb: 1048577\n",
            "resources.memory_mb",
            5,
            "must be 4..1048576",
        ),
        case(
            "resources:\n  memory_mb: 512Mi\n",
            "resources.memory_mb",
            5,
            "got string \"512Mi\"",
        ),
    ]);
}

#[test]
fn ports() {
    check(vec![
        case(
            "ports: {name: web}\n",
            "ports",
            4,
            "expected a list, got a map",
        ),
        case(
            "ports:\n  - web\n",
            "ports[0]",
            5,
            "expected a map, got string \"web\"",
        ),
        case(
            "ports:\n  - name: web\n    port: 70000\n",
            "ports[0].port",
            6,
            "must be 1..65535, got 70000",
        ),
        case(
            "ports:\n  - name: web\n    port: 0\n",
            "ports[0].port",
            6,
            "must be 1..65535, got 0",
        ),
        case(
            "ports:\n  - name: web\n    port: http\n",
            "ports[0].port",
            6,
            "expected an integer",
        ),
        case(
            "ports:\n  - name: web\n",
            "ports[0].port",
            5,
            "required field is missing",
        ),
        case(
            "ports:\n  - port: 80\n",
            "ports[0].name",
            5,
            "required field is missing",
        ),
        case(
            "ports:\n  - name: Web\n    port: 80\n",
            "ports[0].name",
            5,
            "must be a DNS label",
        ),
        case(
            "ports:\n  - name: web_1\n    port: 80\n",
            "ports[0].name",
            5,
            "got \"web_1\"",
        ),
        case(
            "ports:\n  - name: 80\n    port: 80\n",
            "ports[0].name",
            5,
            "expected a string, got integer 80",
        ),
        case(
            "ports:\n  - name: web\n    port: 80\n    protocol: udp\n",
            "ports[0].protocol",
            7,
            "must be one of http, tcp; got \"udp\"",
        ),
        case(
            "ports:\n  - {name: web, port: 80, protocol: HTTP}\n",
            "ports[0].protocol",
            5,
            "got \"HTTP\"",
        ),
        case(
            "ports:\n  - {name: web, port: 80}\n  - {name: web, port: 81}\n",
            "ports[1].name",
            6,
            "duplicate port name \"web\"; ports[0] has it",
        ),
        case(
            "ports:\n  - {name: web, port: 80}\n  - {name: api, port: 80}\n",
            "ports[1].port",
            6,
            "port 80 is already used by ports[0]",
        ),
    ]);
}

#[test]
fn routes() {
    check(vec![
        with_ports(
            "routes: {host: a.example.com}\n",
            "routes",
            7,
            "expected a list",
        ),
        with_ports(
            "routes:\n  - port: web\n",
            "routes[0].host",
            8,
            "required field is missing",
        ),
        with_ports(
            "routes:\n  - {host: Example.com, port: web}\n",
            "routes[0].host",
            8,
            "lowercase",
        ),
        with_ports(
            "routes:\n  - {host: \"exa mple.com\", port: web}\n",
            "routes[0].host",
            8,
            "DNS name",
        ),
        with_ports(
            "routes:\n  - {host: \"*.com\", port: web}\n",
            "routes[0].host",
            8,
            "at least two labels",
        ),
        with_ports(
            "routes:\n  - {host: \"a.*.example.com\", port: web}\n",
            "routes[0].host",
            8,
            "only allowed as the whole first label",
        ),
        with_ports(
            "routes:\n  - {host: 5, port: web}\n",
            "routes[0].host",
            8,
            "expected a string, got integer 5",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: web, path: api}\n",
            "routes[0].path",
            8,
            "must start with '/', got \"api\"",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: web, path: /api/}\n",
            "routes[0].path",
            8,
            "must not end with '/'",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: web, path: \"/a b\"}\n",
            "routes[0].path",
            8,
            "' ' is not allowed",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: web, path: \"/a?b=1\"}\n",
            "routes[0].path",
            8,
            "'?' is not allowed",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: web, tls: on}\n",
            "routes[0].tls",
            8,
            "must be one of terminate, passthrough, off; got \"on\"",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: web, tls: true}\n",
            "routes[0].tls",
            8,
            "expected one of terminate, passthrough, off, got boolean true",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: htp}\n",
            "routes[0].port",
            8,
            "no port named \"htp\"; the app's ports are web, db",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: 8080}\n",
            "routes[0].port",
            8,
            "expected a string, got integer 8080",
        ),
        with_ports(
            "routes:\n  - host: a.example.com\n",
            "routes[0].port",
            8,
            "required when the app has more than one port (web, db)",
        ),
        case(
            "routes:\n  - host: a.example.com\n",
            "routes[0].port",
            5,
            "needs a port, and the app has no ports",
        ),
        case(
            "routes:\n  - {host: a.example.com, port: web}\n",
            "routes[0].port",
            5,
            "no port named \"web\": the app has no ports",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: db}\n",
            "routes[0].port",
            8,
            "port \"db\" is tcp: only a `tls: passthrough` route",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: db, tls: terminate}\n",
            "routes[0].port",
            8,
            "is tcp",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: web, redirect_https: true}\n",
            "routes[0].redirect_https",
            8,
            "redirect_https needs `tls: terminate`",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: db, tls: passthrough, hsts: true}\n",
            "routes[0].hsts",
            8,
            "hsts needs `tls: terminate`",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: web, tls: terminate, hsts: yes}\n",
            "routes[0].hsts",
            8,
            "expected true or false",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: web, tls: passthrough, path: /api}\n",
            "routes[0].path",
            8,
            "a passthrough route cannot have a path prefix",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: web}\n  - {host: a.example.com, port: web, path: /}\n",
            "routes[1]",
            9,
            "routes[0] already routes host a.example.com path /",
        ),
        with_ports(
            "routes:\n  - {host: a.example.com, port: db, tls: passthrough}\n  - {host: a.example.com, port: web, path: /x}\n",
            "routes[1]",
            9,
            "has a passthrough route and another one (routes[0])",
        ),
    ]);
}

#[test]
fn health_checks() {
    check(vec![
        with_ports(
            "health: {}\n",
            "health",
            7,
            "needs exactly one of http, tcp or exec",
        ),
        with_ports(
            "health: /healthz\n",
            "health",
            7,
            "expected a map, got string \"/healthz\"",
        ),
        with_ports(
            "health:\n  http: {path: /healthz}\n",
            "health.http.port",
            8,
            "required when the app has more than one port (web, db)",
        ),
        with_ports(
            "health:\n  http: {port: db}\n",
            "health.http.port",
            8,
            "port \"db\" is tcp; an http check needs an http port",
        ),
        with_ports(
            "health:\n  http: {port: nope}\n",
            "health.http.port",
            8,
            "no port named \"nope\"",
        ),
        with_ports(
            "health:\n  http: {port: web, path: healthz}\n",
            "health.http.path",
            8,
            "must start with '/'",
        ),
        with_ports(
            "health:\n  http: /healthz\n",
            "health.http",
            8,
            "expected a map",
        ),
        with_ports(
            "health:\n  http: {port: web}\n  tcp: {port: db}\n",
            "health.tcp",
            9,
            "only one of http, tcp or exec may be set, and http is already",
        ),
        with_ports(
            "health:\n  tcp: {port: nope}\n",
            "health.tcp.port",
            8,
            "no port named \"nope\"",
        ),
        case(
            "health:\n  tcp: {}\n",
            "health.tcp.port",
            5,
            "needs a port, and the app has no ports",
        ),
        case(
            "health:\n  exec: {command: check}\n",
            "health.exec.command",
            5,
            "a single string is not split",
        ),
        case(
            "health:\n  exec: {}\n",
            "health.exec.command",
            5,
            "required field is missing",
        ),
        case(
            "health:\n  exec: {command: []}\n",
            "health.exec.command",
            5,
            "must not be empty",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  interval: 5\n",
            "health.interval",
            9,
            "expected a duration with a unit, like 500ms, 5s, 2m or 1m30s, got integer 5",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  interval: 5 s\n",
            "health.interval",
            9,
            "got \"5 s\"",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  interval: 1.5s\n",
            "health.interval",
            9,
            "use whole numbers of a smaller unit (1500ms, not 1.5s)",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  interval: 5sec\n",
            "health.interval",
            9,
            "got \"5sec\"",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  interval: 500ms\n  timeout: 100ms\n",
            "health.interval",
            9,
            "must be 1s..1h, got 500ms",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  interval: 2h\n",
            "health.interval",
            9,
            "must be 1s..1h, got 2h",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  timeout: 50ms\n",
            "health.timeout",
            9,
            "must be 100ms..1h, got 50ms",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  timeout: 5s\n",
            "health.timeout",
            9,
            "must be shorter than interval (5s), got 5s",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  interval: 1s\n",
            "health.interval",
            9,
            "must be longer than timeout (2s, the default)",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  healthy_threshold: 0\n",
            "health.healthy_threshold",
            9,
            "must be 1..100, got 0",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  unhealthy_threshold: 101\n",
            "health.unhealthy_threshold",
            9,
            "must be 1..100, got 101",
        ),
        with_ports(
            "health:\n  tcp: {port: web}\n  unhealthy_threshold: \"3\"\n",
            "health.unhealthy_threshold",
            9,
            "expected an integer, got string \"3\"",
        ),
    ]);
}

#[test]
fn placement() {
    let c = |constraint: &str, path, message| {
        case(
            &format!("placement:\n  constraints:\n    - {constraint}\n"),
            path,
            6,
            message,
        )
    };
    check(vec![
        case(
            "placement: [eu-1]\n",
            "placement",
            4,
            "expected a map, got a list",
        ),
        case(
            "placement:\n  constraints: {key: disk}\n",
            "placement.constraints",
            5,
            "expected a list",
        ),
        c(
            "disk=ssd",
            "placement.constraints[0]",
            "expected a map, got string \"disk=ssd\"",
        ),
        c(
            "{key: disk, op: \"==\", value: ssd}",
            "placement.constraints[0].op",
            "must be one of =, !=, in, regex; got \"==\"",
        ),
        c(
            "{key: disk, op: !=, value: ssd}",
            "placement.constraints[0].op",
            "`!=` starts a YAML tag; quote it: \"!=\"",
        ),
        c(
            "{key: disk, op: eq, value: ssd}",
            "placement.constraints[0].op",
            "got \"eq\"",
        ),
        c(
            "{op: \"=\", value: ssd}",
            "placement.constraints[0].key",
            "required field is missing",
        ),
        c(
            "{key: disk, value: ssd}",
            "placement.constraints[0].op",
            "required field is missing",
        ),
        c(
            "{key: disk, op: \"=\"}",
            "placement.constraints[0].value",
            "required field is missing",
        ),
        c(
            "{key: \"disk=ssd\", op: \"=\", value: x}",
            "placement.constraints[0].key",
            "must be a label key",
        ),
        c(
            "{key: disk, op: \"=\", value: [ssd]}",
            "placement.constraints[0].value",
            "expected a string, got a list",
        ),
        c(
            "{key: disk, op: in, values: []}",
            "placement.constraints[0].values",
            "must list at least one value",
        ),
        c(
            "{key: disk, op: in, values: ssd}",
            "placement.constraints[0].values",
            "expected a list, got string \"ssd\"",
        ),
        c(
            "{key: disk, op: in, values: [ssd, ssd]}",
            "placement.constraints[0].values[1]",
            "\"ssd\" is listed twice",
        ),
        c(
            "{key: disk, op: regex, value: \"(ssd\"}",
            "placement.constraints[0].value",
            "invalid regex: unclosed group",
        ),
        c(
            "{key: disk, op: regex, value: \"[z-a]\"}",
            "placement.constraints[0].value",
            "invalid regex: invalid character class range",
        ),
        c(
            "{key: disk, op: regex, value: \"a)|(b\"}",
            "placement.constraints[0].value",
            "invalid regex: unopened group",
        ),
        c(
            "{key: disk, op: regex, values: [a], value: a}",
            "placement.constraints[0].values",
            "`values` is for op: in; this op takes one `value`",
        ),
        case(
            "placement:\n  regions: eu-1\n",
            "placement.regions",
            5,
            "expected a list, got string \"eu-1\"",
        ),
        case(
            "placement:\n  regions: [\"eu 1\"]\n",
            "placement.regions[0]",
            5,
            "got \"eu 1\"",
        ),
        case(
            "placement:\n  zones: [eu-1a, eu-1a]\n",
            "placement.zones[1]",
            5,
            "\"eu-1a\" is listed twice",
        ),
        case(
            "placement:\n  roles: [worker, 7]\n",
            "placement.roles[1]",
            5,
            "expected a string, got integer 7",
        ),
        case(
            "placement:\n  spread_zones: \"yes\"\n",
            "placement.spread_zones",
            5,
            "expected true or false, got string \"yes\"",
        ),
        case(
            "placement:\n  strategy: binpack\n",
            "placement.strategy",
            5,
            "must be one of least-allocated, bin-pack; got \"binpack\"",
        ),
    ]);
}

#[test]
fn update_and_restart() {
    check(vec![
        case(
            "update: rolling\n",
            "update",
            4,
            "expected a map, got string \"rolling\"",
        ),
        case(
            "update:\n  max_surge: -1\n",
            "update.max_surge",
            5,
            "must be 0..1000, got -1",
        ),
        case(
            "update:\n  max_unavailable: 1001\n",
            "update.max_unavailable",
            5,
            "must be 0..1000",
        ),
        case(
            "update:\n  max_surge: 25%\n",
            "update.max_surge",
            5,
            "expected an integer, got string \"25%\"",
        ),
        case(
            "update:\n  max_surge: 0\n",
            "update.max_surge",
            5,
            "max_surge and max_unavailable cannot both be 0",
        ),
        case(
            "update:\n  min_ready: 30\n",
            "update.min_ready",
            5,
            "expected a duration with a unit",
        ),
        case(
            "update:\n  min_ready: 2h\n",
            "update.min_ready",
            5,
            "must be 0s..1h, got 2h",
        ),
        case(
            "restart: always\n",
            "restart",
            4,
            "expected a map, got string \"always\"",
        ),
        case(
            "restart:\n  policy: sometimes\n",
            "restart.policy",
            5,
            "must be one of always, on-failure, never; got \"sometimes\"",
        ),
        case(
            "restart:\n  policy: on_failure\n",
            "restart.policy",
            5,
            "got \"on_failure\"",
        ),
        case(
            "restart:\n  backoff: 1s\n",
            "restart.backoff",
            5,
            "expected a map",
        ),
        case(
            "restart:\n  backoff:\n    initial: 50ms\n",
            "restart.backoff.initial",
            6,
            "must be 100ms..10m, got 50ms",
        ),
        case(
            "restart:\n  backoff:\n    max: 2h\n",
            "restart.backoff.max",
            6,
            "must be 1s..1h, got 2h",
        ),
        case(
            "restart:\n  backoff:\n    max: 500ms\n",
            "restart.backoff.max",
            6,
            "must be 1s..1h",
        ),
        case(
            "restart:\n  backoff:\n    initial: 2m\n    max: 1m\n",
            "restart.backoff.max",
            7,
            "must be at least initial (2m), got 1m",
        ),
        case(
            "restart:\n  backoff:\n    initial: 2m\n",
            "restart.backoff.initial",
            6,
            "must be at most max (1m, the default), got 2m",
        ),
    ]);
}

#[test]
fn yaml_features_a_manifest_does_not_use() {
    check(vec![
        case(
            "env: &common\n  A: b\n",
            "env",
            4,
            "anchors (&name) and aliases (*name) are not supported",
        ),
        case(
            "ports:\n  - &p {name: web, port: 80}\n",
            "ports[0]",
            5,
            "anchors",
        ),
        case(
            "instances: !!int 3\n",
            "instances",
            4,
            "YAML tags (tag:yaml.org,2002:!int) are not supported in manifests",
        ),
        case(
            "env:\n  A: !secret x\n",
            "env.A",
            5,
            "YAML tags (!secret) are not supported",
        ),
        // BASE is the first document, implicitly started.
        case(
            "---\ninstances: 1\n",
            "",
            4,
            "a manifest is one YAML document; found a second one",
        ),
        whole(
            "---\nname: web\nproject: acme\nimage: nginx\n...\n---\nname: api\n",
            "",
            6,
            "a manifest is one YAML document",
        ),
        whole(
            "name: web\nname: api\nproject: acme\nimage: nginx\n",
            "name",
            2,
            "duplicate key; it is set already on line 1",
        ),
        case("? [a, b]\n: c\n", "", 4, "keys must be strings, got a list"),
        whole("", "", 1, "the manifest is empty"),
        whole("# nothing yet\n", "", 1, "the manifest is empty"),
        whole("~\n", "", 1, "the manifest is empty"),
        whole(
            "- name: web\n",
            "",
            1,
            "expected a map of manifest fields (name, project, image, ...), got a list",
        ),
        whole("web\n", "", 1, "got string \"web\""),
    ]);
}

#[test]
fn an_anchor_and_its_alias_are_each_reported() {
    let found = problems(&format!(
        "{BASE}resources: {{cpu_millis: &c 100, memory_mb: *c}}\n"
    ));
    let found: Vec<(usize, usize, &str)> = found
        .iter()
        .map(|p| (p.line, p.column, p.path.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (4, 25, "resources.cpu_millis"),
            (4, 44, "resources.memory_mb")
        ]
    );
}

#[test]
fn deep_nesting_is_rejected_not_overflowed() {
    let deep = format!("{BASE}command: {}{}\n", "[".repeat(200), "]".repeat(200));
    let found = problems(&deep);
    // The outer list is also not a list of strings; the nesting is reported
    // once, where it goes too deep.
    let nested: Vec<&Problem> = found
        .iter()
        .filter(|p| p.message.contains("nested deeper than 64 levels"))
        .collect();
    assert_eq!(nested.len(), 1, "{found:?}");
    // The top-level map is level 1, so the 64th bracket (column 10 + 63) is
    // level 65.
    assert_eq!((nested[0].line, nested[0].column), (4, 10 + 63));
    // saphyr-parser has its own limit (256) for what is deeper still.
    let deeper = format!(
        "{BASE}command: {}{}\n",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let found = problems(&deeper);
    assert!(
        found[0].message.contains("recursion limit exceeded"),
        "{found:?}"
    );
    let json = format!("{{\"command\": {}{}}}", "[".repeat(100), "]".repeat(100));
    let err = keel_manifest::parse_json(&json).unwrap_err();
    assert!(
        err.to_string().contains("nested deeper than 64 levels"),
        "{err}"
    );
    let json = format!(
        "{{\"command\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let err = keel_manifest::parse_json(&json).unwrap_err();
    assert!(
        err.to_string().contains("nested deeper than 64 levels"),
        "{err}"
    );
}

#[test]
fn oversized_manifests_are_rejected_before_parsing() {
    let big = format!(
        "{BASE}# {}\n",
        "x".repeat(keel_manifest::MAX_MANIFEST_BYTES)
    );
    let found = problems(&big);
    assert_eq!(found.len(), 1);
    assert!(
        found[0].message.contains("at most 1048576 are accepted"),
        "{found:?}"
    );
}

#[test]
fn listen_port_routes() {
    check(vec![
        with_ports(
            "routes:\n  - {listen_port: 0, port: db}\n",
            "routes[0].listen_port",
            8,
            "must be 1..65535, got 0",
        ),
        with_ports(
            "routes:\n  - {listen_port: 65536, port: db}\n",
            "routes[0].listen_port",
            8,
            "must be 1..65535, got 65536",
        ),
        with_ports(
            "routes:\n  - {listen_port: -1, port: db}\n",
            "routes[0].listen_port",
            8,
            "must be 1..65535, got -1",
        ),
        with_ports(
            "routes:\n  - {listen_port: \"5432\", port: db}\n",
            "routes[0].listen_port",
            8,
            "expected an integer, got string \"5432\"",
        ),
        with_ports(
            "routes:\n  - {listen_port: 54.32, port: db}\n",
            "routes[0].listen_port",
            8,
            "expected an integer",
        ),
        with_ports(
            "routes:\n  - {listen_port: 5432, port: web}\n",
            "routes[0].port",
            8,
            "port \"web\" is http: a listen_port route forwards raw TCP",
        ),
        case(
            "ports: [{name: web, port: 80}]\nroutes:\n  - listen_port: 5432\n",
            "routes[0].port",
            6,
            "port \"web\" is http",
        ),
        with_ports(
            "routes:\n  - listen_port: 5432\n",
            "routes[0].port",
            8,
            "required when the app has more than one port (web, db)",
        ),
        with_ports(
            "routes:\n  - {listen_port: 5432, port: dbb}\n",
            "routes[0].port",
            8,
            "no port named \"dbb\"",
        ),
        with_ports(
            "routes:\n  - {listen_port: 5432, port: db, host: db.example.com}\n",
            "routes[0].host",
            8,
            "not allowed with listen_port: the route is chosen by its port",
        ),
        with_ports(
            "routes:\n  - {listen_port: 5432, port: db, path: /}\n",
            "routes[0].path",
            8,
            "not allowed with listen_port: the router forwards raw TCP and never sees a path",
        ),
        with_ports(
            "routes:\n  - {listen_port: 5432, port: db, tls: passthrough}\n",
            "routes[0].tls",
            8,
            "not allowed with listen_port",
        ),
        with_ports(
            "routes:\n  - {listen_port: 5432, port: db, tls: off}\n",
            "routes[0].tls",
            8,
            "not allowed with listen_port",
        ),
        with_ports(
            "routes:\n  - {listen_port: 5432, port: db, redirect_https: false}\n",
            "routes[0].redirect_https",
            8,
            "not allowed with listen_port",
        ),
        with_ports(
            "routes:\n  - {listen_port: 5432, port: db, hsts: true}\n",
            "routes[0].hsts",
            8,
            "not allowed with listen_port",
        ),
        with_ports(
            "routes:\n  - {listen_port: 5432, port: db}\n  - {listen_port: 5432, port: db}\n",
            "routes[1].listen_port",
            9,
            "routes[0] already listens on port 5432",
        ),
        with_ports(
            "routes:\n  - {listen_port: 5432, port: db, listen-port: 1}\n",
            "routes[0].listen-port",
            8,
            "unknown field",
        ),
        with_ports(
            "routes:\n  - {port: web}\n",
            "routes[0].host",
            8,
            "required field is missing (or listen_port, for a plain TCP route)",
        ),
        with_ports(
            "routes:\n  - {host: db.example.com, port: db}\n",
            "routes[0].port",
            8,
            "or a route with `listen_port` (plain TCP) can reach a tcp port",
        ),
    ]);
}
