//! The image `scripts/image` builds, run as a container runtime would run
//! it: the OCI archive copied out by skopeo, unpacked by umoci, and its
//! entrypoint started by `chroot` on the image's root filesystem alone, as
//! the image's user, with the image's environment. Nothing of the host's
//! filesystem is there: a dynamically linked binary, a missing CA bundle or
//! a binary that needs root fails here.
//!
//! Needs root (chroot), skopeo, umoci and the archive named by
//! `FALCO_NATS_IMAGE`; `scripts/test` builds it with `scripts/image` and
//! runs these tests. The size budget is in `benches/image-budget.txt`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::tls::TestCa;
use crate::support::*;
use falco_nats::simulate::alerts::AlertFactory;

const WAIT: Duration = Duration::from_secs(20);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn archive() -> PathBuf {
    let path = std::env::var_os("FALCO_NATS_IMAGE")
        .map(PathBuf::from)
        .expect("FALCO_NATS_IMAGE names the image archive (scripts/image builds it)");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/image",
        path.display()
    );
    path
}

fn run(command: &mut Command) -> Output {
    let out = command.output().expect("start the command");
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The image unpacked into a directory of its own: a runtime bundle
/// (`rootfs/` and the runtime's `config.json`).
struct Unpacked {
    dir: tempfile::TempDir,
    config: serde_json::Value,
}

impl Unpacked {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("layout");
        // As a registry would be given it: the digest kept.
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--preserve-digests"])
            .arg(format!("oci-archive:{}", archive().display()))
            .arg(format!("oci:{}:image", layout.display())));
        run(Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:image", layout.display()))
            .arg(dir.path().join("bundle")));
        let config =
            serde_json::from_slice(&std::fs::read(dir.path().join("bundle/config.json")).unwrap())
                .unwrap();
        Unpacked { dir, config }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("bundle/rootfs")
    }

    fn user(&self) -> (u64, u64) {
        let user = &self.config["process"]["user"];
        (user["uid"].as_u64().unwrap(), user["gid"].as_u64().unwrap())
    }

    /// The image's entrypoint with `args` in place of its command, as its
    /// user, with its environment only.
    fn command(&self, args: &[&str]) -> Command {
        let (uid, gid) = self.user();
        let entrypoint: Vec<&str> = self.config["process"]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let mut command = Command::new("chroot");
        command
            .arg(format!("--userspec={uid}:{gid}"))
            .arg(self.rootfs())
            .args(&entrypoint)
            .args(args)
            .env_clear();
        for pair in self.config["process"]["env"].as_array().unwrap() {
            let (k, v) = pair.as_str().unwrap().split_once('=').unwrap();
            command.env(k, v);
        }
        command
    }

    fn label(&self, name: &str) -> Option<String> {
        self.config["annotations"][name].as_str().map(str::to_owned)
    }
}

/// The image's budget for `name`, in bytes.
fn budget(name: &str) -> u64 {
    let budgets = budgets("image-budget.txt");
    let bytes = budgets
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in benches/image-budget.txt"));
    *bytes as u64
}

/// The manifest of the archive as skopeo reads it.
fn manifest() -> serde_json::Value {
    let out = run(Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}", archive().display())));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
#[ignore = "needs root, skopeo, umoci and the image: scripts/test builds it (FALCO_NATS_IMAGE)"]
fn the_image_holds_two_files_runs_as_non_root_and_keeps_its_budget() {
    use std::os::unix::fs::MetadataExt;
    let image = Unpacked::new();
    let rootfs = image.rootfs();
    let mut files = BTreeSet::new();
    let mut dirs = vec![rootfs.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let name = path.strip_prefix(&rootfs).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            // Owned by root, writable by root only, no set-id bits, the
            // same modes whatever the umask of the machine that built it.
            let expected = if meta.is_dir() || name == "falco-nats" {
                0o755
            } else {
                0o644
            };
            assert_eq!(
                (meta.uid(), meta.gid(), meta.mode() & 0o7777),
                (0, 0, expected),
                "{name}"
            );
            if meta.is_dir() {
                dirs.push(path);
            } else {
                files.insert(name);
            }
        }
    }
    assert_eq!(
        files,
        BTreeSet::from([
            "etc/ssl/certs/ca-certificates.crt".to_owned(),
            "falco-nats".to_owned()
        ]),
        "the image holds the binary and the CA bundle, nothing else (no shell)"
    );
    let (uid, gid) = image.user();
    assert!(uid != 0 && gid != 0, "the image runs as root: {uid}:{gid}");
    let bundle = std::fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    let certificates = bundle.matches("-----BEGIN CERTIFICATE-----").count();
    assert!(certificates >= 100, "{certificates} CA certificates");
    // The ca-certificates package's Mozilla set, nothing the machine added.
    let mut mozilla: Vec<PathBuf> = std::fs::read_dir("/usr/share/ca-certificates/mozilla")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "crt"))
        .collect();
    mozilla.sort();
    let expected: String = mozilla
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        bundle == expected,
        "the bundle is the Mozilla set of ca-certificates"
    );

    // Compressed layers, as a registry keeps them: the digest scripts/image
    // prints is the one a registry serves.
    for layer in manifest()["layers"].as_array().unwrap() {
        assert_eq!(
            layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
            "{layer}"
        );
    }

    assert_eq!(
        image.label("org.opencontainers.image.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        image.label("org.opencontainers.image.licenses").as_deref(),
        Some("Apache-2.0")
    );
    if let Some(source) = image.label("org.opencontainers.image.source") {
        assert!(
            source.starts_with("https://") && !source.contains('@'),
            "no credentials in the source label: {source}"
        );
    }
    assert!(image.label("org.opencontainers.image.created").is_some());
    let revision = image.label("org.opencontainers.image.revision").unwrap();
    assert!(
        revision.len() >= 40 && revision[..40].bytes().all(|b| b.is_ascii_hexdigit()),
        "revision {revision:?}"
    );

    let binary = std::fs::metadata(rootfs.join("falco-nats")).unwrap().len();
    let archive = std::fs::metadata(archive()).unwrap().len();
    println!(
        "image: binary {binary} bytes, archive {archive} bytes, {certificates} CA certificates"
    );
    assert!(
        binary <= budget("binary"),
        "the binary is {binary} bytes, over its budget of {}",
        budget("binary")
    );
    assert!(
        archive <= budget("archive"),
        "the archive is {archive} bytes, over its budget of {}",
        budget("archive")
    );
}

#[test]
#[ignore = "needs root, skopeo, umoci and the image: scripts/test builds it (FALCO_NATS_IMAGE)"]
fn the_entrypoint_says_its_version() {
    let out = run(&mut Unpacked::new().command(&["--version"]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("falco-nats {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
#[ignore = "needs root, skopeo, umoci and the image: scripts/test builds it (FALCO_NATS_IMAGE)"]
fn respond_check_accepts_the_shipped_policy() {
    let image = Unpacked::new();
    // Where the responder's Deployment mounts its ConfigMap.
    let dir = image.rootfs().join("etc/falco-nats");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        root().join("deploy/base/policy.yaml"),
        dir.join("policy.yaml"),
    )
    .unwrap();
    let out = run(&mut image.command(&["respond", "--check", "/etc/falco-nats/policy.yaml"]));
    assert!(!out.stdout.is_empty(), "--check says what the policy holds");
}

/// The bridge in the image reads Falco's alerts on standard input and
/// publishes them over TLS to a nats-server whose certificate it can only
/// verify with the image's own CA bundle: it is refused with the bundle as
/// shipped (the test CA is not in it), and carries every alert once the
/// test CA is added to that file.
#[tokio::test]
#[ignore = "needs root, skopeo, umoci and the image: scripts/test builds it (FALCO_NATS_IMAGE)"]
async fn the_bridge_in_the_image_carries_alerts_over_tls_with_the_images_ca_bundle() {
    let image = Unpacked::new();
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new("falco-nats image test CA");
    let (cert, key) = ca.leaf(&["127.0.0.1"], false);
    let (cert_file, key_file) = (certs.path().join("tls.crt"), certs.path().join("tls.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let nats = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        cert_file.to_str().unwrap(),
        "--tlskey",
        key_file.to_str().unwrap(),
    ]);
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let bridge = |input: &[u8]| {
        let mut child = image
            .command(&["bridge", "--input", "stdin", "--listen", "off", "-s", &url])
            .args(["--drain-timeout", "6s"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child
    };

    // As shipped: the test CA is unknown, the handshake fails, and the
    // alert read is given up after --drain-timeout.
    let mut factory = AlertFactory::new("node-image", false);
    let mut refused = bridge(format!("{}\n", factory.next_json()).as_bytes());
    let deadline = std::time::Instant::now() + WAIT;
    while refused.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = refused.kill();
    let out = refused.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("UnknownIssuer") || log.contains("unknown issuer"),
        "the shipped bundle does not trust the test CA, and the bridge says so: {log}"
    );

    // The test CA added to the image's bundle: every alert arrives.
    let mut bundle = std::fs::OpenOptions::new()
        .append(true)
        .open(image.rootfs().join("etc/ssl/certs/ca-certificates.crt"))
        .unwrap();
    bundle.write_all(ca.cert.pem().as_bytes()).unwrap();
    drop(bundle);
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(certs.path().join("ca.crt"))
        .require_tls(true);
    std::fs::write(certs.path().join("ca.crt"), ca.cert.pem()).unwrap();
    let client = client.connect(&url).await.unwrap();
    let mut sub = client.subscribe("falco.>").await.unwrap();
    client.flush().await.unwrap();
    let mut input = Vec::new();
    for _ in 0..10 {
        input.extend_from_slice(factory.next_json().as_bytes());
        input.push(b'\n');
    }
    let child = bridge(&input);
    let got = receive(&mut sub, 10, WAIT).await;
    assert_eq!(
        got.iter()
            .map(|m| evt_num(&m.payload))
            .collect::<BTreeSet<_>>()
            .len(),
        10
    );
    wait_success(child, "the bridge ends at the end of its input").await;
}
