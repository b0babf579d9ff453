//! `falco-nats respond`: takes alerts off NATS and acts on the offending pod
//! under a [`policy::Policy`], behind the guard chain ([`guards`]), and
//! makes every decision visible ([`audit`]).
//!
//! Core NATS: a queue group shares the alerts among replicas. JetStream: a
//! durable pull consumer, acknowledged only once an alert's actions are done
//! (or decided against), so a crash loses nothing; a transient failure (the
//! API server's 5xx, a time-out) hands the alert back for another try, up to
//! a delivery limit. Alerts are handled a bounded number at a time, and no
//! more are pulled than that, so none waits past the ack wait in a buffer.
//!
//! This file: the options and [`run`], which wires the parts. The
//! [`responder::Responder`] decides on one alert; `consume` takes the
//! alerts off NATS and settles them; [`outcome`] is what a decision can say.

pub mod audit;
pub mod cluster;
mod consume;
pub mod control;
pub mod guards;
pub mod kill_switch;
pub mod outcome;
pub mod policy;
pub mod rails;
pub mod responder;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::nats::{connect, ConnectionWatch, NatsError, NatsOptions};
use crate::server::Listen;
use crate::signing::Verifier;
use crate::telemetry::health::{self, Readiness};
use crate::telemetry::metrics::RespondMetrics;
use audit::Audit;
use cluster::{Cluster, ClusterError};
use consume::Consume;
pub use consume::{ConsumeError, Subscription};
use control::{Control, ControlOptions, Guards, JetStreamCheck, PauseState};
use guards::Limits;
use policy::Policy;
use rails::{Rails, RailsConfig};
use responder::Responder;

/// The responder's default `--listen` address (the bridge's plus one).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:2811";

/// The default prefix of result subjects: `falco.response.<action>`.
pub const DEFAULT_RESULT_SUBJECT: &str = "falco.response";

/// Everything the responder needs.
pub struct RespondOptions {
    pub nats: NatsOptions,
    pub subscription: Subscription,
    pub policy: Policy,
    pub rails: RailsConfig,
    /// Healthy replicas and the cluster-wide budget.
    pub limits: Limits,
    /// Decide and report only; nothing is written to Kubernetes.
    pub dry_run: bool,
    /// Results go to `<prefix>.<action>`; alerts on these subjects are ignored.
    pub result_prefix: String,
    /// A kubeconfig to use instead of the usual discovery.
    pub kubeconfig: Option<PathBuf>,
    /// Longest wait for one Kubernetes API call.
    pub kube_timeout: Duration,
    /// Alerts handled at once, at most.
    pub concurrency: usize,
    /// On shutdown, longest time to finish the alerts in hand and publish results.
    pub drain_timeout: Duration,
    /// When set, only alerts signed by one of its keys are acted on.
    pub verifier: Option<Verifier>,
    /// Signed alerts signed longer ago are skipped (`stale`); zero: no limit.
    pub max_alert_age: Duration,
    /// The bucket of the kill switch and the cluster-wide rate limit.
    pub control: ControlOptions,
    /// Where the guards keep their state (JetStream, or each replica).
    pub guards: Guards,
}

/// Why the responder stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RespondError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("{0}, which the responders' guards need (the kill switch, one rate limit for every replica, shared claims). Either enable JetStream on the NATS server (`nats-server -js`, or a `jetstream {{}}` block in its configuration), or run with --guards local: each replica its own rate limit, and no kill switch")]
    NoJetStream(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Consume(#[from] ConsumeError),
}

/// Runs the responder until `shutdown`, serving probes on `listener`.
pub async fn run(
    options: RespondOptions,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RespondError> {
    let mut registry = Registry::default();
    let metrics = RespondMetrics::new(&mut registry);
    let readiness = Readiness::default();
    let watch = ConnectionWatch::register(&readiness, &mut registry);
    // Ready once NATS is connected and the alerts' subscription is in place,
    // and while the Kubernetes API answers.
    let subscribed = readiness.check("subscription");
    let kube_ready = readiness.check("kubernetes");
    let kubeconfig = options.kubeconfig.as_deref();
    let cluster = Arc::new(Cluster::connect(kubeconfig, options.kube_timeout, kube_ready).await?);
    let control_ready = readiness.check("kill switch");
    let kill_switch = readiness.detail("kill switch");
    let permitted = readiness.check("kubernetes permissions");
    let permissions_detail = readiness.detail("kubernetes permissions");
    let guards_detail = readiness.detail("guards");
    let client = connect(&options.nats, watch).await?.client;
    // Shared guards need JetStream: a server without it is said at once,
    // with both ways out; one that is there but not answering yet (a
    // cluster electing a leader) is waited for, failing closed.
    if options.guards == Guards::Shared {
        match control::check_jetstream(&client).await {
            JetStreamCheck::Missing(why) => return Err(RespondError::NoJetStream(why)),
            JetStreamCheck::Unavailable(why) => {
                tracing::warn!(reason = %why, "JetStream does not answer yet; no alert is taken until the guards can be read")
            }
            JetStreamCheck::Available => {}
        }
    }
    for mode in ["shared", "local"] {
        let current = match options.guards {
            Guards::Shared => "shared",
            Guards::Local => "local",
        };
        metrics
            .guards
            .get_or_create(&[("mode", mode)])
            .set(i64::from(mode == current));
    }
    let http_metrics = crate::telemetry::metrics::HttpServerMetrics::new(&mut registry);
    let router = health::router(readiness, Arc::new(registry));
    let server = Listen::probes(listener, router, http_metrics);
    // The kill switch is read before the first alert: a responder that
    // starts while paused is paused from the start.
    let control = match options.guards {
        Guards::Shared => {
            guards_detail
                .set("shared (JetStream: one kill switch and rate limit for every replica)".into());
            let Some(control) = open_control(&client, &options.control, &shutdown).await else {
                server.stop().await;
                return Ok(());
            };
            control
        }
        Guards::Local => {
            let text = "local (--guards local): no kill switch, and --max-actions-per-minute, \
                        min_healthy_replicas and duplicates counted by each replica alone";
            tracing::warn!("guards: {text}");
            guards_detail.set(text.into());
            Control::local()
        }
    };
    let control = Arc::new(control);
    // Ready means able to act: what the policy needs, asked of the API
    // server now (which also connects before the first alert) and every
    // minute after.
    let needed = if options.dry_run {
        vec![("get", "", "pods")]
    } else {
        let actions: Vec<&policy::ActionSpec> = options
            .policy
            .rules
            .iter()
            .flat_map(|r| r.actions.iter())
            .collect();
        cluster::permissions_for(&actions)
    };
    let permissions = PermissionWatch {
        cluster: Arc::clone(&cluster),
        needed,
        namespaces: options.rails.only_namespaces.clone(),
        ready: permitted,
        detail: permissions_detail,
    };
    permissions.check().await;
    let permission_watcher = tokio::spawn(permissions.every(PERMISSIONS_EVERY, shutdown.clone()));
    let watcher = tokio::spawn(Arc::clone(&control).watch_pause(shutdown.clone(), {
        let gauge = metrics.kill_switch.clone();
        move |state| {
            let (name, text) = match state {
                PauseState::Running(None) => ("running", "running".to_owned()),
                PauseState::Running(Some(r)) => ("running", r.to_string()),
                PauseState::Paused(r) => ("paused", r.to_string()),
                PauseState::Unknown(why) => (
                    "unknown",
                    format!("unknown ({why}); destructive actions are skipped"),
                ),
                PauseState::Off => ("off", "none (--guards local)".to_owned()),
            };
            for s in ["running", "paused", "unknown", "off"] {
                gauge
                    .get_or_create(&[("state", s)])
                    .set(i64::from(s == name));
            }
            control_ready.set(name != "unknown");
            match name {
                "paused" => {
                    tracing::warn!(state = %text, "kill switch: destructive actions are skipped")
                }
                "unknown" => tracing::warn!(state = %text, "kill switch cannot be read"),
                _ => tracing::info!(state = %text, "kill switch"),
            }
            kill_switch.set(text);
        }
    }));
    tracing::info!(
        rules = options.policy.rules.len(),
        dry_run = options.dry_run,
        concurrency = options.concurrency,
        bucket = control.bucket(),
        pause_bucket = control.pause_bucket(),
        "responder starting"
    );
    let audit = Audit {
        client: client.clone(),
        prefix: options.result_prefix.clone(),
        metrics,
        cluster: cluster.clone(),
        event_window: options.rails.dedup_window,
        recent_events: Default::default(),
    };
    let responder = Responder {
        policy: options.policy,
        rails: Rails::new(options.rails),
        limits: options.limits,
        control,
        cluster,
        dry_run: options.dry_run,
        audit,
        verifier: options.verifier,
        max_alert_age: options.max_alert_age,
    };
    // Once shutdown starts, finishing the alerts in hand and publishing
    // their results share one deadline.
    let deadline = crate::drain::deadline_after(&shutdown, options.drain_timeout);
    let consume = Consume {
        client: &client,
        responder: &responder,
        results: options.result_prefix.clone(),
        concurrency: options.concurrency.max(1),
        subscribed: &subscribed,
        shutdown: &shutdown,
        deadline: &deadline,
    };
    let result = consume.run(options.subscription).await;
    confirm_results(&client, &deadline).await;
    watcher.abort();
    permission_watcher.abort();
    server.stop().await;
    Ok(result?)
}

/// How often the responder asks again what it may do.
const PERMISSIONS_EVERY: Duration = Duration::from_secs(60);

/// Keeps readiness on what the responder may do in the cluster.
struct PermissionWatch {
    cluster: Arc<Cluster>,
    needed: Vec<cluster::Permission>,
    namespaces: Option<std::collections::BTreeSet<String>>,
    ready: crate::telemetry::health::ReadyFlag,
    detail: crate::telemetry::health::Detail,
}

impl PermissionWatch {
    /// Asks once; ready when every permission is granted, the detail
    /// naming what is missing otherwise.
    async fn check(&self) {
        let found = self
            .cluster
            .check_permissions(&self.needed, self.namespaces.as_ref())
            .await;
        let (ready, text) = match &found {
            cluster::Permissions::Granted => (true, "granted".to_owned()),
            cluster::Permissions::Missing(what) => {
                (false, format!("missing: may not {}", what.join(", ")))
            }
            cluster::Permissions::Unreachable(why) => {
                (false, format!("cannot ask the API server: {why}"))
            }
        };
        if ready != self.ready.get() || text != self.detail.get() {
            if ready {
                tracing::info!("the Kubernetes API grants what the policy needs");
            } else {
                tracing::warn!(permissions = %text, "not ready: the responder cannot act");
            }
        }
        self.ready.set(ready);
        self.detail.set(text);
    }

    async fn every(self, period: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => self.check().await,
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Opens the kill switch's bucket, retrying (with backoff) until it works
/// or shutdown; `None` on shutdown.
async fn open_control(
    client: &async_nats::Client,
    options: &ControlOptions,
    shutdown: &CancellationToken,
) -> Option<Control> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let opened = tokio::select! {
            opened = Control::open(client, options) => opened,
            _ = shutdown.cancelled() => return None,
        };
        match opened {
            Ok(control) => return Some(control),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::error!(error = %crate::telemetry::logging::chain(&e), ?delay, "cannot read the kill switch; not taking alerts until it can be read");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// Waits (until the drain deadline) for NATS to confirm it has every result
/// published.
async fn confirm_results(client: &async_nats::Client, deadline: &CancellationToken) {
    tokio::select! {
        confirmed = crate::nats::round_trip(client) => {
            if let Err(e) = confirmed {
                tracing::warn!(error = %e, "cannot confirm that NATS received the last results");
            }
        }
        _ = deadline.cancelled() => {
            tracing::warn!("drain timeout: NATS did not confirm the last results");
        }
    }
}
