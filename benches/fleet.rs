//! The fleet, measured (docs/SCALING.md): a simulated fleet of Falco nodes
//! on loopback (tests/it/support/fleet.rs: a hub of three clustered
//! nats-servers with the shipped configuration, a bridge per node behind
//! its own shipped leaf nats-server or straight to the hub, `falco-nats
//! sources`, two responders acting on the real API server), for growing
//! numbers of nodes. Each run, one after the other:
//!
//! 1. idle: the hub's CPU and memory with every node connected;
//! 2. base load: every node posts at `FLEET_RATE` alerts a second (2), a
//!    fiftieth Critical: latency from the POST to the alert delivered from
//!    the hub's stream and to the pod's deletion; hub CPU per 1,000 alerts;
//! 3. storm: one node posts 2,000 a second for 5 s, then every node 20 a
//!    second for 5 s: the sourcing lag and how long the hub takes to catch
//!    up;
//! 4. deletions: 200 Critical alerts at once across the nodes: actions a
//!    second, from the first POST to the last deletion;
//! 5. a node joins: from its Kubernetes Node made to its first alert in
//!    the hub's stream.
//!
//! And the hub alone with 0 to 1,000 sources of nodes that are not there.
//!
//! `scripts/fleet` runs it and draws the plots. Knobs: `FLEET_NODES`
//! (comma-separated, default `10,25,50,100,200`), `FLEET_LAYOUTS` (`leaf,direct`),
//! `FLEET_OUT` (default `target/fleet/results.json`).

#[path = "../tests/it/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use serde_json::{json, Value};
use support::fleet::{
    alert_json, load, percentile, source_lag, stored, usage_of_all, Fleet, FleetConfig, Layout,
    NodeClient, Observer,
};

const BIN: &str = env!("CARGO_BIN_EXE_falco-nats");

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Waits until `done`, checking every 100 ms, at most `limit`; how long it took.
async fn until<F, Fut>(limit: Duration, mut done: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if done().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn ms(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.as_secs_f64() * 1000.0))
}

fn latencies(values: &[f64]) -> Value {
    json!({
        "count": values.len(),
        "p50_ms": percentile(values, 50.0),
        "p90_ms": percentile(values, 90.0),
        "p99_ms": percentile(values, 99.0),
        "max_ms": percentile(values, 100.0),
    })
}

async fn run(layout: Layout, nodes: usize) -> Value {
    let started = Instant::now();
    let mut fleet = Fleet::start(FleetConfig {
        layout,
        nodes,
        responders: 2,
        pods: 200 + nodes * 2,
        bin: BIN.into(),
    })
    .await;
    let startup = started.elapsed();
    eprintln!(
        "fleet: {} x{nodes} up in {:.1} s",
        layout.name(),
        startup.as_secs_f64()
    );
    let js = jetstream::new(fleet.hub_client("admin").await);
    let hub_stream = layout.hub_stream();
    let observer = Observer::start(&fleet).await;
    let addrs: Vec<_> = fleet.nodes.iter().map(|n| n.http).collect();
    let pods = Arc::new(Mutex::new(fleet.pods.clone()));

    // 1. Idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = usage_of_all(fleet.hub_pids());
    let nodes_before = usage_of_all(fleet.leaf_pids().into_iter().chain(fleet.bridge_pids()));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = usage_of_all(fleet.hub_pids());
    let nodes_after = usage_of_all(fleet.leaf_pids().into_iter().chain(fleet.bridge_pids()));
    let idle_cpu_pct = (after.cpu_seconds - before.cpu_seconds) / 10.0 * 100.0;
    let leaves = usage_of_all(fleet.leaf_pids());
    let bridges = usage_of_all(fleet.bridge_pids());
    let responders = usage_of_all(fleet.responder_pids());
    let idle = json!({
        "hub_cpu_pct": idle_cpu_pct,
        "hub_rss_mib": after.rss_bytes as f64 / 1048576.0,
        "hub_cpu_pct_per_node": idle_cpu_pct / nodes as f64,
        // The nodes' own processes (leaf servers and bridges), all together:
        // on one machine they share its cores with the hub.
        "nodes_cpu_pct": (nodes_after.cpu_seconds - nodes_before.cpu_seconds) / 10.0 * 100.0,
        "hub_rss_kib_per_node": after.rss_bytes as f64 / 1024.0 / nodes as f64,
        "leaf_rss_mib_each": if fleet.leaf_pids().is_empty() { 0.0 } else { leaves.rss_bytes as f64 / 1048576.0 / nodes as f64 },
        "bridge_rss_mib_each": bridges.rss_bytes as f64 / 1048576.0 / nodes as f64,
        "responder_rss_mib_each": responders.rss_bytes as f64 / 1048576.0 / fleet.responders.len() as f64,
    });
    eprintln!("  idle: {idle}");

    // 2. Base load.
    let rate: f64 = std::env::var("FLEET_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2.0);
    let per_node = (rate * 15.0) as u64;
    let stored_before = observer.seen.stored.load(Ordering::Relaxed);
    let deleted_before = observer.seen.deleted.load(Ordering::Relaxed);
    let named_before = pods.lock().expect("not poisoned").len();
    let cpu_before = usage_of_all(fleet.hub_pids());
    let base_started = Instant::now();
    let (refused, took) = load(&addrs, per_node, rate, 2, &fleet.run, Arc::clone(&pods)).await;
    let total = per_node * nodes as u64;
    let caught_up = until(Duration::from_secs(60), || async {
        observer.seen.stored.load(Ordering::Relaxed) >= stored_before + total
    })
    .await;
    let named = (named_before - pods.lock().expect("not poisoned").len()) as u64;
    until(Duration::from_secs(60), || async {
        observer.seen.deleted.load(Ordering::Relaxed) >= deleted_before + named
    })
    .await;
    let cpu_after = usage_of_all(fleet.hub_pids());
    let stored_ms = std::mem::take(&mut *observer.seen.stored_ms.lock().expect("not poisoned"));
    let decided_ms = std::mem::take(&mut *observer.seen.decided_ms.lock().expect("not poisoned"));
    let base = json!({
        "rate_per_node": rate,
        "alerts": total,
        "refused": refused,
        "posting_s": took.as_secs_f64(),
        // Less what the hub spends at idle over the same time.
        "hub_cpu_s_per_1000": (cpu_after.cpu_seconds - cpu_before.cpu_seconds
            - idle_cpu_pct / 100.0 * base_started.elapsed().as_secs_f64())
            / (total as f64 / 1000.0),
        "hub_cpu_pct": (cpu_after.cpu_seconds - cpu_before.cpu_seconds)
            / base_started.elapsed().as_secs_f64() * 100.0,
        "post_to_stored": latencies(&stored_ms),
        "post_to_delete": latencies(&decided_ms),
        "deleted": observer.seen.deleted.load(Ordering::Relaxed) - deleted_before,
        "caught_up_after_ms": ms(caught_up),
    });
    eprintln!("  base: {base}");

    // 3. Storms: one node, then every node.
    let mut storms = Vec::new();
    for (name, burst_nodes, rate, per_node) in [
        ("one node at 2,000/s", &addrs[..1], 2000.0, 10_000u64),
        ("every node at 20/s", &addrs[..], 20.0, 100),
    ] {
        let stored_before = observer.seen.stored.load(Ordering::Relaxed);
        let cpu_before = usage_of_all(fleet.hub_pids());
        let total = per_node * burst_nodes.len() as u64;
        let samples: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
        let sampling = {
            let samples = Arc::clone(&samples);
            let js = js.clone();
            let t0 = Instant::now();
            tokio::spawn(async move {
                loop {
                    let (lag, _) = source_lag(&js).await;
                    samples
                        .lock()
                        .expect("not poisoned")
                        .push((t0.elapsed().as_secs_f64(), lag));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        let (refused, took) = load(
            burst_nodes,
            per_node,
            rate,
            0,
            &fleet.run,
            Arc::clone(&pods),
        )
        .await;
        let drained = until(Duration::from_secs(120), || async {
            observer.seen.stored.load(Ordering::Relaxed) >= stored_before + total
        })
        .await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        sampling.abort();
        let cpu_after = usage_of_all(fleet.hub_pids());
        let stored_ms = std::mem::take(&mut *observer.seen.stored_ms.lock().expect("not poisoned"));
        let samples = samples.lock().expect("not poisoned").clone();
        let storm = json!({
            "name": name,
            "alerts": total,
            "refused": refused,
            "posting_s": took.as_secs_f64(),
            "posted_per_s": total as f64 / took.as_secs_f64(),
            "drained_after_posting_ms": ms(drained),
            "max_source_lag": samples.iter().map(|s| s.1).max().unwrap_or(0),
            "lag_series": samples,
            "post_to_stored": latencies(&stored_ms),
            "hub_cpu_s_per_1000": (cpu_after.cpu_seconds - cpu_before.cpu_seconds) / (total as f64 / 1000.0),
        });
        eprintln!(
            "  storm {name}: drained {:?}, lag max {}",
            drained, storm["max_source_lag"]
        );
        storms.push(storm);
    }

    // 4. Deletions at once.
    let left = pods.lock().expect("not poisoned").len();
    let deletes = left.min(200);
    observer
        .seen
        .stored_ms
        .lock()
        .expect("not poisoned")
        .clear();
    let deleted_before = observer.seen.deleted.load(Ordering::Relaxed);
    observer
        .seen
        .decided_ms
        .lock()
        .expect("not poisoned")
        .clear();
    let first = Instant::now();
    let per_node = deletes.div_ceil(nodes.max(1)) as u64;
    let (_, _) = load(&addrs, per_node, 1000.0, 100, &fleet.run, Arc::clone(&pods)).await;
    let named = (left - pods.lock().expect("not poisoned").len()) as u64;
    let all_deleted = until(Duration::from_secs(120), || async {
        observer.seen.deleted.load(Ordering::Relaxed) >= deleted_before + named
    })
    .await;
    let decided_ms = std::mem::take(&mut *observer.seen.decided_ms.lock().expect("not poisoned"));
    let elapsed = first.elapsed().as_secs_f64();
    // How the responders got there: retries (a transient failure, the
    // alert delivered again) and what they decided.
    let mut responders = serde_json::Map::new();
    for series in [
        "falco_nats_respond_retries_total",
        "falco_nats_respond_decisions_total{action=\"delete-pod\",outcome=\"done\"}",
        "falco_nats_respond_decisions_total{action=\"delete-pod\",outcome=\"failed\"}",
        "falco_nats_respond_decisions_total{action=\"delete-pod\",outcome=\"skipped\"}",
    ] {
        responders.insert(
            series.to_owned(),
            json!(fleet.responders_metric(series).await),
        );
    }
    let actions = json!({
        "responders": responders,
        "alerts": named,
        "deleted": observer.seen.deleted.load(Ordering::Relaxed) - deleted_before,
        "all_deleted_ms": ms(all_deleted),
        "actions_per_s": (observer.seen.deleted.load(Ordering::Relaxed) - deleted_before) as f64 / elapsed,
        "post_to_delete": latencies(&decided_ms),
        "post_to_stored": latencies(&std::mem::take(
            &mut *observer.seen.stored_ms.lock().expect("not poisoned"),
        )),
    });
    eprintln!("  deletions: {actions}");

    // 5. A node joins.
    let stored_before = stored(&js, hub_stream).await;
    let joining = Instant::now();
    let index = fleet.add_node().await;
    let ready = joining.elapsed();
    let mut client = NodeClient::new(fleet.nodes[index].http);
    let _ = client.post(alert_json("joined", "Notice", None, 1)).await;
    let reached = until(Duration::from_secs(120), || async {
        stored(&js, hub_stream).await > stored_before
    })
    .await;
    let join = json!({
        "bridge_ready_ms": ready.as_secs_f64() * 1000.0,
        "first_alert_in_hub_ms": ms(reached.map(|r| r + ready)),
    });
    eprintln!("  join: {join}");
    drop(observer);
    fleet.stop().await;
    json!({
        "layout": layout.name(),
        "nodes": nodes,
        "startup_s": startup.as_secs_f64(),
        "idle": idle,
        "base": base,
        "storms": storms,
        "deletions": actions,
        "join": join,
    })
}

/// The hub alone, its stream sourcing `count` nodes that are not there:
/// what the sources themselves cost.
async fn phantom_sources(count: usize) -> Value {
    let dir = tempfile::tempdir().expect("a temp dir");
    let pw = support::shipped::passwords();
    let (hub, _) = support::shipped::start_hub(dir.path(), &pw);
    let admin = support::shipped::client_as(&hub.url(), "admin", &pw["nats-user-admin"]).await;
    let js = jetstream::new(admin);
    let sources: Vec<stream::Source> = (0..count)
        .map(|i| stream::Source {
            name: "FALCO".into(),
            external: Some(stream::External {
                api_prefix: format!("$JS.node-{i}.API"),
                delivery_prefix: None,
            }),
            ..Default::default()
        })
        .collect();
    let config = stream::Config {
        name: "FALCO_ALL".into(),
        sources: Some(sources),
        ..Default::default()
    };
    let bytes = serde_json::to_vec(&config).map(|v| v.len()).unwrap_or(0);
    let t = Instant::now();
    let made = js.create_stream(config).await.is_ok();
    let create_ms = t.elapsed().as_secs_f64() * 1000.0;
    let pid = hub.pid().expect("the hub runs");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = support::fleet::usage_of(pid);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = support::fleet::usage_of(pid);
    let result = json!({
        "sources": count,
        "made": made,
        "config_bytes": bytes,
        "create_ms": create_ms,
        "hub_cpu_pct": (after.cpu_seconds - before.cpu_seconds) / 10.0 * 100.0,
        "hub_rss_mib": after.rss_bytes as f64 / 1048576.0,
    });
    eprintln!("phantom sources: {result}");
    result
}

#[tokio::main]
async fn main() {
    let nodes: Vec<usize> = env_list("FLEET_NODES", "10,25,50,100,200")
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();
    let layouts: Vec<Layout> = env_list("FLEET_LAYOUTS", "leaf,direct")
        .iter()
        .filter_map(|l| match l.as_str() {
            "leaf" => Some(Layout::Leaf),
            "direct" => Some(Layout::Direct),
            _ => None,
        })
        .collect();
    let out = std::env::var("FLEET_OUT")
        .unwrap_or_else(|_| format!("{}/target/fleet/results.json", env!("CARGO_MANIFEST_DIR")));
    let mut runs = Vec::new();
    for layout in &layouts {
        for n in &nodes {
            runs.push(run(*layout, *n).await);
        }
    }
    let mut phantom = Vec::new();
    for count in [0, 100, 1000] {
        phantom.push(phantom_sources(count).await);
    }
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let results = json!({
        "date": k8s_openapi::jiff::Timestamp::now().to_string(),
        "machine": {
            "cpu": machine,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        },
        "runs": runs,
        "phantom_sources": phantom,
    });
    if let Some(parent) = std::path::Path::new(&out).parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&out, serde_json::to_string_pretty(&results).expect("JSON"))
        .expect("write the results");
    eprintln!("fleet: results in {out}");
}
