//! The responder against a real nats-server and a real `kube::Client`
//! talking to the fake API server.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::support::fake_kube::KubeApi as FakeKube;
use crate::support::responder::*;
use crate::support::*;
use async_nats::jetstream;
use falco_nats::respond::{self, RespondOptions, Subscription};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn critical_alert_deletes_exactly_that_pod_in_exactly_its_namespace() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pod("shop", "web", "uid-shop-web", Some("ReplicaSet"));
    kube.add_pod("other", "web", "uid-other-web", Some("ReplicaSet"));
    let responder = Responder::start(options(&nats, &kube)).await;

    publish(
        &client,
        pod_alert("Critical", "shop", "web", Some("uid-shop-web")),
    )
    .await;
    let r = results(&mut out, 1).await;
    assert_eq!(r[0]["action"], "delete-pod");
    assert_eq!(r[0]["outcome"], "done", "{}", r[0]);
    assert_eq!(r[0]["namespace"], "shop");
    assert_eq!(r[0]["pod"], "web");
    assert_eq!(r[0]["rule"], "Drop and execute new binary in container");
    assert!(r[0]["latency_ms"].as_f64().unwrap() > 0.0);

    let deletes = kube.deletes();
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0].namespace, "shop");
    assert_eq!(deletes[0].name, "web");
    assert_eq!(deletes[0].grace_period_seconds, Some(0));
    assert_eq!(deletes[0].uid_precondition.as_deref(), Some("uid-shop-web"));
    assert!(!kube.has_pod("shop", "web"));
    assert!(
        kube.has_pod("other", "web"),
        "the same name elsewhere is untouched"
    );

    let events = kube.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["metadata"]["namespace"], "shop");
    assert_eq!(events[0]["involvedObject"]["name"], "web");
    assert_eq!(events[0]["involvedObject"]["uid"], "uid-shop-web");
    assert_eq!(events[0]["reason"], "FalcoNatsActed");
    responder.stop().await;
}

#[tokio::test]
async fn safety_rails_skip_and_say_why() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pod("kube-system", "coredns", "u1", Some("ReplicaSet"));
    kube.add_pod("elsewhere", "api", "u2", Some("ReplicaSet"));
    kube.add_pod("shop", "node-agent", "u3", Some("DaemonSet"));
    kube.add_pod("shop", "web", "u4", Some("ReplicaSet"));
    kube.add_pod("responders", "me", "u5", Some("ReplicaSet"));
    let mut opts = options(&nats, &kube);
    opts.rails.only_namespaces = Some(
        [
            "shop".to_owned(),
            "kube-system".to_owned(),
            "responders".to_owned(),
        ]
        .into(),
    );
    opts.rails.protected_namespaces.insert("responders".into());
    let responder = Responder::start(opts).await;

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            pod_alert("Critical", "kube-system", "coredns", None),
            "protected_namespace",
        ),
        (
            pod_alert("Critical", "responders", "me", None),
            "protected_namespace",
        ),
        (
            pod_alert("Critical", "elsewhere", "api", None),
            "namespace_not_allowed",
        ),
        (
            pod_alert("Critical", "shop", "node-agent", None),
            "daemonset_pod",
        ),
        (
            alert("Critical", "Falco internal: syscall event drop", json!({})),
            "no_pod_in_alert",
        ),
        (
            alert(
                "Critical",
                "r",
                json!({"k8s.ns.name": "shop", "k8s.pod.name": null}),
            ),
            "no_pod_in_alert",
        ),
        (b"{not json".to_vec(), "malformed_alert"),
        (
            br#"{"rule":"r","priority":"Severe"}"#.to_vec(),
            "malformed_alert",
        ),
        (pod_alert("Error", "shop", "web", None), "no_policy_match"),
        (pod_alert("Warning", "shop", "web", None), "no_policy_match"),
    ];
    for (payload, _) in &cases {
        publish(&client, payload.clone()).await;
    }
    let got = results(&mut out, cases.len()).await;
    for ((_, reason), r) in cases.iter().zip(&got) {
        assert_eq!(r["outcome"], "skipped", "{r}");
        assert!(
            r["reason"].as_str().unwrap().starts_with(reason),
            "expected {reason}: {r}"
        );
    }
    assert!(kube.deletes().is_empty(), "nothing is deleted");
    // Still alive and acting after all that.
    publish(&client, pod_alert("Critical", "shop", "web", None)).await;
    assert_eq!(results(&mut out, 1).await[0]["outcome"], "done");
    // A repeat for the same pod and rule is deduplicated.
    kube.add_pod("shop", "web", "u6", Some("ReplicaSet"));
    publish(&client, pod_alert("Critical", "shop", "web", None)).await;
    let r = results(&mut out, 1).await;
    assert_eq!(r[0]["reason"], "duplicate", "{}", r[0]);
    assert_eq!(kube.deletes().len(), 1);
    responder.stop().await;
}

#[tokio::test]
async fn an_alert_storm_cannot_exceed_the_rate_limit() {
    const PODS: usize = 1000;
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pods("shop", "web", PODS);
    let mut opts = options(&nats, &kube);
    opts.limits.max_actions_per_minute = 10;
    let responder = Responder::start(opts).await;
    for i in 0..PODS {
        publish(
            &client,
            pod_alert("Critical", "shop", &format!("web-{i}"), None),
        )
        .await;
    }
    let got = results(&mut out, PODS).await;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for r in &got {
        *outcomes
            .entry(format!(
                "{}/{}",
                r["outcome"].as_str().unwrap(),
                r["reason"].as_str().unwrap_or("")
            ))
            .or_default() += 1;
    }
    let done = got.iter().filter(|r| r["outcome"] == "done").count();
    let limited = got.iter().filter(|r| r["reason"] == "rate_limited").count();
    assert_eq!(done, 10, "{outcomes:?}");
    assert_eq!(limited, PODS - 10, "{outcomes:?}");
    assert_eq!(kube.deletes().len(), 10);
    responder.stop().await;
}

#[tokio::test]
async fn dry_run_writes_nothing_and_says_what_it_would_do() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pod("shop", "web", "u1", Some("ReplicaSet"));
    let mut opts = options(&nats, &kube);
    opts.policy = policy("rules:\n  - name: all\n    match: {priority: '>=Notice'}\n    actions:\n      - action: delete-pod\n        grace_period_seconds: 3\n      - action: isolate-pod\n      - action: label-pod\n        labels: {quarantine: 'true'}\n");
    opts.dry_run = true;
    let responder = Responder::start(opts).await;
    publish(&client, pod_alert("Critical", "shop", "web", Some("u1"))).await;
    let got = results(&mut out, 3).await;
    let reasons: Vec<&str> = got.iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert!(
        got.iter()
            .all(|r| r["outcome"] == "dry_run" && r["dry_run"] == true),
        "{got:?}"
    );
    assert_eq!(reasons[0], "would delete the pod (grace period 3s)");
    assert!(
        reasons[1].starts_with("would isolate the pod"),
        "{reasons:?}"
    );
    assert_eq!(reasons[2], "would label the pod quarantine=true");
    assert!(
        kube.writes().is_empty(),
        "no write reached the API: {:?}",
        kube.writes()
    );
    assert!(kube.has_pod("shop", "web"));
    responder.stop().await;
}

#[tokio::test]
async fn label_isolate_gone_and_replaced() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    for name in ["a", "b", "c"] {
        kube.add_pod("shop", name, &format!("uid-{name}"), Some("ReplicaSet"));
    }
    let mut opts = options(&nats, &kube);
    opts.policy = policy("rules:\n  - name: contain\n    match: {priority: '>=Critical'}\n    actions:\n      - action: isolate-pod\n      - action: label-pod\n        labels: {falco: seen}\n");
    let responder = Responder::start(opts).await;
    publish(&client, pod_alert("Critical", "shop", "a", Some("uid-a"))).await;
    publish(&client, pod_alert("Critical", "shop", "b", None)).await;
    publish(
        &client,
        pod_alert("Critical", "shop", "c", Some("uid-old-c")),
    )
    .await;
    publish(&client, pod_alert("Critical", "shop", "gone", None)).await;
    let got = results(&mut out, 7).await;
    let outcomes: Vec<String> = got
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["pod"].as_str().unwrap(),
                r["action"].as_str().unwrap(),
                r["outcome"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            "a isolate-pod done",
            "a label-pod done",
            "b isolate-pod done",
            "b label-pod done",
            "c isolate-pod replaced",
            "c label-pod replaced",
            "gone isolate-pod gone",
        ],
        "{got:?}"
    );
    let a = kube.pod("shop", "a").unwrap();
    assert_eq!(a["metadata"]["labels"]["falco-nats/quarantine"], "true");
    assert_eq!(a["metadata"]["labels"]["falco"], "seen");
    assert_eq!(
        a["metadata"]["labels"]["app"], "a",
        "a merge patch keeps other labels"
    );
    let c = kube.pod("shop", "c").unwrap();
    assert!(
        c["metadata"]["labels"].get("falco").is_none(),
        "a replaced pod is not touched"
    );
    let policies = kube.network_policies();
    assert_eq!(policies.len(), 1, "one isolation policy per namespace");
    assert_eq!(
        policies[0]["spec"]["podSelector"]["matchLabels"]["falco-nats/quarantine"],
        "true"
    );
    assert_eq!(
        policies[0]["spec"]["policyTypes"],
        json!(["Ingress", "Egress"])
    );
    assert!(
        policies[0]["spec"].get("ingress").is_none() && policies[0]["spec"].get("egress").is_none()
    );
    responder.stop().await;
}

#[tokio::test]
async fn two_replicas_in_a_queue_group_handle_each_alert_once() {
    const PODS: usize = 100;
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pods("shop", "web", PODS);
    let one = Responder::start(options(&nats, &kube)).await;
    let two = Responder::start(options(&nats, &kube)).await;
    for i in 0..PODS {
        publish(
            &client,
            pod_alert("Critical", "shop", &format!("web-{i}"), None),
        )
        .await;
    }
    let got = results(&mut out, PODS).await;
    assert_quiet(&mut out, Duration::from_millis(500)).await;
    assert!(got.iter().all(|r| r["outcome"] == "done"), "{got:?}");
    let deleted: BTreeSet<String> = kube.deletes().iter().map(|d| d.name.clone()).collect();
    assert_eq!(deleted.len(), PODS);
    assert_eq!(
        kube.deletes().len(),
        PODS,
        "each alert handled by one replica"
    );
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn jetstream_durable_consumer_survives_a_crash() {
    const PODS: usize = 60;
    let nats = NatsServer::start();
    let kube = FakeKube::start().await.unwrap();
    kube.add_pods("shop", "web", PODS);
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "FALCO".into(),
        subjects: vec!["falco.*.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut out = client.subscribe("falco.response.>").await.unwrap();
    let mut opts = options(&nats, &kube);
    opts.subscription = Subscription::JetStream {
        stream: "FALCO".into(),
        durable: "responders".into(),
        subject: "falco.>".into(),
        ack_wait: Duration::from_secs(1),
        max_deliver: 5,
    };
    // Each API call takes 10 ms, so the crash finds alerts still to do.
    kube.set_latency(Duration::from_millis(10));
    let first = Responder::start(opts).await;
    for i in 0..PODS {
        js.publish(
            "falco.critical.drop_and_execute_new_binary_in_container",
            pod_alert("Critical", "shop", &format!("web-{i}"), None).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // Crash mid-stream: no shutdown, no acknowledgement of what is in hand.
    receive(&mut out, 20, WAIT).await;
    first.task.abort();
    let _ = first.task.await;
    let left = (0..PODS)
        .filter(|i| kube.has_pod("shop", &format!("web-{i}")))
        .count();
    assert!(left > 0, "the crash came after everything was done");
    let mut opts = options(&nats, &kube);
    opts.subscription = Subscription::JetStream {
        stream: "FALCO".into(),
        durable: "responders".into(),
        subject: "falco.>".into(),
        ack_wait: Duration::from_secs(1),
        max_deliver: 5,
    };
    let second = Responder::start(opts).await;
    wait_for("every pod deleted", Duration::from_secs(30), || async {
        (0..PODS).all(|i| !kube.has_pod("shop", &format!("web-{i}")))
    })
    .await;
    let accepted: Vec<String> = kube
        .deletes()
        .iter()
        .filter(|d| d.status == 200)
        .map(|d| d.name.clone())
        .collect();
    let unique: BTreeSet<&String> = accepted.iter().collect();
    assert_eq!(
        accepted.len(),
        PODS,
        "every alert acted on once: {accepted:?}"
    );
    assert_eq!(unique.len(), PODS);
    second.stop().await;
}

#[tokio::test]
async fn end_to_end_from_falco_through_the_bridge_to_a_deleted_pod() {
    use falco_nats::simulate::alerts::{AlertFactory, PODS};

    let Scene {
        nats,
        kube,
        client: _client,
        mut out,
    } = Scene::start().await;
    for p in PODS {
        kube.add_pod(p.namespace, p.name, p.uid, Some("ReplicaSet"));
    }
    let (falco, socket, _dir) = started_falco().await;
    let responder = Responder::start(options(&nats, &kube)).await;
    let bridge = RunningBridge::start(grpc_options(&socket, &nats.url())).await;

    // The first seven simulated alerts: one Critical on a pod, one Critical
    // internal alert without a pod, five below Critical.
    let mut factory = AlertFactory::new("node-e2e", false);
    for _ in 0..7 {
        falco.push(factory.next_response());
    }
    let got = results(&mut out, 7).await;
    let done: Vec<&Value> = got.iter().filter(|r| r["outcome"] == "done").collect();
    assert_eq!(done.len(), 1, "{got:?}");
    assert_eq!(done[0]["rule"], "Drop and execute new binary in container");
    assert_eq!(done[0]["hostname"], "node-e2e");
    assert_eq!(
        got.iter()
            .filter(|r| r["reason"] == "no_pod_in_alert")
            .count(),
        1
    );
    assert_eq!(
        got.iter()
            .filter(|r| r["reason"] == "no_policy_match")
            .count(),
        5
    );
    let deletes = kube.deletes();
    assert_eq!(deletes.len(), 1);
    assert_eq!(
        (deletes[0].namespace.as_str(), deletes[0].name.as_str()),
        (PODS[0].namespace, PODS[0].name)
    );
    assert_eq!(deletes[0].uid_precondition.as_deref(), Some(PODS[0].uid));
    assert!(!kube.has_pod(PODS[0].namespace, PODS[0].name));
    bridge.stop().await.unwrap();
    responder.stop().await;
}

/// Names in an alert are written by whoever controls the watched container:
/// any that is not a valid Kubernetes name is refused before any rail,
/// policy or API call (kube joins path segments without encoding them).
#[tokio::test]
async fn crafted_names_never_reach_the_api() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pod("kube-system", "coredns-abc", "u-dns", Some("ReplicaSet"));
    kube.add_pod("shop", "web", "u-web", Some("ReplicaSet"));
    let responder = Responder::start(options(&nats, &kube)).await;

    let long_label = "a".repeat(64);
    let long_name = format!("{}.{}", "b".repeat(63), "c".repeat(190));
    let cases: Vec<(String, String)> = vec![
        ("kube-system/pods/coredns-abc#".into(), "x".into()),
        ("shop".into(), "web#".into()),
        ("shop?dryRun=All".into(), "web".into()),
        ("shop".into(), "web?propagationPolicy=Orphan".into()),
        ("shop/../kube-system".into(), "coredns-abc".into()),
        ("..".into(), "web".into()),
        ("shop".into(), "..".into()),
        ("shop".into(), "web/status".into()),
        ("Shop".into(), "web".into()),
        ("shop".into(), "Web".into()),
        ("kube-system%2Fpods%2Fcoredns-abc".into(), "x".into()),
        ("shop".into(), "web%2Fstatus".into()),
        ("\u{0455}hop".into(), "web".into()), // Cyrillic dze, looks like 's'
        ("shop".into(), "w\u{0435}b".into()), // Cyrillic ie, looks like 'e'
        ("shop".into(), "web\n".into()),
        ("-shop".into(), "web".into()),
        ("shop".into(), "web-".into()),
        (long_label, "web".into()),
        ("shop".into(), long_name),
    ];
    for (ns, pod) in &cases {
        publish(
            &client,
            alert(
                "Critical",
                "Drop and execute new binary in container",
                json!({"k8s.ns.name": ns, "k8s.pod.name": pod}),
            ),
        )
        .await;
    }
    let got = results(&mut out, cases.len()).await;
    for ((ns, pod), r) in cases.iter().zip(&got) {
        assert_eq!(r["outcome"], "skipped", "{ns:?}/{pod:?}: {r}");
        assert!(
            r["reason"].as_str().unwrap().starts_with("invalid_name"),
            "{ns:?}/{pod:?}: {r}"
        );
        assert!(
            r.get("namespace").is_none() && r.get("pod").is_none(),
            "{r}"
        );
    }
    assert_eq!(kube.requests(), vec![], "no request reached the API");
    assert!(kube.has_pod("kube-system", "coredns-abc"));

    // A valid alert is still acted on, and the result names what the API answered for.
    publish(&client, pod_alert("Critical", "shop", "web", None)).await;
    let r = results(&mut out, 1).await;
    assert_eq!(r[0]["outcome"], "done", "{}", r[0]);
    assert_eq!(
        (&r[0]["namespace"], &r[0]["pod"]),
        (&json!("shop"), &json!("web"))
    );
    assert_eq!(r[0]["pod_uid"], "u-web");
    responder.stop().await;
}

/// Creates the stream `FALCO` and returns options for a durable consumer on it.
async fn jetstream_responder(
    nats: &NatsServer,
    kube: &FakeKube,
    ack_wait: Duration,
    max_deliver: u32,
) -> (jetstream::Context, RespondOptions) {
    let js = jetstream::new(nats.client().await);
    js.get_or_create_stream(jetstream::stream::Config {
        name: "FALCO".into(),
        subjects: vec!["falco.*.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut opts = options(nats, kube);
    opts.subscription = Subscription::JetStream {
        stream: "FALCO".into(),
        durable: "responders".into(),
        subject: "falco.>".into(),
        ack_wait,
        max_deliver,
    };
    (js, opts)
}

async fn js_publish(js: &jetstream::Context, payload: Vec<u8>) {
    js.publish(
        "falco.critical.drop_and_execute_new_binary_in_container",
        payload.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Item 12: a DELETE answered 500 is not acknowledged as done: JetStream
/// delivers the alert again (with a back-off) until it succeeds, and after
/// the last delivery it is terminated with one `failed` decision.
#[tokio::test]
async fn transient_failures_are_retried_then_terminated() {
    let Scene {
        nats,
        kube,
        client: _client,
        mut out,
    } = Scene::start().await;
    kube.add_pod("shop", "web", "u-web", Some("ReplicaSet"));
    kube.add_pod("shop", "api", "u-api", Some("ReplicaSet"));
    let (js, opts) = jetstream_responder(&nats, &kube, Duration::from_secs(5), 3).await;
    let responder = Responder::start(opts).await;

    // Two failures, then the API recovers: the third delivery deletes.
    kube.fail_next("DELETE", 500, 2);
    js_publish(&js, pod_alert("Critical", "shop", "web", None)).await;
    let r = results(&mut out, 1).await;
    assert_eq!(r[0]["outcome"], "done", "{}", r[0]);
    assert_quiet(&mut out, Duration::from_millis(300)).await;
    let statuses: Vec<u16> = kube.deletes().iter().map(|d| d.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    assert!(!kube.has_pod("shop", "web"));

    // Failing for good: three deliveries, then one final `failed` decision.
    kube.fail_next("DELETE", 500, 100);
    js_publish(&js, pod_alert("Critical", "shop", "api", None)).await;
    let r = results(&mut out, 1).await;
    assert_eq!(r[0]["outcome"], "failed", "{}", r[0]);
    assert!(
        r[0]["reason"]
            .as_str()
            .unwrap()
            .contains("delivery 3, the last"),
        "{}",
        r[0]
    );
    assert_quiet(&mut out, Duration::from_secs(2)).await;
    assert_eq!(kube.deletes().len(), 3 + 3, "no fourth delivery");
    let failed_events = kube
        .events()
        .iter()
        .filter(|e| e["reason"] == "FalcoNatsFailed")
        .count();
    assert_eq!(failed_events, 1, "one Event for the failure");
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream("FALCO")
        .await
        .unwrap()
        .get_consumer("responders")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 0, "{info:?}");
    assert_eq!(info.num_pending, 0, "{info:?}");
    responder.stop().await;
}

/// Item 13: a Kubernetes API that accepts and never answers: each call
/// times out, the responder says not ready, shutdown is prompt, and it
/// recovers when the API does.
#[tokio::test]
async fn a_hung_kubernetes_api_times_out_and_makes_the_responder_unready() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pod("shop", "web", "u-web", Some("ReplicaSet"));
    let mut opts = options(&nats, &kube);
    opts.kube_timeout = Duration::from_millis(500);
    opts.drain_timeout = Duration::from_secs(2);
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    let task = tokio::spawn(respond::run(opts, Some(listener), shutdown.clone()));
    wait_for("ready", WAIT, || async {
        http_get(http, "/readyz").await.0 == 200
    })
    .await;

    // The connection's state shows in the responder's metrics too.
    let (_, metrics) = http_get(http, "/metrics").await;
    assert_eq!(
        metric_value(&metrics, "falco_nats_nats_connected"),
        1.0,
        "{metrics}"
    );

    kube.set_latency(Duration::from_secs(3600));
    publish(&client, pod_alert("Critical", "shop", "web", None)).await;
    let r = results(&mut out, 1).await;
    assert_eq!(r[0]["outcome"], "failed", "{}", r[0]);
    assert!(
        r[0]["reason"].as_str().unwrap().contains("did not answer"),
        "{}",
        r[0]
    );
    let (code, body) = http_get(http, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("kubernetes"), "{body}");

    kube.set_latency(Duration::ZERO);
    publish(&client, pod_alert("Critical", "shop", "web", None)).await;
    assert_eq!(results(&mut out, 1).await[0]["outcome"], "done");
    assert_eq!(http_get(http, "/readyz").await.0, 200);

    // Hung again, with an alert in hand: SIGTERM is still prompt.
    kube.add_pod("shop", "api", "u-api", Some("ReplicaSet"));
    kube.set_latency(Duration::from_secs(3600));
    publish(&client, pod_alert("Critical", "shop", "api", None)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = std::time::Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the responder stops promptly")
        .unwrap()
        .unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(5));
}

/// Item 14: SIGTERM while NATS is down: the responder stops within its
/// drain timeout instead of waiting for NATS forever.
#[tokio::test]
async fn shutdown_while_nats_is_down_respects_the_drain_timeout() {
    let mut nats = NatsServer::start();
    let kube = FakeKube::start().await.unwrap();
    let mut opts = options(&nats, &kube);
    opts.drain_timeout = Duration::from_secs(1);
    let responder = Responder::start(opts).await;
    nats.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = std::time::Instant::now();
    responder.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), responder.task)
        .await
        .expect("the responder stops within its drain timeout")
        .unwrap()
        .unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(5));
}

/// Item 15: with a slow API (100 ms a call, 300 ms an alert) and a short
/// ack wait (1.5 s, while the 60 alerts take over 2 s even 8 at a time),
/// alerts do not wait in a pull buffer until JetStream redelivers them: every alert is handled
/// once, one DELETE and one Event each, even with two replicas.
#[tokio::test]
async fn jetstream_never_handles_an_alert_twice_under_a_slow_api() {
    const PODS: usize = 60;
    let Scene {
        nats,
        kube,
        client: _client,
        mut out,
    } = Scene::start().await;
    kube.add_pods("shop", "web", PODS);
    kube.set_latency(Duration::from_millis(100));
    let (js, mut opts) = jetstream_responder(&nats, &kube, Duration::from_millis(1500), 5).await;
    opts.concurrency = 4;
    for i in 0..PODS {
        js_publish(
            &js,
            pod_alert("Critical", "shop", &format!("web-{i}"), None),
        )
        .await;
    }
    let one = Responder::start(opts).await;
    let (_, mut opts) = jetstream_responder(&nats, &kube, Duration::from_millis(1500), 5).await;
    opts.concurrency = 4;
    let two = Responder::start(opts).await;
    let got = results(&mut out, PODS).await;
    assert_quiet(&mut out, Duration::from_secs(3)).await;
    assert!(got.iter().all(|r| r["outcome"] == "done"), "{got:?}");
    assert_eq!(kube.deletes().len(), PODS, "one DELETE per alert");
    assert_eq!(kube.events().len(), PODS, "one Event per alert");
    one.stop().await;
    two.stop().await;
}

/// Items 16, 17 and 19: a dry run takes no rate-limit slot; skips write no
/// Events and a DaemonSet pod is read once; a pod recreated under the same
/// name (new UID) is not a duplicate.
#[tokio::test]
async fn dry_runs_skips_and_recreated_pods_under_the_rails() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pods("shop", "dry", 5);
    kube.add_pod("shop", "db-0", "uid-1", Some("StatefulSet"));
    kube.add_pod("shop", "web", "u-web", Some("ReplicaSet"));
    kube.add_pod("shop", "agent", "u-agent", Some("DaemonSet"));
    let mut opts = options(&nats, &kube);
    opts.limits.max_actions_per_minute = 4;
    opts.policy = policy("rules:\n  - name: rehearse\n    match: {rules: [Rehearsal]}\n    dry_run: true\n    actions: [{action: delete-pod}]\n  - name: kill\n    match: {priority: '>=Critical'}\n    actions: [{action: delete-pod}]\n");
    let responder = Responder::start(opts).await;

    // Five dry runs leave the budget of four untouched.
    for i in 0..5 {
        let fields = json!({"k8s.ns.name": "shop", "k8s.pod.name": format!("dry-{i}")});
        publish(&client, alert("Critical", "Rehearsal", fields)).await;
    }
    let r = results(&mut out, 5).await;
    assert!(r.iter().all(|r| r["outcome"] == "dry_run"), "{r:?}");

    // The same pod ten times: one DELETE, one Event.
    for _ in 0..10 {
        publish(&client, pod_alert("Critical", "shop", "web", Some("u-web"))).await;
    }
    let r = results(&mut out, 10).await;
    assert_eq!(r.iter().filter(|r| r["outcome"] == "done").count(), 1);
    assert_eq!(r.iter().filter(|r| r["reason"] == "duplicate").count(), 9);
    // A DaemonSet pod ten times: read once, no Event.
    let gets_before = kube.requests().iter().filter(|(m, _)| m == "GET").count();
    for _ in 0..10 {
        publish(&client, pod_alert("Critical", "shop", "agent", None)).await;
    }
    let r = results(&mut out, 10).await;
    assert!(r.iter().all(|r| r["reason"] == "daemonset_pod"), "{r:?}");
    let gets = kube.requests().iter().filter(|(m, _)| m == "GET").count() - gets_before;
    assert_eq!(gets, 1, "the owner look-up is cached");

    // db-0 deleted, recreated by its StatefulSet with a new UID, alerted again.
    publish(
        &client,
        pod_alert("Critical", "shop", "db-0", Some("uid-1")),
    )
    .await;
    assert_eq!(results(&mut out, 1).await[0]["outcome"], "done");
    kube.add_pod("shop", "db-0", "uid-2", Some("StatefulSet"));
    publish(
        &client,
        pod_alert("Critical", "shop", "db-0", Some("uid-2")),
    )
    .await;
    let r = results(&mut out, 1).await;
    assert_eq!(
        r[0]["outcome"], "done",
        "a new pod, not a duplicate: {}",
        r[0]
    );
    assert_eq!(r[0]["pod_uid"], "uid-2");

    // One slot is left: then skips write no Event either.
    kube.add_pods("shop", "late", 2);
    publish(&client, pod_alert("Critical", "shop", "late-0", None)).await;
    publish(&client, pod_alert("Critical", "shop", "late-1", None)).await;
    let r = results(&mut out, 2).await;
    assert_eq!(r[0]["outcome"], "done", "{}", r[0]);
    assert_eq!(r[1]["reason"], "rate_limited", "{}", r[1]);
    assert_eq!(kube.deletes().len(), 4);
    let events = kube.events();
    assert_eq!(events.len(), 4, "Events only for actions: {events:?}");
    assert!(events.iter().all(|e| e["reason"] == "FalcoNatsActed"));
    responder.stop().await;
}

/// Item 20: after someone deletes the isolation NetworkPolicy, the next
/// `isolate-pod` recreates it instead of only labelling.
#[tokio::test]
async fn isolation_recreates_a_deleted_network_policy() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pod("shop", "a", "uid-a", Some("ReplicaSet"));
    kube.add_pod("shop", "b", "uid-b", Some("ReplicaSet"));
    let mut opts = options(&nats, &kube);
    opts.policy = policy("rules:\n  - name: contain\n    actions: [{action: isolate-pod}]\n");
    let responder = Responder::start(opts).await;
    publish(&client, pod_alert("Critical", "shop", "a", None)).await;
    assert_eq!(results(&mut out, 1).await[0]["outcome"], "done");
    assert_eq!(kube.network_policies().len(), 1);
    kube.remove_network_policies();
    publish(&client, pod_alert("Critical", "shop", "b", None)).await;
    assert_eq!(results(&mut out, 1).await[0]["outcome"], "done");
    assert_eq!(kube.network_policies().len(), 1, "recreated");
    responder.stop().await;
}

/// Item 21: a durable consumer deleted under the responder is recreated;
/// the responder goes on instead of exiting 0.
#[tokio::test]
async fn a_deleted_durable_consumer_is_recreated() {
    let Scene {
        nats,
        kube,
        client: _client,
        mut out,
    } = Scene::start().await;
    kube.add_pod("shop", "a", "uid-a", Some("ReplicaSet"));
    kube.add_pod("shop", "b", "uid-b", Some("ReplicaSet"));
    let (js, opts) = jetstream_responder(&nats, &kube, Duration::from_secs(5), 5).await;
    let responder = Responder::start(opts).await;
    js_publish(&js, pod_alert("Critical", "shop", "a", None)).await;
    assert_eq!(results(&mut out, 1).await[0]["outcome"], "done");
    js.get_stream("FALCO")
        .await
        .unwrap()
        .delete_consumer("responders")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!responder.task.is_finished(), "the responder goes on");
    js_publish(&js, pod_alert("Critical", "shop", "b", None)).await;
    // The recreated consumer reads the stream from its start again: the
    // first alert is a duplicate within the dedup window.
    let r = results(&mut out, 2).await;
    assert_eq!(
        (&r[0]["pod"], &r[0]["reason"]),
        (&json!("a"), &json!("duplicate"))
    );
    assert_eq!(
        (&r[1]["pod"], &r[1]["outcome"]),
        (&json!("b"), &json!("done"))
    );
    assert_eq!(kube.deletes().len(), 2);
    responder.stop().await;
}

/// Issue 9, item 6: a rule with a newline cannot forge a log line: text
/// logs quote and escape what came from the alert.
#[tokio::test]
async fn alert_text_cannot_forge_log_lines() {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pod("shop", "web", "u-web", Some("ReplicaSet"));
    let responder = Responder::start(options(&nats, &kube)).await;
    let forged = "Drop\n2026-11-25T00:00:00.000000Z  INFO falco_nats::respond::audit: response action=\"delete-pod\" outcome=\"done\" namespace=\"kube-system\" pod=\"coredns\"";
    let fields = json!({"k8s.ns.name": "shop", "k8s.pod.name": "web"});
    publish(&client, alert("Critical", forged, fields.clone())).await;
    publish(&client, alert("Warning", forged, fields)).await;
    results(&mut out, 2).await;
    responder.stop().await;
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("Drop\\n2026"),
        "the rule is logged escaped: {text}"
    );
    for line in text.lines() {
        assert!(
            !line.starts_with("2026-11-25T00:00:00.000000Z"),
            "a forged log line: {line}"
        );
    }
}

/// Issue 10, item 6: a grace period out of range is a policy error with its
/// line (`respond --check` fails), never a silent immediate kill.
#[test]
fn respond_check_refuses_an_out_of_range_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    for seconds in ["4294967296", "-1"] {
        std::fs::write(
            &path,
            format!("rules:\n  - name: a\n    actions:\n      - action: delete-pod\n        grace_period_seconds: {seconds}\n"),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_falco-nats"))
            .args(["respond", "--check"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("policy.yaml:4:") && err.contains("out of range"),
            "{err}"
        );
    }
}

/// A `log` action about a pod is reported, and writes nothing to
/// Kubernetes (no Event either).
#[tokio::test]
async fn a_log_action_writes_nothing_to_kubernetes() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pod("shop", "web", "u-web", Some("ReplicaSet"));
    let mut opts = options(&nats, &kube);
    opts.policy = policy("rules:\n  - name: watch\n    actions: [{action: log}]\n");
    let responder = Responder::start(opts).await;
    publish(&client, pod_alert("Critical", "shop", "web", None)).await;
    let r = results(&mut out, 1).await;
    assert_eq!(
        (&r[0]["action"], &r[0]["outcome"]),
        (&json!("log"), &json!("done"))
    );
    assert_eq!(r[0]["pod"], "web");
    assert_eq!(kube.requests(), vec![], "no request reached the API");
    responder.stop().await;
}

/// Signed alerts: a bridge signs, the responder verifies. Alerts published
/// with the same valid NATS credentials but unsigned, signed by another key,
/// or signed for another subject delete nothing; two trusted keys (a
/// rotation) both work.
#[tokio::test]
async fn only_alerts_signed_by_a_trusted_key_delete_pods() {
    use falco_nats::signing::{
        self, Signer, Verifier, KEY_HEADER, MSG_ID_HEADER, SIGNATURE_HEADER, SIGNED_AT_HEADER,
    };
    use std::io::Write;
    let nats = NatsServer::start_with(&["--user", "falco", "--pass", "s3cret"]);
    let url = nats.url();
    let kube = FakeKube::start().await.unwrap();
    for pod in [
        "old-key", "new-key", "unsigned", "stranger", "claimed", "moved", "short",
    ] {
        kube.add_pod("shop", pod, &format!("uid-{pod}"), Some("ReplicaSet"));
    }
    let client =
        async_nats::ConnectOptions::with_user_and_password("falco".into(), "s3cret".into())
            .connect(&url)
            .await
            .unwrap();
    let mut out = client.subscribe("falco.response.>").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let seed = dir.path().join(format!("{name}.nk"));
        let public = signing::write_new_seed(&seed).unwrap();
        let public_file = dir.path().join(format!("{name}.pub"));
        std::fs::write(&public_file, format!("{public}\n")).unwrap();
        (seed, public_file)
    };
    let (old_seed, old_pub) = key("old");
    let (new_seed, new_pub) = key("new");
    let (stranger_seed, _) = key("stranger");

    let mut opts = respond_options(&url, &kubeconfig(&kube));
    opts.nats.user = Some("falco".into());
    opts.nats.password = Some("s3cret".into());
    opts.verifier = Some(Verifier::from_files(&[old_pub, new_pub]).unwrap());
    let responder = Responder::start(opts).await;

    // Two real bridges, one per key, as during a rotation.
    for (seed, pod) in [(&old_seed, "old-key"), (&new_seed, "new-key")] {
        let seed = seed.to_str().unwrap();
        let credentials = ["--user", "falco", "--password", "s3cret"];
        let mut bridge = stdin_bridge(&url, &[&credentials[..], &["--sign-key", seed]].concat());
        let mut stdin = bridge.stdin.take().unwrap();
        stdin
            .write_all(&pod_alert("Critical", "shop", pod, None))
            .unwrap();
        stdin.write_all(b"\n").unwrap();
        drop(stdin);
        assert!(bridge.wait().unwrap().success());
    }
    // The same credentials, no trusted key.
    let subject = "falco.critical.drop_and_execute_new_binary_in_container";
    let stranger = Signer::from_file(&stranger_seed).unwrap();
    let trusted = Signer::from_file(&new_seed).unwrap();
    let now = now_ms();
    const ID: &str = "0123456789abcdef0123456789abcdef";
    let forge = |pod: &str, key: &str, signature: String| {
        let payload = pod_alert("Critical", "shop", pod, None);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(KEY_HEADER, key);
        headers.insert(SIGNATURE_HEADER, signature);
        headers.insert(SIGNED_AT_HEADER, now.to_string());
        headers.insert(MSG_ID_HEADER, ID);
        (headers, payload)
    };
    publish(&client, pod_alert("Critical", "shop", "unsigned", None)).await;
    let payload = pod_alert("Critical", "shop", "stranger", None);
    let forged = [
        forge(
            "stranger",
            stranger.public_key(),
            stranger.sign(subject, now, ID, &payload),
        ),
        // A trusted key named, with a stranger's signature.
        forge(
            "claimed",
            trusted.public_key(),
            stranger.sign(
                subject,
                now,
                ID,
                &pod_alert("Critical", "shop", "claimed", None),
            ),
        ),
        // Signed by the trusted key for a Notice, replayed as Critical.
        forge(
            "moved",
            trusted.public_key(),
            trusted.sign(
                "falco.notice.drop_and_execute_new_binary_in_container",
                now,
                ID,
                &pod_alert("Critical", "shop", "moved", None),
            ),
        ),
        forge("short", trusted.public_key(), "c2hvcnQ".into()),
    ];
    for (headers, payload) in forged {
        client
            .publish_with_headers(subject, headers, payload.into())
            .await
            .unwrap();
    }

    let mut by_pod = BTreeMap::new();
    for r in results(&mut out, 7).await {
        by_pod.insert(
            r["pod"].as_str().unwrap().to_owned(),
            (r["outcome"].clone(), r["reason"].clone()),
        );
    }
    for pod in ["old-key", "new-key"] {
        assert_eq!(by_pod[pod].0, "done", "{pod}: {:?}", by_pod[pod]);
        assert!(!kube.has_pod("shop", pod));
    }
    let expected = [
        ("unsigned", "bad_signature: the alert is not signed"),
        (
            "stranger",
            "bad_signature: the alert is signed by a key that is not trusted",
        ),
        (
            "claimed",
            "bad_signature: the signature does not match the subject, signing time, message id and payload",
        ),
        (
            "moved",
            "bad_signature: the signature does not match the subject, signing time, message id and payload",
        ),
        (
            "short",
            "bad_signature: the signature header is not 64 bytes of base64url",
        ),
    ];
    for (pod, reason) in expected {
        assert_eq!(by_pod[pod], (json!("skipped"), json!(reason)), "{pod}");
        assert!(kube.has_pod("shop", pod), "{pod} must not be deleted");
    }
    assert_eq!(kube.deletes().len(), 2);
    assert_eq!(
        responder
            .metric("falco_nats_respond_bad_signatures_total")
            .await,
        5.0
    );
    responder.stop().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Signed alerts do not replay (issue 22, item 5). A trusted alert about a
/// pod without a UID deletes it; its successor under the same name is not
/// deleted by the captured alert sent again after the responder restarted
/// (the claim lives in the shared bucket), nor under a fresh message id
/// (the id is signed); an alert signed ten minutes ago, or ten ahead, is
/// stale.
#[tokio::test]
async fn signed_alerts_do_not_replay() {
    use falco_nats::signing::{
        self, Signer, Verifier, KEY_HEADER, MSG_ID_HEADER, SIGNATURE_HEADER, SIGNED_AT_HEADER,
    };
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    let (seed, public) = signing::generate();
    let signer = Signer::from_seed(&seed).unwrap();
    let options = || {
        let mut o = super::respond::options(&nats, &kube);
        o.verifier = Some(Verifier::from_public_keys([public.as_str()]).unwrap());
        o
    };
    let subject = "falco.critical.drop_and_execute_new_binary_in_container";
    let signed = |pod: &str, at: u64, id: &str| {
        let payload = pod_alert("Critical", "shop", pod, None);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(KEY_HEADER, signer.public_key());
        headers.insert(SIGNED_AT_HEADER, at.to_string());
        headers.insert(MSG_ID_HEADER, id);
        headers.insert(SIGNATURE_HEADER, signer.sign(subject, at, id, &payload));
        (headers, payload)
    };
    let send = |(headers, payload): (async_nats::HeaderMap, Vec<u8>)| {
        let client = client.clone();
        async move {
            client
                .publish_with_headers(subject, headers, payload.into())
                .await
                .unwrap();
            client.flush().await.unwrap();
        }
    };
    kube.add_pod("shop", "reborn", "uid-1", Some("ReplicaSet"));
    let responder = Responder::start(options()).await;
    let captured = signed("reborn", now_ms(), "11111111111111111111111111111111");
    send(captured.clone()).await;
    assert_eq!(results(&mut out, 1).await[0]["outcome"], "done");
    assert!(!kube.has_pod("shop", "reborn"));
    responder.stop().await;

    // The successor, and a fresh responder (nothing in its memory).
    kube.add_pod("shop", "reborn", "uid-2", Some("ReplicaSet"));
    let responder = Responder::start(options()).await;
    send(captured.clone()).await;
    let d = &results(&mut out, 1).await[0];
    assert_eq!(
        (&d["outcome"], &d["reason"]),
        (&json!("skipped"), &json!("duplicate"))
    );
    let (mut fresh_id, payload) = captured;
    fresh_id.insert(MSG_ID_HEADER, "22222222222222222222222222222222");
    send((fresh_id, payload)).await;
    let d = &results(&mut out, 1).await[0];
    assert_eq!(d["outcome"], "skipped");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .starts_with("bad_signature: the signature does not match"),
        "{d}"
    );
    kube.add_pod("shop", "old", "uid-old", Some("ReplicaSet"));
    kube.add_pod("shop", "ahead", "uid-ahead", Some("ReplicaSet"));
    send(signed(
        "old",
        now_ms() - 600_000,
        "33333333333333333333333333333333",
    ))
    .await;
    send(signed(
        "ahead",
        now_ms() + 600_000,
        "44444444444444444444444444444444",
    ))
    .await;
    let got = results(&mut out, 2).await;
    for d in &got {
        assert_eq!(d["outcome"], "skipped", "{d}");
        assert!(
            d["reason"].as_str().unwrap().starts_with("stale: signed "),
            "{d}"
        );
    }
    assert!(got[0]["reason"]
        .as_str()
        .unwrap()
        .contains("ago, more than --max-alert-age 300s"));
    assert!(got[1]["reason"]
        .as_str()
        .unwrap()
        .contains("ahead of this responder's clock"));
    for pod in ["reborn", "old", "ahead"] {
        assert!(kube.has_pod("shop", pod), "{pod} must stay");
    }
    assert_eq!(kube.deletes().len(), 1);
    responder.stop().await;
}
