//! `falco-nats ui` in a real browser: Debian's headless Chromium driven
//! through its ChromeDriver (fantoccini, WebDriver), against a real
//! nats-server, the real bridge and the real responder.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use falco_nats::bridge::InputOptions;
use falco_nats::input::http::HttpOptions;
use falco_nats::respond::Subscription;
use falco_nats::simulate::kube_api::KubeApi;
use falco_nats::ui::{self, UiOptions};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::support::ui::Ui;
use crate::support::*;

const WAIT: Duration = Duration::from_secs(20);

/// A ui on core NATS only (no history from a stream), a ring of 2,000, and
/// a queue of `client_buffer` events a page.
fn live_only(nats: &NatsServer, client_buffer: usize) -> UiOptions {
    UiOptions {
        nats: falco_nats::nats::NatsOptions::for_server(nats.url()),
        subject: "falco.>".into(),
        result_prefix: "falco.response".into(),
        stream: None,
        history: 2000,
        history_age: Duration::from_secs(3600),
        token: None,
        client_buffer,
    }
}

/// Publishes `alerts` as fast as NATS takes them, and waits until the ui
/// has taken `taken` alerts in all.
async fn publish_all(
    client: &async_nats::Client,
    ui: &Ui,
    alerts: impl Iterator<Item = Vec<u8>>,
    taken: u64,
) {
    for alert in alerts {
        client
            .publish("falco.warning.flood", alert.into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    wait_for("the ui to take the alerts", WAIT, || async {
        ui.metric("falco_nats_ui_events_total{kind=\"alert\"}")
            .await
            >= taken as f64
    })
    .await;
}

/// Busy loops on every core asked for, at a lower priority than the test,
/// until dropped.
struct CpuHog(Vec<Child>);

impl CpuHog {
    fn start(cores: usize) -> Self {
        let hogs = (0..cores)
            .map(|_| {
                Command::new("nice")
                    .args(["-n", "5", "sh", "-c", "while :; do :; done"])
                    .spawn()
                    .expect("nice and sh")
            })
            .collect();
        CpuHog(hogs)
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        for hog in &mut self.0 {
            let _ = hog.kill();
            let _ = hog.wait();
        }
    }
}

/// Headless Chromium under its driver; closed by [`Browser::close`].
struct Browser {
    driver: Child,
    client: Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/install-deps installs Debian's chromium-driver)");
        wait_for("chromedriver", WAIT, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1400,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        Browser {
            driver,
            client,
            _profile: profile,
        }
    }

    /// Runs `script` (a function body) in the page and returns its value.
    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// An element's text.
    async fn text(&self, id: &str) -> String {
        let v = self
            .js(&format!(
                "return document.getElementById('{id}').textContent"
            ))
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// The output shown in the top (newest) row.
    async fn top_output(&self) -> String {
        let v = self
            .js("const r = document.querySelector('#rows tr'); return r ? r.cells[4].textContent : ''")
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// The rows' texts, top (newest) first: one string per cell.
    async fn rows(&self) -> Vec<Vec<String>> {
        let v = self
            .js("return [...document.querySelectorAll('#rows tr')].map(tr => [...tr.cells].map(td => td.textContent));")
            .await;
        serde_json::from_value(v).unwrap()
    }

    async fn wait_rows(&self, n: usize) -> Vec<Vec<String>> {
        let deadline = Instant::now() + WAIT;
        loop {
            let rows = self.rows().await;
            if rows.len() >= n {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "{} rows, waiting for {n}",
                rows.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn wait_live(&self) {
        let deadline = Instant::now() + WAIT;
        while self
            .js("return document.getElementById('status').textContent")
            .await
            != "live"
        {
            assert!(Instant::now() < deadline, "the page did not go live");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn alert(priority: &str, rule: &str, ns: &str, pod: &str, output: &str, n: u64) -> Vec<u8> {
    json!({
        "hostname": "node-ui",
        "output": output,
        "output_fields": {"k8s.ns.name": ns, "k8s.pod.name": pod, "evt.num": n},
        "priority": priority,
        "rule": rule,
        "source": "syscall",
        "tags": ["container"],
        // Now: the chart shows the last hour.
        "time": k8s_openapi::jiff::Timestamp::now().to_string(),
    })
    .to_string()
    .into_bytes()
}

/// NATS with JetStream, the bridge on HTTP publishing to the stream FALCO,
/// the responder on it (deleting on Critical) against the API stand-in.
struct Scene {
    nats: NatsServer,
    kube: KubeApi,
    bridge: RunningBridge,
    responder_stop: CancellationToken,
}

impl Scene {
    async fn start() -> Self {
        let nats = NatsServer::start();
        let mut options = grpc_options(std::path::Path::new("/unused"), &nats.url());
        options.input = InputOptions::Http(HttpOptions::default());
        options.publish.jetstream = Some(jetstream_options());
        let bridge = RunningBridge::start_ready(options).await;
        let kube = KubeApi::start().await.unwrap();
        let mut respond = respond_options(&nats.url(), &kubeconfig(&kube));
        respond.subscription = Subscription::JetStream {
            stream: "FALCO".into(),
            durable: "responders".into(),
            subject: "falco.>".into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 3,
        };
        let responder_stop = CancellationToken::new();
        tokio::spawn(falco_nats::respond::run(
            respond,
            None,
            responder_stop.clone(),
        ));
        Scene {
            nats,
            kube,
            bridge,
            responder_stop,
        }
    }

    async fn post(&self, body: &[u8]) {
        assert_eq!(http_post(self.bridge.http, &[], body).await.0, 200);
    }

    async fn stop(self) {
        self.responder_stop.cancel();
        self.bridge.stop().await.unwrap();
        drop(self.nats);
    }
}

/// Alerts the bridge publishes appear within a second, newest first, in
/// their priority's colour, with the responder's decision beside the alert
/// it acted on; the screenshot in docs/ui.md is taken here.
#[tokio::test]
async fn alerts_and_decisions_appear_live_in_order_and_colour() {
    let scene = Scene::start().await;
    scene
        .kube
        .add_pod("shop", "web-1", "uid-web-1", Some("ReplicaSet"));
    let ui = Ui::start(&scene.nats.url(), None).await;
    let browser = Browser::start().await;
    browser.client.goto(&ui.url()).await.unwrap();
    browser.wait_live().await;

    let sent = [
        (
            "Notice",
            "Terminal shell in container",
            "shop",
            "web-2",
            "A shell was spawned in a container (user=root shell=bash)",
        ),
        (
            "Critical",
            "Drop and execute new binary in container",
            "shop",
            "web-1",
            "Executing binary not part of base image (proc.exe=/tmp/x)",
        ),
        (
            "Warning",
            "Read sensitive file untrusted",
            "billing",
            "api-0",
            "Sensitive file opened for reading (file=/etc/shadow)",
        ),
    ];
    let mut last_posted = Instant::now();
    for (n, (priority, rule, ns, pod, output)) in sent.iter().enumerate() {
        scene
            .post(&alert(priority, rule, ns, pod, output, n as u64 + 1))
            .await;
        last_posted = Instant::now();
    }
    let rows = browser.wait_rows(3).await;
    let took = last_posted.elapsed();
    eprintln!("ui: the last of 3 alerts on the page {took:?} after its POST was answered");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let rules: Vec<&str> = rows.iter().map(|r| r[2].as_str()).collect();
    assert_eq!(
        rules,
        [
            "Read sensitive file untrusted",
            "Drop and execute new binary in container",
            "Terminal shell in container"
        ],
        "newest first"
    );
    assert_eq!(rows[1][3], "shop / web-1");
    assert_eq!(rows[1][1], "Critical");
    let colours = browser
        .js("return [...document.querySelectorAll('#rows .prio')].map(b => getComputedStyle(b).backgroundColor);")
        .await;
    assert_eq!(
        colours,
        json!(["rgb(245, 217, 10)", "rgb(229, 72, 77)", "rgb(62, 155, 245)"]),
        "warning, critical, notice"
    );
    // The responder deleted web-1; the Notice matched no rule.
    let deadline = Instant::now() + WAIT;
    loop {
        let rows = browser.rows().await;
        if rows[1][5] == "deleted" && rows[2][5] == "no rule matched" {
            break;
        }
        assert!(Instant::now() < deadline, "decisions: {rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!scene.kube.has_pod("shop", "web-1"));
    // The detail view has the whole JSON.
    browser
        .client
        .find(Locator::Css("#rows tr:nth-child(2)"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let detail = browser
        .js("return document.getElementById('detail-json').textContent")
        .await;
    let detail: Value = serde_json::from_str(detail.as_str().unwrap()).unwrap();
    assert_eq!(detail["alert"]["output_fields"]["k8s.pod.name"], "web-1");
    assert_eq!(detail["decisions"][0]["outcome"], "done");
    browser
        .js("document.getElementById('detail-close').click(); return null")
        .await;

    // More, for the picture.
    for p in falco_nats::simulate::alerts::PODS {
        scene
            .kube
            .add_pod(p.namespace, p.name, p.uid, Some("ReplicaSet"));
    }
    let mut factory = falco_nats::simulate::alerts::AlertFactory::new("node-7", false);
    for _ in 0..25 {
        scene.post(factory.next_json().as_bytes()).await;
    }
    browser.wait_rows(28).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let png = browser.client.screenshot().await.unwrap();
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::write(target.join("target/ui-screenshot.png"), &png).unwrap();
    if std::env::var_os("FALCO_NATS_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(target.join("docs/ui.png"), &png).unwrap();
    }
    browser.close().await;
    ui.stop().await;
    scene.stop().await;
}

/// A filter hides the alerts that do not match, and goes on hiding those
/// that arrive later; clearing it shows everything again.
#[tokio::test]
async fn filters_apply_to_what_arrives_later() {
    let scene = Scene::start().await;
    let ui = Ui::start(&scene.nats.url(), None).await;
    let browser = Browser::start().await;
    browser.client.goto(&ui.url()).await.unwrap();
    browser.wait_live().await;
    scene
        .post(&alert(
            "Notice",
            "Terminal shell in container",
            "shop",
            "web-1",
            "o1",
            1,
        ))
        .await;
    scene
        .post(&alert(
            "Warning",
            "Read sensitive file untrusted",
            "billing",
            "api-0",
            "o2",
            2,
        ))
        .await;
    browser.wait_rows(2).await;

    let ns = browser
        .client
        .find(Locator::Id("f-namespace"))
        .await
        .unwrap();
    ns.send_keys("billing").await.unwrap();
    let only = |rows: Vec<Vec<String>>| rows.iter().map(|r| r[3].clone()).collect::<Vec<_>>();
    let deadline = Instant::now() + WAIT;
    while browser.rows().await.len() != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    scene
        .post(&alert("Error", "Write below etc", "shop", "web-3", "o3", 3))
        .await;
    scene
        .post(&alert(
            "Error",
            "Write below etc",
            "billing",
            "api-1",
            "o4",
            4,
        ))
        .await;
    let rows = browser.wait_rows(2).await;
    assert_eq!(only(rows), ["billing / api-1", "billing / api-0"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(browser.rows().await.len(), 2, "the shop alert stays hidden");

    // Priority at least Error: the Warning goes too.
    browser
        .js("const s = document.getElementById('f-priority'); s.value = '3'; s.dispatchEvent(new Event('change')); return null")
        .await;
    let deadline = Instant::now() + WAIT;
    while browser.rows().await.len() != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(only(browser.rows().await), ["billing / api-1"]);
    ns.clear().await.unwrap();
    browser
        .js("document.getElementById('f-namespace').dispatchEvent(new Event('input')); return null")
        .await;
    let rows = browser.wait_rows(2).await;
    assert_eq!(
        only(rows),
        ["billing / api-1", "shop / web-3"],
        "Errors of any namespace"
    );
    browser.close().await;
    ui.stop().await;
    scene.stop().await;
}

/// An alert whose strings are HTML shows those characters and runs nothing,
/// in the list and in the detail view; the page's policy forbids inline script.
#[tokio::test]
async fn an_alert_written_as_html_is_shown_as_text() {
    let scene = Scene::start().await;
    let ui = Ui::start(&scene.nats.url(), None).await;
    let (code, _) = http_get(ui.addr, "/").await;
    assert_eq!(code, 200);
    let browser = Browser::start().await;
    browser.client.goto(&ui.url()).await.unwrap();
    browser.wait_live().await;
    let xss = "<img src=x onerror=alert(1)>";
    let rule = "<script>window.pwned=1</script><b>bold</b>";
    let pod = "<svg onload=\"window.pwned=2\">";
    scene
        .post(&alert(
            "Critical",
            rule,
            "shop\"><img src=y onerror=alert(3)>",
            pod,
            xss,
            1,
        ))
        .await;
    let rows = browser.wait_rows(1).await;
    assert_eq!(rows[0][4], xss);
    assert_eq!(rows[0][2], rule);
    assert!(rows[0][3].ends_with(pod), "{:?}", rows[0]);
    browser
        .client
        .find(Locator::Css("#rows tr"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let detail = browser
        .js("return document.getElementById('detail-json').textContent")
        .await;
    assert!(detail.as_str().unwrap().contains(xss));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let elements = browser
        .js("return document.querySelectorAll('main img, main script, main svg, main b, #detail img, #detail svg').length")
        .await;
    assert_eq!(elements, json!(0), "no element made of alert text");
    assert_eq!(browser.js("return typeof window.pwned").await, "undefined");
    assert!(
        browser.client.get_alert_text().await.is_err(),
        "no dialog opened"
    );
    // The policy: only the page's own files.
    let response = raw_get(ui.addr, "/", &[]).await;
    assert!(
        response.contains("content-security-policy: default-src 'none'; script-src 'self';"),
        "{response}"
    );
    browser.close().await;
    ui.stop().await;
    scene.stop().await;
}

/// After a reload (of a ui started afresh), the history comes back from
/// the stream: the alerts and the decisions about them.
#[tokio::test]
async fn history_comes_back_from_the_stream() {
    let scene = Scene::start().await;
    scene
        .kube
        .add_pod("shop", "web-1", "uid-web-1", Some("ReplicaSet"));
    // The decisions' own stream, as docs/ui.md suggests.
    let js = async_nats::jetstream::new(scene.nats.client().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "FALCO_RESPONSES".into(),
        subjects: vec!["falco.response.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for n in 1..=5 {
        let (priority, pod) = if n == 3 {
            ("Critical", "web-1")
        } else {
            ("Notice", "web-9")
        };
        scene
            .post(&alert(
                priority,
                "Terminal shell in container",
                "shop",
                pod,
                &format!("before {n}"),
                n,
            ))
            .await;
    }
    wait_for("the decisions stored", WAIT, || async {
        stream_count(&scene.nats.url(), "FALCO_RESPONSES").await >= 5
    })
    .await;
    let first = Ui::start(&scene.nats.url(), None).await;
    let browser = Browser::start().await;
    browser.client.goto(&first.url()).await.unwrap();
    browser.wait_live().await;
    let rows = browser.wait_rows(5).await;
    assert_eq!(rows[0][4], "before 5");
    first.stop().await;

    let second = Ui::start(&scene.nats.url(), None).await;
    assert_eq!(second.metric("falco_nats_ui_history_loaded").await, 10.0);
    browser.client.goto(&second.url()).await.unwrap();
    browser.client.refresh().await.unwrap();
    browser.wait_live().await;
    let rows = browser.wait_rows(5).await;
    let outputs: Vec<&str> = rows.iter().map(|r| r[4].as_str()).collect();
    assert_eq!(
        outputs,
        ["before 5", "before 4", "before 3", "before 2", "before 1"]
    );
    assert_eq!(rows[2][5], "deleted");
    let source = browser.text("source").await;
    assert_eq!(source, "history from stream FALCO");
    browser.close().await;
    second.stop().await;
    scene.stop().await;
}

/// A GET as a browser would send it, headers and all, as text.
async fn raw_get(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        request += &format!("{k}: {v}\r\n");
    }
    request += "\r\n";
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    // An event stream does not end: what came within a moment.
    let _ = tokio::time::timeout(Duration::from_millis(500), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_lowercase()
}

/// With a token, the page, its assets and its events refuse a request
/// without it (the probes do not); the page opened with it works, and the
/// token leaves the address bar.
#[tokio::test]
async fn the_token_guards_the_page_and_its_events() {
    let nats = NatsServer::start();
    let ui = Ui::start(&nats.url(), Some("s3cret-token-0123456789abcdef-0123")).await;
    for path in ["/", "/app.js", "/app.css", "/events", "/?token=wrong"] {
        let response = raw_get(ui.addr, path, &[]).await;
        assert!(response.starts_with("http/1.1 401"), "{path}: {response}");
    }
    assert_eq!(http_get(ui.addr, "/healthz").await.0, 200);
    // One token per request (issue 22, item 9): the right one beside a
    // wrong one is refused, as are two in the URL.
    let two = raw_get(
        ui.addr,
        "/?token=wrong",
        &[("Authorization", "Bearer s3cret-token-0123456789abcdef-0123")],
    )
    .await;
    assert!(
        two.starts_with("http/1.1 401") && two.contains("one token per request"),
        "{two}"
    );
    let two = raw_get(
        ui.addr,
        "/?token=wrong&token=s3cret-token-0123456789abcdef-0123",
        &[],
    )
    .await;
    assert!(two.starts_with("http/1.1 401"), "{two}");
    let metrics = http_get(ui.addr, "/metrics").await.1;
    assert_eq!(
        metric_value(&metrics, "falco_nats_ui_auth_failures_total"),
        7.0
    );
    // Behind a proxy that serves HTTPS, the cookie is Secure.
    let secure = raw_get(
        ui.addr,
        "/?token=s3cret-token-0123456789abcdef-0123",
        &[("X-Forwarded-Proto", "https")],
    )
    .await;
    assert!(secure.contains("samesite=strict; secure"), "{secure}");
    assert_eq!(http_get(ui.addr, "/metrics").await.0, 200);
    let events = raw_get(
        ui.addr,
        "/events",
        &[("Authorization", "Bearer s3cret-token-0123456789abcdef-0123")],
    )
    .await;
    assert!(
        events.starts_with("http/1.1 200") && events.contains("event: hello"),
        "{events}"
    );
    let page = raw_get(ui.addr, "/?token=s3cret-token-0123456789abcdef-0123", &[]).await;
    assert!(
        page.contains(
            "set-cookie: falco_nats_ui_token=s3cret-token-0123456789abcdef-0123; path=/; httponly; samesite=strict"
        ),
        "{page}"
    );

    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!(
            "{}?token=s3cret-token-0123456789abcdef-0123",
            ui.url()
        ))
        .await
        .unwrap();
    browser.wait_live().await;
    assert_eq!(browser.js("return location.search").await, "");
    let client = nats.client().await;
    client
        .publish(
            "falco.notice.x",
            alert("Notice", "x", "shop", "p", "after the token", 1).into(),
        )
        .await
        .unwrap();
    let rows = browser.wait_rows(1).await;
    assert_eq!(rows[0][4], "after the token");
    assert_eq!(
        browser.text("source").await,
        "live only (core NATS)",
        "no stream: live alerts only"
    );
    // `falco.response` itself is no decision subject: not shown as one.
    client
        .publish("falco.response", "{\"outcome\":\"done\"}".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = http_get(ui.addr, "/metrics").await.1;
    assert_eq!(
        metric_value(&metrics, "falco_nats_ui_events_total{kind=\"decision\"}"),
        0.0
    );
    browser.close().await;
    ui.stop().await;
}

/// A token shorter than 32 characters is refused at start, saying how to
/// make one.
#[tokio::test]
async fn a_short_token_is_refused_at_start() {
    let nats = NatsServer::start();
    let result = ui::run(
        UiOptions {
            nats: falco_nats::nats::NatsOptions::for_server(nats.url()),
            subject: "falco.>".into(),
            result_prefix: "falco.response".into(),
            stream: None,
            history: 10,
            history_age: Duration::from_secs(60),
            token: Some("s3cret-token".into()),
            client_buffer: 16,
        },
        None,
        CancellationToken::new(),
    )
    .await;
    let e = result.unwrap_err().to_string();
    assert!(
        e.contains("12 characters; at least 32") && e.contains("openssl rand"),
        "{e}"
    );
}

/// Bounded: 30,000 alerts as fast as NATS takes them (300 times the rate
/// of a busy cluster, for a short time) leave the page at its caps and
/// answering, showing the newest; a client that stops reading is cut off
/// by the server instead of buffered.
#[tokio::test]
async fn a_flood_leaves_the_page_bounded_and_a_stalled_client_is_dropped() {
    const TOTAL: u64 = 30_000;
    // A busy machine (CI beside a build): the page may fall behind and
    // resume; it keeps what it held either way.
    let _hog = CpuHog::start(2);
    let nats = NatsServer::start_without_jetstream();
    let ui = Ui::start_with(live_only(&nats, 256)).await;
    let browser = Browser::start().await;
    browser.client.goto(&ui.url()).await.unwrap();
    browser.wait_live().await;
    // A client that opens the event stream and never reads it.
    let mut stalled = tokio::net::TcpStream::connect(ui.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stalled, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let client = nats.client().await;
    let mut factory = falco_nats::simulate::alerts::AlertFactory::new("node-flood", false);
    let flood = (1..TOTAL).map(|_| factory.next_json().into_bytes());
    let last = alert(
        "Warning",
        "flood",
        "shop",
        "p",
        "the last of the flood",
        TOTAL,
    );
    publish_all(&client, &ui, flood.chain([last]), TOTAL).await;
    // The newest alert reaches the top of the page.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let top = browser.top_output().await;
        let counts = browser.text("counts").await;
        if counts == "500 shown of 5000 kept" && top == "the last of the flood" {
            break;
        }
        assert!(Instant::now() < deadline, "{counts} / {top}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let heap = browser
        .js("return performance.memory ? performance.memory.usedJSHeapSize : 0")
        .await
        .as_f64()
        .unwrap();
    eprintln!(
        "ui: after {TOTAL} alerts the page holds {:.1} MiB of JS heap",
        heap / 1048576.0
    );
    assert!(heap < 200.0 * 1048576.0, "{heap}");
    assert!(ui.metric("falco_nats_ui_clients_dropped_total").await >= 1.0);
    drop(stalled);
    browser.close().await;
    ui.stop().await;
}

/// A page dropped for falling behind, and too far behind to resume from
/// the ui's ring, keeps what it held, adds the ring, and says how many
/// went by in between; only a restarted ui starts it afresh.
#[tokio::test]
async fn a_page_too_far_behind_to_resume_keeps_what_it_held() {
    const HELD: u64 = 1500;
    const FLOOD: u64 = 8000;
    let nats = NatsServer::start_without_jetstream();
    // A page is dropped as soon as two events wait for it.
    let ui = Ui::start_with(live_only(&nats, 1)).await;
    let client = nats.client().await;
    let mut factory = falco_nats::simulate::alerts::AlertFactory::new("node-held", false);
    let held = (0..HELD).map(|_| factory.next_json().into_bytes());
    publish_all(&client, &ui, held, HELD).await;
    // The page joins and gets them from the ring, which is not queued.
    let browser = Browser::start().await;
    browser.client.goto(&ui.url()).await.unwrap();
    browser.wait_live().await;
    wait_for("the page to hold the first alerts", WAIT, || async {
        browser.text("counts").await == format!("500 shown of {HELD} kept")
    })
    .await;
    let flood = (1..FLOOD).map(|n| alert("Warning", "flood", "shop", "p", "flood", HELD + n));
    let last = alert("Warning", "flood", "shop", "p", "the last of the flood", 0);
    publish_all(&client, &ui, flood.chain([last]), HELD + FLOOD).await;
    assert!(
        ui.metric("falco_nats_ui_clients_dropped_total").await >= 1.0,
        "the page fell behind"
    );
    // It comes back with the newest on top, the ring after what it held.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (kept, source) = loop {
        let top = browser.top_output().await;
        let source = browser.text("source").await;
        let text = browser.text("counts").await;
        if top == "the last of the flood" && source.contains("missed") {
            let kept: u64 = text
                .split(" of ")
                .nth(1)
                .and_then(|t| t.strip_suffix(" kept"))
                .and_then(|n| n.parse().ok())
                .unwrap();
            break (kept, source);
        }
        assert!(Instant::now() < deadline, "{text} / {top} / {source}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        kept >= HELD + 2000,
        "{kept} kept: the page kept the {HELD} it held, and the ring's 2000 after them"
    );
    let missed: u64 = source
        .split("; ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(missed > 0 && kept + missed <= HELD + FLOOD + 1, "{source}");
    // A restarted ui is another instance: the page starts afresh with it.
    let addr = ui.addr;
    ui.stop().await;
    let again = Ui::start_on(addr, live_only(&nats, 256)).await;
    client
        .publish(
            "falco.warning.fresh",
            alert("Warning", "fresh", "shop", "p", "after the restart", 1).into(),
        )
        .await
        .unwrap();
    wait_for(
        "the page to start afresh with the new ui",
        Duration::from_secs(60),
        || async { browser.text("counts").await == "1 shown of 1 kept" },
    )
    .await;
    browser.close().await;
    again.stop().await;
}
