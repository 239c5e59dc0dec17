//! The writer that `tests/crash.rs` runs and kills with SIGKILL: it opens the
//! store at the path in `KEEL_CRASH_CHILD_STORE`, writes from 32 tasks until
//! it is killed, and prints `ack KEY REVISION` for every write the store
//! acknowledged, so that the test knows what must survive.
//!
//! An example rather than a test function so that the test list holds only
//! tests; the crash test builds it with the same profile and target dir.

#![allow(clippy::unwrap_used)] // a test helper: a panic is its failure report

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use keel_store::{EmbeddedOptions, EmbeddedStore, Store};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let path = std::env::var("KEEL_CRASH_CHILD_STORE")
        .context("KEEL_CRASH_CHILD_STORE must name the store file to write")?;
    let round: usize = std::env::var("KEEL_CRASH_ROUND")
        .context("KEEL_CRASH_ROUND must be set")?
        .parse()
        .context("KEEL_CRASH_ROUND must be a number")?;
    let store = Arc::new(EmbeddedStore::open(&path, EmbeddedOptions::default())?);
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let mut tasks = Vec::new();
    for task in 0..32 {
        let (store, out) = (store.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("/crash/{round}/{task}/{i}");
                let revision = store
                    .put(&key, key.clone().into_bytes(), None)
                    .await
                    .unwrap();
                let mut out = out.lock().unwrap();
                writeln!(out, "ack {key} {revision}").unwrap();
                out.flush().unwrap();
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(())
}
