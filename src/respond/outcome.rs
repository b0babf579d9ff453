//! What becomes of an action, in one vocabulary: a [`Skip`] (every reason
//! a decision gives for not acting), the result of the API call
//! ([`Applied`], or a [`Failure`]), gathered in a [`Verdict`] and written
//! into the published [`Decision`]; and what JetStream is told about the
//! message ([`Settle`]).

use std::collections::BTreeMap;
use std::fmt;

use super::policy::ActionSpec;
use crate::decision::{Decision, Outcome};

/// Why an action was not taken. Its name is the decision's `reason`,
/// followed by `: ` and a detail when there is more to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    // The alert, before any policy.
    /// Not a Falco alert.
    Malformed,
    /// Signatures are required and this alert's is missing or wrong.
    BadSignature,
    /// Signed longer ago than `--max-alert-age` (or too far ahead).
    Stale,
    /// It names a namespace or pod that is not a valid Kubernetes name.
    InvalidName,
    /// No policy rule matched.
    NoPolicyMatch,
    /// The action needs a pod and the alert names none.
    NoPod,
    // The rails (the duplicate rule also shared by the replicas), and
    // the pod's owner once it is read.
    ProtectedNamespace,
    NamespaceNotAllowed,
    /// The same action on the same pod for the same rule, within the window.
    Duplicate,
    StaticPod,
    DaemonSetPod,
    StatefulSetPod,
    /// A pod without a controller (`--skip-standalone-pods`).
    StandalonePod,
    // The guards, on the state the replicas share.
    /// Deleting the pod would leave its workload fewer healthy replicas
    /// than asked, or they cannot be told.
    MinHealthyReplicas,
    /// The kill switch is pulled (`falco-nats pause`).
    Paused,
    /// The kill switch could not be read lately (fail closed).
    PauseUnknown,
    /// The cluster-wide budget of destructive actions is used up.
    RateLimited,
    /// The cluster-wide budget could not be checked (fail closed).
    RateLimitUnavailable,
}

impl Skip {
    /// Every reason, in the order the responder can reach them.
    pub const ALL: [Skip; 18] = [
        Skip::Malformed,
        Skip::BadSignature,
        Skip::Stale,
        Skip::InvalidName,
        Skip::NoPolicyMatch,
        Skip::NoPod,
        Skip::ProtectedNamespace,
        Skip::NamespaceNotAllowed,
        Skip::Duplicate,
        Skip::StaticPod,
        Skip::DaemonSetPod,
        Skip::StatefulSetPod,
        Skip::StandalonePod,
        Skip::MinHealthyReplicas,
        Skip::Paused,
        Skip::PauseUnknown,
        Skip::RateLimited,
        Skip::RateLimitUnavailable,
    ];

    /// The name in results, logs and the docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Malformed => "malformed_alert",
            Skip::BadSignature => "bad_signature",
            Skip::Stale => "stale",
            Skip::InvalidName => "invalid_name",
            Skip::NoPolicyMatch => "no_policy_match",
            Skip::NoPod => "no_pod_in_alert",
            Skip::ProtectedNamespace => "protected_namespace",
            Skip::NamespaceNotAllowed => "namespace_not_allowed",
            Skip::DaemonSetPod => "daemonset_pod",
            Skip::StaticPod => "static_pod",
            Skip::StatefulSetPod => "statefulset_pod",
            Skip::StandalonePod => "standalone_pod",
            Skip::Duplicate => "duplicate",
            Skip::MinHealthyReplicas => "min_healthy_replicas",
            Skip::Paused => "paused",
            Skip::PauseUnknown => "pause_unknown",
            Skip::RateLimited => "rate_limited",
            Skip::RateLimitUnavailable => "rate_limit_unavailable",
        }
    }

    /// A guard that could not be checked: the action is skipped now (fail
    /// closed), and another delivery may check it again.
    pub fn is_unavailable(self) -> bool {
        matches!(self, Skip::PauseUnknown | Skip::RateLimitUnavailable)
    }

    /// This skip, saying more.
    pub fn because(self, detail: impl Into<String>) -> Skipped {
        Skipped {
            skip: self,
            detail: Some(detail.into()),
        }
    }
}

/// A skip and what more there is to say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub skip: Skip,
    pub detail: Option<String>,
}

impl From<Skip> for Skipped {
    fn from(skip: Skip) -> Self {
        Skipped { skip, detail: None }
    }
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.detail {
            Some(detail) => write!(f, "{}: {detail}", self.skip.as_str()),
            None => f.write_str(self.skip.as_str()),
        }
    }
}

/// What the Kubernetes API answered for a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The API accepted the action.
    Done,
    /// The pod no longer exists (404): nothing left to do.
    Gone,
    /// The pod's UID differs (409): it was replaced and is not touched.
    Replaced,
}

/// An action that could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    /// Trying again later may succeed (the API's 5xx, a time-out).
    pub transient: bool,
}

/// What became of one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Decided against.
    Skipped(Skipped),
    /// The action needs no pod (`log`).
    Logged,
    /// Every guard passed; a dry run stops there.
    DryRun,
    /// The API's answer.
    Applied(Applied),
    Failed(Failure),
}

impl From<Skip> for Verdict {
    fn from(skip: Skip) -> Self {
        Verdict::Skipped(skip.into())
    }
}

impl From<Skipped> for Verdict {
    fn from(skipped: Skipped) -> Self {
        Verdict::Skipped(skipped)
    }
}

impl Verdict {
    /// A failure of the call, say, or of a guard's record.
    pub fn failed(reason: impl Into<String>, transient: bool) -> Self {
        Verdict::Failed(Failure {
            reason: reason.into(),
            transient,
        })
    }

    /// Whether another delivery may turn this into something else.
    pub fn is_transient(&self) -> bool {
        match self {
            Verdict::Failed(failure) => failure.transient,
            Verdict::Skipped(skipped) => skipped.skip.is_unavailable(),
            _ => false,
        }
    }

    /// Whether the action counts as taken: the claim on the pod is kept
    /// (a duplicate within the window is skipped). The pod gone counts:
    /// there is nothing left to do to it.
    pub fn is_taken(&self) -> bool {
        matches!(
            self,
            Verdict::DryRun | Verdict::Applied(Applied::Done | Applied::Gone)
        )
    }

    /// Writes the verdict into `d`: outcome and reason.
    pub fn write(self, d: &mut Decision, action: &ActionSpec) {
        let (outcome, reason) = match self {
            Verdict::Logged if d.dry_run => (Outcome::DryRun, "logged".to_owned()),
            Verdict::Logged => (Outcome::Done, "logged".to_owned()),
            Verdict::Skipped(skipped) => (Outcome::Skipped, skipped.to_string()),
            Verdict::DryRun => (Outcome::DryRun, format!("would {}", describe(action))),
            Verdict::Applied(Applied::Done) => (Outcome::Done, describe(action)),
            Verdict::Applied(Applied::Gone) => {
                (Outcome::Gone, "the pod no longer exists".to_owned())
            }
            Verdict::Applied(Applied::Replaced) => (
                Outcome::Replaced,
                "the pod was replaced (UID differs); not touched".to_owned(),
            ),
            Verdict::Failed(failure) => (Outcome::Failed, failure.reason),
        };
        d.outcome = outcome;
        d.reason = reason;
    }
}

/// What to tell JetStream about a handled alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done with (acted on, or decided against).
    Ack,
    /// A transient failure: deliver it again later.
    Retry,
    /// Failed on its last delivery: never deliver it again.
    Term,
}

impl Settle {
    /// The settle of an alert with two actions: a retry wins (the next
    /// delivery decides both again), then a termination.
    pub fn and(self, other: Settle) -> Settle {
        match (self, other) {
            (Settle::Retry, _) | (_, Settle::Retry) => Settle::Retry,
            (Settle::Term, _) | (_, Settle::Term) => Settle::Term,
            _ => Settle::Ack,
        }
    }
}

/// What an action does, in words.
fn describe(action: &ActionSpec) -> String {
    let labels = |l: &BTreeMap<String, String>| {
        l.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    match action {
        ActionSpec::DeletePod {
            grace_period_seconds,
        } => format!("delete the pod (grace period {grace_period_seconds}s)"),
        ActionSpec::LabelPod { labels: l } => format!("label the pod {}", labels(l)),
        ActionSpec::IsolatePod { labels: l } => format!(
            "isolate the pod: label {} under a deny-all NetworkPolicy",
            labels(l)
        ),
        ActionSpec::Log => "log".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Action;
    use crate::respond::audit::event_reason;

    /// Each verdict's outcome and reason, and which of them get an Event:
    /// decided in data, without NATS or the Kubernetes API.
    #[test]
    fn verdicts_write_decisions_and_only_acts_and_failures_get_events() {
        let delete = ActionSpec::DeletePod {
            grace_period_seconds: 0,
        };
        let cases = [
            (Verdict::Logged, "done", "logged"),
            (Skip::NoPod.into(), "skipped", "no_pod_in_alert"),
            (
                Skip::MinHealthyReplicas.because("3 of 3").into(),
                "skipped",
                "min_healthy_replicas: 3 of 3",
            ),
            (
                Verdict::Applied(Applied::Done),
                "done",
                "delete the pod (grace period 0s)",
            ),
            (
                Verdict::DryRun,
                "dry_run",
                "would delete the pod (grace period 0s)",
            ),
            (
                Verdict::Applied(Applied::Gone),
                "gone",
                "the pod no longer exists",
            ),
            (
                Verdict::Applied(Applied::Replaced),
                "replaced",
                "the pod was replaced (UID differs); not touched",
            ),
            (Verdict::failed("boom", true), "failed", "boom"),
        ];
        let mut with_events = Vec::new();
        for (verdict, outcome, reason) in cases {
            let mut d = Decision::new(Action::DeletePod, "falco.critical.x");
            verdict.write(&mut d, &delete);
            assert_eq!((d.outcome.as_str(), d.reason.as_str()), (outcome, reason));
            if event_reason(d.outcome).is_some() {
                with_events.push(outcome);
            }
        }
        assert_eq!(with_events, ["done", "done", "failed"]);
        let mut dry = Decision::new(Action::Log, "s");
        dry.dry_run = true;
        Verdict::Logged.write(&mut dry, &ActionSpec::Log);
        assert_eq!(dry.outcome, Outcome::DryRun);
    }

    #[test]
    fn skips_have_distinct_names_and_only_unreadable_guards_are_transient() {
        let names: std::collections::BTreeSet<_> = Skip::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names.len(), Skip::ALL.len());
        let transient: Vec<_> = Skip::ALL
            .iter()
            .filter(|s| Verdict::from(**s).is_transient())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(transient, ["pause_unknown", "rate_limit_unavailable"]);
        assert!(!Verdict::failed("403", false).is_transient());
        assert!(Verdict::failed("503", true).is_transient());
        assert_eq!(Settle::Ack.and(Settle::Term), Settle::Term);
        assert_eq!(Settle::Term.and(Settle::Retry), Settle::Retry);
        assert_eq!(Settle::Ack.and(Settle::Ack), Settle::Ack);
    }
}
