//! A leaf node per Falco node: the bridge publishes to a small nats-server
//! beside it (a leaf node of the hub, its own JetStream domain, a local
//! stream); the hub's stream sources the leaf's. While the hub is away,
//! alerts wait on the node, and they flow on when it is back.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, External, Source};

use crate::support::*;

const TOTAL: u64 = 10_000;

#[tokio::test]
async fn alerts_wait_on_the_leaf_while_the_hub_is_down_and_arrive_once() {
    let dir = tempfile::tempdir().unwrap();
    let leafnode_port = free_port();
    let hub_conf = dir.path().join("hub.conf");
    std::fs::write(
        &hub_conf,
        format!(
            "server_name: hub\njetstream {{ domain: hub }}\nleafnodes {{ listen: \"127.0.0.1:{leafnode_port}\" }}\n"
        ),
    )
    .unwrap();
    let leaf_conf = dir.path().join("leaf.conf");
    std::fs::write(
        &leaf_conf,
        format!(
            "server_name: leaf1\njetstream {{ domain: leaf1 }}\nleafnodes {{ remotes: [ {{ url: \"nats://127.0.0.1:{leafnode_port}\" }} ] }}\n"
        ),
    )
    .unwrap();
    let mut hub = NatsServer::start_with(&["-c", hub_conf.to_str().unwrap()]);
    let leaf = NatsServer::start_with(&["-c", leaf_conf.to_str().unwrap()]);

    // The bridge publishes to the leaf: its stream FALCO lives there.
    let (falco, socket, _dir) = started_falco().await;
    let mut options = grpc_options(&socket, &leaf.url());
    options.publish.jetstream = Some(jetstream_options());
    let bridge = RunningBridge::start(options).await;

    // The hub's stream sources the leaf's, across the leaf's domain.
    let hub_js = async_nats::jetstream::new(hub.client().await);
    let all = Config {
        name: "FALCO_ALL".into(),
        sources: Some(vec![Source {
            name: "FALCO".into(),
            external: Some(External {
                api_prefix: "$JS.leaf1.API".into(),
                delivery_prefix: None,
            }),
            ..Default::default()
        }]),
        ..Default::default()
    };
    hub_js.create_stream(all.clone()).await.unwrap();

    // 10,000 alerts at 2,000 a second; the hub goes for 10 s in the middle.
    let feeding = feed(falco.feeder(), "node-l", TOTAL, 20);
    wait_for("alerts at the hub", Duration::from_secs(60), || async {
        stream_count(&hub.url(), "FALCO_ALL").await >= TOTAL / 5
    })
    .await;
    let at_the_hub = stream_count(&hub.url(), "FALCO_ALL").await;
    hub.kill();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let on_the_leaf = stream_count(&leaf.url(), "FALCO").await;
    eprintln!("{at_the_hub} alerts at the hub when it went; {on_the_leaf} on the leaf 10 s later");
    assert!(
        on_the_leaf > at_the_hub,
        "the bridge went on publishing to the leaf while the hub was away"
    );
    hub.restart();
    let back = std::time::Instant::now();
    let waiting = stream_count(&leaf.url(), "FALCO").await;
    wait_for(
        "the backlog at the hub",
        Duration::from_secs(60),
        || async { stream_count(&hub.url(), "FALCO_ALL").await >= waiting },
    )
    .await;
    eprintln!(
        "the {waiting} alerts on the leaf when the hub came back were all at the hub {:.1} s later",
        back.elapsed().as_secs_f64()
    );
    feeding.await.unwrap();
    assert_stream_holds_each_once(&leaf.url(), "FALCO", TOTAL, Duration::from_secs(60)).await;
    assert_stream_holds_each_once(&hub.url(), "FALCO_ALL", TOTAL, Duration::from_secs(120)).await;

    bridge.stop().await.unwrap();
}
