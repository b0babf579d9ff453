//! Instructions per alert, for each input into core NATS (and stdin into
//! JetStream with one acknowledgement per alert), counted by
//! valgrind's callgrind on the image's binary: a figure that repeats on a
//! noisy machine where times do not. Each path runs twice, with
//! `SMALL` and `LARGE` alerts; the difference of the two totals over the
//! difference of the alerts is the cost of one alert, start-up and shut-down
//! cancelled out. The budgets are in `benches/instruction-budget.txt`; the
//! check fails when a path costs more than 10 % over its budget.
//!
//! It needs valgrind and the image's binary (static, musl, the `dist`
//! profile: the budgets are for what users run), which `scripts/image`
//! builds and `scripts/test` runs first (`cargo test --test it
//! instructions -- --ignored`; `FALCO_NATS_BIN` measures another binary);
//! `cargo test` alone leaves it out. For profiling,
//! `INSTRUCTIONS_ONLY=<input>` runs one path and `INSTRUCTIONS_KEEP=<dir>`
//! keeps callgrind's files there for `callgrind_annotate`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;
use falco_nats::simulate::alerts::AlertFactory;

const SMALL: u64 = 300;
const LARGE: u64 = 1_500;
/// How far over its budget a path may go.
const TOLERANCE: f64 = 1.10;
const WAIT: Duration = Duration::from_secs(120);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The binary the image ships (static, musl, the `dist` profile), which the
/// budgets are for: `FALCO_NATS_BIN`, else where `scripts/image` builds it.
fn release_bin() -> PathBuf {
    let bin = std::env::var_os("FALCO_NATS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root().join("target"));
            target.join("x86_64-unknown-linux-musl/dist/falco-nats")
        });
    assert!(
        bin.is_file(),
        "{} is missing: scripts/image builds it (scripts/test runs it first)",
        bin.display()
    );
    bin
}

/// The bridge under callgrind, reading `input` (with `args`) into core
/// NATS at `url`, its counts written to `out`; `--listen off` unless
/// `args` say otherwise.
fn under_callgrind(out: &Path, url: &str, input: &str, args: &[&str]) -> Command {
    let mut c = Command::new("valgrind");
    c.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(release_bin())
        .args(["bridge", "--input", input, "-s", url])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if !args.contains(&"--listen") {
        c.args(["--listen", "off"]);
    }
    c
}

/// The total of instructions callgrind counted.
fn total(out: &Path) -> u64 {
    let text = std::fs::read_to_string(out).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no totals in {}", out.display()))
        .parse()
        .unwrap()
}

fn alerts(n: u64) -> Vec<String> {
    let mut factory = AlertFactory::new("node-i", false);
    (0..n).map(|_| factory.next_json()).collect()
}

/// Stops a bridge with SIGTERM and waits for it (callgrind writes its
/// counts as the program exits), off this runtime: the mock Falco in it
/// must go on serving while the bridge drains.
async fn terminate(child: std::process::Child) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pid = i32::try_from(child.id()).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    wait_success(child, "the bridge under callgrind").await;
}

/// Instructions of one run of `input` with `n` alerts.
async fn run(input: &str, n: u64) -> u64 {
    let nats = NatsServer::start();
    let (_client, mut sub) = nats.subscribed("falco.>").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("callgrind.out");
    let url = nats.url();
    match input {
        // JetStream: alerts from stdin, one acknowledgement each (the
        // path a server without fast batches takes), into the stream the
        // bridge makes.
        "stdin" | "jetstream" => {
            let args: &[&str] = if input == "jetstream" {
                &["--jetstream", "--fast-batch", "off"]
            } else {
                &[]
            };
            let mut child = under_callgrind(&out, &url, "stdin", args)
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let lines = alerts(n);
            let exited = tokio::task::spawn_blocking(move || {
                for line in lines {
                    writeln!(stdin, "{line}").unwrap();
                }
                drop(stdin);
                child.wait_with_output().unwrap()
            });
            receive(&mut sub, n as usize, WAIT).await;
            let out = exited.await.unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        "fifo" => {
            let fifo = dir.path().join("falco.fifo");
            let child = under_callgrind(
                &out,
                &url,
                "fifo",
                &["--create-fifo", "--fifo", fifo.to_str().unwrap()],
            )
            .spawn()
            .unwrap();
            write_fifo(&fifo, "node-i", n).await;
            receive(&mut sub, n as usize, WAIT).await;
            terminate(child).await;
        }
        "http" => {
            let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
            let child = under_callgrind(&out, &url, "http", &["--listen", &listen.to_string()])
                .spawn()
                .unwrap();
            wait_for("the bridge listening", WAIT, || async {
                tokio::net::TcpStream::connect(listen).await.is_ok()
            })
            .await;
            // Falco's way: one keep-alive connection, one alert per POST;
            // from 64 nodes, as a bridge behind a Service hears them.
            let mut conn = tokio::net::TcpStream::connect(listen).await.unwrap();
            for (i, alert) in alerts(n).into_iter().enumerate() {
                let alert = alert.replacen(
                    r#""hostname":"node-i""#,
                    &format!(r#""hostname":"node-{}""#, i % 64),
                    1,
                );
                assert!(alert.contains(&format!("node-{}", i % 64)));
                let request = format!(
                    "POST / HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{alert}",
                    alert.len()
                );
                tokio::io::AsyncWriteExt::write_all(&mut conn, request.as_bytes())
                    .await
                    .unwrap();
                assert_eq!(read_one_response(&mut conn).await, 200);
            }
            receive(&mut sub, n as usize, WAIT).await;
            terminate(child).await;
        }
        "grpc" => {
            let (falco, socket, _falco_dir) = started_falco().await;
            let mut factory = AlertFactory::new("node-i", false);
            for _ in 0..n {
                falco.push(factory.next_response());
            }
            let child = under_callgrind(
                &out,
                &url,
                "grpc",
                &["--grpc-socket", socket.to_str().unwrap()],
            )
            .spawn()
            .unwrap();
            receive(&mut sub, n as usize, WAIT).await;
            terminate(child).await;
        }
        other => panic!("no input {other}"),
    }
    if let Some(keep) = std::env::var_os("INSTRUCTIONS_KEEP") {
        let kept = Path::new(&keep).join(format!("callgrind.{input}.{n}"));
        std::fs::copy(&out, &kept).unwrap();
        eprintln!("kept {}", kept.display());
    }
    total(&out)
}

#[tokio::test]
#[ignore = "needs valgrind and the image's binary: scripts/test runs it"]
async fn instructions_per_alert_stay_within_their_budgets() {
    let budgets = budgets("instruction-budget.txt");
    let only = std::env::var("INSTRUCTIONS_ONLY").ok();
    let mut over = Vec::new();
    for (input, budget) in &budgets {
        if only.as_ref().is_some_and(|only| only != input) {
            continue;
        }
        let small = run(input, SMALL).await;
        let large = run(input, LARGE).await;
        let per_alert = large.saturating_sub(small) as f64 / (LARGE - SMALL) as f64;
        let into = if input == "jetstream" {
            "stdin -> JetStream, one ack each"
        } else {
            "-> core NATS"
        };
        eprintln!(
            "instructions per alert, {input} {into}: {per_alert:.0} (budget {budget:.0}, {:.2}x)",
            per_alert / budget
        );
        if per_alert > budget * TOLERANCE {
            over.push(format!(
                "{input}: {per_alert:.0} > {budget:.0} x {TOLERANCE}"
            ));
        }
    }
    assert!(over.is_empty(), "over budget: {over:?}");
    if only.is_some() {
        return;
    }
    assert_eq!(
        budgets.keys().map(String::as_str).collect::<Vec<_>>(),
        ["fifo", "grpc", "http", "jetstream", "stdin"],
        "a budget for every input"
    );
}
