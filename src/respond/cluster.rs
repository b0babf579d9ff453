//! [`Cluster`]: the Kubernetes calls the responder makes, through `kube`.
//!
//! Least privilege: pods get/delete/patch, events create, networkpolicies
//! create (and get), in the namespaces it acts in. Every call has a time
//! limit; while calls time out or the API server fails, the `kubernetes`
//! readiness check is down.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::Client;
use serde_json::json;

use super::outcome::Applied;
use super::policy::ActionSpec;
use super::workload::{replicated_owner, Workload};
use crate::alert::PodRef;
pub use crate::kubernetes::ClusterError;
use crate::telemetry::health::ReadyFlag;

/// Why a Kubernetes call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the Kubernetes API did not answer within {0:?}")]
    TimedOut(Duration),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

impl CallError {
    /// Whether trying again later may succeed: a time-out, a failed
    /// connection, or the API server's 429 and 5xx answers.
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::TimedOut(_) => true,
            CallError::Kube(kube::Error::Api(status)) => status.code == 429 || status.code >= 500,
            CallError::Kube(kube::Error::HyperError(_) | kube::Error::Service(_)) => true,
            CallError::Kube(_) => false,
        }
    }
}

/// Why a pod's workload cannot be known.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("its {kind} {namespace}/{name} is not found")]
    Missing {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("cannot read its {kind} {namespace}/{name}: {source}")]
    Call {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: CallError,
    },
}

impl OwnerError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, OwnerError::Call { source, .. } if source.is_transient())
    }
}

/// The responder's view of the cluster.
pub struct Cluster {
    client: Client,
    instance: String,
    timeout: Duration,
    /// Down while calls time out or the API server fails.
    ready: ReadyFlag,
}

/// One thing the responder must be allowed to do: (verb, API group,
/// resource), as RBAC names them.
pub type Permission = (&'static str, &'static str, &'static str);

/// The permissions a policy's actions need: reading pods and writing
/// Events always; deleting, patching pods and creating NetworkPolicies as
/// its actions call for.
pub fn permissions_for(actions: &[&ActionSpec]) -> Vec<Permission> {
    let mut needed: Vec<Permission> = vec![("get", "", "pods"), ("create", "", "events")];
    for action in actions {
        let more: &[Permission] = match action {
            ActionSpec::DeletePod { .. } => &[("delete", "", "pods")],
            ActionSpec::LabelPod { .. } => &[("patch", "", "pods")],
            ActionSpec::IsolatePod { .. } => &[
                ("patch", "", "pods"),
                ("create", "networking.k8s.io", "networkpolicies"),
            ],
            ActionSpec::Log => &[],
        };
        for p in more {
            if !needed.contains(p) {
                needed.push(*p);
            }
        }
    }
    needed
}

/// What [`Cluster::check_permissions`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permissions {
    /// Every permission, in every namespace asked.
    Granted,
    /// What is missing, said as a person would ("delete pods in shop").
    Missing(Vec<String>),
    /// The API server could not be asked: why.
    Unreachable(String),
}

/// Name of the deny-all NetworkPolicy `isolate-pod` creates per namespace.
pub const ISOLATION_POLICY: &str = "falco-nats-isolate";

impl Cluster {
    /// A client from `kubeconfig`, or else the usual discovery (the
    /// `KUBECONFIG` variable, `~/.kube/config`, then in-cluster).
    /// Every call is limited to `timeout`; `ready` follows the API's health.
    pub async fn connect(
        kubeconfig: Option<&Path>,
        timeout: Duration,
        ready: ReadyFlag,
    ) -> Result<Self, ClusterError> {
        let client = crate::kubernetes::client(kubeconfig, timeout).await?;
        ready.set(true);
        Ok(Cluster {
            client,
            instance: std::env::var("HOSTNAME").unwrap_or_else(|_| "falco-nats".into()),
            timeout,
            ready,
        })
    }

    /// Asks the API server (SelfSubjectAccessReview, which every
    /// authenticated user may) whether this responder may do each of
    /// `needed` in each of `namespaces` (`None`: in every namespace, as a
    /// ClusterRole grants).
    pub async fn check_permissions(
        &self,
        needed: &[Permission],
        namespaces: Option<&std::collections::BTreeSet<String>>,
    ) -> Permissions {
        use k8s_openapi::api::authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        };
        let reviews: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        let scopes: Vec<Option<&str>> = match namespaces {
            Some(list) => list.iter().map(|n| Some(n.as_str())).collect(),
            None => vec![None],
        };
        let mut missing = Vec::new();
        for namespace in scopes {
            for (verb, group, resource) in needed {
                let review = SelfSubjectAccessReview {
                    spec: SelfSubjectAccessReviewSpec {
                        resource_attributes: Some(ResourceAttributes {
                            verb: Some((*verb).to_owned()),
                            group: Some((*group).to_owned()),
                            resource: Some((*resource).to_owned()),
                            namespace: namespace.map(str::to_owned),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let asked = tokio::time::timeout(
                    self.timeout,
                    reviews.create(&PostParams::default(), &review),
                )
                .await;
                let answer = match asked {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(e)) => return Permissions::Unreachable(e.to_string()),
                    Err(_) => {
                        return Permissions::Unreachable(format!(
                            "no answer within {:?}",
                            self.timeout
                        ))
                    }
                };
                if !answer.status.is_some_and(|s| s.allowed) {
                    let place =
                        namespace.map_or("in every namespace".to_owned(), |n| format!("in {n}"));
                    missing.push(format!("{verb} {resource} {place}"));
                }
            }
        }
        if missing.is_empty() {
            Permissions::Granted
        } else {
            Permissions::Missing(missing)
        }
    }

    /// Every call's time limit (`--kube-timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one call within the time limit, and updates readiness from
    /// how it ended.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, CallError> {
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(CallError::from),
            Err(_) => Err(CallError::TimedOut(self.timeout)),
        };
        let healthy = match &result {
            Ok(_) => true,
            Err(e) => !e.is_transient(),
        };
        if self.ready.get() != healthy {
            if healthy {
                tracing::info!("the Kubernetes API answers again");
            } else if let Err(e) = &result {
                tracing::warn!(error = %e, "the Kubernetes API fails; not ready");
            }
            self.ready.set(healthy);
        }
        result
    }

    fn pods(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The pod, or `None` when it does not exist.
    pub async fn get_pod(&self, pod: &PodRef) -> Result<Option<Pod>, CallError> {
        self.call(self.pods(&pod.namespace).get_opt(&pod.name))
            .await
    }

    /// One `apps/v1` object of the pod's namespace.
    async fn get_apps<K>(&self, namespace: &str, name: &str) -> Result<K, OwnerError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let kind = K::kind(&K::DynamicType::default()).into_owned();
        let kind: &'static str = match kind.as_str() {
            "ReplicaSet" => "ReplicaSet",
            "Deployment" => "Deployment",
            _ => "StatefulSet",
        };
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        match self.call(api.get_opt(name)).await {
            Ok(Some(object)) => Ok(object),
            Ok(None) => Err(OwnerError::Missing {
                kind,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }),
            Err(source) => Err(OwnerError::Call {
                kind,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                source,
            }),
        }
    }

    /// The replicated workload the pod belongs to, as its status says: the
    /// Deployment of its ReplicaSet (or the ReplicaSet alone), or its
    /// StatefulSet; `None` for any other pod.
    pub async fn workload_of(&self, pod: &Pod) -> Result<Option<Workload>, OwnerError> {
        let Some((kind, name)) = replicated_owner(pod) else {
            return Ok(None);
        };
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let count = |n: Option<i32>| n.and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
        let workload = |kind, name: &str, desired: Option<i32>, available: Option<i32>| Workload {
            kind,
            namespace: namespace.clone(),
            name: name.to_owned(),
            // An unset `replicas` means one, as the API defaults it.
            desired: desired.map_or(1, |n| count(Some(n))),
            available: count(available),
        };
        if kind == "StatefulSet" {
            let set: StatefulSet = self.get_apps(&namespace, name).await?;
            let status = set.status.unwrap_or_default();
            let available = status.available_replicas.or(status.ready_replicas);
            return Ok(Some(workload(
                "StatefulSet",
                name,
                set.spec.and_then(|s| s.replicas),
                available,
            )));
        }
        let rs: ReplicaSet = self.get_apps(&namespace, name).await?;
        let deployment = rs
            .metadata
            .owner_references
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|o| o.controller == Some(true) && o.kind == "Deployment")
            .map(|o| o.name.clone());
        match deployment {
            Some(d) => {
                let dep: Deployment = self.get_apps(&namespace, &d).await?;
                let available = dep.status.and_then(|s| s.available_replicas);
                Ok(Some(workload(
                    "Deployment",
                    &d,
                    dep.spec.and_then(|s| s.replicas),
                    available,
                )))
            }
            None => {
                let available = rs.status.as_ref().and_then(|s| s.available_replicas);
                Ok(Some(workload(
                    "ReplicaSet",
                    name,
                    rs.spec.and_then(|s| s.replicas),
                    available,
                )))
            }
        }
    }

    /// Deletes the pod, with its UID as a precondition when known.
    pub async fn delete_pod(
        &self,
        pod: &PodRef,
        grace_period_seconds: u32,
    ) -> Result<Applied, CallError> {
        let params = DeleteParams {
            grace_period_seconds: Some(grace_period_seconds),
            preconditions: pod.uid.as_ref().map(|uid| Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        applied(
            self.call(self.pods(&pod.namespace).delete(&pod.name, &params))
                .await,
        )
    }

    /// Adds labels with a merge patch; the UID in the patch makes the API
    /// refuse (409) a pod that was replaced.
    pub async fn label_pod(
        &self,
        pod: &PodRef,
        labels: &BTreeMap<String, String>,
    ) -> Result<Applied, CallError> {
        let mut metadata = json!({ "labels": labels });
        if let Some(uid) = &pod.uid {
            metadata["uid"] = json!(uid);
        }
        let patch = json!({ "metadata": metadata });
        let pods = self.pods(&pod.namespace);
        applied(
            self.call(pods.patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch)))
                .await,
        )
    }

    /// Makes sure the namespace has a deny-all NetworkPolicy selecting
    /// `labels`, then labels the pod. The policy is created every time
    /// (an existing one answers 409), so one deleted since is recreated.
    pub async fn isolate_pod(
        &self,
        pod: &PodRef,
        labels: &BTreeMap<String, String>,
    ) -> Result<Applied, CallError> {
        self.ensure_isolation_policy(&pod.namespace, labels).await?;
        self.label_pod(pod, labels).await
    }

    async fn ensure_isolation_policy(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), CallError> {
        let name = isolation_policy_name(labels);
        let policy = NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "falco-nats".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(labels.clone()),
                    match_expressions: None,
                }),
                policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                ingress: None,
                egress: None,
            }),
        };
        let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), namespace);
        match self.call(api.create(&PostParams::default(), &policy)).await {
            Ok(_) => tracing::info!(namespace, "created the deny-all isolation NetworkPolicy"),
            Err(CallError::Kube(kube::Error::Api(status))) if status.is_already_exists() => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Records a Kubernetes Event on the pod.
    pub async fn record_event(
        &self,
        pod: &PodRef,
        warning: bool,
        reason: &str,
        action: &str,
        message: &str,
    ) -> Result<(), CallError> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.falco-nats.", pod.name)),
                namespace: Some(pod.namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: pod.uid.clone(),
                ..ObjectReference::default()
            },
            reason: Some(reason.to_owned()),
            message: Some(message.chars().take(1024).collect()),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            action: Some(action.to_owned()),
            source: Some(EventSource {
                component: Some("falco-nats".into()),
                host: None,
            }),
            reporting_component: Some("falco-nats".into()),
            reporting_instance: Some(self.instance.clone()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &pod.namespace);
        self.call(api.create(&PostParams::default(), &event))
            .await
            .map(|_| ())
    }
}

/// The isolation policy's name: fixed for the default label, suffixed with
/// a digest for others, so each label set has its own policy.
pub fn isolation_policy_name(labels: &BTreeMap<String, String>) -> String {
    if *labels == super::policy::quarantine_labels() {
        return ISOLATION_POLICY.to_owned();
    }
    let text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let digest = xxhash_rust::xxh3::xxh3_64(text.join(",").as_bytes());
    format!("{ISOLATION_POLICY}-{:08x}", digest as u32)
}

fn applied<T>(result: Result<T, CallError>) -> Result<Applied, CallError> {
    match result {
        Ok(_) => Ok(Applied::Done),
        Err(CallError::Kube(kube::Error::Api(status))) if status.is_not_found() => {
            Ok(Applied::Gone)
        }
        Err(CallError::Kube(kube::Error::Api(status))) if status.is_conflict() => {
            Ok(Applied::Replaced)
        }
        Err(e) => Err(e),
    }
}
