//! The store benchmark behind `bench/store.sh`: puts per second with 1 and
//! with 64 concurrent writers, and watch delivery latency (from the start of
//! a put to the arrival of its event), for the embedded store and for a
//! single local etcd member with its default durability, in one run and
//! through the same `Store` trait.
//!
//! `--quick` runs each phase for a fraction of a second so that CI keeps
//! the benchmark working; its figures are not meaningful.

#![allow(clippy::unwrap_used)] // tests and benches may unwrap: a panic is their failure report

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use keel_store::{EmbeddedOptions, EmbeddedStore, EtcdOptions, EtcdStore, Store};

struct Figures {
    puts_64: f64,
    watch_p99_ms: f64,
}

/// Puts per second from `writers` concurrent tasks over `duration`.
async fn puts_per_second(
    store: Arc<dyn Store>,
    writers: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("/bench/{w}/{}", i % 100);
                store.put(&key, vec![b'x'; 256], None).await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Write-to-event latency of `count` puts, paced so that each is measured alone.
async fn watch_latency(store: Arc<dyn Store>, count: usize) -> anyhow::Result<(f64, f64)> {
    let mut watch = store.watch("/latency/", 0).await?;
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let key = format!("/latency/{i}");
        sent.insert(key.clone(), Instant::now());
        store.put(&key, vec![b'y'; 64], None).await?;
        let event = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .context("no watch event within 5 s")?
            .context("watch ended")??;
        let start = sent
            .get(&event.kv.key)
            .context("event for a key never written")?;
        latencies.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
    Ok((at(0.50), at(0.99)))
}

async fn measure(name: &str, store: Arc<dyn Store>, quick: bool) -> anyhow::Result<Figures> {
    let phase = if quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(5)
    };
    // Warm up connections, caches and the file.
    puts_per_second(store.clone(), 8, phase / 5).await?;
    let puts_1 = puts_per_second(store.clone(), 1, phase).await?;
    let puts_64 = puts_per_second(store.clone(), 64, phase).await?;
    let (watch_p50_ms, watch_p99_ms) = watch_latency(store, if quick { 50 } else { 1000 }).await?;
    println!(
        "{name:<9} puts/s 1 writer: {puts_1:>9.0}   64 writers: {puts_64:>9.0}   watch p50 {watch_p50_ms:.3} ms  p99 {watch_p99_ms:.3} ms"
    );
    Ok(Figures {
        puts_64,
        watch_p99_ms,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let dir = tempfile::tempdir()?;
    let embedded: Arc<dyn Store> = Arc::new(EmbeddedStore::open(
        dir.path().join("bench.redb"),
        EmbeddedOptions::default(),
    )?);
    let etcd_server = keel_testing::EtcdServer::start().await?;
    let etcd: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(EtcdOptions {
            endpoints: vec![etcd_server.endpoint()],
            ..EtcdOptions::default()
        })
        .await?,
    );

    let embedded = measure("embedded", embedded, quick).await?;
    let etcd = measure("etcd", etcd, quick).await?;
    println!(
        "RESULT store embedded_puts_64={:.0} etcd_puts_64={:.0} ratio_64={:.2} watch_p99_ms={:.3}",
        embedded.puts_64,
        etcd.puts_64,
        embedded.puts_64 / etcd.puts_64,
        embedded.watch_p99_ms
    );
    Ok(())
}
