//! [`KubeApi`]: a small stand-in for the Kubernetes API server, for the
//! responder's tests and the demo, reached by a real `kube::Client` through
//! a kubeconfig. It answers like the real API for what the responder uses: bearer-token auth, `Status` bodies, 404 for a
//! missing pod, 409 for a failed UID precondition (from `DeleteOptions` in the
//! body, or `metadata.uid` in a merge patch), label merge patches, Events,
//! and NetworkPolicies (409 AlreadyExists on a second create); ReplicaSets,
//! Deployments and StatefulSets to read (their status as the controllers
//! write it: zero counts left out; 404 when missing; 403 Forbidden in a
//! namespace made unreadable, as RBAC answers).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

pub const TOKEN: &str = "test-token";

/// One DELETE the fake API accepted or refused.
#[derive(Debug, Clone)]
pub struct DeleteCall {
    pub namespace: String,
    pub name: String,
    pub grace_period_seconds: Option<i64>,
    pub uid_precondition: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
    /// When the request arrived (for latency measurements).
    pub at: std::time::Instant,
}

#[derive(Default)]
pub struct FakeState {
    pub pods: BTreeMap<(String, String), Value>,
    pub deletes: Vec<DeleteCall>,
    pub events: Vec<Value>,
    pub network_policies: BTreeMap<(String, String), Value>,
    /// `apps/v1` objects by (resource, namespace, name): `replicasets`,
    /// `deployments`, `statefulsets`.
    pub apps: BTreeMap<(String, String, String), Value>,
    /// Namespaces whose `apps/v1` objects this user may not read.
    pub apps_forbidden: std::collections::BTreeSet<String>,
    /// Every request: method and path.
    pub requests: Vec<(String, String)>,
    /// Added before every answer, to make calls take time.
    pub latency: std::time::Duration,
    /// Requests of this method answered with this status, this many times
    /// more (an API server in trouble).
    pub failing: Option<(String, u16, usize)>,
    next: u64,
}

/// The stand-in API server, serving until dropped.
pub struct KubeApi {
    pub state: Arc<Mutex<FakeState>>,
    pub url: String,
    task: tokio::task::JoinHandle<()>,
    /// A kubeconfig for it, removed with it.
    kubeconfig: std::path::PathBuf,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A workload's status as its controller writes it: counts of zero are
/// left out (`omitempty`).
fn status_counts(replicas: u32, available: u32) -> Value {
    let mut status = json!({"observedGeneration": 1});
    for (key, n) in [
        ("replicas", replicas),
        ("readyReplicas", available),
        ("availableReplicas", available),
        ("currentReplicas", replicas),
        ("updatedReplicas", replicas),
    ] {
        if n > 0 {
            status[key] = json!(n);
        }
    }
    status
}

fn not_found(kind: &str, name: &str) -> Response {
    status(404, "NotFound", format!("{kind} \"{name}\" not found"))
}

impl KubeApi {
    /// Serves on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0").await
    }

    /// Serves on `address`.
    pub async fn start_on(address: &str) -> std::io::Result<Self> {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let listener = tokio::net::TcpListener::bind(address).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let port = url.rsplit(':').next().unwrap_or("0");
        let kubeconfig = std::env::temp_dir().join(format!(
            "falco-nats-kube-api-{}-{port}.kubeconfig",
            std::process::id()
        ));
        let api = KubeApi {
            state,
            url,
            task,
            kubeconfig,
        };
        api.write_kubeconfig(&api.kubeconfig)?;
        Ok(api)
    }

    /// A kubeconfig for this server (written at start, removed on drop).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig for this server (with its token) to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: tester\n  user:\n    token: {TOKEN}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: tester\n    namespace: default\ncurrent-context: fake\n",
            self.url
        );
        std::fs::write(path, text)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a pod, optionally owned by a controller of `owner_kind`.
    pub fn add_pod(&self, namespace: &str, name: &str, uid: &str, owner_kind: Option<&str>) {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "1", "labels": {"app": name}},
            "spec": {"containers": [{"name": "main", "image": "nginx"}]},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
            ]},
        });
        if let Some(kind) = owner_kind {
            pod["metadata"]["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": kind, "name": format!("{name}-owner"),
                "uid": format!("{uid}-owner"), "controller": true,
            }]);
        }
        self.lock()
            .pods
            .insert((namespace.into(), name.into()), pod);
    }

    /// Adds a pod controlled by `owner_kind` `owner_name`, Ready or not.
    pub fn add_pod_of(
        &self,
        namespace: &str,
        name: &str,
        (owner_kind, owner_name): (&str, &str),
        ready: bool,
    ) {
        self.add_pod(namespace, name, &format!("uid-{name}"), Some(owner_kind));
        let mut st = self.lock();
        if let Some(pod) = st.pods.get_mut(&(namespace.into(), name.into())) {
            pod["metadata"]["ownerReferences"][0]["name"] = json!(owner_name);
            pod["metadata"]["ownerReferences"][0]["uid"] = json!(format!("uid-{owner_name}"));
            let ready = if ready { "True" } else { "False" };
            pod["status"]["conditions"][0]["status"] = json!(ready);
            pod["status"]["conditions"][1]["status"] = json!(ready);
        }
    }

    /// Adds a Deployment of `replicas` with `available` of them available,
    /// and its current ReplicaSet `<name>-5d8f7c9b6` (returned).
    pub fn add_deployment(
        &self,
        namespace: &str,
        name: &str,
        replicas: u32,
        available: u32,
    ) -> String {
        let rs = format!("{name}-5d8f7c9b6");
        let deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "generation": 1, "resourceVersion": "1"},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "main", "image": "nginx"}]}},
            },
            "status": status_counts(replicas, available),
        });
        let replica_set = json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {
                "name": rs, "namespace": namespace, "uid": format!("uid-{rs}"), "generation": 1, "resourceVersion": "1",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                                     "uid": format!("uid-{name}"), "controller": true, "blockOwnerDeletion": true}],
            },
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "main", "image": "nginx"}]}},
            },
            "status": status_counts(replicas, available),
        });
        let mut st = self.lock();
        st.apps.insert(
            ("deployments".into(), namespace.into(), name.into()),
            deployment,
        );
        st.apps.insert(
            ("replicasets".into(), namespace.into(), rs.clone()),
            replica_set,
        );
        rs
    }

    /// Adds a StatefulSet of `replicas` with `available` of them available.
    pub fn add_statefulset(&self, namespace: &str, name: &str, replicas: u32, available: u32) {
        let set = json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "generation": 1, "resourceVersion": "1"},
            "spec": {
                "replicas": replicas,
                "serviceName": name,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "main", "image": "postgres"}]}},
            },
            "status": status_counts(replicas, available),
        });
        self.lock()
            .apps
            .insert(("statefulsets".into(), namespace.into(), name.into()), set);
    }

    /// Removes an `apps/v1` object (`deployments`, `replicasets`, `statefulsets`).
    pub fn remove_apps(&self, resource: &str, namespace: &str, name: &str) {
        self.lock()
            .apps
            .remove(&(resource.into(), namespace.into(), name.into()));
    }

    /// Answers 403 to reads of `apps/v1` objects in `namespace`.
    pub fn forbid_apps(&self, namespace: &str) {
        self.lock().apps_forbidden.insert(namespace.into());
    }

    /// Adds `count` pods `<prefix>-<i>` with UIDs `uid-<i>`, owned by a ReplicaSet.
    pub fn add_pods(&self, namespace: &str, prefix: &str, count: usize) {
        for i in 0..count {
            self.add_pod(
                namespace,
                &format!("{prefix}-{i}"),
                &format!("uid-{i}"),
                Some("ReplicaSet"),
            );
        }
    }

    pub fn set_latency(&self, latency: std::time::Duration) {
        self.lock().latency = latency;
    }

    /// Answers the next `times` requests of `method` with `code` and a
    /// `Status` body, as an API server in trouble does (500, 503, 429).
    pub fn fail_next(&self, method: &str, code: u16, times: usize) {
        self.lock().failing = Some((method.to_owned(), code, times));
    }

    /// Deletes every NetworkPolicy (as an operator might).
    pub fn remove_network_policies(&self) {
        self.lock().network_policies.clear();
    }

    pub fn has_pod(&self, namespace: &str, name: &str) -> bool {
        self.lock()
            .pods
            .contains_key(&(namespace.into(), name.into()))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .pods
            .get(&(namespace.into(), name.into()))
            .cloned()
    }

    pub fn deletes(&self) -> Vec<DeleteCall> {
        self.lock().deletes.clone()
    }

    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    pub fn network_policies(&self) -> Vec<Value> {
        self.lock().network_policies.values().cloned().collect()
    }

    /// Every request so far: method and path.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.lock().requests.clone()
    }

    /// Requests other than GET.
    pub fn writes(&self) -> Vec<(String, String)> {
        self.lock()
            .requests
            .iter()
            .filter(|(m, _)| m != "GET")
            .cloned()
            .collect()
    }
}

async fn handle(
    State(state): State<Arc<Mutex<FakeState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let latency = state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut st = state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) {
        return status(401, "Unauthorized", "Unauthorized".into());
    }
    // What may I do? Everything, here (the real API server's tests judge
    // RBAC). Not counted among the requests the tests look at: the
    // responder asks at start and every minute.
    if let ("POST", ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"]) =
        (method.as_str(), parts.as_slice())
    {
        let mut review: Value = serde_json::from_slice(&body).unwrap_or_default();
        review["status"] = json!({"allowed": true});
        return ok(StatusCode::CREATED, &review);
    }
    st.requests.push((method.to_string(), path.clone()));
    if let Some(response) = fail_if_asked(&mut st, method.as_str(), &parts) {
        return response;
    }
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => get_pod(&st, ns, name),
        ("DELETE", ["api", "v1", "namespaces", ns, "pods", name]) => {
            delete_pod(&mut st, ns, name, &body)
        }
        ("PATCH", ["api", "v1", "namespaces", ns, "pods", name]) => {
            patch_pod(&mut st, ns, name, &headers, &body)
        }
        ("POST", ["api", "v1", "namespaces", ns, "events"]) => create_event(&mut st, ns, &body),
        ("GET", ["apis", "apps", "v1", "namespaces", ns, resource, name])
            if ["replicasets", "deployments", "statefulsets"].contains(resource) =>
        {
            get_apps(&st, ns, resource, name)
        }
        ("POST", ["apis", "networking.k8s.io", "v1", "namespaces", ns, "networkpolicies"]) => {
            create_network_policy(&mut st, ns, &body)
        }
        _ => status(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({method} {path})"),
        ),
    }
}

/// The answer of an API server in trouble, while [`KubeApi::fail_next`]
/// asks for one (a failed DELETE is recorded as such).
fn fail_if_asked(st: &mut FakeState, method: &str, parts: &[&str]) -> Option<Response> {
    let (failing, code, left) = st.failing.as_mut()?;
    if failing != method || *left == 0 {
        return None;
    }
    *left -= 1;
    let code = *code;
    if let ("DELETE", ["api", "v1", "namespaces", ns, "pods", name]) = (method, parts) {
        st.deletes.push(DeleteCall {
            namespace: (*ns).to_owned(),
            name: (*name).to_owned(),
            grace_period_seconds: None,
            uid_precondition: None,
            status: code,
            at: std::time::Instant::now(),
        });
    }
    Some(status(
        code,
        "InternalError",
        format!("the server is failing ({code})"),
    ))
}

fn get_apps(st: &FakeState, ns: &str, resource: &str, name: &str) -> Response {
    if st.apps_forbidden.contains(ns) {
        return status(
            403,
            "Forbidden",
            format!("{resource}.apps \"{name}\" is forbidden: User \"system:serviceaccount:falco-nats:falco-nats-respond\" cannot get resource \"{resource}\" in API group \"apps\" in the namespace \"{ns}\""),
        );
    }
    match st.apps.get(&(resource.into(), ns.into(), name.into())) {
        Some(object) => ok(StatusCode::OK, object),
        None => status(
            404,
            "NotFound",
            format!("{resource}.apps \"{name}\" not found"),
        ),
    }
}

fn get_pod(st: &FakeState, ns: &str, name: &str) -> Response {
    match st.pods.get(&((*ns).into(), (*name).into())) {
        Some(pod) => ok(StatusCode::OK, pod),
        None => not_found("pods", name),
    }
}

fn delete_pod(st: &mut FakeState, ns: &str, name: &str, body: &[u8]) -> Response {
    let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let grace = options["gracePeriodSeconds"].as_i64();
    let uid_pre = options["preconditions"]["uid"].as_str().map(str::to_owned);
    let key = ((*ns).to_owned(), (*name).to_owned());
    let mut call = DeleteCall {
        namespace: key.0.clone(),
        name: key.1.clone(),
        grace_period_seconds: grace,
        uid_precondition: uid_pre.clone(),
        status: 200,
        at: std::time::Instant::now(),
    };
    let response = match st.pods.get(&key) {
        None => {
            call.status = 404;
            not_found("pods", name)
        }
        Some(pod) => {
            let uid = pod["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            match uid_pre {
                Some(pre) if pre != uid => {
                    call.status = 409;
                    status(409, "Conflict", format!("Operation cannot be fulfilled on Pod \"{name}\": Precondition failed: UID in precondition: {pre}, UID in object meta: {uid}"))
                }
                _ => {
                    let pod = st.pods.remove(&key).unwrap_or_default();
                    ok(StatusCode::OK, &pod)
                }
            }
        }
    };
    st.deletes.push(call);
    response
}

fn patch_pod(
    st: &mut FakeState,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type != "application/merge-patch+json" {
        return status(
            415,
            "UnsupportedMediaType",
            format!("unsupported patch type {content_type}"),
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "invalid patch".into());
    };
    let Some(pod) = st.pods.get_mut(&((*ns).into(), (*name).into())) else {
        return not_found("pods", name);
    };
    if let Some(uid) = patch["metadata"]["uid"].as_str() {
        let actual = pod["metadata"]["uid"].as_str().unwrap_or_default();
        if uid != actual {
            return status(
                409,
                "Conflict",
                format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"
                ),
            );
        }
    }
    if let Some(labels) = patch["metadata"]["labels"].as_object() {
        for (k, v) in labels {
            pod["metadata"]["labels"][k] = v.clone();
        }
    }
    let pod = pod.clone();
    ok(StatusCode::OK, &pod)
}

fn create_event(st: &mut FakeState, ns: &str, body: &[u8]) -> Response {
    let Ok(mut event) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "invalid event".into());
    };
    st.next += 1;
    let generated = format!(
        "{}{:05}",
        event["metadata"]["generateName"]
            .as_str()
            .unwrap_or("event."),
        st.next
    );
    event["metadata"]["name"] = json!(generated);
    event["metadata"]["namespace"] = json!(ns);
    st.events.push(event.clone());
    ok(StatusCode::CREATED, &event)
}

fn create_network_policy(st: &mut FakeState, ns: &str, body: &[u8]) -> Response {
    let Ok(policy) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "invalid network policy".into());
    };
    let name = policy["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let key = ((*ns).to_owned(), name.clone());
    if st.network_policies.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            format!("networkpolicies.networking.k8s.io \"{name}\" already exists"),
        );
    }
    st.network_policies.insert(key, policy.clone());
    ok(StatusCode::CREATED, &policy)
}
