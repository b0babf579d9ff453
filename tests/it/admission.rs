//! The ValidatingAdmissionPolicy that deploy/ ships for the responder's
//! service account, its CEL evaluated here (with the `cel` crate) the way
//! the API server evaluates it: it admits exactly what the real responder
//! writes (the label patch, the isolation NetworkPolicy), and refuses what a
//! leaked token would try.

use std::path::Path;

use crate::support::fake_kube::KubeApi;
use crate::support::*;
use cel::{Context, Program};
use falco_nats::respond::policy::Policy;
use serde::Deserialize;
use serde_json::{json, Value};

const RESPONDER: &str = "system:serviceaccount:falco-nats:falco-nats-respond";

struct AdmissionPolicy {
    conditions: Vec<Program>,
    validations: Vec<(Program, String)>,
}

impl AdmissionPolicy {
    fn shipped() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/respond-admission.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let policy = serde_norway::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap())
            .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
            .unwrap();
        let compile = |e: &Value| {
            let text = e["expression"].as_str().unwrap();
            Program::compile(text).unwrap_or_else(|err| panic!("{text}: {err}"))
        };
        AdmissionPolicy {
            conditions: policy["spec"]["matchConditions"]
                .as_array()
                .unwrap()
                .iter()
                .map(compile)
                .collect(),
            validations: policy["spec"]["validations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| (compile(v), v["message"].as_str().unwrap().to_owned()))
                .collect(),
        }
    }

    /// `Ok` when admitted (or not matched), else the refusal's message.
    fn admit(
        &self,
        user: &str,
        resource: &str,
        old: Option<&Value>,
        new: &Value,
    ) -> Result<(), String> {
        let mut ctx = Context::default();
        ctx.add_variable(
            "request",
            json!({"userInfo": {"username": user}, "resource": {"resource": resource}}),
        )
        .unwrap();
        ctx.add_variable("object", new.clone()).unwrap();
        ctx.add_variable("oldObject", old.cloned().unwrap_or(Value::Null))
            .unwrap();
        let truth = |p: &Program| match p.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => b,
            other => panic!("not a boolean: {other:?}"),
        };
        if !self.conditions.iter().all(truth) {
            return Ok(());
        }
        for (program, message) in &self.validations {
            if !truth(program) {
                return Err(message.clone());
            }
        }
        Ok(())
    }
}

#[tokio::test]
async fn the_admission_policy_admits_what_the_responder_writes_and_nothing_else() {
    let policy = AdmissionPolicy::shipped();
    let nats = NatsServer::start();
    let kube = KubeApi::start().await.unwrap();
    kube.add_pod("shop", "a", "uid-a", Some("ReplicaSet"));
    kube.add_pod("shop", "b", "uid-b", Some("ReplicaSet"));
    let before_a = kube.pod("shop", "a").unwrap();
    let before_b = kube.pod("shop", "b").unwrap();
    let client = nats.client().await;
    let mut out = client.subscribe("falco.response.>").await.unwrap();
    let mut options = respond_options(&nats.url(), &kubeconfig(&kube));
    // The shipped policy's label, and isolation with the default label.
    options.policy =
        Policy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/policy.yaml"))
            .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(falco_nats::respond::run(options, None, stop.clone()));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let alert = |rule: &str, pod: &str| {
        json!({
            "hostname": "n", "output": "o", "priority": "Notice", "rule": rule,
            "output_fields": {"k8s.ns.name": "shop", "k8s.pod.name": pod},
            "source": "syscall", "tags": [], "time": "2026-11-25T00:00:00.000000000Z",
        })
        .to_string()
    };
    for (rule, pod) in [
        ("Terminal shell in container", "a"),
        ("Drop and execute new binary in container", "b"),
    ] {
        client
            .publish("falco.notice.x", alert(rule, pod).into())
            .await
            .unwrap();
    }
    let got = receive(&mut out, 3, std::time::Duration::from_secs(10)).await;
    let outcomes: Vec<Value> = got
        .iter()
        .map(|m| serde_json::from_slice::<Value>(&m.payload).unwrap()["outcome"].clone())
        .collect();
    assert_eq!(outcomes, [json!("done"), json!("done"), json!("done")]);
    stop.cancel();
    task.await.unwrap().unwrap();

    // What the responder wrote is admitted.
    let after_a = kube.pod("shop", "a").unwrap();
    assert_eq!(
        after_a["metadata"]["labels"]["falco-nats/shell-seen"],
        "true"
    );
    policy
        .admit(RESPONDER, "pods", Some(&before_a), &after_a)
        .unwrap();
    let isolation = kube.network_policies();
    assert_eq!(isolation.len(), 1);
    policy
        .admit(RESPONDER, "networkpolicies", None, &isolation[0])
        .unwrap();

    // What a leaked token might try is refused.
    let mut relabelled = after_a.clone();
    relabelled["metadata"]["labels"]["app"] = json!("elsewhere");
    let mut unlabelled = after_a.clone();
    unlabelled["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("app");
    let mut new_image = after_a.clone();
    new_image["spec"]["containers"][0]["image"] = json!("evil/miner");
    let mut annotated = after_a.clone();
    annotated["metadata"]["annotations"] = json!({"x": "y"});
    let mut orphaned = before_b.clone();
    orphaned["metadata"]["ownerReferences"] = json!([]);
    for (what, old, new) in [
        ("a label changed", &before_a, &relabelled),
        ("a label removed", &before_a, &unlabelled),
        ("the image changed", &before_a, &new_image),
        ("an annotation added", &before_a, &annotated),
        ("the owner removed", &before_b, &orphaned),
    ] {
        assert!(
            policy.admit(RESPONDER, "pods", Some(old), new).is_err(),
            "{what} was admitted"
        );
    }
    let base = isolation[0].clone();
    let mut allow_all = base.clone();
    allow_all["spec"]["ingress"] = json!([{}]);
    let mut whole_namespace = base.clone();
    whole_namespace["spec"]["podSelector"] = json!({});
    let mut other_name = base.clone();
    other_name["metadata"]["name"] = json!("open-everything");
    let mut other_pods = base.clone();
    other_pods["spec"]["podSelector"]["matchLabels"] = json!({"app": "payments"});
    let mut ingress_only = base.clone();
    ingress_only["spec"]["policyTypes"] = json!(["Ingress"]);
    for (what, new) in [
        ("an allow rule", &allow_all),
        ("every pod of the namespace", &whole_namespace),
        ("another name", &other_name),
        ("other pods", &other_pods),
        ("ingress only", &ingress_only),
    ] {
        assert!(
            policy
                .admit(RESPONDER, "networkpolicies", None, new)
                .is_err(),
            "a NetworkPolicy with {what} was admitted"
        );
    }
    // Anyone else is not this policy's business.
    policy
        .admit(
            "system:serviceaccount:shop:deployer",
            "pods",
            Some(&before_a),
            &new_image,
        )
        .unwrap();
}
