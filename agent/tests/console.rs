//! The web console in a real browser: Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`, installed by
//! `scripts/setup.sh`) against a simulated cluster. What a user would see:
//! a wrong token is refused in the API's words; the right one shows the
//! nodes and the app; a scale shows its new instances without a reload;
//! a rolling restart replaces every instance before their eyes; a drain
//! shows on the node, and an undrain made elsewhere shows too; a
//! controller restart is a "Reconnecting…" and no more.
//!
//! A screenshot of each page is saved under
//! `<target>/console-screenshots/`, the test's artifacts.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is their failure report

mod support;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use keel_agent::eventually;
use keel_agent::testing::{NodeSpec, SimCluster};
use serde_json::{Value, json};
use support::{CONVERGE, all_up, app};

/// How long the page may take to show what the API says.
const SHOWN: Duration = Duration::from_secs(15);

/// A chromedriver on a free loopback port, started by this test and
/// killed (with the browsers it started) when dropped.
struct ChromeDriver {
    child: Child,
    port: u16,
    profile: tempfile::TempDir,
}

impl ChromeDriver {
    fn start() -> ChromeDriver {
        let port = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = std::os::unix::process::CommandExt::process_group(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            // Its own process group, so that the browsers it starts go
            // with it (see Drop).
            0,
        )
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start chromedriver ({e}); scripts/setup.sh installs chromium-driver")
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        ChromeDriver {
            child,
            port,
            profile: tempfile::tempdir().unwrap(),
        }
    }

    /// A headless Chromium that reaches nothing but loopback.
    async fn browser(&self) -> Client {
        let mut args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1280,1000".to_owned(),
        ];
        args.push(format!("--user-data-dir={}", self.profile.path().display()));
        let mut options = json!({ "args": args });
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = "/usr/bin/chromium".into();
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".to_owned(), options);
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap()
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The group is ours: its leader is the chromedriver this test
        // started, and its members the browsers that one started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the screenshots go: `<target>/console-screenshots/`.
fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Saves the whole page (the window grown to its height for the shot).
async fn screenshot(browser: &Client, name: &str) {
    // Let the last update paint.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (width, height) = browser.get_window_size().await.unwrap();
    let (width, height) = (
        u32::try_from(width).unwrap(),
        u32::try_from(height).unwrap(),
    );
    // What the page needs beyond what the window shows now.
    let more = browser
        .execute(
            "return document.documentElement.scrollHeight - window.innerHeight",
            vec![],
        )
        .await
        .unwrap()
        .as_i64()
        .unwrap_or(0);
    let tall = (height + u32::try_from(more.max(0)).unwrap_or(0)).min(4000);
    if tall > height {
        browser.set_window_size(width, tall).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let png = browser.screenshot().await.unwrap();
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
    if tall > height {
        browser.set_window_size(width, height).await.unwrap();
    }
}

/// Runs `script` (a function body that returns a value) in the page until
/// `holds` accepts its value; panics with the last value after [`SHOWN`].
async fn until(browser: &Client, what: &str, script: &str, holds: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + SHOWN;
    loop {
        let value = browser.execute(script, vec![]).await.unwrap();
        if holds(&value) {
            return;
        }
        if Instant::now() >= deadline {
            screenshot(browser, "failure").await;
            let page = browser
                .execute("return document.body.innerText", vec![])
                .await
                .unwrap();
            panic!("the page did not show {what} within {SHOWN:?}: {value}\npage: {page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks what `css` finds once it is there (pages redraw as they update,
/// so an element found may be replaced before the click lands: retry).
async fn click(browser: &Client, css: &str) {
    let deadline = Instant::now() + SHOWN;
    loop {
        let clicked = match browser.find(Locator::Css(css)).await {
            Ok(element) => element.click().await.map(|_| ()),
            Err(e) => Err(e),
        };
        match clicked {
            Ok(()) => return,
            Err(e) => assert!(Instant::now() < deadline, "cannot click {css}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn type_into(browser: &Client, css: &str, text: &str) {
    let input = browser.find(Locator::Css(css)).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(text).await.unwrap();
}

/// Confirms the dialog an action opens.
async fn confirm(browser: &Client) {
    until(
        browser,
        "the confirmation dialog",
        "return document.getElementById('confirm').open",
        |v| v == &json!(true),
    )
    .await;
    click(browser, "#confirm-ok").await;
}

fn text_of(css: &str) -> String {
    format!("const e = document.querySelector({css:?}); return e ? e.textContent : null;")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_cluster_live_in_a_real_browser() {
    support::logs();
    let nodes = [
        NodeSpec::new("node-a1", "zone-a").label("disk", "ssd"),
        NodeSpec::new("node-b1", "zone-b"),
        NodeSpec::new("node-c1", "zone-c").role("router"),
    ];
    let mut cluster = SimCluster::start(&nodes).await.unwrap();
    let admin = cluster.admin();
    admin.apply(&app("web", "shop/web:1", 2)).await.unwrap();
    eventually!(CONVERGE, {
        all_up(admin.instances("shop", "web").await.unwrap(), 2, Some(1))
    });
    let base = format!("http://{}/", cluster.controller_addr());

    let driver = ChromeDriver::start();
    let browser = driver.browser().await;
    browser.goto(&base).await.unwrap();

    // A wrong token: the API's words, and no way in.
    until(
        &browser,
        "the sign-in form",
        "return !!document.getElementById('token')",
        |v| v == &json!(true),
    )
    .await;
    screenshot(&browser, "sign-in").await;
    type_into(&browser, "#token", "keel-admin-0000").await;
    click(&browser, "#sign-in").await;
    until(
        &browser,
        "the API's error",
        &text_of("#sign-in-error"),
        |v| v == &json!("missing or invalid bearer token"),
    )
    .await;
    screenshot(&browser, "sign-in-refused").await;

    // The right one, from the keyboard (Enter submits): every node by
    // zone, the app with its instances ready.
    type_into(&browser, "#token", &format!("{}\u{E007}", admin.token())).await;
    until(
        &browser,
        "the three nodes, ready",
        "return [...document.querySelectorAll('#regions [data-node] .badge')].map(b => b.textContent)",
        |v| v == &json!(["ready", "ready", "ready"]),
    )
    .await;
    until(
        &browser,
        "web with 2 of 2 healthy",
        &text_of("#apps [data-app='shop/web'] [data-healthy]"),
        |v| v == &json!("2/2"),
    )
    .await;
    until(&browser, "the live indicator", &text_of("#live"), |v| {
        v == &json!("Live")
    })
    .await;
    screenshot(&browser, "overview").await;

    // The app page: its two instances, running, each on a node.
    click(&browser, "#apps a[href='#/apps/shop/web']").await;
    let running = "return [...document.querySelectorAll('#instances tr[data-instance]')].map(r => r.dataset.state)";
    until(&browser, "two running instances", running, |v| {
        v == &json!(["running", "running"])
    })
    .await;
    screenshot(&browser, "app").await;

    // Logs: followed live, each line prefixed with its instance; the
    // simulated runtime prints a line when it starts an instance.
    click(&browser, "#logs-toggle").await;
    until(&browser, "a line the app printed", &text_of("#logs"), |v| {
        v.as_str()
            .is_some_and(|text| text.contains("sim: ") && text.contains(" started ("))
    })
    .await;
    screenshot(&browser, "app-logs").await;

    // Scale to 5: the new instances appear without a reload (the marker
    // set in this page's window survives).
    browser
        .execute("window.keelMarker = 7; return null", vec![])
        .await
        .unwrap();
    type_into(&browser, "#scale-count", "5").await;
    click(&browser, "#scale").await;
    confirm(&browser).await;
    until(&browser, "five running instances", running, |v| {
        v.as_array()
            .is_some_and(|states| states.len() == 5 && states.iter().all(|s| s == "running"))
    })
    .await;
    until(
        &browser,
        "the scale in the history",
        &text_of("#current-revision"),
        |v| v == &json!("2 (scale to 5)"),
    )
    .await;
    assert_eq!(
        browser
            .execute("return window.keelMarker", vec![])
            .await
            .unwrap(),
        json!(7),
        "the page was not reloaded"
    );
    assert_eq!(admin.instances("shop", "web").await.unwrap().len(), 5);
    screenshot(&browser, "app-scaled").await;

    // A rolling restart: five new instances of revision 3 replace them.
    let before: Vec<String> = admin
        .instances("shop", "web")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    click(&browser, "#restart").await;
    confirm(&browser).await;
    let replaced = format!(
        "return [...document.querySelectorAll('#instances tr[data-instance]')]\
           .filter(r => r.dataset.state === 'running' && !{before:?}.includes(r.dataset.instance))\
           .length"
    );
    until(&browser, "five new running instances", &replaced, |v| {
        v == &json!(5)
    })
    .await;
    until(&browser, "only those", running, |v| {
        v.as_array().is_some_and(|s| s.len() == 5)
    })
    .await;
    until(
        &browser,
        "the restart as current",
        &text_of("#current-revision"),
        |v| v == &json!("3 (rolling restart)"),
    )
    .await;

    // A node page, from the overview: drain it and see it draining.
    click(&browser, "nav a[href='#/']").await;
    click(&browser, "#regions a[href='#/nodes/node-a1']").await;
    until(&browser, "node-a1 ready", &text_of("#node-status"), |v| {
        v == &json!("ready")
    })
    .await;
    until(&browser, "its ssd label", &text_of("#node-facts"), |v| {
        v.as_str().is_some_and(|t| t.contains("disk=ssd"))
    })
    .await;
    click(&browser, "#drain").await;
    confirm(&browser).await;
    until(
        &browser,
        "node-a1 draining",
        &text_of("#node-status"),
        |v| v == &json!("draining"),
    )
    .await;
    until(&browser, "the undrain button", &text_of("#drain"), |v| {
        v == &json!("Undrain")
    })
    .await;
    let status = admin.get("/v1/nodes/node-a1").await.unwrap()["status"].clone();
    assert_eq!(status, json!("draining"), "the API agrees");
    screenshot(&browser, "node").await;

    // An undrain made elsewhere (the CLI, another operator) shows here.
    admin
        .call(reqwest::Method::POST, "/v1/nodes/node-a1/undrain", None)
        .await
        .unwrap();
    until(
        &browser,
        "node-a1 ready again",
        &text_of("#node-status"),
        |v| v == &json!("ready"),
    )
    .await;
    assert_eq!(
        browser
            .execute("return window.keelMarker", vec![])
            .await
            .unwrap(),
        json!(7),
        "still no reload"
    );

    // The controller stops gracefully (the page's stream does not hold it
    // up), and comes back on the same address: the page says so, then
    // goes on live.
    let addr = cluster.controller_addr();
    tokio::time::timeout(Duration::from_secs(10), cluster.stop_controller())
        .await
        .expect("the console's stream does not hold up a graceful stop")
        .unwrap();
    until(
        &browser,
        "that it is reconnecting",
        &text_of("#live"),
        |v| v == &json!("Reconnecting\u{2026}"),
    )
    .await;
    cluster.start_controller().await.unwrap();
    assert_eq!(cluster.controller_addr(), addr, "the same port was free");
    until(&browser, "that it is live again", &text_of("#live"), |v| {
        v == &json!("Live")
    })
    .await;
    let admin = cluster.admin();
    admin
        .call(reqwest::Method::POST, "/v1/nodes/node-b1/drain", None)
        .await
        .unwrap();
    click(&browser, "nav a[href='#/']").await;
    until(
        &browser,
        "node-b1 draining, after the restart",
        &text_of("#regions [data-node='node-b1'] .badge"),
        |v| v == &json!("draining"),
    )
    .await;

    // On a phone's screen.
    browser.set_window_size(390, 844).await.unwrap();
    click(&browser, "nav a[href='#/']").await;
    click(&browser, "#apps a[href='#/apps/shop/web']").await;
    until(&browser, "five instances on a phone", running, |v| {
        v.as_array().is_some_and(|s| s.len() == 5)
    })
    .await;
    screenshot(&browser, "app-phone").await;

    browser.close().await.unwrap();
    drop(driver);
    cluster.shutdown().await.unwrap();
}
