//! `falco-nats sources`: in the leaf layout, nodes come and go without a
//! hand edit. The hub's stream (`FALCO_ALL`) sources each node's stream
//! `FALCO` through the node's JetStream domain, and NATS has no wildcard
//! over domains; this keeps those sources equal to the Kubernetes nodes.
//!
//! - The nodes are listed (metadata only, `--node-selector` to narrow
//!   them) every `--resync`, and at once when the API's watch says one was
//!   added or deleted. A node's domain is its name with dots made dashes,
//!   as the leaf container sets it.
//! - A node joins at once. A node that is gone (deleted, no longer
//!   matching) leaves after `--remove-after`, so a node replaced under the
//!   same name, or a list that briefly misses one, drops nothing; its
//!   alerts already on the hub stay there.
//! - Only the sources it manages change: those named `--source-stream`
//!   with the API prefix `$JS.<domain>.API`. Any other source an operator
//!   added is kept as it is.
//! - The stream is made when missing, with the settings of
//!   `deploy/components/leaf/hub-stream.sh`.
//! - It needs little: to list and watch nodes, and on NATS the stream's
//!   INFO, CREATE and UPDATE (the user `sources` in the shipped
//!   configuration).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::kubernetes::ClusterError;
use crate::nats::{connect, ConnectionWatch, NatsError, NatsOptions};
use crate::server::Listen;
use crate::telemetry::health::{self, Readiness};
use crate::telemetry::logging::chain;

/// The default `--listen` address (the ui's plus one).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:2813";

/// What `sources` needs.
#[derive(Debug, Clone)]
pub struct SourcesOptions {
    pub nats: NatsOptions,
    /// The hub's stream: `FALCO_ALL`.
    pub stream: String,
    /// Each node's stream, on its leaf: `FALCO`.
    pub source_stream: String,
    /// A label selector: only the nodes it matches (where Falco runs).
    pub node_selector: Option<String>,
    /// How long a node is gone before its source is removed.
    pub remove_after: Duration,
    /// How often the nodes are listed without a watch event.
    pub resync: Duration,
    /// Replicas of the stream, when it is made (1, 3 or 5).
    pub replicas: usize,
    /// Age of the stream's alerts, when it is made.
    pub max_age: Duration,
    pub kubeconfig: Option<PathBuf>,
    /// Longest wait for one Kubernetes or JetStream call.
    pub timeout: Duration,
}

/// Why `sources` stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Kubernetes(#[from] ClusterError),
}

/// Why one reconciliation failed (it is tried again).
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("cannot list the nodes")]
    List(#[source] kube::Error),
    #[error("cannot read the stream {0:?}")]
    Info(String, #[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot make the stream {0:?}")]
    Create(String, #[source] jetstream::context::CreateStreamError),
    #[error("cannot update the stream {0:?}'s sources")]
    Update(String, #[source] jetstream::context::UpdateStreamError),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// A node's JetStream domain as the leaf container makes it, the name's
/// dots made dashes; `None` for a name that is not a Kubernetes node name
/// (lower-case letters, digits, `-`, `.`; at most 253).
pub fn domain_of(node: &str) -> Option<String> {
    let valid = !node.is_empty()
        && node.len() <= 253
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    valid.then(|| node.replace('.', "-"))
}

/// The API prefix of a node's domain.
fn api_prefix(domain: &str) -> String {
    format!("$JS.{domain}.API")
}

/// The domain of a source this manages: named `source_stream`, sourced
/// through `$JS.<domain>.API`.
fn managed_domain<'a>(source: &'a stream::Source, source_stream: &str) -> Option<&'a str> {
    if source.name != source_stream {
        return None;
    }
    let api = &source.external.as_ref()?.api_prefix;
    let domain = api.strip_prefix("$JS.")?.strip_suffix(".API")?;
    domain_of(domain).filter(|d| d == domain).map(|_| domain)
}

/// The stream's sources with the managed ones made `desired`, the others
/// kept, in a stable order; `None` when nothing changes.
pub fn plan(
    current: &[stream::Source],
    source_stream: &str,
    desired: &BTreeSet<String>,
) -> Option<Vec<stream::Source>> {
    // Each managed source by its domain, read once (thousands of them).
    let managed: BTreeMap<&str, &stream::Source> = current
        .iter()
        .filter_map(|s| Some((managed_domain(s, source_stream)?, s)))
        .collect();
    if managed.len() == desired.len() && desired.iter().all(|d| managed.contains_key(d.as_str())) {
        return None;
    }
    let mut sources: Vec<stream::Source> = current
        .iter()
        .filter(|s| managed_domain(s, source_stream).is_none())
        .cloned()
        .collect();
    // A source that stays is kept as it is (a filter or start an operator
    // gave it); a new one is plain.
    sources.extend(desired.iter().map(|domain| {
        managed
            .get(domain.as_str())
            .map(|s| (*s).clone())
            .unwrap_or_else(|| stream::Source {
                name: source_stream.to_owned(),
                external: Some(stream::External {
                    api_prefix: api_prefix(domain),
                    delivery_prefix: None,
                }),
                ..Default::default()
            })
    }));
    Some(sources)
}

/// The nodes' domains and when each was last seen.
#[derive(Debug, Default)]
pub struct Seen {
    at: BTreeMap<String, Instant>,
    /// The domains of the last list of nodes.
    listed: BTreeSet<String>,
}

impl Seen {
    /// `domains` are there, seen now unless seen before.
    pub fn notice<'a>(&mut self, domains: impl IntoIterator<Item = &'a String>, now: Instant) {
        for domain in domains {
            self.at.entry(domain.clone()).or_insert(now);
        }
    }

    /// The nodes were listed: these are all there are.
    pub fn listed(&mut self, domains: &BTreeSet<String>, now: Instant) {
        for domain in domains {
            self.at.insert(domain.clone(), now);
        }
        self.listed.clone_from(domains);
    }

    /// When the first domain gone (not in the last list) runs out of its
    /// grace: the time to look again.
    pub fn next_expiry(&self, remove_after: Duration) -> Option<Instant> {
        self.at
            .iter()
            .filter(|(domain, _)| !self.listed.contains(*domain))
            .map(|(_, seen)| *seen + remove_after)
            .min()
    }

    /// The domains seen within `remove_after`; the others are forgotten.
    pub fn desired(&mut self, now: Instant, remove_after: Duration) -> BTreeSet<String> {
        self.at
            .retain(|_, seen| now.saturating_duration_since(*seen) <= remove_after);
        self.at.keys().cloned().collect()
    }
}

/// `sources`' metrics.
#[derive(Clone, Default)]
struct Metrics {
    nodes: Gauge,
    sources: Gauge,
    updates: Counter,
    errors: Family<[(&'static str, &'static str); 1], Counter>,
    skipped: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("falco_nats_sources");
        r.register(
            "nodes",
            "Nodes listed (matching --node-selector)",
            m.nodes.clone(),
        );
        r.register(
            "sources",
            "Sources of the hub's stream this keeps",
            m.sources.clone(),
        );
        r.register(
            "updates",
            "Updates of the hub stream's sources",
            m.updates.clone(),
        );
        r.register(
            "errors",
            "Reconciliations that failed, by what failed",
            m.errors.clone(),
        );
        r.register(
            "skipped_nodes",
            "Nodes whose name is not a node name (never a source)",
            m.skipped.clone(),
        );
        for stage in ["list", "stream", "update"] {
            drop(m.errors.get_or_create(&[("stage", stage)]));
        }
        m
    }
}

/// Runs until `shutdown`, serving probes and metrics on `listener`.
pub async fn run(
    options: SourcesOptions,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), SourcesError> {
    let mut registry = Registry::default();
    let readiness = Readiness::default();
    let watch = ConnectionWatch::register(&readiness, &mut registry);
    let reconciled = readiness.check("sources");
    let detail = readiness.detail("sources");
    let metrics = Metrics::register(&mut registry);
    let kube = crate::kubernetes::client(options.kubeconfig.as_deref(), options.timeout).await?;
    let watching =
        crate::kubernetes::watch_client(options.kubeconfig.as_deref(), options.timeout).await?;
    let client = connect(&options.nats, watch).await?.client;
    let http_metrics = crate::telemetry::metrics::HttpServerMetrics::new(&mut registry);
    let server = Listen::probes(
        listener,
        health::router(readiness, Arc::new(registry)),
        http_metrics,
    );
    let nodes: Api<Node> = Api::all(kube);
    let changed = Arc::new(Notify::new());
    let watcher = tokio::spawn(watch_nodes(
        Api::all(watching),
        options.node_selector.clone(),
        Arc::clone(&changed),
        shutdown.clone(),
    ));
    let mut js = jetstream::new(client);
    js.set_timeout(options.timeout);
    let mut keeper = Keeper {
        js,
        nodes,
        options,
        seen: Seen::default(),
        metrics,
    };
    tracing::info!(stream = %keeper.options.stream, source_stream = %keeper.options.source_stream, selector = ?keeper.options.node_selector, "keeping the hub stream's sources equal to the nodes");
    let mut resync = tokio::time::interval(keeper.options.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    // After a failure, no sooner than this.
    let mut not_before = tokio::time::Instant::now();
    loop {
        // A node gone is removed when its grace runs out, not a resync later.
        let expiry = keeper
            .seen
            .next_expiry(keeper.options.remove_after)
            .map(|at| {
                tokio::time::Instant::from_std(at + Duration::from_millis(10)).max(not_before)
            });
        let expired = async {
            match expiry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = resync.tick() => {}
            _ = expired => {}
            _ = changed.notified() => {
                // Nodes come in groups (a scale-up): one list for them.
                tokio::select! {
                    _ = tokio::time::sleep(DEBOUNCE) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
        let step = tokio::time::timeout(keeper.options.timeout * 4, keeper.reconcile()).await;
        match step.unwrap_or(Err(StepError::TimedOut(keeper.options.timeout * 4))) {
            Ok(text) => {
                reconciled.set(true);
                detail.set(text);
                backoff.reset();
            }
            Err(e) => {
                let stage = match e {
                    StepError::List(_) => "list",
                    StepError::Update(..) => "update",
                    _ => "stream",
                };
                keeper
                    .metrics
                    .errors
                    .get_or_create(&[("stage", stage)])
                    .inc();
                let delay = backoff.next_delay();
                tracing::warn!(error = %chain(&e), ?delay, "cannot reconcile the sources; trying again");
                reconciled.set(false);
                detail.set(chain(&e));
                not_before = tokio::time::Instant::now() + delay;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    watcher.abort();
    server.stop().await;
    Ok(())
}

/// Nodes listed at a time.
const LIST_PAGE: u32 = 500;

/// How long to wait after a watch event for the ones that follow it.
const DEBOUNCE: Duration = Duration::from_millis(500);

/// The state between reconciliations.
struct Keeper {
    js: jetstream::Context,
    nodes: Api<Node>,
    options: SourcesOptions,
    seen: Seen,
    metrics: Metrics,
}

impl Keeper {
    /// Lists the nodes and sets the stream's sources; what it holds now,
    /// for `/readyz`.
    async fn reconcile(&mut self) -> Result<String, StepError> {
        let options = &self.options;
        let mut list = ListParams::default().limit(LIST_PAGE);
        if let Some(selector) = &options.node_selector {
            list = list.labels(selector);
        }
        let mut names = Vec::new();
        loop {
            let page = self
                .nodes
                .list_metadata(&list)
                .await
                .map_err(StepError::List)?;
            names.extend(page.items.into_iter().filter_map(|n| n.metadata.name));
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => list = list.continue_token(&token),
                _ => break,
            }
        }
        let now = Instant::now();
        let mut domains = BTreeSet::new();
        for name in &names {
            match domain_of(name) {
                Some(domain) => {
                    if !domains.insert(domain.clone()) {
                        // Their leaves would claim one JetStream domain.
                        tracing::warn!(node = ?name, %domain, "two nodes' names make one domain; one source serves whichever leaf answers");
                    }
                }
                None => {
                    self.metrics.skipped.inc();
                    tracing::warn!(node = ?name, "not a node name: no source for it");
                }
            }
        }
        self.metrics.nodes.set(domains.len() as i64);
        let config = self.stream().await?.cached_info().config.clone();
        let current = config.sources.clone().unwrap_or_default();
        let before: BTreeSet<String> = current
            .iter()
            .filter_map(|s| managed_domain(s, &options.source_stream))
            .map(str::to_owned)
            .collect();
        // A source found in the stream (its own restart, an operator's
        // hand) that no list named yet has its grace from now.
        self.seen.notice(&before, now);
        let managed = before.len();
        if domains.is_empty() && managed > 0 {
            // Every node gone at once is a selector that matches nothing, or
            // another cluster: never a reason to unhook them all.
            tracing::error!(sources = managed, selector = ?options.node_selector, "the list names no node; keeping every source");
            return Ok(format!(
                "no node listed; keeping the {managed} sources (does --node-selector match?)"
            ));
        }
        self.seen.listed(&domains, now);
        let desired = self.seen.desired(now, options.remove_after);
        if let Some(sources) = plan(&current, &options.source_stream, &desired) {
            let added: Vec<&String> = desired.difference(&before).collect();
            let removed: Vec<&String> = before.difference(&desired).collect();
            let update = stream::Config {
                sources: Some(sources),
                ..config
            };
            self.js
                .update_stream(&update)
                .await
                .map_err(|e| StepError::Update(options.stream.clone(), e))?;
            self.metrics.updates.inc();
            tracing::info!(
                ?added,
                ?removed,
                sources = desired.len(),
                "the hub stream's sources follow the nodes"
            );
        }
        self.metrics.sources.set(desired.len() as i64);
        let gone = desired.len().saturating_sub(domains.len());
        Ok(format!(
            "{} nodes, {} sources{}",
            domains.len(),
            desired.len(),
            match gone {
                0 => String::new(),
                n => format!(" ({n} of nodes gone, kept for --remove-after)"),
            }
        ))
    }

    /// The hub's stream, made (with no source yet) when missing.
    async fn stream(&self) -> Result<stream::Stream, StepError> {
        let name = &self.options.stream;
        match self.js.get_stream(name).await {
            Ok(stream) => Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(js)
                        if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                let config = stream::Config {
                    name: name.clone(),
                    storage: stream::StorageType::File,
                    num_replicas: self.options.replicas,
                    max_age: self.options.max_age,
                    // The bridge's stream's duplicate window.
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                };
                tracing::info!(stream = %name, replicas = self.options.replicas, "making the hub's stream");
                self.js
                    .create_stream(config)
                    .await
                    .map_err(|e| StepError::Create(name.clone(), e))
            }
            Err(e) => Err(StepError::Info(name.clone(), Box::new(e))),
        }
    }
}

/// Watches the nodes (metadata only) and says when one is added or
/// deleted; a watch that ends or fails is started again.
async fn watch_nodes(
    nodes: Api<Node>,
    selector: Option<String>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut params = WatchParams::default().timeout(290);
    if let Some(selector) = &selector {
        params = params.labels(selector);
    }
    let mut version = "0".to_owned();
    loop {
        let started = nodes.watch_metadata(&params, &version).await;
        match started {
            Ok(events) => {
                let mut events = std::pin::pin!(events);
                loop {
                    let event = tokio::select! {
                        event = events.next() => event,
                        _ = shutdown.cancelled() => return,
                    };
                    match event {
                        Some(Ok(WatchEvent::Added(node) | WatchEvent::Deleted(node))) => {
                            if let Some(v) = node.metadata.resource_version {
                                version = v;
                            }
                            changed.notify_one();
                        }
                        Some(Ok(WatchEvent::Modified(node))) => {
                            if let Some(v) = node.metadata.resource_version {
                                version = v;
                            }
                        }
                        Some(Ok(WatchEvent::Bookmark(mark))) => {
                            version = mark.metadata.resource_version;
                        }
                        // Too old a version (410): from the start again.
                        Some(Ok(WatchEvent::Error(status))) => {
                            tracing::debug!(error = ?status, "the node watch ends");
                            version = "0".to_owned();
                            break;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %chain(&e), "the node watch failed; watching again");
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(e) => tracing::warn!(error = %chain(&e), "cannot watch the nodes; trying again"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(name: &str, api: &str) -> stream::Source {
        stream::Source {
            name: name.into(),
            external: Some(stream::External {
                api_prefix: api.into(),
                delivery_prefix: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_nodes_domain_is_its_name_with_dots_made_dashes() {
        assert_eq!(
            domain_of("ip-10-0-1-5.ec2.internal").as_deref(),
            Some("ip-10-0-1-5-ec2-internal")
        );
        assert_eq!(domain_of("node-a").as_deref(), Some("node-a"));
        for bad in [
            "",
            "Node",
            "a b",
            "a*",
            "a>",
            "a/b",
            "a\u{0}",
            &"a".repeat(254),
        ] {
            assert_eq!(domain_of(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_plan_sets_the_managed_sources_and_keeps_the_others() {
        let current = vec![
            source("FALCO", "$JS.node-a.API"),
            source("FALCO", "$JS.node-b.API"),
            // An operator's: another stream, another prefix form.
            source("AUDIT", "$JS.node-a.API"),
            source("FALCO", "$JS.other.API.x"),
        ];
        let same: BTreeSet<String> = ["node-a".into(), "node-b".into()].into();
        assert_eq!(plan(&current, "FALCO", &same), None, "nothing changes");
        let desired: BTreeSet<String> = ["node-b".into(), "node-c".into()].into();
        let planned = plan(&current, "FALCO", &desired).unwrap();
        let apis: Vec<(&str, &str)> = planned
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.external.as_ref().unwrap().api_prefix.as_str(),
                )
            })
            .collect();
        assert_eq!(
            apis,
            [
                ("AUDIT", "$JS.node-a.API"),
                ("FALCO", "$JS.other.API.x"),
                ("FALCO", "$JS.node-b.API"),
                ("FALCO", "$JS.node-c.API"),
            ]
        );
        assert_eq!(plan(&[], "FALCO", &BTreeSet::new()), None);
        // A source that stays keeps what an operator gave it.
        let mut filtered = source("FALCO", "$JS.node-b.API");
        filtered.filter_subject = Some("falco.critical.>".into());
        let planned = plan(&[filtered.clone()], "FALCO", &desired).unwrap();
        assert_eq!(planned[0], filtered);
    }

    #[test]
    fn a_node_gone_leaves_after_its_grace() {
        let mut seen = Seen::default();
        let start = Instant::now();
        let both: BTreeSet<String> = ["a".into(), "b".into()].into();
        seen.listed(&both, start);
        let grace = Duration::from_secs(600);
        assert_eq!(seen.next_expiry(grace), None, "nothing is gone");
        let only_a: BTreeSet<String> = ["a".into()].into();
        seen.listed(&only_a, start + Duration::from_secs(300));
        assert_eq!(seen.next_expiry(grace), Some(start + grace), "b's grace");
        assert_eq!(seen.desired(start + Duration::from_secs(300), grace), both);
        assert_eq!(seen.desired(start + Duration::from_secs(600), grace), both);
        assert_eq!(
            seen.desired(start + Duration::from_secs(601), grace),
            only_a
        );
        // Back before its grace ran out: it never left.
        seen.listed(&both, start + Duration::from_secs(700));
        assert_eq!(seen.desired(start + Duration::from_secs(800), grace), both);
        assert_eq!(seen.next_expiry(grace), None);
        // Noticed in the stream (a restart, a hand): a grace from then on,
        // not renewed by noticing it again.
        let mut seen = Seen::default();
        let c: BTreeSet<String> = ["c".into()].into();
        seen.notice(&c, start);
        seen.notice(&c, start + grace);
        seen.listed(&BTreeSet::new(), start + grace);
        assert_eq!(seen.next_expiry(grace), Some(start + grace));
    }
}
