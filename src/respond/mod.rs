//! `falco-nats respond`: takes alerts off NATS and acts on the offending pod
//! under a [`policy::Policy`], behind [`rails::Rails`], and makes every
//! decision visible ([`audit`]).
//!
//! Core NATS: a queue group shares the alerts among replicas. JetStream: a
//! durable pull consumer, acknowledged only once an alert's actions are done
//! (or decided against), so a crash loses nothing.

pub mod alert;
pub mod audit;
pub mod cluster;
pub mod policy;
pub mod rails;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::output::{connect, ConnectionWatch, NatsError, NatsOptions};
use crate::telemetry::health::{self, Readiness, ReadyFlag};
use alert::{Alert, PodRef};
use audit::{Audit, Decision, Outcome, RespondMetrics};
use cluster::{Applied, Cluster, ClusterError};
use policy::{ActionSpec, Policy, PolicyRule};
use rails::{Rails, RailsConfig, SkipReason};

/// Where alerts come from.
#[derive(Debug, Clone)]
pub enum Subscription {
    /// Core NATS, shared among replicas by a queue group.
    Core { subject: String, queue: String },
    /// A durable JetStream pull consumer.
    JetStream {
        stream: String,
        durable: String,
        subject: String,
        ack_wait: Duration,
    },
}

/// Everything the responder needs.
pub struct RespondOptions {
    pub nats: NatsOptions,
    pub subscription: Subscription,
    pub policy: Policy,
    pub rails: RailsConfig,
    /// Decide and report only; nothing is written to Kubernetes.
    pub dry_run: bool,
    /// Results go to `<prefix>.<action>`; alerts on these subjects are ignored.
    pub result_prefix: String,
    /// A kubeconfig to use instead of the usual discovery.
    pub kubeconfig: Option<PathBuf>,
}

/// Why the responder stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RespondError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot subscribe: {0}")]
    Subscribe(String),
}

/// Decides and acts on alerts.
pub struct Responder {
    policy: Policy,
    rails: Rails,
    cluster: Arc<Cluster>,
    dry_run: bool,
    audit: Audit,
}

fn base_decision(subject: &str, received: Instant) -> Decision {
    Decision {
        action: "none",
        outcome: Outcome::Skipped,
        reason: String::new(),
        policy_rule: None,
        rule: None,
        priority: None,
        namespace: None,
        pod: None,
        pod_uid: None,
        hostname: None,
        alert_time: None,
        subject: subject.to_owned(),
        dry_run: false,
        latency_ms: received.elapsed().as_secs_f64() * 1000.0,
    }
}

impl Responder {
    /// Handles one alert; returns its decisions (after publishing them).
    pub async fn handle(&self, subject: &str, payload: &[u8]) -> Vec<Decision> {
        let received = Instant::now();
        self.audit.metrics.alerts.inc();
        let alert = match Alert::from_json(payload) {
            Ok(alert) => alert,
            Err(e) => {
                let mut d = base_decision(subject, received);
                d.reason = format!("{}: {e}", SkipReason::Malformed.as_str());
                self.audit.record(&d, None, false).await;
                return vec![d];
            }
        };
        let rules = self.policy.evaluate(&alert);
        if rules.is_empty() {
            let mut d = self.decision_for(&alert, None, subject, received);
            d.reason = SkipReason::NoPolicyMatch.as_str().to_owned();
            self.audit.record(&d, None, false).await;
            return vec![d];
        }
        let mut decisions = Vec::new();
        for rule in rules {
            for action in &rule.actions {
                let (mut d, pod, event) = self.apply(&alert, rule, action, subject, received).await;
                d.latency_ms = received.elapsed().as_secs_f64() * 1000.0;
                self.audit.record(&d, pod.as_ref(), event).await;
                decisions.push(d);
            }
        }
        decisions
    }

    fn decision_for(
        &self,
        alert: &Alert,
        rule: Option<&PolicyRule>,
        subject: &str,
        received: Instant,
    ) -> Decision {
        let pod = alert.pod();
        Decision {
            policy_rule: rule.map(|r| r.name.clone()),
            rule: Some(alert.rule.clone()),
            priority: Some(alert.priority.as_str().to_owned()),
            namespace: pod.as_ref().map(|p| p.namespace.clone()),
            pod: pod.as_ref().map(|p| p.name.clone()),
            pod_uid: pod.and_then(|p| p.uid),
            hostname: Some(alert.hostname.clone()).filter(|h| !h.is_empty()),
            alert_time: Some(alert.time.clone()).filter(|t| !t.is_empty()),
            dry_run: self.dry_run || rule.is_some_and(|r| r.dry_run),
            ..base_decision(subject, received)
        }
    }

    /// Decides on and carries out one action: the decision, the pod it is
    /// about, and whether a Kubernetes Event may be written for it.
    async fn apply(
        &self,
        alert: &Alert,
        rule: &PolicyRule,
        action: &ActionSpec,
        subject: &str,
        received: Instant,
    ) -> (Decision, Option<PodRef>, bool) {
        let mut d = self.decision_for(alert, Some(rule), subject, received);
        d.action = action.name();
        let dry_run = d.dry_run;
        let skip = |mut d: Decision, reason: SkipReason| {
            d.outcome = Outcome::Skipped;
            d.reason = reason.as_str().to_owned();
            d
        };
        if !action.needs_pod() {
            d.outcome = if dry_run {
                Outcome::DryRun
            } else {
                Outcome::Done
            };
            d.reason = "logged".into();
            return (d, None, false);
        }
        let Some(mut pod) = alert.pod() else {
            return (skip(d, SkipReason::NoPod), None, false);
        };
        if let Err(reason) = self.rails.check_namespace(&pod.namespace) {
            return (skip(d, reason), Some(pod), false);
        }
        let key = (
            pod.namespace.clone(),
            pod.name.clone(),
            alert.rule.clone(),
            action.name(),
        );
        if self.rails.is_duplicate(&key) {
            return (skip(d, SkipReason::Duplicate), Some(pod), !dry_run);
        }
        match self.cluster.get_pod(&pod).await {
            Ok(None) => {
                d.outcome = Outcome::Gone;
                d.reason = "the pod does not exist".into();
                return (d, Some(pod), false);
            }
            Ok(Some(found)) => {
                if let Err(reason) = self.rails.check_owner(&found) {
                    return (skip(d, reason), Some(pod), !dry_run);
                }
                // Without a UID in the alert, the one just read still guards
                // against the pod being replaced before the action.
                if pod.uid.is_none() {
                    pod.uid = found.metadata.uid.clone();
                }
            }
            Err(e) => {
                d.outcome = Outcome::Failed;
                d.reason = format!("cannot read the pod: {e}");
                return (d, Some(pod), false);
            }
        }
        if action.is_destructive() {
            if let Err(reason) = self.rails.take_destructive_slot() {
                return (skip(d, reason), Some(pod), !dry_run);
            }
        }
        let what = describe(action);
        if dry_run {
            self.rails.remember(key);
            d.outcome = Outcome::DryRun;
            d.reason = format!("would {what}");
            return (d, Some(pod), false);
        }
        let result = match action {
            ActionSpec::DeletePod {
                grace_period_seconds,
            } => {
                let grace = u32::try_from(*grace_period_seconds).unwrap_or(0);
                self.cluster.delete_pod(&pod, grace).await
            }
            ActionSpec::LabelPod { labels } => self.cluster.label_pod(&pod, labels).await,
            ActionSpec::IsolatePod { labels } => self.cluster.isolate_pod(&pod, labels).await,
            ActionSpec::Log => Ok(Applied::Done),
        };
        let event = match result {
            Ok(Applied::Done) => {
                self.rails.remember(key);
                d.outcome = Outcome::Done;
                d.reason = what;
                true
            }
            Ok(Applied::Gone) => {
                self.rails.remember(key);
                d.outcome = Outcome::Gone;
                d.reason = "the pod no longer exists".into();
                false
            }
            Ok(Applied::Replaced) => {
                d.outcome = Outcome::Replaced;
                d.reason = "the pod was replaced (UID differs); not touched".into();
                false
            }
            Err(e) => {
                d.outcome = Outcome::Failed;
                d.reason = e.to_string();
                true
            }
        };
        (d, Some(pod), event)
    }
}

fn describe(action: &ActionSpec) -> String {
    let labels = |l: &std::collections::BTreeMap<String, String>| {
        l.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    match action {
        ActionSpec::DeletePod {
            grace_period_seconds,
        } => {
            format!("delete the pod (grace period {grace_period_seconds}s)")
        }
        ActionSpec::LabelPod { labels: l } => format!("label the pod {}", labels(l)),
        ActionSpec::IsolatePod { labels: l } => {
            format!(
                "isolate the pod: label {} under a deny-all NetworkPolicy",
                labels(l)
            )
        }
        ActionSpec::Log => "log".into(),
    }
}

/// Runs the responder until `shutdown`, serving probes on `listener`.
pub async fn run(
    options: RespondOptions,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RespondError> {
    let mut registry = Registry::default();
    let metrics = RespondMetrics::new(&mut registry);
    let readiness = Readiness::default();
    let watch = ConnectionWatch {
        ready: readiness.check("nats"),
        ..ConnectionWatch::default()
    };
    // Ready once NATS is connected and the alerts' subscription is in place.
    let subscribed = readiness.check("subscription");
    let cluster = Arc::new(Cluster::connect(options.kubeconfig.as_deref()).await?);
    let client = connect(&options.nats, watch).await?;
    let http_stop = CancellationToken::new();
    let http = listener.map(|l| {
        tokio::spawn(health::serve(
            l,
            health::router(readiness, Arc::new(registry)),
            http_stop.clone(),
        ))
    });
    tracing::info!(
        rules = options.policy.rules.len(),
        dry_run = options.dry_run,
        "responder starting"
    );
    let responder = Responder {
        policy: options.policy,
        rails: Rails::new(options.rails),
        cluster: cluster.clone(),
        dry_run: options.dry_run,
        audit: Audit {
            client: client.clone(),
            prefix: options.result_prefix.clone(),
            metrics,
            cluster,
        },
    };
    let ignore = format!("{}.", options.result_prefix);
    let result = match options.subscription {
        Subscription::Core { subject, queue } => {
            consume_core(
                &client,
                &responder,
                subject,
                queue,
                &ignore,
                &subscribed,
                &shutdown,
            )
            .await
        }
        Subscription::JetStream {
            stream,
            durable,
            subject,
            ack_wait,
        } => {
            let consumer =
                durable_consumer(&client, &stream, &durable, &subject, ack_wait, &shutdown).await?;
            match consumer {
                Some(c) => consume_jetstream(c, &responder, &ignore, &subscribed, &shutdown).await,
                None => Ok(()),
            }
        }
    };
    if let Err(e) = crate::output::round_trip(&client).await {
        tracing::warn!(error = %e, "cannot confirm that NATS received the last results");
    }
    http_stop.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    result
}

async fn consume_core(
    client: &async_nats::Client,
    responder: &Responder,
    subject: String,
    queue: String,
    ignore: &str,
    subscribed: &ReadyFlag,
    shutdown: &CancellationToken,
) -> Result<(), RespondError> {
    let mut sub = client
        .queue_subscribe(subject.clone(), queue.clone())
        .await
        .map_err(|e| RespondError::Subscribe(e.to_string()))?;
    // Ready only once the server has the subscription.
    match crate::output::round_trip(client).await {
        Ok(()) => subscribed.set(true),
        Err(e) => tracing::warn!(error = %e, "cannot confirm the subscription yet"),
    }
    tracing::info!(%subject, %queue, "responding to alerts (core NATS, queue group)");
    loop {
        let message = tokio::select! {
            m = sub.next() => m,
            _ = shutdown.cancelled() => break,
        };
        let Some(message) = message else { break };
        if message.subject.as_str().starts_with(ignore) {
            continue;
        }
        responder
            .handle(message.subject.as_str(), &message.payload)
            .await;
    }
    Ok(())
}

/// The durable consumer, waiting (with backoff) for the stream to exist.
async fn durable_consumer(
    client: &async_nats::Client,
    stream: &str,
    durable: &str,
    subject: &str,
    ack_wait: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<consumer::PullConsumer>, RespondError> {
    let js = jetstream::new(client.clone());
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let config = consumer::pull::Config {
        durable_name: Some(durable.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        // The whole stream unless a narrower subject is asked for.
        filter_subject: match subject {
            "" | ">" | "falco.>" => String::new(),
            s => s.to_owned(),
        },
        ..Default::default()
    };
    loop {
        let attempt = async {
            let stream = js.get_stream(stream).await.map_err(|e| e.to_string())?;
            stream
                .get_or_create_consumer(durable, config.clone())
                .await
                .map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(c) => {
                tracing::info!(
                    stream,
                    durable,
                    "responding to alerts (JetStream durable consumer)"
                );
                return Ok(Some(c));
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(stream, durable, error = %e, ?delay, "JetStream consumer not available; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
            }
        }
    }
}

async fn consume_jetstream(
    consumer: consumer::PullConsumer,
    responder: &Responder,
    ignore: &str,
    subscribed: &ReadyFlag,
    shutdown: &CancellationToken,
) -> Result<(), RespondError> {
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| RespondError::Subscribe(e.to_string()))?;
    subscribed.set(true);
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            _ = shutdown.cancelled() => break,
        };
        match next {
            Some(Ok(message)) => {
                if !message.subject.as_str().starts_with(ignore) {
                    responder
                        .handle(message.subject.as_str(), &message.payload)
                        .await;
                }
                // Acknowledged only now that the actions are done.
                if let Err(e) = message.ack().await {
                    tracing::warn!(error = %e, "cannot acknowledge an alert; it will be redelivered");
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "JetStream consumer error"),
            None => break,
        }
    }
    Ok(())
}
