//! Every decision is visible: a JSON result on NATS (`falco.response.<action>`),
//! a metric with bounded labels, a log line, and a Kubernetes Event on the pod.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::alert::PodRef;
use super::cluster::Cluster;
use crate::nats::subject::slug;

/// The result of one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The action was carried out.
    Done,
    /// A dry run: the action would have been carried out.
    DryRun,
    /// The action was decided against; `reason` says why.
    Skipped,
    /// The Kubernetes API refused or failed.
    Failed,
    /// The pod no longer existed.
    Gone,
    /// The pod had been replaced (UID mismatch) and was not touched.
    Replaced,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::DryRun => "dry_run",
            Outcome::Skipped => "skipped",
            Outcome::Failed => "failed",
            Outcome::Gone => "gone",
            Outcome::Replaced => "replaced",
        }
    }
}

/// One decision about one action for one alert: the NATS result message.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// `delete-pod`, `label-pod`, `isolate-pod`, `log`, or `none`.
    pub action: &'static str,
    pub outcome: Outcome,
    /// Why: a skip reason, the error, or what was (or would have been) done.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_time: Option<String>,
    /// The subject the alert arrived on.
    pub subject: String,
    pub dry_run: bool,
    /// Time from receiving the alert to this decision.
    pub latency_ms: f64,
}

/// The responder's metrics.
#[derive(Clone)]
pub struct RespondMetrics {
    pub alerts: Counter,
    pub decisions: Family<[(&'static str, &'static str); 2], Counter>,
    pub latency: Histogram,
    pub event_failures: Counter,
    pub retries: Counter,
}

impl RespondMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = RespondMetrics {
            alerts: Counter::default(),
            decisions: Family::default(),
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            event_failures: Counter::default(),
            retries: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("falco_nats_respond");
        r.register(
            "alerts",
            "Alerts received by the responder",
            m.alerts.clone(),
        );
        r.register(
            "decisions",
            "Decisions, by action and outcome",
            m.decisions.clone(),
        );
        r.register(
            "decision_latency_seconds",
            "Time from receiving an alert to a decision",
            m.latency.clone(),
        );
        r.register(
            "event_failures",
            "Kubernetes Events that could not be recorded",
            m.event_failures.clone(),
        );
        r.register(
            "retries",
            "Alerts handed back to JetStream for another delivery after a transient failure",
            m.retries.clone(),
        );
        m
    }
}

/// Publishes, counts, logs and records decisions.
pub struct Audit {
    pub client: async_nats::Client,
    /// Results go to `<prefix>.<action>`.
    pub prefix: String,
    pub metrics: RespondMetrics,
    pub cluster: Arc<Cluster>,
}

/// Which Kubernetes Event a decision gets, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The action was carried out.
    Acted,
    /// The API refused or failed.
    Failed,
}

impl EventKind {
    pub fn reason(self) -> &'static str {
        match self {
            EventKind::Acted => "FalcoNatsActed",
            EventKind::Failed => "FalcoNatsFailed",
        }
    }
}

impl Audit {
    /// Makes one decision visible: counted, logged, published on NATS, and
    /// with `event`, a Kubernetes Event on the pod. Strings that came from
    /// the alert are logged quoted and escaped, so a rule with a newline
    /// cannot forge a log line.
    pub async fn record(&self, decision: &Decision, event: Option<(&PodRef, EventKind)>) {
        self.metrics
            .decisions
            .get_or_create(&[
                ("action", decision.action),
                ("outcome", decision.outcome.as_str()),
            ])
            .inc();
        self.metrics.latency.observe(decision.latency_ms / 1000.0);
        let ns = decision.namespace.as_deref().unwrap_or("-");
        let pod_name = decision.pod.as_deref().unwrap_or("-");
        let rule = decision.rule.as_deref().unwrap_or("-");
        macro_rules! log {
            ($level:ident) => {
                tracing::$level!(
                    action = decision.action,
                    outcome = decision.outcome.as_str(),
                    namespace = ns,
                    pod = pod_name,
                    rule = ?rule,
                    reason = ?decision.reason,
                    "response"
                )
            };
        }
        match decision.outcome {
            Outcome::Failed => log!(error),
            Outcome::Done | Outcome::DryRun => log!(info),
            _ => log!(debug),
        }
        let subject = format!("{}.{}", self.prefix, slug(decision.action));
        match serde_json::to_vec(decision) {
            Ok(body) => {
                if let Err(e) = self.client.publish(subject, body.into()).await {
                    tracing::warn!(error = %e, "cannot publish the response result");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the response result"),
        }
        if let Some((pod, kind)) = event {
            let message = format!(
                "falco-nats {} {}: {} (Falco rule {:?}, {}, policy rule {:?})",
                decision.action,
                decision.outcome.as_str(),
                decision.reason,
                rule,
                decision.priority.as_deref().unwrap_or("-"),
                decision.policy_rule.as_deref().unwrap_or("-"),
            );
            if let Err(e) = self
                .cluster
                .record_event(
                    pod,
                    kind == EventKind::Failed,
                    kind.reason(),
                    decision.action,
                    &message,
                )
                .await
            {
                self.metrics.event_failures.inc();
                tracing::warn!(error = %e, namespace = ns, pod = pod_name, "cannot record a Kubernetes Event");
            }
        }
    }
}
