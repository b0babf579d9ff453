//! deploy/grafana/falco-nats.json asks only for what exists: every metric
//! its queries name is in the `/metrics` of a running bridge or responder,
//! and every label it groups by is on that metric's samples. So is every
//! metric the README and `docs/` name.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::support::fake_kube::KubeApi;
use crate::support::*;
use falco_nats::bridge::InputOptions;
use falco_nats::input::http::HttpOptions;
use falco_nats::simulate::alerts::AlertFactory;

const WAIT: Duration = Duration::from_secs(10);

/// Metric families in an exposition, each with the label names its samples
/// carry. A counter's samples end in `_total`, a histogram's in `_bucket`,
/// `_sum` and `_count`: all count as the family.
fn families(exposition: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap();
            out.entry(name.to_owned()).or_default();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => (name, rest.split_once('}').unwrap().0),
            None => (line.split_whitespace().next().unwrap(), ""),
        };
        let family = ["_total", "_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| out.contains_key(*f)))
            .unwrap_or(name);
        let entry = out.entry(family.to_owned()).or_default();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            entry.insert(pair.split_once('=').unwrap().0.to_owned());
        }
    }
    out
}

/// The metric names in a query, and the labels of its `by (...)` clauses.
fn query_parts(expr: &str) -> (Vec<String>, Vec<String>) {
    let mut metrics = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("falco_nats_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        metrics.push(name);
    }
    let mut labels = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("by (") {
        let inside = &rest[i + 4..];
        let end = inside.find(')').unwrap();
        labels.extend(
            inside[..end]
                .split(',')
                .map(|l| l.trim().to_owned())
                .filter(|l| l != "le" && l != "pod" && l != "namespace"),
        );
        rest = &inside[end..];
    }
    (metrics, labels)
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_exists() {
    let nats = NatsServer::start();
    // A bridge on HTTP with JetStream, fed a good alert and a bad one.
    let mut options = grpc_options(std::path::Path::new("/unused"), &nats.url());
    options.input = InputOptions::Http(HttpOptions::default());
    options.publish.jetstream = Some(jetstream_options());
    let bridge = RunningBridge::start_ready(options).await;
    let mut factory = AlertFactory::new("node-d", false);
    let alert = factory.next_json();
    assert_eq!(http_post(bridge.http, &[], alert.as_bytes()).await.0, 200);
    assert_eq!(http_post(bridge.http, &[], b"not json").await.0, 400);
    wait_for("the alert stored", WAIT, || async {
        bridge.metric("falco_nats_alerts_published_total").await >= 1.0
    })
    .await;

    // A responder that decides about it.
    let kube = KubeApi::start().await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probes = listener.local_addr().unwrap();
    let responder = tokio::spawn(falco_nats::respond::run(
        respond_options(&nats.url(), &kubeconfig(&kube)),
        Some(listener),
        stop.clone(),
    ));
    wait_for("the responder ready", WAIT, || async {
        http_get(probes, "/readyz").await.0 == 200
    })
    .await;
    let client = nats.client().await;
    client
        .publish("falco.critical.x", factory.next_json().into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    // A decision is counted when it is made, after the alert is.
    wait_for("a decision", WAIT, || async {
        metric_value(
            &http_get(probes, "/metrics").await.1,
            "falco_nats_respond_decision_latency_seconds_count",
        ) >= 1.0
    })
    .await;

    // And a ui, whose metrics the docs name.
    let ui = crate::support::ui::Ui::start(&nats.url(), None).await;
    let mut exposed = families(&http_get(bridge.http, "/metrics").await.1);
    for source in [probes, ui.addr] {
        for (name, labels) in families(&http_get(source, "/metrics").await.1) {
            exposed.entry(name).or_default().extend(labels);
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/falco-nats.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut checked = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let (metrics, labels) = query_parts(expr);
            assert!(!metrics.is_empty(), "a query without a metric: {expr}");
            for metric in metrics {
                let family = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| metric.strip_suffix(s).filter(|f| exposed.contains_key(*f)))
                    .unwrap_or(&metric);
                let Some(have) = exposed.get(family) else {
                    panic!(
                        "{:?} queries {metric}, which no /metrics has",
                        panel["title"]
                    );
                };
                // Labels are only seen on families with samples.
                if !have.is_empty() {
                    for label in &labels {
                        assert!(
                            have.contains(label),
                            "{:?} groups {metric} by {label}, which its samples lack: {have:?}",
                            panel["title"]
                        );
                    }
                }
                checked.insert(family.to_owned());
            }
        }
    }
    // The list: input and priority, latency, queue, NATS connection
    // and reconnects, possible loss, decisions by action and outcome.
    for needed in [
        "falco_nats_alerts_accepted",
        "falco_nats_publish_latency_seconds",
        "falco_nats_queue_depth",
        "falco_nats_nats_connected",
        "falco_nats_nats_reconnects",
        "falco_nats_alerts_possibly_lost",
        "falco_nats_respond_decisions",
    ] {
        assert!(checked.contains(needed), "the dashboard lacks {needed}");
    }
    // Every metric the README and docs/ name exists too.
    let mut unknown = BTreeSet::new();
    for file in crate::support::manifests::markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let (named, _) = query_parts(&text);
        for metric in named {
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| metric.strip_suffix(s).filter(|f| exposed.contains_key(*f)))
                .unwrap_or(&metric);
            // A prefix in prose (`falco_nats_respond_*`) names no metric;
            // `sources`' own are checked where it runs (sources.rs).
            if !exposed.contains_key(family)
                && !text.contains(&format!("{metric}*"))
                && !metric.starts_with("falco_nats_sources_")
            {
                unknown.insert(format!("{}: {metric}", file.display()));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics the docs name that no /metrics has: {unknown:?}"
    );
    ui.stop().await;
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, responder).await;
    bridge.stop().await.unwrap();
}
