//! The HTTP input beside a minimal C server: `wrk` posts the same Falco
//! alert (one alert a request, keep-alive, as Falco's http_output does) to
//! the release `falco-nats bridge --input http` publishing to core NATS,
//! and to nginx answering 200 to the same POSTs (one worker, as the bridge
//! runs one thread), on 1 and 4 connections, interleaved rounds, median.
//!
//! Needs `wrk` and `nginx` (Debian's; `scripts/bench-http` installs them).
//! Knobs: `BENCH_HTTP_SECS` (seconds a run, default 5), `BENCH_REPS`
//! (rounds, default 3). Prints a Markdown table.

// The tests' harness, of which the benchmark uses the nats-server part.
#[path = "../tests/it/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, NatsServer};

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
struct Wrk {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
}

/// A latency as wrk prints it (`812.00us`, `1.23ms`, `2.00s`) in microseconds.
fn micros(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

/// Parses wrk's `--latency` report.
fn parse(report: &str) -> Option<Wrk> {
    let mut rate = None;
    let (mut p50, mut p99) = (None, None);
    for line in report.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", r] => rate = r.parse().ok(),
            ["50%", v] => p50 = micros(v),
            ["99%", v] => p99 = micros(v),
            _ => {}
        }
    }
    Some(Wrk {
        rate: rate?,
        p50_us: p50?,
        p99_us: p99?,
    })
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs wrk against `port` with `connections`, POSTing the body in `script`.
fn wrk(port: u16, connections: u32, secs: u64, script: &Path) -> Wrk {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("wrk (apt-get install wrk)");
    let report = String::from_utf8_lossy(&out.stdout);
    let non_2xx = report.contains("Non-2xx");
    assert!(!non_2xx, "every POST answered 2xx:\n{report}");
    parse(&report).unwrap_or_else(|| panic!("cannot read wrk's report:\n{report}"))
}

struct Stop(Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nginx(dir: &Path, port: u16) -> Stop {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\nerror_log stderr error;\npid {dir}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {dir}/body;\n\
               server {{ listen 127.0.0.1:{port}; location / {{ return 200; }} }} }}\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    let child =
        Command::new(std::env::var("NGINX_BIN").unwrap_or_else(|_| "/usr/sbin/nginx".into()))
            .args(["-c"])
            .arg(&conf)
            .args(["-p"])
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx-light)");
    wait_port(port);
    Stop(child)
}

fn bridge(bin: &Path, port: u16, nats: &str) -> Stop {
    let child = Command::new(bin)
        .args([
            "bridge",
            "--input",
            "http",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "-s",
            nats,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("the falco-nats binary");
    wait_port(port);
    Stop(child)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let secs: u64 = std::env::var("BENCH_HTTP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/falco-nats");
    assert!(
        bin.exists(),
        "build it first: cargo build --release --bin falco-nats"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut factory = falco_nats::simulate::alerts::AlertFactory::new("bench-node", false);
    let alert = factory.next_json();
    let script = dir.path().join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = {}\n",
            serde_json::to_string(&alert).unwrap()
        ),
    )
    .unwrap();
    eprintln!(
        "one alert of {} bytes a POST, {secs} s a run, {reps} rounds",
        alert.len()
    );
    let nats = NatsServer::start();
    let mut rows: Vec<(String, u32, Vec<Wrk>)> = Vec::new();
    for round in 0..reps {
        for connections in [1u32, 4] {
            for server in ["nginx (return 200)", "bridge HTTP, core NATS"] {
                let port = free_port();
                let _running = if server.starts_with("nginx") {
                    nginx(dir.path(), port)
                } else {
                    bridge(&bin, port, &nats.url())
                };
                let w = wrk(port, connections, secs, &script);
                eprintln!(
                    "round {} {server}, {connections} connection(s): {:.0} req/s, p50 {:.0} us, p99 {:.0} us",
                    round + 1,
                    w.rate,
                    w.p50_us,
                    w.p99_us
                );
                match rows
                    .iter_mut()
                    .find(|(s, c, _)| s == server && *c == connections)
                {
                    Some((_, _, runs)) => runs.push(w),
                    None => rows.push((server.to_owned(), connections, vec![w])),
                }
            }
        }
    }
    println!("| server | connections | requests/s | vs nginx | p50 µs | p99 µs | p99 vs nginx |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for connections in [1u32, 4] {
        let of = |name: &str| {
            rows.iter()
                .find(|(s, c, _)| s.starts_with(name) && *c == connections)
                .map(|(_, _, runs)| {
                    (
                        median(runs.iter().map(|w| w.rate).collect()),
                        median(runs.iter().map(|w| w.p50_us).collect()),
                        median(runs.iter().map(|w| w.p99_us).collect()),
                    )
                })
                .unwrap()
        };
        let (nginx_rate, _, nginx_p99) = of("nginx");
        for name in ["nginx", "bridge"] {
            let (rate, p50, p99) = of(name);
            let full = &rows.iter().find(|(s, _, _)| s.starts_with(name)).unwrap().0;
            println!(
                "| {full} | {connections} | {rate:.0} | {:.2}x | {p50:.0} | {p99:.0} | {:.2}x |",
                rate / nginx_rate,
                p99 / nginx_p99
            );
        }
    }
}
