//! The responder's RBAC and ValidatingAdmissionPolicy as deploy/ ships them,
//! applied to a real kube-apiserver (support::real_kube) and judged by it:
//! everything the real responder writes is admitted, and every write a
//! leaked responder token might try beyond that is refused (issue 22,
//! item 3): deletes and patches in the protected namespaces, of pods a
//! DaemonSet owns, of static (mirror) pods, other changes to a pod, other
//! NetworkPolicies, other kinds.

use std::path::Path;
use std::time::Duration;

use crate::support::real_kube::{client_from, Cluster};
use crate::support::shipped::{deploy, yaml_docs};
use crate::support::*;
use falco_nats::respond::policy::Policy;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

const RESPONDER: (&str, &str) = ("falco-nats", "falco-nats-respond");
const WAIT: Duration = Duration::from_secs(20);

/// The base's namespaces, the responder's RBAC and admission policy, from
/// deploy/base as they are.
pub async fn apply_responder_access(cluster: &Cluster) {
    let mut docs = Vec::new();
    for file in [
        "namespaces.yaml",
        "respond-rbac.yaml",
        "respond-admission.yaml",
    ] {
        let text = std::fs::read_to_string(deploy().join("base").join(file)).unwrap();
        docs.extend(yaml_docs(&text));
    }
    cluster.apply(&docs).await.unwrap();
}

fn pod(name: &str, extra_metadata: Value) -> Pod {
    let mut metadata = json!({"name": name, "labels": {"app": "shop"}});
    // (extra labels replace these: a DaemonSet's pod carries its selector's)
    if let (Some(m), Some(extra)) = (metadata.as_object_mut(), extra_metadata.as_object()) {
        m.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "metadata": metadata,
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    }))
    .unwrap()
}

async fn make_pod(admin: &kube::Client, namespace: &str, pod: Pod) -> Pod {
    Api::<Pod>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {namespace}: {e}"))
}

/// A DaemonSet `agent` in `namespace` (no node: it makes no pod) and a pod
/// `name` it owns, as its controller would make one.
async fn make_daemonset_pod(admin: &kube::Client, namespace: &str, name: &str) {
    let daemonsets = Api::<DaemonSet>::namespaced(admin.clone(), namespace);
    let daemonset = match daemonsets.get_opt("agent").await.unwrap() {
        Some(found) => found,
        None => {
            let daemonset: DaemonSet = serde_json::from_value(json!({
                "metadata": {"name": "agent"},
                "spec": {"selector": {"matchLabels": {"app": "agent"}},
                         "template": {"metadata": {"labels": {"app": "agent"}},
                                      "spec": {"containers": [{"name": "a", "image": "registry.invalid/a:1"}]}}},
            }))
            .unwrap();
            daemonsets
                .create(&PostParams::default(), &daemonset)
                .await
                .unwrap()
        }
    };
    let owned = pod(
        name,
        json!({"labels": {"app": "agent"}, "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent",
            "uid": daemonset.metadata.uid, "controller": true,
        }]}),
    );
    make_pod(admin, namespace, owned).await;
}

/// A write the responder's token tries: `Ok` if the server admitted it,
/// else its answer (code and message).
type Outcome = Result<(), String>;

fn judged<T>(result: Result<T, kube::Error>) -> Outcome {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err(format!("{} {}", e.code, e.message)),
        Err(e) => panic!("not an answer from the API server: {e}"),
    }
}

/// The deny-all NetworkPolicy the responder makes.
fn isolation(name: &str) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"podSelector": {"matchLabels": {"falco-nats/quarantine": "true"}},
                 "policyTypes": ["Ingress", "Egress"]},
    }))
    .unwrap()
}

/// Waits until the server enforces the policy (it loads a new policy and
/// its parameters within a second or two): a dry-run delete in
/// kube-system is refused by it.
async fn wait_for_the_policy(responder: &kube::Client, admin: &kube::Client) {
    let probe = "falco-nats-policy-probe";
    let system: Api<Pod> = Api::namespaced(admin.clone(), "kube-system");
    if system.get_opt(probe).await.unwrap().is_none() {
        let _ = system
            .create(&PostParams::default(), &pod(probe, json!({})))
            .await;
    }
    let as_responder: Api<Pod> = Api::namespaced(responder.clone(), "kube-system");
    let dry = DeleteParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Err(refused) = judged(as_responder.delete(probe, &dry).await) {
            if refused.contains("protected namespace") {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the policy never took effect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_leaked_responder_token_can_write_only_what_the_responder_writes() {
    let cluster = Cluster::get();
    apply_responder_access(cluster).await;
    let admin = cluster.admin().await;
    let token = cluster.token(RESPONDER.0, RESPONDER.1).await;
    let leaked = client_from(&cluster.kubeconfig("responder", &token))
        .await
        .unwrap();
    wait_for_the_policy(&leaked, &admin).await;

    let shop = cluster.namespace("shop").await;
    let plain = make_pod(&admin, &shop, pod("plain", json!({}))).await;
    make_daemonset_pod(&admin, &shop, "agent-x").await;
    // A kubelet's mirror of a static pod: the annotation, on its node.
    let mut mirror = pod(
        "static-web",
        json!({"annotations": {"kubernetes.io/config.mirror": "abc", "kubernetes.io/config.source": "file"}}),
    );
    if let Some(spec) = mirror.spec.as_mut() {
        spec.node_name = Some("node-1".into());
    }
    make_pod(&admin, &shop, mirror).await;
    let system = make_pod(
        &admin,
        "kube-system",
        pod(&format!("system-{shop}"), json!({})),
    )
    .await;
    let system_name = system.metadata.name.clone().unwrap();

    let pods = |ns: &str| Api::<Pod>::namespaced(leaked.clone(), ns);
    let policies = |ns: &str| Api::<NetworkPolicy>::namespaced(leaked.clone(), ns);
    let dry_delete = DeleteParams {
        dry_run: true,
        ..Default::default()
    };
    let add_label =
        Patch::Merge(json!({"metadata": {"labels": {"falco-nats/shell-seen": "true"}}}));
    let dry_patch = PatchParams {
        dry_run: true,
        ..Default::default()
    };

    // What the responder does, admitted (dry runs: nothing changes).
    for (what, outcome) in [
        (
            "delete a pod",
            judged(pods(&shop).delete("plain", &dry_delete).await),
        ),
        (
            "add a label",
            judged(pods(&shop).patch("plain", &dry_patch, &add_label).await),
        ),
        (
            "create the isolation policy",
            judged(
                policies(&shop)
                    .create(
                        &PostParams {
                            dry_run: true,
                            ..Default::default()
                        },
                        &isolation("falco-nats-isolate"),
                    )
                    .await,
            ),
        ),
    ] {
        assert_eq!(outcome, Ok(()), "the responder's own write refused: {what}");
    }

    // What a leaked token might try beyond that, refused by the server.
    let mut open = serde_json::to_value(isolation("falco-nats-isolate")).unwrap();
    open["spec"]["ingress"] = json!([{}]);
    let open: NetworkPolicy = serde_json::from_value(open).unwrap();
    let create = PostParams::default();
    let refusals = [
        (
            "delete a pod in kube-system",
            judged(pods("kube-system").delete(&system_name, &DeleteParams::default()).await),
        ),
        (
            "label a pod in kube-system",
            judged(pods("kube-system").patch(&system_name, &PatchParams::default(), &add_label).await),
        ),
        (
            "delete a DaemonSet's pod",
            judged(pods(&shop).delete("agent-x", &DeleteParams::default()).await),
        ),
        (
            "label a DaemonSet's pod",
            judged(pods(&shop).patch("agent-x", &PatchParams::default(), &add_label).await),
        ),
        (
            "delete a static pod",
            judged(pods(&shop).delete("static-web", &DeleteParams::default()).await),
        ),
        (
            "isolate in kube-system",
            judged(policies("kube-system").create(&create, &isolation("falco-nats-isolate")).await),
        ),
        (
            "isolate in falco-nats",
            judged(policies("falco-nats").create(&create, &isolation("falco-nats-isolate")).await),
        ),
        (
            "a NetworkPolicy that allows",
            judged(policies(&shop).create(&create, &open).await),
        ),
        (
            "a NetworkPolicy of another name",
            judged(policies(&shop).create(&create, &isolation("open-everything")).await),
        ),
        (
            "change a pod's image",
            judged(
                pods(&shop)
                    .patch(
                        "plain",
                        &PatchParams::default(),
                        &Patch::Strategic(json!({"spec": {"containers": [{"name": "app", "image": "evil/miner"}]}})),
                    )
                    .await,
            ),
        ),
        (
            "change a label",
            judged(
                pods(&shop)
                    .patch(
                        "plain",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {"app": "elsewhere"}}})),
                    )
                    .await,
            ),
        ),
        (
            "remove a label",
            judged(
                pods(&shop)
                    .patch(
                        "plain",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {"app": null}}})),
                    )
                    .await,
            ),
        ),
        (
            "add a label outside falco-nats/ (into another Service)",
            judged(
                pods(&shop)
                    .patch(
                        "plain",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {"tier": "payments"}}})),
                    )
                    .await,
            ),
        ),
        (
            "write an Event in kube-system",
            judged(
                Api::<k8s_openapi::api::core::v1::Event>::namespaced(leaked.clone(), "kube-system")
                    .create(
                        &create,
                        &serde_json::from_value(json!({
                            "metadata": {"name": format!("forged-{shop}")},
                            "involvedObject": {"kind": "Pod", "namespace": "kube-system", "name": system_name},
                            "reason": "Forged", "message": "forged", "type": "Normal",
                        }))
                        .unwrap(),
                    )
                    .await,
            ),
        ),
        (
            "add an annotation",
            judged(
                pods(&shop)
                    .patch(
                        "plain",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})),
                    )
                    .await,
            ),
        ),
        (
            "create a pod",
            judged(pods(&shop).create(&create, &pod("intruder", json!({}))).await),
        ),
        (
            "delete a DaemonSet",
            judged(
                Api::<DaemonSet>::namespaced(leaked.clone(), &shop)
                    .delete("agent", &DeleteParams::default())
                    .await,
            ),
        ),
        (
            "read a Secret",
            judged(
                Api::<k8s_openapi::api::core::v1::Secret>::namespaced(leaked.clone(), &shop)
                    .get("anything")
                    .await,
            ),
        ),
        (
            "list pods",
            judged(pods(&shop).list(&Default::default()).await),
        ),
    ];
    let mut admitted = Vec::new();
    for (what, outcome) in &refusals {
        match outcome {
            Ok(()) => admitted.push(*what),
            Err(answer) => {
                eprintln!("refused: {what}: {answer}");
                assert!(
                    answer.starts_with("403 ") || answer.starts_with("422 "),
                    "{what}: {answer}"
                );
            }
        }
    }
    assert!(
        admitted.is_empty(),
        "a leaked token was allowed to {admitted:?}"
    );
    // Nothing changed.
    let still = Api::<Pod>::namespaced(admin.clone(), &shop)
        .get("plain")
        .await
        .unwrap();
    assert_eq!(still.metadata.labels, plain.metadata.labels);
    for (ns, name) in [
        (shop.as_str(), "agent-x"),
        (shop.as_str(), "static-web"),
        ("kube-system", system_name.as_str()),
    ] {
        assert!(Api::<Pod>::namespaced(admin.clone(), ns)
            .get_opt(name)
            .await
            .unwrap()
            .is_some());
    }
    Api::<Pod>::namespaced(admin.clone(), "kube-system")
        .delete(&system_name, &DeleteParams::default())
        .await
        .unwrap();
}

/// The real responder, with the shipped policy file and the shipped
/// ServiceAccount's token, on the real API server: what it writes is
/// admitted and lands (the label, the isolation policy, the deletion with
/// its UID precondition), and a pod the rails protect stays.
#[tokio::test]
async fn the_responder_as_deployed_acts_on_the_real_api_server() {
    let cluster = Cluster::get();
    apply_responder_access(cluster).await;
    let admin = cluster.admin().await;
    let token = cluster.token(RESPONDER.0, RESPONDER.1).await;
    let kubeconfig = cluster.kubeconfig("responder", &token);
    wait_for_the_policy(&client_from(&kubeconfig).await.unwrap(), &admin).await;
    let shop = cluster.namespace("shop").await;
    for name in ["shell", "dropper", "critical"] {
        make_pod(&admin, &shop, pod(name, json!({}))).await;
    }

    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut out = client.subscribe("falco.response.>").await.unwrap();
    client.flush().await.unwrap();
    let mut options = respond_options(&nats.url(), &kubeconfig);
    options.policy =
        Policy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/policy.yaml"))
            .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(falco_nats::respond::run(options, None, stop.clone()));
    let alert = |priority: &str, rule: &str, pod: &str| {
        json!({
            "hostname": "n", "output": "o", "priority": priority, "rule": rule,
            "output_fields": {"k8s.ns.name": shop, "k8s.pod.name": pod},
            "source": "syscall", "tags": [], "time": "2026-12-05T00:00:00.000000000Z",
        })
        .to_string()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (priority, rule, pod) in [
        ("Notice", "Terminal shell in container", "shell"),
        (
            "Notice",
            "Drop and execute new binary in container",
            "dropper",
        ),
        ("Critical", "Anything critical", "critical"),
    ] {
        client
            .publish("falco.notice.x", alert(priority, rule, pod).into())
            .await
            .unwrap();
    }
    let got = receive(&mut out, 4, WAIT).await;
    let decisions: Vec<Value> = got
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    for d in &decisions {
        assert_eq!(d["outcome"], "done", "{d}");
    }

    // The second isolation in the namespace finds the NetworkPolicy there
    // (the server's 409) and is done; the rails hold on real objects: a
    // pod in kube-system, a pod a DaemonSet owns.
    make_pod(&admin, &shop, pod("dropper2", json!({}))).await;
    let system = make_pod(
        &admin,
        "kube-system",
        pod(&format!("sys-{shop}"), json!({})),
    )
    .await;
    make_daemonset_pod(&admin, &shop, "agent-y").await;
    let elsewhere = |ns: &str, pod: &str| {
        json!({
            "hostname": "n", "output": "o", "priority": "Critical", "rule": "Anything critical",
            "output_fields": {"k8s.ns.name": ns, "k8s.pod.name": pod},
            "source": "syscall", "tags": [], "time": "2026-12-05T00:00:00.000000000Z",
        })
        .to_string()
    };
    for payload in [
        alert(
            "Notice",
            "Drop and execute new binary in container",
            "dropper2",
        ),
        elsewhere("kube-system", system.metadata.name.as_deref().unwrap()),
        elsewhere(&shop, "agent-y"),
    ] {
        client
            .publish("falco.notice.x", payload.into())
            .await
            .unwrap();
    }
    let more: Vec<Value> = receive(&mut out, 4, WAIT)
        .await
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    let seen: Vec<(String, String)> = more
        .iter()
        .map(|d| {
            (
                d["outcome"].as_str().unwrap().to_owned(),
                d["reason"]
                    .as_str()
                    .unwrap()
                    .split(':')
                    .next()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(seen[0].0, "done", "isolation again: {:?}", more[0]);
    assert_eq!(seen[1].0, "done", "{:?}", more[1]);
    assert_eq!(
        seen[2],
        ("skipped".to_owned(), "protected_namespace".to_owned())
    );
    assert_eq!(seen[3], ("skipped".to_owned(), "daemonset_pod".to_owned()));
    stop.cancel();
    task.await.unwrap().unwrap();

    let pods: Api<Pod> = Api::namespaced(admin.clone(), &shop);
    assert!(pods.get_opt("agent-y").await.unwrap().is_some());
    Api::<Pod>::namespaced(admin.clone(), "kube-system")
        .delete(
            system.metadata.name.as_deref().unwrap(),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    let shell = pods.get("shell").await.unwrap();
    assert_eq!(
        shell.metadata.labels.unwrap()["falco-nats/shell-seen"],
        "true"
    );
    let isolation = Api::<NetworkPolicy>::namespaced(admin.clone(), &shop)
        .get("falco-nats-isolate")
        .await
        .unwrap();
    assert_eq!(
        isolation.spec.unwrap().policy_types.unwrap(),
        ["Ingress", "Egress"]
    );
    // Deleted: gone at once (no kubelet to wait for), or going.
    for name in ["dropper", "critical"] {
        let left = pods.get_opt(name).await.unwrap();
        assert!(
            left.as_ref()
                .is_none_or(|p| p.metadata.deletion_timestamp.is_some()),
            "{name} still there"
        );
    }
}

/// The policy's literals are the ConfigMap the responder reads
/// (falco-nats-protected), in deploy/base and in the chart's rendering.
#[test]
fn the_policy_and_the_responder_read_one_list() {
    let base =
        yaml_docs(&std::fs::read_to_string(deploy().join("base/respond-admission.yaml")).unwrap());
    let chart = crate::support::manifests::render_chart(
        &crate::support::manifests::chart_dir().join("ci/default-values.yaml"),
    );
    for (what, docs) in [("deploy/base", &base), ("the chart", &chart)] {
        let map = docs
            .iter()
            .find(|d| {
                d["kind"] == "ConfigMap"
                    && d["metadata"]["name"]
                        .as_str()
                        .unwrap()
                        .ends_with("-protected")
            })
            .unwrap();
        let policy = docs
            .iter()
            .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
            .unwrap();
        let variable = |name: &str| {
            policy["spec"]["variables"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .unwrap()["expression"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let data = &map["data"];
        assert_eq!(
            variable("protected"),
            format!("'{}'.split(',')", data["namespaces"].as_str().unwrap()),
            "{what}"
        );
        for key in ["allowDaemonSetPods", "allowStaticPods"] {
            assert_eq!(
                variable(key),
                format!("'{}' == 'true'", data[key].as_str().unwrap()),
                "{what}: {key}"
            );
        }
        assert!(
            policy["spec"].get("paramKind").is_none(),
            "{what}: no parameter object"
        );
    }
}
