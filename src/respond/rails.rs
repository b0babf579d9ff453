//! Safety rails: what the responder refuses to touch, and how often it may act.
//!
//! The rails' memory (recent actions, recent Events, owner look-ups, the rate
//! limit's window) sits behind mutexes that no code holds across a panic
//! point; should one be poisoned all the same, its data is still a plain
//! map, so it is used as it is.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

use super::alert::PodRef;

/// Namespaces protected unless configured otherwise.
pub const DEFAULT_PROTECTED: &[&str] = &["kube-system", "kube-public", "falco"];

/// How long a pod's owner-based refusal (DaemonSet, static pod) is remembered,
/// so a storm of alerts about such a pod does not read it from the API each time.
pub const OWNER_CACHE_TTL: Duration = Duration::from_secs(30);

/// Why an action was not taken. Each has a short name for results and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Malformed,
    InvalidName,
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
            SkipReason::InvalidName => "invalid_name",
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
    /// One action per pod, Falco rule and action within this window; at
    /// most one Kubernetes Event per pod and reason too.
    pub dedup_window: Duration,
    /// Destructive actions (delete, isolate) in any 60 s, at most.
    pub max_actions_per_minute: u32,
}

/// What one action on one pod is deduplicated on. The pod's UID is part of
/// it when the alert carries one, so a pod recreated under the same name
/// (a StatefulSet's `db-0`) is a new pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub namespace: String,
    pub pod: String,
    pub uid: Option<String>,
    pub rule: String,
    pub action: &'static str,
}

/// The rails, with their memory of recent actions.
pub struct Rails {
    config: RailsConfig,
    recent_actions: Recent<DedupKey>,
    recent_events: Recent<(String, String, Option<String>, &'static str)>,
    owner_skips: Mutex<HashMap<(String, String), (Instant, SkipReason)>>,
    destructive: Mutex<VecDeque<Instant>>,
}

/// Keys seen within a window, pruned as the map grows.
struct Recent<K>(Mutex<HashMap<K, Instant>>);

impl<K: Eq + Hash> Recent<K> {
    fn new() -> Self {
        Recent(Mutex::default())
    }

    /// Records `key` unless it was recorded within `window`; `true` when recorded.
    fn claim(&self, key: K, window: Duration) -> bool {
        let mut map = lock(&self.0);
        if map.get(&key).is_some_and(|t| t.elapsed() < window) {
            return false;
        }
        if map.len() >= 10_000 {
            map.retain(|_, t| t.elapsed() < window);
        }
        map.insert(key, Instant::now());
        true
    }

    fn forget(&self, key: &K) {
        lock(&self.0).remove(key);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Rails {
    pub fn new(config: RailsConfig) -> Self {
        Rails {
            config,
            recent_actions: Recent::new(),
            recent_events: Recent::new(),
            owner_skips: Mutex::default(),
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

    /// An owner-based refusal of this pod seen within [`OWNER_CACHE_TTL`].
    pub fn cached_owner_skip(&self, namespace: &str, pod: &str) -> Option<SkipReason> {
        let skips = lock(&self.owner_skips);
        let (at, reason) = skips.get(&(namespace.to_owned(), pod.to_owned()))?;
        (at.elapsed() < OWNER_CACHE_TTL).then_some(*reason)
    }

    /// Remembers an owner-based refusal for [`OWNER_CACHE_TTL`].
    pub fn cache_owner_skip(&self, namespace: &str, pod: &str, reason: SkipReason) {
        let mut skips = lock(&self.owner_skips);
        if skips.len() >= 10_000 {
            skips.retain(|_, (t, _)| t.elapsed() < OWNER_CACHE_TTL);
        }
        skips.insert(
            (namespace.to_owned(), pod.to_owned()),
            (Instant::now(), reason),
        );
    }

    /// Claims the action for this pod and rule: `false` when it already ran
    /// (or is running) within the dedup window. The check and the claim are
    /// one step, so two alerts handled at once cannot both pass.
    pub fn claim(&self, key: DedupKey) -> bool {
        self.recent_actions.claim(key, self.config.dedup_window)
    }

    /// Gives a claim back: the action was not taken and may be tried again.
    pub fn release(&self, key: &DedupKey) {
        self.recent_actions.forget(key);
    }

    /// Whether a Kubernetes Event with this reason may be written for the
    /// pod: at most one per pod (name and UID) and reason within the dedup window.
    pub fn first_event(&self, pod: &PodRef, reason: &'static str) -> bool {
        self.recent_events.claim(
            (
                pod.namespace.clone(),
                pod.name.clone(),
                pod.uid.clone(),
                reason,
            ),
            self.config.dedup_window,
        )
    }

    /// Takes a slot for a destructive action, or refuses when the last
    /// minute had `max_actions_per_minute` already.
    pub fn take_destructive_slot(&self) -> Result<(), SkipReason> {
        let mut recent = lock(&self.destructive);
        Self::prune(&mut recent);
        if recent.len() >= self.config.max_actions_per_minute as usize {
            return Err(SkipReason::RateLimited);
        }
        recent.push_back(Instant::now());
        Ok(())
    }

    /// Whether a destructive action would get a slot now, without taking
    /// one: a dry run uses up nothing.
    pub fn would_get_slot(&self) -> Result<(), SkipReason> {
        let mut recent = lock(&self.destructive);
        Self::prune(&mut recent);
        if recent.len() >= self.config.max_actions_per_minute as usize {
            return Err(SkipReason::RateLimited);
        }
        Ok(())
    }

    fn prune(recent: &mut VecDeque<Instant>) {
        let minute = Duration::from_secs(60);
        while recent.front().is_some_and(|t| t.elapsed() >= minute) {
            recent.pop_front();
        }
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

    fn key(uid: Option<&str>) -> DedupKey {
        DedupKey {
            namespace: "shop".into(),
            pod: "db-0".into(),
            uid: uid.map(str::to_owned),
            rule: "rule".into(),
            action: "delete-pod",
        }
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
        assert_eq!(r.cached_owner_skip("shop", "agent"), None);
        r.cache_owner_skip("shop", "agent", SkipReason::DaemonSetPod);
        assert_eq!(
            r.cached_owner_skip("shop", "agent"),
            Some(SkipReason::DaemonSetPod)
        );
    }

    #[test]
    fn rate_limit_and_dry_runs() {
        let r = rails(3);
        for _ in 0..10 {
            assert_eq!(r.would_get_slot(), Ok(()), "looking takes nothing");
        }
        for _ in 0..3 {
            assert_eq!(r.take_destructive_slot(), Ok(()));
        }
        assert_eq!(r.take_destructive_slot(), Err(SkipReason::RateLimited));
        assert_eq!(r.would_get_slot(), Err(SkipReason::RateLimited));
    }

    #[test]
    fn dedup_claims_per_uid_and_can_be_released() {
        let r = rails(3);
        assert!(r.claim(key(Some("uid-1"))));
        assert!(!r.claim(key(Some("uid-1"))), "a claim is taken once");
        assert!(r.claim(key(Some("uid-2"))), "a recreated pod is a new pod");
        r.release(&key(Some("uid-1")));
        assert!(r.claim(key(Some("uid-1"))), "released claims can be taken");
        let pod = |uid: &str| PodRef {
            namespace: "shop".into(),
            name: "db-0".into(),
            uid: Some(uid.into()),
        };
        assert!(r.first_event(&pod("uid-1"), "FalcoNatsFailed"));
        assert!(!r.first_event(&pod("uid-1"), "FalcoNatsFailed"));
        assert!(r.first_event(&pod("uid-1"), "FalcoNatsActed"));
        assert!(r.first_event(&pod("uid-2"), "FalcoNatsActed"));
    }
}
