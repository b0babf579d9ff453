//! Test harness: a real `nats-server` per test, the bridge in-process, and
//! small helpers to subscribe and scrape. Shared by the integration tests.

#[allow(unused_imports)]
pub use falco_nats::simulate::kube_api as fake_kube;

pub mod fleet;
pub mod manifests;
pub mod real_kube;
pub mod responder;
pub mod shipped;
pub mod tls;
pub mod ui;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::Subscriber;
use futures_util::StreamExt;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use falco_nats::bridge::{self, BridgeError, BridgeOptions, InputOptions};
use falco_nats::input::grpc::{GrpcMethod, GrpcOptions};
use falco_nats::nats::{NatsOptions, PublishOptions, SubjectTemplate};
use falco_nats::priority::Priority;

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// The nats-server the tests run: `NATS_SERVER_BIN` if set (scripts/test
/// sets it to Debian's 2.9 for a second run of the bridge tests), else the
/// pinned current release scripts/install-deps builds into
/// `target/tools/bin`, else one on the PATH or Debian's place.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/nats-server");
    if built.is_file() {
        return built;
    }
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
        .expect("nats-server not found: run scripts/install-deps (or scripts/test)")
}

/// The (major, minor) version of [`nats_server_bin`], from `--version`.
pub fn nats_server_version() -> (u32, u32) {
    let out = std::process::Command::new(nats_server_bin())
        .arg("--version")
        .output()
        .expect("nats-server --version");
    let text = String::from_utf8_lossy(&out.stdout);
    // "nats-server: v2.15.2"
    let v = text.trim().rsplit('v').next().unwrap_or_default();
    let mut parts = v.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The nats CLI (natscli) scripts/install-deps builds: `NATS_CLI_BIN`, else
/// `target/tools/bin/nats`.
pub fn natscli() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_CLI_BIN") {
        return PathBuf::from(p);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/nats");
    assert!(
        built.is_file(),
        "natscli not found: run scripts/install-deps (or scripts/test)"
    );
    built
}

/// A real nats-server with JetStream, on its own port and store, killed on drop.
pub struct NatsServer {
    pub port: u16,
    store: TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// Started with `-js` (the default).
    pub jetstream: bool,
    /// Environment of the server process (a configuration's `$VARIABLES`).
    pub env: Vec<(String, String)>,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra arguments (e.g. `-c config`).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_on(free_port(), extra)
    }

    /// Starts on `port` with extra arguments.
    pub fn start_on(port: u16, extra: &[&str]) -> Self {
        Self::start_with_env(port, extra, &[])
    }

    /// Starts on `port` with extra arguments and environment variables.
    pub fn start_with_env(port: u16, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut server = NatsServer {
            port,
            store: tempfile::tempdir().expect("temp dir"),
            child: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            jetstream: true,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        server.spawn();
        server
    }

    /// A server without JetStream (until [`Self::restart`] after setting
    /// `jetstream`).
    pub fn start_without_jetstream() -> Self {
        let mut server = NatsServer {
            port: free_port(),
            store: tempfile::tempdir().expect("temp dir"),
            child: None,
            extra_args: Vec::new(),
            jetstream: false,
            env: Vec::new(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut command = Command::new(nats_server_bin());
        command.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if self.jetstream {
            command.arg("-js");
        }
        let child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("-sd")
            .arg(self.store.path())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("NATS_TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("cannot start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs (the fleet benchmark's).
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL: nothing is flushed to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to test nats-server")
    }

    /// A client subscribed to `subject`, the subscription confirmed by the
    /// server.
    pub async fn subscribed(&self, subject: &str) -> (async_nats::Client, Subscriber) {
        let client = self.client().await;
        let sub = client
            .subscribe(subject.to_owned())
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        (client, sub)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client of any of the servers in `urls` (comma separated).
pub async fn connect_any(urls: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    let addrs: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(|u| u.trim().parse().expect("a server URL"))
        .collect();
    async_nats::connect(addrs.as_slice()).await
}

/// Nats-servers in one cluster (routes on loopback), JetStream on each,
/// named `n0`, `n1`, ...
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start(size: usize) -> Self {
        let routes_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = routes_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let servers = routes_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                NatsServer::start_with(&[
                    "-n",
                    &format!("n{i}"),
                    "--cluster_name",
                    "falco",
                    "--cluster",
                    &format!("nats://127.0.0.1:{port}"),
                    "--routes",
                    &routes,
                ])
            })
            .collect();
        NatsCluster { servers }
    }

    /// Every server's URL, comma separated (what `-s` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The server named `name` (`n0`, `n1`, ...).
    pub fn named(&mut self, name: &str) -> &mut NatsServer {
        let i: usize = name
            .trim_start_matches('n')
            .parse()
            .unwrap_or_else(|_| panic!("no server named {name:?}"));
        &mut self.servers[i]
    }

    /// The name of the server leading `stream`, once it has one.
    pub async fn leader(&self, stream: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = async {
                let client = connect_any(&self.urls()).await.ok()?;
                let js = async_nats::jetstream::new(client);
                let stream = js.get_stream(stream).await.ok()?;
                stream.cached_info().cluster.clone()?.leader
            };
            if let Some(leader) = found.await {
                return leader;
            }
            assert!(Instant::now() < deadline, "no leader for {stream}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A bridge running in-process.
pub struct RunningBridge {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), BridgeError>>,
    pub http: std::net::SocketAddr,
}

impl RunningBridge {
    pub async fn start(options: BridgeOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(options, listener)
    }

    /// Starts the bridge serving `--listen` on `listener`.
    pub fn start_on(options: BridgeOptions, listener: TcpListener) -> Self {
        let http = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(bridge::run(options, Some(listener), shutdown.clone()));
        RunningBridge {
            shutdown,
            task,
            http,
        }
    }

    /// Starts the bridge and waits until `/readyz` says ready.
    pub async fn start_ready(options: BridgeOptions) -> Self {
        let bridge = Self::start(options).await;
        wait_for(
            "the bridge to be ready",
            Duration::from_secs(10),
            || async { bridge.get("/readyz").await.0 == 200 },
        )
        .await;
        bridge
    }

    /// Waits until `input` has read at least `n` alerts.
    pub async fn wait_received(&self, input: &str, n: f64) {
        let series = format!("falco_nats_alerts_received_total{{input=\"{input}\"}}");
        wait_for("alerts to be read", Duration::from_secs(10), || async {
            self.metric(&series).await >= n
        })
        .await;
    }

    /// Stops the bridge and returns how it ended.
    pub async fn stop(self) -> Result<(), BridgeError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("bridge did not stop")
            .expect("bridge task panicked")
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path).await
    }

    /// The value of one metric line (`name{labels}`), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        metric_value(&body, series)
    }
}

/// A budget file of `benches/` (`<name> <number>` lines, `,` between
/// thousands allowed, `#` starts a comment): name -> number.
pub fn budgets(file: &str) -> std::collections::BTreeMap<String, f64> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("the budget file");
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (name, n) = l
                .split_once(char::is_whitespace)
                .unwrap_or_else(|| panic!("{}: {l:?} is not `name number`", path.display()));
            let n = n.trim().replace(',', "").parse().unwrap_or_else(|e| {
                panic!("{}: {l:?}: {e}", path.display());
            });
            (name.to_owned(), n)
        })
        .collect()
}

/// The value of one series in a metrics text, 0 if absent.
pub fn metric_value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Clock ticks per second, asked once.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User plus system CPU seconds from a `/proc/<pid>/stat` file (0 when it
/// cannot be read); for the benchmarks.
#[allow(dead_code)]
pub fn cpu_seconds_of(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime, stime.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let field = |i| {
        rest.split_whitespace()
            .nth(i)
            .and_then(|v: &str| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / clock_ticks()
}

/// A plain HTTP/1.0 GET: status and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    let req = format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n");
    http_exchange(stream, req.as_bytes()).await
}

/// An HTTP/1.1 POST the way Falco's http_output sends one: status and body.
pub async fn http_post(
    addr: std::net::SocketAddr,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    http_exchange(stream, &post_request(headers, body)).await
}

/// The bytes of a `POST /` with `headers` and `body`, closing the connection after.
pub fn post_request(headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Writes a request and reads the whole response: status and body.
pub async fn http_exchange<S>(mut stream: S, request: &[u8]) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = stream.write_all(request).await;
    let mut buf = Vec::new();
    // A server may close before reading an over-long body; what came back counts.
    let _ = stream.read_to_end(&mut buf).await;
    let buf = String::from_utf8_lossy(&buf).into_owned();
    let status = buf
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The mock Falco serving on `falco.sock` in a temp dir of its own,
/// started: the falco, its socket, and the dir (which must outlive it).
pub async fn started_falco() -> (
    falco_nats::simulate::falco_grpc::MockFalco,
    PathBuf,
    TempDir,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("falco.sock");
    let mut falco = falco_nats::simulate::falco_grpc::MockFalco::new(&socket);
    falco.start().await.expect("start the mock Falco");
    (falco, socket, dir)
}

/// Bridge options for the gRPC input on `socket` and core NATS at `url`.
pub fn grpc_options(socket: &Path, url: &str) -> BridgeOptions {
    BridgeOptions {
        input: InputOptions::Grpc(GrpcOptions {
            socket: socket.to_owned(),
            method: GrpcMethod::Sub,
            poll_interval: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(500),
        }),
        nats: NatsOptions::for_server(url),
        publish: PublishOptions {
            subject: SubjectTemplate::default(),
            jetstream: None,
            signer: None,
        },
        min_priority: Priority::Debug,
        format: falco_nats::format::Format::Falco,
        queue_size: 1024,
        drain_timeout: Duration::from_secs(20),
        tls: None,
        server: falco_nats::server::ServerLimits {
            header_timeout: falco_nats::server::DEFAULT_HEADER_TIMEOUT,
            max_connections: falco_nats::server::DEFAULT_MAX_CONNECTIONS,
            ..Default::default()
        },
    }
}

/// Bridge options for a FIFO at `path` (created), lines up to `max_line`,
/// and core NATS at `url`.
pub fn fifo_options(path: &Path, url: &str, max_line: usize) -> BridgeOptions {
    BridgeOptions {
        input: InputOptions::Fifo(falco_nats::input::fifo::FifoOptions {
            path: path.to_owned(),
            create: true,
            max_line,
        }),
        ..grpc_options(path, url)
    }
}

/// The bridge binary reading standard input (piped), publishing to `url`,
/// with `extra` arguments; stdout is discarded, logs at `warn`.
pub fn stdin_bridge(url: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_falco-nats"))
        .args(["bridge", "--input", "stdin", "--listen", "off", "-s", url])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the bridge")
}

/// Waits for a child process off the runtime (which may have to go on
/// serving it meanwhile) and asserts it succeeded, showing its stderr.
pub async fn wait_success(child: Child, what: &str) -> std::process::Output {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("the waiting task")
        .expect("wait for the process");
    assert!(
        out.status.success(),
        "{what}: {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Receives `n` messages, failing after `timeout` without one.
pub async fn receive(
    sub: &mut Subscriber,
    n: usize,
    timeout: Duration,
) -> Vec<async_nats::Message> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(timeout, sub.next()).await {
            Ok(Some(m)) => out.push(m),
            Ok(None) => panic!("subscription closed after {} messages", out.len()),
            Err(_) => panic!("timed out after {} of {n} messages", out.len()),
        }
    }
    out
}

/// Asserts that nothing more arrives within `wait`.
pub async fn assert_quiet(sub: &mut Subscriber, wait: Duration) {
    if let Ok(Some(m)) = tokio::time::timeout(wait, sub.next()).await {
        panic!("unexpected extra message on {}: {:?}", m.subject, m.payload);
    }
}

/// The `evt.num` of an alert payload (the simulator's sequence number).
pub fn evt_num(payload: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
    v["output_fields"]["evt.num"].as_u64().expect("evt.num")
}

/// Waits until `check` holds, polling; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Responder options for tests: core NATS at `url`, the proof of concept's
/// policy, default rails with a rate limit high enough not to interfere,
/// alerts handled one at a time.
pub fn respond_options(url: &str, kubeconfig: &Path) -> falco_nats::respond::RespondOptions {
    use falco_nats::respond::guards::Limits;
    use falco_nats::respond::policy::Policy;
    use falco_nats::respond::rails::RailsConfig;
    use falco_nats::respond::{RespondOptions, Subscription};
    RespondOptions {
        nats: NatsOptions::for_server(url),
        subscription: Subscription::Core {
            subject: "falco.>".into(),
            queue: "falco-nats-respond".into(),
        },
        policy: Policy::proof_of_concept(),
        rails: RailsConfig::default(),
        limits: Limits {
            min_healthy_replicas: Default::default(),
            max_actions_per_minute: 1000,
        },
        dry_run: false,
        result_prefix: "falco.response".into(),
        verifier: None,
        max_alert_age: Duration::from_secs(300),
        control: Default::default(),
        guards: Default::default(),
        kubeconfig: Some(kubeconfig.to_owned()),
        kube_timeout: Duration::from_secs(10),
        // One at a time: the tests read the decisions in the alerts' order.
        concurrency: 1,
        drain_timeout: Duration::from_secs(10),
    }
}

/// Every `evt.num` stored in `stream`, read back message by message. A
/// cluster that is still settling (a leader being elected) is waited for:
/// the whole read is tried again, for up to a minute.
pub async fn stored_nums(url: &str, stream: &str) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match read_nums(url, stream).await {
            Ok(nums) => return nums,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot read {stream}: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn read_nums(url: &str, stream: &str) -> Result<Vec<u64>, async_nats::Error> {
    let client = connect_any(url).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(stream).await?;
    let count = stream.info().await?.state.messages;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let mut messages = consumer.messages().await?;
    let mut nums = Vec::new();
    while (nums.len() as u64) < count {
        let msg = tokio::time::timeout(Duration::from_secs(20), messages.next())
            .await?
            .ok_or("the consumer ended")??;
        nums.push(evt_num(&msg.payload));
    }
    Ok(nums)
}

pub async fn stream_count(url: &str, stream: &str) -> u64 {
    let Ok(client) = connect_any(url).await else {
        return 0;
    };
    let js = async_nats::jetstream::new(client);
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// JetStream publishing to the stream `FALCO`, as the bridge's defaults.
pub fn jetstream_options() -> falco_nats::nats::JetStreamOptions {
    falco_nats::nats::JetStreamOptions {
        stream: "FALCO".into(),
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::ZERO,
        max_bytes: 0,
        max_inflight: 64,
        replicas: None,
        fast_batch: true,
    }
}

/// Feeds `total` alerts from `hostname` into Falco's queue, `per_tick` every
/// 10 ms, as rules that keep firing whatever the gRPC server does.
pub fn feed(
    feeder: falco_nats::simulate::falco_grpc::Feeder,
    hostname: &'static str,
    total: u64,
    per_tick: usize,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut factory = falco_nats::simulate::alerts::AlertFactory::new(hostname, false);
        while factory.made() < total {
            for _ in 0..per_tick {
                feeder.push(factory.next_response());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Waits up to `timeout` for `stream` to hold `total` messages, then asserts
/// that it holds the alerts 1..=total, each exactly once.
pub async fn assert_stream_holds_each_once(url: &str, stream: &str, total: u64, timeout: Duration) {
    wait_for("every alert stored", timeout, || async {
        stream_count(url, stream).await >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let nums = stored_nums(url, stream).await;
    let unique: std::collections::BTreeSet<u64> = nums.iter().copied().collect();
    assert_eq!(nums.len() as u64, total, "no duplicates in the stream");
    assert_eq!(unique, (1..=total).collect(), "no alert lost");
}

/// The kubeconfig of the Kubernetes API stand-in (removed with it).
pub fn kubeconfig(kube: &fake_kube::KubeApi) -> PathBuf {
    kube.kubeconfig().to_owned()
}

/// Waits for the FIFO at `path`, then writes `total` alerts from `hostname`
/// into it (as Falco's file_output would), in large writes.
pub async fn write_fifo(path: &Path, hostname: &'static str, total: u64) {
    wait_for("the FIFO", Duration::from_secs(20), || async {
        path.exists()
    })
    .await;
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut factory = falco_nats::simulate::alerts::AlertFactory::new(hostname, false);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open the FIFO");
        let mut buf = String::with_capacity(64 * 1024);
        while factory.made() < total {
            buf += &factory.next_json();
            buf.push('\n');
            if buf.len() >= 60 * 1024 {
                f.write_all(buf.as_bytes()).expect("write the FIFO");
                buf.clear();
            }
        }
        f.write_all(buf.as_bytes()).expect("write the FIFO");
    })
    .await
    .expect("the FIFO writer");
}

/// The `config` of `stream` as `nats stream info --json` reports it.
pub fn stream_config(url: &str, stream: &str) -> serde_json::Value {
    let out = std::process::Command::new(natscli())
        .args(["stream", "info", stream, "--json", "-s", url])
        .output()
        .expect("run nats stream info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stream info JSON");
    info["config"].clone()
}

/// Reads one HTTP response from a keep-alive connection: its status.
pub async fn read_one_response(stream: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap() == 0 {
            return 0;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    head.split(' ').nth(1).unwrap().parse().unwrap()
}
