//! The repository's manifests for the tests: deploy/ and the chart read,
//! rendered (the real kustomize and helm), validated against the
//! Kubernetes schemas, and each falco-nats container's arguments parsed by
//! the real CLI; the README and docs/ listed. (deploy.rs, deploy_helm.rs,
//! deploy_real.rs, admission.rs, bridge_http.rs, dashboard.rs, docs.rs.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{CommandFactory, Parser};
use falco_nats::cli::Cli;
use serde::Deserialize;
use serde_json::Value;

const KUBERNETES_VERSION: &str = "1.33.0";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// deploy/ of this repository.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The YAML documents of a file, as JSON values (empty ones left out).
pub fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn validator() -> PathBuf {
    if let Ok(p) = std::env::var("KUBERNETES_VALIDATE") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return p;
        }
    }
    let local =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/venv/bin/kubernetes-validate");
    if local.is_file() {
        return local;
    }
    panic!("kubernetes-validate not found: run scripts/test (it installs it), or set KUBERNETES_VALIDATE");
}

pub fn validate(files: &[PathBuf]) {
    let out = Command::new(validator())
        .args(["-k", KUBERNETES_VERSION, "--strict", "--quiet"])
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// scripts/install-deps builds kustomize into target/tools/bin.
fn kustomize() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/kustomize");
    assert!(
        built.is_file(),
        "kustomize not found: run scripts/install-deps --with-validator (scripts/test does)"
    );
    built
}

/// Renders a kustomization made on the fly: `overlay` with `components`.
/// The overlays, one per input.
pub const OVERLAYS: [&str; 3] = ["grpc", "fifo", "http"];

/// Each component alone, and all together, on top of an overlay.
pub const COMPONENT_SETS: [&[&str]; 6] = [
    &[],
    &["namespaced-rbac"],
    &["leaf"],
    &["nats-cluster"],
    &["ui"],
    &["leaf", "nats-cluster", "namespaced-rbac", "ui"],
];

pub fn render_overlay(overlay: &str, components: &[&str], out: &Path) -> PathBuf {
    // Outside deploy/, which other tests read meanwhile; kustomize takes
    // relative paths only: target/kustomize/<dir>/ is three levels down.
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kustomize");
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let mut k = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../../deploy/overlays/{overlay}\n"
    );
    if !components.is_empty() {
        k += "components:\n";
        for c in components {
            k += &format!("  - ../../../deploy/components/{c}\n");
        }
    }
    std::fs::write(dir.path().join("kustomization.yaml"), k).unwrap();
    let rendered = Command::new(kustomize())
        .arg("build")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "kustomize build {overlay} {components:?}: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let file = out.join(format!("{overlay}-{}.yaml", components.join("-")));
    std::fs::write(&file, &rendered.stdout).unwrap();
    file
}

/// A YAML sequence of strings, as `&str`s (nothing for anything else).
pub trait Strs {
    fn as_sequence_strs(&self) -> Vec<&str>;
}

impl Strs for Value {
    fn as_sequence_strs(&self) -> Vec<&str> {
        self.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect()
    }
}

/// Whether `image` (`[registry/path/]falco-nats[:tag][@digest]`) is ours.
pub fn is_falco_nats_image(image: &str) -> bool {
    let name = image.split('@').next().unwrap_or_default();
    let last = name.rsplit('/').next().unwrap_or_default();
    last.split(':').next() == Some("falco-nats")
}

/// A falco-nats container's arguments, with its literal environment as the
/// flags it stands for, are accepted by the real CLI.
pub fn assert_cli_accepts(container: &Value, what: &str) {
    let mut args: Vec<String> = container["args"]
        .as_sequence_strs()
        .into_iter()
        .map(str::to_owned)
        .collect();
    args.extend(env_as_args(&args[0], &container["env"]));
    let argv = std::iter::once("falco-nats".to_owned()).chain(args.clone());
    if let Err(e) = Cli::try_parse_from(argv) {
        panic!("{what}: falco-nats {args:?} is refused:\n{e}");
    }
}

/// Each long flag a subcommand takes (its own and the global ones) and the
/// environment variable it reads, from the CLI's own definition.
pub fn cli_flags(subcommand: &str) -> BTreeMap<String, Option<String>> {
    let cli = Cli::command();
    let sub = cli
        .find_subcommand(subcommand)
        .unwrap_or_else(|| panic!("no subcommand {subcommand}"));
    cli.get_arguments()
        .chain(sub.get_arguments())
        .filter_map(|a| {
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            Some((format!("--{}", a.get_long()?), env))
        })
        .filter(|(flag, _)| flag != "--help" && flag != "--version")
        .collect()
}

/// A container's literal environment values as the arguments they stand
/// for (`FALCO_NATS_REPLICAS: "3"` is `--replicas=3`), so that the CLI
/// parses them too; values from Secrets or fields are left out.
pub fn env_as_args(subcommand: &str, env: &Value) -> Vec<String> {
    let cli = Cli::command();
    let sub = cli
        .find_subcommand(subcommand)
        .unwrap_or_else(|| panic!("no subcommand {subcommand}"));
    let mut args = Vec::new();
    for e in env.as_array().into_iter().flatten() {
        let (Some(name), Some(value)) = (e["name"].as_str(), e["value"].as_str()) else {
            continue;
        };
        let flag = cli
            .get_arguments()
            .chain(sub.get_arguments())
            .find(|a| a.get_env().is_some_and(|v| v == name));
        if let Some(long) = flag.and_then(|a| a.get_long()) {
            args.push(format!("--{long}={value}"));
        }
    }
    args
}

/// The Helm chart of this repository.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/falco-nats")
}

/// `helm template` of the chart as release falco-nats in falco-nats.
pub fn render_chart(values: &Path) -> Vec<Value> {
    let out = Command::new(helm())
        .args(["template", "falco-nats"])
        .arg(chart_dir())
        .args([
            "--namespace",
            "falco-nats",
            "--kube-version",
            "1.33.0",
            "-f",
        ])
        .arg(values)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template -f {}: {}",
        values.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_norway::Deserializer::from_slice(&out.stdout)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// The document of `kind` named `name`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

/// scripts/install-deps builds helm into target/tools/bin.
pub fn helm() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/helm");
    assert!(
        built.is_file(),
        "helm not found: run scripts/install-deps --with-validator (scripts/test does)"
    );
    built
}

/// README.md and every Markdown file under docs/.
pub fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}
