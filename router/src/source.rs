//! Where tables come from: a file read once, or the controller's stream.
//! The stream is followed for as long as the router runs, reconnecting
//! with backoff; while the controller is away the last table keeps
//! serving, because a control plane outage must not become a data plane
//! outage.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_protocol::RouteTable;
use tokio::sync::watch;

use crate::RouterError;
use crate::config::ControllerSource;
use crate::proxy::Shared;
use crate::tcp::TcpRoutes;

/// Reads and parses a `RouteTable` JSON file (strictly: unknown fields are
/// errors).
pub(crate) fn read_file(path: &Path) -> Result<RouteTable, RouterError> {
    let text = std::fs::read(path).map_err(|source| RouterError::TableFile {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| RouterError::TableJson {
        path: path.to_owned(),
        source,
    })
}

/// How much of an error answer's body is kept for the log.
const MAX_ERROR_BODY_BYTES: usize = 4096;

/// `error` and its sources, as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Why one connection to the controller's stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("the request to {url} failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the controller answered {status}: {body}")]
    Status {
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("nothing heard from the controller for {0:?}")]
    Silent(Duration),
    #[error("the controller sent a line that is not a route table")]
    Json(#[source] serde_json::Error),
    #[error(
        "the controller sent a line longer than max_line_bytes ({max_line_bytes} bytes); \
         dropped the connection"
    )]
    LineTooLong { max_line_bytes: usize },
    #[error("the controller closed the stream")]
    Ended,
}

/// Follows the stream until `stop` turns true.
pub(crate) async fn follow(
    shared: Arc<Shared>,
    tcp: TcpRoutes,
    source: ControllerSource,
    mut stop: watch::Receiver<bool>,
) {
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build an HTTP client for the controller stream");
            return;
        }
    };
    let max = Duration::from_millis(source.reconnect_max_ms.max(100));
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = tokio::select! {
            result = stream_once(&client, &source, &shared, &tcp, &mut backoff) => result,
            () = crate::stopped(&mut stop) => return,
        };
        if let Err(error) = result {
            shared.set_stream_error(Some(chain(&error)));
            tracing::warn!(
                error = %error,
                source = ?std::error::Error::source(&error),
                retry_in_ms = backoff.as_millis() as u64,
                generation = shared.table.load().generation,
                "route stream lost; serving the last table"
            );
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = crate::stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(max);
    }
}

async fn stream_once(
    client: &reqwest::Client,
    source: &ControllerSource,
    shared: &Shared,
    tcp: &TcpRoutes,
    backoff: &mut Duration,
) -> Result<(), StreamError> {
    let url = format!(
        "{}/v1/routes/watch?node={}",
        source.url.trim_end_matches('/'),
        source.node
    );
    let mut response = client
        .get(&url)
        .bearer_auth(&source.token)
        .send()
        .await
        .map_err(|source| StreamError::Request {
            url: url.clone(),
            source,
        })?;
    let status = response.status();
    if !status.is_success() {
        // The controller's explanation, as far as it is short: an error
        // body is no more trusted to end than a line is.
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BODY_BYTES {
            match tokio::time::timeout(Duration::from_secs(5), response.chunk()).await {
                Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body.truncate(MAX_ERROR_BODY_BYTES);
        return Err(StreamError::Status {
            status,
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        });
    }
    let silence = Duration::from_millis(source.silence_timeout_ms);
    let max_line_bytes = usize::try_from(source.max_line_bytes).unwrap_or(usize::MAX);
    let mut buf: Vec<u8> = Vec::new();
    // `buf[..scanned]` holds no newline: each byte is looked at once.
    let mut scanned = 0;
    loop {
        let chunk = tokio::time::timeout(silence, response.chunk())
            .await
            .map_err(|_| StreamError::Silent(silence))?
            .map_err(|source| StreamError::Request {
                url: url.clone(),
                source,
            })?;
        let Some(chunk) = chunk else {
            return Err(StreamError::Ended);
        };
        buf.extend_from_slice(&chunk);
        while let Some(at) = buf[scanned..].iter().position(|b| *b == b'\n') {
            let end = scanned + at;
            scanned = 0;
            if end > max_line_bytes {
                return Err(StreamError::LineTooLong { max_line_bytes });
            }
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue; // keepalive
            }
            let table: RouteTable = serde_json::from_slice(line).map_err(StreamError::Json)?;
            tracing::info!(
                generation = table.generation,
                routes = table.routes.len(),
                "route table received"
            );
            shared.swap(&table);
            tcp.apply(&table);
            shared.set_stream_error(None);
            // Healthy again: the next loss retries after 100 ms (the
            // backoff doubles once before the retry).
            *backoff = Duration::from_millis(50);
        }
        // What is left is the start of a line: past the limit it can only
        // end as a line too long, so the connection is dropped before its
        // bytes pile up.
        scanned = buf.len();
        if scanned > max_line_bytes {
            return Err(StreamError::LineTooLong { max_line_bytes });
        }
    }
}
