//! Every decision is visible: a JSON result on NATS (`falco.response.<action>`),
//! a metric with bounded labels, a log line, and for actions taken or failed
//! a Kubernetes Event on the pod. Which decisions get an Event is decided
//! here, in one place.

use std::sync::Arc;
use std::time::Duration;

use super::cluster::Cluster;
use super::rails::Recent;
use crate::alert::PodRef;
use crate::decision::{Decision, Outcome};
use crate::nats::subject::slug;
use crate::telemetry::metrics::RespondMetrics;

/// Publishes, counts, logs and records decisions.
pub struct Audit {
    pub client: async_nats::Client,
    /// Results go to `<prefix>.<action>`.
    pub prefix: String,
    pub metrics: RespondMetrics,
    pub cluster: Arc<Cluster>,
    /// At most one Event per pod (name and UID) and reason within this window.
    pub event_window: Duration,
    pub recent_events: Recent<(PodRef, &'static str)>,
}

/// The Kubernetes Event reason a decision calls for: actions taken and
/// actions failed get one; skips, dry runs and the rest do not.
pub fn event_reason(outcome: Outcome) -> Option<&'static str> {
    match outcome {
        Outcome::Done => Some("FalcoNatsActed"),
        Outcome::Failed => Some("FalcoNatsFailed"),
        _ => None,
    }
}

impl Audit {
    /// Makes one decision visible: counted, logged, published on NATS, and
    /// for an action taken or failed on `pod`, a Kubernetes Event on it (at
    /// most one per pod and reason within the window). Strings that came
    /// from the alert are logged quoted and escaped, so a rule with a
    /// newline cannot forge a log line.
    pub async fn record(&self, decision: &Decision, pod: Option<&PodRef>) {
        let action = decision.action.as_str();
        self.metrics
            .decisions
            .get_or_create(&[("action", action), ("outcome", decision.outcome.as_str())])
            .inc();
        self.metrics.latency.observe(decision.latency_ms / 1000.0);
        let ns = decision.namespace.as_deref().unwrap_or("-");
        let pod_name = decision.pod.as_deref().unwrap_or("-");
        let rule = decision.rule.as_deref().unwrap_or("-");
        macro_rules! log {
            ($level:ident) => {
                tracing::$level!(
                    action,
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
        let subject = format!("{}.{}", self.prefix, slug(action));
        match serde_json::to_vec(decision) {
            Ok(body) => {
                if let Err(e) = self.client.publish(subject, body.into()).await {
                    tracing::warn!(error = %e, "cannot publish the response result");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the response result"),
        }
        if let Some(pod) = pod {
            self.event(decision, pod).await;
        }
    }

    /// The Kubernetes Event a decision calls for on `pod`, if any: at most
    /// one per pod and reason within the window.
    async fn event(&self, decision: &Decision, pod: &PodRef) {
        let Some(reason) = event_reason(decision.outcome) else {
            return;
        };
        if !self
            .recent_events
            .claim((pod.clone(), reason), self.event_window)
        {
            return;
        }
        let action = decision.action.as_str();
        let message = format!(
            "falco-nats {} {}: {} (Falco rule {:?}, {}, policy rule {:?})",
            action,
            decision.outcome.as_str(),
            decision.reason,
            decision.rule.as_deref().unwrap_or("-"),
            decision.priority.map_or("-", |p| p.as_str()),
            decision.policy_rule.as_deref().unwrap_or("-"),
        );
        let warning = decision.outcome == Outcome::Failed;
        let written = self
            .cluster
            .record_event(pod, warning, reason, action, &message)
            .await;
        if let Err(e) = written {
            self.metrics.event_failures.inc();
            tracing::warn!(error = %e, namespace = %pod.namespace, pod = %pod.name, "cannot record a Kubernetes Event");
        }
    }
}
