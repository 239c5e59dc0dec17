//! The test server as a process: what the end-to-end tests rely on.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

const BINARY: &str = env!("CARGO_BIN_EXE_keel-testserver");

/// The server on a free port, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start() -> Server {
    let port = free_port();
    let mut child = Command::new(BINARY)
        .env("PORT", port.to_string())
        .env("KEEL_INSTANCE", "1-test")
        .env("EXTRA", "yes")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = tokio::process::ChildStdout::from_std(child.stdout.take().unwrap()).unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        first.starts_with(&format!("keel-testserver listening on 0.0.0.0:{port}")),
        "{first}"
    );
    // Keep reading so the pipe never fills.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Server { child, port }
}

async fn call(method: reqwest::Method, port: u16, path: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .request(method, format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

fn check(port: u16, path: &str) -> bool {
    Command::new(BINARY)
        .args(["check", &format!("http://127.0.0.1:{port}{path}")])
        .output()
        .unwrap()
        .status
        .success()
}

#[tokio::test]
async fn it_answers_with_its_instance_and_env_and_its_health_can_be_switched() {
    let server = start().await;
    let (status, body) = call(reqwest::Method::GET, server.port, "/").await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["instance"], "1-test");
    assert_eq!(body["env"]["EXTRA"], "yes");

    assert_eq!(
        call(reqwest::Method::GET, server.port, "/healthz").await.0,
        200
    );
    assert!(check(server.port, "/healthz"));
    assert_eq!(
        call(reqwest::Method::POST, server.port, "/health/fail")
            .await
            .0,
        200
    );
    assert_eq!(
        call(reqwest::Method::GET, server.port, "/healthz").await.0,
        500
    );
    assert!(!check(server.port, "/healthz"), "the exec probe fails too");
    assert_eq!(
        call(reqwest::Method::POST, server.port, "/health/ok")
            .await
            .0,
        200
    );
    assert_eq!(
        call(reqwest::Method::GET, server.port, "/healthz").await.0,
        200
    );

    let started = std::time::Instant::now();
    assert_eq!(
        call(reqwest::Method::GET, server.port, "/slow?ms=300")
            .await
            .0,
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(!check(free_port(), "/healthz"), "nothing listens there");
}

#[tokio::test]
async fn it_echoes_websocket_messages() {
    let server = start().await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    let (mut socket, _) =
        tokio_tungstenite::client_async(format!("ws://127.0.0.1:{}/ws", server.port), stream)
            .await
            .unwrap();
    socket.send(Message::text("hello")).await.unwrap();
    let echoed = socket.next().await.unwrap().unwrap();
    assert_eq!(echoed, Message::text("hello"));
    socket.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3])
    );
}

#[tokio::test]
async fn crash_exits_with_the_status_asked_for() {
    let mut server = start().await;
    let (status, _) = call(reqwest::Method::POST, server.port, "/crash?code=7").await;
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code, Some(7));
}
