//! The HTTP input end to end: alerts POSTed the way Falco's http_output
//! posts them (plain and over TLS) into a real nats-server.

use std::sync::Arc;
use std::time::Duration;

use crate::support::tls::TestCa;
use crate::support::*;
use falco_nats::bridge::{InputOptions, TlsFiles};
use falco_nats::input::http::HttpOptions;
use falco_nats::simulate::alerts::AlertFactory;

const WAIT: Duration = Duration::from_secs(10);
const JSON: (&str, &str) = ("Content-Type", "application/json");
const FALCO_AGENT: (&str, &str) = ("User-Agent", "falcosecurity/falco");

fn http_options(nats: &NatsServer, token: Option<&str>) -> falco_nats::bridge::BridgeOptions {
    let mut options = grpc_options(std::path::Path::new("/unused"), &nats.url());
    options.input = InputOptions::Http(HttpOptions {
        max_body: 4096,
        token: token.map(str::to_owned),
        ..Default::default()
    });
    options
}

#[tokio::test]
async fn http_alerts_arrive_unchanged_and_bad_bodies_are_refused() {
    let nats = NatsServer::start();
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let bridge = RunningBridge::start_ready(http_options(&nats, None)).await;

    let mut factory = AlertFactory::new("node-h", false);
    let alerts: Vec<String> = (0..4).map(|_| factory.next_json()).collect();
    // As Falco sends them, and once without a Content-Type.
    assert_eq!(
        http_post(bridge.http, &[JSON, FALCO_AGENT], alerts[0].as_bytes())
            .await
            .0,
        200
    );
    assert_eq!(
        http_post(bridge.http, &[FALCO_AGENT], alerts[1].as_bytes())
            .await
            .0,
        200
    );

    let (status, body) = http_post(bridge.http, &[JSON], b"13:44:05.478: Critical A shell").await;
    assert_eq!(status, 400);
    assert!(body.contains("json_output: true"), "{body}");
    let (status, body) =
        http_post(bridge.http, &[JSON], br#"{"output":"no rule or priority"}"#).await;
    assert_eq!(status, 400);
    assert!(body.contains("priority"), "{body}");
    let big = format!(
        r#"{{"priority":"Notice","rule":"r","output":"{}"}}"#,
        "x".repeat(8000)
    );
    assert_eq!(http_post(bridge.http, &[JSON], big.as_bytes()).await.0, 413);
    let (status, body) = http_post(
        bridge.http,
        &[JSON, ("Content-Encoding", "gzip")],
        b"\x1f\x8b",
    )
    .await;
    assert_eq!(status, 415);
    assert!(body.contains("uncompressed"), "{body}");

    // An encoding that is not even text is not identity either.
    let (status, _) = http_post(
        bridge.http,
        &[JSON, ("Content-Encoding", "id\u{e9}ntity")],
        alerts[2].as_bytes(),
    )
    .await;
    assert_eq!(status, 415);
    // `/` takes POSTs only; the probes and everything else are the router's.
    let (status, body) = http_get(bridge.http, "/").await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(http_get(bridge.http, "/healthz").await.0, 200);
    assert_eq!(http_get(bridge.http, "/nothing-here").await.0, 404);
    assert_eq!(http_get(bridge.http, "//").await.0, 404);

    assert_eq!(
        http_post(bridge.http, &[JSON], alerts[2].as_bytes())
            .await
            .0,
        200
    );
    assert_eq!(
        http_post(bridge.http, &[JSON], format!("{}\n", alerts[3]).as_bytes())
            .await
            .0,
        200
    );
    let got = receive(&mut sub, 4, WAIT).await;
    for (alert, msg) in alerts.iter().zip(&got) {
        assert_eq!(
            msg.payload,
            alert.as_bytes(),
            "what Falco sent is what NATS gets"
        );
    }
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
    assert_eq!(
        bridge
            .metric("falco_nats_alerts_rejected_total{reason=\"not_json\"}")
            .await,
        1.0
    );
    assert_eq!(
        bridge
            .metric("falco_nats_alerts_rejected_total{reason=\"not_an_alert\"}")
            .await,
        1.0
    );
    assert_eq!(
        bridge
            .metric("falco_nats_alerts_received_total{input=\"http\"}")
            .await,
        6.0
    );
    bridge.stop().await.unwrap();
}

/// Falco 0.44 with `compress_uploads: true` sends a plain body and asks
/// only for a compressed answer (`TE: gzip`): the alert is taken.
#[tokio::test]
async fn falco_asking_for_a_compressed_answer_is_served() {
    let nats = NatsServer::start();
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let mut options = grpc_options(std::path::Path::new("/unused"), &nats.url());
    options.input = InputOptions::Http(HttpOptions::default());
    let bridge = RunningBridge::start_ready(options).await;
    let alert = AlertFactory::new("node-te", false).next_json();
    let (status, body) = http_post(
        bridge.http,
        &[JSON, ("TE", "gzip"), ("Connection", "TE")],
        alert.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got = receive(&mut sub, 1, WAIT).await;
    assert_eq!(got[0].payload, alert.as_bytes());
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn http_bearer_token() {
    let nats = NatsServer::start();
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let bridge = RunningBridge::start(http_options(&nats, Some("s3cret"))).await;
    wait_for("ready", WAIT, || async {
        bridge.get("/readyz").await.0 == 200
    })
    .await;
    let alert = AlertFactory::new("node-h", false).next_json();
    assert_eq!(
        http_post(bridge.http, &[JSON], alert.as_bytes()).await.0,
        401
    );
    assert_eq!(
        http_post(
            bridge.http,
            &[JSON, ("Authorization", "Bearer wrong")],
            alert.as_bytes()
        )
        .await
        .0,
        401
    );
    assert_eq!(
        http_post(
            bridge.http,
            &[JSON, ("Authorization", "Bearer s3cret")],
            alert.as_bytes()
        )
        .await
        .0,
        200
    );
    let got = receive(&mut sub, 1, WAIT).await;
    assert_eq!(got[0].payload, alert.as_bytes());
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
    // Probes need no token.
    assert_eq!(bridge.get("/healthz").await.0, 200);
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn http_over_tls() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();

    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let mut options = http_options(&nats, None);
    options.tls = Some(TlsFiles {
        cert: cert_path,
        key: key_path,
        client_ca: None,
    });
    let bridge = RunningBridge::start(options).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let alert = AlertFactory::new("node-tls", false).next_json();
    let mut status = 0;
    for _ in 0..50 {
        let Ok(tcp) = tokio::net::TcpStream::connect(bridge.http).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the bridge");
        status = http_exchange(tls, &post_request(&[JSON], alert.as_bytes()))
            .await
            .0;
        break;
    }
    assert_eq!(status, 200);
    let got = receive(&mut sub, 1, WAIT).await;
    assert_eq!(got[0].payload, alert.as_bytes());
    // Plain HTTP is not served on a TLS address.
    let (plain, _) = http_get(bridge.http, "/healthz").await;
    assert_ne!(plain, 200);
    bridge.stop().await.unwrap();
}

/// Issue 9, item 18: clients holding half a request open do not hold up
/// the shutdown: they are closed at the grace deadline (half the drain
/// timeout), and the bridge stops cleanly.
#[tokio::test]
async fn half_open_http_requests_do_not_hold_up_the_shutdown() {
    use tokio::io::AsyncWriteExt;
    let nats = NatsServer::start();
    let mut options = http_options(&nats, None);
    options.drain_timeout = Duration::from_secs(2);
    let bridge = RunningBridge::start_ready(options).await;
    let mut headers_only = tokio::net::TcpStream::connect(bridge.http).await.unwrap();
    headers_only
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le")
        .await
        .unwrap();
    let mut half_body = tokio::net::TcpStream::connect(bridge.http).await.unwrap();
    half_body
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"rule\":")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    bridge.stop().await.unwrap();
    // Closed at the grace (1 s), well before hyper's own 30 s wait for
    // headers; the margin is for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped after {:?}",
        started.elapsed()
    );
}

/// Issue 9, item 4: a 5,000-character rule and hostname cannot make a
/// publish exceed the server's limits: the subject tokens are cut (with a
/// digest) and the headers bounded; the connection never drops.
#[tokio::test]
async fn huge_rule_and_hostname_are_published_without_dropping_the_connection() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut sub = client.subscribe(">").await.unwrap();
    client.flush().await.unwrap();
    let mut options = http_options(&nats, None);
    options.publish.subject = "falco.{hostname}.{priority}.{rule}".parse().unwrap();
    if let InputOptions::Http(http) = &mut options.input {
        http.max_body = 64 * 1024;
    }
    let bridge = RunningBridge::start_ready(options).await;
    let rule = "Evil rule ".repeat(500);
    let alert = serde_json::json!({
        "hostname": "h".repeat(5000), "output": "x", "priority": "Critical",
        "rule": rule, "source": "syscall", "tags": [], "time": "2026-11-25T00:00:00.000000000Z",
    })
    .to_string();
    for _ in 0..2 {
        assert_eq!(
            http_post(bridge.http, &[JSON], alert.as_bytes()).await.0,
            200
        );
    }
    let good = AlertFactory::new("node-h", false).next_json();
    assert_eq!(
        http_post(bridge.http, &[JSON], good.as_bytes()).await.0,
        200
    );
    let got = receive(&mut sub, 3, WAIT).await;
    assert!(got[0].subject.len() < 400, "{}", got[0].subject.len());
    assert!(
        got[0].subject.starts_with("falco.hhhh"),
        "{}",
        got[0].subject
    );
    assert_eq!(got[0].payload, alert.as_bytes());
    let headers = got[0].headers.as_ref().unwrap();
    assert!(headers.get("Falco-Rule").unwrap().as_str().len() <= 1024);
    assert_eq!(got[2].payload, good.as_bytes());
    assert_eq!(bridge.metric("falco_nats_nats_reconnects_total").await, 0.0);
    bridge.stop().await.unwrap();
}

/// Issue 9, item 5: the token is checked before the body is read (a wrong
/// token with a 2 MiB body gets 401, not 413), and HTTP/2 is not served.
#[tokio::test]
async fn the_token_comes_before_the_body_and_http2_is_not_spoken() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = NatsServer::start();
    let bridge = RunningBridge::start(http_options(&nats, Some("right"))).await;
    wait_for("ready", WAIT, || async {
        bridge.get("/readyz").await.0 == 200
    })
    .await;
    let big = vec![b'x'; 2 * 1024 * 1024];
    let (status, _) = http_post(bridge.http, &[("Authorization", "Bearer wrong")], &big).await;
    assert_eq!(status, 401);
    let (status, _) = http_post(bridge.http, &[("Authorization", "Bearer right")], &big).await;
    assert_eq!(status, 413);

    let mut h2 = tokio::net::TcpStream::connect(bridge.http).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // Refused: the connection closed at once (hyper's HTTP/1 server drops
    // an HTTP/2 preface unanswered), or an HTTP/1.1 error; never left open.
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, h2.read_to_end(&mut answer))
        .await
        .expect("the connection is closed")
        .expect("read the answer");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.1 5"),
        "HTTP/2 refused: {text:?}"
    );
    bridge.stop().await.unwrap();
}

/// A TLS client trusting `ca`, presenting `identity` when given.
fn tls_client(
    ca: &TestCa,
    identity: Option<(rcgen::Certificate, rcgen::KeyPair)>,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// POSTs `body` over TLS with `connector`: the status, or `None` when the
/// TLS handshake or the exchange failed (a refused certificate).
async fn tls_post(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
    request: &[u8],
) -> Option<u16> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.ok()?;
    // In TLS 1.3 the server checks the client's certificate after the
    // client thinks the handshake is done: a refusal shows as a failed
    // exchange, status 0.
    let (status, _) = tokio::time::timeout(WAIT, http_exchange(tls, request))
        .await
        .ok()?;
    (status != 0).then_some(status)
}

/// The HTTP bridge over TLS with `[cert, key, client CA]`, requiring a
/// client certificate on POST /.
async fn mtls_bridge(
    nats: &NatsServer,
    [cert, key, client_ca]: [std::path::PathBuf; 3],
) -> RunningBridge {
    let mut options = http_options(nats, None);
    if let InputOptions::Http(http) = &mut options.input {
        http.client_certificate = true;
    }
    options.tls = Some(TlsFiles {
        cert,
        key,
        client_ca: Some(client_ca),
    });
    RunningBridge::start(options).await
}

/// Issue 12, item 2: `--tls-client-ca` makes POST / require a client
/// certificate that CA signed, as Falco's `http_output.mtls` presents: none
/// is refused (403, nothing published), one from another CA is refused in
/// the handshake, the right one is answered 200 and its alert is on NATS.
/// The probes stay open to a client without a certificate (the kubelet).
#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("falco-nats test CA");
    let stranger = TestCa::new("another CA");
    let (server_cert, server_key) = ca.leaf(&["localhost", "127.0.0.1"], false);
    let paths = ["tls.crt", "tls.key", "client-ca.crt"].map(|f| dir.path().join(f));
    std::fs::write(&paths[0], server_cert.pem()).unwrap();
    std::fs::write(&paths[1], server_key.serialize_pem()).unwrap();
    std::fs::write(&paths[2], ca.cert.pem()).unwrap();

    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let bridge = mtls_bridge(&nats, paths).await;
    let mut factory = AlertFactory::new("node-mtls", false);

    // No client certificate: refused, nothing published.
    let anonymous = tls_client(&ca, None);
    let alert = factory.next_json();
    let request = post_request(&[JSON], alert.as_bytes());
    let mut status = None;
    for _ in 0..50 {
        status = tls_post(bridge.http, &anonymous, &request).await;
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, Some(403));
    // ... but the probes answer it.
    let probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(tls_post(bridge.http, &anonymous, probe).await, Some(200));

    // A certificate from another CA: the handshake fails.
    let forged = tls_client(&ca, Some(stranger.leaf(&["falco"], true)));
    assert_eq!(tls_post(bridge.http, &forged, &request).await, None);

    // The CA's own: accepted, and the alert is on NATS.
    let falco = tls_client(&ca, Some(ca.leaf(&["falco"], true)));
    let good = factory.next_json();
    assert_eq!(
        tls_post(bridge.http, &falco, &post_request(&[JSON], good.as_bytes())).await,
        Some(200)
    );
    let got = receive(&mut sub, 1, WAIT).await;
    assert_eq!(got[0].payload, good.as_bytes());
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
    bridge.stop().await.unwrap();
}

/// Peak and current resident memory of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Issue 12, item 3: hundreds of connections that stall (half the headers,
/// or the headers and half the body) are all closed within the limits and
/// counted; beyond `--max-connections` new ones are refused and counted;
/// the bridge's memory stays bounded; and Falco's one keep-alive
/// connection, sending all along, is never cut and never refused.
#[tokio::test]
async fn stalled_and_surplus_connections_are_closed_while_falco_goes_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const HALF_HEADERS: usize = 150;
    const HALF_BODY: usize = 150;
    const SURPLUS: usize = 100;
    let nats = NatsServer::start();
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut bridge = tokio::process::Command::new(env!("CARGO_BIN_EXE_falco-nats"))
        .args(["bridge", "--input", "http", "-s", &nats.url()])
        .args(["--listen", &listen.to_string()])
        .args(["--http-header-timeout", "4s", "--http-body-timeout", "4s"])
        .args([
            "--max-connections",
            &(1 + HALF_HEADERS + HALF_BODY).to_string(),
        ])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = bridge.id().unwrap();
    wait_for("the bridge ready", WAIT, || async {
        tokio::net::TcpStream::connect(listen).await.is_ok()
            && http_get(listen, "/readyz").await.0 == 200
    })
    .await;
    let (_, rss_before) = memory_kib(pid);

    // Falco: one keep-alive connection, an alert every 50 ms throughout.
    let falco = tokio::spawn(async move {
        let mut conn = tokio::net::TcpStream::connect(listen).await.unwrap();
        let mut factory = AlertFactory::new("node-falco", false);
        let mut sent = Vec::new();
        for _ in 0..120 {
            let alert = factory.next_json();
            let request = format!(
                "POST / HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{alert}",
                alert.len()
            );
            conn.write_all(request.as_bytes()).await.unwrap();
            assert_eq!(
                read_one_response(&mut conn).await,
                200,
                "Falco's connection cut"
            );
            sent.push(alert);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The flood: half headers, then headers and half a body. (Made well
    // within the limits: the surplus below must find them all open.)
    let flood = std::time::Instant::now();
    let mut stalled = Vec::new();
    for i in 0..HALF_HEADERS + HALF_BODY {
        let mut c = tokio::net::TcpStream::connect(listen).await.unwrap();
        let part: &[u8] = if i < HALF_HEADERS {
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le"
        } else {
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"rule\":"
        };
        c.write_all(part).await.unwrap();
        stalled.push(c);
    }
    // More than --max-connections: closed at once, long before a limit.
    let mut surplus = Vec::new();
    for _ in 0..SURPLUS {
        surplus.push(tokio::net::TcpStream::connect(listen).await.unwrap());
    }
    eprintln!("flood and surplus made in {:?}", flood.elapsed());
    for mut c in surplus {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
            .await
            .expect("a surplus connection left open")
            .unwrap_or(0);
        assert_eq!(n, 0, "a surplus connection was served");
    }
    // Every stalled one is closed within the limits (4 s, with margin for
    // a loaded machine), with at most a 408 for a stalled body.
    for mut c in stalled {
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(15), c.read_to_end(&mut buf))
            .await
            .expect("a stalled connection still open")
            .ok();
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    let sent = falco.await.unwrap();
    let got = receive(&mut sub, sent.len(), WAIT).await;
    for (alert, msg) in sent.iter().zip(&got) {
        assert_eq!(msg.payload, alert.as_bytes());
    }
    // A keep-alive connection that goes quiet after its request is closed
    // at the limit, and counted as idle, not as a stalled request.
    let mut quiet = tokio::net::TcpStream::connect(listen).await.unwrap();
    let alert = AlertFactory::new("node-quiet", false).next_json();
    let request = format!(
        "POST / HTTP/1.1\r\nHost: bridge\r\nContent-Length: {}\r\n\r\n{alert}",
        alert.len()
    );
    quiet.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_one_response(&mut quiet).await, 200);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), quiet.read_to_end(&mut rest))
        .await
        .expect("an idle keep-alive connection left open")
        .ok();
    assert!(rest.is_empty(), "{rest:?}");

    let (_, metrics) = http_get(listen, "/metrics").await;
    let value = |series: &str| metric_value(&metrics, series);
    assert_eq!(
        value("falco_nats_http_stalled_total{phase=\"headers\"}"),
        HALF_HEADERS as f64
    );
    assert_eq!(
        value("falco_nats_http_stalled_total{phase=\"body\"}"),
        HALF_BODY as f64
    );
    assert_eq!(
        value("falco_nats_http_connections_refused_total"),
        SURPLUS as f64
    );
    assert_eq!(value("falco_nats_http_stalled_total{phase=\"idle\"}"), 1.0);
    let (peak, rss_after) = memory_kib(pid);
    eprintln!("bridge memory: {rss_before} KiB before, peak {peak} KiB, {rss_after} KiB after");
    assert!(
        peak < rss_before + 16 * 1024,
        "memory grew from {rss_before} to a peak of {peak} KiB"
    );
    bridge.kill().await.unwrap();
}

/// Issue 12, item 4: `--format falcosidekick` publishes what falcosidekick's
/// NATS output publishes, on its subjects: Falco's fields in its order, a
/// fresh UUID per alert, `syscalls` for a missing source.
#[tokio::test]
async fn falcosidekick_format_is_what_falcosidekick_publishes() {
    let nats = NatsServer::start();
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let mut options = http_options(&nats, None);
    options.format = falco_nats::format::Format::Falcosidekick;
    let bridge = RunningBridge::start_ready(options).await;
    let with_all = r#"{"hostname":"node-1","output":"13:44:05.478445995: Notice A shell was spawned (user=root <x>)","output_fields":{"k8s.ns.name":"shop","k8s.pod.name":"web-1","proc.pid":4242},"priority":"Notice","rule":"Terminal shell in container","source":"syscall","tags":["shell","container"],"time":"2023-05-25T13:44:05.478445990Z"}"#;
    let bare = r#"{"output":"x","priority":"Critical","rule":"Drop and execute new binary in container","time":"2023-05-25T13:44:06Z"}"#;
    for alert in [with_all, bare, with_all] {
        assert_eq!(
            http_post(bridge.http, &[JSON], alert.as_bytes()).await.0,
            200
        );
    }
    let got = receive(&mut sub, 3, WAIT).await;
    assert_eq!(
        got[0].subject.as_str(),
        "falco.notice.terminal_shell_in_container"
    );
    assert_eq!(
        got[1].subject.as_str(),
        "falco.critical.drop_and_execute_new_binary_in_container"
    );
    let uuid = |m: &async_nats::Message| {
        let text = std::str::from_utf8(&m.payload).unwrap();
        let id = text
            .strip_prefix(r#"{"uuid":""#)
            .and_then(|rest| rest.get(..36))
            .unwrap()
            .to_owned();
        let parsed: uuid::Uuid = id.parse().unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        (id, text.replacen(&parsed.to_string(), "U", 1))
    };
    let (first, text) = uuid(&got[0]);
    assert_eq!(
        text,
        r#"{"uuid":"U","output":"13:44:05.478445995: Notice A shell was spawned (user=root \u003cx\u003e)","priority":"Notice","rule":"Terminal shell in container","time":"2023-05-25T13:44:05.47844599Z","output_fields":{"k8s.ns.name":"shop","k8s.pod.name":"web-1","proc.pid":4242},"source":"syscall","tags":["container","shell"],"hostname":"node-1"}"#
    );
    let (_, text) = uuid(&got[1]);
    assert_eq!(
        text,
        r#"{"uuid":"U","output":"x","priority":"Critical","rule":"Drop and execute new binary in container","time":"2023-05-25T13:44:06Z","output_fields":null,"source":"syscalls"}"#
    );
    // The same alert twice: two events, as falcosidekick makes them.
    let (third, _) = uuid(&got[2]);
    assert_ne!(first, third);
    // The headers still carry what a consumer filters on.
    let headers = got[1].headers.as_ref().unwrap();
    assert_eq!(headers.get("Falco-Source").unwrap().as_str(), "syscalls");
    bridge.stop().await.unwrap();
}

/// Issue 22, item 7: the chart's defaults give an authenticated path. The
/// certificates `helm install` makes (the bridge's Secret, and Falco's
/// client Secret for the Falco chart's certs.existingClientSecret) work
/// with the real bridge: Falco's client certificate is taken, verifying
/// the bridge under its Service name; no certificate, and no POST.
#[tokio::test]
async fn the_charts_generated_certificates_carry_falcos_posts() {
    use base64::Engine;
    use rustls_pki_types::pem::PemObject;
    let docs = crate::support::manifests::render_chart(
        &crate::support::manifests::chart_dir().join("ci/default-values.yaml"),
    );
    let secret = |name: &str, key: &str| {
        let doc = crate::support::manifests::find(&docs, "Secret", name).unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(doc["data"][key].as_str().unwrap())
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let paths = ["tls.crt", "tls.key", "ca.crt"].map(|f| {
        let path = dir.path().join(f);
        std::fs::write(&path, secret("falco-nats-bridge-tls", f)).unwrap();
        path
    });
    let nats = NatsServer::start();
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let bridge = mtls_bridge(&nats, paths).await;

    // Falco, with what its chart mounts from falco-nats-client.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls_pki_types::CertificateDer::from_pem_slice(&secret(
                "falco-nats-client",
                "ca.crt",
            ))
            .unwrap(),
        )
        .unwrap();
    let builder = || {
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
    };
    let falco = builder()
        .with_client_auth_cert(
            vec![rustls_pki_types::CertificateDer::from_pem_slice(&secret(
                "falco-nats-client",
                "client.crt",
            ))
            .unwrap()],
            rustls_pki_types::PrivateKeyDer::from_pem_slice(&secret(
                "falco-nats-client",
                "client.key",
            ))
            .unwrap(),
        )
        .unwrap();
    let anonymous = builder().with_no_client_auth();
    let post = |config: rustls::ClientConfig, body: String| async move {
        let tcp = tokio::net::TcpStream::connect(bridge.http).await.unwrap();
        // The name Falco's URL uses (deploy/falco-chart/values.yaml).
        let name =
            rustls_pki_types::ServerName::try_from("falco-nats-bridge.falco-nats.svc").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("the bridge's certificate verifies under its Service name");
        http_exchange(tls, &post_request(&[JSON], body.as_bytes()))
            .await
            .0
    };
    let mut factory = AlertFactory::new("node-chart", false);
    let alert = factory.next_json();
    let mut status = 0;
    for _ in 0..50 {
        status = post(falco.clone(), alert.clone()).await;
        if status != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
    assert_eq!(
        receive(&mut sub, 1, WAIT).await[0].payload,
        alert.as_bytes()
    );
    assert_eq!(
        post(anonymous, factory.next_json()).await,
        403,
        "no client certificate"
    );
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
    bridge.stop().await.unwrap();
}

/// `simulate --output http` posts as Falco's http_output does; an alert
/// posted before the bridge listens is posted again until it is taken.
#[tokio::test]
async fn the_simulator_posts_like_falco_and_waits_for_the_bridge() {
    let nats = NatsServer::start();
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    // The bridge's port, refused until the bridge listens on it.
    let port = free_port();
    let mut simulate = std::process::Command::new(env!("CARGO_BIN_EXE_falco-nats"))
        .args([
            "simulate", "--output", "http", "--rate", "0", "--count", "5",
        ])
        .arg("--url")
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut options = grpc_options(std::path::Path::new("/unused"), &nats.url());
    options.input = InputOptions::Http(HttpOptions::default());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let bridge = RunningBridge::start_on(options, listener);
    let got = receive(&mut sub, 5, WAIT).await;
    let nums: Vec<u64> = got.iter().map(|m| evt_num(&m.payload)).collect();
    assert_eq!(nums, [1, 2, 3, 4, 5]);
    assert_quiet(&mut sub, Duration::from_millis(200)).await;
    let _ = simulate.kill();
    let _ = simulate.wait();
    bridge.stop().await.unwrap();
}
