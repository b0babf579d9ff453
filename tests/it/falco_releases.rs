//! Alerts as Falco 0.44 and 0.45 write what a hostile container controls
//! (its command line and file names: terminal escapes, CR LF and a forged
//! line, DEL and C1 controls, invalid UTF-8), through every input. Each
//! alert arrives once and whole: the JSON inputs forward the line Falco
//! wrote byte for byte, the gRPC input writes the same fields. (Subjects and
//! headers come from the rule, priority, host and source, which hold none
//! of it; `nats::headers` and the subject's tests keep those clean.)

use std::io::Write;
use std::time::Duration;

use crate::support::*;
use falco_nats::bridge::InputOptions;
use falco_nats::input::http::HttpOptions;
use falco_nats::simulate::alerts::{AlertFactory, FalcoRelease, UNTRUSTED_BYTES};

const WAIT: Duration = Duration::from_secs(10);
const RELEASES: [FalcoRelease; 2] = [FalcoRelease::V044, FalcoRelease::V045];
/// Two rounds of the simulator's rules: every rule, with and without a
/// file name.
const ALERTS: usize = 14;

fn factory(release: FalcoRelease) -> AlertFactory {
    AlertFactory::new("node-untrusted", false).with_untrusted_strings(release)
}

fn lines(release: FalcoRelease) -> Vec<String> {
    let mut factory = factory(release);
    (0..ALERTS).map(|_| factory.next_json()).collect()
}

/// The alerts arrive in order, each exactly the line Falco wrote, and
/// nothing more; the untrusted text is in them as that release renders it.
async fn assert_forwarded(
    release: FalcoRelease,
    sent: &[String],
    sub: &mut async_nats::Subscriber,
) {
    let got = receive(sub, sent.len(), WAIT).await;
    assert_quiet(sub, Duration::from_millis(200)).await;
    let tail = release.field_value(UNTRUSTED_BYTES);
    for (line, msg) in sent.iter().zip(&got) {
        assert_eq!(msg.payload, line.as_bytes(), "{release:?}");
        let alert: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        if let Some(cmdline) = alert["output_fields"]["proc.cmdline"].as_str() {
            assert!(cmdline.ends_with(&tail), "{release:?}: {cmdline:?}");
            assert!(alert["output"].as_str().unwrap().contains(&tail));
        }
    }
}

#[tokio::test]
async fn stdin_carries_both_releases_alerts_whole() {
    for release in RELEASES {
        let nats = NatsServer::start();
        let (_client, mut sub) = nats.subscribed("falco.>").await;
        let mut child = stdin_bridge(&nats.url(), &[]);
        let sent = lines(release);
        let mut stdin = child.stdin.take().unwrap();
        let input = sent.clone();
        let exited = tokio::task::spawn_blocking(move || {
            for line in &input {
                writeln!(stdin, "{line}").unwrap();
            }
            drop(stdin);
            child.wait()
        });
        assert_forwarded(release, &sent, &mut sub).await;
        assert!(exited.await.unwrap().unwrap().success());
    }
}

#[tokio::test]
async fn fifo_carries_both_releases_alerts_whole() {
    for release in RELEASES {
        let nats = NatsServer::start();
        let (_client, mut sub) = nats.subscribed("falco.>").await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("falco.pipe");
        let bridge = RunningBridge::start(fifo_options(&path, &nats.url(), 64 * 1024)).await;
        wait_for("the FIFO", WAIT, || async { path.exists() }).await;
        let sent = lines(release);
        let mut text = sent.join("\n");
        text.push('\n');
        let fifo = path.clone();
        tokio::task::spawn_blocking(move || {
            let mut f = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        })
        .await
        .unwrap();
        assert_forwarded(release, &sent, &mut sub).await;
        bridge.stop().await.unwrap();
    }
}

#[tokio::test]
async fn http_carries_both_releases_alerts_whole() {
    for release in RELEASES {
        let nats = NatsServer::start();
        let (_client, mut sub) = nats.subscribed("falco.>").await;
        let mut options = grpc_options(std::path::Path::new("/unused"), &nats.url());
        options.input = InputOptions::Http(HttpOptions::default());
        let bridge = RunningBridge::start_ready(options).await;
        let sent = lines(release);
        for line in &sent {
            // Falco's http_output: one alert a request, as JSON.
            let (status, body) = http_post(
                bridge.http,
                &[("Content-Type", "application/json")],
                line.as_bytes(),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
        assert_forwarded(release, &sent, &mut sub).await;
        bridge.stop().await.unwrap();
    }
}

/// Falco's gRPC output ended with 0.43, whose libs replaced control
/// characters as 0.44's do; the 0.45 strings are tested too, as a gRPC
/// peer may send them. The bridge writes the JSON from the fields: the same
/// strings come back out of it.
#[tokio::test]
async fn grpc_carries_both_releases_strings_whole() {
    for release in RELEASES {
        let nats = NatsServer::start();
        let (falco, socket, _dir) = started_falco().await;
        let (_client, mut sub) = nats.subscribed("falco.>").await;
        let mut factory = factory(release);
        let sent: Vec<_> = (0..ALERTS).map(|_| factory.next_response()).collect();
        for alert in &sent {
            falco.push(alert.clone());
        }
        let bridge = RunningBridge::start(grpc_options(&socket, &nats.url())).await;
        let got = receive(&mut sub, ALERTS, WAIT).await;
        for (alert, msg) in sent.iter().zip(&got) {
            let json: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
            assert_eq!(json["output"], alert.output.as_str(), "{release:?}");
            for (key, value) in &alert.output_fields {
                // evt.num and other numbers are typed in Falco's JSON.
                let written = &json["output_fields"][key];
                let text = written
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| written.to_string());
                assert_eq!(&text, value, "{release:?} {key}");
            }
        }
        assert_quiet(&mut sub, Duration::from_millis(200)).await;
        bridge.stop().await.unwrap();
    }
}

/// `simulate --hostile-strings` writes those alerts for anyone's consumer
/// to try, and names the releases it knows when given another.
#[tokio::test]
async fn the_simulator_writes_them_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("falco.pipe");
    let simulate = |release: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_falco-nats"))
            .args([
                "simulate", "--output", "fifo", "--rate", "0", "--count", "7",
            ])
            .arg("--fifo")
            .arg(&fifo)
            .args(["--hostile-strings", release])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let refused = simulate("0.46").wait_with_output().unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Falco 0.44 and 0.45"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    for release in RELEASES {
        let child = simulate(if release == FalcoRelease::V044 {
            "0.44"
        } else {
            "0.45"
        });
        wait_for("the FIFO", WAIT, || async { fifo.exists() }).await;
        let path = fifo.clone();
        // The simulator keeps the FIFO open after its count, as Falco
        // would; it stops on SIGTERM.
        let lines = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let reader = std::io::BufReader::new(std::fs::File::open(path).unwrap());
            reader
                .lines()
                .take(7)
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        assert!(child.wait_with_output().unwrap().status.success());
        let tail = release.field_value(UNTRUSTED_BYTES);
        assert_eq!(lines.len(), 7);
        for line in lines {
            let alert: serde_json::Value = serde_json::from_str(&line).unwrap();
            if let Some(cmdline) = alert["output_fields"]["proc.cmdline"].as_str() {
                assert!(cmdline.ends_with(&tail), "{release:?}: {cmdline:?}");
            }
        }
        std::fs::remove_file(&fifo).unwrap();
    }
}
