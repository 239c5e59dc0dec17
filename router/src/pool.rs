//! Keep-alive connections to instances, per instance and per worker. A
//! connection is taken for one request and given back when its response
//! body has been read to the end (see `upstream::UpstreamBody`), so a
//! connection never carries two requests at once. Each worker keeps its
//! own: a socket is registered with the event loop of the worker that
//! opened it, and is cheapest to use from there.

use std::cell::Cell;
use std::sync::Mutex;

use crate::upstream::Conn;

/// Pools per instance; workers beyond this share slots.
const SLOTS: usize = 16;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the calling thread as worker `index`, for the pools' slots.
pub(crate) fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index % SLOTS));
}

#[derive(Debug)]
pub(crate) struct Pool {
    slots: [Mutex<Vec<Conn>>; SLOTS],
    max_idle: usize,
}

impl Pool {
    pub fn new(max_idle: usize) -> Self {
        Self {
            slots: std::array::from_fn(|_| Mutex::new(Vec::new())),
            max_idle,
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        let slot = &self.slots[WORKER.with(Cell::get)];
        slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used open connection (it is the least likely to
    /// have been closed by the instance's idle timeout).
    pub fn take(&self) -> Option<Conn> {
        let mut idle = self.slot();
        while let Some(conn) = idle.pop() {
            if conn.idle_usable() {
                return Some(conn);
            }
        }
        None
    }

    pub fn put(&self, conn: Conn) {
        let mut idle = self.slot();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }
}
