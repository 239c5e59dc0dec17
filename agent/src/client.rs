//! The agent's side of the controller's HTTP API: register, heartbeat, the
//! desired-instances stream, status reports. Nothing else of the API.

use std::time::Duration;

use keel_protocol::{StatusReport, StreamMessage};
use reqwest::StatusCode;
use serde::Deserialize;

/// The node as its agent registers it (`POST /v1/nodes`): the one wire
/// type both sides compile against.
pub use keel_protocol::{NodeCapacity, Registration as NodeRegistration};

/// Why a call to the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach the controller")]
    Transport(#[source] reqwest::Error),
    #[error("the controller refused the credential (401)")]
    Unauthorized,
    #[error("the controller answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("the controller's answer does not decode")]
    Decode(#[source] serde_json::Error),
    #[error("the stream sent a line longer than {limit_bytes} bytes")]
    LineTooLong { limit_bytes: usize },
    #[error("the stream ended")]
    Ended,
    #[error("the stream was silent for {seconds} s (no keepalive): the connection is dead")]
    Silent { seconds: u64 },
}

/// A failed call, named by what the agent was doing.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("registering node {node} with {url}")]
    Register {
        node: String,
        url: String,
        #[source]
        source: CallError,
    },
    #[error("heartbeat of node {node}")]
    Heartbeat {
        node: String,
        #[source]
        source: CallError,
    },
    #[error("desired-instances stream of node {node}")]
    Watch {
        node: String,
        #[source]
        source: CallError,
    },
    #[error("status report of node {node}")]
    Report {
        node: String,
        #[source]
        source: CallError,
    },
    #[error("log request {request} of node {node}")]
    Logs {
        node: String,
        request: String,
        #[source]
        source: CallError,
    },
}

impl ControllerError {
    pub fn cause(&self) -> &CallError {
        match self {
            ControllerError::Register { source, .. }
            | ControllerError::Heartbeat { source, .. }
            | ControllerError::Watch { source, .. }
            | ControllerError::Report { source, .. }
            | ControllerError::Logs { source, .. } => source,
        }
    }

    pub fn is_unauthorized(&self) -> bool {
        matches!(self.cause(), CallError::Unauthorized)
    }
}

#[derive(Deserialize)]
struct Registered {
    token: String,
}

/// The controller, as one agent reaches it.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    base: String,
    http: reqwest::Client,
    timeout: Duration,
}

async fn check(response: reqwest::Response) -> Result<reqwest::Response, CallError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    if status == StatusCode::UNAUTHORIZED {
        return Err(CallError::Unauthorized);
    }
    let body = response.text().await.unwrap_or_default();
    // The API's errors are `{"error": ..., "message": ...}`; say the message.
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or(body);
    Err(CallError::Status {
        status: status.as_u16(),
        message,
    })
}

impl Controller {
    pub(crate) fn new(base: &str, http: reqwest::Client, timeout: Duration) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
            timeout,
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.base
    }

    /// Registers the node; returns its credential.
    pub(crate) async fn register(
        &self,
        join_token: &str,
        node: &NodeRegistration,
    ) -> Result<String, ControllerError> {
        let call = async {
            let response = self
                .http
                .post(format!("{}/v1/nodes", self.base))
                .bearer_auth(join_token)
                .timeout(self.timeout)
                .json(node)
                .send()
                .await
                .map_err(CallError::Transport)?;
            let bytes = check(response)
                .await?
                .bytes()
                .await
                .map_err(CallError::Transport)?;
            let registered: Registered =
                serde_json::from_slice(&bytes).map_err(CallError::Decode)?;
            Ok(registered.token)
        };
        call.await.map_err(|source| ControllerError::Register {
            node: node.name.clone(),
            url: self.base.clone(),
            source,
        })
    }

    pub(crate) async fn heartbeat(
        &self,
        node: &str,
        credential: &str,
    ) -> Result<(), ControllerError> {
        let call = async {
            let response = self
                .http
                .post(format!("{}/v1/nodes/{node}/heartbeat", self.base))
                .bearer_auth(credential)
                .timeout(self.timeout)
                .send()
                .await
                .map_err(CallError::Transport)?;
            check(response).await?;
            Ok(())
        };
        call.await.map_err(|source| ControllerError::Heartbeat {
            node: node.to_owned(),
            source,
        })
    }

    /// Opens the node's desired-instances stream. No timeout: it lasts as
    /// long as the connection.
    pub(crate) async fn watch(
        &self,
        node: &str,
        credential: &str,
    ) -> Result<reqwest::Response, ControllerError> {
        let call = async {
            let response = self
                .http
                .get(format!("{}/v1/nodes/{node}/instances/watch", self.base))
                .bearer_auth(credential)
                .send()
                .await
                .map_err(CallError::Transport)?;
            check(response).await
        };
        call.await.map_err(|source| ControllerError::Watch {
            node: node.to_owned(),
            source,
        })
    }

    pub(crate) async fn report(
        &self,
        node: &str,
        credential: &str,
        report: &StatusReport,
    ) -> Result<(), ControllerError> {
        let call = async {
            let response = self
                .http
                .post(format!("{}/v1/nodes/{node}/status", self.base))
                .bearer_auth(credential)
                .timeout(self.timeout)
                .json(report)
                .send()
                .await
                .map_err(CallError::Transport)?;
            check(response).await?;
            Ok(())
        };
        call.await.map_err(|source| ControllerError::Report {
            node: node.to_owned(),
            source,
        })
    }
}

impl Controller {
    /// Answers a log request: `body` is the instance's log, streamed for
    /// as long as it lasts (no timeout: a followed log lasts until the
    /// controller ends the request).
    pub(crate) async fn send_logs(
        &self,
        node: &str,
        credential: &str,
        request: &str,
        body: reqwest::Body,
    ) -> Result<(), ControllerError> {
        let call = async {
            let response = self
                .http
                .post(format!("{}/v1/nodes/{node}/logs/{request}", self.base))
                .bearer_auth(credential)
                .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(body)
                .send()
                .await
                .map_err(CallError::Transport)?;
            check(response).await?;
            Ok(())
        };
        call.await.map_err(|source| ControllerError::Logs {
            node: node.to_owned(),
            request: request.to_owned(),
            source,
        })
    }
}

/// Splits the stream's bytes into lines and decodes each as it completes,
/// whatever the chunk boundaries.
#[derive(Debug, Default)]
pub(crate) struct LineDecoder {
    buffer: Vec<u8>,
    /// How far `buffer` is known to hold no newline.
    scanned: usize,
}

/// A line is a whole snapshot, manifests included: generous, but bounded.
pub(crate) const MAX_LINE_BYTES: usize = 256 << 20;

impl LineDecoder {
    /// Adds a chunk and returns the messages of the lines it completed.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Result<Vec<StreamMessage>, CallError> {
        self.buffer.extend_from_slice(chunk);
        let mut messages = Vec::new();
        let mut start = 0;
        while let Some(offset) = self.buffer[self.scanned.max(start)..]
            .iter()
            .position(|&b| b == b'\n')
        {
            let end = self.scanned.max(start) + offset;
            let line = &self.buffer[start..end];
            if !line.iter().all(u8::is_ascii_whitespace) {
                messages.push(serde_json::from_slice(line).map_err(CallError::Decode)?);
            }
            start = end + 1;
        }
        self.buffer.drain(..start);
        self.scanned = self.buffer.len();
        if self.buffer.len() > MAX_LINE_BYTES {
            return Err(CallError::LineTooLong {
                limit_bytes: MAX_LINE_BYTES,
            });
        }
        Ok(messages)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn lines_decode_whatever_the_chunk_boundaries() {
        let snapshot = r#"{"snapshot":{"generation":3,"instances":[]}}"#;
        let delete =
            r#"{"delete":{"generation":4,"instance":{"project":"p","app":"a","id":"1-ab"}}}"#;
        let stream = format!("{snapshot}\n\n{delete}\n");
        for split in 0..stream.len() {
            let mut decoder = LineDecoder::default();
            let mut messages = decoder.feed(&stream.as_bytes()[..split]).unwrap();
            messages.extend(decoder.feed(&stream.as_bytes()[split..]).unwrap());
            assert_eq!(messages.len(), 2, "split at {split}");
            assert!(matches!(
                messages[0],
                StreamMessage::Snapshot { generation: 3, .. }
            ));
            assert!(matches!(
                messages[1],
                StreamMessage::Delete { generation: 4, .. }
            ));
        }
    }

    #[test]
    fn a_put_with_its_manifest_decodes() {
        let line = r#"{"put":{"generation":9,"instance":{"project":"shop","app":"web","id":"1-ab","revision":1,"manifest":{"name":"web","project":"shop","image":"nginx:1"}}}}"#;
        let messages = LineDecoder::default()
            .feed(format!("{line}\n").as_bytes())
            .unwrap();
        let StreamMessage::Put { instance, .. } = &messages[0] else {
            panic!("{messages:?}");
        };
        assert_eq!(instance.instance.id, "1-ab");
        assert_eq!(instance.manifest.image, "nginx:1");
    }

    #[test]
    fn a_bad_line_is_an_error() {
        let error = LineDecoder::default().feed(b"{\"snap\":1}\n").unwrap_err();
        assert!(matches!(error, CallError::Decode(_)));
    }
}
