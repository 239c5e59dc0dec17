//! Keep-alive connections to instances, per instance. A connection is
//! taken for one request and given back when its response body has been
//! read to the end (see `proxy::UpstreamBody`), so HTTP/1.1 connections are
//! never shared by two requests at once.

use std::sync::Mutex;

use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

/// The body of a request on its way to an instance.
pub(crate) type UpBody = Limited<Incoming>;

#[derive(Debug)]
pub(crate) struct Pool {
    idle: Mutex<Vec<SendRequest<UpBody>>>,
    max_idle: usize,
}

impl Pool {
    pub fn new(max_idle: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
        }
    }

    /// The most recently used open connection (it is the least likely to
    /// have been closed by the instance's idle timeout).
    pub fn take(&self) -> Option<SendRequest<UpBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    pub fn put(&self, sender: SendRequest<UpBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(sender);
        }
    }
}
