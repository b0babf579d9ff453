//! A real Kubernetes control plane for the tests: etcd, kube-apiserver and
//! kube-controller-manager as released (built by scripts/install-deps into
//! target/tools/bin), started once per test run on free loopback ports in
//! a temporary directory, like controller-runtime's envtest plus the
//! controllers (namespaces get their `default` ServiceAccount, Deployments
//! their ReplicaSets and pods, owners' garbage is collected). No kubelet:
//! pods stay Pending until a test sets their status ([`Cluster::make_ready`]).
//!
//! Each test takes a namespace of its own ([`Cluster::namespace`]), so tests
//! do not see each other. What needs the server to misbehave on demand (an
//! answer of 500, a call that never returns, a slow API) stays with the
//! stand-in, `simulate::kube_api` ([`super::fake_kube`]); so do the demo and
//! the responder tests that count calls or time them.
//!
//! The processes end with the test binary: each runs under a small shell
//! that kills it once the test process is gone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::{ApiResource, Discovery, Scope};
use kube::Client;
use serde_json::{json, Value};

use super::free_port;

/// The control plane of this test run.
pub struct Cluster {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    admin_token: String,
    dir: PathBuf,
    _processes: Vec<Child>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

fn tool(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/tools/bin")
        .join(name);
    assert!(
        built.is_file(),
        "{name} not found: run scripts/install-deps (scripts/test does)"
    );
    built
}

/// Runs `program args` until the test process ends (then kills it and,
/// for the last one, removes `cleanup`). The watching shell, kept while the
/// cluster lives (for ever: it is a static).
fn spawn_bound(program: &Path, args: &[String], log: &Path, cleanup: Option<&Path>) -> Child {
    let quoted: Vec<String> = std::iter::once(program.display().to_string())
        .chain(args.iter().cloned())
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    let remove = cleanup
        .map(|d| format!("; rm -rf '{}'", d.display()))
        .unwrap_or_default();
    let script = format!(
        "{} >'{}' 2>&1 & child=$!; \
         while kill -0 {} 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 0.5; done; \
         kill $child 2>/dev/null; wait $child 2>/dev/null{remove}",
        quoted.join(" "),
        log.display(),
        std::process::id()
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a control-plane process")
}

/// Runs `f` on a runtime of its own (the cluster outlives any one test's).
fn block_on<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f)
    })
    .join()
    .expect("the control plane's set-up panicked")
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Cluster {
    /// The control plane, started on first use.
    pub fn get() -> &'static Cluster {
        CLUSTER.get_or_init(Cluster::start)
    }

    fn start() -> Cluster {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("falco-nats-kube-")
            .tempdir()
            .expect("a temp dir")
            .keep();
        // The service accounts' signing key.
        let key = dir.join("sa.key");
        let public = dir.join("sa.pub");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        openssl(&["genrsa", "-out", key.to_str().unwrap(), "2048"]);
        openssl(&[
            "rsa",
            "-in",
            key.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ]);
        let admin_token = format!("admin-{:032x}", fastrand::u128(..));
        let tokens = dir.join("tokens.csv");
        std::fs::write(
            &tokens,
            format!("{admin_token},admin,admin-uid,\"system:masters\"\n"),
        )
        .expect("write the token file");

        let (client_port, peer_port) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_log = dir.join("etcd.log");
        let mut processes = Vec::new();
        processes.push(spawn_bound(
            &tool("etcd"),
            &[
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            &etcd_log,
            Some(&dir),
        ));

        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let apiserver_log = dir.join("kube-apiserver.log");
        processes.push(spawn_bound(
            &tool("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", dir.join("certs").display()),
                format!("--token-auth-file={}", tokens.display()),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-key-file={}", public.display()),
                format!("--service-account-signing-key-file={}", key.display()),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--allow-privileged=true".into(),
                "--v=0".into(),
            ],
            &apiserver_log,
            None,
        ));
        let mut cluster = Cluster {
            url,
            admin_token,
            dir: dir.clone(),
            _processes: Vec::new(),
        };
        let admin = cluster.kubeconfig("admin", &cluster.admin_token);
        let cm_log = dir.join("kube-controller-manager.log");
        processes.push(spawn_bound(
            &tool("kube-controller-manager"),
            &[
                format!("--kubeconfig={}", admin.display()),
                format!("--service-account-private-key-file={}", key.display()),
                "--use-service-account-credentials=false".into(),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--controllers=deployment,replicaset,statefulset,daemonset,serviceaccount,serviceaccount-token,namespace,garbagecollector".into(),
                "--v=0".into(),
            ],
            &cm_log,
            None,
        ));
        cluster._processes = processes;

        // Ready: the API answers, and the controllers gave `default` its
        // ServiceAccount.
        let kubeconfig = admin.clone();
        let ready = block_on(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if let Ok(client) = client_from(&kubeconfig).await {
                    let sa: Api<ServiceAccount> = Api::namespaced(client, "default");
                    if sa.get_opt("default").await.ok().flatten().is_some() {
                        return true;
                    }
                }
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        assert!(
            ready,
            "the control plane did not get ready in 120 s\netcd:\n{}\nkube-apiserver:\n{}\nkube-controller-manager:\n{}",
            log_tail(&etcd_log),
            log_tail(&apiserver_log),
            log_tail(&cm_log)
        );
        eprintln!(
            "real Kubernetes API at {} ready in {:.1} s",
            cluster.url,
            started.elapsed().as_secs_f64()
        );
        cluster
    }

    /// A kubeconfig file for `token` (the server's certificate is its own
    /// self-signed one, not checked).
    pub fn kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        let path = self
            .dir
            .join(format!("kubeconfig-{name}-{:08x}", fastrand::u32(..)));
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "real", "cluster": {"server": self.url, "insecure-skip-tls-verify": true}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "real", "context": {"cluster": "real", "user": name}}],
            "current-context": "real",
        });
        std::fs::write(&path, config.to_string()).expect("write a kubeconfig");
        path
    }

    /// The admin's kubeconfig (group system:masters).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.kubeconfig("admin", &self.admin_token)
    }

    /// A client as the admin.
    pub async fn admin(&self) -> Client {
        client_from(&self.admin_kubeconfig())
            .await
            .expect("an admin client")
    }

    /// A fresh namespace named `prefix-XXXX`, with its `default`
    /// ServiceAccount in place (pods can be made in it).
    pub async fn namespace(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{:06x}", fastrand::u32(..0xff_ffff));
        self.ensure_namespace(&name).await;
        name
    }

    /// Makes namespace `name` if missing, and waits for its `default`
    /// ServiceAccount.
    pub async fn ensure_namespace(&self, name: &str) {
        let client = self.admin().await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        if namespaces
            .get_opt(name)
            .await
            .expect("get a namespace")
            .is_none()
        {
            let ns: Namespace =
                serde_json::from_value(json!({"metadata": {"name": name}})).expect("a namespace");
            match namespaces.create(&PostParams::default(), &ns).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => panic!("create namespace {name}: {e}"),
            }
        }
        let sa: Api<ServiceAccount> = Api::namespaced(client, name);
        let deadline = Instant::now() + Duration::from_secs(30);
        while sa.get_opt("default").await.ok().flatten().is_none() {
            assert!(
                Instant::now() < deadline,
                "no default ServiceAccount in {name}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A token for ServiceAccount `namespace/name` (the TokenRequest API,
    /// as `kubectl create token` asks for one).
    pub async fn token(&self, namespace: &str, name: &str) -> String {
        let sa: Api<ServiceAccount> = Api::namespaced(self.admin().await, namespace);
        let request = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        }))
        .expect("a TokenRequest");
        let answer = sa
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("a token for {namespace}/{name}: {e}"));
        answer.status.expect("a token").token
    }

    /// Server-side applies `docs` (any kinds the server serves) as the
    /// admin; a refusal names the object and the server's reason.
    pub async fn apply(&self, docs: &[Value]) -> Result<(), String> {
        let client = self.admin().await;
        let discovery = Discovery::new(client.clone())
            .run()
            .await
            .map_err(|e| format!("discovery: {e}"))?;
        for doc in docs {
            let api_version = doc["apiVersion"].as_str().unwrap_or_default();
            let kind = doc["kind"].as_str().unwrap_or_default();
            let name = doc["metadata"]["name"].as_str().unwrap_or_default();
            let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
            let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
            let (resource, caps): (ApiResource, _) = discovery
                .resolve_gvk(&gvk)
                .ok_or_else(|| format!("{kind} {name}: the server does not serve {api_version}"))?;
            let api: Api<DynamicObject> = match caps.scope {
                Scope::Namespaced => Api::namespaced_with(
                    client.clone(),
                    doc["metadata"]["namespace"].as_str().unwrap_or("default"),
                    &resource,
                ),
                Scope::Cluster => Api::all_with(client.clone(), &resource),
            };
            api.patch(
                name,
                &PatchParams::apply("falco-nats-tests").force(),
                &Patch::Apply(doc),
            )
            .await
            .map_err(|e| format!("{kind} {name}: {e}"))?;
        }
        Ok(())
    }

    /// Marks `namespace/pod` Running and Ready through its status, as a
    /// kubelet would (none runs here).
    pub async fn make_ready(&self, namespace: &str, pod: &str) {
        let pods: Api<Pod> = Api::namespaced(self.admin().await, namespace);
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = json!({"status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            ],
        }});
        pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("make {namespace}/{pod} ready: {e}"));
    }
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Result<Client, kube::Error> {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(kube::Error::InferKubeconfig)?;
    Client::try_from(config)
}
