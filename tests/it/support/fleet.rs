//! A simulated fleet of Falco nodes on loopback, for `tests/it/fleet.rs`
//! (a few nodes, a few seconds) and `benches/fleet.rs` (the measurements
//! of docs/SCALING.md).
//!
//! - The hub: three clustered nats-servers, each with the shipped hub
//!   configuration (deploy/base/nats.yaml: its users, permissions and leaf
//!   node port), adapted in ports and store only.
//! - Each node: in the leaf layout, its own leaf nats-server
//!   (deploy/components/leaf, as shipped) and a Kubernetes Node of the
//!   real control plane; a bridge process on `--input http`, publishing to
//!   JetStream (`FALCO` on its leaf, or on the hub in the direct layout).
//! - `falco-nats sources` keeping `FALCO_ALL`'s sources equal to the nodes
//!   (leaf layout), responder processes on one durable consumer acting on
//!   the real API server, where pods are made for the alerts to name.
//!
//! Every process is stopped when the fleet is dropped.

// The smoke test uses a part; the benchmark the rest.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use super::real_kube::Cluster;
use super::shipped::{self, passwords};
use super::{free_port, wait_for, NatsServer};

/// Where each node's bridge publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// To its own leaf nats-server; the hub's `FALCO_ALL` sources it.
    Leaf,
    /// Straight to the hub's stream `FALCO` (R3).
    Direct,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Leaf => "leaf",
            Layout::Direct => "direct",
        }
    }

    /// The hub's stream the responders read.
    pub fn hub_stream(self) -> &'static str {
        match self {
            Layout::Leaf => "FALCO_ALL",
            Layout::Direct => "FALCO",
        }
    }
}

/// A child process, killed on drop.
pub struct Proc(Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One simulated node.
pub struct FleetNode {
    pub name: String,
    pub leaf: Option<NatsServer>,
    pub bridge: Proc,
    /// The bridge's HTTP input.
    pub http: std::net::SocketAddr,
}

/// CPU seconds and resident memory of some processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// The user plus system CPU seconds and the RSS of process `pid`.
pub fn usage_of(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Usage {
        cpu_seconds: super::cpu_seconds_of(&format!("/proc/{pid}/stat")),
        rss_bytes: rss_kb * 1024,
    }
}

/// The sum of several processes' usage.
pub fn usage_of_all(pids: impl IntoIterator<Item = u32>) -> Usage {
    pids.into_iter()
        .map(usage_of)
        .fold(Usage::default(), |a, b| Usage {
            cpu_seconds: a.cpu_seconds + b.cpu_seconds,
            rss_bytes: a.rss_bytes + b.rss_bytes,
        })
}

/// The fleet's settings.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub layout: Layout,
    pub nodes: usize,
    pub responders: usize,
    /// Pods made for Critical alerts to name (each deleted once).
    pub pods: usize,
    /// The falco-nats binary.
    pub bin: PathBuf,
}

/// A running fleet.
pub struct Fleet {
    pub config: FleetConfig,
    pub hub: Vec<NatsServer>,
    hub_leaf_ports: Vec<u16>,
    pub nodes: Vec<FleetNode>,
    pub sources: Option<Proc>,
    pub responders: Vec<Proc>,
    /// Each responder's `--listen` (its `/metrics`).
    pub responder_listen: Vec<std::net::SocketAddr>,
    /// The namespace of the pods, and the label of the nodes.
    pub run: String,
    pub pods: Vec<String>,
    pw: BTreeMap<String, String>,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    node_api: Api<Node>,
}

impl Fleet {
    /// Starts the hub, the nodes, `sources` (leaf layout) and the
    /// responders, and makes the pods; returns once every node's first
    /// alert is in the hub's stream.
    pub async fn start(config: FleetConfig) -> Fleet {
        let cluster = Cluster::get();
        let admin = cluster.admin().await;
        let run = cluster.namespace("fleet").await;
        let dir = tempfile::tempdir().expect("a temp dir");
        let pw = passwords();
        let (hub, hub_leaf_ports) = start_hub(dir.path(), &pw);
        let kubeconfig = cluster.admin_kubeconfig();
        let mut fleet = Fleet {
            config,
            hub,
            hub_leaf_ports,
            nodes: Vec::new(),
            sources: None,
            responders: Vec::new(),
            responder_listen: Vec::new(),
            run,
            pods: Vec::new(),
            pw,
            dir,
            kubeconfig,
            node_api: Api::all(admin.clone()),
        };
        fleet.make_pods(&admin).await;
        if fleet.config.layout == Layout::Leaf {
            fleet.sources = Some(fleet.spawn(
                &[
                    "sources",
                    "--stream=FALCO_ALL",
                    "--replicas=3",
                    "--remove-after=1m",
                    &format!("--node-selector=falco-nats-fleet={}", fleet.run),
                    &format!("--listen=127.0.0.1:{}", free_port()),
                ],
                "sources",
                &fleet.hub_urls(),
                &[("KUBECONFIG", fleet.kubeconfig.display().to_string())],
            ));
        }
        for _ in 0..fleet.config.nodes {
            fleet.add_node().await;
        }
        for _ in 0..fleet.config.responders {
            fleet.add_responder();
        }
        fleet.wait_every_node_in_the_hub().await;
        fleet
    }

    /// The hub's client URLs, comma separated.
    pub fn hub_urls(&self) -> String {
        self.hub
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client on the hub as a shipped user.
    pub async fn hub_client(&self, user: &str) -> async_nats::Client {
        let password = &self.pw[&format!("nats-user-{user}")];
        let addrs: Vec<async_nats::ServerAddr> = self
            .hub
            .iter()
            .map(|s| s.url().parse().expect("a URL"))
            .collect();
        async_nats::ConnectOptions::with_user_and_password(user.into(), password.clone())
            .custom_inbox_prefix(format!("_INBOX_{user}"))
            .connect(addrs.as_slice())
            .await
            .expect("connect to the hub")
    }

    /// The hub servers' process ids.
    pub fn hub_pids(&self) -> Vec<u32> {
        self.hub.iter().filter_map(NatsServer::pid).collect()
    }

    /// The bridges', leaves', responders' and `sources`' process ids.
    pub fn bridge_pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.bridge.pid()).collect()
    }

    pub fn leaf_pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.leaf.as_ref().and_then(NatsServer::pid))
            .collect()
    }

    pub fn responder_pids(&self) -> Vec<u32> {
        self.responders.iter().map(Proc::pid).collect()
    }

    /// A falco-nats process logged in to `urls` as the shipped `user`.
    fn spawn(&self, args: &[&str], user: &str, urls: &str, env: &[(&str, String)]) -> Proc {
        let child = Command::new(&self.config.bin)
            .args(args)
            .env("NATS_URL", urls)
            .env("NATS_USER", user)
            .env("NATS_PASSWORD", &self.pw[&format!("nats-user-{user}")])
            .env("NATS_INBOX_PREFIX", format!("_INBOX_{user}"))
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("FLEET_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("start falco-nats");
        Proc(child)
    }

    /// Adds one node (its Kubernetes Node, leaf and bridge in the leaf
    /// layout; a bridge in the direct one) and waits for its bridge to take
    /// posts; returns its index.
    pub async fn add_node(&mut self) -> usize {
        let index = self.nodes.len();
        let name = format!("{}-n{index}", self.run);
        let http_port = free_port();
        let listen = format!("--listen=127.0.0.1:{http_port}");
        let (leaf, bridge) = match self.config.layout {
            Layout::Leaf => {
                let node: Node = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"falco-nats-fleet": self.run}},
                }))
                .expect("a node");
                self.node_api
                    .create(&PostParams::default(), &node)
                    .await
                    .expect("create a node");
                let port = self.hub_leaf_ports[index % self.hub_leaf_ports.len()];
                let leaf = shipped::start_leaf(self.dir.path(), &name, port, &self.pw);
                let bridge = self.spawn(
                    &[
                        "bridge",
                        "--input=http",
                        "--jetstream",
                        "--stream=FALCO",
                        &listen,
                    ],
                    "bridge",
                    &leaf.url(),
                    // As the leaf component sets it.
                    &[("FALCO_NATS_STREAM_MAX_BYTES", "768M".to_owned())],
                );
                (Some(leaf), bridge)
            }
            Layout::Direct => {
                let bridge = self.spawn(
                    &[
                        "bridge",
                        "--input=http",
                        "--jetstream",
                        "--stream=FALCO",
                        "--replicas=3",
                        &listen,
                    ],
                    "bridge",
                    &self.hub_urls(),
                    &[],
                );
                (None, bridge)
            }
        };
        let http: std::net::SocketAddr = ([127, 0, 0, 1], http_port).into();
        wait_for("a node's bridge ready", Duration::from_secs(60), || async {
            tokio::net::TcpStream::connect(http).await.is_ok()
                && super::http_get(http, "/readyz").await.0 == 200
        })
        .await;
        self.nodes.push(FleetNode {
            name,
            leaf,
            bridge,
            http,
        });
        index
    }

    /// Stops everything, and deletes the run's Nodes and namespace from the
    /// control plane, which later runs share.
    pub async fn stop(mut self) {
        while !self.nodes.is_empty() {
            self.remove_node().await;
        }
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
            Api::all(Cluster::get().admin().await);
        let _ = namespaces.delete(&self.run, &DeleteParams::default()).await;
    }

    /// Removes the last node (its Node object too): a cluster scaling down.
    pub async fn remove_node(&mut self) {
        if let Some(node) = self.nodes.pop() {
            if self.config.layout == Layout::Leaf {
                let _ = self
                    .node_api
                    .delete(&node.name, &DeleteParams::default())
                    .await;
            }
        }
    }

    fn add_responder(&mut self) {
        let policy = self.dir.path().join("policy.yaml");
        std::fs::write(
            &policy,
            "rules:\n  - name: delete on critical\n    match:\n      priority: \">=Critical\"\n    actions:\n      - action: delete-pod\n        grace_period_seconds: 0\n",
        )
        .expect("write the policy");
        let listen: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let responder = self.spawn(
            &[
                "respond",
                "--jetstream",
                &format!("--stream={}", self.config.layout.hub_stream()),
                "--durable=fleet",
                &format!("--policy={}", policy.display()),
                "--max-actions-per-minute=10000",
                "--concurrency=16",
                &format!("--listen={listen}"),
            ],
            "respond",
            &self.hub_urls(),
            &[("KUBECONFIG", self.kubeconfig.display().to_string())],
        );
        self.responders.push(responder);
        self.responder_listen.push(listen);
    }

    async fn make_pods(&mut self, client: &kube::Client) {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.run);
        for i in 0..self.config.pods {
            let name = format!("victim-{i}");
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]},
            }))
            .expect("a pod");
            pods.create(&PostParams::default(), &pod)
                .await
                .expect("create a pod");
            self.pods.push(name);
        }
    }

    /// A metric summed over the responders (`series` as `/metrics` writes
    /// it, labels included).
    pub async fn responders_metric(&self, series: &str) -> f64 {
        let mut sum = 0.0;
        for addr in &self.responder_listen {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                sum += super::metric_value(&super::http_get(*addr, "/metrics").await.1, series);
            }
        }
        sum
    }

    /// Pods of the run still there.
    pub async fn pods_left(&self) -> usize {
        let pods: Api<Pod> = Api::namespaced(Cluster::get().admin().await, &self.run);
        pods.list(&ListParams::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(usize::MAX)
    }

    /// Posts one alert from every node, and waits until the hub's stream
    /// has them all (every node joined the hub).
    async fn wait_every_node_in_the_hub(&self) {
        let js = jetstream::new(self.hub_client("admin").await);
        let stream = self.config.layout.hub_stream();
        let mut clients = Vec::new();
        for node in &self.nodes {
            clients.push(NodeClient::new(node.http));
        }
        let before = stored(&js, stream).await;
        for (i, client) in clients.iter_mut().enumerate() {
            let alert = alert_json(&format!("node-{i}"), "Notice", None, 0);
            client.post(alert).await.expect("the first post");
        }
        let want = before + self.nodes.len() as u64;
        wait_for(
            "every node's alert in the hub",
            Duration::from_secs(120),
            || async { stored(&js, stream).await >= want },
        )
        .await;
    }
}

/// Messages in `stream` on the hub (0 while it is missing).
pub async fn stored(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// The hub: three clustered servers with the shipped configuration, each
/// its own leaf node port; the servers and those ports.
fn start_hub(dir: &Path, pw: &BTreeMap<String, String>) -> (Vec<NatsServer>, Vec<u16>) {
    let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes = route_ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let env = shipped::hub_env(pw);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut servers = Vec::new();
    let mut leaf_ports = Vec::new();
    for (i, route) in route_ports.iter().enumerate() {
        let own = dir.join(format!("hub-{i}"));
        std::fs::create_dir_all(&own).expect("a hub directory");
        let (conf, leaf_port) = shipped::hub_config(&own);
        servers.push(NatsServer::start_with_env(
            free_port(),
            &[
                "-c",
                conf.to_str().expect("UTF-8 path"),
                "-n",
                &format!("hub-{i}"),
                "--cluster_name",
                "hub",
                "--cluster",
                &format!("nats://127.0.0.1:{route}"),
                "--routes",
                &routes,
            ],
            &env,
        ));
        leaf_ports.push(leaf_port);
    }
    (servers, leaf_ports)
}

/// The Falco JSON of one alert from `hostname`, timed now (nanoseconds,
/// unique enough to find it again); Critical ones name `pod` in the run's
/// namespace.
pub fn alert_json(hostname: &str, priority: &str, pod: Option<(&str, &str)>, n: u64) -> Bytes {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let time = k8s_openapi::jiff::Timestamp::from_nanosecond(now.as_nanos() as i128)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let (ns, name) = pod.unwrap_or(("fleet", "none"));
    Bytes::from(
        json!({
            "hostname": hostname,
            "output": format!("{time}: {priority} fleet alert {n}"),
            "output_fields": {"k8s.ns.name": ns, "k8s.pod.name": name, "evt.num": n},
            "priority": priority,
            "rule": "Fleet alert",
            "source": "syscall",
            "tags": ["fleet"],
            "time": time,
        })
        .to_string(),
    )
}

/// Milliseconds from the `time` an alert (or a decision's `alert_time`)
/// carries to now.
pub fn since_ms(time: &str) -> Option<f64> {
    let sent: k8s_openapi::jiff::Timestamp = time.parse().ok()?;
    let now = k8s_openapi::jiff::Timestamp::now();
    Some((now.as_nanosecond() - sent.as_nanosecond()) as f64 / 1e6)
}

/// Falco's `http_output` to one node: a kept-alive HTTP/1.1 connection.
pub struct NodeClient {
    addr: std::net::SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl NodeClient {
    /// A client of `addr`; it connects at its first post.
    pub fn new(addr: std::net::SocketAddr) -> NodeClient {
        NodeClient { addr, sender: None }
    }

    /// Posts one alert; the status (200 when taken).
    pub async fn post(&mut self, alert: Bytes) -> Result<u16, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected just above");
        let request = hyper::Request::post("/")
            .header(hyper::header::HOST, self.addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(alert))
            .map_err(|e| e.to_string())?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| {
            self.sender = None;
            e.to_string()
        })?;
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        Ok(status)
    }
}

/// What the hub saw of the alerts and decisions since it was started:
/// latencies from each alert's POST (its `time`) to its delivery from the
/// hub's stream, and to its decision.
#[derive(Default)]
pub struct Seen {
    pub stored_ms: Mutex<Vec<f64>>,
    pub decided_ms: Mutex<Vec<f64>>,
    pub deleted: AtomicU64,
    pub stored: AtomicU64,
}

/// Watches the hub: an ordered consumer on its stream from now on, and the
/// responders' results. Runs until dropped (the tasks are aborted).
pub struct Observer {
    pub seen: Arc<Seen>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Observer {
    pub async fn start(fleet: &Fleet) -> Observer {
        let seen = Arc::new(Seen::default());
        let admin = fleet.hub_client("admin").await;
        let js = jetstream::new(admin);
        let stream = js
            .get_stream(fleet.config.layout.hub_stream())
            .await
            .expect("the hub's stream");
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .expect("an ordered consumer");
        let mut messages = consumer.messages().await.expect("messages");
        let stored = Arc::clone(&seen);
        let consume = tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                if let Some(ms) = alert_time(&message.payload).and_then(|t| since_ms(&t)) {
                    stored.stored_ms.lock().expect("not poisoned").push(ms);
                }
                stored.stored.fetch_add(1, Ordering::Relaxed);
            }
        });
        let reader = fleet.hub_client("reader").await;
        let mut results = reader
            .subscribe("falco.response.delete_pod")
            .await
            .expect("subscribe to the results");
        reader.flush().await.expect("flush");
        let decided = Arc::clone(&seen);
        let decide = tokio::spawn(async move {
            let _reader = reader;
            while let Some(message) = results.next().await {
                let Ok(d) = falco_nats::decision::Decision::from_json(&message.payload) else {
                    continue;
                };
                if d.outcome == falco_nats::decision::Outcome::Done {
                    decided.deleted.fetch_add(1, Ordering::Relaxed);
                    if let Some(ms) = d.alert_time.as_deref().and_then(since_ms) {
                        decided.decided_ms.lock().expect("not poisoned").push(ms);
                    }
                }
            }
        });
        Observer {
            seen,
            tasks: vec![consume, decide],
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// An alert's `time`, read from its JSON.
fn alert_time(payload: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    value["time"].as_str().map(str::to_owned)
}

/// The `q`th percentile (0 to 100) of `values`.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The hub stream's largest source lag (messages not yet sourced), and
/// the number of sources not active.
pub async fn source_lag(js: &jetstream::Context) -> (u64, usize) {
    let Ok(mut stream) = js.get_stream("FALCO_ALL").await else {
        return (0, 0);
    };
    let Ok(info) = stream.info().await else {
        return (0, 0);
    };
    let lag = info.sources.iter().map(|s| s.lag).max().unwrap_or(0);
    let inactive = info.sources.iter().filter(|s| s.active.is_none()).count();
    (lag, inactive)
}

/// Posts `per_node` alerts to each of `nodes` at `rate` a second each,
/// `critical` of every hundred naming the next pod of `pods` (from
/// `next_pod`); returns the posts refused and the time taken.
pub async fn load(
    nodes: &[std::net::SocketAddr],
    per_node: u64,
    rate: f64,
    critical_per_100: u64,
    run: &str,
    pods: Arc<Mutex<Vec<String>>>,
) -> (u64, Duration) {
    let started = Instant::now();
    let refused = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let count = nodes.len().max(1);
    for (i, addr) in nodes.iter().copied().enumerate() {
        let refused = Arc::clone(&refused);
        let pods = Arc::clone(&pods);
        let run = run.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = NodeClient::new(addr);
            let host = format!("node-{i}");
            let every = Duration::from_secs_f64(1.0 / rate.max(0.001));
            // Nodes are not in step: each starts at its own phase.
            let phase = every.mul_f64(i as f64 / count as f64);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for n in 0..per_node {
                tick.tick().await;
                let pod = if (n * 7 + i as u64) % 100 < critical_per_100 {
                    pods.lock().expect("not poisoned").pop()
                } else {
                    None
                };
                let alert = match &pod {
                    Some(p) => alert_json(&host, "Critical", Some((&run, p)), n),
                    None => alert_json(&host, "Warning", None, n),
                };
                if client.post(alert).await != Ok(200) {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    (refused.load(Ordering::Relaxed), started.elapsed())
}
