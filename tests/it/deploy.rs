//! The manifests under deploy/: valid against the Kubernetes schemas
//! (kubernetes-validate, offline), every falco-nats container's arguments and
//! environment accepted by the CLI, and each Falco configuration fragment
//! agreeing with the bridge beside it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use falco_nats::cli::Cli;
use serde_json::Value;

use crate::support::manifests::*;

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    out.sort();
}

fn is_resource(doc: &Value) -> bool {
    doc.get("apiVersion").is_some()
        && doc.get("kind").is_some()
        && doc["kind"] != "Kustomization"
        && doc["kind"] != "Component"
}

/// Files holding Kubernetes resources (not kustomizations, patches,
/// policies or Falco fragments).
fn resource_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    let patches = patch_files();
    files
        .into_iter()
        .filter(|f| !patches.contains(&f.canonicalize().unwrap()))
        .filter(|f| documents(f).iter().any(is_resource))
        .collect()
}

/// Strategic-merge patches named by a kustomization's `patches: - path:`.
fn patch_files() -> BTreeSet<PathBuf> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    let mut out = BTreeSet::new();
    for k in files.iter().filter(|f| f.ends_with("kustomization.yaml")) {
        let doc = &documents(k)[0];
        for patch in doc
            .get("patches")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(path) = patch.get("path").and_then(Value::as_str) {
                let file = k.parent().unwrap().join(path);
                assert!(file.exists(), "{} patches with missing {path}", k.display());
                out.insert(file.canonicalize().unwrap());
            }
        }
    }
    out
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let files = resource_files();
    assert!(files.len() >= 8, "{files:?}");
    validate(&files);
}

#[test]
fn kustomizations_reference_what_exists() {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    let kustomizations: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.ends_with("kustomization.yaml"))
        .collect();
    assert_eq!(
        kustomizations.len(),
        8,
        "base, three overlays, the namespaced-RBAC, leaf, nats-cluster and ui components"
    );
    let mut referenced = BTreeSet::new();
    for k in &kustomizations {
        let dir = k.parent().unwrap();
        let doc = &documents(k)[0];
        let mut names: Vec<&str> = doc["resources"].as_sequence_strs();
        for generator in doc
            .get("configMapGenerator")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            names.extend(
                generator["files"]
                    .as_sequence_strs()
                    .into_iter()
                    .map(|f| f.rsplit('=').next().unwrap_or(f)),
            );
        }
        for name in names {
            let path = dir.join(name);
            assert!(path.exists(), "{} references missing {name}", k.display());
            referenced.insert(path.canonicalize().unwrap());
        }
    }
    for f in resource_files() {
        assert!(
            referenced.contains(&f.canonicalize().unwrap()),
            "{} is in no kustomization",
            f.display()
        );
    }
}

/// Every overlay, alone and with each component and their combinations,
/// rendered by the real kustomize and validated; in each rendering every
/// falco-nats container's arguments are accepted by the CLI, and the
/// components did what they say.
#[test]
fn every_overlay_with_every_component_renders_and_validates() {
    let out = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for overlay in OVERLAYS {
        for set in COMPONENT_SETS {
            let file = render_overlay(overlay, set, out.path());
            let docs = documents(&file);
            let find = |kind: &str, name: &str| {
                docs.iter()
                    .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
                    .cloned()
            };
            let falco = find("DaemonSet", "falco").expect("the Falco DaemonSet");
            let containers = falco["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap();
            let bridge = containers
                .iter()
                .find(|c| c["name"] == "falco-nats")
                .unwrap();
            let respond = find("Deployment", "falco-nats-respond").unwrap();
            let respond = &respond["spec"]["template"]["spec"]["containers"][0];
            for c in [bridge, respond] {
                assert_cli_accepts(c, &format!("{overlay} {set:?}"));
            }
            let ui = find("Deployment", "falco-nats-ui");
            assert_eq!(ui.is_some(), set.contains(&"ui"));
            if let Some(ui) = &ui {
                let c = &ui["spec"]["template"]["spec"]["containers"][0];
                assert_cli_accepts(c, &format!("{overlay} {set:?} ui"));
                let labels = &ui["spec"]["template"]["metadata"]["labels"];
                assert_eq!(
                    labels["falco-nats.io/nats-client"], "reader",
                    "NATS's NetworkPolicy lets it in"
                );
            }
            let respond_args = respond["args"].as_sequence_strs();
            let leaf = set.contains(&"leaf");
            let cluster = set.contains(&"nats-cluster");
            assert_eq!(containers.iter().any(|c| c["name"] == "nats-leaf"), leaf);
            let url = bridge["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "NATS_URL")
                .unwrap()["value"]
                .clone();
            assert_eq!(
                url == "nats://127.0.0.1:4222",
                leaf,
                "{overlay} {set:?}: {url}"
            );
            assert_eq!(respond_args.contains(&"--stream=FALCO_ALL"), leaf);
            let replicas = bridge["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "FALCO_NATS_REPLICAS");
            assert_eq!(
                replicas.map(|e| e["value"].clone()),
                cluster.then(|| "3".into())
            );
            let kv_replicas = respond["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "FALCO_NATS_KV_REPLICAS");
            assert_eq!(
                kv_replicas.map(|e| e["value"].clone()),
                cluster.then(|| "3".into()),
                "the kill switch's bucket is replicated with the stream"
            );
            assert_eq!(find("StatefulSet", "nats").is_none(), cluster);
            assert_eq!(
                find("ClusterRole", "falco-nats-respond").is_none(),
                set.contains(&"namespaced-rbac")
            );
            files.push(file);
        }
    }
    validate(&files);
}

/// Every falco-nats container: its manifest, args and env names. Each
/// names the image scripts/image builds: `falco-nats:<version>`.
fn falco_nats_containers() -> Vec<(PathBuf, Vec<String>, Vec<String>)> {
    let mut out = Vec::new();
    for file in resource_files() {
        for doc in documents(&file) {
            let spec = &doc["spec"]["template"]["spec"];
            for c in spec["containers"].as_array().into_iter().flatten() {
                let image = c["image"].as_str().unwrap_or("");
                if !is_falco_nats_image(image) {
                    continue;
                }
                assert_eq!(
                    image,
                    format!("falco-nats:{}", env!("CARGO_PKG_VERSION")),
                    "{}: the image scripts/image builds",
                    file.display()
                );
                let args = c["args"]
                    .as_sequence_strs()
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                let env = c["env"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["name"].as_str().map(str::to_owned))
                    .collect();
                out.push((file.clone(), args, env));
            }
        }
    }
    out
}

/// Environment variables a subcommand reads (its flags' and the global ones).
fn env_names(subcommand: &str) -> BTreeSet<String> {
    cli_flags(subcommand).into_values().flatten().collect()
}

#[test]
fn container_args_and_env_are_accepted_by_the_cli() {
    let containers = falco_nats_containers();
    assert_eq!(
        containers.len(),
        6,
        "three bridges, the responder, the ui and sources: {containers:?}"
    );
    for (file, args, env) in containers {
        let argv = std::iter::once("falco-nats".to_owned()).chain(args.iter().cloned());
        if let Err(e) = Cli::try_parse_from(argv) {
            panic!("{}: falco-nats {args:?} is refused:\n{e}", file.display());
        }
        let known = env_names(&args[0]);
        for name in env {
            assert!(
                known.contains(&name) || name == "POD_NAME",
                "{}: env {name} is read by no flag of `falco-nats {}`",
                file.display(),
                args[0]
            );
        }
    }
    // The program_output fragment runs falco-nats too.
    let fragment = &documents(&deploy_dir().join("falco/program-output.yaml"))[0];
    let program = fragment["program_output"]["program"].as_str().unwrap();
    let words: Vec<&str> = program.split_whitespace().collect();
    assert_eq!(words[0], "falco-nats");
    Cli::try_parse_from(words).unwrap();
}

/// Every argument a component's JSON patch adds to a falco-nats container
/// lands on a falco-nats container (the patch's index points at one in each
/// file holding its target) and is accepted by the real CLI there.
#[test]
fn arguments_components_add_are_accepted_where_they_land() {
    let mut checked = 0;
    for component in ["namespaced-rbac", "leaf"] {
        let k = deploy_dir()
            .join("components")
            .join(component)
            .join("kustomization.yaml");
        let doc = &documents(&k)[0];
        for patch in doc["patches"].as_array().unwrap() {
            let Some(target) = patch.get("target") else {
                continue;
            };
            let Some(text) = patch.get("patch").and_then(Value::as_str) else {
                continue;
            };
            let ops: Vec<Value> = serde_norway::from_str(text).unwrap();
            for op in ops {
                let path = op["path"].as_str().unwrap();
                // `add .../args/-` appends; `replace .../args/N` swaps one.
                let Some((index, arg)) = path
                    .strip_prefix("/spec/template/spec/containers/")
                    .and_then(|rest| rest.split_once("/args/"))
                else {
                    continue;
                };
                if op["op"] == "test" {
                    continue;
                }
                let index: usize = index.parse().unwrap();
                let replaced: Option<usize> = match (op["op"].as_str(), arg) {
                    (Some("add"), "-") => None,
                    (Some("replace"), n) => Some(n.parse().unwrap()),
                    other => panic!("{component}: an args patch {other:?} this test does not know"),
                };
                let added = op["value"].as_str().unwrap().to_owned();
                let mut landed = 0;
                for file in resource_files() {
                    for res in documents(&file) {
                        if res["kind"] != target["kind"]
                            || res["metadata"]["name"] != target["name"]
                        {
                            continue;
                        }
                        let c = &res["spec"]["template"]["spec"]["containers"][index];
                        assert!(
                            c["image"].as_str().unwrap_or("").starts_with("falco-nats:"),
                            "{component}: {path} in {} is not a falco-nats container",
                            file.display()
                        );
                        let mut args: Vec<String> = c["args"]
                            .as_sequence_strs()
                            .into_iter()
                            .map(str::to_owned)
                            .collect();
                        match replaced {
                            Some(n) => args[n] = added.clone(),
                            None => args.push(added.clone()),
                        }
                        let argv = std::iter::once("falco-nats".to_owned()).chain(args.clone());
                        if let Err(e) = Cli::try_parse_from(argv) {
                            panic!(
                                "{component} on {}: {args:?} is refused:\n{e}",
                                file.display()
                            );
                        }
                        landed += 1;
                    }
                }
                assert!(landed > 0, "{component}: {added} lands nowhere");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2, "--only-namespace, --stream=FALCO_ALL");
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("{name}=")))
}

#[test]
fn falco_fragments_agree_with_their_bridge() {
    let containers = falco_nats_containers();
    for overlay in ["grpc", "fifo", "http"] {
        let dir = deploy_dir().join("overlays").join(overlay);
        let falco = &documents(&dir.join("falco-nats.yaml"))[0];
        assert_eq!(
            falco["json_output"], true,
            "{overlay}: the bridge reads Falco's JSON"
        );
        let (_, args, _) = containers
            .iter()
            .find(|(f, _, _)| f.starts_with(&dir))
            .unwrap();
        assert_eq!(flag(args, "--input"), Some(overlay));
        match overlay {
            "grpc" => {
                assert_eq!(falco["grpc"]["enabled"], true);
                assert_eq!(falco["grpc_output"]["enabled"], true);
                assert_eq!(
                    falco["grpc"]["bind_address"].as_str(),
                    flag(args, "--grpc-socket")
                );
            }
            "fifo" => {
                assert_eq!(falco["file_output"]["enabled"], true);
                assert_eq!(
                    falco["file_output"]["filename"].as_str(),
                    flag(args, "--fifo")
                );
            }
            _ => {
                assert_eq!(falco["http_output"]["enabled"], true);
                let url = falco["http_output"]["url"].as_str().unwrap();
                let port = flag(args, "--listen").unwrap().rsplit(':').next().unwrap();
                assert_eq!(url, format!("http://127.0.0.1:{port}/"));
                assert_eq!(falco["http_output"]["compress_uploads"], false);
            }
        }
    }
}

#[test]
fn the_shipped_policy_is_valid() {
    falco_nats::respond::policy::Policy::load(&deploy_dir().join("base/policy.yaml")).unwrap();
}

/// deploy/nats-users.sh makes every Secret the manifests name, in the
/// namespace that names it, and its output validates.
#[test]
fn the_nats_user_secrets_are_made_by_the_script() {
    let out = Command::new(deploy_dir().join("nats-users.sh"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.yaml");
    std::fs::write(&file, &out.stdout).unwrap();
    validate(std::slice::from_ref(&file));
    let made: BTreeSet<(String, String)> = documents(&file)
        .iter()
        .map(|d| {
            (
                d["metadata"]["namespace"].as_str().unwrap().to_owned(),
                d["metadata"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut wanted = BTreeSet::new();
    for f in resource_files() {
        for doc in documents(&f) {
            let ns = doc["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let text = serde_json::to_string(&doc).unwrap();
            for piece in text.split("\"secretName\":\"").skip(1) {
                wanted.insert((ns.clone(), piece.split('"').next().unwrap().to_owned()));
            }
            for piece in text.split("\"secretKeyRef\":{").skip(1) {
                let name = piece.split("\"name\":\"").nth(1).unwrap();
                wanted.insert((ns.clone(), name.split('"').next().unwrap().to_owned()));
            }
        }
    }
    assert!(wanted.len() >= 4, "{wanted:?}");
    for w in &wanted {
        assert!(
            made.contains(w),
            "{w:?} is not made by nats-users.sh: {made:?}"
        );
    }
}

/// The namespaced-RBAC component: its Role grants what the ClusterRole
/// grants, and the flag it adds is one the responder accepts.
#[test]
fn the_namespaced_rbac_component_matches_the_cluster_role() {
    let component = deploy_dir().join("components/namespaced-rbac");
    let role = documents(&component.join("role.yaml"))
        .into_iter()
        .find(|d| d["kind"] == "Role")
        .unwrap();
    let cluster_role = documents(&deploy_dir().join("base/respond-rbac.yaml"))
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap();
    assert_eq!(role["rules"], cluster_role["rules"]);
    let kustomization = &documents(&component.join("kustomization.yaml"))[0];
    let patches = serde_json::to_string(&kustomization["patches"]).unwrap();
    let flag = patches
        .split("value: ")
        .nth(1)
        .unwrap()
        .split(['\\', '"'])
        .next()
        .unwrap();
    assert!(flag.starts_with("--only-namespace="), "{flag}");
    let ns = flag.trim_start_matches("--only-namespace=");
    assert_eq!(role["metadata"]["namespace"], ns);
    Cli::try_parse_from(["falco-nats", "respond", flag]).unwrap();
}

/// deploy/Dockerfile builds what scripts/image builds: this version, the
/// same user, entrypoint and CA bundle (tests/it/image.rs runs the image).
#[test]
fn the_dockerfile_builds_what_scripts_image_builds() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let script = std::fs::read_to_string(deploy_dir().join("../scripts/image")).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    for needed in [
        format!("org.opencontainers.image.version=\"{version}\""),
        format!("-t falco-nats:{version}"),
        "USER 65532:65532".to_owned(),
        "ENTRYPOINT [\"/falco-nats\"]".to_owned(),
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".to_owned(),
        "--profile dist --locked --target x86_64-unknown-linux-musl".to_owned(),
    ] {
        assert!(
            dockerfile.contains(&needed),
            "the Dockerfile lacks {needed}"
        );
    }
    for needed in [
        "--user 65532:65532",
        "--entrypoint '[\"/falco-nats\"]'",
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
        "--profile dist --locked --target \"$TARGET\"",
    ] {
        assert!(script.contains(needed), "scripts/image lacks {needed}");
    }
}
