//! The responder against a real kube-apiserver with its controllers
//! (support::real_kube), with the shipped RBAC and admission policy and the
//! shipped ServiceAccount's token: the UID precondition as the server
//! enforces it, the grace period it records, Events readable in
//! events.k8s.io/v1, and min_healthy_replicas on a Deployment and a
//! StatefulSet the controllers run (their pods made Ready through their
//! status: no kubelet runs here).

use std::time::{Duration, Instant};

use crate::admission::apply_responder_access;
use crate::support::real_kube::Cluster;
use crate::support::responder::{alert, pod_alert, results};
use crate::support::*;
use falco_nats::respond::policy::Policy;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// A responder on its own nats-server, acting with the shipped
/// ServiceAccount's token.
struct Scene {
    _nats: NatsServer,
    client: async_nats::Client,
    out: async_nats::Subscriber,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), falco_nats::respond::RespondError>>,
}

impl Scene {
    async fn start(
        cluster: &Cluster,
        tune: impl FnOnce(&mut falco_nats::respond::RespondOptions),
    ) -> Scene {
        apply_responder_access(cluster).await;
        let token = cluster.token("falco-nats", "falco-nats-respond").await;
        let kubeconfig = cluster.kubeconfig("responder", &token);
        let nats = NatsServer::start();
        let client = nats.client().await;
        let out = client.subscribe("falco.response.>").await.unwrap();
        client.flush().await.unwrap();
        let mut options = respond_options(&nats.url(), &kubeconfig);
        tune(&mut options);
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(falco_nats::respond::run(options, None, stop.clone()));
        // Subscribed once the kill switch was read: give it a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Scene {
            _nats: nats,
            client,
            out,
            stop,
            task,
        }
    }

    async fn decide(&mut self, payload: Vec<u8>) -> Value {
        crate::support::responder::publish(&self.client, payload).await;
        results(&mut self.out, 1).await.remove(0)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    }))
    .unwrap()
}

/// A pod deleted and made again under its name is not the pod the alert
/// was about: the server refuses the delete on the UID (409) and the
/// replacement stays. With the current UID it goes, with the policy's
/// grace period. Each decision leaves an Event, readable as events.k8s.io/v1.
#[tokio::test]
async fn the_uid_precondition_and_events_on_a_real_api_server() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("uid").await;
    let admin = cluster.admin().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let first = pods
        .create(&PostParams::default(), &pod("web"))
        .await
        .unwrap();
    let old_uid = first.metadata.uid.clone().unwrap();
    pods.delete("web", &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while pods.get_opt("web").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "web never went");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = pods
        .create(&PostParams::default(), &pod("web"))
        .await
        .unwrap();
    let new_uid = second.metadata.uid.clone().unwrap();
    // A scheduled pod keeps its grace period on the server (an unscheduled
    // one is removed at once): give the grace-period pod a node.
    let mut graced = pod("graced");
    graced.spec.as_mut().unwrap().node_name = Some("node-1".into());
    let graced = pods.create(&PostParams::default(), &graced).await.unwrap();

    let mut scene = Scene::start(cluster, |o| {
        o.policy = Policy::parse(
            "test",
            r#"
rules:
  - name: the graced one
    match: {output_fields: ["k8s.pod.name = graced"]}
    actions: [{action: delete-pod, grace_period_seconds: 17}]
  - name: critical
    match: {priority: ">=Critical"}
    actions: [{action: delete-pod, grace_period_seconds: 0}]
"#,
        )
        .unwrap();
    })
    .await;
    let replaced = scene
        .decide(pod_alert("Critical", &ns, "web", Some(&old_uid)))
        .await;
    assert_eq!(replaced["outcome"], "replaced", "{replaced}");
    assert_eq!(
        pods.get("web").await.unwrap().metadata.uid.as_deref(),
        Some(new_uid.as_str()),
        "the replacement stays"
    );
    let done = scene
        .decide(pod_alert("Critical", &ns, "web", Some(&new_uid)))
        .await;
    assert_eq!(done["outcome"], "done", "{done}");
    assert!(pods.get_opt("web").await.unwrap().is_none());

    let graced_alert = pod_alert("Critical", &ns, "graced", graced.metadata.uid.as_deref());
    let d = scene.decide(graced_alert).await;
    assert_eq!(d["outcome"], "done", "{d}");
    let going = pods.get("graced").await.unwrap();
    assert_eq!(going.metadata.deletion_grace_period_seconds, Some(17));
    assert!(going.metadata.deletion_timestamp.is_some());
    scene.stop().await;

    // The Events, as events.k8s.io/v1 shows them.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin, &ns);
    let listed = events.list(&ListParams::default()).await.unwrap();
    let about: Vec<(String, String)> = listed
        .items
        .iter()
        .map(|e| {
            (
                e.regarding
                    .as_ref()
                    .and_then(|r| r.name.clone())
                    .unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
            )
        })
        .collect();
    eprintln!("events: {about:?}");
    for pod in ["web", "graced"] {
        assert!(
            about.iter().any(|(name, _)| name == pod),
            "no Event on {pod}: {about:?}"
        );
    }
}

/// Waits until `check` of the admin's view holds.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Makes every pod labelled `app=NAME` in `ns` Ready, until `count` are:
/// their names.
async fn ready_pods(cluster: &Cluster, ns: &str, app: &str, count: usize) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(cluster.admin().await, ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .unwrap();
        let mut names = Vec::new();
        for p in &listed.items {
            let name = p.metadata.name.clone().unwrap();
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if !ready && p.metadata.deletion_timestamp.is_none() {
                cluster.make_ready(ns, &name).await;
            }
            names.push(name);
        }
        if names.len() >= count {
            names.sort();
            return names;
        }
        assert!(Instant::now() < deadline, "never {count} pods of {app}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// min_healthy_replicas on workloads the controllers run: a Deployment of
/// three (its ReplicaSet made by the deployment controller), a StatefulSet
/// and a ReplicaSet of their own of three, every pod Ready. With a minimum of 2, one pod of
/// each may go; the next is kept, on the real status.
#[tokio::test]
async fn min_healthy_replicas_on_real_deployments_and_statefulsets() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("replicas").await;
    let admin = cluster.admin().await;
    let template = |app: &str| {
        json!({"metadata": {"labels": {"app": app}},
               "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}})
    };
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                 "template": template("web")},
    }))
    .unwrap();
    Api::<Deployment>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let statefulset: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {"replicas": 3, "serviceName": "db", "podManagementPolicy": "Parallel",
                 "selector": {"matchLabels": {"app": "db"}}, "template": template("db")},
    }))
    .unwrap();
    Api::<StatefulSet>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &statefulset)
        .await
        .unwrap();
    // A ReplicaSet of its own, without a Deployment.
    let bare: k8s_openapi::api::apps::v1::ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "bare"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "bare"}},
                 "template": template("bare")},
    }))
    .unwrap();
    let replicasets: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
        Api::namespaced(admin.clone(), &ns);
    replicasets
        .create(&PostParams::default(), &bare)
        .await
        .unwrap();
    let web = ready_pods(cluster, &ns, "web", 3).await;
    let db = ready_pods(cluster, &ns, "db", 3).await;
    let lone = ready_pods(cluster, &ns, "bare", 3).await;
    wait_until("bare 3/3 available", || async {
        replicasets
            .get("bare")
            .await
            .ok()
            .and_then(|r| r.status)
            .and_then(|s| s.available_replicas)
            == Some(3)
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    wait_until("web 3/3 available", || async {
        deployments
            .get("web")
            .await
            .ok()
            .and_then(|d| d.status)
            .and_then(|s| s.available_replicas)
            == Some(3)
    })
    .await;
    let statefulsets: Api<StatefulSet> = Api::namespaced(admin.clone(), &ns);
    wait_until("db 3/3 available", || async {
        statefulsets
            .get("db")
            .await
            .ok()
            .and_then(|s| s.status)
            .and_then(|s| s.available_replicas)
            == Some(3)
    })
    .await;

    let mut scene = Scene::start(cluster, |o| {
        o.limits.min_healthy_replicas = "2".parse().unwrap();
    })
    .await;
    let critical = |pod: &str| {
        alert(
            "Critical",
            "Drop and execute new binary in container",
            json!({"k8s.ns.name": ns, "k8s.pod.name": pod}),
        )
    };
    for (kind, pods) in [
        ("Deployment", &web),
        ("StatefulSet", &db),
        ("ReplicaSet", &lone),
    ] {
        let d = scene.decide(critical(&pods[0])).await;
        assert_eq!(d["outcome"], "done", "{kind}: {d}");
        let d = scene.decide(critical(&pods[1])).await;
        assert_eq!(d["outcome"], "skipped", "{kind}: {d}");
        let reason = d["reason"].as_str().unwrap();
        assert!(
            reason.starts_with(&format!("min_healthy_replicas: {kind} {ns}/")),
            "{reason}"
        );
    }
    scene.stop().await;
}

/// Ready means able to act (issue 25, item 5): the responder asks the API
/// server what it may do at start (connecting before the first alert) and
/// every minute. With the shipped token it is ready; with a token lacking
/// `delete pods` it is not, and /readyz names what is missing; with a
/// wrong server address it is not, and says why.
#[tokio::test]
async fn ready_means_the_api_server_lets_it_act() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let cluster = Cluster::get();
    apply_responder_access(cluster).await;
    let admin = cluster.admin().await;
    let ns = cluster.namespace("weak").await;
    // A ServiceAccount that may read and label pods, not delete them.
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "weak"}})).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": format!("weak-{ns}")},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]},
                  {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}],
    }))
    .unwrap();
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("weak-{ns}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("weak-{ns}")},
        "subjects": [{"kind": "ServiceAccount", "name": "weak", "namespace": ns}],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let nats = NatsServer::start();
    let readyz = |kubeconfig: std::path::PathBuf| {
        let url = nats.url();
        async move {
            let options = respond_options(&url, &kubeconfig);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let at = listener.local_addr().unwrap();
            let stop = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(falco_nats::respond::run(
                options,
                Some(listener),
                stop.clone(),
            ));
            let mut last = (0, String::new());
            for _ in 0..100 {
                let asked = tokio::time::timeout(
                    Duration::from_secs(1),
                    http_get_or_refused(at, "/readyz"),
                );
                if let Ok(answer) = asked.await {
                    last = answer;
                    if last.1.contains("kubernetes permissions: ")
                        && !last.1.contains("kubernetes permissions: \n")
                    {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            stop.cancel();
            task.await.unwrap().unwrap();
            last
        }
    };
    let shipped = cluster.token("falco-nats", "falco-nats-respond").await;
    let (code, body) = readyz(cluster.kubeconfig("responder", &shipped)).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("kubernetes permissions: granted"), "{body}");

    let weak = cluster.token(&ns, "weak").await;
    let (code, body) = readyz(cluster.kubeconfig("weak", &weak)).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("kubernetes permissions: missing: may not delete pods in every namespace"),
        "{body}"
    );

    // A server address where nothing answers.
    let wrong = cluster.kubeconfig("wrong", &shipped);
    let text = std::fs::read_to_string(&wrong)
        .unwrap()
        .replace(&cluster.url, &format!("https://127.0.0.1:{}", free_port()));
    std::fs::write(&wrong, text).unwrap();
    let (code, body) = readyz(wrong).await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("kubernetes permissions: cannot ask the API server"),
        "{body}"
    );
}

/// A GET, or status 0 while nothing listens yet.
async fn http_get_or_refused(at: std::net::SocketAddr, path: &str) -> (u16, String) {
    match tokio::net::TcpStream::connect(at).await {
        Ok(_) => http_get(at, path).await,
        Err(_) => (0, String::new()),
    }
}

/// The namespaced-rbac component as shipped (its Role and RoleBinding,
/// bound here to a ServiceAccount of the test's, in a namespace of the
/// test's): the responder with `--only-namespace` is ready (it asks for
/// its permissions in that namespace), acts there, and the token can do
/// nothing in another namespace.
#[tokio::test]
async fn the_namespaced_rbac_component_on_a_real_api_server() {
    use crate::support::shipped::{deploy, yaml_docs};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let cluster = Cluster::get();
    let admin = cluster.admin().await;
    let apps = cluster.namespace("apps").await;
    let other = cluster.namespace("other").await;
    let home = cluster.namespace("nsr").await;
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "responder"}})).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), &home)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let mut docs = yaml_docs(
        &std::fs::read_to_string(deploy().join("components/namespaced-rbac/role.yaml")).unwrap(),
    );
    for doc in &mut docs {
        doc["metadata"]["namespace"] = apps.clone().into();
        if doc["kind"] == "RoleBinding" {
            doc["subjects"] =
                json!([{"kind": "ServiceAccount", "name": "responder", "namespace": home}]);
        }
    }
    cluster.apply(&docs).await.unwrap();
    let pods = |ns: &str| Api::<Pod>::namespaced(admin.clone(), ns);
    pods(&apps)
        .create(&PostParams::default(), &pod("target"))
        .await
        .unwrap();
    pods(&other)
        .create(&PostParams::default(), &pod("bystander"))
        .await
        .unwrap();
    let token = cluster.token(&home, "responder").await;
    let kubeconfig = cluster.kubeconfig("namespaced", &token);

    // The token: nothing outside its namespace.
    let leaked = crate::support::real_kube::client_from(&kubeconfig)
        .await
        .unwrap();
    let refused = Api::<Pod>::namespaced(leaked, &other)
        .delete("bystander", &DeleteParams::default())
        .await;
    assert!(
        matches!(refused, Err(kube::Error::Api(ref e)) if e.code == 403),
        "{refused:?}"
    );

    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut out = client.subscribe("falco.response.>").await.unwrap();
    client.flush().await.unwrap();
    let mut options = respond_options(&nats.url(), &kubeconfig);
    options.rails.only_namespaces = Some([apps.clone()].into());
    // Ready: the permissions it asked for, in its namespace, are granted.
    let responder = crate::support::responder::Responder::start(options).await;
    for (ns, name) in [(&apps, "target"), (&other, "bystander")] {
        crate::support::responder::publish(&client, pod_alert("Critical", ns, name, None)).await;
    }
    let decisions = results(&mut out, 2).await;
    assert_eq!(decisions[0]["outcome"], "done", "{}", decisions[0]);
    assert_eq!(
        decisions[1]["reason"], "namespace_not_allowed",
        "{}",
        decisions[1]
    );
    assert!(pods(&apps).get_opt("target").await.unwrap().is_none());
    assert!(pods(&other).get_opt("bystander").await.unwrap().is_some());
    responder.stop().await;
}
