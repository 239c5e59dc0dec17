//! The controller's API over real HTTP, on the embedded store (and on a
//! real etcd for the store-unavailable case).

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

use std::net::SocketAddr;

use keel_controller::{Server, ServerConfig};
use reqwest::{Method, StatusCode};
use serde_json::Value;

struct Harness {
    server: Option<Server>,
    token: String,
    join_token: String,
    client: reqwest::Client,
    dir: tempfile::TempDir,
}

const APP: &str = "name: web\nproject: shop\nimage: keel/test-server:1\ninstances: 2\nports:\n  - name: http\n    port: 8080\n";

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path()).await;
        let token = server
            .new_admin_token
            .as_ref()
            .expect("first start makes a token")
            .token
            .clone();
        let join_token = server
            .new_join_token
            .as_ref()
            .expect("and a join token")
            .token
            .clone();
        Harness {
            server: Some(server),
            token,
            join_token,
            client: reqwest::Client::new(),
            dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().addr
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, &str)>,
    ) -> (StatusCode, Value) {
        self.call_as(&self.token, method, path, body).await
    }

    async fn call_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<(&str, &str)>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .request(method, format!("http://{}{path}", self.addr()))
            .bearer_auth(token);
        if let Some((content_type, body)) = body {
            request = request
                .header("content-type", content_type)
                .body(body.to_owned());
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Registers a node with the join token; returns its credential.
    async fn register(&self, name: &str, zone: &str) -> String {
        let (status, body) = self
            .call_as(
                &self.join_token,
                Method::POST,
                "/v1/nodes",
                Some(("application/json", &registration(name, zone))),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    /// Opens a node's desired-instances stream with its credential.
    async fn watch(&self, node: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!(
                "http://{}/v1/nodes/{node}/instances/watch",
                self.addr()
            ))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn apply(&self, yaml: &str) -> (StatusCode, Value) {
        self.call(Method::POST, "/v1/apps", Some(("application/yaml", yaml)))
            .await
    }
}

async fn start(dir: &std::path::Path) -> Server {
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir);
    config.node_lost_after = std::time::Duration::from_secs(1);
    Server::start(config).await.unwrap()
}

#[tokio::test]
async fn every_route_refuses_a_request_without_a_valid_token() {
    let h = Harness::start().await;
    for (method, path, _template) in keel_controller::api::ROUTES {
        for token in [None, Some("wrong"), Some("")] {
            let mut request = h
                .client
                .request(method.clone(), format!("http://{}{path}", h.addr()));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.body("{}").send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "unauthorized");
        }
    }
}

#[tokio::test]
async fn apply_makes_revisions_only_for_changes_and_rollback_makes_a_new_one() {
    let h = Harness::start().await;
    let (status, body) = h.apply(APP).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        (
            body["created"].as_bool(),
            body["revision"]["revision"].as_u64()
        ),
        (Some(true), Some(1))
    );

    let (status, body) = h.apply(APP).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["changed"], false,
        "an identical manifest makes no revision"
    );
    assert_eq!(body["app"]["revision"], 1);

    let changed = APP.replace("instances: 2", "instances: 3");
    let (_, body) = h.apply(&changed).await;
    assert_eq!(
        (body["changed"].as_bool(), body["app"]["revision"].as_u64()),
        (Some(true), Some(2))
    );

    let (status, body) = h
        .call(Method::POST, "/v1/projects/shop/apps/web/rollback", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["app"]["revision"], 3, "a rollback is a new revision");
    assert_eq!(body["revision"]["cause"]["to_revision"], 1);
    assert_eq!(body["revision"]["manifest"]["instances"], 2);

    let (_, revisions) = h.get("/v1/projects/shop/apps/web/revisions").await;
    assert_eq!(revisions.as_array().unwrap().len(), 3);
    let (status, _) = h.get("/v1/projects/shop/apps/web/revisions/2").await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = h
        .call(
            Method::POST,
            "/v1/projects/shop/apps/web/rollback",
            Some(("application/json", r#"{"revision": 9}"#)),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = h
        .call(
            Method::POST,
            "/v1/projects/shop/apps/web/rollback",
            Some(("application/json", r#"{"revision": 3}"#)),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "rolling back to the current revision: {body}"
    );

    let (_, events) = h.get("/v1/events?project=shop&app=web").await;
    // The reconciler adds its own events (no node fits: there are none);
    // the lifecycle ones come in order.
    let reasons: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .filter(|r| *r != "unschedulable")
        .collect();
    assert_eq!(
        reasons,
        vec![
            "app-created",
            "revision-created",
            "revision-created",
            "rollback"
        ]
    );

    let (_, projects) = h.get("/v1/projects").await;
    assert_eq!(
        projects[0]["name"], "shop",
        "the project was made on first apply"
    );

    let (status, _) = h
        .call(Method::DELETE, "/v1/projects/shop/apps/web", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = h.get("/v1/projects/shop/apps/web").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, _) = h.get("/v1/projects/shop/apps/web/revisions/1").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "revisions go with the app");
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let h = Harness::start().await;
    h.apply(APP).await;
    let (_, before) = h.get("/v1/projects/shop/apps/web").await;

    let bad = APP.replace("instances: 2", "instances: many\nsize: big");
    let (status, body) = h.apply(&bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid");
    let problems = body["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "every problem at once: {body}");
    assert!(
        problems
            .iter()
            .any(|p| p["path"] == "instances" && p["line"] == 4),
        "{body}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p["path"] == "size" && p["line"] == 5),
        "{body}"
    );

    let (status, body) = h
        .call(
            Method::POST,
            "/v1/apps",
            Some(("application/json", "{\"name\": ")),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let huge = format!("{APP}# {}\n", "x".repeat(2 << 20));
    let (status, body) = h.apply(&huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");

    let (status, body) = h.get("/v1/projects/Not_A_Name/apps/web").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["problems"][0]["path"], "project");
    let (status, _) = h.get("/v1/projects/shop/apps/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = h.get("/v1/apps?colour=red").await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "an unknown query parameter: {body}"
    );
    let (status, body) = h
        .call(
            Method::POST,
            "/v1/projects",
            Some(("application/json", r#"{"name":"ok","x":1}"#)),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an unknown field: {body}");
    let (status, _) = h.get("/v1/nothing-here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, after) = h.get("/v1/projects/shop/apps/web").await;
    assert_eq!(before, after, "nothing changed");
    let (_, revisions) = h.get("/v1/projects/shop/apps/web/revisions").await;
    assert_eq!(revisions.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn concurrent_applies_lose_no_revision() {
    let h = Harness::start().await;
    h.apply(APP).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (client, addr, token) = (h.client.clone(), h.addr(), h.token.clone());
        tasks.push(tokio::spawn(async move {
            let body = APP.replace("instances: 2", &format!("instances: {}", 10 + i));
            let response = client
                .post(format!("http://{addr}/v1/apps"))
                .bearer_auth(token)
                .body(body)
                .send()
                .await
                .unwrap();
            response.status()
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected status {other}"),
        }
    }
    let (_, app) = h.get("/v1/projects/shop/apps/web").await;
    assert_eq!(
        app["app"]["latest_revision"],
        1 + ok,
        "one revision per acknowledged apply"
    );
    let (_, revisions) = h.get("/v1/projects/shop/apps/web/revisions").await;
    assert_eq!(revisions.as_array().unwrap().len(), 1 + ok as usize);
}

#[tokio::test]
async fn a_restart_keeps_state_and_the_token_and_prints_no_new_token() {
    let mut h = Harness::start().await;
    h.apply(APP).await;
    let file = std::fs::read_to_string(h.dir.path().join("admin.token")).unwrap();
    assert_eq!(file.trim(), h.token);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(h.dir.path().join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    h.server.take().unwrap().shutdown().await.unwrap();
    let server = start(h.dir.path()).await;
    assert!(server.new_admin_token.is_none(), "the token is made once");
    h.server = Some(server);
    let (status, body) = h.get("/v1/projects/shop/apps/web").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revision"]["manifest"]["image"], "keel/test-server:1");
}

#[tokio::test]
async fn an_unreachable_store_is_a_503_naming_it() {
    let mut etcd = keel_testing::EtcdServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut store = keel_store::StoreConfig::etcd(vec![etcd.endpoint()]);
    if let keel_store::Backend::Etcd(options) = &mut store.backend {
        options.request_timeout = std::time::Duration::from_millis(1500);
    }
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
    config.store = Some(store);
    let server = Server::start(config).await.unwrap();
    let token = server.new_admin_token.as_ref().unwrap().token.clone();
    etcd.kill();
    let response = reqwest::Client::new()
        .get(format!("http://{}/v1/apps", server.addr))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unavailable");
    assert!(
        body["message"].as_str().unwrap().contains(&etcd.endpoint()),
        "{body}"
    );
}

fn registration(name: &str, zone: &str) -> String {
    format!(
        r#"{{"name":"{name}","region":"eu","zone":"{zone}","labels":{{"disk":"ssd"}},"roles":["worker"],"capacity":{{"cpu_millis":4000,"memory_mb":8192,"max_instances":50}},"address":"127.0.0.2"}}"#
    )
}

#[tokio::test]
async fn nodes_register_with_the_join_token_heartbeat_drain_and_get_lost() {
    let h = Harness::start().await;
    let json = "application/json";
    let (status, body) = h
        .call_as(
            "wrong",
            Method::POST,
            "/v1/nodes",
            Some((json, &registration("n1", "eu-a"))),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = h
        .call_as(
            &h.join_token,
            Method::POST,
            "/v1/nodes",
            Some((json, &registration("n1", "eu-a"))),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let n1_token = body["token"].as_str().unwrap().to_owned();
    assert_eq!(body["node"]["status"], "ready");
    assert_ne!(n1_token, h.join_token);
    let (_, body) = h
        .call_as(
            &h.join_token,
            Method::POST,
            "/v1/nodes",
            Some((json, &registration("n2", "eu-b"))),
        )
        .await;
    let n2_token = body["token"].as_str().unwrap().to_owned();

    let (status, _) = h
        .call_as(&n1_token, Method::POST, "/v1/nodes/n1/heartbeat", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h
        .call_as(&n2_token, Method::POST, "/v1/nodes/n1/heartbeat", None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a node cannot heartbeat for another"
    );
    let (status, _) = h.call_as(&n1_token, Method::GET, "/v1/nodes", None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a node credential is not an admin token"
    );

    let (_, body) = h.call(Method::POST, "/v1/nodes/n1/drain", None).await;
    assert_eq!(body["status"], "draining");
    let (_, body) = h.call(Method::POST, "/v1/nodes/n1/undrain", None).await;
    assert_eq!(body["status"], "ready");
    let (status, _) = h.call(Method::POST, "/v1/nodes/ghost/drain", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h
        .call(Method::POST, "/v1/nodes/ghost/heartbeat", None)
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "no heartbeat for a node that does not exist"
    );
    let (_, nodes) = h.get("/v1/nodes").await;
    assert_eq!(
        nodes.as_array().unwrap().len(),
        2,
        "nor does one get registered"
    );

    // n1 keeps beating, n2 falls silent: only n2 is lost.
    for _ in 0..8 {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        h.call_as(&n1_token, Method::POST, "/v1/nodes/n1/heartbeat", None)
            .await;
    }
    let (_, nodes) = h.get("/v1/nodes").await;
    let statuses: Vec<(&str, &str)> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap(), n["status"].as_str().unwrap()))
        .collect();
    assert_eq!(statuses, vec![("n1", "ready"), ("n2", "lost")]);
    let (_, body) = h
        .call_as(&n2_token, Method::POST, "/v1/nodes/n2/heartbeat", None)
        .await;
    assert_eq!(
        body["status"], "ready",
        "a heartbeat brings a lost node back"
    );

    // Re-registering replaces the credential and keeps the drain.
    h.call(Method::POST, "/v1/nodes/n1/drain", None).await;
    let (_, body) = h
        .call_as(
            &h.join_token,
            Method::POST,
            "/v1/nodes",
            Some((json, &registration("n1", "eu-a"))),
        )
        .await;
    assert_eq!(body["node"]["status"], "draining");
    let (status, _) = h
        .call_as(&n1_token, Method::POST, "/v1/nodes/n1/heartbeat", None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the old credential stops working"
    );
}

#[tokio::test]
async fn a_bad_registration_lists_every_problem_and_registers_nothing() {
    let h = Harness::start().await;
    let bad = r#"{"name":"Bad_Name","region":"eu","zone":"","capacity":{"cpu_millis":0,"memory_mb":1,"max_instances":5},"address":"somewhere"}"#;
    let (status, body) = h
        .call_as(
            &h.join_token,
            Method::POST,
            "/v1/nodes",
            Some(("application/json", bad)),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let paths: Vec<&str> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        vec!["name", "zone", "capacity.cpu_millis", "address"]
    );
    let unknown = registration("n1", "a").replace("\"roles\"", "\"rolez\"");
    let (status, body) = h
        .call_as(
            &h.join_token,
            Method::POST,
            "/v1/nodes",
            Some(("application/json", &unknown)),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"].as_str().unwrap().contains("rolez"),
        "{body}"
    );
    let (_, nodes) = h.get("/v1/nodes").await;
    assert_eq!(nodes, serde_json::json!([]));
}

/// Reads stream lines until `done` says it has seen enough (10 s at most).
async fn read_stream(
    response: &mut reqwest::Response,
    buffer: &mut String,
    mut done: impl FnMut(&Value) -> bool,
) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        while let Some(end) = buffer.find('\n') {
            let line: String = buffer.drain(..=end).collect();
            if line.trim().is_empty() {
                continue;
            }
            if done(&serde_json::from_str(&line).unwrap()) {
                return;
            }
        }
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .expect("the stream keeps coming")
            .unwrap()
            .expect("the stream stays open");
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn agents_stream_their_instances_and_report_what_runs() {
    let h = Harness::start().await;
    let json = "application/json";
    let node_token = h.register("n1", "eu-a").await;

    let mut stream = h.watch("n1", &node_token).await;
    assert_eq!(stream.status(), StatusCode::OK);
    assert_eq!(stream.headers()["content-type"], "application/x-ndjson");
    let mut buffer = String::new();
    let mut running: std::collections::BTreeSet<String> = Default::default();
    read_stream(&mut stream, &mut buffer, |m| {
        assert!(
            m.get("snapshot").is_some(),
            "the stream starts with a snapshot: {m}"
        );
        true
    })
    .await;

    h.apply(APP).await; // two instances; the reconciler places them on n1
    read_stream(&mut stream, &mut buffer, |m| {
        let put = &m["put"]["instance"];
        assert_eq!(put["manifest"]["image"], "keel/test-server:1", "{m}");
        running.insert(put["id"].as_str().unwrap().to_owned());
        running.len() == 2
    })
    .await;

    // The agent reports: one running and ready, published on a host port.
    let id = running.iter().next().unwrap().clone();
    let report = format!(
        r#"{{"instances":[{{"project":"shop","app":"web","id":"{id}","state":"running","ready":true,"ports":{{"http":"127.0.0.2:32768"}}}},{{"project":"shop","app":"web","id":"not-mine","state":"running","ready":true}}]}}"#
    );
    let (status, body) = h
        .call_as(
            &node_token,
            Method::POST,
            "/v1/nodes/n1/status",
            Some((json, &report)),
        )
        .await;
    assert_eq!(
        (status, body["written"].as_u64()),
        (StatusCode::OK, Some(1)),
        "{body}"
    );
    let (_, body) = h
        .call_as(
            &node_token,
            Method::POST,
            "/v1/nodes/n1/status",
            Some((json, &report)),
        )
        .await;
    assert_eq!(body["written"], 0, "an unchanged report writes nothing");

    let (_, instances) = h.get("/v1/projects/shop/apps/web/instances").await;
    let instances = instances.as_array().unwrap();
    assert_eq!(instances.len(), 2);
    let reported = instances.iter().find(|i| i["id"] == id.as_str()).unwrap();
    assert_eq!(
        (reported["state"].as_str(), reported["ready"].as_bool()),
        (Some("running"), Some(true))
    );
    assert_eq!(reported["ports"]["http"], "127.0.0.2:32768");
    let other = instances.iter().find(|i| i["id"] != id.as_str()).unwrap();
    assert_eq!(
        (other["state"].as_str(), other["node"].as_str()),
        (Some("placed"), Some("n1"))
    );

    // Scaling down deletes one from the node's stream.
    h.apply(&APP.replace("instances: 2", "instances: 1")).await;
    read_stream(&mut stream, &mut buffer, |m| m.get("delete").is_some()).await;

    let (status, _) = h.get("/v1/instances?app=web").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "app without project");
    let (status, _) = h.get("/v1/instances?project=shop").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = h
        .call_as(
            &node_token,
            Method::POST,
            "/v1/nodes/n1/status",
            Some((json, r#"{"instances":[{"id":1}]}"#)),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a malformed report");
}

const ROUTED: &str = "name: web\nproject: shop\nimage: keel/test-server:1\ninstances: 1\nports:\n  - name: http\n    port: 8080\nroutes:\n  - host: shop.example.com\n";

#[tokio::test]
async fn a_route_has_one_owner_and_the_table_follows_ready_instances() {
    let h = Harness::start().await;
    let json = "application/json";
    assert_eq!(h.apply(ROUTED).await.0, StatusCode::CREATED);
    let thief = ROUTED.replace("name: web", "name: thief");
    let (status, body) = h.apply(&thief).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("shop.example.com/ is already served by app shop/web"),
        "{body}"
    );
    let (status, _) = h.get("/v1/projects/shop/apps/thief").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the refused apply left nothing behind"
    );

    // A router node streams the table; an ordinary node may not.
    let registration_with =
        |name: &str, roles: &str| registration(name, "eu-a").replace(r#"["worker"]"#, roles);
    let (_, body) = h
        .call_as(
            &h.join_token,
            Method::POST,
            "/v1/nodes",
            Some((json, &registration_with("r1", r#"["worker","router"]"#))),
        )
        .await;
    let router_token = body["token"].as_str().unwrap().to_owned();
    let (_, body) = h
        .call_as(
            &h.join_token,
            Method::POST,
            "/v1/nodes",
            Some((json, &registration_with("w1", r#"["worker"]"#))),
        )
        .await;
    let worker_token = body["token"].as_str().unwrap().to_owned();
    let (status, _) = h
        .call_as(&worker_token, Method::GET, "/v1/routes/watch?node=w1", None)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = h
        .call_as(&worker_token, Method::GET, "/v1/routes/watch?node=r1", None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a node cannot pose as another"
    );

    let mut stream = h
        .client
        .get(format!("http://{}/v1/routes/watch?node=r1", h.addr()))
        .bearer_auth(&router_token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut buffer = String::new();
    read_stream(&mut stream, &mut buffer, |table| {
        let route = &table["routes"][0];
        assert_eq!(
            (route["host"].as_str(), route["app"].as_str()),
            (Some("shop.example.com"), Some("web"))
        );
        true
    })
    .await;

    // The instance becomes ready on whichever node it was placed.
    let (node, id) = loop {
        let (_, instances) = h.get("/v1/projects/shop/apps/web/instances").await;
        if let Some(node) = instances[0]["node"].as_str() {
            break (
                node.to_owned(),
                instances[0]["id"].as_str().unwrap().to_owned(),
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let token = if node == "r1" {
        &router_token
    } else {
        &worker_token
    };
    let report = format!(
        r#"{{"instances":[{{"project":"shop","app":"web","id":"{id}","state":"running","ready":true,"ports":{{"http":"127.0.0.2:31000"}}}}]}}"#
    );
    h.call_as(
        token,
        Method::POST,
        &format!("/v1/nodes/{node}/status"),
        Some((json, &report)),
    )
    .await;
    read_stream(&mut stream, &mut buffer, |table| {
        table["routes"][0]["backends"] == serde_json::json!(["127.0.0.2:31000"])
    })
    .await;
    let (_, table) = h.get("/v1/routes").await;
    assert_eq!(table["routes"][0]["backends"][0], "127.0.0.2:31000");

    // Deleting the app frees its route for another.
    h.call(Method::DELETE, "/v1/projects/shop/apps/web", None)
        .await;
    assert_eq!(h.apply(&thief).await.0, StatusCode::CREATED);
}

/// No input makes a handler fail with a 5xx or take the server down: every
/// route, with the admin token and with a node's, gets bodies and paths of
/// every wrong shape.
#[tokio::test]
async fn no_input_makes_any_route_fail_or_panic() {
    let h = Harness::start().await;
    h.apply(APP).await;
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("application/json", b"".to_vec()),
        ("application/json", b"{".to_vec()),
        ("application/json", b"null".to_vec()),
        ("application/json", b"[]".to_vec()),
        (
            "application/json",
            b"{\"name\": 12, \"revision\": -1}".to_vec(),
        ),
        (
            "application/json",
            b"{\"revision\": 99999999999999999999999}".to_vec(),
        ),
        ("application/json", deep.into_bytes()),
        ("application/json", vec![0xff, 0xfe, 0x00, 0x80]),
        ("application/yaml", b"name: [unclosed".to_vec()),
        ("application/yaml", b"&a [*a]".to_vec()),
        ("application/yaml", "name: \u{0}\u{7}".as_bytes().to_vec()),
        ("text/plain", b"\x00\x01\x02".to_vec()),
    ];
    let weird_names = [
        "%00",
        "..",
        "a%2Fb",
        &"x".repeat(300),
        "%F0%9F%92%A9",
        "-",
        "Ünïcode",
    ];
    for (method, sample, template) in keel_controller::api::ROUTES {
        let mut paths = vec![sample.to_string()];
        for name in weird_names {
            let mut path = template.to_string();
            for param in ["{project}", "{app}", "{node}", "{revision}"] {
                path = path.replace(param, name);
            }
            paths.push(path);
        }
        for path in paths {
            for token in [&h.token, &h.join_token] {
                for (content_type, body) in &bodies {
                    let response = h
                        .client
                        .request(method.clone(), format!("http://{}{path}", h.addr()))
                        .bearer_auth(token)
                        .header("content-type", *content_type)
                        .body(body.clone())
                        .timeout(std::time::Duration::from_secs(2))
                        .send()
                        .await;
                    // Streams stay open: a timeout on them is success.
                    let Ok(response) = response else { continue };
                    assert!(
                        !response.status().is_server_error(),
                        "{method} {path} ({content_type}) answered {}",
                        response.status()
                    );
                }
            }
        }
    }
    let (status, _) = h.get("/v1/projects/shop/apps/web").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the server is still up, the app intact"
    );
}

#[tokio::test]
async fn old_events_are_pruned_to_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let store = keel_store::open(&keel_store::StoreConfig::embedded(
        dir.path().join("s.redb"),
    ))
    .await
    .unwrap();
    let apps = keel_controller::apps::Apps::new(store);
    for i in 0..30 {
        apps.create_project(&format!("p{i}")).await.unwrap();
    }
    assert_eq!(apps.prune_events(10).await.unwrap(), 20);
    let events = apps.events(None, None, 100).await.unwrap();
    let projects: Vec<_> = events.iter().map(|e| e.project.clone().unwrap()).collect();
    assert_eq!(
        projects,
        (20..30).map(|i| format!("p{i}")).collect::<Vec<_>>(),
        "the newest stay, in order"
    );
    assert_eq!(apps.prune_events(10).await.unwrap(), 0);
}

#[tokio::test]
async fn a_graceful_stop_ends_open_streams_and_releases_the_store() {
    let mut h = Harness::start().await;
    let node_token = h.register("n1", "eu-a").await;
    let mut stream = h.watch("n1", &node_token).await;
    let mut buffer = String::new();
    read_stream(&mut stream, &mut buffer, |_| true).await;

    let server = h.server.take().unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), server.shutdown())
        .await
        .expect("the stop does not wait on the open stream")
        .unwrap();
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), stream.chunk())
        .await
        .unwrap();
    assert!(
        matches!(end, Ok(None) | Err(_)),
        "the stream ended: {end:?}"
    );
    // The store is closed: the same data directory opens again in-process.
    h.server = Some(start(h.dir.path()).await);
    let (status, _) = h.get("/v1/nodes/n1").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_apply_with_a_stale_expected_revision_is_a_409_and_changes_nothing() {
    let h = Harness::start().await;
    let yaml = "application/yaml";
    let (status, _) = h
        .call(
            Method::POST,
            "/v1/apps?expected_revision=0",
            Some((yaml, APP)),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "0: create only if missing");
    let (status, body) = h
        .call(
            Method::POST,
            "/v1/apps?expected_revision=0",
            Some((yaml, APP)),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    let changed = APP.replace("instances: 2", "instances: 4");
    let (status, body) = h
        .call(
            Method::POST,
            "/v1/apps?expected_revision=7",
            Some((yaml, &changed)),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("is at revision 1, not 7"),
        "{body}"
    );
    let (_, app) = h.get("/v1/projects/shop/apps/web").await;
    assert_eq!(
        app["revision"]["manifest"]["instances"], 2,
        "nothing changed"
    );

    let (status, body) = h
        .call(
            Method::POST,
            "/v1/apps?expected_revision=1",
            Some((yaml, &changed)),
        )
        .await;
    assert_eq!(
        (status, body["app"]["revision"].as_u64()),
        (StatusCode::OK, Some(2))
    );
    let (status, _) = h
        .call(
            Method::POST,
            "/v1/apps?expected_revision=banana",
            Some((yaml, &changed)),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_quiet_stream_sends_keepalive_lines() {
    let h = Harness::start().await;
    let node_token = h.register("n1", "eu-a").await;
    let mut stream = h.watch("n1", &node_token).await;
    let mut received = String::new();
    let wait = keel_controller::api::STREAM_KEEPALIVE + std::time::Duration::from_secs(3);
    let deadline = tokio::time::Instant::now() + wait;
    while !received.ends_with("}\n\n") {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .expect("a blank line within the keepalive period")
            .unwrap()
            .unwrap();
        received.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(received.starts_with("{\"snapshot\""), "{received:?}");
}

#[tokio::test]
async fn scale_changes_only_the_count_and_refuses_bad_counts_changing_nothing() {
    let h = Harness::start().await;
    assert_eq!(h.apply(APP).await.0, StatusCode::CREATED);
    let scale = |body: &'static str| {
        h.call(
            Method::POST,
            "/v1/projects/shop/apps/web/scale",
            Some(("application/json", body)),
        )
    };

    let (status, body) = scale(r#"{"instances": 5}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["changed"], true);
    assert_eq!(body["revision"]["revision"], 2);
    assert_eq!(
        body["revision"]["cause"],
        serde_json::json!({"kind": "scale", "instances": 5})
    );
    assert_eq!(body["revision"]["manifest"]["instances"], 5);
    assert_eq!(
        body["revision"]["manifest"]["image"], "keel/test-server:1",
        "the rest of the manifest is the current one's"
    );
    let (_, again) = scale(r#"{"instances": 5}"#).await;
    assert_eq!(again["changed"], false, "the same count is no new revision");

    for (input, path, words) in [
        (r#"{"instances": 5000}"#, "instances", "must be 0..1000"),
        (r#"{"instances": -1}"#, "instances", "whole number"),
        (r#"{"instances": 2.5}"#, "instances", "whole number"),
        (r#"{"instances": "3"}"#, "instances", "whole number"),
        (r#"{"count": 3}"#, "body", "unknown field `count`"),
        (r#"{}"#, "body", "missing field `instances`"),
        ("", "body", "EOF"),
    ] {
        let (status, body) = scale(input).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{input}: {body}");
        assert_eq!(body["problems"][0]["path"], path, "{input}: {body}");
        let message = body["problems"][0]["message"].as_str().unwrap();
        assert!(message.contains(words), "{input}: {message}");
    }
    let (status, _) = h
        .call(
            Method::POST,
            "/v1/projects/shop/apps/nope/scale",
            Some(("application/json", r#"{"instances": 1}"#)),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, view) = h.get("/v1/projects/shop/apps/web").await;
    assert_eq!(view["app"]["revision"], 2, "bad input made no revision");
    assert_eq!(view["revision"]["manifest"]["instances"], 5);

    let global = "name: agent\nproject: shop\nimage: keel/agent:1\nglobal: true\n";
    assert_eq!(h.apply(global).await.0, StatusCode::CREATED);
    let (status, body) = h
        .call(
            Method::POST,
            "/v1/projects/shop/apps/agent/scale",
            Some(("application/json", r#"{"instances": 3}"#)),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["message"].as_str().unwrap().contains("is global"));
}

#[tokio::test]
async fn restart_makes_a_revision_with_the_same_manifest_and_later_changes_keep_it() {
    let h = Harness::start().await;
    h.apply(APP).await;
    let (status, body) = h
        .call(Method::POST, "/v1/projects/shop/apps/web/restart", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revision"]["revision"], 2);
    assert_eq!(body["revision"]["cause"]["kind"], "restart");
    assert_eq!(body["revision"]["restarts"], 1);
    let (_, first) = h.get("/v1/projects/shop/apps/web/revisions/1").await;
    assert_eq!(body["revision"]["manifest"], first["manifest"]);

    // A later scale carries the restart count: it must not restart again.
    let (_, scaled) = h
        .call(
            Method::POST,
            "/v1/projects/shop/apps/web/scale",
            Some(("application/json", r#"{"instances": 3}"#)),
        )
        .await;
    assert_eq!(scaled["revision"]["restarts"], 1);
    let (status, _) = h
        .call(Method::POST, "/v1/projects/shop/apps/nope/restart", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h
        .call(Method::POST, "/v1/projects/Shop/apps/web/restart", None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// Reads the next non-blank line of a stream (10 s at most).
async fn next_line(response: &mut reqwest::Response, buffer: &mut String) -> Value {
    let mut line = Value::Null;
    read_stream(response, buffer, |value| {
        line = value.clone();
        true
    })
    .await;
    line
}

#[tokio::test]
async fn the_change_feed_names_what_changed_and_ends_when_the_controller_stops() {
    let mut h = Harness::start().await;
    let mut stream = h
        .client
        .get(format!("http://{}/v1/watch", h.addr()))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut buffer = String::new();
    let first = next_line(&mut stream, &mut buffer).await;
    assert_eq!(first["changed"], serde_json::json!([]), "{first}");

    h.apply(APP).await;
    let mut seen = std::collections::BTreeSet::new();
    while !seen.contains("apps") {
        let message = next_line(&mut stream, &mut buffer).await;
        assert!(message["revision"].as_i64().unwrap() > first["revision"].as_i64().unwrap());
        for kind in message["changed"].as_array().unwrap() {
            seen.insert(kind.as_str().unwrap().to_owned());
        }
    }
    h.register("n1", "eu-a").await;
    while !seen.contains("nodes") {
        let message = next_line(&mut stream, &mut buffer).await;
        for kind in message["changed"].as_array().unwrap() {
            seen.insert(kind.as_str().unwrap().to_owned());
        }
    }

    let server = h.server.take().unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), server.shutdown())
        .await
        .expect("the stop does not wait on the open feed")
        .unwrap();
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match stream.chunk().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "the feed ended: {end:?}");
}

#[tokio::test]
async fn the_console_is_served_without_a_token_and_loads_nothing_from_elsewhere() {
    let h = Harness::start().await;
    for path in keel_controller::console::PATHS {
        let response = h
            .client
            .get(format!("http://{}{path}", h.addr()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let csp = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        let text = response.text().await.unwrap();
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{path} names no other origin"
        );
    }
    let page = reqwest::get(format!("http://{}/", h.addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("/console/app.js") && page.contains("/console/style.css"));
}

const DB: &str = "name: db\nproject: shop\nimage: keel/test-server:1\ninstances: 1\nports:\n  - {name: pg, port: 5432, protocol: tcp}\nroutes:\n  - listen_port: 5432\n";

#[tokio::test]
async fn a_listen_port_has_one_owner_in_the_cluster_and_is_in_the_table() {
    let h = Harness::start().await;
    let json = "application/json";
    assert_eq!(h.apply(DB).await.0, StatusCode::CREATED);

    // Another project's app cannot take the port: routers are shared.
    let thief = DB
        .replace("name: db", "name: thief")
        .replace("project: shop", "project: other");
    let (status, body) = h.apply(&thief).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("listen port 5432") && message.contains("already served by app shop/db"),
        "{body}"
    );
    let (status, _) = h.get("/v1/projects/other/apps/thief").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the refused apply left nothing"
    );

    // An app that exists and asks for the port keeps what it had.
    let cache = "name: cache\nproject: other\nimage: keel/test-server:1\nports:\n  - {name: redis, port: 6379, protocol: tcp}\nroutes:\n  - listen_port: 6379\n";
    assert_eq!(h.apply(cache).await.0, StatusCode::CREATED);
    let greedy = format!("{cache}  - listen_port: 5432\n");
    let (status, body) = h.apply(&greedy).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (_, view) = h.get("/v1/projects/other/apps/cache").await;
    assert_eq!(view["app"]["revision"], 1, "{view}");
    assert_eq!(
        h.apply(&thief.replace("5432\n", "6379\n")).await.0,
        StatusCode::CONFLICT,
        "cache still holds 6379"
    );

    // The table has the route, without a host, and its ready instance.
    let registration = registration("r1", "eu-a").replace(r#"["worker"]"#, r#"["router"]"#);
    let (status, body) = h
        .call_as(
            &h.join_token,
            Method::POST,
            "/v1/nodes",
            Some((json, &registration)),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let node_token = body["token"].as_str().unwrap().to_owned();
    let id = loop {
        let (_, instances) = h.get("/v1/projects/shop/apps/db/instances").await;
        if instances[0]["node"] == "r1" {
            break instances[0]["id"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let report = format!(
        r#"{{"instances":[{{"project":"shop","app":"db","id":"{id}","state":"running","ready":true,"ports":{{"pg":"127.0.0.2:31000"}}}}]}}"#
    );
    let (status, body) = h
        .call_as(
            &node_token,
            Method::POST,
            "/v1/nodes/r1/status",
            Some((json, &report)),
        )
        .await;
    assert!(status.is_success(), "{status} {body}");
    let (_, table) = h.get("/v1/routes").await;
    let db = table["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["app"] == "db")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        db,
        serde_json::json!({
            "host": "", "path": "/", "tls": "off", "project": "shop", "app": "db",
            "port": "pg", "protocol": "tcp", "backends": ["127.0.0.2:31000"],
            "listen_port": 5432,
        }),
        "{table}"
    );

    // Moving the route frees the port; deleting the app frees the new one.
    let moved = DB.replace("listen_port: 5432", "listen_port: 15432");
    assert_eq!(h.apply(&moved).await.0, StatusCode::OK);
    assert_eq!(h.apply(&thief).await.0, StatusCode::CREATED);
    let other = thief
        .replace("name: thief", "name: second")
        .replace("5432\n", "15432\n");
    assert_eq!(h.apply(&other).await.0, StatusCode::CONFLICT);
    h.call(Method::DELETE, "/v1/projects/shop/apps/db", None)
        .await;
    assert_eq!(h.apply(&other).await.0, StatusCode::CREATED);
}
