//! [`Decision`]: what the responder decided about one action for one alert,
//! as it publishes it on `falco.response.<action>` and as `tail` (and any
//! other reader) takes it back.

use serde::{Deserialize, Serialize};

use crate::priority::Priority;

/// The action a decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    DeletePod,
    LabelPod,
    IsolatePod,
    Log,
    /// No action: the alert was decided against before any.
    None,
}

impl Action {
    /// The name in policies, result subjects and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::DeletePod => "delete-pod",
            Action::LabelPod => "label-pod",
            Action::IsolatePod => "isolate-pod",
            Action::Log => "log",
            Action::None => "none",
        }
    }
}

/// The result of one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub action: Action,
    pub outcome: Outcome,
    /// Why: a skip reason ([`crate::respond::outcome::Skip`]), the error,
    /// or what was (or would have been) done.
    #[serde(default)]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_time: Option<String>,
    /// The subject the alert arrived on.
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub dry_run: bool,
    /// Time from receiving the alert to this decision.
    #[serde(default)]
    pub latency_ms: f64,
}

impl Decision {
    /// A decision about `action` for an alert that came on `subject`,
    /// skipped until said otherwise.
    pub fn new(action: Action, subject: &str) -> Self {
        Decision {
            action,
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
            latency_ms: 0.0,
        }
    }

    /// Reads a decision from its JSON.
    pub fn from_json(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_reads_back_what_was_written() {
        let mut d = Decision::new(Action::DeletePod, "falco.critical.x");
        d.outcome = Outcome::DryRun;
        d.reason = "would delete the pod".into();
        d.priority = Some(Priority::Critical);
        d.namespace = Some("shop".into());
        d.pod = Some("web".into());
        d.latency_ms = 1.5;
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains(r#""action":"delete-pod""#), "{json}");
        assert!(json.contains(r#""priority":"Critical""#), "{json}");
        assert!(json.contains(r#""outcome":"dry_run""#), "{json}");
        assert!(!json.contains("pod_uid"), "{json}");
        assert_eq!(Decision::from_json(json.as_bytes()).unwrap(), d);
        assert!(Decision::from_json(br#"{"action":"explode","outcome":"done"}"#).is_err());
    }
}
