//! The responder in-process for the tests (respond.rs, guards.rs,
//! respond_kube.rs, security.rs): a scene of a nats-server, the Kubernetes
//! API stand-in and a subscription to the results; alerts made and
//! published; results read.

use std::time::Duration;

use falco_nats::respond::policy::Policy;
use falco_nats::respond::{self, RespondOptions};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::fake_kube::KubeApi as FakeKube;
use super::{http_get, kubeconfig, metric_value, receive, respond_options, wait_for, NatsServer};

const WAIT: Duration = Duration::from_secs(15);

/// A nats-server, the Kubernetes API stand-in, a client, and a
/// subscription to the responder's results: what every test starts with.
pub struct Scene {
    pub nats: NatsServer,
    pub kube: FakeKube,
    pub client: async_nats::Client,
    pub out: async_nats::Subscriber,
}

impl Scene {
    pub async fn start() -> Self {
        let nats = NatsServer::start();
        let kube = FakeKube::start().await.unwrap();
        let (client, out) = nats.subscribed("falco.response.>").await;
        Scene {
            nats,
            kube,
            client,
            out,
        }
    }
}

/// A policy from YAML text.
pub fn policy(yaml: &str) -> Policy {
    Policy::parse("policy.yaml", yaml).unwrap()
}

pub fn options(nats: &NatsServer, kube: &FakeKube) -> RespondOptions {
    respond_options(&nats.url(), &kubeconfig(kube))
}

pub struct Responder {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), respond::RespondError>>,
    /// Its probes and metrics.
    pub http: std::net::SocketAddr,
}

impl Responder {
    pub async fn start(options: RespondOptions) -> Self {
        let shutdown = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = listener.local_addr().unwrap();
        let task = tokio::spawn(respond::run(options, Some(listener), shutdown.clone()));
        // Ready means subscribed: alerts published from now on reach it.
        wait_for("the responder to be ready", WAIT, || async {
            task.is_finished() || http_get(http, "/readyz").await.0 == 200
        })
        .await;
        Responder {
            shutdown,
            task,
            http,
        }
    }

    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&http_get(self.http, "/metrics").await.1, series)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

pub fn alert(priority: &str, rule: &str, fields: Value) -> Vec<u8> {
    json!({
        "hostname": "node-1",
        "output": format!("12:00:00.000000000: {priority} {rule}"),
        "output_fields": fields,
        "priority": priority,
        "rule": rule,
        "source": "syscall",
        "tags": ["container"],
        "time": "2026-11-24T12:00:00.000000000Z",
    })
    .to_string()
    .into_bytes()
}

pub fn pod_alert(priority: &str, ns: &str, pod: &str, uid: Option<&str>) -> Vec<u8> {
    let mut fields = json!({"k8s.ns.name": ns, "k8s.pod.name": pod, "proc.pid": 42});
    if let Some(uid) = uid {
        fields["k8s.pod.uid"] = json!(uid);
    }
    alert(priority, "Drop and execute new binary in container", fields)
}

pub async fn publish(client: &async_nats::Client, payload: Vec<u8>) {
    client
        .publish(
            "falco.critical.drop_and_execute_new_binary_in_container",
            payload.into(),
        )
        .await
        .unwrap();
}

pub async fn results(sub: &mut async_nats::Subscriber, n: usize) -> Vec<Value> {
    receive(sub, n, WAIT)
        .await
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect()
}
