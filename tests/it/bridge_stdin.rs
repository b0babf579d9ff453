//! The stdin input end to end: lines on a real process's standard input
//! (Falco's program_output), into a real nats-server.

use std::io::Write;
use std::time::Duration;

use crate::support::*;
use falco_nats::simulate::alerts::AlertFactory;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn stdin_lines_in_alerts_out_and_eof_drains() {
    let nats = NatsServer::start();
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let mut child = stdin_bridge(&nats.url(), &["--max-line", "4096"]);
    let mut factory = AlertFactory::new("node-s", false);
    let alerts: Vec<String> = (0..300).map(|_| factory.next_json()).collect();
    let mut stdin = child.stdin.take().unwrap();
    let lines = alerts.clone();
    // Written from a thread, so this test's runtime keeps reading NATS.
    let exited = tokio::task::spawn_blocking(move || {
        for (i, alert) in lines.iter().enumerate() {
            writeln!(stdin, "{alert}").unwrap();
            if i == 10 {
                writeln!(stdin, "not json at all").unwrap();
                writeln!(stdin, "{}", "y".repeat(10_000)).unwrap();
            }
        }
        // Falco stops: end of input.
        drop(stdin);
        child.wait()
    });
    let got = receive(&mut sub, alerts.len(), WAIT).await;
    let status = exited.await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    for (alert, msg) in alerts.iter().zip(&got) {
        assert_eq!(msg.payload, alert.as_bytes());
    }
    assert_quiet(&mut sub, Duration::from_millis(300)).await;
}

/// Issue 9, item 9: SIGTERM with standard input open and quiet: the bridge
/// exits at once (not when the next line arrives), with every line it read
/// published.
#[tokio::test]
async fn stdin_exits_promptly_on_sigterm() {
    let nats = NatsServer::start();
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let mut child = stdin_bridge(&nats.url(), &[]);
    let mut stdin = child.stdin.take().unwrap();
    let mut factory = AlertFactory::new("node-s", false);
    for _ in 0..5 {
        writeln!(stdin, "{}", factory.next_json()).unwrap();
    }
    stdin.flush().unwrap();
    receive(&mut sub, 5, WAIT).await;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("the bridge did not exit within 5 s of SIGTERM with stdin open");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    drop(stdin);
}
