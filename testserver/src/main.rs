//! `keel-testserver`: the app Keel's end-to-end tests, benchmarks and the
//! README tour deploy. It is a real container image (`FROM scratch`, one
//! static binary), so a test exercises what a user's app would.
//!
//! `keel-testserver [serve]` listens on `$PORT` (default 8080) on every
//! address, prints `keel-testserver listening on ...` at start and one line
//! per request (so log tests have something to find), and answers:
//! - `GET /`: JSON with its instance id (`$KEEL_INSTANCE`), app, project,
//!   node and its whole environment;
//! - `GET /healthz`: 200, or 500 after `POST /health/fail` (until
//!   `POST /health/ok`);
//! - `POST /crash?code=N`: answers, then exits with status N (default 1);
//! - `GET /slow?ms=N`: answers after N milliseconds;
//! - `GET /ws`: websocket echo;
//! - `GET /print?line=TEXT`: prints TEXT to stdout;
//! - `GET /print-raw?bytes=N`: writes N bytes of `x` to stdout without a
//!   newline (a line as long as N, unless other requests print meanwhile),
//!   answering once they are written.
//!
//! SIGTERM and SIGINT exit at once with status 0: as PID 1 in a container
//! it has no default handler, and `docker stop` would otherwise wait for
//! its whole timeout.
//!
//! `keel-testserver check URL [--timeout-ms N]` is an exec probe (and a
//! way for a test to ask "can this container reach that one?"): for
//! `http://host[:port]/path` it exits 0 on a 2xx or 3xx answer, for
//! `tcp://host:port` when a connection opens, and 1 otherwise. The image
//! has no libc resolver files, so host names are resolved by `dns.rs`
//! (`/etc/hosts`, then the servers in `/etc/resolv.conf`).
//!
//! Depends on no Keel crate: it stands for any user's app.

#![forbid(unsafe_code)]

mod dns;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A request head larger than this is refused (closes the connection).
const MAX_HEAD_BYTES: usize = 16 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keel-testserver: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match args.first().map(String::as_str) {
        None | Some("serve") => runtime.block_on(serve()),
        Some("check") => runtime.block_on(check(&args[1..])),
        Some(other) => {
            eprintln!(
                "keel-testserver: unknown command {other:?}; usage: keel-testserver [serve] | check URL [--timeout-ms N]"
            );
            ExitCode::from(2)
        }
    }
}

#[derive(Debug)]
struct State {
    healthy: AtomicBool,
}

async fn serve() -> ExitCode {
    let port = match std::env::var("PORT") {
        Ok(port) => match port.parse::<u16>() {
            Ok(port) => port,
            Err(_) => {
                eprintln!("keel-testserver: PORT={port:?} is not a port number");
                return ExitCode::from(2);
            }
        },
        Err(_) => 8080,
    };
    let listener = match TcpListener::bind(("0.0.0.0", port)).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("keel-testserver: cannot listen on port {port}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .map_or_else(|_| format!("0.0.0.0:{port}"), |a| a.to_string());
    println!(
        "keel-testserver listening on {addr} instance={}",
        env_or("KEEL_INSTANCE", "-")
    );
    let state = Arc::new(State {
        healthy: AtomicBool::new(true),
    });
    let signals = (
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
    );
    let (Ok(mut term), Ok(mut int)) = signals else {
        eprintln!("keel-testserver: cannot handle signals");
        return ExitCode::FAILURE;
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        let _ = stream.set_nodelay(true);
                        connection(stream, peer, state).await;
                    });
                }
                Err(error) => {
                    eprintln!("keel-testserver: accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = term.recv() => {
                println!("keel-testserver stopping (SIGTERM)");
                return ExitCode::SUCCESS;
            }
            _ = int.recv() => {
                println!("keel-testserver stopping (SIGINT)");
                return ExitCode::SUCCESS;
            }
        }
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    headers: BTreeMap<String, String>,
    keep_alive: bool,
}

struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    /// Exit the process with this status once the reply is written.
    exit: Option<u8>,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            exit: None,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Serves HTTP/1.1 requests on one connection (keep-alive) until the
/// client closes it, or hands it to the websocket echo.
async fn connection(mut stream: TcpStream, peer: SocketAddr, state: Arc<State>) {
    let mut buffer: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(at) = find(&buffer, b"\r\n\r\n") {
                break at + 4;
            }
            if buffer.len() > MAX_HEAD_BYTES {
                return;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let Some(request) = parse(&String::from_utf8_lossy(&buffer[..head_end])) else {
            let _ = write_reply(&mut stream, &Reply::text(400, "bad request\n"), false).await;
            return;
        };
        // Bodies are read and ignored: no endpoint takes one.
        let length: usize = request
            .headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        buffer.drain(..head_end + length);
        println!("{} {} from {peer}", request.method, request.path);
        if request.path == "/ws"
            && request
                .headers
                .get("upgrade")
                .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        {
            websocket(stream, buffer, &request).await;
            return;
        }
        let reply = route(&request, &state).await;
        let keep_alive = request.keep_alive && reply.exit.is_none();
        if write_reply(&mut stream, &reply, keep_alive).await.is_err() {
            return;
        }
        if let Some(code) = reply.exit {
            println!("keel-testserver exiting with status {code} (asked by {peer})");
            std::process::exit(i32::from(code));
        }
        if !keep_alive {
            return;
        }
    }
}

fn parse(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let target = first.next()?;
    let version = first.next()?;
    let mut headers = BTreeMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), v.replace('+', " "))
        })
        .collect();
    let close = headers
        .get("connection")
        .is_some_and(|c| c.eq_ignore_ascii_case("close"));
    Some(Request {
        method,
        path: path.to_owned(),
        query,
        keep_alive: version == "HTTP/1.1" && !close,
        headers,
    })
}

async fn route(request: &Request, state: &State) -> Reply {
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/") => {
            let env: BTreeMap<String, String> = std::env::vars().collect();
            let body = serde_json::json!({
                "instance": env_or("KEEL_INSTANCE", ""),
                "app": env_or("KEEL_APP", ""),
                "project": env_or("KEEL_PROJECT", ""),
                "node": env_or("KEEL_NODE", ""),
                "env": env,
            });
            Reply {
                status: 200,
                content_type: "application/json",
                body: format!("{body}\n"),
                exit: None,
            }
        }
        ("GET", "/healthz") => {
            if state.healthy.load(Ordering::SeqCst) {
                Reply::text(200, "ok\n")
            } else {
                Reply::text(500, "failing (POST /health/ok to recover)\n")
            }
        }
        ("POST", "/health/fail") => {
            state.healthy.store(false, Ordering::SeqCst);
            println!("keel-testserver health now failing");
            Reply::text(200, "health now failing\n")
        }
        ("POST", "/health/ok") => {
            state.healthy.store(true, Ordering::SeqCst);
            println!("keel-testserver health ok again");
            Reply::text(200, "health ok\n")
        }
        ("POST", "/crash") => {
            let code = request
                .query
                .get("code")
                .and_then(|c| c.parse::<u8>().ok())
                .unwrap_or(1);
            Reply {
                exit: Some(code),
                ..Reply::text(200, format!("exiting with status {code}\n"))
            }
        }
        ("GET", "/slow") => {
            let ms = request
                .query
                .get("ms")
                .and_then(|m| m.parse::<u64>().ok())
                .unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Reply::text(200, format!("slept {ms} ms\n"))
        }
        ("GET", "/print") => {
            let line = request.query.get("line").cloned().unwrap_or_default();
            println!("{line}");
            Reply::text(200, "printed\n")
        }
        ("GET", "/print-raw") => {
            let Some(bytes) = request
                .query
                .get("bytes")
                .and_then(|b| b.parse::<u64>().ok())
            else {
                return Reply::text(400, "bytes=N is required (a number of bytes)\n");
            };
            match print_raw(bytes).await {
                Ok(()) => Reply::text(200, format!("printed {bytes} bytes without a newline\n")),
                Err(error) => Reply::text(500, format!("cannot write to stdout: {error}\n")),
            }
        }
        _ => Reply::text(404, "not found\n"),
    }
}

/// `bytes` bytes of `x` to stdout, no newline, in 64 KiB writes (on the
/// blocking pool: a full pipe must not stall the other connections).
async fn print_raw(bytes: u64) -> std::io::Result<()> {
    let written = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let chunk = [b'x'; 64 * 1024];
        // Locked per write, not for the whole line: holding stdout would
        // stall every other request's log line, and so the server.
        let stdout = std::io::stdout();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            stdout.lock().write_all(&chunk[..n])?;
            left -= n as u64;
        }
        stdout.lock().flush()
    });
    written.await.map_err(std::io::Error::other)?
}

async fn write_reply(
    stream: &mut TcpStream,
    reply: &Reply,
    keep_alive: bool,
) -> std::io::Result<()> {
    let reason = match reply.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n",
        reply.status,
        reply.content_type,
        reply.body.len(),
        if keep_alive { "keep-alive" } else { "close" },
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(reply.body.as_bytes()).await?;
    stream.flush().await
}

/// Echoes every text and binary message until the client closes.
async fn websocket(mut stream: TcpStream, read_ahead: Vec<u8>, request: &Request) {
    let Some(key) = request.headers.get("sec-websocket-key") else {
        let _ = write_reply(&mut stream, &Reply::text(400, "no websocket key\n"), false).await;
        return;
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
    );
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let socket = WebSocketStream::from_partially_read(stream, read_ahead, Role::Server, None).await;
    let (mut sink, mut source) = socket.split();
    while let Some(Ok(message)) = source.next().await {
        let echo = match message {
            Message::Text(_) | Message::Binary(_) => message,
            Message::Close(_) => return,
            _ => continue,
        };
        if sink.send(echo).await.is_err() {
            return;
        }
    }
}

/// The exec probe: exit 0 when the URL answers well (see the crate doc).
async fn check(args: &[String]) -> ExitCode {
    let mut url = None;
    let mut timeout = Duration::from_secs(2);
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--timeout-ms" {
            match rest.next().and_then(|ms| ms.parse::<u64>().ok()) {
                Some(ms) => timeout = Duration::from_millis(ms),
                None => {
                    eprintln!("check: --timeout-ms needs a number of milliseconds");
                    return ExitCode::from(2);
                }
            }
        } else {
            url = Some(arg.clone());
        }
    }
    let Some(url) = url else {
        eprintln!(
            "usage: keel-testserver check http://host[:port]/path | tcp://host:port [--timeout-ms N]"
        );
        return ExitCode::from(2);
    };
    match tokio::time::timeout(timeout, probe(&url)).await {
        Ok(Ok(outcome)) => {
            println!("{url}: {outcome}");
            ExitCode::SUCCESS
        }
        Ok(Err(error)) => {
            eprintln!("{url}: {error}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("{url}: no answer within {} ms", timeout.as_millis());
            ExitCode::FAILURE
        }
    }
}

async fn probe(url: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("not a URL: {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("bad port in {authority:?}"))?,
        ),
        None => (authority, 80),
    };
    let ip = dns::resolve(host)
        .await
        .map_err(|error| format!("cannot resolve {host}: {error}"))?;
    let mut stream = TcpStream::connect((ip, port))
        .await
        .map_err(|error| format!("cannot connect to {ip}:{port}: {error}"))?;
    match scheme {
        "tcp" => Ok(format!("connected to {ip}:{port}")),
        "http" => {
            let request =
                format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n");
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|error| format!("cannot send the request: {error}"))?;
            let mut answer = Vec::new();
            let mut chunk = [0u8; 1024];
            while find(&answer, b"\r\n").is_none() {
                match stream.read(&mut chunk).await {
                    Ok(0) => return Err("the connection closed without an answer".to_owned()),
                    Ok(n) => answer.extend_from_slice(&chunk[..n]),
                    Err(error) => return Err(format!("cannot read the answer: {error}")),
                }
            }
            let line = String::from_utf8_lossy(&answer);
            let status_line = line.lines().next().unwrap_or_default().to_owned();
            let status: u16 = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("not an HTTP answer: {status_line:?}"))?;
            if (200..400).contains(&status) {
                Ok(status_line)
            } else {
                Err(status_line)
            }
        }
        other => Err(format!("unknown scheme {other:?} (http or tcp)")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_request_head_parses_with_its_query() {
        let request =
            parse("POST /crash?code=3&x=a+b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                .unwrap();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/crash");
        assert_eq!(request.query["code"], "3");
        assert_eq!(request.query["x"], "a b");
        assert!(!request.keep_alive);
        assert!(parse("GET / HTTP/1.1\r\n\r\n").unwrap().keep_alive);
    }
}
