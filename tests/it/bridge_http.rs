//! The HTTP input end to end: alerts POSTed the way Falco's http_output
//! posts them (plain and over TLS) into a real nats-server.

use std::sync::Arc;
use std::time::Duration;

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
    assert!(body.contains("compress_uploads"), "{body}");

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
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, h2.read_to_end(&mut answer)).await;
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 "),
        "answered HTTP/2: {answer:?}"
    );
    bridge.stop().await.unwrap();
}
