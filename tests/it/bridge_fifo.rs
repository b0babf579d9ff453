//! FIFO input end to end: a real named pipe written the way Falco's
//! `file_output` writes it, the bridge, and a real nats-server.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::support::*;
use falco_nats::bridge::InputOptions;
use falco_nats::input::fifo::FifoOptions;
use falco_nats::simulate::alerts::AlertFactory;

const WAIT: Duration = Duration::from_secs(10);

/// Opens the FIFO for writing, writes `chunks` (with a pause between them),
/// and closes it, like Falco with `keep_alive: false`.
fn write_session(path: &Path, chunks: &[&[u8]]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open FIFO for writing");
    for chunk in chunks {
        f.write_all(chunk).expect("write FIFO");
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn fifo_survives_writer_reopen_oversized_and_non_json_lines() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("nats");
    let (_client, mut sub) = nats.subscribed("falco.>").await;

    let options = fifo_options(&fifo, &nats.url(), 4096);
    let bridge = RunningBridge::start_ready(options).await;

    let mut factory = AlertFactory::new("node-f", false);
    let lines: Vec<String> = (0..6).map(|_| factory.next_json() + "\n").collect();
    let oversized = format!("{{\"output\":\"{}\"}}\n", "x".repeat(10_000));
    let text_line = b"13:44:05.478445995: Critical A shell was spawned (user=root)\n";
    let writer_fifo = fifo.clone();
    let writer = std::thread::spawn(move || {
        let (half_a, half_b) = lines[5].split_at(100);
        // First Falco session: two alerts, then the writer closes.
        write_session(&writer_fifo, &[lines[0].as_bytes(), lines[1].as_bytes()]);
        // Second session: an oversized line, a text line, then good alerts.
        write_session(
            &writer_fifo,
            &[
                lines[2].as_bytes(),
                oversized.as_bytes(),
                lines[3].as_bytes(),
                text_line,
                lines[4].as_bytes(),
            ],
        );
        // Third session: one alert split across two writes.
        write_session(&writer_fifo, &[half_a.as_bytes(), half_b.as_bytes()]);
    });
    let got = receive(&mut sub, 6, WAIT).await;
    writer.join().unwrap();
    let nums: Vec<u64> = got.iter().map(|m| evt_num(&m.payload)).collect();
    assert_eq!(nums, vec![1, 2, 3, 4, 5, 6], "every good alert, in order");
    assert_quiet(&mut sub, Duration::from_millis(300)).await;

    assert_eq!(
        bridge
            .metric("falco_nats_alerts_rejected_total{reason=\"oversized\"}")
            .await,
        1.0
    );
    assert_eq!(
        bridge
            .metric("falco_nats_alerts_rejected_total{reason=\"not_json\"}")
            .await,
        1.0
    );
    assert_eq!(
        bridge.metric("falco_nats_alerts_published_total").await,
        6.0
    );
    bridge.stop().await.unwrap();
}

#[tokio::test]
async fn fifo_input_refuses_a_regular_file_and_a_missing_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-fifo");
    std::fs::write(&file, b"x").unwrap();
    for (path, create, expected) in [
        (file.clone(), true, "is not a FIFO"),
        (dir.path().join("missing"), false, "--create-fifo"),
    ] {
        let mut options = grpc_options(&path, "nats://127.0.0.1:1");
        options.input = InputOptions::Fifo(FifoOptions {
            path,
            create,
            max_line: 1024,
        });
        let bridge = RunningBridge::start(options).await;
        let err = tokio::time::timeout(WAIT, bridge.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
    }
}

/// Issue 9, item 8: SIGTERM while complete lines still sit in the line
/// reader's buffer (the queue holds one alert, JetStream is not there yet):
/// every line read is queued and published once JetStream is back within
/// the drain timeout.
#[tokio::test]
async fn sigterm_queues_every_line_already_read() {
    const TOTAL: u64 = 40;
    let mut nats = NatsServer::start_without_jetstream();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("nats");
    let mut options = fifo_options(&fifo, &nats.url(), 64 * 1024);
    options.queue_size = 1;
    options.publish.jetstream = Some(jetstream_options());
    let bridge = RunningBridge::start_ready(options).await;
    let mut factory = AlertFactory::new("node-f", false);
    let all: String = (0..TOTAL).map(|_| factory.next_json() + "\n").collect();
    let writer_fifo = fifo.clone();
    std::thread::spawn(move || write_session(&writer_fifo, &[all.as_bytes()]))
        .join()
        .unwrap();
    bridge.wait_received("fifo", 1.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The queue (of one) is full, read from the queue itself.
    assert_eq!(bridge.metric("falco_nats_queue_depth").await, 1.0);
    bridge.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.jetstream = true;
    nats.restart();
    bridge.stop().await.unwrap();
    assert_stream_holds_each_once(&nats.url(), "FALCO", TOTAL, WAIT).await;
}
