//! End-to-end benchmarks of falco-nats, each beside its baseline in the same
//! run: throughput, latency percentiles, response latency, memory and CPU of
//! the real `falco-nats` binary, against a real nats-server on this machine.
//!
//! `scripts/bench` runs it and writes docs/BENCHMARKS.md. Knobs (environment):
//! `BENCH_ALERTS` (throughput alerts per run, default 100000), `BENCH_REPS`
//! (runs per scenario, median reported, default 3), `BENCH_LATENCY_SECS`
//! (seconds per latency rate, default 5), `BENCH_BURST` (alerts in the
//! NATS-down burst, default 1000000), `BENCH_OUT` (the Markdown file),
//! `BENCH_ONLY` (throughput scenarios whose name contains it; `a|b` for either),
//! `BENCH_THROUGHPUT_ONLY` / `BENCH_LATENCY_ONLY` (one section, printed, not
//! written). The bridge reads its own flags' variables too, e.g.
//! `FALCO_NATS_THREADS=1`.

// The tests' harness, of which the benchmark uses the nats-server part.
#[path = "../tests/it/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use falco_nats::convert::event_from_response;
use falco_nats::proto::outputs::Response;
use falco_nats::simulate::alerts::AlertFactory;
use falco_nats::simulate::falco_grpc::MockFalco;
use falco_nats::simulate::kube_api::KubeApi;
use futures_util::StreamExt;
use support::{cpu_seconds_of, free_port, NatsCluster, NatsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_falco-nats");

/// Everything after this line of docs/BENCHMARKS.md is written by hand and kept.
const ANALYSIS_MARKER: &str = "<!-- analysis: written by hand, kept by scripts/bench -->";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The falco-nats binary as a child process, killed on drop.
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(args: &[String]) -> Self {
        let child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start falco-nats");
        Proc { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak and current resident set size in KiB.
    fn rss_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// User plus system CPU seconds so far.
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(&format!("/proc/{}/stat", self.pid()))
    }

    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Counts messages on `falco.>` and notes when the first and last arrived.
struct Counter {
    count: Arc<AtomicU64>,
    first: Arc<Mutex<Option<Instant>>>,
    last: Arc<Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Counter {
    async fn start(url: &str, subject: &str) -> Self {
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(1 << 20)
            .connect(url)
            .await
            .unwrap();
        let mut sub = client.subscribe(subject.to_owned()).await.unwrap();
        client.flush().await.unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let first = Arc::new(Mutex::new(None));
        let last = Arc::new(Mutex::new(None));
        let (c, f, l) = (count.clone(), first.clone(), last.clone());
        let task = tokio::spawn(async move {
            let _client = client;
            while sub.next().await.is_some() {
                let now = Instant::now();
                if c.fetch_add(1, Ordering::Relaxed) == 0 {
                    *f.lock().unwrap() = Some(now);
                }
                *l.lock().unwrap() = Some(now);
            }
        });
        Counter {
            count,
            first,
            last,
            task,
        }
    }

    /// Counts by `read`ing a total every 2 ms (`None`: not readable yet),
    /// noting when it first moved and when it last grew.
    fn polled<F, Fut>(mut read: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Option<u64>> + Send,
    {
        let count = Arc::new(AtomicU64::new(0));
        let first = Arc::new(Mutex::new(None));
        let last = Arc::new(Mutex::new(None));
        let (c, f, l) = (count.clone(), first.clone(), last.clone());
        let task = tokio::spawn(async move {
            loop {
                if let Some(n) = read().await {
                    let now = Instant::now();
                    let before = c.swap(n, Ordering::Relaxed);
                    if before == 0 && n > 0 {
                        *f.lock().unwrap() = Some(now);
                    }
                    if n > before {
                        *l.lock().unwrap() = Some(now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        Counter {
            count,
            first,
            last,
            task,
        }
    }

    /// Counts what `stream` stores, from its state: for JetStream rows,
    /// with no subscriber taking CPU from the publisher and the server.
    /// (The stream is looked up until it exists.)
    async fn stream(url: &str, stream: &str) -> Self {
        let client = support::connect_any(url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let name = stream.to_owned();
        Counter::polled(move || {
            let (js, name) = (js.clone(), name.clone());
            async move {
                let mut s = js.get_stream(&name).await.ok()?;
                Some(s.info().await.ok()?.state.messages)
            }
        })
    }

    /// Counts the messages the server took in (`in_msgs` of its `/varz`
    /// on `monitor`, less what it had at the start): for core rows, with no
    /// subscriber taking CPU from the publisher and the server.
    async fn varz(monitor: u16) -> Self {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{monitor}").parse().unwrap();
        let in_msgs = move || async move {
            let (_, body) = support::http_get(addr, "/varz").await;
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["in_msgs"]
                .as_u64()
                .unwrap()
        };
        let base = in_msgs().await;
        Counter::polled(move || async move { Some(in_msgs().await - base) })
    }

    /// For core NATS the server's own count when it has a `monitor` port,
    /// else a subscriber on `falco.>`; the stream `stream`'s state for
    /// JetStream.
    async fn for_mode(url: &str, monitor: Option<u16>, mode: Mode, stream: &str) -> Self {
        match mode {
            Mode::Core => match monitor {
                Some(monitor) => Counter::varz(monitor).await,
                None => Counter::start(url, "falco.>").await,
            },
            Mode::JetStream | Mode::JetStreamEach | Mode::JetStreamR3 => {
                Counter::stream(url, stream).await
            }
        }
    }

    /// Waits for `n` messages; the rate between the first and the last.
    async fn rate(&self, n: u64, timeout: Duration) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        while self.count.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                eprintln!(
                    "  timed out at {} of {n}",
                    self.count.load(Ordering::Relaxed)
                );
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let first = (*self.first.lock().unwrap())?;
        let last = (*self.last.lock().unwrap())?;
        Some((n - 1) as f64 / last.duration_since(first).as_secs_f64())
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Pre-made alerts: gRPC responses and their JSON lines.
struct Corpus {
    responses: Vec<Response>,
    lines: Vec<Bytes>,
    /// Each line's subject and headers as the bridge publishes it: the
    /// floors publish the same messages (subject, headers, payload).
    messages: Vec<(String, async_nats::HeaderMap)>,
}

impl Corpus {
    fn new(n: u64) -> Self {
        let mut factory = AlertFactory::new("bench-node", false);
        let responses: Vec<Response> = (0..n).map(|_| factory.next_response()).collect();
        let events: Vec<_> = responses
            .iter()
            .map(|r| event_from_response(r.clone()).unwrap())
            .collect();
        let template = falco_nats::nats::SubjectTemplate::default();
        let messages = events
            .iter()
            .map(|e| {
                let subject = template.render(e);
                let headers = falco_nats::nats::alert_headers(e, &subject, None);
                (subject, headers)
            })
            .collect();
        let lines = events.into_iter().map(|e| e.payload).collect();
        Corpus {
            responses,
            lines,
            messages,
        }
    }

    fn mean_size(&self) -> usize {
        self.lines.iter().map(|l| l.len()).sum::<usize>() / self.lines.len().max(1)
    }
}

/// How the bridge publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Core,
    /// JetStream, in fast batches where the server has them (the default).
    JetStream,
    /// JetStream, one acknowledgement per alert (`--fast-batch off`).
    JetStreamEach,
    /// JetStream on a cluster of three, the stream replicated (`--replicas 3`).
    JetStreamR3,
}

fn bridge_args(input: &str, extra: &[&str], url: &str, mode: Mode) -> Vec<String> {
    let mut args: Vec<String> = ["bridge", "--input", input, "-s", url]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if mode != Mode::Core {
        args.extend(
            [
                "--jetstream",
                "--duplicate-window",
                "10s",
                "--stream-max-age",
                "1h",
            ]
            .map(String::from),
        );
    }
    if mode == Mode::JetStreamEach {
        args.extend(["--fast-batch", "off"].map(String::from));
    }
    if mode == Mode::JetStreamR3 {
        args.extend(["--replicas", "3"].map(String::from));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// One throughput measurement: alerts/s and the bridge's CPU seconds.
struct Run {
    rate: f64,
    cpu: f64,
}

/// The JetStream ceiling: a plain publisher of the same messages (subject,
/// headers with their `Nats-Msg-Id`, payload) to a stream like the
/// bridge's, acknowledged, at most `inflight` awaiting their ack; alone on
/// a single-threaded runtime, as the bridge runs.
async fn jetstream_ceiling(
    url: &str,
    corpus: &Corpus,
    inflight: usize,
    replicas: usize,
) -> Option<Run> {
    use futures_util::stream::FuturesUnordered;
    let counter = Counter::stream(url, "CEILING").await;
    {
        let js = async_nats::jetstream::new(support::connect_any(url).await.unwrap());
        let config = async_nats::jetstream::stream::Config {
            name: "CEILING".into(),
            subjects: vec!["falco.>".into()],
            duplicate_window: Duration::from_secs(120),
            num_replicas: replicas,
            ..Default::default()
        };
        // A new cluster elects its JetStream leader first: retry for a while.
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = js.get_or_create_stream(config.clone()).await {
            assert!(Instant::now() < deadline, "cannot create the stream: {e}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let n = corpus.lines.len() as u64;
    let (lines, messages, url) = (
        corpus.lines.clone(),
        corpus.messages.clone(),
        url.to_owned(),
    );
    let cpu0 = process_cpu();
    alone(move || async move {
        let client = support::connect_any(&url).await.unwrap();
        let js = async_nats::jetstream::ContextBuilder::new()
            .max_ack_inflight(inflight)
            .build(client);
        let mut acks = FuturesUnordered::new();
        for (line, (subject, headers)) in lines.into_iter().zip(messages) {
            let ack = js
                .publish_with_headers(subject, headers, line)
                .await
                .unwrap();
            acks.push(std::future::IntoFuture::into_future(ack));
            while acks.len() >= inflight {
                acks.next().await;
            }
        }
        while acks.next().await.is_some() {}
    })
    .await;
    let rate = counter.rate(n, Duration::from_secs(120)).await?;
    Some(Run {
        rate,
        cpu: process_cpu() - cpu0,
    })
}

/// Runs a floor's publishing loop alone, on a thread of its own with a
/// single-threaded runtime (as the bridge runs, `--threads 1`); what
/// counts the messages stays on the benchmark's runtime.
async fn alone<F, Fut>(publish: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(publish())
    })
    .await
    .unwrap();
}

/// The fast batch ceiling: the same alerts through the bridge's own fast
/// batch publisher (at most `window` unconfirmed), fed from a queue filled
/// before the clock starts: no input and no parsing in the timed part.
async fn jetstream_fast_ceiling(url: &str, corpus: &Corpus, window: usize) -> Option<Run> {
    use falco_nats::event::FalcoEvent;
    use falco_nats::nats::fast_batch::BatchOutcome;
    use falco_nats::nats::{FastBatches, SubjectTemplate};
    struct Count;
    impl BatchOutcome for Count {
        fn stored(&mut self, _: &FalcoEvent) {}
        fn denied(&self, _: &str) -> bool {
            false
        }
        fn dropped(&mut self, _: FalcoEvent, _: String) {}
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(corpus.lines.len() + 1);
    for line in &corpus.lines {
        tx.try_send(FalcoEvent::from_json(line.clone()).unwrap())
            .unwrap();
    }
    drop(tx);
    let template: SubjectTemplate = "falco.{priority}.{rule}".parse().unwrap();
    let counter = Counter::stream(url, "CEILING").await;
    let client = async_nats::connect(url).await.unwrap();
    async_nats::jetstream::new(client.clone())
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "CEILING".into(),
            subjects: vec!["falco.>".into()],
            duplicate_window: Duration::from_secs(120),
            allow_batch_publish: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batches = FastBatches::new(client, Duration::from_secs(5), None)
        .await
        .unwrap();
    let cpu0 = process_cpu();
    let mut taken = 0;
    if let Err(e) = batches
        .run(&template, &mut rx, window, &mut Count, &mut taken)
        .await
    {
        eprintln!(
            "  fast batch failed ({}); is the server older than 2.14?",
            e.error
        );
        return None;
    }
    let rate = counter.rate(taken, Duration::from_secs(120)).await?;
    Some(Run {
        rate,
        cpu: process_cpu() - cpu0,
    })
}

/// The core ceiling: a plain publisher of the same messages (subject,
/// headers, payload), alone on a single-threaded runtime; with
/// `flush_each`, the 2018 proof of concept's flush after every alert.
async fn ceiling(
    url: &str,
    monitor: Option<u16>,
    corpus: &Corpus,
    flush_each: bool,
) -> Option<Run> {
    let counter = Counter::for_mode(url, monitor, Mode::Core, "").await;
    let n = corpus.lines.len() as u64;
    let (lines, messages, url) = (
        corpus.lines.clone(),
        corpus.messages.clone(),
        url.to_owned(),
    );
    let cpu0 = process_cpu();
    alone(move || async move {
        let client = async_nats::connect(url).await.unwrap();
        for (line, (subject, headers)) in lines.into_iter().zip(messages) {
            client
                .publish_with_headers(subject, headers, line)
                .await
                .unwrap();
            if flush_each {
                client.flush().await.unwrap();
            }
        }
        client.flush().await.unwrap();
    })
    .await;
    let rate = counter.rate(n, Duration::from_secs(120)).await?;
    Some(Run {
        rate,
        cpu: process_cpu() - cpu0,
    })
}

/// CPU seconds of this (the benchmark's) process.
fn process_cpu() -> f64 {
    cpu_seconds_of("/proc/self/stat")
}

async fn bridge_grpc(
    url: &str,
    monitor: Option<u16>,
    corpus: &Corpus,
    mode: Mode,
    dir: &Path,
) -> Option<Run> {
    let socket = dir.join(format!("falco-{}.sock", free_port()));
    let mut falco = MockFalco::new(&socket);
    falco.start().await.unwrap();
    for r in &corpus.responses {
        falco.push(r.clone());
    }
    let counter = Counter::for_mode(url, monitor, mode, "FALCO").await;
    let sock = format!("unix://{}", socket.display());
    let bridge = Proc::spawn(&bridge_args(
        "grpc",
        &["--grpc-socket", &sock, "--listen", "off"],
        url,
        mode,
    ));
    let rate = counter
        .rate(corpus.responses.len() as u64, Duration::from_secs(300))
        .await;
    let cpu = bridge.cpu_seconds();
    bridge.stop();
    falco.stop().await;
    Some(Run { rate: rate?, cpu })
}

/// Starts a bridge reading a FIFO it creates in `dir`; returns once the FIFO is there.
async fn spawn_fifo_bridge(url: &str, mode: Mode, dir: &Path) -> (Proc, PathBuf) {
    let fifo = dir.join(format!("fifo-{}", free_port()));
    let path = fifo.display().to_string();
    let bridge = Proc::spawn(&bridge_args(
        "fifo",
        &["-f", &path, "--create-fifo", "--listen", "off"],
        url,
        mode,
    ));
    while !fifo.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (bridge, fifo)
}

async fn bridge_fifo(
    url: &str,
    monitor: Option<u16>,
    corpus: &Corpus,
    mode: Mode,
    dir: &Path,
) -> Option<Run> {
    let counter = Counter::for_mode(url, monitor, mode, "FALCO").await;
    let (bridge, fifo) = spawn_fifo_bridge(url, mode, dir).await;
    let lines = corpus.lines.clone();
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        let mut buf = Vec::with_capacity(64 * 1024);
        for line in &lines {
            buf.extend_from_slice(line);
            buf.push(b'\n');
            if buf.len() >= 60 * 1024 {
                f.write_all(&buf).unwrap();
                buf.clear();
            }
        }
        f.write_all(&buf).unwrap();
    });
    let rate = counter
        .rate(corpus.lines.len() as u64, Duration::from_secs(300))
        .await;
    let _ = writer.join();
    let cpu = bridge.cpu_seconds();
    bridge.stop();
    Some(Run { rate: rate?, cpu })
}

/// Runs `work` on a runtime of its own (as many threads as `BENCH_NULL_THREADS`,
/// default 2) on a thread of its own.
fn on_own_runtime<F>(work: F) -> std::thread::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let threads = env_num("BENCH_NULL_THREADS", 2) as usize;
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .unwrap()
            .block_on(work)
    })
}

/// The HTTP transport alone: the same clients posting to an axum server (on
/// a runtime of its own) that counts each POST and
/// answers at once. What receiving one alert per request costs before the
/// bridge does anything with it.
async fn null_http(corpus: &Corpus, connections: usize) -> Option<Run> {
    use axum::routing::post;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let stamps: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let (c, s) = (count.clone(), stamps.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let server = on_own_runtime(async move {
        let app = axum::Router::new().route(
            "/",
            post(move |_body: Bytes| {
                let (c, s) = (c.clone(), s.clone());
                async move {
                    let now = Instant::now();
                    if let Ok(mut s) = s.lock() {
                        s.0.get_or_insert(now);
                        s.1 = Some(now);
                    }
                    c.fetch_add(1, Ordering::Relaxed);
                    "queued\n"
                }
            }),
        );
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stopped.cancelled_owned())
            .await;
    });
    let cpu0 = process_cpu();
    let tasks = post_spread(addr, corpus, connections);
    for t in tasks {
        let _ = t.await;
    }
    let cpu = process_cpu() - cpu0;
    stop.cancel();
    let _ = server.join();
    let (first, last) = *stamps.lock().unwrap();
    let secs = last?.duration_since(first?).as_secs_f64();
    Some(Run {
        rate: count.load(Ordering::Relaxed) as f64 / secs,
        cpu,
    })
}

/// Falco's gRPC stream alone: the mock Falco's queue drained by one `get`
/// call on a runtime of its own, each alert decoded and dropped.
async fn null_grpc(corpus: &Corpus, dir: &Path) -> Option<Run> {
    use falco_nats::proto::outputs::service_client::ServiceClient;
    use falco_nats::proto::outputs::Request;
    let socket = dir.join(format!("null-{}.sock", free_port()));
    let mut falco = MockFalco::new(&socket);
    falco.start().await.unwrap();
    for r in &corpus.responses {
        falco.push(r.clone());
    }
    let total = corpus.responses.len() as u64;
    let cpu0 = process_cpu();
    let client = on_own_runtime(async move {
        let channel = tonic::transport::Endpoint::from_static("http://falco.sock")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = socket.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .unwrap();
        let mut client = ServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let mut stream = client.get(Request {}).await.unwrap().into_inner();
        let (mut n, mut first, mut last) = (0u64, None, None);
        while let Ok(Some(_response)) = stream.message().await {
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            n += 1;
            if n == total {
                break;
            }
        }
        (n, first, last)
    });
    let (n, first, last) = tokio::task::spawn_blocking(move || client.join().unwrap())
        .await
        .unwrap();
    let cpu = process_cpu() - cpu0;
    falco.stop().await;
    let secs = last?.duration_since(first?).as_secs_f64();
    Some(Run {
        rate: n as f64 / secs,
        cpu,
    })
}

/// A keep-alive connection to the bridge's HTTP input.
async fn http_connect(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let stream = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    stream.set_nodelay(true).unwrap();
    stream
}

/// Posts one alert and waits for the answer, as Falco's http_output does.
async fn post_one(stream: &mut tokio::net::TcpStream, line: &[u8], buf: &mut [u8]) {
    let head = format!(
        "POST / HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        line.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(line).await.unwrap();
    // A response is small and ends with its body ("queued\n").
    let mut got = Vec::new();
    loop {
        let n = stream.read(buf).await.unwrap();
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
        if got.ends_with(b"queued\n") {
            break;
        }
        assert!(
            !got.starts_with(b"HTTP/1.1 4") && !got.starts_with(b"HTTP/1.1 5"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
}

/// Posts the corpus over `connections` connections, each with its share.
fn post_spread(
    addr: std::net::SocketAddr,
    corpus: &Corpus,
    connections: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..connections)
        .map(|c| {
            let share: Vec<Bytes> = corpus
                .lines
                .iter()
                .skip(c)
                .step_by(connections)
                .cloned()
                .collect();
            tokio::spawn(post_all(addr, share))
        })
        .collect()
}

/// Posts `lines` on one keep-alive connection, each waiting for its answer.
async fn post_all(addr: std::net::SocketAddr, lines: Vec<Bytes>) {
    let mut stream = http_connect(addr).await;
    let mut buf = vec![0u8; 4096];
    for line in lines {
        post_one(&mut stream, &line, &mut buf).await;
    }
}

async fn bridge_http(
    url: &str,
    monitor: Option<u16>,
    corpus: &Corpus,
    mode: Mode,
    connections: usize,
) -> Option<Run> {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let counter = Counter::for_mode(url, monitor, mode, "FALCO").await;
    let bridge = Proc::spawn(&bridge_args("http", &["--listen", &listen], url, mode));
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let tasks = post_spread(addr, corpus, connections);
    let rate = counter
        .rate(corpus.lines.len() as u64, Duration::from_secs(300))
        .await;
    for t in tasks {
        let _ = t.await;
    }
    let cpu = bridge.cpu_seconds();
    bridge.stop();
    Some(Run { rate: rate?, cpu })
}

/// `evt.num` from a payload, by a plain search (no JSON parse on the hot path).
fn evt_num(payload: &[u8]) -> Option<u64> {
    let key = b"\"evt.num\":";
    let pos = memchr::memmem::find(payload, key)? + key.len();
    let digits: Vec<u8> = payload[pos..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Latencies (µs) from emitting alert n to a subscriber receiving it.
struct LatencyProbe {
    base: Instant,
    emitted: Arc<Vec<AtomicU64>>,
    received: Arc<Vec<AtomicU64>>,
    task: tokio::task::JoinHandle<()>,
}

impl LatencyProbe {
    async fn start(url: &str, n: usize) -> Self {
        let base = Instant::now();
        let emitted: Arc<Vec<AtomicU64>> = Arc::new((0..=n).map(|_| AtomicU64::new(0)).collect());
        let received: Arc<Vec<AtomicU64>> = Arc::new((0..=n).map(|_| AtomicU64::new(0)).collect());
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(1 << 20)
            .connect(url)
            .await
            .unwrap();
        let mut sub = client.subscribe("falco.>").await.unwrap();
        client.flush().await.unwrap();
        let rec = received.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Some(m) = sub.next().await {
                let at = base.elapsed().as_nanos() as u64;
                if let Some(i) = evt_num(&m.payload) {
                    if let Some(slot) = rec.get(i as usize) {
                        slot.store(at, Ordering::Relaxed);
                    }
                }
            }
        });
        LatencyProbe {
            base,
            emitted,
            received,
            task,
        }
    }

    fn emit(&self, n: u64) {
        if let Some(slot) = self.emitted.get(n as usize) {
            slot.store(self.base.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// The percentiles of alerts 1..=total emitted at `rate`.
    fn row(&self, what: &'static str, rate: u64, total: u64, rss_peak: Option<u64>) -> LatencyRow {
        let (lat, missing) = self.latencies_after(total, 0);
        LatencyRow {
            rate,
            what,
            p50: percentile(&lat, 50.0),
            p99: percentile(&lat, 99.0),
            p999: percentile(&lat, 99.9),
            p99_steady: percentile(&self.latencies_after(total, rate).0, 99.0),
            missing,
            rss_peak,
        }
    }

    /// Like `latencies`, for the alerts after the first `skip`.
    fn latencies_after(&self, n: u64, skip: u64) -> (Vec<f64>, u64) {
        let mut out = Vec::new();
        let mut missing = 0;
        for i in (skip as usize + 1)..=n as usize {
            let (e, r) = (
                self.emitted[i].load(Ordering::Relaxed),
                self.received[i].load(Ordering::Relaxed),
            );
            if r == 0 || e == 0 {
                missing += 1;
            } else {
                out.push(r.saturating_sub(e) as f64 / 1000.0);
            }
        }
        out.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (out, missing)
    }
}

impl Drop for LatencyProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Paces `total` emissions at `rate` per second in 1 ms batches.
async fn paced(rate: u64, total: u64, mut emit: impl FnMut(u64)) {
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        while sent < due {
            sent += 1;
            emit(sent);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct LatencyRow {
    rate: u64,
    what: &'static str,
    p50: f64,
    p99: f64,
    p999: f64,
    /// p99 of the alerts after the first second.
    p99_steady: f64,
    missing: u64,
    rss_peak: Option<u64>,
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

/// JetStream beside its floors: each bridge row against the plain publisher
/// of its own mode (fast batches, or one acknowledgement each), and every
/// row as a fraction of the core NATS ceiling.
fn jetstream_table(md: &mut String, results: &HashMap<&str, (Vec<f64>, Vec<f64>)>) {
    let rate = |t: Throughput| results.get(t.name()).map(|r| median(r.0.clone()));
    let Some(core) = rate(Throughput::Ceiling) else {
        return;
    };
    let _ = writeln!(md, "\n### JetStream beside its floors\n\n| scenario | alerts/s | floor | vs floor | vs core ceiling |\n| --- | ---: | --- | ---: | ---: |");
    let rows = [
        (Throughput::JetStreamCeiling, Throughput::JetStreamCeiling),
        (
            Throughput::BridgeFifo(Mode::JetStreamEach),
            Throughput::JetStreamCeiling,
        ),
        (
            Throughput::JetStreamFastCeiling,
            Throughput::JetStreamCeiling,
        ),
        (
            Throughput::BridgeFifo(Mode::JetStream),
            Throughput::JetStreamCeiling,
        ),
        (
            Throughput::BridgeFifo(Mode::JetStream),
            Throughput::JetStreamFastCeiling,
        ),
        (Throughput::JetStreamCeilingR3, Throughput::JetStreamCeiling),
        (
            Throughput::BridgeFifo(Mode::JetStreamR3),
            Throughput::JetStreamCeilingR3,
        ),
    ];
    for (t, floor) in rows {
        if let (Some(r), Some(f)) = (rate(t), rate(floor)) {
            let _ = writeln!(
                md,
                "| {} | {r:.0} | {} | {:.2}x | {:.2}x |",
                t.name(),
                floor.name(),
                r / f,
                r / core
            );
        }
    }
}

/// The throughput scenarios, in the order of the table.
#[derive(Debug, Clone, Copy)]
enum Throughput {
    Ceiling,
    JetStreamCeiling,
    FlushEach,
    GrpcTransport,
    HttpTransport,
    JetStreamFastCeiling,
    /// The plain JetStream publisher on a cluster of three, R3.
    JetStreamCeilingR3,
    BridgeGrpc(Mode),
    BridgeFifo(Mode),
    BridgeHttp(Mode),
}

impl Throughput {
    const ALL: [Throughput; 15] = [
        Throughput::Ceiling,
        Throughput::JetStreamCeiling,
        Throughput::JetStreamFastCeiling,
        Throughput::FlushEach,
        Throughput::GrpcTransport,
        Throughput::HttpTransport,
        Throughput::BridgeGrpc(Mode::Core),
        Throughput::BridgeFifo(Mode::Core),
        Throughput::BridgeHttp(Mode::Core),
        Throughput::BridgeGrpc(Mode::JetStream),
        Throughput::BridgeFifo(Mode::JetStream),
        Throughput::BridgeFifo(Mode::JetStreamEach),
        Throughput::BridgeHttp(Mode::JetStream),
        Throughput::JetStreamCeilingR3,
        Throughput::BridgeFifo(Mode::JetStreamR3),
    ];

    fn name(&self) -> &'static str {
        match self {
            Throughput::Ceiling => "plain publisher (ceiling)",
            Throughput::JetStreamCeiling => "plain JetStream publisher (256 in flight, an id each)",
            Throughput::FlushEach => "flush after every alert (2018 PoC)",
            Throughput::GrpcTransport => "gRPC transport alone (get, decode, drop)",
            Throughput::HttpTransport => "HTTP transport alone (4 connections, null receiver)",
            Throughput::JetStreamFastCeiling => "plain JetStream fast batches (256 unconfirmed)",
            Throughput::BridgeGrpc(Mode::Core) => "bridge gRPC, core",
            Throughput::BridgeFifo(Mode::Core) => "bridge FIFO, core",
            Throughput::BridgeHttp(Mode::Core) => "bridge HTTP (4 connections), core",
            Throughput::BridgeGrpc(_) => "bridge gRPC, JetStream",
            Throughput::BridgeFifo(Mode::JetStream) => "bridge FIFO, JetStream",
            Throughput::BridgeFifo(Mode::JetStreamEach) => "bridge FIFO, JetStream, one ack each",
            Throughput::JetStreamCeilingR3 => {
                "plain JetStream publisher, R3 on a cluster of three (256 in flight)"
            }
            Throughput::BridgeFifo(Mode::JetStreamR3) => {
                "bridge FIFO, JetStream R3 on a cluster of three"
            }
            Throughput::BridgeHttp(_) => "bridge HTTP (4 connections), JetStream",
        }
    }

    /// One run against the nats-server at `url` (its monitoring port
    /// `monitor`), in the working dir `dir`.
    async fn run(&self, url: &str, monitor: u16, corpus: &Corpus, dir: &Path) -> Option<Run> {
        let monitor = Some(monitor);
        match *self {
            Throughput::Ceiling => ceiling(url, monitor, corpus, false).await,
            Throughput::JetStreamCeiling => jetstream_ceiling(url, corpus, 256, 1).await,
            Throughput::JetStreamCeilingR3 => {
                let cluster = NatsCluster::start(3);
                jetstream_ceiling(&cluster.urls(), corpus, 256, 3).await
            }
            Throughput::BridgeFifo(Mode::JetStreamR3) => {
                let cluster = NatsCluster::start(3);
                bridge_fifo(&cluster.urls(), None, corpus, Mode::JetStreamR3, dir).await
            }
            Throughput::FlushEach => ceiling(url, monitor, corpus, true).await,
            Throughput::GrpcTransport => null_grpc(corpus, dir).await,
            Throughput::HttpTransport => null_http(corpus, 4).await,
            Throughput::JetStreamFastCeiling => jetstream_fast_ceiling(url, corpus, 256).await,
            Throughput::BridgeGrpc(mode) => bridge_grpc(url, monitor, corpus, mode, dir).await,
            Throughput::BridgeFifo(mode) => bridge_fifo(url, monitor, corpus, mode, dir).await,
            Throughput::BridgeHttp(mode) => bridge_http(url, monitor, corpus, mode, 4).await,
        }
    }
}

async fn run() {
    let alerts = env_num("BENCH_ALERTS", 100_000);
    let reps = env_num("BENCH_REPS", 3) as usize;
    let latency_secs = env_num("BENCH_LATENCY_SECS", 5);
    let burst = env_num("BENCH_BURST", 1_000_000);
    let out_path = std::env::var("BENCH_OUT").map(PathBuf::from).ok();
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus::new(alerts);
    eprintln!(
        "{} alerts of {} bytes on average",
        alerts,
        corpus.mean_size()
    );

    let mut md = String::new();
    let _ = writeln!(md, "{}", header(alerts, reps, corpus.mean_size()));

    // Throughput.
    let d = dir.path().to_owned();
    let mut results: HashMap<&str, (Vec<f64>, Vec<f64>)> = HashMap::new();
    // Rounds interleave the scenarios, so drift on the machine hits all alike.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let latency_only = std::env::var("BENCH_LATENCY_ONLY").is_ok();
    for round in (0..reps).filter(|_| !latency_only) {
        for scenario in Throughput::ALL
            .iter()
            .filter(|s| only.split('|').any(|o| s.name().contains(o)))
        {
            let name = scenario.name();
            let monitor = free_port();
            let nats = NatsServer::start_on(free_port(), &["-m", &monitor.to_string()]);
            eprintln!("round {} {name}", round + 1);
            if let Some(run) = scenario.run(&nats.url(), monitor, &corpus, &d).await {
                let e = results.entry(name).or_default();
                e.0.push(run.rate);
                e.1.push(run.cpu);
                eprintln!("  {:.0} alerts/s, {:.2} CPU s", run.rate, run.cpu);
            }
        }
    }
    let ceiling_rate = median(
        results
            .get("plain publisher (ceiling)")
            .map(|r| r.0.clone())
            .unwrap_or_default(),
    );
    let flush_rate = median(
        results
            .get("flush after every alert (2018 PoC)")
            .map(|r| r.0.clone())
            .unwrap_or_default(),
    );
    let _ = writeln!(md, "## Throughput\n\n{alerts} alerts per run, {reps} runs per row interleaved, median shown. Rate from the first to the last message counted, with no subscriber: core rows count at the server (`in_msgs` of its `/varz`), JetStream rows at the stream (its state); both polled every 2 ms. CPU: the bridge process's user+system seconds per 100k alerts (for the baselines: the benchmark process).\n");
    let _ = writeln!(md, "| scenario | alerts/s | vs ceiling | vs flush-per-alert | CPU s / 100k alerts |\n| --- | ---: | ---: | ---: | ---: |");
    for name in Throughput::ALL.iter().map(Throughput::name) {
        if let Some((rates, cpus)) = results.get(name) {
            let rate = median(rates.clone());
            let cpu = median(cpus.clone()) / alerts as f64 * 100_000.0;
            let _ = writeln!(
                md,
                "| {name} | {rate:.0} | {:.0} % | {:.1}x | {cpu:.2} |",
                rate / ceiling_rate * 100.0,
                rate / flush_rate
            );
        }
    }

    jetstream_table(&mut md, &results);

    if std::env::var("BENCH_THROUGHPUT_ONLY").is_ok() {
        print!("{md}");
        return;
    }

    // Latency.
    let _ = writeln!(md, "\n## Latency\n\nFrom the simulated Falco queueing an alert (or, for the baseline, a publisher publishing it) to a subscriber receiving it; core NATS; {latency_secs} s per rate, emitted in 1 ms batches. Peak RSS is the bridge's.\n");
    let _ = writeln!(md, "| rate (alerts/s) | path | p50 (µs) | p99 (µs) | p99.9 (µs) | p99 after 1st s (µs) | lost | bridge peak RSS |\n| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for rate in [1_000u64, 10_000, 50_000] {
        let nats = NatsServer::start();
        for row in [
            latency_publisher(&nats.url(), rate, latency_secs).await,
            latency_bridge(&nats.url(), rate, latency_secs, dir.path()).await,
            latency_fifo(&nats.url(), rate, latency_secs, dir.path()).await,
            latency_http(&nats.url(), rate, latency_secs).await,
        ] {
            let rss = row
                .rss_peak
                .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {rss} |",
                row.rate, row.what, row.p50, row.p99, row.p999, row.p99_steady, row.missing
            );
            eprintln!(
                "latency {} {}: p50 {:.0} p99 {:.0} p99.9 {:.0} µs",
                row.rate, row.what, row.p50, row.p99, row.p999
            );
        }
    }

    if latency_only {
        print!("{md}");
        return;
    }

    // Response latency.
    let (p50, p99, n) = response_latency(dir.path()).await;
    let _ = writeln!(md, "\n## Response latency\n\nFrom the simulated Falco queueing a Critical alert to the Kubernetes API stand-in receiving the DELETE for its pod: gRPC → bridge → NATS → respond → API, {n} alerts for {n} pods at 50 alerts/s.\n\n| p50 (ms) | p99 (ms) |\n| ---: | ---: |\n| {p50:.2} | {p99:.2} |");

    // Memory.
    let (idle_peak, idle_rss) = idle_memory(dir.path()).await;
    let (burst_peak, burst_rss, burst_arrived, burst_read) = burst_memory(dir.path(), burst).await;
    let _ = writeln!(md, "\n## Memory\n\nResident set size of the bridge process (gRPC input, core NATS, default `--queue-size 1024`).\n\n| state | peak RSS | RSS |\n| --- | ---: | ---: |");
    let _ = writeln!(
        md,
        "| idle, connected | {:.1} MiB | {:.1} MiB |",
        idle_peak as f64 / 1024.0,
        idle_rss as f64 / 1024.0
    );
    let _ = writeln!(
        md,
        "| burst of {burst} alerts with NATS down | {:.1} MiB | {:.1} MiB |",
        burst_peak as f64 / 1024.0,
        burst_rss as f64 / 1024.0
    );
    let _ = writeln!(md, "\nDuring the burst the bridge read {burst_read} alerts from Falco and then stopped reading (its queue and the NATS client's buffer were full); the rest stayed queued in Falco. Once NATS was started, {burst_arrived} of {burst} arrived.");

    print!("{md}");
    if let Some(path) = out_path {
        // Keep the hand-written reading of the figures, after the marker.
        let kept = std::fs::read_to_string(&path)
            .ok()
            .and_then(|old| old.find(ANALYSIS_MARKER).map(|i| old[i..].to_owned()));
        if let Some(kept) = kept {
            md.push('\n');
            md.push_str(&kept);
        }
        std::fs::write(&path, &md).unwrap();
        eprintln!("wrote {}", path.display());
    }
}

/// The names of the clients connected to a server, from its monitoring endpoint.
async fn connection_names(monitor_port: u16) -> Vec<String> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{monitor_port}").parse().unwrap();
    let (_, body) = support::http_get(addr, "/connz").await;
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v["connections"].as_array().map(|cs| {
                cs.iter()
                    .filter_map(|c| c["name"].as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn header(alerts: u64, reps: usize, size: usize) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let nats = Command::new(support::nats_server_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "# falco-nats benchmarks\n\nMeasured {date} on {cores} cores ({cpu}), {nats}, release build. Everything runs on this one machine: nats-server, the bridge (the real binary, as its own process), and the benchmark process holding the simulated Falco and the subscribers. {alerts} alerts per throughput run, {reps} runs, about {size} bytes of JSON per alert.\n\nReproduce: `scripts/bench` (or `cargo bench --bench pipeline`; knobs in `benches/pipeline.rs`).\n"
    )
}

async fn latency_publisher(url: &str, rate: u64, secs: u64) -> LatencyRow {
    let total = rate * secs;
    let probe = LatencyProbe::start(url, total as usize).await;
    let client = async_nats::connect(url).await.unwrap();
    let mut factory = AlertFactory::new("bench-node", false);
    let lines: Vec<Bytes> = (0..total)
        .map(|_| Bytes::from(factory.next_json()))
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        while sent < due {
            sent += 1;
            probe.emit(sent);
            client
                .publish("falco.notice.bench", lines[(sent - 1) as usize].clone())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    probe.row("plain publisher (baseline)", rate, total, None)
}

async fn latency_bridge(url: &str, rate: u64, secs: u64, dir: &Path) -> LatencyRow {
    let total = rate * secs;
    let socket = dir.join(format!("lat-{}.sock", free_port()));
    let mut falco = MockFalco::new(&socket);
    falco.start().await.unwrap();
    let probe = LatencyProbe::start(url, total as usize).await;
    let sock = format!("unix://{}", socket.display());
    let bridge = Proc::spawn(&bridge_args(
        "grpc",
        &["--grpc-socket", &sock, "--listen", "off"],
        url,
        Mode::Core,
    ));
    // Let the bridge connect and settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut factory = AlertFactory::new("bench-node", false);
    let responses: Vec<Response> = (0..total).map(|_| factory.next_response()).collect();
    paced(rate, total, |n| {
        probe.emit(n);
        falco.push(responses[(n - 1) as usize].clone());
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (peak, _) = bridge.rss_kib();
    bridge.stop();
    falco.stop().await;
    probe.row("bridge, gRPC input", rate, total, Some(peak))
}

/// Latency over the FIFO input: Falco's `file_output` writing each alert as
/// one line into the named pipe.
async fn latency_fifo(url: &str, rate: u64, secs: u64, dir: &Path) -> LatencyRow {
    let total = rate * secs;
    let probe = LatencyProbe::start(url, total as usize).await;
    let (bridge, fifo) = spawn_fifo_bridge(url, Mode::Core, dir).await;
    let mut pipe = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut factory = AlertFactory::new("bench-node", false);
    let lines: Vec<Vec<u8>> = (0..total)
        .map(|_| {
            let mut l = factory.next_json().into_bytes();
            l.push(b'\n');
            l
        })
        .collect();
    paced(rate, total, |n| {
        probe.emit(n);
        pipe.write_all(&lines[(n - 1) as usize]).unwrap();
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (peak, _) = bridge.rss_kib();
    bridge.stop();
    probe.row("bridge, FIFO input", rate, total, Some(peak))
}

/// Latency over the HTTP input: one keep-alive connection posting alerts in
/// order, one at a time, as Falco's `http_output` does; the time an alert
/// waits for the previous POST counts.
async fn latency_http(url: &str, rate: u64, secs: u64) -> LatencyRow {
    let total = rate * secs;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let probe = LatencyProbe::start(url, total as usize).await;
    let bridge = Proc::spawn(&bridge_args(
        "http",
        &["--listen", &listen],
        url,
        Mode::Core,
    ));
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let poster = tokio::spawn(async move {
        let mut stream = http_connect(addr).await;
        let mut buf = vec![0u8; 4096];
        while let Some(line) = rx.recv().await {
            post_one(&mut stream, &line, &mut buf).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut factory = AlertFactory::new("bench-node", false);
    let lines: Vec<Bytes> = (0..total)
        .map(|_| Bytes::from(factory.next_json()))
        .collect();
    paced(rate, total, |n| {
        probe.emit(n);
        let _ = tx.send(lines[(n - 1) as usize].clone());
    })
    .await;
    drop(tx);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (peak, _) = bridge.rss_kib();
    poster.abort();
    bridge.stop();
    probe.row("bridge, HTTP input (1 connection)", rate, total, Some(peak))
}

async fn response_latency(dir: &Path) -> (f64, f64, usize) {
    const PODS: usize = 300;
    let nats = NatsServer::start();
    let kube = KubeApi::start().await.unwrap();
    kube.add_pods("shop", "web", PODS);
    let kubeconfig = dir.join("bench-kubeconfig");
    kube.write_kubeconfig(&kubeconfig).unwrap();
    let socket = dir.join(format!("resp-{}.sock", free_port()));
    let mut falco = MockFalco::new(&socket);
    falco.start().await.unwrap();
    let url = nats.url();
    let sock = format!("unix://{}", socket.display());
    let bridge = Proc::spawn(&bridge_args(
        "grpc",
        &["--grpc-socket", &sock, "--listen", "off"],
        &url,
        Mode::Core,
    ));
    let kc = kubeconfig.display().to_string();
    let respond = Proc::spawn(
        &[
            "respond",
            "-s",
            &url,
            "--kubeconfig",
            &kc,
            "--max-actions-per-minute",
            "100000",
            "--listen",
            "off",
        ]
        .map(String::from),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let template = AlertFactory::new("bench-node", false).next_response();
    let emitted: Mutex<HashMap<String, Instant>> = Mutex::new(HashMap::new());
    paced(50, PODS as u64, |n| {
        let i = n - 1;
        let mut r = template.clone();
        r.priority = 2; // Critical
        r.output_fields.insert("k8s.ns.name".into(), "shop".into());
        r.output_fields
            .insert("k8s.pod.name".into(), format!("web-{i}"));
        r.output_fields
            .insert("k8s.pod.uid".into(), format!("uid-{i}"));
        r.output_fields.insert("evt.num".into(), n.to_string());
        emitted
            .lock()
            .unwrap()
            .insert(format!("web-{i}"), Instant::now());
        falco.push(r);
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let emitted = emitted.into_inner().unwrap();
    let mut lat: Vec<f64> = kube
        .deletes()
        .iter()
        .filter_map(|d| {
            emitted
                .get(&d.name)
                .map(|e| d.at.duration_since(*e).as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    bridge.stop();
    respond.stop();
    falco.stop().await;
    (percentile(&lat, 50.0), percentile(&lat, 99.0), lat.len())
}

async fn idle_memory(dir: &Path) -> (u64, u64) {
    let nats = NatsServer::start();
    let socket = dir.join(format!("idle-{}.sock", free_port()));
    let mut falco = MockFalco::new(&socket);
    falco.start().await.unwrap();
    let sock = format!("unix://{}", socket.display());
    let bridge = Proc::spawn(
        &bridge_args("grpc", &["--grpc-socket", &sock], &nats.url(), Mode::Core)
            .into_iter()
            .chain(["--listen".into(), "off".into()])
            .collect::<Vec<_>>(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = bridge.rss_kib();
    bridge.stop();
    falco.stop().await;
    rss
}

/// A burst with NATS down: peak RSS, RSS, alerts that arrived once NATS came
/// up, and how many the bridge had read from Falco while NATS was down.
async fn burst_memory(dir: &Path, burst: u64) -> (u64, u64, u64, u64) {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let socket = dir.join(format!("burst-{}.sock", free_port()));
    let mut falco = MockFalco::new(&socket);
    falco.start().await.unwrap();
    // JSON-output alerts: the line is in `output`, with few fields.
    let mut factory = AlertFactory::new("bench-node", true);
    for _ in 0..burst {
        let mut r = factory.next_response();
        r.output_fields.clear();
        falco.push(r);
    }
    let sock = format!("unix://{}", socket.display());
    let bridge = Proc::spawn(&bridge_args(
        "grpc",
        &["--grpc-socket", &sock, "--listen", "off"],
        &url,
        Mode::Core,
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (peak, rss) = bridge.rss_kib();
    let read = burst - falco.queued() as u64;
    // NATS comes up on the address the bridge keeps trying; a subscriber
    // connects at once and counts the alerts. It must be there before the
    // bridge reconnects, or it misses some: the monitoring endpoint says.
    let monitor = free_port();
    let nats = NatsServer::start_on(port, &["-m", &monitor.to_string()]);
    let counter = Counter::start(&url, "falco.>").await;
    let bridge_first = connection_names(monitor)
        .await
        .iter()
        .any(|n| n == "falco-nats");
    assert!(
        !bridge_first,
        "the bridge reconnected before the counting subscriber: run again"
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut arrived = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = counter.count.load(Ordering::Relaxed);
        if now >= burst || (now == arrived && now > 0) {
            arrived = now;
            break;
        }
        arrived = now;
    }
    drop(nats);
    let (peak_after, _) = bridge.rss_kib();
    bridge.stop();
    falco.stop().await;
    (peak.max(peak_after), rss, arrived, read)
}
