//! falco-nats on a NATS cluster of three (routes on loopback, JetStream R3):
//! the stream's leader killed mid-stream and again its successor, a rolling
//! restart, and responders on different servers sharing one durable consumer.

use std::time::Duration;

use crate::support::*;

const TOTAL: u64 = 20_000;

/// JetStream mode on a cluster: the bridge's stream with three replicas.
fn clustered_bridge(cluster: &NatsCluster, socket: &std::path::Path) -> falco_nats::bridge::BridgeOptions {
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
