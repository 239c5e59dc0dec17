//! What the controller's integration tests share: a controller on a free
//! loopback port over an embedded store in a temporary directory.

use std::path::Path;

use keel_controller::{Server, ServerConfig};

/// Starts a controller with default settings, its store and tokens in
/// `dir`, listening on a free port of 127.0.0.1.
pub async fn start_server(dir: &Path) -> Server {
    Server::start(ServerConfig::new(
        "127.0.0.1:0".parse().expect("a socket address"),
        dir,
    ))
    .await
    .expect("the controller starts")
}
