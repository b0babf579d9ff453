//! The NATS that deploy/ ships, run for real: its configuration (users,
//! permissions, inbox prefixes) from deploy/base/nats.yaml, its passwords
//! from deploy/nats-users.sh, the bridge and the responder with the
//! settings their manifests give them. Only the bridge may publish alerts,
//! only the responder results; readers and strangers are refused.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::fake_kube::KubeApi;
use crate::support::responder::Responder;
use crate::support::shipped::{self, client_as, passwords, user};
use crate::support::*;
use async_nats::ConnectOptions;
use falco_nats::bridge::InputOptions;
use falco_nats::input::http::HttpOptions;
use falco_nats::respond::Subscription;
use falco_nats::simulate::alerts::AlertFactory;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// The responder as respond.yaml runs it, on `stream`: the durable consumer,
/// user respond; once ready.
async fn shipped_responder(
    url: &str,
    kube: &KubeApi,
    stream: &str,
    pw: &std::collections::BTreeMap<String, String>,
    dir: &Path,
) -> Responder {
    let mut options = respond_options(url, &kubeconfig(kube));
    options.nats = user(url, "respond", &pw["nats-user-respond"], dir);
    options.subscription = Subscription::JetStream {
        stream: stream.into(),
        durable: "falco-nats-respond".into(),
        subject: "falco.>".into(),
        ack_wait: Duration::from_secs(30),
        max_deliver: 5,
    };
    Responder::start(options).await
}

#[tokio::test]
async fn the_shipped_nats_lets_each_user_do_its_job_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let pw = passwords();
    let (nats, _) = shipped::start_hub(dir.path(), &pw);
    let url = nats.url();

    // Nobody without a user gets in, nor with a wrong password.
    assert!(async_nats::connect(&url).await.is_err());
    assert!(
        ConnectOptions::with_user_and_password("bridge".into(), "guess".into())
            .connect(&url)
            .await
            .is_err()
    );

    let reader = client_as(&url, "reader", &pw["nats-user-reader"]).await;
    let mut seen = reader.subscribe("falco.>").await.unwrap();
    reader.flush().await.unwrap();
    // The ui, as components/ui runs it: user reader, live only.
    let ui_stop = tokio_util::sync::CancellationToken::new();
    let ui_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ui_at = ui_listener.local_addr().unwrap();
    let ui = tokio::spawn(falco_nats::ui::run(
        falco_nats::ui::UiOptions {
            nats: user(&url, "reader", &pw["nats-user-reader"], dir.path()),
            subject: "falco.>".into(),
            result_prefix: "falco.response".into(),
            stream: None,
            history: 100,
            history_age: Duration::from_secs(3600),
            token: Some(pw["falco-nats-ui-token"].clone()),
            client_buffer: 64,
        },
        Some(ui_listener),
        ui_stop.clone(),
    ));
    wait_for("the ui ready", WAIT, || async {
        http_get(ui_at, "/readyz").await.0 == 200
    })
    .await;

    let kube = KubeApi::start().await.unwrap();
    kube.add_pod("shop", "web", "u-web", Some("ReplicaSet"));
    kube.add_pod("shop", "victim", "u-victim", Some("ReplicaSet"));

    // The bridge, as the overlays run it: JetStream, user bridge.
    let mut bridge_options = grpc_options(Path::new("/unused"), &url);
    bridge_options.input = InputOptions::Http(HttpOptions {
        max_body: 64 * 1024,
        token: None,
        ..Default::default()
    });
    bridge_options.publish.jetstream = Some(jetstream_options());
    bridge_options.nats = user(&url, "bridge", &pw["nats-user-bridge"], dir.path());
    let bridge = RunningBridge::start_ready(bridge_options).await;
    // The stream exists once the bridge made it: the responder may start.
    let mut factory = AlertFactory::new("node-1", false);
    let quiet = factory.next_json();
    assert_eq!(http_post(bridge.http, &[], quiet.as_bytes()).await.0, 200);
    receive(&mut seen, 1, WAIT).await;
    wait_for("the ui to show the alert", WAIT, || async {
        let metrics = http_get(ui_at, "/metrics").await.1;
        metric_value(&metrics, "falco_nats_ui_events_total{kind=\"alert\"}") >= 1.0
    })
    .await;
    ui_stop.cancel();
    ui.await.unwrap().unwrap();

    // The responder, as respond.yaml runs it: the durable consumer, user respond.
    let responder = shipped_responder(&url, &kube, "FALCO", &pw, dir.path()).await;
    // Its decision about the first alert.
    let first = receive(&mut seen, 1, WAIT).await;
    assert!(first[0].subject.starts_with("falco.response."), "{first:?}");

    // Forgeries: an alert naming a pod from the reader and from the
    // responder; a decision from the bridge. None may reach anyone.
    let forged_alert = serde_json::json!({
        "hostname": "x", "output": "forged", "priority": "Critical",
        "rule": "Drop and execute new binary in container", "source": "syscall",
        "output_fields": {"k8s.ns.name": "shop", "k8s.pod.name": "victim"},
        "tags": [], "time": "2026-11-25T00:00:00.000000000Z",
    })
    .to_string();
    let subject = "falco.critical.drop_and_execute_new_binary_in_container";
    for (name, secret) in [
        ("reader", "nats-user-reader"),
        ("respond", "nats-user-respond"),
    ] {
        let forger = client_as(&url, name, &pw[secret]).await;
        forger
            .publish(subject, forged_alert.clone().into())
            .await
            .unwrap();
        forger.flush().await.unwrap();
    }
    let bridge_user = client_as(&url, "bridge", &pw["nats-user-bridge"]).await;
    bridge_user
        .publish("falco.response.delete_pod", "{\"forged\":true}".into())
        .await
        .unwrap();
    bridge_user.flush().await.unwrap();

    // A real alert through the bridge still deletes its pod.
    let mut real: Value = serde_json::from_str(&forged_alert).unwrap();
    real["output_fields"]["k8s.pod.name"] = "web".into();
    real["output"] = "real".into();
    assert_eq!(
        http_post(bridge.http, &[], real.to_string().as_bytes())
            .await
            .0,
        200
    );
    let got = receive(&mut seen, 2, WAIT).await;
    assert_eq!(got[0].subject.as_str(), subject);
    assert_eq!(
        serde_json::from_slice::<Value>(&got[0].payload).unwrap()["output"],
        "real"
    );
    let decision: Value = serde_json::from_slice(&got[1].payload).unwrap();
    assert_eq!(
        (&decision["pod"], &decision["outcome"]),
        (&"web".into(), &"done".into())
    );
    assert_quiet(&mut seen, Duration::from_millis(500)).await;
    assert!(
        kube.has_pod("shop", "victim"),
        "no forged alert was acted on"
    );
    assert!(!kube.has_pod("shop", "web"));

    responder.stop().await;
    bridge.stop().await.unwrap();
}

/// The leaf layout as shipped (deploy/components/leaf, issue 11): the hub's
/// nats.conf with its leaf node port, two nodes' leaf nats-servers from the
/// ConfigMap (one node name with dots), a bridge on each as the patched
/// DaemonSet runs it, and FALCO_ALL made from hub-stream.sh's config by the
/// admin user with natscli. Every alert reaches FALCO_ALL once; alerts also
/// reach a reader on the hub live; a leaf cannot publish results there.
#[tokio::test]
async fn the_shipped_leaf_layout_brings_each_nodes_alerts_to_the_hub_once() {
    const PER_NODE: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let pw = passwords();
    let (hub, leaf_port) = shipped::start_hub(dir.path(), &pw);
    let reader = client_as(&hub.url(), "reader", &pw["nats-user-reader"]).await;
    let mut live = reader.subscribe("falco.>").await.unwrap();
    reader.flush().await.unwrap();

    // The component's files: the bridge's environment and the leaf
    // container's command.
    let component = shipped::deploy().join("components/leaf");
    let patch =
        shipped::yaml_docs(&std::fs::read_to_string(component.join("falco-leaf.yaml")).unwrap());
    let containers = patch[0]["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .clone();
    let leaf_container = containers
        .iter()
        .find(|c| c["name"] == "nats-leaf")
        .unwrap();
    let bridge_env = &containers
        .iter()
        .find(|c| c["name"] == "falco-nats")
        .unwrap()["env"];
    assert_eq!(bridge_env[0]["name"], "NATS_URL");
    assert_eq!(bridge_env[0]["value"], "nats://127.0.0.1:4222");
    let command = leaf_container["command"][2].as_str().unwrap();

    let nodes = ["node-a.example", "node-b"];
    let mut leaves = Vec::new();
    let mut bridges = Vec::new();
    for node in nodes {
        // The domain as the container's command makes it from the node name.
        let domain = Command::new("sh")
            .arg("-c")
            .arg(command.replace(
                "exec nats-server --config /etc/nats-leaf/leaf.conf",
                // The child's environment, as nats-server would read it.
                "exec sh -c 'echo \"$NATS_LEAF_DOMAIN\"'",
            ))
            .env("NODE_NAME", node)
            .output()
            .unwrap();
        let domain = String::from_utf8(domain.stdout).unwrap().trim().to_owned();
        assert_eq!(domain, node.replace('.', "-"));
        let leaf = shipped::start_leaf(dir.path(), &domain, leaf_port, &pw);
        // The bridge as the overlays run it (user bridge), on the leaf.
        let mut options = grpc_options(Path::new("/unused"), &leaf.url());
        options.input = InputOptions::Http(HttpOptions {
            max_body: 64 * 1024,
            token: None,
            ..Default::default()
        });
        options.publish.jetstream = Some(jetstream_options());
        options.nats = user(&leaf.url(), "bridge", &pw["nats-user-bridge"], dir.path());
        bridges.push(RunningBridge::start_ready(options).await);
        leaves.push(leaf);
    }

    // FALCO_ALL from the script's config, made as the admin user.
    let out = Command::new(component.join("hub-stream.sh"))
        .args(nodes)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stream_file = dir.path().join("falco-all.json");
    std::fs::write(&stream_file, &out.stdout).unwrap();
    let add = Command::new(natscli())
        .args(["stream", "add", "FALCO_ALL", "--config"])
        .arg(&stream_file)
        .args(["-s", &hub.url(), "--user", "admin", "--password"])
        .arg(&pw["nats-user-admin"])
        .args(["--inbox-prefix", "_INBOX_admin"])
        .output()
        .unwrap();
    assert!(
        add.status.success(),
        "nats stream add: {}{}",
        String::from_utf8_lossy(&add.stdout),
        String::from_utf8_lossy(&add.stderr)
    );

    for (i, bridge) in bridges.iter().enumerate() {
        let mut factory = AlertFactory::new(nodes[i], false);
        for _ in 0..PER_NODE {
            let (code, _) = http_post(bridge.http, &[], factory.next_json().as_bytes()).await;
            assert_eq!(code, 200);
        }
    }
    // Live on the hub too (a reader such as tail sees them).
    receive(&mut live, 2 * PER_NODE, WAIT).await;
    // And stored at the hub once each, by (hostname, evt.num).
    let hub_client = client_as(&hub.url(), "admin", &pw["nats-user-admin"]).await;
    let js = async_nats::jetstream::new(hub_client);
    wait_for(
        "every alert in FALCO_ALL",
        Duration::from_secs(60),
        || async {
            match js.get_stream("FALCO_ALL").await {
                Ok(mut s) => {
                    s.info().await.map(|i| i.state.messages).unwrap_or(0) >= 2 * PER_NODE as u64
                }
                Err(_) => false,
            }
        },
    )
    .await;
    let stream = js.get_stream("FALCO_ALL").await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for seq in 1..=(2 * PER_NODE as u64) {
        let msg = stream.get_raw_message(seq).await.unwrap();
        let alert: Value = serde_json::from_slice(&msg.payload).unwrap();
        let key = (
            alert["hostname"].as_str().unwrap().to_owned(),
            alert["output_fields"]["evt.num"].as_u64().unwrap(),
        );
        assert!(seen.insert(key.clone()), "{key:?} twice");
    }
    assert_eq!(seen.len(), 2 * PER_NODE);
    let info = stream.cached_info();
    assert_eq!(info.state.messages, 2 * PER_NODE as u64, "nothing more");
    // Each node keeps its own alerts only: the hub sends no alert out to a
    // leaf, or every node's stream would hold every node's alerts.
    for leaf in &leaves {
        // As the bridge, the leaf server's one user.
        let bridge = client_as(&leaf.url(), "bridge", &pw["nats-user-bridge"]).await;
        let mut falco = async_nats::jetstream::new(bridge)
            .get_stream("FALCO")
            .await
            .unwrap();
        assert_eq!(falco.info().await.unwrap().state.messages, PER_NODE as u64);
    }

    // The responder as the leaf component runs it: the shipped user
    // `respond` on the hub's FALCO_ALL. A Critical alert posted on a node
    // is acted on.
    let kube = KubeApi::start().await.unwrap();
    kube.add_pod("shop", "leafy", "u-leafy", Some("ReplicaSet"));
    let responder = shipped_responder(&hub.url(), &kube, "FALCO_ALL", &pw, dir.path()).await;
    let critical = serde_json::json!({
        "hostname": nodes[1], "output": "x", "priority": "Critical",
        "rule": "Drop and execute new binary in container", "source": "syscall", "tags": [],
        "time": "2026-12-05T00:00:00.000000000Z",
        "output_fields": {"k8s.ns.name": "shop", "k8s.pod.name": "leafy", "evt.num": 99_999},
    });
    let (code, _) = http_post(bridges[1].http, &[], critical.to_string().as_bytes()).await;
    assert_eq!(code, 200);
    wait_for("the pod deleted from FALCO_ALL", WAIT, || async {
        !kube.has_pod("shop", "leafy")
    })
    .await;
    responder.stop().await;

    // What else a leaf and its clients may do on the hub: tests/it/security.rs.
    for bridge in bridges {
        bridge.stop().await.unwrap();
    }
}
