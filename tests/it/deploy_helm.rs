//! The Helm side of deploy/, with a real `helm` (built by
//! scripts/install-deps): the falco-nats chart (charts/falco-nats) linted
//! strictly and rendered with each of its test values files (ci/), every
//! rendering validated against the Kubernetes schemas and every falco-nats
//! container's arguments and environment accepted by the real CLI; the
//! values for the official Falco chart (deploy/falco-chart) checked against
//! what our chart renders; and
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
//! (`NATS_HELM_CHART=DIR scripts/test` runs it; docs/development.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

use crate::support::manifests::*;
use crate::support::nats_server_bin;

/// The chart's test values files, and the empty one (its defaults).
fn values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    files
}

/// Every container running falco-nats in `docs`: its arguments (with its
/// literal environment as the flags it stands for) parse with the CLI.
fn check_falco_nats_containers(docs: &[Value], what: &str) -> usize {
    let mut n = 0;
    for doc in docs {
        let spec = &doc["spec"]["template"]["spec"];
        for c in spec["containers"].as_array().into_iter().flatten() {
            if !is_falco_nats_image(c["image"].as_str().unwrap_or("")) {
                continue;
            }
            assert_cli_accepts(c, what);
            n += 1;
        }
    }
    n
}

fn args_of(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence_strs()
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_chart_lints_strictly_with_every_values_file() {
    for values in values_files() {
        let out = Command::new(helm())
            .args(["lint", "--strict"])
            .arg(chart_dir())
            .arg("-f")
            .arg(&values)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm lint --strict -f {}: {}{}",
            values.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The schema refuses what the chart would not understand.
#[test]
fn the_values_schema_refuses_typos_and_bad_values() {
    for bad in [
        "bridge.replicaCont=2",
        "bridge.jetstream.maxAge=forever",
        "respond.jetstream.durable=a.b",
        "logFormat=yaml",
        "nats.url=http://nats:4222",
        "respond.minHealthyReplicas=lots",
        "respond.minHealthyReplicas=150%",
        "respond.maxActionsPerMinute=20000",
        "respond.kv.replicas=7",
        // A seed where a public key belongs.
        "signing.publicKeys={SUAFWJBFFPDK4Y2BRMRV7S6ZSSTJ65G76YIYZHMN5GUQPNWCOP5S42FWWQ}",
    ] {
        let out = Command::new(helm())
            .args(["template", "x"])
            .arg(chart_dir())
            .args(["--kube-version", "1.33.0", "--set", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} was taken");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("schema"),
            "{bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every values file renders manifests that validate (Kubernetes 1.33,
/// strict) and falco-nats containers the CLI accepts; each file's point
/// shows in what is rendered.
#[test]
fn the_chart_renders_valid_manifests_the_cli_accepts() {
    let base_rbac = documents(&deploy_dir().join("base/respond-rbac.yaml"));
    let base_role = base_rbac
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap();
    let base_admission = documents(&deploy_dir().join("base/respond-admission.yaml"));
    let base_policy = base_admission
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rendered = Vec::new();
    for values in values_files() {
        let name = values.file_name().unwrap().to_string_lossy().into_owned();
        let docs = render_chart(&values);
        // The Prometheus Operator's kinds are not in the Kubernetes schemas.
        let core: Vec<&Value> = docs
            .iter()
            .filter(|d| {
                d["apiVersion"] != "monitoring.coreos.com/v1"
                    && d["apiVersion"] != "cert-manager.io/v1"
            })
            .collect();
        let core_file = dir.path().join(&name);
        let text: String = core
            .iter()
            .map(|d| format!("---\n{}", serde_norway::to_string(d).unwrap()))
            .collect();
        std::fs::write(&core_file, text).unwrap();
        rendered.push(core_file);

        let bridge = find(&docs, "Deployment", "falco-nats-bridge");
        let respond = find(&docs, "Deployment", "falco-nats-respond");
        let ui = find(&docs, "Deployment", "falco-nats-ui");
        let expected = [bridge, respond, ui].iter().filter(|d| d.is_some()).count();
        assert_eq!(
            check_falco_nats_containers(&docs, &name),
            expected,
            "{name}"
        );
        // The image scripts/image builds, by tag, or by the digest it
        // printed when a values file gives one.
        let values_doc: Value =
            serde_norway::from_str(&std::fs::read_to_string(&values).unwrap()).unwrap();
        let image = match values_doc["image"]["digest"].as_str() {
            Some(digest) => format!(
                "{}@{digest}",
                values_doc["image"]["repository"].as_str().unwrap()
            ),
            None => format!("falco-nats:{}", env!("CARGO_PKG_VERSION")),
        };
        for deployment in [bridge, respond, ui].into_iter().flatten() {
            assert_eq!(
                deployment["spec"]["template"]["spec"]["containers"][0]["image"],
                image.as_str(),
                "{name}"
            );
        }
        let cluster_role = find(&docs, "ClusterRole", "falco-nats-respond");
        let policy = find(
            &docs,
            "ValidatingAdmissionPolicy",
            "falco-nats-respond-writes",
        );
        match name.as_str() {
            "default-values.yaml" => {
                let bridge = bridge.unwrap();
                assert_eq!(bridge["spec"]["replicas"], 2);
                let args = args_of(bridge);
                assert!(args.contains(&"--input=http".to_owned()), "{args:?}");
                assert!(args.contains(&"--jetstream".to_owned()), "{args:?}");
                // HTTPS with client certificates by default, from Secrets
                // the chart made (tests/it/bridge_http.rs uses them).
                assert!(args.contains(&"--tls-client-ca=/etc/falco-nats/tls/ca.crt".to_owned()));
                let secret = find(&docs, "Secret", "falco-nats-bridge-tls").unwrap();
                let client = find(&docs, "Secret", "falco-nats-client").unwrap();
                assert_eq!(client["metadata"]["namespace"], "falco");
                assert_eq!(secret["data"]["ca.crt"], client["data"]["ca.crt"]);
                let service = find(&docs, "Service", "falco-nats-bridge").unwrap();
                assert_eq!(service["spec"]["ports"][0]["port"], 2810);
                assert!(find(&docs, "PodDisruptionBudget", "falco-nats-bridge").is_some());
                let spread = &bridge["spec"]["template"]["spec"]["topologySpreadConstraints"];
                assert_eq!(spread.as_array().unwrap().len(), 2);
                assert_eq!(
                    spread[0]["labelSelector"]["matchLabels"],
                    bridge["spec"]["selector"]["matchLabels"]
                );
                // The same least privilege and admission rules as deploy/base.
                assert_eq!(cluster_role.unwrap()["rules"], base_role["rules"]);
                let policy = policy.unwrap();
                assert_eq!(
                    policy["spec"]["validations"],
                    base_policy["spec"]["validations"]
                );
                assert_eq!(
                    policy["spec"]["matchConstraints"],
                    base_policy["spec"]["matchConstraints"]
                );
                assert_eq!(
                    policy["spec"]["matchConditions"][0]["expression"],
                    "request.userInfo.username == 'system:serviceaccount:falco-nats:falco-nats-respond'"
                );
                let np = find(&docs, "NetworkPolicy", "falco-nats-bridge").unwrap();
                let from = &np["spec"]["ingress"][0]["from"][0];
                assert_eq!(
                    from["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                    "falco"
                );
                let sc = &bridge["spec"]["template"]["spec"]["containers"][0]["securityContext"];
                assert_eq!(sc["readOnlyRootFilesystem"], true);
                assert_eq!(sc["allowPrivilegeEscalation"], false);
            }
            "mtls-cluster-values.yaml" => {
                let bridge = bridge.unwrap();
                let args = args_of(bridge);
                for flag in [
                    "--tls-cert=/etc/falco-nats/tls/tls.crt",
                    "--tls-client-ca=/etc/falco-nats/tls/ca.crt",
                    "--replicas=3",
                ] {
                    assert!(args.contains(&flag.to_owned()), "{flag}: {args:?}");
                }
                let probe = &bridge["spec"]["template"]["spec"]["containers"][0]["readinessProbe"];
                assert_eq!(probe["httpGet"]["scheme"], "HTTPS");
                let monitors = docs
                    .iter()
                    .filter(|d| d["kind"] == "ServiceMonitor")
                    .count();
                assert_eq!(monitors, 2);
                assert!(find(&docs, "Service", "falco-nats-respond-metrics").is_some());
                // The ui, reading as the shipped reader, behind its token.
                let ui_args = args_of(ui.unwrap());
                assert!(ui_args.contains(&"--http-token-file=/etc/falco-nats/ui/token".to_owned()));
                assert!(ui_args.contains(&"--stream=off".to_owned()), "{ui_args:?}");
                assert!(find(&docs, "Service", "falco-nats-ui").is_some());
            }
            "core-nats-namespaced-values.yaml" => {
                assert!(cluster_role.is_none());
                assert!(policy.is_none());
                let roles: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Role").collect();
                assert_eq!(roles.len(), 2);
                for role in roles {
                    assert_eq!(role["rules"], base_role["rules"]);
                }
                let args = args_of(respond.unwrap());
                for flag in ["--dry-run", "--only-namespace=shop", "--only-namespace=web"] {
                    assert!(args.contains(&flag.to_owned()), "{flag}: {args:?}");
                }
                assert!(!args.contains(&"--jetstream".to_owned()));
                let bridge_args = args_of(bridge.unwrap());
                assert!(!bridge_args.contains(&"--jetstream".to_owned()));
                assert!(bridge_args.contains(&"--format=falcosidekick".to_owned()));
            }
            "cert-manager-values.yaml" => {
                let certificates: Vec<&Value> =
                    docs.iter().filter(|d| d["kind"] == "Certificate").collect();
                assert_eq!(certificates.len(), 2);
                assert_eq!(
                    certificates[0]["spec"]["secretName"],
                    "falco-nats-bridge-tls"
                );
                assert_eq!(certificates[1]["metadata"]["namespace"], "falco");
                assert_eq!(certificates[1]["spec"]["secretName"], "falco-nats-client");
                assert!(
                    find(&docs, "Secret", "falco-nats-bridge-tls").is_none()
                        && find(&docs, "Secret", "falco-nats-client").is_none(),
                    "no certificate made by the chart"
                );
                let args = args_of(bridge.unwrap());
                assert!(args.contains(&"--tls-client-ca=/etc/falco-nats/tls/ca.crt".to_owned()));
            }
            "bridge-only-values.yaml" => {
                // Plain HTTP only by an explicit value.
                let args = args_of(bridge.unwrap());
                assert!(!args.iter().any(|a| a.starts_with("--tls")), "{args:?}");
                assert!(find(&docs, "Secret", "falco-nats-bridge-tls").is_none());
                assert!(respond.is_none());
                assert!(docs.iter().all(|d| d["kind"] != "PodDisruptionBudget"
                    && d["kind"] != "NetworkPolicy"
                    && d["kind"] != "ClusterRole"));
            }
            other => panic!("a values file this test does not know: {other}"),
        }
    }
    validate(&rendered);
}

/// deploy/falco-chart/values.yaml points Falco's http_output at the Service
/// our chart renders (release falco-nats in falco-nats), with mTLS from the
/// directory where the Falco chart mounts `certs.existingClientSecret`; the
/// FIFO sidecar values run a bridge the CLI accepts on the FIFO Falco
/// writes, in a pod that validates.
/// Signed alerts through the chart: the bridge's --sign-key is the seed
/// its Secret mounts, and the responder's --verify-key files, taken from
/// the ConfigMap as rendered, are public keys the responder accepts.
#[test]
fn signing_keys_reach_the_bridge_and_the_responder() {
    let docs = render_chart(&chart_dir().join("ci/mtls-cluster-values.yaml"));
    let bridge = find(&docs, "Deployment", "falco-nats-bridge").unwrap();
    let container = &bridge["spec"]["template"]["spec"]["containers"][0];
    assert!(args_of(bridge).contains(&"--sign-key=/etc/falco-nats/signing/seed".to_owned()));
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "signing")
        .unwrap();
    assert_eq!(mount["mountPath"], "/etc/falco-nats/signing");
    let respond = find(&docs, "Deployment", "falco-nats-respond").unwrap();
    let policy = find(&docs, "ConfigMap", "falco-nats-respond-policy").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for arg in args_of(respond) {
        let Some(path) = arg.strip_prefix("--verify-key=/etc/falco-nats/policy/") else {
            continue;
        };
        let file = dir.path().join(path);
        std::fs::write(&file, policy["data"][path].as_str().unwrap()).unwrap();
        files.push(file);
    }
    assert_eq!(files.len(), 2, "two keys during a rotation");
    falco_nats::signing::Verifier::from_files(&files).unwrap();
    // Without signing values, neither flag.
    let plain = render_chart(&chart_dir().join("ci/default-values.yaml"));
    for name in ["falco-nats-bridge", "falco-nats-respond"] {
        let args = args_of(find(&plain, "Deployment", name).unwrap());
        assert!(
            !args
                .iter()
                .any(|a| a.starts_with("--sign-key") || a.starts_with("--verify-key")),
            "{args:?}"
        );
    }
}

#[test]
fn the_falco_chart_values_agree_with_the_bridge() {
    let docs = render_chart(&chart_dir().join("ci/mtls-cluster-values.yaml"));
    let service = find(&docs, "Service", "falco-nats-bridge").unwrap();
    let port = service["spec"]["ports"][0]["port"].as_u64().unwrap();
    let values = &documents(&deploy_dir().join("falco-chart/values.yaml"))[0];
    let http = &values["falco"]["http_output"];
    assert_eq!(http["enabled"], true);
    assert_eq!(
        http["url"],
        format!("https://falco-nats-bridge.falco-nats.svc:{port}/")
    );
    assert_eq!(http["mtls"], true);
    assert_eq!(http["compress_uploads"], false);
    for key in ["client_cert", "client_key", "ca_cert"] {
        assert!(
            http[key]
                .as_str()
                .unwrap()
                .starts_with("/etc/falco/certs/client/"),
            "{key}"
        );
    }
    assert!(values["certs"]["existingClientSecret"].is_string());
    assert_eq!(values["falco"]["json_output"], true);

    let sidecar = &documents(&deploy_dir().join("falco-chart/values-fifo-sidecar.yaml"))[0];
    let fifo = sidecar["falco"]["file_output"]["filename"]
        .as_str()
        .unwrap();
    assert_eq!(sidecar["falco"]["file_output"]["keep_alive"], true);
    let init = sidecar["extra"]["initContainers"].as_array().unwrap();
    let bridge = init.iter().find(|c| c["name"] == "falco-nats").unwrap();
    assert_eq!(bridge["restartPolicy"], "Always", "a native sidecar");
    let pod_spec = serde_json::json!({
        "spec": { "template": { "spec": { "containers": [bridge] } } }
    });
    assert_eq!(check_falco_nats_containers(&[pod_spec], "sidecar"), 1);
    let args = bridge["args"].as_sequence_strs();
    assert!(
        args.contains(&format!("--fifo={fifo}").as_str()),
        "{args:?}"
    );
    // The pod the Falco chart makes of it, reduced to what these values add.
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "falco", "namespace": "falco" },
        "spec": {
            "initContainers": init,
            "containers": [{
                "name": "falco",
                "image": "falcosecurity/falco:0.44.1",
                "volumeMounts": sidecar["mounts"]["volumeMounts"],
            }],
            "volumes": sidecar["mounts"]["volumes"],
        }
    });
    let mounts = sidecar["mounts"]["volumeMounts"].as_array().unwrap();
    assert!(mounts
        .iter()
        .any(|m| fifo.starts_with(m["mountPath"].as_str().unwrap())));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, serde_norway::to_string(&pod).unwrap()).unwrap();
    validate(&[file]);
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
    validate(std::slice::from_ref(&file));

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
