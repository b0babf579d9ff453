//! `falco-nats sources` on the real control plane and the shipped NATS
//! configuration: nodes are made and deleted on the API server, each with
//! its leaf nats-server from deploy/components/leaf; the hub's FALCO_ALL
//! follows them without a hand edit, with the shipped ServiceAccount's
//! access and the shipped NATS user `sources`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use falco_nats::sources::SourcesOptions;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::support::real_kube::Cluster;
use crate::support::shipped::{self, client_as, passwords, user};
use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// The shipped ServiceAccount and its ClusterRole, on the API server.
async fn apply_sources_access(cluster: &Cluster) {
    cluster.ensure_namespace("falco-nats").await;
    let text =
        std::fs::read_to_string(shipped::deploy().join("components/leaf/sources.yaml")).unwrap();
    let access: Vec<Value> = shipped::yaml_docs(&text)
        .into_iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("ServiceAccount" | "ClusterRole" | "ClusterRoleBinding")
            )
        })
        .collect();
    assert_eq!(access.len(), 3);
    cluster.apply(&access).await.unwrap();
}

/// A node on the API server (no kubelet: a name and labels are enough).
async fn add_node(nodes: &Api<Node>, name: &str, label: &str) {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"falco-nats-test": label}},
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
}

/// The domains FALCO_ALL sources through `$JS.<domain>.API`, and its
/// other sources by name.
async fn sources(admin: &jetstream::Context) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut stream = admin.get_stream("FALCO_ALL").await.unwrap();
    let info = stream.info().await.unwrap();
    let mut domains = BTreeSet::new();
    let mut others = BTreeSet::new();
    for s in info.config.sources.iter().flatten() {
        let api = s
            .external
            .as_ref()
            .map(|e| e.api_prefix.as_str())
            .unwrap_or("");
        match api
            .strip_prefix("$JS.")
            .and_then(|a| a.strip_suffix(".API"))
        {
            Some(domain) if s.name == "FALCO" => {
                domains.insert(domain.to_owned());
            }
            _ => {
                others.insert(s.name.clone());
            }
        }
    }
    (domains, others)
}

async fn wait_sources(admin: &jetstream::Context, want: &[&str], what: &str) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(what, WAIT, || async {
        admin.get_stream("FALCO_ALL").await.is_ok() && sources(admin).await.0 == want
    })
    .await;
}

/// A node's leaf with `count` alerts in its stream FALCO, made and written
/// as the bridge (the leaf's one user) does.
async fn leaf_with_alerts(
    dir: &Path,
    domain: &str,
    leaf_port: u16,
    pw: &std::collections::BTreeMap<String, String>,
    count: usize,
) -> NatsServer {
    let leaf = shipped::start_leaf(dir, domain, leaf_port, pw);
    let bridge = client_as(&leaf.url(), "bridge", &pw["nats-user-bridge"]).await;
    let js = jetstream::new(bridge);
    js.create_stream(stream::Config {
        name: "FALCO".into(),
        subjects: vec!["falco.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for n in 0..count {
        js.publish(
            format!("falco.warning.{domain}"),
            format!("{{\"n\":{n}}}").into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    leaf
}

async fn messages(admin: &jetstream::Context) -> u64 {
    let mut stream = admin.get_stream("FALCO_ALL").await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Nodes come and go; FALCO_ALL follows, with the shipped access on both
/// sides, keeps an operator's own source, and never loses alerts it holds.
#[tokio::test]
async fn the_hub_stream_follows_the_nodes_as_they_come_and_go() {
    const PER_NODE: usize = 20;
    let cluster = Cluster::get();
    apply_sources_access(cluster).await;
    let token = cluster.token("falco-nats", "falco-nats-sources").await;
    let kubeconfig = cluster.kubeconfig("sources", &token);
    let nodes: Api<Node> = Api::all(cluster.admin().await);
    let label = format!("{:08x}", fastrand::u32(..));
    // One name with dots: its domain has dashes, as the leaf container makes it.
    let a = format!("fleet-{label}-a.example.internal");
    let a_domain = a.replace('.', "-");
    let b = format!("fleet-{label}-b");
    let c = format!("fleet-{label}-c");
    add_node(&nodes, &a, &label).await;
    add_node(&nodes, &b, &label).await;
    // A node the selector leaves out.
    let other = format!("fleet-{label}-other");
    add_node(&nodes, &other, "someone-else").await;

    let dir = tempfile::tempdir().unwrap();
    let pw = passwords();
    let (hub, leaf_port) = shipped::start_hub(dir.path(), &pw);
    let admin = jetstream::new(client_as(&hub.url(), "admin", &pw["nats-user-admin"]).await);
    let mut leaves = Vec::new();
    for domain in [&a_domain, &b] {
        leaves.push(leaf_with_alerts(dir.path(), domain, leaf_port, &pw, PER_NODE).await);
    }
    let start = |remove_after: Duration| {
        let options = SourcesOptions {
            nats: user(&hub.url(), "sources", &pw["nats-user-sources"], dir.path()),
            stream: "FALCO_ALL".into(),
            source_stream: "FALCO".into(),
            node_selector: Some(format!("falco-nats-test={label}")),
            remove_after,
            // Only the watch says a node came: no resync within the test.
            resync: Duration::from_secs(3600),
            replicas: 1,
            max_age: Duration::from_secs(7 * 86_400),
            kubeconfig: Some(kubeconfig.clone()),
            timeout: Duration::from_secs(10),
        };
        let stop = CancellationToken::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let task = tokio::spawn(falco_nats::sources::run(
            options,
            Some(listener),
            stop.clone(),
        ));
        (stop, task, addr)
    };
    // It makes FALCO_ALL, sources both nodes, and their alerts arrive.
    let (stop, task, addr) = start(Duration::from_secs(5));
    wait_sources(&admin, &[&a_domain, &b], "both nodes as sources").await;
    wait_for("both nodes' alerts on the hub", WAIT, || async {
        messages(&admin).await == 2 * PER_NODE as u64
    })
    .await;
    let metrics = http_get(addr, "/metrics").await.1;
    assert_eq!(metric_value(&metrics, "falco_nats_sources_sources"), 2.0);
    assert_eq!(metric_value(&metrics, "falco_nats_sources_nodes"), 2.0);
    let (code, body) = http_get(addr, "/readyz").await;
    assert_eq!(code, 200);
    assert!(body.contains("sources: 2 nodes, 2 sources"), "{body}");
    // Every metric of its own the docs name, it has.
    let operating =
        std::fs::read_to_string(shipped::deploy().join("../docs/operating.md")).unwrap();
    let named: BTreeSet<&str> = operating
        .split('`')
        .filter(|s| s.starts_with("falco_nats_sources_"))
        .map(|s| s.split('{').next().unwrap_or(s))
        .collect();
    assert!(named.len() >= 5, "{named:?}");
    for metric in named {
        let family = metric.strip_suffix("_total").unwrap_or(metric);
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "docs/operating.md names {metric}, which sources' /metrics lacks"
        );
    }

    // An operator's own source is kept through every change.
    let mut config = admin
        .get_stream("FALCO_ALL")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    let mut with_own = config.sources.clone().unwrap_or_default();
    with_own.push(stream::Source {
        name: "AUDIT".into(),
        ..Default::default()
    });
    config.sources = Some(with_own);
    admin.update_stream(&config).await.unwrap();

    // A node joins: its source comes with the watch, and its alerts follow.
    leaves.push(leaf_with_alerts(dir.path(), &c, leaf_port, &pw, PER_NODE).await);
    add_node(&nodes, &c, &label).await;
    wait_sources(&admin, &[&a_domain, &b, &c], "the new node as a source").await;
    wait_for("the new node's alerts on the hub", WAIT, || async {
        messages(&admin).await == 3 * PER_NODE as u64
    })
    .await;

    // A node leaves: its source stays through its grace, then goes; what
    // it sent stays.
    nodes.delete(&b, &DeleteParams::default()).await.unwrap();
    wait_for("the deleted node seen gone and kept", WAIT, || async {
        http_get(addr, "/readyz")
            .await
            .1
            .contains("2 nodes, 3 sources (1 of nodes gone, kept for --remove-after)")
    })
    .await;
    assert!(
        sources(&admin).await.0.contains(&b),
        "kept through its grace"
    );
    wait_sources(
        &admin,
        &[&a_domain, &c],
        "the deleted node's source removed",
    )
    .await;
    assert_eq!(messages(&admin).await, 3 * PER_NODE as u64);
    assert_eq!(
        sources(&admin).await.1,
        BTreeSet::from(["AUDIT".to_owned()]),
        "the operator's source is untouched"
    );

    // Restarted while a node goes: the node keeps its source for a grace
    // from the restart, then loses it.
    stop.cancel();
    task.await.unwrap().unwrap();
    nodes.delete(&c, &DeleteParams::default()).await.unwrap();
    let (stop, task, addr) = start(Duration::from_secs(5));
    wait_for("the restarted sources ready", WAIT, || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    assert!(
        sources(&admin).await.0.contains(&c),
        "a restart does not drop a node at once"
    );
    wait_sources(
        &admin,
        &[&a_domain],
        "the node gone during the restart removed",
    )
    .await;

    // Every node gone at once (a selector that matches nothing): no source
    // is taken away.
    nodes.delete(&a, &DeleteParams::default()).await.unwrap();
    wait_for("the empty list seen", WAIT, || async {
        http_get(addr, "/readyz")
            .await
            .1
            .contains("no node listed; keeping the 1 sources")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(sources(&admin).await.0, BTreeSet::from([a_domain.clone()]));

    stop.cancel();
    task.await.unwrap().unwrap();
    nodes
        .delete(&other, &DeleteParams::default())
        .await
        .unwrap();
    drop(leaves);
    drop(hub);
}

/// The shipped user `sources` may read, make and update FALCO_ALL, and
/// nothing else: not delete it, not touch another stream, not read alerts.
#[tokio::test]
async fn the_sources_user_may_keep_falco_all_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let pw = passwords();
    let (hub, _) = shipped::start_hub(dir.path(), &pw);
    // A stream of the hub's that is not FALCO_ALL, and one that would
    // take what `sources` publishes on its inbox.
    let admin = jetstream::new(client_as(&hub.url(), "admin", &pw["nats-user-admin"]).await);
    for (name, subject) in [("FALCO", "falco.>"), ("CAPTURE", "_INBOX_sources.x.>")] {
        admin
            .create_stream(stream::Config {
                name: name.into(),
                subjects: vec![subject.into()],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let client = client_as(&hub.url(), "sources", &pw["nats-user-sources"]).await;
    let js = jetstream::new(client.clone());
    let made = js
        .create_stream(stream::Config {
            name: "FALCO_ALL".into(),
            ..Default::default()
        })
        .await;
    assert!(made.is_ok(), "{made:?}");
    assert!(js.get_stream("FALCO_ALL").await.is_ok());
    for refused in [
        js.delete_stream("FALCO_ALL")
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        js.create_stream(stream::Config {
            name: "OTHER".into(),
            ..Default::default()
        })
        .await
        .map(drop)
        .map_err(|e| e.to_string()),
        js.get_stream("FALCO")
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
    ] {
        assert!(refused.is_err(), "{refused:?}");
    }
    let mut alerts = client.subscribe("falco.>").await.unwrap();
    client.flush().await.unwrap();
    // Nothing of its own to publish on, not even its inbox.
    client
        .publish("_INBOX_sources.x.forged", "{}".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let bridge = client_as(&hub.url(), "bridge", &pw["nats-user-bridge"]).await;
    bridge
        .publish("falco.warning.x", "{}".into())
        .await
        .unwrap();
    bridge.flush().await.unwrap();
    let got = tokio::time::timeout(Duration::from_millis(500), alerts.next()).await;
    assert!(!matches!(got, Ok(Some(_))), "an alert reached `sources`");
    let mut capture = admin.get_stream("CAPTURE").await.unwrap();
    assert_eq!(
        capture.info().await.unwrap().state.messages,
        0,
        "sources published on its inbox"
    );
}
