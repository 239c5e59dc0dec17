//! The first start makes the admin and join tokens: a failure on the way
//! must never leave a token the store accepts but nobody has.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

use keel_controller::{Server, ServerConfig};
use reqwest::StatusCode;

fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir)
}

async fn projects_as(server: &Server, token: &str) -> StatusCode {
    reqwest::Client::new()
        .get(format!("http://{}/v1/projects", server.addr))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn a_token_file_that_cannot_be_written_fails_the_start_and_the_next_start_recovers() {
    for kind in ["admin", "join"] {
        let dir = tempfile::tempdir().unwrap();
        // Something that is not a file where the token goes: no write,
        // however privileged the test, can replace it.
        let blocker = dir.path().join(format!("{kind}.token"));
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("keep"), "").unwrap();
        let error = Server::start(config(dir.path())).await.unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains(&blocker.display().to_string()),
            "{kind}: the error names the file: {message}"
        );
        // The operator clears the way and starts again.
        std::fs::remove_dir_all(&blocker).unwrap();
        let server = Server::start(config(dir.path())).await.unwrap();
        let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
        assert_eq!(
            projects_as(&server, admin.trim()).await,
            StatusCode::OK,
            "{kind}: the admin token in the file works"
        );
        let join = std::fs::read_to_string(dir.path().join("join.token")).unwrap();
        let registration = r#"{"name":"n1","region":"r","zone":"z","capacity":{"cpu_millis":1000,"memory_mb":1024,"max_instances":10},"address":"127.0.0.1"}"#;
        let response = reqwest::Client::new()
            .post(format!("http://{}/v1/nodes", server.addr))
            .bearer_auth(join.trim())
            .body(registration)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::CREATED,
            "{kind}: the join token in the file works"
        );
        use std::os::unix::fs::PermissionsExt;
        for file in ["admin.token", "join.token"] {
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        server.shutdown().await.unwrap();
    }
}
