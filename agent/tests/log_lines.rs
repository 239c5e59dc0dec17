//! An app that writes without newlines, followed with `keel logs -f`: the
//! agent (and the controller, here in the same process) keep their memory
//! flat, and every byte still reaches the user, as lines of at most
//! [`MAX_LOG_LINE_BYTES`](keel_protocol::logs::MAX_LOG_LINE_BYTES).
//!
//! Runs on the real Docker Engine (the `keel-testserver` image, its
//! `/print-raw` endpoint) with a real controller in-process (`SimCluster`).

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_agent::eventually;
use keel_protocol::logs::MAX_LOG_LINE_BYTES;

/// What the app writes without a newline. Through Docker's json-file log
/// driver and a debug build on a two-core machine, the log arrives at 11
/// to 25 MB/s (busy or idle), so 1 GiB would take 40 to 100 s; 256 MiB
/// takes 10 to 25 s. The unbounded buffer this test guards against grew by
/// 96 MiB on this size before the deadline (its search for a newline
/// rescanned the whole buffer on every frame, so it also slowed to a
/// crawl and the line never arrived).
const RAW_BYTES: u64 = 256 * 1024 * 1024;

/// The most the test process's resident memory (controller and agent
/// included) may grow while the line is read. Bounded, it grows by about
/// 6 MiB.
const MAX_GROWTH_BYTES: u64 = 32 * 1024 * 1024;

const CONVERGE: Duration = Duration::from_secs(30);

fn docker(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Removes the node's containers, the project's networks and the image
/// tag the test made, whatever the outcome.
struct Cleanup {
    node: String,
    project: String,
    tag: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=keel.node={}", self.node),
        ]);
        for id in ids.lines() {
            docker(&["rm", "-f", id]);
        }
        let networks = docker(&["network", "ls", "--format", "{{.ID}} {{.Name}}"]);
        let name = format!("keel-{}", self.project);
        for line in networks.lines() {
            if let Some((id, found)) = line.split_once(' ')
                && found == name
            {
                docker(&["network", "rm", id]);
            }
        }
        docker(&["rmi", &self.tag]);
    }
}

/// This process's resident set, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Samples the resident set every 10 ms and keeps the highest.
struct PeakRss {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    fn start() -> Self {
        let peak = Arc::new(AtomicU64::new(rss_bytes()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Self {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// `GET base+path`, which must succeed.
async fn get(base: &str, path: &str) {
    let response = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "GET {path}: {status} {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_writing_without_newlines_is_followed_in_bounded_memory() {
    support::logs();
    let image = tokio::task::spawn_blocking(keel_testing::testserver::ensure_image)
        .await
        .unwrap()
        .unwrap();
    // No `x` in names: the test counts the `x`s of the long line.
    let id = format!("{}n{}", std::process::id(), line!());
    let (node, project) = (format!("nl{id}"), format!("pl{id}"));
    // A tag of its own: the shared tag may be rebuilt by another checkout's
    // tests while this one runs, without `/print-raw`.
    let tag = format!("keel-testserver:lines-{id}");
    docker(&["tag", &image, &tag]);
    let _cleanup = Cleanup {
        node: node.clone(),
        project: project.clone(),
        tag: tag.clone(),
    };

    let cluster = support::one_docker_node(&node).await;
    // No health check: its requests would print lines into the long one.
    cluster
        .admin()
        .apply(&format!(
            "name: web\nproject: {project}\nimage: {tag}\ninstances: 1\n\
             ports:\n  - name: http\n    port: 8080\n"
        ))
        .await
        .unwrap();
    let instance = eventually!(CONVERGE, {
        let instances = cluster.admin().instances(&project, "web").await.unwrap();
        match instances.first() {
            Some(i) if i.is_up() => Ok(i.clone()),
            _ => Err(format!("not up: {instances:#?}")),
        }
    });
    let base = format!("http://{}", instance.ports["http"]);

    // Following: the request reaches the agent asynchronously, so print
    // until a line shows.
    let mut follow = cluster.admin().follow_logs(&project, "web").await.unwrap();
    let ready = format!("ready-{id}");
    let mut seen = String::new();
    let deadline = Instant::now() + CONVERGE;
    while !seen.contains(&ready) {
        assert!(Instant::now() < deadline, "never saw {ready:?} in:\n{seen}");
        get(&base, &format!("/print?line={ready}")).await;
        if let Ok(Ok(Some(chunk))) =
            tokio::time::timeout(Duration::from_millis(500), follow.chunk()).await
        {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    let before = rss_bytes();
    let peak = PeakRss::start();
    let started = Instant::now();
    let end = format!("end-{id}");
    let writer = tokio::spawn({
        let (base, end) = (base.clone(), end.clone());
        async move {
            get(&base, &format!("/print-raw?bytes={RAW_BYTES}")).await;
            get(&base, &format!("/print?line={end}")).await;
        }
    });

    // Read the followed log as it comes, without keeping it: count the
    // `x`s and measure each line.
    let prefix = format!("[{}] ", instance.id);
    let (mut xs, mut line_bytes, mut longest) = (0u64, 0usize, 0usize);
    let mut tail: Vec<u8> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut ended = false;
    while !ended {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = match tokio::time::timeout(left, follow.chunk()).await {
            Ok(chunk) => match chunk.unwrap() {
                Some(chunk) => chunk,
                None => panic!(
                    "the followed log ended after {xs} bytes: {}",
                    String::from_utf8_lossy(&tail)
                ),
            },
            Err(_) => break,
        };
        for &byte in chunk.iter() {
            if byte == b'\n' {
                longest = longest.max(line_bytes);
                line_bytes = 0;
                continue;
            }
            // Every line starts with the instance's prefix.
            if byte == b'x' && line_bytes >= prefix.len() {
                xs += 1;
            }
            line_bytes += 1;
        }
        tail.extend_from_slice(&chunk);
        let keep = tail.len().saturating_sub(256);
        tail.drain(..keep);
        ended = String::from_utf8_lossy(&tail).ends_with(&format!("{end}\n"));
    }
    let elapsed = started.elapsed();
    let growth = peak.finish().saturating_sub(before);
    eprintln!(
        "{RAW_BYTES} bytes without a newline followed in {:.1} s; resident memory grew by {} MiB; longest line {longest} bytes",
        elapsed.as_secs_f64(),
        growth / (1024 * 1024)
    );
    assert!(
        growth < MAX_GROWTH_BYTES,
        "resident memory grew by {} MiB while following a {} MiB line (bound: {} MiB)",
        growth / (1024 * 1024),
        RAW_BYTES / (1024 * 1024),
        MAX_GROWTH_BYTES / (1024 * 1024)
    );
    assert!(
        ended,
        "the line ending in {end:?} did not arrive within 120 s ({xs} of {RAW_BYTES} bytes did)"
    );
    // Every byte arrived, in lines no longer than the limit (plus the
    // `[instance] ` prefix).
    assert_eq!(xs, RAW_BYTES, "bytes of the long line that arrived");
    assert!(
        longest <= prefix.len() + MAX_LOG_LINE_BYTES,
        "a line of {longest} bytes"
    );
    writer.await.unwrap();
    drop(follow);
    cluster.shutdown().await.unwrap();
}
