//! deploy/nats-helm/values.yaml through the official NATS Helm chart, with
//! a real `helm template`: the rendering validates against the Kubernetes
//! schemas, runs three servers with JetStream, carries the users of
//! deploy/base/nats.yaml with their passwords from the Secrets that
//! deploy/nats-users.sh makes, and its nats.conf passes `nats-server -t`.
//!
//! The chart is not in this repository (it is the NATS project's) and
//! neither a chart repository nor the Go module proxy serves it to the test
//! machines: `NATS_HELM_CHART` names a copy of it (nats-io/k8s,
//! helm/charts/nats), and the test is ignored unless asked for
//! (`NATS_HELM_CHART=DIR scripts/test` runs it; README, Development).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

use crate::support::nats_server_bin;

fn helm() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/helm");
    assert!(
        built.is_file(),
        "helm not found: run scripts/install-deps --with-validator (scripts/test does)"
    );
    built
}

#[test]
#[ignore = "needs the official NATS chart: NATS_HELM_CHART=DIR"]
fn the_official_nats_chart_renders_our_cluster_of_three() {
    let chart = PathBuf::from(
        std::env::var_os("NATS_HELM_CHART").expect("NATS_HELM_CHART names the NATS chart"),
    );
    let values = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nats-helm/values.yaml");
    let out = Command::new(helm())
        .args(["template", "nats"])
        .arg(&chart)
        .args(["--namespace", "falco-nats", "-f"])
        .arg(&values)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nats.yaml");
    std::fs::write(&file, &out.stdout).unwrap();
    crate::deploy::validate(std::slice::from_ref(&file));

    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let sts = find("StatefulSet");
    assert_eq!(sts["spec"]["replicas"], 3);
    // The Service the bridge's and the responder's NATS_URL name.
    assert!(docs
        .iter()
        .any(|d| d["kind"] == "Service" && d["metadata"]["name"] == "nats"));
    let nats = sts["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "nats")
        .unwrap();
    let secrets: Vec<&str> = nats["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["valueFrom"]["secretKeyRef"]["name"].as_str())
        .collect();
    for user in ["bridge", "respond", "reader", "admin", "leaf"] {
        assert!(
            secrets.contains(&format!("nats-user-{user}").as_str()),
            "{user}"
        );
    }

    // The rendered nats.conf parses, with the environment the pod gives it.
    let conf = find("ConfigMap")["data"]["nats.conf"].as_str().unwrap();
    for needle in [
        "cluster",
        "jetstream",
        "leafnodes",
        "$NATS_BRIDGE_PASSWORD",
        "$NATS_LEAF_PASSWORD",
        "_INBOX_respond.>",
    ] {
        assert!(conf.contains(needle), "nats.conf lacks {needle}:\n{conf}");
    }
    let conf_file = dir.path().join("nats.conf");
    std::fs::write(&conf_file, conf).unwrap();
    let check = Command::new(nats_server_bin())
        .arg("-t")
        .arg("-c")
        .arg(&conf_file)
        .envs([
            ("SERVER_NAME", "nats-0"),
            ("POD_NAME", "nats-0"),
            ("NATS_BRIDGE_PASSWORD", "pb"),
            ("NATS_RESPOND_PASSWORD", "pr"),
            ("NATS_READER_PASSWORD", "pd"),
            ("NATS_ADMIN_PASSWORD", "pa"),
            ("NATS_LEAF_PASSWORD", "pl"),
        ])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "nats-server -t: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}
