//! wrk drives the router while the table changes and instances come and
//! go, the way the controller changes them: a new instance is added once
//! it listens, an old one is removed from the table before it stops, and
//! one published address refuses connections. Not one request may fail.

mod common;

use std::time::Duration;

use anyhow::Context;
use common::*;
use keel_protocol::RouteTls;
use keel_router::Limits;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrk_sees_no_error_while_routes_and_instances_change() -> anyhow::Result<()> {
    init_tracing();
    let refused = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut live = vec![Backend::start("b0").await?, Backend::start("b1").await?];
    let addrs = |live: &[Backend]| live.iter().map(|b| b.addr).collect::<Vec<_>>();
    let mut generation = 1;
    let router = start_router(
        table(
            generation,
            vec![route("load.test", "/", RouteTls::Off, &addrs(&live))],
        ),
        Limits::default(),
    )?;
    let url = format!("http://{}/", router.addresses().http.context("http")?);
    let wrk = tokio::spawn(run_owned(
        "wrk",
        vec![
            "-t1".into(),
            "-c16".into(),
            "-d4s".into(),
            "-H".into(),
            "Host: load.test".into(),
            url,
        ],
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(3_500);
    let mut n = 2;
    while tokio::time::Instant::now() < deadline {
        // A new instance joins...
        live.push(Backend::start(&format!("b{n}")).await?);
        n += 1;
        generation += 1;
        let mut backends = addrs(&live);
        if n % 2 == 0 {
            backends.push(refused);
        }
        router.replace_table(&table(
            generation,
            vec![
                route("load.test", "/", RouteTls::Off, &backends),
                route(&format!("other{n}.test"), "/", RouteTls::Off, &backends),
            ],
        ));
        tokio::time::sleep(Duration::from_millis(150)).await;
        // ...and the oldest leaves the table, then stops.
        let leaving = live.remove(0);
        generation += 1;
        router.replace_table(&table(
            generation,
            vec![route("load.test", "/", RouteTls::Off, &addrs(&live))],
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        leaving.stop().await;
    }
    let output = wrk.await??;
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "wrk failed: {report}");
    let requests: u64 = report
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("no request count in: {report}"))?;
    assert!(
        requests > 1_000,
        "too few requests to mean anything: {report}"
    );
    assert!(!report.contains("Non-2xx"), "{report}");
    assert!(!report.contains("Socket errors"), "{report}");
    assert!(n > 6, "the table changed only {n} times");
    router.shutdown().await;
    for backend in live {
        backend.stop().await;
    }
    Ok(())
}

async fn run_owned(
    program: &'static str,
    args: Vec<String>,
) -> anyhow::Result<std::process::Output> {
    run(program, &args).await
}
