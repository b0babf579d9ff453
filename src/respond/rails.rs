//! Safety rails: what the responder refuses to touch. No I/O here:
//! [`Rails::admit`] decides before the pod is read, [`Rails::permit`] once
//! it is; both are unit-tested below. They are the first links of the
//! guard chain ([`super::guards`]); the guards that need I/O (healthy
//! replicas, the kill switch, the cluster-wide budget) are its last.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

use super::outcome::Skip;
use crate::alert::PodRef;
use crate::decision::Action;

/// Namespaces protected unless configured otherwise.
pub const DEFAULT_PROTECTED: &[&str] = &["kube-system", "kube-public", "falco"];

/// How long a pod's owner-based refusal (DaemonSet, static pod) is remembered,
/// so a storm of alerts about such a pod does not read it from the API each time.
pub const OWNER_CACHE_TTL: Duration = Duration::from_secs(30);

/// Rail settings.
#[derive(Debug, Clone)]
pub struct RailsConfig {
    pub protected_namespaces: BTreeSet<String>,
    /// When set, only these namespaces are acted in.
    pub only_namespaces: Option<BTreeSet<String>>,
    pub allow_daemonset_pods: bool,
    pub allow_static_pods: bool,
    /// Refuse pods of StatefulSets (off by default).
    pub skip_statefulset_pods: bool,
    /// Refuse pods without a controller (off by default).
    pub skip_standalone_pods: bool,
    /// One action per pod, Falco rule and action within this window; at
    /// most one Kubernetes Event per pod and reason too.
    pub dedup_window: Duration,
}

impl Default for RailsConfig {
    /// As the command line's defaults: the default protected namespaces,
    /// every other namespace allowed, DaemonSet and static pods refused,
    /// a dedup window of 10 minutes.
    fn default() -> Self {
        RailsConfig {
            protected_namespaces: DEFAULT_PROTECTED.iter().map(|s| s.to_string()).collect(),
            only_namespaces: None,
            allow_daemonset_pods: false,
            allow_static_pods: false,
            skip_statefulset_pods: false,
            skip_standalone_pods: false,
            dedup_window: Duration::from_secs(600),
        }
    }
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
    pub action: Action,
}

/// The rails, with their memory of recent actions.
pub struct Rails {
    config: RailsConfig,
    recent_actions: Recent<DedupKey>,
    owner_skips: Mutex<HashMap<(String, String), (Instant, Skip)>>,
}

/// Keys seen within a window, pruned as the map grows.
pub struct Recent<K>(Mutex<HashMap<K, Instant>>);

impl<K: Eq + Hash> Default for Recent<K> {
    fn default() -> Self {
        Recent(Mutex::default())
    }
}

impl<K: Eq + Hash> Recent<K> {
    /// Records `key` unless it was recorded within `window`; `true` when recorded.
    pub fn claim(&self, key: K, window: Duration) -> bool {
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

/// The rails' locks guard plain maps and are never held across anything
/// that can panic: a poisoned one is a bug.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("no code panics while holding a rails lock")
}

impl Rails {
    pub fn new(config: RailsConfig) -> Self {
        Rails {
            config,
            recent_actions: Recent::default(),
            owner_skips: Mutex::default(),
        }
    }

    /// Before the pod is read: its namespace, an owner refusal remembered,
    /// and the dedup claim. The claim returned is held until
    /// [`Rails::release`]d.
    pub fn admit(&self, pod: &PodRef, rule: &str, action: Action) -> Result<DedupKey, Skip> {
        self.check_namespace(&pod.namespace)?;
        if let Some(refusal) = self.cached_owner_skip(&pod.namespace, &pod.name) {
            return Err(refusal);
        }
        let key = DedupKey {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            uid: pod.uid.clone(),
            rule: rule.to_owned(),
            action,
        };
        if !self.claim(key.clone()) {
            return Err(Skip::Duplicate);
        }
        Ok(key)
    }

    /// Once the pod is read: its owner. A refusal is remembered; the
    /// claim is given back by whoever holds it ([`super::guards::Permit`]).
    pub fn permit(&self, key: &DedupKey, found: &Pod) -> Result<(), Skip> {
        let result = self.check_owner(found);
        if let Err(skip) = result {
            self.cache_owner_skip(&key.namespace, &key.pod, skip);
        }
        result
    }

    /// One action per pod, rule and action within this window.
    pub fn dedup_window(&self) -> Duration {
        self.config.dedup_window
    }

    pub fn check_namespace(&self, namespace: &str) -> Result<(), Skip> {
        if self.config.protected_namespaces.contains(namespace) {
            return Err(Skip::ProtectedNamespace);
        }
        match &self.config.only_namespaces {
            Some(only) if !only.contains(namespace) => Err(Skip::NamespaceNotAllowed),
            _ => Ok(()),
        }
    }

    /// Refuses pods of DaemonSets (a deleted one comes straight back, and
    /// may be node infrastructure) and static pods (the API cannot delete them).
    pub fn check_owner(&self, pod: &Pod) -> Result<(), Skip> {
        let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
        let is_static = owners.iter().any(|o| o.kind == "Node")
            || pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
        if is_static && !self.config.allow_static_pods {
            return Err(Skip::StaticPod);
        }
        if owners.iter().any(|o| o.kind == "DaemonSet") && !self.config.allow_daemonset_pods {
            return Err(Skip::DaemonSetPod);
        }
        if owners.iter().any(|o| o.kind == "StatefulSet") && self.config.skip_statefulset_pods {
            return Err(Skip::StatefulSetPod);
        }
        let controlled = owners.iter().any(|o| o.controller == Some(true));
        if !controlled && !is_static && self.config.skip_standalone_pods {
            return Err(Skip::StandalonePod);
        }
        Ok(())
    }

    /// An owner-based refusal of this pod seen within [`OWNER_CACHE_TTL`].
    pub fn cached_owner_skip(&self, namespace: &str, pod: &str) -> Option<Skip> {
        let skips = lock(&self.owner_skips);
        let (at, reason) = skips.get(&(namespace.to_owned(), pod.to_owned()))?;
        (at.elapsed() < OWNER_CACHE_TTL).then_some(*reason)
    }

    /// Remembers an owner-based refusal for [`OWNER_CACHE_TTL`].
    pub fn cache_owner_skip(&self, namespace: &str, pod: &str, reason: Skip) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn rails() -> Rails {
        Rails::new(RailsConfig {
            only_namespaces: Some(["shop".to_string(), "kube-system".to_string()].into()),
            dedup_window: Duration::from_secs(60),
            ..RailsConfig::default()
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
            action: Action::DeletePod,
        }
    }

    #[test]
    fn namespaces() {
        let r = rails();
        assert_eq!(
            r.check_namespace("kube-system"),
            Err(Skip::ProtectedNamespace)
        );
        assert_eq!(r.check_namespace("other"), Err(Skip::NamespaceNotAllowed));
        assert_eq!(r.check_namespace("shop"), Ok(()));
    }

    #[test]
    fn owners() {
        let r = rails();
        assert_eq!(
            r.check_owner(&owned_by("DaemonSet")),
            Err(Skip::DaemonSetPod)
        );
        assert_eq!(r.check_owner(&owned_by("Node")), Err(Skip::StaticPod));
        assert_eq!(r.check_owner(&owned_by("ReplicaSet")), Ok(()));
        assert_eq!(r.check_owner(&Pod::default()), Ok(()));
        assert_eq!(r.cached_owner_skip("shop", "agent"), None);
        r.cache_owner_skip("shop", "agent", Skip::DaemonSetPod);
        assert_eq!(
            r.cached_owner_skip("shop", "agent"),
            Some(Skip::DaemonSetPod)
        );
    }

    #[test]
    fn statefulset_and_standalone_pods_only_when_asked() {
        let mut controlled = owned_by("StatefulSet");
        if let Some(owners) = controlled.metadata.owner_references.as_mut() {
            owners[0].controller = Some(true);
        }
        let mut rs = owned_by("ReplicaSet");
        if let Some(owners) = rs.metadata.owner_references.as_mut() {
            owners[0].controller = Some(true);
        }
        let r = rails();
        assert_eq!(r.check_owner(&controlled), Ok(()), "off by default");
        assert_eq!(r.check_owner(&Pod::default()), Ok(()), "off by default");
        let mut config = r.config.clone();
        config.skip_statefulset_pods = true;
        config.skip_standalone_pods = true;
        let r = Rails::new(config);
        assert_eq!(r.check_owner(&controlled), Err(Skip::StatefulSetPod));
        assert_eq!(r.check_owner(&Pod::default()), Err(Skip::StandalonePod));
        assert_eq!(
            r.check_owner(&owned_by("ReplicaSet")),
            Err(Skip::StandalonePod),
            "an owner that is not its controller leaves the pod standalone"
        );
        assert_eq!(r.check_owner(&rs), Ok(()));
        assert_eq!(
            r.check_owner(&owned_by("Node")),
            Err(Skip::StaticPod),
            "a static pod says so"
        );
    }

    #[test]
    fn dedup_claims_per_uid_and_can_be_released() {
        let r = rails();
        assert!(r.claim(key(Some("uid-1"))));
        assert!(!r.claim(key(Some("uid-1"))), "a claim is taken once");
        assert!(r.claim(key(Some("uid-2"))), "a recreated pod is a new pod");
        r.release(&key(Some("uid-1")));
        assert!(r.claim(key(Some("uid-1"))), "released claims can be taken");
    }
}

#[cfg(test)]
mod decision_tests {
    //! The rails as one decision: admit, then permit, without NATS or the API.
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn rails() -> Rails {
        Rails::new(RailsConfig {
            dedup_window: Duration::from_secs(60),
            ..RailsConfig::default()
        })
    }

    fn pod(ns: &str, name: &str, uid: Option<&str>) -> PodRef {
        PodRef {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.map(str::to_owned),
        }
    }

    fn owned(kind: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.owner_references = Some(vec![OwnerReference {
            kind: kind.into(),
            ..OwnerReference::default()
        }]);
        p
    }

    #[test]
    fn admit_then_permit() {
        let r = rails();
        let web = pod("shop", "web", Some("u1"));
        assert_eq!(
            r.admit(&pod("kube-system", "dns", None), "rule", Action::DeletePod),
            Err(Skip::ProtectedNamespace)
        );
        let key = r.admit(&web, "rule", Action::DeletePod).unwrap();
        assert_eq!(
            r.admit(&web, "rule", Action::DeletePod),
            Err(Skip::Duplicate),
            "claimed"
        );
        assert!(
            r.admit(&web, "rule", Action::LabelPod).is_ok(),
            "another action"
        );
        assert!(r.admit(&web, "other rule", Action::DeletePod).is_ok());
        assert!(r
            .admit(&pod("shop", "web", Some("u2")), "rule", Action::DeletePod)
            .is_ok());
        assert_eq!(r.permit(&key, &owned("ReplicaSet")), Ok(()));
        let next = r
            .admit(&pod("shop", "api", None), "rule", Action::DeletePod)
            .unwrap();
        assert_eq!(
            r.permit(&next, &owned("DaemonSet")),
            Err(Skip::DaemonSetPod)
        );
        assert!(
            !r.claim(next.clone()),
            "held until its holder gives it back"
        );
        r.release(&next);
        assert!(r.claim(next), "given back");
    }

    #[test]
    fn owner_refusals_are_remembered() {
        let r = rails();
        let agent = pod("shop", "agent", None);
        let key = r.admit(&agent, "rule", Action::DeletePod).unwrap();
        assert_eq!(r.permit(&key, &owned("DaemonSet")), Err(Skip::DaemonSetPod));
        assert_eq!(
            r.admit(&agent, "another rule", Action::DeletePod),
            Err(Skip::DaemonSetPod),
            "known without reading the pod again"
        );
    }
}
