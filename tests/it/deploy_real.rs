//! Every shipped manifest applied to a real kube-apiserver with its
//! controllers (support::real_kube), not only validated against schemas:
//! each kustomize overlay with each component, server-side applied; the
//! chart installed, upgraded and uninstalled with helm for its default
//! values and each file in its ci/ directory. A refusal names the object
//! and the server's reason.
//!
//! The Prometheus Operator's ServiceMonitor and cert-manager's Certificate
//! are not served by a bare API server: the tests register minimal
//! definitions of both kinds (any fields), so the chart's values that use
//! them install; what those operators would do with them is theirs.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, ListParams};
use kube::discovery::{ApiResource, Discovery, Scope};
use serde_json::{json, Value};

use crate::support::manifests::{
    chart_dir, documents, helm, render_overlay, COMPONENT_SETS, OVERLAYS,
};
use crate::support::real_kube::Cluster;

/// Namespaces first, then definitions, then the rest: what an apply of a
/// whole rendering needs to find already there.
fn in_apply_order(mut docs: Vec<Value>) -> Vec<Value> {
    let rank = |d: &Value| match d["kind"].as_str() {
        Some("Namespace") => 0,
        Some("CustomResourceDefinition") => 1,
        _ => 2,
    };
    docs.sort_by_key(rank);
    docs
}

#[tokio::test]
async fn every_overlay_with_every_component_applies_to_a_real_api_server() {
    let cluster = Cluster::get();
    // The namespaced-rbac component's Role lives in `apps`.
    cluster.ensure_namespace("apps").await;
    let out = tempfile::tempdir().unwrap();
    let mut applied = 0;
    for overlay in OVERLAYS {
        for set in COMPONENT_SETS {
            let file = render_overlay(overlay, set, out.path());
            let docs = in_apply_order(documents(&file));
            applied += docs.len();
            if let Err(refusal) = cluster.apply(&docs).await {
                panic!("{overlay} with {set:?}: the API server refused {refusal}");
            }
        }
    }
    eprintln!("{applied} objects applied");
    // What the controllers made of it: the responder's ReplicaSet.
    let admin = cluster.admin().await;
    let sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> = Api::namespaced(admin, "falco-nats");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let listed = sets
            .list(&ListParams::default().labels("app.kubernetes.io/name=falco-nats-respond"))
            .await
            .unwrap();
        if !listed.items.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ReplicaSet for the responder"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn helm_run(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new(helm())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HELM_CACHE_HOME", kubeconfig.with_extension("helm-cache"))
        .env("HELM_CONFIG_HOME", kubeconfig.with_extension("helm-config"))
        .env("HELM_DATA_HOME", kubeconfig.with_extension("helm-data"))
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Minimal definitions of the two kinds the chart may render that a bare
/// API server does not serve.
async fn register_operator_kinds(cluster: &Cluster) {
    let crd = |group: &str, kind: &str, plural: &str| {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.{group}")},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase()},
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                }],
            },
        })
    };
    cluster
        .apply(&[
            crd("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
            crd("cert-manager.io", "Certificate", "certificates"),
        ])
        .await
        .unwrap();
    // Served once established.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let discovery = Discovery::new(cluster.admin().await).run().await.unwrap();
        let served = ["monitoring.coreos.com", "cert-manager.io"]
            .iter()
            .all(|g| discovery.groups().any(|x| x.name() == *g));
        if served {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the definitions were not served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Everything labelled as release `release`'s, of the kinds the chart
/// makes, in `namespaces` and cluster-wide: "kind namespace/name".
async fn left_of(cluster: &Cluster, release: &str, namespaces: &[&str]) -> Vec<String> {
    let client = cluster.admin().await;
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let kinds = [
        ("apps", "v1", "Deployment"),
        ("", "v1", "Service"),
        ("", "v1", "Secret"),
        ("", "v1", "ConfigMap"),
        ("", "v1", "ServiceAccount"),
        ("policy", "v1", "PodDisruptionBudget"),
        ("networking.k8s.io", "v1", "NetworkPolicy"),
        ("rbac.authorization.k8s.io", "v1", "Role"),
        ("rbac.authorization.k8s.io", "v1", "RoleBinding"),
        ("rbac.authorization.k8s.io", "v1", "ClusterRole"),
        ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"),
        (
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingAdmissionPolicy",
        ),
        (
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingAdmissionPolicyBinding",
        ),
        ("monitoring.coreos.com", "v1", "ServiceMonitor"),
        ("cert-manager.io", "v1", "Certificate"),
    ];
    let selector = format!("app.kubernetes.io/instance={release}");
    let mut left = Vec::new();
    for (group, version, kind) in kinds {
        let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
        let Some((resource, caps)) = discovery.resolve_gvk(&gvk) else {
            continue;
        };
        let apis: Vec<Api<DynamicObject>> = match caps.scope {
            Scope::Cluster => vec![Api::all_with(client.clone(), &resource)],
            Scope::Namespaced => namespaces
                .iter()
                .map(|ns| Api::namespaced_with(client.clone(), ns, &resource as &ApiResource))
                .collect(),
        };
        for api in apis {
            for o in api
                .list(&ListParams::default().labels(&selector))
                .await
                .unwrap()
            {
                left.push(format!(
                    "{kind} {}/{}",
                    o.metadata.namespace.unwrap_or_default(),
                    o.metadata.name.unwrap_or_default()
                ));
            }
        }
    }
    left
}

/// The chart, for real: `helm install` with each values file (each release
/// in namespaces of its own), `helm upgrade` keeps the certificates the
/// first install made (Falco keeps trusting the bridge), and
/// `helm uninstall` leaves nothing of the release behind.
#[tokio::test]
async fn the_chart_installs_upgrades_and_uninstalls_on_a_real_api_server() {
    let cluster = Cluster::get();
    register_operator_kinds(cluster).await;
    // The namespaces core-nats-namespaced-values.yaml gives the responder
    // Roles in.
    for ns in ["shop", "web"] {
        cluster.ensure_namespace(ns).await;
    }
    let kubeconfig = cluster.admin_kubeconfig();
    let chart = chart_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart.join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for (i, values) in files.iter().enumerate() {
        let name = values.file_name().unwrap().to_string_lossy().into_owned();
        let release = format!("chart{i}");
        let ns = cluster.namespace(&format!("chart{i}")).await;
        let falco_ns = cluster.namespace(&format!("falco{i}")).await;
        let set_falco = format!(
            "bridge.tls.client.namespace={falco_ns},networkPolicy.falcoNamespace={falco_ns}"
        );
        let install = |verb: &str| {
            let mut args = vec![
                verb,
                release.as_str(),
                chart.to_str().unwrap(),
                "-n",
                ns.as_str(),
            ];
            args.extend(["-f", values.to_str().unwrap(), "--set", set_falco.as_str()]);
            helm_run(&kubeconfig, &args)
        };
        let notes = install("install");
        assert!(notes.contains("STATUS: deployed"), "{name}: {notes}");
        let secrets = |namespace: String| {
            let admin = cluster.admin();
            async move {
                let api: Api<Secret> = Api::namespaced(admin.await, &namespace);
                let mut data = Vec::new();
                for s in api.list(&ListParams::default()).await.unwrap() {
                    if s.type_.as_deref() == Some("Opaque") {
                        data.push((s.metadata.name.clone().unwrap(), s.data.clone()));
                    }
                }
                data
            }
        };
        let made = (secrets(ns.clone()).await, secrets(falco_ns.clone()).await);
        if name == "default-values.yaml" {
            assert!(notes.contains("upgrades keep them"), "{notes}");
            // The bridge's certificate and the responders' seal.
            assert_eq!(made.0.len(), 2, "the chart's Secrets: {:?}", made.0);
            assert_eq!(made.1.len(), 1, "Falco's client Secret: {:?}", made.1);
        }
        install("upgrade");
        let kept = (secrets(ns.clone()).await, secrets(falco_ns.clone()).await);
        assert_eq!(made, kept, "{name}: an upgrade keeps the certificates");
        helm_run(&kubeconfig, &["uninstall", &release, "-n", &ns, "--wait"]);
        let left = left_of(cluster, &release, &[&ns, &falco_ns, "shop", "web"]).await;
        assert!(left.is_empty(), "{name}: helm uninstall left {left:?}");
    }
}
