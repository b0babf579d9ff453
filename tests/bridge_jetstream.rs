//! JetStream mode and shutdown: alerts survive a nats-server restart exactly
//! once, and SIGTERM publishes everything already read before exiting 0.

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use falco_nats::simulate::alerts::AlertFactory;
use falco_nats::simulate::falco_grpc::MockFalco;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn nats_restart_in_jetstream_mode_stores_every_alert_once() {
    const TOTAL: u64 = 3000;
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("falco.sock");
    let mut falco = MockFalco::new(&socket);
    falco.start().await.unwrap();
    let falco = Arc::new(falco);

    let mut options = grpc_options(&socket, &nats.url());
    options.publish.jetstream = Some(jetstream_options());
    let bridge = RunningBridge::start(options).await;

    // Falco fires 1000 alerts a second for three seconds.
    let feeder = feed(falco.feeder(), "node-j", TOTAL, 10);
    wait_for("some alerts stored", WAIT, || async {
        bridge.metric("falco_nats_alerts_published_total").await >= 300.0
    })
    .await;
    // NATS dies mid-stream (SIGKILL) and is back after a second.
    nats.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart();
    feeder.await.unwrap();

    assert_stream_holds_each_once(&nats.url(), "FALCO", TOTAL, Duration::from_secs(60)).await;
    assert!(bridge.metric("falco_nats_nats_reconnects_total").await >= 1.0);
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn sigterm_publishes_everything_read_then_exits_zero() {
    const TOTAL: u64 = 5_000;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("falco.sock");
    let mut falco = MockFalco::new(&socket);
    falco.start().await.unwrap();
    let mut factory = AlertFactory::new("node-t", false);
    for _ in 0..TOTAL {
        falco.push(factory.next_response());
    }

    let client = nats.client().await;
    let mut sub = client.subscribe("falco.>").await.unwrap();
    client.flush().await.unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_falco-nats"))
        .args([
            "bridge",
            "--input",
            "grpc",
            "--listen",
            "off",
            "--jetstream",
            "--max-inflight",
            "512",
        ])
        .arg("--grpc-socket")
        .arg(format!("unix://{}", socket.display()))
        .args(["-s", &nats.url()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Alerts are flowing: stop the bridge now.
    receive(&mut sub, 1, WAIT).await;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");

    let left_in_falco = falco.queued() as u64;
    let read = TOTAL - left_in_falco;
    let nums = stored_nums(&nats.url(), "FALCO").await;
    let unique: BTreeSet<u64> = nums.iter().copied().collect();
    assert!(read > 0);
    assert_eq!(
        nums.len() as u64,
        read,
        "every alert read from Falco is in the stream, once"
    );
    assert_eq!(unique, (1..=read).collect());
    eprintln!("read {read} of {TOTAL} before SIGTERM; {left_in_falco} stay queued in Falco");
}
