//! The [`Responder`]: one alert in, a decision per action out. It reads the
//! alert (its signature, its age, its names), asks the policy which actions
//! it calls for, runs each through the guard chain ([`super::guards`]),
//! calls the API, and hands the [`Verdict`] to the audit; what JetStream is
//! told about the message ([`Settle`]) follows from the verdicts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::audit::Audit;
use super::cluster::Cluster;
use super::control::Control;
use super::guards::{Ask, Chain, Limits};
use super::outcome::{Settle, Skip, Skipped, Verdict};
use super::policy::{ActionSpec, Policy, PolicyRule};
use super::rails::Rails;
use crate::alert::{Alert, PodRef};
use crate::decision::{Action, Decision};
use crate::signing::{now_ms, Verifier};

/// Which delivery of an alert this is. Core NATS delivers once; JetStream
/// again after a transient failure, up to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub attempt: u32,
    /// No other delivery follows: a failure now is final.
    pub last: bool,
}

impl Delivery {
    /// The one and only delivery (core NATS).
    pub const ONLY: Delivery = Delivery {
        attempt: 1,
        last: true,
    };
}

/// Decides and acts on alerts.
pub struct Responder {
    pub(super) policy: Policy,
    pub(super) rails: Rails,
    pub(super) limits: Limits,
    pub(super) control: Arc<Control>,
    pub(super) cluster: Arc<Cluster>,
    pub(super) dry_run: bool,
    pub(super) audit: Audit,
    pub(super) verifier: Option<Verifier>,
    /// Signed alerts older than this are not acted on (zero: no limit).
    pub(super) max_alert_age: Duration,
}

/// How far a signing clock may run ahead of the responder's.
const CLOCK_SKEW_MS: u64 = 60_000;

/// Why a signed alert is not fresh.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Stale {
    #[error("signed {ahead_s:.1}s ahead of this responder's clock")]
    Ahead { ahead_s: f64 },
    #[error("signed {age_s:.1}s ago, more than --max-alert-age {max_s}s")]
    Old { age_s: f64, max_s: u64 },
}

/// Whether an alert signed at `signed_ms` may be acted on at `now_ms`: not
/// older than `max_age` (zero: any age), not signed ahead of the clock by
/// more than `CLOCK_SKEW_MS`.
pub fn freshness(signed_ms: u64, now_ms: u64, max_age: Duration) -> Result<(), Stale> {
    if max_age.is_zero() {
        return Ok(());
    }
    if signed_ms > now_ms.saturating_add(CLOCK_SKEW_MS) {
        return Err(Stale::Ahead {
            ahead_s: (signed_ms - now_ms) as f64 / 1000.0,
        });
    }
    let age = now_ms.saturating_sub(signed_ms);
    if u128::from(age) > max_age.as_millis() {
        return Err(Stale::Old {
            age_s: age as f64 / 1000.0,
            max_s: max_age.as_secs(),
        });
    }
    Ok(())
}

impl Responder {
    /// Handles one alert: decides, acts, and publishes the decisions.
    pub async fn handle(
        &self,
        subject: &str,
        payload: &[u8],
        headers: Option<&async_nats::HeaderMap>,
        delivery: Delivery,
    ) -> Settle {
        let received = Instant::now();
        if delivery.attempt <= 1 {
            self.audit.metrics.alerts.inc();
        }
        let alert = match Alert::from_json(payload) {
            Ok(alert) => alert,
            Err(e) => {
                let d = Decision::new(Action::None, subject);
                return self
                    .only(d, Skip::Malformed.because(e.to_string()), received)
                    .await;
            }
        };
        // Only a trusted signer's alert is acted on; the decision still
        // says what the alert claimed.
        if let Some(verifier) = &self.verifier {
            let refused = match verifier.verify(subject, payload, headers) {
                Err(e) => {
                    self.audit.metrics.bad_signatures.inc();
                    Some(Skip::BadSignature.because(e.to_string()))
                }
                Ok(signed) => freshness(signed.at_ms, now_ms(), self.max_alert_age)
                    .err()
                    .map(|why| Skip::Stale.because(why.to_string())),
            };
            if let Some(skipped) = refused {
                let pod = alert.pod().ok().flatten();
                let d = decision_for(&alert, pod.as_ref(), None, subject, self.dry_run);
                return self.only(d, skipped, received).await;
            }
        }
        // Names are checked before any rail, policy or API call.
        let pod = match alert.pod() {
            Ok(pod) => pod,
            Err(e) => {
                let d = decision_for(&alert, None, None, subject, self.dry_run);
                let skipped = Skip::InvalidName.because(e.to_string());
                return self.only(d, skipped, received).await;
            }
        };
        let rules = self.policy.evaluate(&alert);
        if rules.is_empty() {
            let d = decision_for(&alert, pod.as_ref(), None, subject, self.dry_run);
            return self.only(d, Skip::NoPolicyMatch.into(), received).await;
        }
        let mut settle = Settle::Ack;
        for rule in rules {
            for action in &rule.actions {
                let step = self
                    .act(
                        &alert,
                        pod.as_ref(),
                        (rule, action),
                        subject,
                        delivery,
                        received,
                    )
                    .await;
                settle = settle.and(step);
            }
        }
        settle
    }

    /// Decides one action, and records the decision unless a transient
    /// failure leaves it to the next delivery.
    async fn act(
        &self,
        alert: &Alert,
        pod: Option<&PodRef>,
        (rule, action): (&PolicyRule, &ActionSpec),
        subject: &str,
        delivery: Delivery,
        received: Instant,
    ) -> Settle {
        let mut d = decision_for(alert, pod, Some(rule), subject, self.dry_run);
        d.action = action.kind();
        // The pod the action is about (none for `log`, which writes no Event).
        let mut target = pod.cloned().filter(|_| action.needs_pod());
        let ask = Ask {
            falco_rule: &alert.rule,
            rule,
            action,
            dry_run: d.dry_run,
            last_delivery: delivery.last,
        };
        let verdict = self.decide(target.as_mut(), &ask).await;
        let transient = verdict.is_transient();
        if transient && !delivery.last {
            // Not final: the decision is made again on the next delivery.
            self.audit.metrics.retries.inc();
            tracing::warn!(action = action.name(), attempt = delivery.attempt, verdict = ?verdict, "transient failure; the alert will be delivered again");
            return Settle::Retry;
        }
        verdict.write(&mut d, action);
        if transient {
            d.reason = format!("{} (delivery {}, the last)", d.reason, delivery.attempt);
        }
        // Results and Events name the pod as the API answered for it.
        if let Some(target) = &target {
            d.namespace = Some(target.namespace.clone());
            d.pod = Some(target.name.clone());
            d.pod_uid.clone_from(&target.uid);
        }
        d.latency_ms = received.elapsed().as_secs_f64() * 1000.0;
        self.audit.record(&d, target.as_ref()).await;
        if transient {
            Settle::Term
        } else {
            Settle::Ack
        }
    }

    /// Records a single decision about an alert that leads to no action.
    async fn only(&self, mut d: Decision, skipped: Skipped, received: Instant) -> Settle {
        d.reason = skipped.to_string();
        d.latency_ms = received.elapsed().as_secs_f64() * 1000.0;
        self.audit.record(&d, None).await;
        Settle::Ack
    }

    /// Decides on one action and carries it out: the guard chain, then the
    /// API call. `target` (the pod, for an action that needs one) is
    /// updated to what the API answered.
    async fn decide(&self, target: Option<&mut PodRef>, ask: &Ask<'_>) -> Verdict {
        if !ask.action.needs_pod() {
            return Verdict::Logged;
        }
        let Some(pod) = target else {
            return Skip::NoPod.into();
        };
        let chain = Chain {
            rails: &self.rails,
            control: &self.control,
            cluster: &self.cluster,
            limits: self.limits,
        };
        let mut permit = match chain.pass(pod, ask).await {
            Ok(permit) => permit,
            Err(verdict) => return verdict,
        };
        let verdict = if ask.dry_run {
            Verdict::DryRun
        } else {
            permit.acting();
            self.apply(pod, ask.action).await
        };
        permit.settle(&verdict).await;
        verdict
    }

    /// The API call.
    async fn apply(&self, pod: &PodRef, action: &ActionSpec) -> Verdict {
        let result = match action {
            ActionSpec::DeletePod {
                grace_period_seconds,
            } => self.cluster.delete_pod(pod, *grace_period_seconds).await,
            ActionSpec::LabelPod { labels } => self.cluster.label_pod(pod, labels).await,
            ActionSpec::IsolatePod { labels } => self.cluster.isolate_pod(pod, labels).await,
            // Needs no pod, and so never comes here: nothing to call.
            ActionSpec::Log => return Verdict::Logged,
        };
        match result {
            Ok(applied) => Verdict::Applied(applied),
            Err(e) => Verdict::failed(e.to_string(), e.is_transient()),
        }
    }
}

/// The decision about an alert, before any verdict: what the alert says.
fn decision_for(
    alert: &Alert,
    pod: Option<&PodRef>,
    rule: Option<&PolicyRule>,
    subject: &str,
    dry_run: bool,
) -> Decision {
    Decision {
        policy_rule: rule.map(|r| r.name.clone()),
        rule: Some(alert.rule.clone()),
        priority: Some(alert.priority),
        namespace: pod.map(|p| p.namespace.clone()),
        pod: pod.map(|p| p.name.clone()),
        pod_uid: pod.and_then(|p| p.uid.clone()),
        hostname: Some(alert.hostname.clone()).filter(|h| !h.is_empty()),
        alert_time: Some(alert.time.clone()).filter(|t| !t.is_empty()),
        dry_run: dry_run || rule.is_some_and(|r| r.dry_run),
        ..Decision::new(Action::None, subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_alerts_are_fresh_within_the_age_and_the_skew() {
        let five = Duration::from_secs(300);
        let now = 1_764_900_000_000;
        assert_eq!(freshness(now, now, five), Ok(()));
        assert_eq!(freshness(now - 300_000, now, five), Ok(()));
        let old = freshness(now - 300_001, now, five).unwrap_err();
        assert_eq!(
            old.to_string(),
            "signed 300.0s ago, more than --max-alert-age 300s"
        );
        assert_eq!(
            freshness(now + 60_000, now, five),
            Ok(()),
            "within the skew"
        );
        let ahead = freshness(now + 60_001, now, five).unwrap_err();
        assert!(matches!(ahead, Stale::Ahead { .. }), "{ahead}");
        assert_eq!(freshness(0, now, Duration::ZERO), Ok(()), "no limit");
        assert!(freshness(u64::MAX, 0, five).is_err());
        assert!(freshness(0, u64::MAX, five).is_err());
    }
}
