//! Manifests that are right: what they parse to, the defaults, and the
//! canonical form that decides whether an apply makes a new revision.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use keel_manifest::{
    AppManifest, Backoff, Constraint, ConstraintOp, HealthCheck, HostRoute, Instances, Placement,
    Port, Probe, Protocol, Resources, Restart, RestartPolicy, Route, Strategy, TcpRoute, TlsMode,
    Update, anchored_regex, parse_json, parse_yaml,
};

const EXAMPLE_YAML: &str = include_str!("../examples/app.yaml");
const EXAMPLE_JSON: &str = include_str!("../examples/app.json");
const MINIMAL: &str = "name: web\nproject: acme\nimage: nginx:1.27\n";

fn yaml(text: &str) -> AppManifest {
    parse_yaml(text).unwrap_or_else(|e| panic!("rejected:\n{text}\n{e}"))
}

fn canonical(text: &str) -> String {
    String::from_utf8(yaml(text).canonical_json()).unwrap()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn route(host: &str, path: &str, port: &str, tls: TlsMode) -> Route {
    Route::Host(HostRoute {
        host: host.into(),
        path: path.into(),
        port: port.into(),
        tls,
        redirect_https: false,
        hsts: false,
    })
}

fn tcp_route(listen_port: u16, port: &str) -> Route {
    Route::Tcp(TcpRoute {
        listen_port,
        port: port.into(),
    })
}

/// The host route at `i`, or a panic naming what is there instead.
fn host_route(m: &AppManifest, i: usize) -> &HostRoute {
    match &m.routes[i] {
        Route::Host(route) => route,
        other => panic!("routes[{i}] is not a host route: {other:?}"),
    }
}

#[test]
fn the_full_example_parses_to_exactly_this() {
    let want = AppManifest {
        name: "shop".into(),
        project: "acme".into(),
        image: "registry.example.com/acme/shop:1.4.2".into(),
        command: Some(strings(&["/usr/local/bin/shop", "serve", "--workers", "4"])),
        env: BTreeMap::from([
            ("RUST_LOG".into(), "info".into()),
            ("PORT".into(), "8080".into()),
            (
                "DATABASE_URL".into(),
                "postgres://shop@db.acme.internal/shop".into(),
            ),
        ]),
        resources: Resources {
            cpu_millis: 500,
            memory_mb: 512,
        },
        instances: Instances::Count(3),
        ports: vec![
            Port {
                name: "web".into(),
                port: 8080,
                protocol: Protocol::Http,
            },
            Port {
                name: "metrics".into(),
                port: 9090,
                protocol: Protocol::Http,
            },
            Port {
                name: "grpc-tls".into(),
                port: 8443,
                protocol: Protocol::Tcp,
            },
        ],
        routes: vec![
            route("shop.example.com", "/", "web", TlsMode::Terminate),
            route("shop.example.com", "/api", "web", TlsMode::Terminate),
            route("*.shop.example.com", "/", "web", TlsMode::Off),
            route(
                "grpc.shop.example.com",
                "/",
                "grpc-tls",
                TlsMode::Passthrough,
            ),
            tcp_route(8443, "grpc-tls"),
        ],
        health: Some(HealthCheck {
            probe: Probe::Http {
                port: "web".into(),
                path: "/healthz".into(),
            },
            interval_ms: 10_000,
            timeout_ms: 1_500,
            healthy_threshold: 2,
            unhealthy_threshold: 5,
        }),
        placement: Placement {
            constraints: vec![
                Constraint {
                    key: "disk".into(),
                    op: ConstraintOp::Eq {
                        value: "ssd".into(),
                    },
                },
                Constraint {
                    key: "example.com/generation".into(),
                    op: ConstraintOp::Ne { value: "1".into() },
                },
                Constraint {
                    key: "zone".into(),
                    op: ConstraintOp::In {
                        values: strings(&["eu-1a", "eu-1b", "eu-1c"]),
                    },
                },
                Constraint {
                    key: "kernel".into(),
                    op: ConstraintOp::Regex {
                        value: r"6\.[0-9]+\..*".into(),
                    },
                },
            ],
            regions: strings(&["eu-1"]),
            zones: vec![],
            roles: strings(&["worker"]),
            spread_zones: true,
            strategy: Strategy::BinPack,
        },
        update: Update {
            max_surge: 2,
            max_unavailable: 1,
            min_ready_ms: 30_000,
        },
        restart: Restart {
            policy: RestartPolicy::OnFailure,
            backoff: Backoff {
                initial_ms: 500,
                max_ms: 120_000,
            },
        },
    };
    assert_eq!(yaml(EXAMPLE_YAML), want);
}

#[test]
fn the_json_example_is_the_same_app_as_the_yaml_one() {
    let from_json = parse_json(EXAMPLE_JSON).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(from_json, yaml(EXAMPLE_YAML));
    assert_eq!(
        from_json.canonical_json(),
        yaml(EXAMPLE_YAML).canonical_json()
    );
}

#[test]
fn defaults_are_filled_in() {
    let want = AppManifest {
        name: "web".into(),
        project: "acme".into(),
        image: "nginx:1.27".into(),
        command: None,
        env: BTreeMap::new(),
        resources: Resources {
            cpu_millis: 100,
            memory_mb: 128,
        },
        instances: Instances::Count(1),
        ports: vec![],
        routes: vec![],
        health: None,
        placement: Placement {
            constraints: vec![],
            regions: vec![],
            zones: vec![],
            roles: vec![],
            spread_zones: true,
            strategy: Strategy::LeastAllocated,
        },
        update: Update {
            max_surge: 1,
            max_unavailable: 0,
            min_ready_ms: 0,
        },
        restart: Restart {
            policy: RestartPolicy::Always,
            backoff: Backoff {
                initial_ms: 1_000,
                max_ms: 60_000,
            },
        },
    };
    assert_eq!(yaml(MINIMAL), want);
}

#[test]
fn defaults_inside_sections_are_filled_in() {
    let m = yaml(&format!(
        "{MINIMAL}ports:\n  - {{name: web, port: 80}}\nroutes:\n  - host: a.example.com\n\
         health:\n  http: {{}}\n"
    ));
    assert_eq!(m.ports[0].protocol, Protocol::Http);
    assert_eq!(m.routes, [route("a.example.com", "/", "web", TlsMode::Off)]);
    let health = m.health.unwrap();
    assert_eq!(
        health.probe,
        Probe::Http {
            port: "web".into(),
            path: "/".into()
        }
    );
    assert_eq!(
        (
            health.interval_ms,
            health.timeout_ms,
            health.healthy_threshold,
            health.unhealthy_threshold
        ),
        (5_000, 2_000, 1, 3)
    );
}

#[test]
fn canonical_json_spells_out_every_default() {
    assert_eq!(
        canonical(MINIMAL),
        concat!(
            r#"{"name":"web","project":"acme","image":"nginx:1.27","env":{},"#,
            r#""resources":{"cpu_millis":100,"memory_mb":128},"instances":1,"ports":[],"#,
            r#""routes":[],"placement":{"constraints":[],"regions":[],"zones":[],"roles":[],"#,
            r#""spread_zones":true,"strategy":"least-allocated"},"#,
            r#""update":{"max_surge":1,"max_unavailable":0,"min_ready":"0s"},"#,
            r#""restart":{"policy":"always","backoff":{"initial":"1s","max":"1m"}}}"#
        )
    );
}

#[test]
fn explicit_defaults_make_no_new_revision() {
    let explicit = "name: web\nproject: acme\nimage: nginx:1.27\nenv: {}\n\
        resources: {cpu_millis: 100, memory_mb: 128}\ninstances: 1\nglobal: false\nports: []\n\
        routes: []\nplacement:\n  spread_zones: true\n  strategy: least-allocated\n\
        update: {max_surge: 1, max_unavailable: 0, min_ready: 0s}\n\
        restart: {policy: always, backoff: {initial: 1000ms, max: 60s}}\n";
    assert_eq!(canonical(explicit), canonical(MINIMAL));
}

#[test]
fn canonical_json_is_stable_under_key_reordering() {
    let a = "name: web\nproject: acme\nimage: nginx\n\
        env:\n  B: two\n  A: one\n\
        resources:\n  cpu_millis: 250\n  memory_mb: 64\n\
        ports:\n  - name: web\n    port: 80\n    protocol: http\n\
        health:\n  http: {port: web, path: /h}\n  timeout: 1s\n  interval: 3s\n\
        placement:\n  constraints:\n    - {key: disk, op: \"=\", value: ssd}\n  roles: [worker]\n\
        restart:\n  backoff: {max: 30s, initial: 2s}\n  policy: never\n";
    let b = "restart:\n  policy: never\n  backoff: {initial: 2s, max: 30s}\n\
        placement:\n  roles: [worker]\n  constraints:\n    - {value: ssd, op: \"=\", key: disk}\n\
        health:\n  interval: 3s\n  timeout: 1s\n  http: {path: /h, port: web}\n\
        ports:\n  - protocol: http\n    port: 80\n    name: web\n\
        resources: {memory_mb: 64, cpu_millis: 250}\n\
        env: {A: one, B: two}\n\
        image: nginx\nproject: acme\nname: web\n";
    assert_eq!(canonical(a), canonical(b));
    assert_eq!(
        yaml(a).canonical_json(),
        yaml(a).canonical_json(),
        "deterministic"
    );
}

#[test]
fn the_same_duration_spelled_differently_is_the_same_manifest() {
    let with = |interval: &str| {
        canonical(&format!(
            "{MINIMAL}ports: [{{name: web, port: 80}}]\nhealth:\n  tcp: {{}}\n  interval: {interval}\n"
        ))
    };
    assert_eq!(with("60s"), with("1m"));
    assert_eq!(with("60000ms"), with("1m"));
    assert_eq!(with("1m30s"), with("90s"));
    assert!(with("90s").contains(r#""interval":"90s""#));
    assert_ne!(with("1m"), with("2m"));
}

#[test]
fn json_and_yaml_of_the_same_manifest_are_equal() {
    let yaml_text = "name: api\nproject: acme\nimage: api:2\nglobal: true\n\
        env: {A: \"1\", B: x}\nports: [{name: http, port: 8080}]\n\
        routes: [{host: api.example.com, path: /v1, tls: terminate}]\n\
        health: {exec: {command: [/bin/check, --quick]}}\n\
        placement: {zones: [eu-1a], spread_zones: false}\n";
    let json_text = r#"{
        "name": "api", "project": "acme", "image": "api:2", "global": true,
        "env": {"A": "1", "B": "x"},
        "ports": [{"name": "http", "port": 8080}],
        "routes": [{"host": "api.example.com", "path": "/v1", "tls": "terminate"}],
        "health": {"exec": {"command": ["/bin/check", "--quick"]}},
        "placement": {"zones": ["eu-1a"], "spread_zones": false}
    }"#;
    let from_json = parse_json(json_text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(from_json, yaml(yaml_text));
    assert_eq!(from_json.instances, Instances::Global);
}

#[test]
fn canonical_json_reads_back_to_the_same_manifest_and_bytes() {
    let global = format!("{MINIMAL}global: true\n");
    for text in [EXAMPLE_YAML, MINIMAL, global.as_str()] {
        let manifest = yaml(text);
        let bytes = manifest.canonical_json();
        let json = std::str::from_utf8(&bytes).unwrap();
        let parsed = parse_json(json).unwrap_or_else(|e| panic!("{json}\n{e}"));
        assert_eq!(parsed, manifest);
        let deserialized: AppManifest = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(deserialized, manifest);
        assert_eq!(deserialized.canonical_json(), bytes);
        // YAML is a superset of JSON: the canonical form is a YAML manifest too.
        assert_eq!(yaml(json), manifest);
    }
}

#[test]
fn deserialize_validates_like_the_parsers() {
    let err = serde_json::from_str::<AppManifest>(
        r#"{"name": "Web", "project": "acme", "image": "x", "instances": 5000, "typo": 1}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("name: must be a DNS label"), "{err}");
    assert!(
        err.contains("instances: must be 0..1000, got 5000"),
        "{err}"
    );
    assert!(err.contains("typo: unknown field"), "{err}");
    // No positions: the text is not this crate's to see.
    assert!(!err.contains("1:"), "{err}");
}

#[test]
fn global_and_instance_counts() {
    assert_eq!(
        yaml(&format!("{MINIMAL}global: true\n")).instances,
        Instances::Global
    );
    assert_eq!(
        yaml(&format!("{MINIMAL}global: false\ninstances: 4\n")).instances,
        Instances::Count(4)
    );
    assert_eq!(
        yaml(&format!("{MINIMAL}global: false\n")).instances,
        Instances::Count(1)
    );
    assert_eq!(
        yaml(&format!("{MINIMAL}instances: 0\n")).instances,
        Instances::Count(0)
    );
    assert_eq!(
        yaml(&format!("{MINIMAL}instances: 1000\n")).instances,
        Instances::Count(1000)
    );
    assert!(canonical(&format!("{MINIMAL}global: true\n")).contains(r#""global":true"#));
    assert!(!canonical(&format!("{MINIMAL}global: true\n")).contains("instances"));
}

#[test]
fn free_text_takes_numbers_and_booleans_as_written() {
    let m = yaml(&format!(
        "{MINIMAL}command: [sleep, 3600, 1.50, true]\n\
         env:\n  PORT: 8080\n  RATIO: 1.10\n  DEBUG: True\n  HEX: 0x1F\n  YES: yes\n  EMPTY: \"\"\n\
         placement:\n  constraints:\n    - {{key: gen, op: in, values: [3, 4]}}\n"
    ));
    assert_eq!(m.command, Some(strings(&["sleep", "3600", "1.50", "true"])));
    let env: Vec<(&str, &str)> = m
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        env,
        [
            ("DEBUG", "True"),
            ("EMPTY", ""),
            ("HEX", "0x1F"),
            ("PORT", "8080"),
            ("RATIO", "1.10"),
            ("YES", "yes"),
        ]
    );
    assert_eq!(
        m.placement.constraints[0].op,
        ConstraintOp::In {
            values: strings(&["3", "4"])
        }
    );
}

#[test]
fn null_sections_are_the_same_as_absent_ones() {
    let with_nulls = format!(
        "{MINIMAL}command:\nenv:\nresources:\ninstances: ~\nports: null\nroutes:\nhealth:\n\
         placement:\nupdate:\nrestart:\n"
    );
    assert_eq!(yaml(&with_nulls), yaml(MINIMAL));
}

#[test]
fn scalars_in_any_yaml_style_are_strings_when_quoted_or_block() {
    let m = yaml(
        "name: 'web'\nproject: \"acme\"\nimage: >-\n  nginx:1.27\n\
         env:\n  SCRIPT: |\n    echo hi\n    exit 0\n  N: '42'\n",
    );
    assert_eq!(m.name, "web");
    assert_eq!(m.image, "nginx:1.27");
    assert_eq!(m.env["SCRIPT"], "echo hi\nexit 0\n");
    assert_eq!(m.env["N"], "42");
}

#[test]
fn regex_constraints_are_whole_value_matches() {
    let m = yaml(EXAMPLE_YAML);
    let patterns: Vec<&str> = m
        .placement
        .constraints
        .iter()
        .filter_map(|c| match &c.op {
            ConstraintOp::Regex { value } => Some(value.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(patterns, [r"6\.[0-9]+\..*"]);
    let re = anchored_regex(patterns[0]).unwrap();
    assert!(re.is_match("6.1.0-13-amd64"));
    assert!(!re.is_match("5.6.1"));
    assert!(!re.is_match("linux-6.1.0"));
}

#[test]
fn a_single_port_is_the_default_for_routes_and_checks() {
    let m = yaml(&format!(
        "{MINIMAL}ports: [{{name: db, port: 5432, protocol: tcp}}]\n\
         routes: [{{host: db.example.com, tls: passthrough}}]\nhealth: {{tcp: {{}}}}\n"
    ));
    assert_eq!(
        m.routes,
        [route("db.example.com", "/", "db", TlsMode::Passthrough)]
    );
    assert_eq!(m.health.unwrap().probe, Probe::Tcp { port: "db".into() });
}

#[test]
fn hosts_may_share_routes_by_path_and_wildcards() {
    let m = yaml(&format!(
        "{MINIMAL}ports: [{{name: web, port: 80}}, {{name: api, port: 81}}]\n\
         routes:\n  - {{host: example.com, port: web}}\n  - {{host: example.com, path: /api, port: api}}\n\
         \x20 - {{host: \"*.example.com\", port: web, tls: terminate}}\n"
    ));
    assert_eq!(m.routes.len(), 3);
    assert_eq!(host_route(&m, 1).path, "/api");
    assert_eq!(host_route(&m, 2).host, "*.example.com");
}

#[test]
fn a_document_start_marker_and_comments_are_fine() {
    let m = yaml("# my app\n---\nname: web # the name\nproject: acme\nimage: nginx\n...\n");
    assert_eq!(m.name, "web");
}

#[test]
fn the_examples_in_the_reference_are_valid() {
    let reference = include_str!("../REFERENCE.md");
    let blocks: Vec<&str> = reference
        .split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .collect();
    assert_eq!(blocks.len(), 4, "the reference's YAML examples");
    for block in blocks {
        let text = if block.starts_with("constraints:") {
            let indented: String = block.lines().map(|l| format!("  {l}\n")).collect();
            format!("{MINIMAL}placement:\n{indented}")
        } else if block.starts_with("ports:") {
            format!("{MINIMAL}{block}")
        } else {
            block.to_owned()
        };
        yaml(&text);
    }
    // The complete example is examples/app.yaml.
    let complete = reference
        .split("## A complete example\n\n```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap();
    assert_eq!(yaml(complete), yaml(EXAMPLE_YAML));
}

#[test]
fn terminated_routes_may_redirect_to_https_and_send_hsts() {
    let app = yaml(
        "name: web\nproject: acme\nimage: nginx:1\nports: [{name: web, port: 80}]\n\
         routes:\n  - {host: a.example.com, tls: terminate, redirect_https: true, hsts: true}\n\
         \x20 - {host: b.example.com, tls: terminate}\n",
    );
    let (a, b) = (host_route(&app, 0), host_route(&app, 1));
    assert!(a.redirect_https && a.hsts);
    assert!(!b.redirect_https && !b.hsts);
    // Off by default and then absent from the canonical form, so that
    // manifests stored before these fields existed keep their bytes.
    let json = String::from_utf8(app.canonical_json()).unwrap();
    assert_eq!(json.matches("redirect_https").count(), 1, "{json}");
    assert_eq!(yaml(&json).routes, app.routes);
}

#[test]
fn tcp_ports_are_routed_by_listen_port() {
    let app = yaml(&format!(
        "{MINIMAL}ports:\n  - {{name: web, port: 80}}\n  - {{name: db, port: 5432, protocol: tcp}}\n\
         \x20 - {{name: cache, port: 6379, protocol: tcp}}\n\
         routes:\n  - {{host: a.example.com, port: web}}\n  - {{listen_port: 5432, port: db}}\n\
         \x20 - {{listen_port: 15432, port: db}}\n  - {{listen_port: 6379, port: cache}}\n\
         \x20 - {{host: db.example.com, port: db, tls: passthrough}}\n"
    ));
    assert_eq!(
        app.routes[1..4],
        [
            tcp_route(5432, "db"),
            tcp_route(15432, "db"),
            tcp_route(6379, "cache")
        ]
    );
    assert_eq!(app.routes[4].port(), "db");
    // The canonical form has only the two fields, and reads back the same.
    let json = String::from_utf8(app.canonical_json()).unwrap();
    assert!(
        json.contains(r#"{"listen_port":5432,"port":"db"}"#),
        "{json}"
    );
    assert_eq!(yaml(&json), app);
    assert_eq!(parse_json(&json).unwrap(), app);
}

#[test]
fn a_listen_port_route_defaults_to_the_only_port_and_takes_the_whole_range() {
    let app = yaml(&format!(
        "{MINIMAL}ports: [{{name: db, port: 5432, protocol: tcp}}]\n\
         routes: [{{listen_port: 1}}, {{listen_port: 65535, host: ~, tls: null}}]\n"
    ));
    assert_eq!(app.routes, [tcp_route(1, "db"), tcp_route(65535, "db")]);
}
