//! HTTP/1.1 to instances, driven inside the task that serves the client's
//! request: the request head is written, the response head read and the
//! response body streamed from the instance's socket by the same task
//! that writes it to the client. No connection task, channel or wake-up
//! of another task sits between the two sockets, which is what a request
//! through a generic HTTP client costs (see ARCHITECTURE.md, "Router").
//!
//! What is parsed is only what a proxy must understand: the status line,
//! the headers, and the framing of the body (RFC 9112 §6.3): none (HEAD,
//! 1xx, 204, 304), `Content-Length`, `chunked`, or until the instance
//! closes. Chunked bodies are decoded and handed on as data; the client's
//! side frames them again for its own protocol.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::table::InFlight;

/// Response heads larger than this are refused (502).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Headers in one response head.
const MAX_HEADERS: usize = 100;
/// Room a read asks for at least.
const READ_CHUNK: usize = 16 * 1024;

/// An open HTTP/1.1 connection to an instance, with what has been read
/// from it and not yet used.
#[derive(Debug)]
pub(crate) struct Conn {
    pub stream: TcpStream,
    buf: BytesMut,
    /// Taken from the pool: it may have been closed by the instance since.
    pub reused: bool,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        Self {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            reused: false,
        }
    }

    /// Whether an idle connection still looks usable: an idle HTTP/1.1
    /// connection has nothing to read, so anything readable (data, end of
    /// stream, an error) means the instance closed it or broke framing.
    /// Costs no system call unless the socket was reported readable.
    pub fn idle_usable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads more into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Gives back the bytes read past a response head (an upgraded
    /// connection's first bytes from the instance).
    pub fn take_buffered(&mut self) -> BytesMut {
        self.buf.split()
    }
}

/// Why an exchange with an instance failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// Nothing came back before the connection failed or closed. Whether
    /// the request may be sent again is up to the caller: it is safe when
    /// the connection was reused (an instance closing an idle connection
    /// has not read the request) or the method is idempotent.
    #[error("the connection closed before a response")]
    NoResponse(#[source] io::Error),
    #[error("the instance sent a malformed response: {0}")]
    Malformed(&'static str),
    #[error("the response head is larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("the request body is larger than this route accepts")]
    BodyTooLarge,
    #[error("reading the request body from the client failed")]
    ClientBody(#[source] hyper::Error),
}

/// How a response's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    /// Until the instance closes the connection.
    Close,
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// Inside a chunk's data, with this much left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk, up to an empty line.
    Trailers,
}

/// A response head read from an instance.
#[derive(Debug)]
pub(crate) struct Head {
    pub status: StatusCode,
    pub headers: HeaderMap,
    framing: Framing,
    /// The connection may carry another request once the body is read.
    keep_alive: bool,
}

/// How the request's body goes to the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestBody {
    /// No body; `Content-Length: 0` is written for methods that carry one.
    None,
    Length(u64),
    Chunked,
}

impl RequestBody {
    pub fn of(method: &Method, body: &Incoming) -> Self {
        if body.is_end_stream() {
            return Self::None;
        }
        match body.size_hint().exact() {
            Some(0) if !expects_body(method) => Self::None,
            Some(n) => Self::Length(n),
            None => Self::Chunked,
        }
    }
}

fn expects_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// What the router adds to a request on its way to an instance.
#[derive(Debug)]
pub(crate) struct Added<'a> {
    /// `Host`, when the request had none (HTTP/2: from its authority).
    pub host: Option<&'a [u8]>,
    pub forwarded_host: Option<&'a [u8]>,
    /// The client's own `X-Forwarded-For`, which the client IP is appended to.
    pub forwarded_for: Option<&'a [u8]>,
    pub client_ip: &'a [u8],
    pub proto: &'static [u8],
    /// `X-Request-Id`, when the router made one.
    pub request_id: Option<&'a [u8]>,
    /// Adds `Connection: upgrade`.
    pub upgrade: bool,
}

/// Serializes a request head in one pass: the client's headers but those
/// `skip` says, then what the router adds, then the framing of `body`.
pub(crate) fn request_head(
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    skip: impl Fn(&HeaderName) -> bool,
    added: &Added<'_>,
    body: RequestBody,
) -> Vec<u8> {
    fn line(head: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        head.extend_from_slice(name);
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    let mut head = Vec::with_capacity(384 + headers.len() * 48);
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path_and_query.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if !skip(name) {
            line(&mut head, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if let Some(host) = added.host {
        line(&mut head, b"host", host);
    }
    if let Some(host) = added.forwarded_host {
        line(&mut head, b"x-forwarded-host", host);
    }
    head.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prior) = added.forwarded_for {
        head.extend_from_slice(prior);
        head.extend_from_slice(b", ");
    }
    head.extend_from_slice(added.client_ip);
    head.extend_from_slice(b"\r\n");
    line(&mut head, b"x-forwarded-proto", added.proto);
    if let Some(id) = added.request_id {
        line(&mut head, b"x-request-id", id);
    }
    if added.upgrade {
        head.extend_from_slice(b"connection: upgrade\r\n");
    }
    match body {
        RequestBody::None if expects_body(method) => {
            head.extend_from_slice(b"content-length: 0\r\n");
        }
        RequestBody::None => {}
        RequestBody::Length(n) => {
            head.extend_from_slice(b"content-length: ");
            head.extend_from_slice(n.to_string().as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        RequestBody::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Writes the request (head, then the body as it arrives, at most
/// `max_body` bytes of it) and reads the response head, skipping interim
/// (1xx) responses other than 101.
pub(crate) async fn exchange(
    conn: &mut Conn,
    head: &[u8],
    body: Option<(&mut http_body_util::Limited<Incoming>, RequestBody)>,
    head_request: bool,
) -> Result<Head, ExchangeError> {
    match body {
        None => conn
            .stream
            .write_all(head)
            .await
            .map_err(ExchangeError::NoResponse)?,
        Some((body, framing)) => write_with_body(conn, head, body, framing).await?,
    }
    loop {
        let head = read_head(conn, head_request).await?;
        if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        return Ok(head);
    }
}

async fn write_with_body(
    conn: &mut Conn,
    head: &[u8],
    body: &mut http_body_util::Limited<Incoming>,
    framing: RequestBody,
) -> Result<(), ExchangeError> {
    use http_body_util::BodyExt;
    let chunked = framing == RequestBody::Chunked;
    // The head goes out with the first piece of the body: one write for
    // the usual small request.
    let mut out = head.to_vec();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                return Err(match error.downcast::<hyper::Error>() {
                    Ok(error) => ExchangeError::ClientBody(*error),
                    Err(_) => ExchangeError::BodyTooLarge,
                });
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // Trailers are not forwarded.
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(&data);
        }
        conn.stream
            .write_all(&out)
            .await
            .map_err(ExchangeError::NoResponse)?;
        out.clear();
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        conn.stream
            .write_all(&out)
            .await
            .map_err(ExchangeError::NoResponse)?;
    }
    Ok(())
}

async fn read_head(conn: &mut Conn, head_request: bool) -> Result<Head, ExchangeError> {
    let mut got_any = !conn.buf.is_empty();
    loop {
        if !conn.buf.is_empty() {
            if let Some(head) = parse_head(&mut conn.buf, head_request)? {
                return Ok(head);
            }
            if conn.buf.len() > MAX_HEAD_BYTES {
                return Err(ExchangeError::HeadTooLarge);
            }
        }
        match conn.fill().await {
            Ok(0) if !got_any => {
                return Err(ExchangeError::NoResponse(
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Ok(0) => return Err(ExchangeError::Malformed("the response head is cut short")),
            Ok(_) => got_any = true,
            Err(error) if !got_any => return Err(ExchangeError::NoResponse(error)),
            Err(_) => return Err(ExchangeError::Malformed("the response head is cut short")),
        }
    }
}

/// Parses a complete head off the front of `buf`; `None` when more bytes
/// are needed. Header values are slices of the head's bytes, not copies.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, ExchangeError> {
    // Offsets into `buf` of each header's name and value.
    let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
    let (len, code, http11, count) = {
        let mut slots =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut slots,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ExchangeError::Malformed("too many headers"));
            }
            Err(_) => return Err(ExchangeError::Malformed("not an HTTP/1.x response head")),
        };
        let base = buf.as_ptr() as usize;
        for (span, header) in spans.iter_mut().zip(response.headers.iter()) {
            let name = header.name.as_ptr() as usize - base;
            let value = header.value.as_ptr() as usize - base;
            *span = (
                name,
                name + header.name.len(),
                value,
                value + header.value.len(),
            );
        }
        (
            len,
            response.code.unwrap_or(0),
            response.version == Some(1),
            response.headers.len(),
        )
    };
    let raw = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code)
        .map_err(|_| ExchangeError::Malformed("the status code is out of range"))?;
    let mut headers = HeaderMap::with_capacity(count);
    let mut keep_alive = http11;
    let mut chunked = false;
    let mut other_coding = false;
    let mut length: Option<u64> = None;
    for &(n0, n1, v0, v1) in &spans[..count] {
        let name = HeaderName::from_bytes(&raw[n0..n1])
            .map_err(|_| ExchangeError::Malformed("a header name is invalid"))?;
        let value_bytes = &raw[v0..v1];
        if name == hyper::header::CONTENT_LENGTH {
            let n = std::str::from_utf8(value_bytes)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(ExchangeError::Malformed("Content-Length is not a number"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ExchangeError::Malformed("Content-Length is given twice"));
            }
            length = Some(n);
        } else if name == hyper::header::TRANSFER_ENCODING {
            // Only the last coding decides; anything after `chunked` means
            // the body ends with the connection.
            for coding in value_bytes.split(|b| *b == b',') {
                let coding = coding.trim_ascii();
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked = true;
                    other_coding = false;
                } else if !coding.is_empty() {
                    other_coding = true;
                }
            }
        } else if name == hyper::header::CONNECTION {
            for option in value_bytes.split(|b| *b == b',') {
                if option.trim_ascii().eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                }
            }
        }
        let value = HeaderValue::from_maybe_shared(raw.slice(v0..v1))
            .map_err(|_| ExchangeError::Malformed("a header value is invalid"))?;
        headers.append(name, value);
    }
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if chunked || other_coding {
        if length.is_some() {
            // Both: the coding wins (RFC 9112 §6.3), and the connection
            // must not be used again.
            keep_alive = false;
        }
        if chunked && !other_coding {
            Framing::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Framing::Close
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::Close
    };
    Ok(Some(Head {
        status,
        headers,
        framing,
        keep_alive,
    }))
}

/// An instance's response body on its way to the client, read from the
/// instance's socket as the client's side asks for it. Read to the end,
/// the connection goes back to the instance's pool; dropped before (the
/// client went away), it is closed.
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    /// The request stays counted on its instance until the body is done
    /// or dropped.
    in_flight: InFlight,
}

impl UpstreamBody {
    pub fn new(conn: Conn, head: &Head, in_flight: InFlight) -> Self {
        Self {
            conn: Some(conn),
            framing: head.framing,
            keep_alive: head.keep_alive,
            in_flight,
        }
    }

    fn done(&self) -> bool {
        matches!(self.framing, Framing::Empty | Framing::Length(0))
    }
}

fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the instance closed the connection in the middle of the response body",
    )
}

fn bad_chunk(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            match this.framing {
                Framing::Empty | Framing::Length(0) => return Poll::Ready(None),
                Framing::Length(left) => {
                    if conn.buf.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err(cut_short())));
                    }
                    let take = conn
                        .buf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    this.framing = Framing::Length(left - take as u64);
                    let data = conn.buf.split_to(take).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close => {
                    if conn.buf.is_empty() && ready!(conn.poll_fill(cx))? == 0 {
                        this.framing = Framing::Empty;
                        return Poll::Ready(None);
                    }
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) => {
                    match decode_chunk(&mut conn.buf, state).map_err(bad_chunk)? {
                        Decoded::Data(data, next) => {
                            this.framing = Framing::Chunked(next);
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Decoded::Next(next) => this.framing = Framing::Chunked(next),
                        Decoded::End => {
                            this.framing = Framing::Empty;
                            return Poll::Ready(None);
                        }
                        Decoded::NeedMore => {
                            if ready!(conn.poll_fill(cx))? == 0 {
                                return Poll::Ready(Some(Err(cut_short())));
                            }
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The count itself comes back when `in_flight` drops, after this.
        if self.done()
            && self.keep_alive
            && let Some(mut conn) = self.conn.take()
            && conn.buf.is_empty()
        {
            conn.reused = true;
            self.in_flight.backend().pool.put(conn);
        }
    }
}

/// One step of the chunked decoder.
#[derive(Debug)]
enum Decoded {
    Data(Bytes, Chunk),
    Next(Chunk),
    End,
    NeedMore,
}

/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;

fn decode_chunk(buf: &mut BytesMut, state: Chunk) -> Result<Decoded, &'static str> {
    match state {
        Chunk::Size => {
            let Some(end) = find_crlf(buf) else {
                return if buf.len() > MAX_CHUNK_LINE {
                    Err("a chunk-size line is too long")
                } else {
                    Ok(Decoded::NeedMore)
                };
            };
            let line = &buf[..end];
            let digits = line
                .split(|b| *b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if digits.is_empty() || digits.len() > 15 {
                return Err("a chunk size is not a hexadecimal number");
            }
            let mut size: u64 = 0;
            for &d in digits {
                let v = match d {
                    b'0'..=b'9' => d - b'0',
                    b'a'..=b'f' => d - b'a' + 10,
                    b'A'..=b'F' => d - b'A' + 10,
                    _ => return Err("a chunk size is not a hexadecimal number"),
                };
                size = size * 16 + u64::from(v);
            }
            buf.advance(end + 2);
            Ok(Decoded::Next(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Decoded::NeedMore);
            }
            let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let data = buf.split_to(take).freeze();
            let left = left - take as u64;
            Ok(Decoded::Data(
                data,
                if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                },
            ))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Decoded::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err("a chunk's data is not followed by CRLF");
            }
            buf.advance(2);
            Ok(Decoded::Next(Chunk::Size))
        }
        Chunk::Trailers => {
            let Some(end) = find_crlf(buf) else {
                return if buf.len() > MAX_CHUNK_LINE {
                    Err("a trailer line is too long")
                } else {
                    Ok(Decoded::NeedMore)
                };
            };
            buf.advance(end + 2);
            // An empty line ends the body; trailer fields are dropped.
            Ok(if end == 0 {
                Decoded::End
            } else {
                Decoded::Next(Chunk::Trailers)
            })
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Opens a TCP connection to an instance within `timeout`: to `socket`
/// when the address was parsed already, else to `addr` (resolved).
pub(crate) async fn connect_stream(
    socket: Option<std::net::SocketAddr>,
    addr: &str,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let connecting = async {
        match socket {
            Some(socket) => TcpStream::connect(socket).await,
            None => TcpStream::connect(addr).await,
        }
    };
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(ConnectError::Io)
}

/// Why an instance could not be reached; the instance counts as down.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connecting timed out")]
    Timeout,
    #[error("connecting failed")]
    Io(#[source] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize), &'static str> {
        let mut buf = BytesMut::from(input);
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        loop {
            match decode_chunk(&mut buf, state)? {
                Decoded::Data(data, next) => {
                    out.extend_from_slice(&data);
                    state = next;
                }
                Decoded::Next(next) => state = next,
                Decoded::End => return Ok((out, buf.len())),
                Decoded::NeedMore => return Err("need more"),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (body, rest) =
            decode_all(b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\nNEXT").unwrap();
        assert_eq!(body, b"hello0123456789");
        assert_eq!(rest, 4, "bytes after the body stay for the next response");
    }

    #[test]
    fn malformed_chunks_are_errors_not_hangs() {
        assert!(decode_all(b"zz\r\n").is_err());
        assert!(decode_all(b"\r\n").is_err());
        assert!(decode_all(b"3\r\nabcX\r\n").is_err());
        assert!(decode_all(b"ffffffffffffffff\r\n").is_err(), "overflow");
        assert_eq!(decode_all(b"3\r\nab"), Err("need more"));
    }

    fn head(raw: &[u8], head_request: bool) -> Head {
        parse_head(&mut BytesMut::from(raw), head_request)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false);
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true);
        assert_eq!(h.framing, Framing::Empty, "HEAD has no body");
        let h = head(
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Empty);
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Chunked(Chunk::Size));
        let h = head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            false,
        );
        assert_eq!(
            (h.framing, h.keep_alive),
            (Framing::Chunked(Chunk::Size), false)
        );
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = head(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false);
        assert!(!h.keep_alive, "HTTP/1.0 connections are not reused");
        let h = head(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 1\r\n\r\n",
            false,
        );
        assert!(!h.keep_alive);
    }

    #[test]
    fn bad_heads_are_refused() {
        let bad = |raw: &[u8]| parse_head(&mut BytesMut::from(raw), false).is_err();
        assert!(bad(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"));
        assert!(bad(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"
        ));
        assert!(bad(b"SSH-2.0-OpenSSH\r\n\r\n"));
        assert!(
            parse_head(&mut BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]), false)
                .unwrap()
                .is_none()
        );
    }
}
