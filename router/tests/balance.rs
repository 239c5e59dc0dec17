//! Requests whose clients go away mid-flight: every instance's count of
//! requests in flight (shown in `/metrics`) comes back to zero, and
//! sequential requests afterwards reach every instance in turn. A count
//! left behind would make least-outstanding balancing skip its instance
//! for as long as the router runs.

mod common;

use std::collections::BTreeSet;

use anyhow::Context;
use common::*;
use keel_protocol::RouteTls;
use keel_router::Limits;

const HOST: &str = "app.example.com";

async fn abandoned_requests_leave_no_count(http2: bool) -> anyhow::Result<()> {
    init_tracing();
    let mut backends = Vec::new();
    for name in ["b1", "b2", "b3"] {
        backends.push(Backend::start(name).await?);
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let router = start_router(
        table(1, vec![route(HOST, "/", RouteTls::Off, &addrs)]),
        Limits::default(),
    )?;
    let http = router.addresses().http.context("http")?;
    let names: BTreeSet<String> = ["b1", "b2", "b3"].map(str::to_owned).into();

    let before = shares(http, HOST, 30).await?;
    assert_every_share(&before, &names, 30);

    // Two clients give up one after the other (two instances then had a
    // request of theirs in flight), then a burst gives up together.
    abandon(http, HOST, http2).await?;
    abandon(http, HOST, http2).await?;
    let burst: Vec<_> = (0..5)
        .map(|_| tokio::spawn(async move { abandon(http, HOST, http2).await }))
        .collect();
    for client in burst {
        client.await??;
    }
    wait_idle(&router).await?;
    let after = shares(http, HOST, 30).await?;
    assert_every_share(&after, &names, 30);

    router.shutdown().await;
    for backend in backends {
        backend.stop().await;
    }
    Ok(())
}

#[tokio::test]
async fn http1_clients_that_go_away_mid_request_leave_no_count() -> anyhow::Result<()> {
    abandoned_requests_leave_no_count(false).await
}

#[tokio::test]
async fn http2_clients_that_go_away_mid_request_leave_no_count() -> anyhow::Result<()> {
    abandoned_requests_leave_no_count(true).await
}
