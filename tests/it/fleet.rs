//! The fleet harness's smoke run (`benches/fleet.rs` measures with it):
//! a few simulated nodes for a few seconds, in each layout, from the POST
//! to the pod's deletion on the real API server; a node that joins reaches
//! the hub with no hand edit.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::fleet::{alert_json, load, Fleet, FleetConfig, Layout, NodeClient, Observer};
use crate::support::wait_for;

const WAIT: Duration = Duration::from_secs(60);

async fn smoke(layout: Layout) {
    const NODES: usize = 3;
    const PER_NODE: u64 = 30;
    let mut fleet = Fleet::start(FleetConfig {
        layout,
        nodes: NODES,
        responders: 2,
        pods: 20,
        bin: env!("CARGO_BIN_EXE_falco-nats").into(),
    })
    .await;
    let observer = Observer::start(&fleet).await;
    let addrs: Vec<_> = fleet.nodes.iter().map(|n| n.http).collect();
    let pods = Arc::new(Mutex::new(fleet.pods.clone()));
    // A tenth Critical: a pod deleted for each.
    let (refused, _) = load(&addrs, PER_NODE, 50.0, 10, &fleet.run, Arc::clone(&pods)).await;
    assert_eq!(refused, 0, "every post taken");
    let named = fleet.pods.len() - pods.lock().unwrap().len();
    assert!(named > 0);
    wait_for("every alert in the hub's stream", WAIT, || async {
        observer.seen.stored.load(Ordering::Relaxed) >= NODES as u64 * PER_NODE
    })
    .await;
    wait_for("a pod deleted for each Critical alert", WAIT, || async {
        observer.seen.deleted.load(Ordering::Relaxed) == named as u64
            && fleet.pods_left().await == fleet.pods.len() - named
    })
    .await;
    // A node joins, and its first alert reaches the hub.
    let index = fleet.add_node().await;
    let mut client = NodeClient::new(fleet.nodes[index].http);
    let before = observer.seen.stored.load(Ordering::Relaxed);
    assert_eq!(
        client.post(alert_json("joined", "Notice", None, 1)).await,
        Ok(200)
    );
    wait_for("the new node's alert in the hub", WAIT, || async {
        observer.seen.stored.load(Ordering::Relaxed) > before
    })
    .await;
    fleet.remove_node().await;
    fleet.stop().await;
}

#[tokio::test]
async fn a_small_leaf_fleet_carries_alerts_to_deletions_and_takes_a_new_node() {
    smoke(Layout::Leaf).await;
}

#[tokio::test]
async fn a_small_direct_fleet_carries_alerts_to_deletions() {
    smoke(Layout::Direct).await;
}
