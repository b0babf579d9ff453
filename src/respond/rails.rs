//! Safety rails: what the responder refuses to touch, and how often it may act.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

/// Namespaces protected unless configured otherwise.
pub const DEFAULT_PROTECTED: &[&str] = &["kube-system", "kube-public", "falco"];

/// Why an action was not taken. Each has a short name for results and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Malformed,
    NoPolicyMatch,
    NoPod,
    ProtectedNamespace,
    NamespaceNotAllowed,
    DaemonSetPod,
    StaticPod,
    Duplicate,
    RateLimited,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Malformed => "malformed_alert",
            SkipReason::NoPolicyMatch => "no_policy_match",
            SkipReason::NoPod => "no_pod_in_alert",
            SkipReason::ProtectedNamespace => "protected_namespace",
            SkipReason::NamespaceNotAllowed => "namespace_not_allowed",
            SkipReason::DaemonSetPod => "daemonset_pod",
            SkipReason::StaticPod => "static_pod",
            SkipReason::Duplicate => "duplicate",
            SkipReason::RateLimited => "rate_limited",
        }
    }
}

/// Rail settings.
#[derive(Debug, Clone)]
pub struct RailsConfig {
    pub protected_namespaces: BTreeSet<String>,
    /// When set, only these namespaces are acted in.
    pub only_namespaces: Option<BTreeSet<String>>,
    pub allow_daemonset_pods: bool,
    pub allow_static_pods: bool,
    /// One action per pod, Falco rule and action within this window.
    pub dedup_window: Duration,
    /// Destructive actions (delete, isolate) in any 60 s, at most.
    pub max_actions_per_minute: u32,
}

/// The rails, with their memory of recent actions.
pub struct Rails {
    config: RailsConfig,
    recent_actions: Mutex<HashMap<DedupKey, Instant>>,
    destructive: Mutex<VecDeque<Instant>>,
}

/// Pod namespace, pod name, Falco rule, action.
pub type DedupKey = (String, String, String, &'static str);

impl Rails {
    pub fn new(config: RailsConfig) -> Self {
        Rails {
            config,
            recent_actions: Mutex::default(),
            destructive: Mutex::default(),
        }
    }

    pub fn config(&self) -> &RailsConfig {
        &self.config
    }

    pub fn check_namespace(&self, namespace: &str) -> Result<(), SkipReason> {
        if self.config.protected_namespaces.contains(namespace) {
            return Err(SkipReason::ProtectedNamespace);
        }
        match &self.config.only_namespaces {
            Some(only) if !only.contains(namespace) => Err(SkipReason::NamespaceNotAllowed),
            _ => Ok(()),
        }
    }

    /// Refuses pods of DaemonSets (a deleted one comes straight back, and
    /// may be node infrastructure) and static pods (the API cannot delete them).
    pub fn check_owner(&self, pod: &Pod) -> Result<(), SkipReason> {
        let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
        let is_static = owners.iter().any(|o| o.kind == "Node")
            || pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
        if is_static && !self.config.allow_static_pods {
            return Err(SkipReason::StaticPod);
        }
        if owners.iter().any(|o| o.kind == "DaemonSet") && !self.config.allow_daemonset_pods {
            return Err(SkipReason::DaemonSetPod);
        }
        Ok(())
    }

    /// Whether this action already ran on this pod for this rule within the window.
    pub fn is_duplicate(&self, key: &DedupKey) -> bool {
        let window = self.config.dedup_window;
        self.recent_actions
            .lock()
            .map(|m| m.get(key).is_some_and(|t| t.elapsed() < window))
            .unwrap_or(false)
    }

    /// Remembers that the action ran (or was decided, in a dry run).
    pub fn remember(&self, key: DedupKey) {
        let window = self.config.dedup_window;
        if let Ok(mut m) = self.recent_actions.lock() {
            if m.len() > 10_000 {
                m.retain(|_, t| t.elapsed() < window);
            }
            m.insert(key, Instant::now());
        }
    }

    /// Takes a slot for a destructive action, or refuses when the last
    /// minute had `max_actions_per_minute` already.
    pub fn take_destructive_slot(&self) -> Result<(), SkipReason> {
        let Ok(mut recent) = self.destructive.lock() else {
            return Err(SkipReason::RateLimited);
        };
        let minute = Duration::from_secs(60);
        while recent.front().is_some_and(|t| t.elapsed() >= minute) {
            recent.pop_front();
        }
        if recent.len() >= self.config.max_actions_per_minute as usize {
            return Err(SkipReason::RateLimited);
        }
        recent.push_back(Instant::now());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn rails(max: u32) -> Rails {
        Rails::new(RailsConfig {
            protected_namespaces: DEFAULT_PROTECTED.iter().map(|s| s.to_string()).collect(),
            only_namespaces: Some(["shop".to_string(), "kube-system".to_string()].into()),
            allow_daemonset_pods: false,
            allow_static_pods: false,
            dedup_window: Duration::from_secs(60),
            max_actions_per_minute: max,
        })
    }

    fn owned_by(kind: &str) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.owner_references = Some(vec![OwnerReference {
            kind: kind.into(),
            name: "x".into(),
            api_version: "apps/v1".into(),
            uid: "u".into(),
            ..OwnerReference::default()
        }]);
        pod
    }

    #[test]
    fn namespaces() {
        let r = rails(1);
        assert_eq!(
            r.check_namespace("kube-system"),
            Err(SkipReason::ProtectedNamespace)
        );
        assert_eq!(
            r.check_namespace("other"),
            Err(SkipReason::NamespaceNotAllowed)
        );
        assert_eq!(r.check_namespace("shop"), Ok(()));
    }

    #[test]
    fn owners() {
        let r = rails(1);
        assert_eq!(
            r.check_owner(&owned_by("DaemonSet")),
            Err(SkipReason::DaemonSetPod)
        );
        assert_eq!(r.check_owner(&owned_by("Node")), Err(SkipReason::StaticPod));
        assert_eq!(r.check_owner(&owned_by("ReplicaSet")), Ok(()));
        assert_eq!(r.check_owner(&Pod::default()), Ok(()));
    }

    #[test]
    fn rate_limit_and_dedup() {
        let r = rails(3);
        for _ in 0..3 {
            assert_eq!(r.take_destructive_slot(), Ok(()));
        }
        assert_eq!(r.take_destructive_slot(), Err(SkipReason::RateLimited));
        let key = ("shop".into(), "web".into(), "rule".into(), "delete-pod");
        assert!(!r.is_duplicate(&key));
        r.remember(key.clone());
        assert!(r.is_duplicate(&key));
    }
}
