//! falco-nats on a NATS cluster of three (routes on loopback, JetStream R3):
//! the stream's leader killed mid-stream and again its successor, a rolling
//! restart, and responders on different servers sharing one durable consumer.

use std::time::Duration;

use crate::support::*;

const TOTAL: u64 = 20_000;

/// JetStream mode on a cluster: the bridge's stream with three replicas.
fn clustered_bridge(
    cluster: &NatsCluster,
    socket: &std::path::Path,
) -> falco_nats::bridge::BridgeOptions {
    let mut options = grpc_options(socket, &cluster.urls());
    let mut jetstream = jetstream_options();
    jetstream.replicas = Some(3);
    options.publish.jetstream = Some(jetstream);
    options
}

/// Waits until `stream` on the cluster holds at least `n` alerts.
async fn stored(cluster: &NatsCluster, n: u64) {
    let urls = cluster.urls();
    wait_for("alerts stored", Duration::from_secs(120), || async {
        stream_count(&urls, "FALCO").await >= n
    })
    .await;
}

#[tokio::test]
async fn the_leader_killed_twice_mid_stream_loses_and_doubles_nothing() {
    let mut cluster = NatsCluster::start(3);
    let (falco, socket, _dir) = started_falco().await;
    let bridge = RunningBridge::start(clustered_bridge(&cluster, &socket)).await;
    // 20,000 alerts at 2,000 a second.
    let feeding = feed(falco.feeder(), "node-c", TOTAL, 20);
    for share in [TOTAL / 4, TOTAL / 2] {
        stored(&cluster, share).await;
        let leader = cluster.leader("FALCO").await;
        eprintln!("killing the stream leader {leader} at {share}");
        cluster.named(&leader).kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.named(&leader).restart();
    }
    feeding.await.unwrap();
    assert_stream_holds_each_once(&cluster.urls(), "FALCO", TOTAL, Duration::from_secs(120)).await;
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn a_rolling_restart_loses_and_doubles_nothing() {
    let mut cluster = NatsCluster::start(3);
    let (falco, socket, _dir) = started_falco().await;
    let bridge = RunningBridge::start(clustered_bridge(&cluster, &socket)).await;
    let feeding = feed(falco.feeder(), "node-r", TOTAL, 20);
    stored(&cluster, TOTAL / 5).await;
    for i in 0..3 {
        let server = &mut cluster.servers[i];
        eprintln!("restarting n{i}");
        server.kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        server.restart();
        // The restarted server catches up before the next goes.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    feeding.await.unwrap();
    assert_stream_holds_each_once(&cluster.urls(), "FALCO", TOTAL, Duration::from_secs(120)).await;
    bridge.stop().await.unwrap();
}

/// Two responders connected to different servers share one durable
/// consumer on an R3 stream: every alert is acted on once, and the one whose
/// server dies goes on through another (the cluster told it of the others):
/// with the other responder stopped, it alone handles the second half.
#[tokio::test]
async fn responders_on_different_servers_act_once_and_survive_their_server() {
    use falco_nats::respond::{self, Subscription};
    use falco_nats::simulate::kube_api::KubeApi;
    const PODS: usize = 200;
    let mut cluster = NatsCluster::start(3);
    let kube = KubeApi::start().await.unwrap();
    kube.add_pods("shop", "web", PODS);
    // The test publishes through the servers that stay up.
    let survivors = format!("{},{}", cluster.servers[1].url(), cluster.servers[2].url());
    let js = async_nats::jetstream::new(connect_any(&survivors).await.unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "FALCO".into(),
            subjects: vec!["falco.*.*".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline, "no R3 stream");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for server in [0, 1] {
        let mut options = respond_options(&cluster.servers[server].url(), &kubeconfig(&kube));
        options.subscription = Subscription::JetStream {
            stream: "FALCO".into(),
            durable: "responders".into(),
            subject: "falco.>".into(),
            ack_wait: Duration::from_secs(5),
            max_deliver: 5,
        };
        // The kill switch and the shared budget survive a server too.
        options.control.replicas = 3;
        let stop = tokio_util::sync::CancellationToken::new();
        tasks.push(tokio::spawn(respond::run(options, None, stop.clone())));
        stops.push(stop);
    }
    kube.set_latency(Duration::from_millis(5));
    let alert = |i: usize| {
        serde_json::json!({
            "hostname": "n", "output": "o", "priority": "Critical",
            "rule": "Drop and execute new binary in container", "source": "syscall",
            "output_fields": {"k8s.ns.name": "shop", "k8s.pod.name": format!("web-{i}")},
            "tags": [], "time": "2026-11-25T00:00:00.000000000Z",
        })
        .to_string()
    };
    for i in 0..PODS {
        // As the bridge does: retried (with one message id) through a
        // leader election until the stream has it.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", i.to_string().as_str());
        let started = std::time::Instant::now();
        loop {
            let sent = js
                .publish_with_headers(
                    "falco.critical.drop_and_execute_new_binary_in_container",
                    headers.clone(),
                    alert(i).into(),
                )
                .await;
            let acked = match sent {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if acked {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "alert {i} not stored"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if i == PODS / 2 {
            // The first responder's server dies while alerts are in hand,
            // and the second responder stops: the rest is the first's alone,
            // through another server.
            cluster.servers[0].kill();
            stops[1].cancel();
        }
    }
    wait_for("every pod deleted", Duration::from_secs(90), || async {
        (0..PODS).all(|i| !kube.has_pod("shop", &format!("web-{i}")))
    })
    .await;
    let accepted: Vec<String> = kube
        .deletes()
        .iter()
        .filter(|d| d.status == 200)
        .map(|d| d.name.clone())
        .collect();
    let unique: std::collections::BTreeSet<&String> = accepted.iter().collect();
    assert_eq!(accepted.len(), PODS, "every alert acted on once");
    assert_eq!(unique.len(), PODS);
    cluster.servers[0].restart();
    for stop in &stops {
        stop.cancel();
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the responder stops")
            .unwrap()
            .unwrap();
    }
}
