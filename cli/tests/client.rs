//! The client verbs against a real controller with simulated nodes: what
//! a user sees, and that bad input is a clear message, a non-zero exit and
//! an unchanged cluster.

use std::time::Duration;

use keel_agent::eventually;
use keel_agent::testing::{SimCluster, nodes_in_zones};

mod common;
use common::Cli;

const WEB: &str = "name: web\nproject: shop\nimage: example/web:1\ninstances: 2\nports:\n  - name: http\n    port: 8080\nroutes:\n  - host: web.example.test\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_deploys_inspects_scales_rolls_back_and_removes_an_app() {
    let cluster = SimCluster::start(&nodes_in_zones(3, &["a", "b"]))
        .await
        .expect("cluster");
    let cli = Cli::new();
    let url = cluster.admin().base_url().to_owned();
    let login = cli
        .ok(&["login", &url, "--token", cluster.admin().token()])
        .await;
    assert!(login.contains("Logged in"), "{login}");

    let file = cli.write("web.yaml", WEB);
    let deploy = cli.ok(&["deploy", "-f", &file]).await;
    assert!(deploy.contains("revision 1 created"), "{deploy}");
    assert!(deploy.contains("ready 2/2"), "{deploy}");
    assert!(deploy.contains("http://web.example.test"), "{deploy}");

    let apps = cli.ok(&["apps"]).await;
    assert!(apps.contains("shop") && apps.contains("2/2"), "{apps}");
    let instances = cli.json(&["ps", "web"]).await;
    assert_eq!(instances.as_array().map(Vec::len), Some(2), "{instances}");
    let yaml = cli.ok(&["app", "show", "web", "-o", "yaml"]).await;
    assert!(yaml.contains("image: example/web:1"), "{yaml}");

    let scaled = cli.ok(&["scale", "web", "3"]).await;
    assert!(scaled.contains("scaled to 3 (revision 2)"), "{scaled}");
    eventually!(Duration::from_secs(20), {
        let instances = cli.json(&["ps", "web"]).await;
        let ready = instances
            .as_array()
            .map(|all| all.iter().filter(|i| i["ready"] == true).count())
            .unwrap_or(0);
        if ready == 3 {
            Ok(())
        } else {
            Err(format!("{ready} of 3 ready"))
        }
    });

    let rolled = cli.ok(&["rollback", "web"]).await;
    assert!(
        rolled.contains("revision 1") && rolled.contains("now revision 3"),
        "{rolled}"
    );
    let shown = cli.json(&["app", "show", "web"]).await;
    assert_eq!(shown["revision"]["manifest"]["instances"], 2);

    let nodes = cli.json(&["nodes"]).await;
    assert_eq!(nodes.as_array().map(Vec::len), Some(3));
    let node = nodes[0]["name"].as_str().expect("node name").to_owned();
    let drained = cli.ok(&["node", "drain", &node]).await;
    assert!(drained.contains("draining"), "{drained}");
    let shown = cli.json(&["node", "show", &node]).await;
    assert_eq!(shown["node"]["status"], "draining", "{shown}");
    cli.ok(&["node", "undrain", &node]).await;

    let routes = cli.ok(&["routes"]).await;
    assert!(routes.contains("web.example.test"), "{routes}");
    let events = cli.ok(&["events", "web"]).await;
    assert!(events.contains("revision"), "{events}");
    let projects = cli.ok(&["projects"]).await;
    assert!(projects.contains("shop"), "{projects}");

    let removed = cli.ok(&["rm", "web"]).await;
    assert!(removed.contains("shop/web deleted"), "{removed}");
    let apps = cli.json(&["apps"]).await;
    assert_eq!(apps, serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_clear_message_a_non_zero_exit_and_changes_nothing() {
    let cluster = SimCluster::start(&nodes_in_zones(2, &["a"]))
        .await
        .expect("cluster");
    let cli = Cli::new();
    let url = cluster.admin().base_url().to_owned();

    // Before login: say how to log in.
    let error = cli.fails(&["apps"]).await;
    assert!(error.contains("keel login"), "{error}");
    // A wrong token is refused at login, and nothing is saved.
    let error = cli.fails(&["login", &url, "--token", "wrong"]).await;
    assert!(error.contains("rejected the token"), "{error}");
    assert!(!cli.dir.path().join("config.toml").exists());
    // Nothing listens on the URL: say which.
    let error = cli
        .fails(&["login", "http://127.0.0.1:1", "--token", "x"])
        .await;
    assert!(
        error.contains("cannot reach the Keel API at http://127.0.0.1:1"),
        "{error}"
    );
    cli.ok(&["login", &url, "--token", cluster.admin().token()])
        .await;

    let file = cli.write("web.yaml", WEB);
    cli.ok(&["deploy", "-f", &file]).await;
    let before = cli.json(&["app", "show", "web"]).await;

    // An invalid manifest: file, line, column and field path.
    let bad = cli.write(
        "bad.yaml",
        "name: web\nproject: shop\nimage: example/web:2\nports:\n  - name: http\n    port: 70000\n",
    );
    let error = cli.fails(&["deploy", "-f", &bad]).await;
    assert!(
        error.contains(&format!("{bad}:6:11: ports[0].port")),
        "{error}"
    );
    let error = cli.fails(&["deploy", "-f", "missing.yaml"]).await;
    assert!(error.contains("cannot read missing.yaml"), "{error}");

    // An unknown app: close names suggested.
    let error = cli.fails(&["ps", "wbe"]).await;
    assert!(
        error.contains("app \"wbe\" not found; did you mean \"web\"?"),
        "{error}"
    );
    let error = cli.fails(&["node", "show", "nowhere"]).await;
    assert!(error.contains("node \"nowhere\" not found"), "{error}");
    let error = cli.fails(&["scale", "web", "1001"]).await;
    assert!(error.contains("1001"), "{error}");
    let error = cli.fails(&["deploy", "-f", &file, "--timeout", "5"]).await;
    assert!(error.contains("has no unit"), "{error}");

    // An image that cannot be pulled: the rollout fails with the reason.
    let unpullable = cli.write(
        "unpullable.yaml",
        "name: broken\nproject: shop\nimage: example/unpullable:1\n",
    );
    let error = cli
        .fails(&["deploy", "-f", &unpullable, "--timeout", "20s"])
        .await;
    assert!(
        error.contains("broken") && error.contains("failed"),
        "{error}"
    );
    assert!(error.contains("example/unpullable:1"), "{error}");

    // A wrong token in the saved context.
    let config_path = cli.dir.path().join("config.toml");
    let config = std::fs::read_to_string(&config_path).expect("config");
    let token = cluster.admin().token();
    std::fs::write(&config_path, config.replace(token, "stale")).expect("write");
    let error = cli.fails(&["apps"]).await;
    assert!(error.contains("rejected the token"), "{error}");
    std::fs::write(&config_path, config).expect("write");

    // None of it changed the app.
    let after = cli.json(&["app", "show", "web"]).await;
    assert_eq!(before["app"], after["app"]);
    assert_eq!(before["revision"], after["revision"]);
}

#[tokio::test]
async fn role_commands_refuse_wrong_flags_with_the_flag_named() {
    let cli = Cli::new();
    let cases: [(&[&str], &str); 6] = [
        (&["agent", "--join-token", "t"], "--controller is required"),
        (
            &[
                "agent",
                "--controller",
                "10.0.0.1:7070",
                "--join-token",
                "t",
            ],
            "must start with http://",
        ),
        (
            &[
                "agent",
                "--controller",
                "http://127.0.0.1:1",
                "--join-token",
                "t",
                "--name",
                "Bad_Name",
            ],
            "--name: \"Bad_Name\" is not a DNS label",
        ),
        (
            &[
                "agent",
                "--controller",
                "http://127.0.0.1:1",
                "--join-token",
                "t",
                "--name",
                "n",
                "--roles",
                "db",
            ],
            "unknown role \"db\"",
        ),
        (
            &["up", "--http", "nowhere"],
            "\"nowhere\" is not an address:port",
        ),
        (&["router"], "say where routes come from"),
    ];
    for (args, expected) in cases {
        let error = cli.fails(args).await;
        assert!(error.contains(expected), "keel {args:?}: {error}");
    }
    let config = cli.write(
        "agent.toml",
        "controller = \"http://127.0.0.1:1\"\njoin-token = \"t\"\n",
    );
    let error = cli.fails(&["agent", "--config", &config]).await;
    assert!(
        error.contains("agent.toml") && error.contains("join-token"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tcp_route_is_shown_by_its_port_and_has_one_owner() {
    let cluster = SimCluster::start(&nodes_in_zones(1, &["a"]))
        .await
        .expect("cluster");
    let cli = Cli::new();
    let url = cluster.admin().base_url().to_owned();
    cli.ok(&["login", &url, "--token", cluster.admin().token()])
        .await;
    let db = "name: db\nproject: shop\nimage: example/pg:17\nports:\n  - {name: pg, port: 5432, protocol: tcp}\nroutes:\n  - listen_port: 15432\n";
    let file = cli.write("db.yaml", db);
    let deploy = cli.ok(&["deploy", "-f", &file]).await;
    assert!(
        deploy.contains("tcp port 15432 on every router"),
        "{deploy}"
    );
    let routes = cli.ok(&["routes"]).await;
    let line = routes
        .lines()
        .find(|l| l.contains("shop/db"))
        .unwrap_or_default();
    assert!(
        line.starts_with("tcp:15432") && line.contains(" pg "),
        "{routes}"
    );
    let apps = cli.ok(&["apps"]).await;
    assert!(apps.contains("tcp:15432"), "{apps}");
    let shown = cli.ok(&["app", "show", "db"]).await;
    assert!(
        shown.contains("tcp port 15432 (every router) -> port pg"),
        "{shown}"
    );

    // Another app, even in another project, cannot have the port.
    let other = cli.write(
        "other.yaml",
        &db.replace("name: db", "name: copy")
            .replace("project: shop", "project: lab"),
    );
    let error = cli.fails(&["deploy", "-f", &other]).await;
    assert!(
        error.contains("listen port 15432") && error.contains("shop/db"),
        "{error}"
    );
    // A listen_port on an http port is caught before any request, with
    // where it is.
    let wrong = cli.write(
        "wrong.yaml",
        "name: web\nproject: shop\nimage: example/web:1\nports:\n  - {name: http, port: 80}\nroutes:\n  - {listen_port: 8080, port: http}\n",
    );
    let error = cli.fails(&["deploy", "-f", &wrong]).await;
    assert!(
        error.contains("wrong.yaml:7:") && error.contains("routes[0].port"),
        "{error}"
    );
}
