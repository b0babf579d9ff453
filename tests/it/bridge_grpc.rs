//! gRPC input end to end: the mocked Falco on a real Unix socket, the bridge,
//! and a real nats-server.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::*;
use falco_nats::bridge::InputOptions;
use falco_nats::convert::event_from_response;
use falco_nats::input::grpc::GrpcMethod;
use falco_nats::nats::subject::slug;
use falco_nats::proto::outputs::Response;
use falco_nats::simulate::alerts::AlertFactory;
use falco_nats::simulate::falco_grpc::MockFalco;

const WAIT: Duration = Duration::from_secs(10);

fn header<'a>(m: &'a async_nats::Message, name: &str) -> &'a str {
    m.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .unwrap_or_default()
}

async fn exact_json_and_headers(json_output: bool) {
    let nats = NatsServer::start();
    let (falco, socket, _dir) = started_falco().await;
    let (_client, mut sub) = nats.subscribed("falco.>").await;

    let mut factory = AlertFactory::new("node-a", json_output);
    let alerts: Vec<Response> = (0..14).map(|_| factory.next_response()).collect();
    for a in &alerts {
        falco.push(a.clone());
    }
    let bridge = RunningBridge::start(grpc_options(&socket, &nats.url())).await;
    let got = receive(&mut sub, alerts.len(), WAIT).await;

    for (alert, msg) in alerts.iter().zip(&got) {
        let expected = event_from_response(alert.clone()).unwrap();
        if json_output {
            assert_eq!(
                msg.payload,
                alert.output.as_bytes(),
                "json_output is forwarded verbatim"
            );
        }
        // Built from the fields (text output): it reads back to them.
        let json: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        if !json_output {
            assert_eq!(json["rule"], alert.rule.as_str());
            assert_eq!(json["output"], alert.output.as_str());
            assert_eq!(json["hostname"], alert.hostname.as_str());
            let mut tags = alert.tags.clone();
            tags.sort();
            assert_eq!(json["tags"], serde_json::json!(tags));
        }
        let priority = expected.priority;
        assert_eq!(
            msg.subject.as_str(),
            format!("falco.{}.{}", priority.as_lower_str(), slug(&alert.rule))
        );
        assert_eq!(header(msg, "Falco-Priority"), priority.as_str());
        assert_eq!(header(msg, "Falco-Rule"), alert.rule);
        assert_eq!(header(msg, "Falco-Hostname"), "node-a");
        assert_eq!(header(msg, "Falco-Source"), alert.source);
        assert_eq!(header(msg, "Nats-Msg-Id"), expected.msg_id());
    }
    assert!(got
        .iter()
        .any(|m| m.subject.as_str() == "falco.notice.terminal_shell_in_container"));
    assert!(got
        .iter()
        .any(|m| m.subject.as_str() == "falco.critical.falco_internal_syscall_event_drop"));
    assert_quiet(&mut sub, Duration::from_millis(200)).await;

    let (status, body) = bridge.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        bridge.metric("falco_nats_alerts_published_total").await,
        14.0
    );
    assert_eq!(
        bridge
            .metric("falco_nats_alerts_received_total{input=\"grpc\"}")
            .await,
        14.0
    );
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn grpc_text_output_becomes_falco_json() {
    exact_json_and_headers(false).await;
}

/// One gRPC response, its Falco JSON written by hand (keys sorted, numbers
/// typed, `<NA>` as null, `evt.time` from the response's time, tags sorted).
#[tokio::test]
async fn grpc_text_output_is_exactly_the_json_falco_writes() {
    let nats = NatsServer::start();
    let (falco, socket, _dir) = started_falco().await;
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    falco.push(Response {
        time: Some(prost_types::Timestamp {
            seconds: 1_685_022_245,
            nanos: 478_445_995,
        }),
        priority: 2,
        rule: "Terminal shell in container".into(),
        output: "13:44:05.478445995: Critical A shell was spawned (user=root)".into(),
        output_fields: [
            ("user.name", "root"),
            ("proc.tty", "34816"),
            ("user.loginuid", "-1"),
            ("k8s.pod.name", "<NA>"),
            ("container.id", "ee97d9c4186f"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        hostname: "falco-xczjd".into(),
        tags: vec!["shell".into(), "container".into()],
        source: "syscall".into(),
        ..Default::default()
    });
    let bridge = RunningBridge::start(grpc_options(&socket, &nats.url())).await;
    let got = receive(&mut sub, 1, WAIT).await;
    let expected = concat!(
        r#"{"hostname":"falco-xczjd","output":"13:44:05.478445995: Critical A shell was spawned (user=root)","#,
        r#""output_fields":{"container.id":"ee97d9c4186f","evt.time":1685022245478445995,"k8s.pod.name":null,"#,
        r#""proc.tty":34816,"user.loginuid":-1,"user.name":"root"},"priority":"Critical","#,
        r#""rule":"Terminal shell in container","source":"syscall","tags":["container","shell"],"#,
        r#""time":"2023-05-25T13:44:05.478445995Z"}"#
    );
    assert_eq!(String::from_utf8_lossy(&got[0].payload), expected);
    assert_eq!(
        got[0].subject.as_str(),
        "falco.critical.terminal_shell_in_container"
    );
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn grpc_json_output_is_forwarded_verbatim() {
    exact_json_and_headers(true).await;
}

#[tokio::test]
async fn flat_subject_of_the_proof_of_concept() {
    let nats = NatsServer::start();
    let (falco, socket, _dir) = started_falco().await;
    let client = nats.client().await;
    let mut sub = client.subscribe(">").await.unwrap();
    client.flush().await.unwrap();
    let mut factory = AlertFactory::new("node-a", false);
    for _ in 0..7 {
        falco.push(factory.next_response());
    }
    let mut options = grpc_options(&socket, &nats.url());
    options.publish.subject = "FALCO".parse().unwrap();
    let bridge = RunningBridge::start(options).await;
    let got = receive(&mut sub, 7, WAIT).await;
    assert!(got.iter().all(|m| m.subject.as_str() == "FALCO"));
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn get_method_and_min_priority_and_unknown_priority() {
    let nats = NatsServer::start();
    let (falco, socket, _dir) = started_falco().await;
    let (_client, mut sub) = nats.subscribed("falco.>").await;

    let mut factory = AlertFactory::new("node-a", false);
    let mut bad = factory.next_response();
    bad.priority = 12;
    falco.push(bad);
    // 7 scenarios: Notice, Critical, Warning, Error, Notice, Notice, Critical.
    for _ in 0..7 {
        falco.push(factory.next_response());
    }
    let mut options = grpc_options(&socket, &nats.url());
    if let InputOptions::Grpc(g) = &mut options.input {
        g.method = GrpcMethod::Get;
    }
    options.min_priority = "error".parse().unwrap();
    let bridge = RunningBridge::start(options).await;
    let got = receive(&mut sub, 3, WAIT).await;
    let priorities: BTreeSet<String> = got
        .iter()
        .map(|m| header(m, "Falco-Priority").to_owned())
        .collect();
    assert_eq!(
        priorities,
        BTreeSet::from(["Critical".to_owned(), "Error".to_owned()])
    );
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
    assert_eq!(
        bridge
            .metric("falco_nats_alerts_rejected_total{reason=\"unknown_priority\"}")
            .await,
        1.0
    );
    assert_eq!(bridge.metric("falco_nats_alerts_filtered_total").await, 4.0);
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn falco_restart_and_reload_lose_and_duplicate_nothing() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("falco.sock");
    let mut falco = MockFalco::new(&socket);
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let mut factory = AlertFactory::new("node-a", false);

    // The bridge starts before Falco: it waits and retries.
    let bridge = RunningBridge::start(grpc_options(&socket, &nats.url())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = bridge.get("/readyz").await;
    assert_eq!(status, 503, "not ready without Falco");
    falco.start().await.unwrap();
    // Ready once connected, though a quiet Falco sends no headers yet.
    wait_for("ready with a quiet Falco", WAIT, || async {
        bridge.get("/readyz").await.0 == 200
    })
    .await;

    let mut seen = Vec::new();
    for round in 0..3 {
        for _ in 0..100 {
            falco.push(factory.next_response());
        }
        seen.extend(receive(&mut sub, 50, WAIT).await);
        // Falco goes away mid-stream; alerts fire while it restarts.
        falco.stop().await;
        for _ in 0..100 {
            falco.push(factory.next_response());
        }
        falco.start().await.unwrap();
        // A hot reload ends the streams of the running server.
        if round == 1 {
            falco.end_streams();
        }
        seen.extend(receive(&mut sub, 150, WAIT).await);
    }
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
    let nums: BTreeSet<u64> = seen.iter().map(|m| evt_num(&m.payload)).collect();
    assert_eq!(seen.len(), 600);
    assert_eq!(nums, (1..=600).collect(), "every alert exactly once");
    assert!(
        bridge
            .metric("falco_nats_input_reconnects_total{input=\"grpc\"}")
            .await
            >= 3.0
    );
    bridge.stop().await.unwrap();
}

/// The mock itself behaves like Falco: `sub` answers only after a request,
/// one queue feeds all clients, `get` drains and ends.
#[tokio::test]
async fn mock_falco_polls_and_shares_one_queue() {
    use falco_nats::proto::outputs::service_client::ServiceClient;
    use falco_nats::proto::outputs::Request;
    use hyper_util::rt::TokioIo;
    use tokio_stream::wrappers::ReceiverStream;

    let (falco, socket, _dir) = started_falco().await;
    let path = socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://falco")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .unwrap();
    let mut factory = AlertFactory::new("node-m", false);
    for _ in 0..3 {
        falco.push(factory.next_response());
    }

    // A sub call without a request gets nothing, not even an answer.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut client = ServiceClient::new(channel.clone());
    let call = tokio::spawn(async move { client.sub(ReceiverStream::new(rx)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!call.is_finished(), "answered without a request");
    assert_eq!(falco.queued(), 3);
    // One request: everything queued comes, then the server waits.
    tx.send(Request {}).await.unwrap();
    let mut stream = call.await.unwrap().unwrap().into_inner();
    for n in 1..=3 {
        let r = stream.message().await.unwrap().unwrap();
        assert_eq!(r.output_fields["evt.num"], n.to_string());
    }
    falco.push(factory.next_response());
    let waiting = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
    assert!(waiting.is_err(), "sent without a request");

    // A second client takes it from the one queue: the first never sees it.
    let mut other = ServiceClient::new(channel);
    let mut drained = other.get(Request {}).await.unwrap().into_inner();
    assert_eq!(
        drained.message().await.unwrap().unwrap().output_fields["evt.num"],
        "4"
    );
    assert!(
        drained.message().await.unwrap().is_none(),
        "get ends after draining"
    );
    tx.send(Request {}).await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
    assert!(nothing.is_err(), "alert delivered twice");

    // Closing the request side ends the call.
    drop(tx);
    assert!(stream.message().await.unwrap().is_none());
}
