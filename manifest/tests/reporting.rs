//! How problems are reported: all at once, in document order, with exact
//! lines and columns, from YAML and from JSON, syntax errors included.

#![allow(clippy::unwrap_used)]

use keel_manifest::{Format, ManifestErrors, Problem, parse, parse_json, parse_yaml};

fn positions(errors: &ManifestErrors) -> Vec<(usize, usize, &str)> {
    errors
        .problems()
        .iter()
        .map(|p| (p.line, p.column, p.path.as_str()))
        .collect()
}

#[test]
fn every_problem_is_reported_at_once_in_document_order() {
    let text = "\
name: Web
project: acme
image: nginx
instances: three
global: true
resources:
  memory: 512
ports:
  - name: http
    port: 8080
  - name: admin
    port: 70000
routes:
  - host: shop.example.com
    port: htpp
health:
  http:
    port: http
  timeout: 10s
placement:
  constraints:
    - key: disk
      op: regex
      value: \"(ssd\"
env:
  1BAD: x
";
    let errors = parse_yaml(text).unwrap_err();
    assert_eq!(
        positions(&errors),
        [
            (1, 7, "name"),
            (4, 12, "instances"),
            (5, 9, "global"),
            (7, 3, "resources.memory"),
            (12, 11, "ports[1].port"),
            (15, 11, "routes[0].port"),
            (19, 12, "health.timeout"),
            (24, 14, "placement.constraints[0].value"),
            (26, 3, "env.1BAD"),
        ]
    );
    assert_eq!(
        errors.to_string(),
        "\
1:7: name: must be a DNS label: 1 to 63 lowercase letters, digits or '-', starting with a letter and not ending with '-', got \"Web\"
4:12: instances: expected an integer, got string \"three\"
5:9: global: set instances or global: true, not both (global runs one instance on every node that matches the placement)
7:3: resources.memory: unknown field; expected one of cpu_millis, memory_mb (did you mean memory_mb?)
12:11: ports[1].port: must be 1..65535, got 70000
15:11: routes[0].port: no port named \"htpp\"; the app's ports are http, admin
19:12: health.timeout: must be shorter than interval (5s), got 10s
24:14: placement.constraints[0].value: invalid regex: unclosed group
26:3: env.1BAD: environment variable names must match [A-Za-z_][A-Za-z0-9_]*, got \"1BAD\""
    );
}

#[test]
fn json_problems_have_lines_and_columns_too() {
    let text = r#"{
  "name": "web",
  "project": "acme",
  "image": "nginx",
  "instances": "3",
  "ports": [
    {"name": "http", "port": 8080, "protocol": "udp"}
  ],
  "env": {"A": "x", "A": "y"},
  "restart": {"policy": "always", "backof": {}}
}"#;
    let errors = parse_json(text).unwrap_err();
    assert_eq!(
        positions(&errors),
        [
            (5, 16, "instances"),
            (7, 48, "ports[0].protocol"),
            (9, 21, "env.A"),
            (10, 35, "restart.backof"),
        ]
    );
    let messages: Vec<&str> = errors
        .problems()
        .iter()
        .map(|p| p.message.as_str())
        .collect();
    assert_eq!(
        messages,
        [
            "expected an integer, got string \"3\"",
            "must be one of http, tcp; got \"udp\"",
            "duplicate key; it is set already on line 9",
            "unknown field; expected one of policy, backoff (did you mean backoff?)",
        ]
    );
}

#[test]
fn a_missing_field_points_at_its_map() {
    let errors = parse_yaml("name: web\nproject: acme\nimage: nginx\nports:\n  - protocol: tcp\n")
        .unwrap_err();
    assert_eq!(
        positions(&errors),
        [(5, 5, "ports[0].name"), (5, 5, "ports[0].port")]
    );
    assert_eq!(errors.problems()[0].message, "required field is missing");
}

#[test]
fn yaml_syntax_errors_have_a_line_and_column() {
    let cases = [
        // An unclosed flow list: the parser notices at the next key.
        (
            "name: web\nproject: [acme\nimage: x\n",
            3,
            6,
            "illegal placement of ':' indicator",
        ),
        (
            "name: web\n  project: acme\n",
            2,
            10,
            "mapping values are not allowed in this context",
        ),
        (
            "name: web\nenv:\n\tA: b\n",
            3,
            2,
            "tabs disallowed within this context",
        ),
        ("name: web\n- a\n", 2, 3, "did not find expected key"),
        (
            "name: \"web\nproject: acme\n",
            1,
            7,
            "invalid indentation in quoted scalar",
        ),
    ];
    for (text, line, column, message) in cases {
        let errors = parse_yaml(text).unwrap_err();
        let [problem] = errors.problems() else {
            panic!("one problem expected for {text:?}: {errors}")
        };
        assert_eq!(
            (problem.line, problem.column),
            (line, column),
            "{text:?}: {errors}"
        );
        assert_eq!(problem.path, "");
        assert!(
            problem.message.starts_with("YAML syntax error: "),
            "{errors}"
        );
        assert!(problem.message.contains(message), "{text:?}: {errors}");
    }
}

#[test]
fn json_syntax_errors_have_a_line_and_column() {
    let cases = [
        (
            "{\n  \"name\": \"web\",\n  \"project\": \"acme\",\n}\n",
            4,
            1,
            "trailing comma",
        ),
        (
            "{\n  \"name\": \"web\"\n  \"project\": \"acme\"\n}\n",
            3,
            3,
            "expected `,` or `}`",
        ),
        (
            "{\n  // a comment\n  \"name\": \"web\"\n}\n",
            2,
            3,
            "key must be a string",
        ),
        ("{\n  \"name\": 'web'\n}\n", 2, 11, "expected value"),
        ("{\n  name: \"web\"\n}\n", 2, 3, "key must be a string"),
        ("{\"name\": \"web\"} x", 1, 17, "trailing characters"),
        (
            "{\n  \"name\": \"web\",\n",
            3,
            1,
            "EOF while parsing an object",
        ),
        ("", 1, 1, "EOF while parsing a value"),
        ("{\"instances\": 01}", 1, 16, "invalid number"),
        (
            "{\"command\": [\"a\",\n  ]}",
            2,
            3,
            "trailing comma (expected value)",
        ),
        // Columns count characters, not bytes.
        ("{\"name\": \"wéb\" \"x\"}", 1, 16, "expected `,` or `}`"),
    ];
    for (text, line, column, message) in cases {
        let errors = parse_json(text).unwrap_err();
        let [problem] = errors.problems() else {
            panic!("one problem expected for {text:?}: {errors}")
        };
        assert_eq!(
            (problem.line, problem.column),
            (line, column),
            "{text:?}: {errors}"
        );
        assert_eq!(problem.path, "");
        assert!(
            problem.message.starts_with("JSON syntax error: "),
            "{errors}"
        );
        assert!(problem.message.contains(message), "{text:?}: {errors}");
    }
}

#[test]
fn json_is_not_yaml() {
    // Valid YAML (and YAML's flow style), but not JSON.
    for text in [
        "name: web\nproject: acme\nimage: nginx\n",
        "{name: web, project: acme, image: nginx}",
    ] {
        let errors = parse_json(text).unwrap_err();
        assert!(errors.to_string().contains("JSON syntax error"), "{errors}");
    }
}

#[test]
fn json_escapes_mean_what_json_says() {
    let m = parse_json(
        r#"{"name": "web", "project": "acme", "image": "nginx",
            "env": {"EMOJI": "\ud83d\ude00", "TAB": "a\tb", "SLASH": "a\/b"}}"#,
    )
    .unwrap();
    assert_eq!(m.env["EMOJI"], "😀");
    assert_eq!(m.env["TAB"], "a\tb");
    assert_eq!(m.env["SLASH"], "a/b");
}

#[test]
fn parse_dispatches_on_the_format() {
    let yaml = "name: web\nproject: acme\nimage: nginx\n";
    let json = r#"{"name": "web", "project": "acme", "image": "nginx"}"#;
    assert_eq!(
        parse(yaml, Format::Yaml).unwrap(),
        parse(json, Format::Json).unwrap()
    );
    assert!(parse(yaml, Format::Json).is_err());
}

#[test]
fn problems_serialize_for_the_api() {
    let errors = parse_yaml("name: web\nproject: acme\nimage: nginx\ninstances: -1\n").unwrap_err();
    let json = serde_json::to_value(errors.problems()).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{
            "path": "instances",
            "line": 4,
            "column": 12,
            "message": "must be 0..1000, got -1",
        }])
    );
}

#[test]
fn display_leaves_out_what_is_unknown() {
    let problem = |path: &str, line| Problem {
        path: path.into(),
        line,
        column: 3,
        message: "bad".into(),
    };
    assert_eq!(
        problem("ports[0].port", 2).to_string(),
        "2:3: ports[0].port: bad"
    );
    assert_eq!(problem("", 2).to_string(), "2:3: bad");
    assert_eq!(problem("name", 0).to_string(), "name: bad");
}

#[test]
fn an_error_is_one_line_per_problem_for_a_cli_to_prefix() {
    let errors = parse_yaml("name: Web\nproject: Acme\nimage: nginx\n").unwrap_err();
    let prefixed: Vec<String> = errors
        .to_string()
        .lines()
        .map(|line| format!("app.yaml:{line}"))
        .collect();
    assert_eq!(prefixed.len(), 2);
    assert!(prefixed[0].starts_with("app.yaml:1:7: name: must be a DNS label"));
    assert!(prefixed[1].starts_with("app.yaml:2:10: project: must be a DNS label"));
}
