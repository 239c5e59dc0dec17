//! Plain TCP routes by listen port, with real sockets on loopback: bytes
//! both ways, half-close, balancing and skipping an instance that refuses,
//! listeners that follow table swaps, no instance, a port already in use.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use keel_router::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn on_loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Shuts down the sending half and reads to the end: what the instance
/// answers after the client is done (`name saw n bytes`), or "" when the
/// router closed the connection without an instance.
async fn finish(mut stream: TcpStream) -> anyhow::Result<String> {
    stream.shutdown().await?;
    let mut rest = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut rest)).await??;
    Ok(String::from_utf8(rest)?)
}

/// Which instance answers a fresh connection to the router's `port`.
async fn who_answers(port: u16) -> anyhow::Result<String> {
    let stream = timeout(WAIT, TcpStream::connect(on_loopback(port))).await??;
    Ok(finish(stream)
        .await?
        .split(' ')
        .next()
        .unwrap_or("")
        .to_owned())
}

/// Writes `data` and reads the same number of bytes back.
async fn round_trip(stream: &mut TcpStream, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (mut read, mut write) = stream.split();
    let mut back = vec![0u8; data.len()];
    let (written, got) = tokio::join!(
        write.write_all(data),
        timeout(WAIT, read.read_exact(&mut back))
    );
    written?;
    got??;
    Ok(back)
}

async fn refused(port: u16) -> bool {
    matches!(
        TcpStream::connect(on_loopback(port)).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_go_both_ways_and_a_half_closed_client_still_gets_the_answer() -> anyhow::Result<()> {
    init_tracing();
    let echo = TcpEcho::start("b1").await?;
    let port = free_port()?;
    let router = start_router(
        table(1, vec![tcp_route(port, &[echo.addr])]),
        Limits::default(),
    )?;
    assert_eq!(router.addresses().tcp_ip, on_loopback(0).ip());

    // More than one socket buffer each way, every byte value.
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let mut stream = TcpStream::connect(on_loopback(port)).await?;
    assert_eq!(round_trip(&mut stream, &data).await?, data);
    assert_eq!(round_trip(&mut stream, b"again").await?, b"again");

    // The instance answers only once the client has shut its sending
    // half: the router must pass the half-close on and keep the other
    // direction open.
    stream.write_all(b"last").await?;
    let mut echoed = [0u8; 4];
    timeout(WAIT, stream.read_exact(&mut echoed)).await??;
    let answer = finish(stream).await?;
    assert_eq!(answer, format!("b1 saw {} bytes\n", data.len() + 9));

    let metrics = metrics_text(&router).await?;
    let series = |name: &str| sample(&metrics, &format!("{name}{{port=\"{port}\"}}"));
    assert_eq!(series("keel_router_tcp_listening"), Some(1.0), "{metrics}");
    assert_eq!(
        series("keel_router_tcp_connections_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        series("keel_router_tcp_connections_active"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        series("keel_router_tcp_upstream_errors_total"),
        Some(0.0),
        "{metrics}"
    );
    router.shutdown().await;
    echo.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_take_turns_and_skip_an_instance_that_refuses() -> anyhow::Result<()> {
    init_tracing();
    let (b1, b2) = (TcpEcho::start("b1").await?, TcpEcho::start("b2").await?);
    let dead = on_loopback(free_port()?);
    let port = free_port()?;
    // Long enough that the refused instance is not tried again here.
    let limits = Limits {
        backend_down_ms: 60_000,
        ..Limits::default()
    };
    let router = start_router(
        table(1, vec![tcp_route(port, &[b1.addr, dead, b2.addr])]),
        limits,
    )?;
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(who_answers(port).await?);
    }
    // Every connection reached a live instance, whatever the turn.
    assert!(
        answers.iter().all(|a| a == "b1" || a == "b2"),
        "{answers:?}"
    );
    let (n1, n2) = (
        b1.connections.load(Ordering::SeqCst),
        b2.connections.load(Ordering::SeqCst),
    );
    assert!(n1 >= 2 && n2 >= 2, "b1 got {n1}, b2 got {n2}: {answers:?}");
    let metrics = metrics_text(&router).await?;
    let errors = sample(
        &metrics,
        &format!("keel_router_tcp_upstream_errors_total{{port=\"{port}\"}}"),
    );
    // Refused once, then skipped while marked down.
    assert_eq!(errors, Some(1.0), "{metrics}");
    router.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_follow_the_table_and_open_connections_outlive_a_swap() -> anyhow::Result<()> {
    init_tracing();
    let (b1, b2) = (TcpEcho::start("b1").await?, TcpEcho::start("b2").await?);
    let port = free_port()?;
    let router = start_router(table(1, vec![]), Limits::default())?;
    assert!(refused(port).await, "no route, no listener");

    router.replace_table(&table(2, vec![tcp_route(port, &[b1.addr])]));
    let mut open = TcpStream::connect(on_loopback(port)).await?;
    assert_eq!(round_trip(&mut open, b"hello").await?, b"hello");

    // New instances apply to the next connection; the open one stays.
    router.replace_table(&table(3, vec![tcp_route(port, &[b2.addr])]));
    assert_eq!(who_answers(port).await?, "b2");

    router.replace_table(&table(4, vec![]));
    keel_agent::eventually!(WAIT, {
        if refused(port).await {
            Ok(())
        } else {
            Err("the port still takes connections")
        }
    });
    assert_eq!(round_trip(&mut open, b"still there").await?, b"still there");
    assert_eq!(finish(open).await?, "b1 saw 16 bytes\n");

    // And the port comes back with the route.
    router.replace_table(&table(5, vec![tcp_route(port, &[b1.addr])]));
    assert_eq!(who_answers(port).await?, "b1");
    router.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ready_instance_the_connection_is_closed() -> anyhow::Result<()> {
    init_tracing();
    let (empty, unreachable) = (free_port()?, free_port()?);
    let dead = on_loopback(free_port()?);
    let router = start_router(
        table(
            1,
            vec![tcp_route(empty, &[]), tcp_route(unreachable, &[dead])],
        ),
        Limits::default(),
    )?;
    for port in [empty, unreachable] {
        let mut stream = TcpStream::connect(on_loopback(port)).await?;
        let mut buf = [0u8; 16];
        let n = timeout(WAIT, stream.read(&mut buf)).await?.unwrap_or(0);
        assert_eq!(n, 0, "port {port}: closed without a byte");
    }
    let metrics = metrics_text(&router).await?;
    for port in [empty, unreachable] {
        let closed = sample(
            &metrics,
            &format!("keel_router_tcp_no_backend_total{{port=\"{port}\"}}"),
        );
        assert_eq!(closed, Some(1.0), "{metrics}");
    }
    router.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_reported_and_the_others_are_served() -> anyhow::Result<()> {
    init_tracing();
    let echo = TcpEcho::start("b1").await?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let busy = taken.local_addr()?.port();
    let free = free_port()?;
    let routes = || vec![tcp_route(busy, &[echo.addr]), tcp_route(free, &[echo.addr])];
    let router = start_router(table(1, routes()), Limits::default())?;
    assert_eq!(who_answers(free).await?, "b1");
    // HTTP is unaffected too.
    let http = router.addresses().http.expect("http");
    let (code, _) = curl(&["-H", "Host: nowhere.example", &format!("http://{http}/")]).await?;
    assert_eq!(code, 404);
    let metrics = metrics_text(&router).await?;
    let series = |name: &str, port: u16| sample(&metrics, &format!("{name}{{port=\"{port}\"}}"));
    assert_eq!(
        series("keel_router_tcp_listening", busy),
        Some(0.0),
        "{metrics}"
    );
    // At least once: the router also retries every few seconds.
    let errors = series("keel_router_tcp_listen_errors_total", busy);
    assert!(errors.is_some_and(|n| n >= 1.0), "{metrics}");
    assert_eq!(
        series("keel_router_tcp_listening", free),
        Some(1.0),
        "{metrics}"
    );

    // The router's own HTTP port is in use as well.
    let mut with_http = routes();
    with_http.push(tcp_route(http.port(), &[echo.addr]));
    router.replace_table(&table(2, with_http));
    let (code, _) = curl(&["-H", "Host: nowhere.example", &format!("http://{http}/")]).await?;
    assert_eq!(code, 404, "HTTP still answers on its port");
    let metrics = metrics_text(&router).await?;
    let errors = sample(
        &metrics,
        &format!(
            "keel_router_tcp_listen_errors_total{{port=\"{}\"}}",
            http.port()
        ),
    );
    assert!(errors.is_some_and(|n| n >= 1.0), "{metrics}");

    // Freed, the port is taken on the next table.
    drop(taken);
    router.replace_table(&table(3, routes()));
    assert_eq!(who_answers(busy).await?, "b1");
    assert_eq!(who_answers(free).await?, "b1");
    router.shutdown().await;
    Ok(())
}
