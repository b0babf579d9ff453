//! `falco-nats respond`: takes alerts off NATS and acts on the offending pod
//! under a [`policy::Policy`], behind [`rails::Rails`], and makes every
//! decision visible ([`audit`]).
//!
//! Core NATS: a queue group shares the alerts among replicas. JetStream: a
//! durable pull consumer, acknowledged only once an alert's actions are done
//! (or decided against), so a crash loses nothing; a transient failure (the
//! API server's 5xx, a time-out) hands the alert back for another try, up to
//! a delivery limit. Alerts are handled a bounded number at a time, and no
//! more are pulled than that, so none waits past the ack wait in a buffer.

pub mod audit;
pub mod cluster;
pub mod control;
pub mod kill_switch;
pub mod policy;
pub mod rails;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, AckKind};
use futures_util::stream::{FuturesUnordered, StreamExt};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::alert::{Alert, PodRef};
use crate::backoff::Backoff;
use crate::decision::{Action, Decision, NoAction, Outcome};
use crate::nats::subject::is_under;
use crate::nats::{connect, ConnectionWatch, NatsError, NatsOptions};
use crate::server::Listen;
use crate::signing::Verifier;
use crate::telemetry::health::{self, Readiness, ReadyFlag};
use crate::telemetry::metrics::RespondMetrics;
use audit::Audit;
use cluster::{Applied, CallError, Cluster, ClusterError};
use control::{Control, ControlOptions, Gate, Guards, JetStreamCheck, PauseState};
use policy::{ActionSpec, Policy, PolicyRule};
use rails::{DedupKey, Rails, RailsConfig, Refusal};
use workload::{MinHealthy, Reservation};

/// The responder's default `--listen` address (the bridge's plus one).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:2811";

/// The default prefix of result subjects: `falco.response.<action>`.
pub const DEFAULT_RESULT_SUBJECT: &str = "falco.response";

/// Where alerts come from.
#[derive(Debug, Clone)]
pub enum Subscription {
    /// Core NATS, shared among replicas by a queue group.
    Core { subject: String, queue: String },
    /// A durable JetStream pull consumer.
    JetStream {
        stream: String,
        durable: String,
        subject: String,
        ack_wait: Duration,
        /// Deliveries of one alert at most; the last failure is final.
        max_deliver: u32,
    },
}

/// Everything the responder needs.
pub struct RespondOptions {
    pub nats: NatsOptions,
    pub subscription: Subscription,
    pub policy: Policy,
    pub rails: RailsConfig,
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
    #[error("cannot subscribe to {subject:?}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
}

/// Which delivery of an alert this is. Core NATS delivers once; JetStream
/// again after a transient failure, up to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub attempt: u32,
    /// No other delivery follows: a failure now is final.
    pub last: bool,
}

impl Delivery {
    /// The one and only delivery (core NATS).
    pub const ONLY: Delivery = Delivery {
        attempt: 1,
        last: true,
    };
}

/// What to tell JetStream about a handled alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done with (acted on, or decided against).
    Ack,
    /// A transient failure: deliver it again later.
    Retry,
    /// Failed on its last delivery: never deliver it again.
    Term,
}

/// Decides and acts on alerts.
pub struct Responder {
    policy: Policy,
    rails: Rails,
    control: Arc<Control>,
    cluster: Arc<Cluster>,
    dry_run: bool,
    audit: Audit,
    verifier: Option<Verifier>,
    /// Signed alerts older than this are not acted on (zero: no limit).
    max_alert_age: Duration,
}

/// How far a signing clock may run ahead of the responder's.
const CLOCK_SKEW_MS: u64 = 60_000;

/// Whether an alert signed at `signed_ms` may be acted on at `now_ms`: not
/// older than `max_age` (zero: any age), not signed ahead of the clock by
/// more than `CLOCK_SKEW_MS`. Why not, when not.
pub fn freshness(signed_ms: u64, now_ms: u64, max_age: Duration) -> Result<(), String> {
    if max_age.is_zero() {
        return Ok(());
    }
    if signed_ms > now_ms.saturating_add(CLOCK_SKEW_MS) {
        return Err(format!(
            "signed {:.1}s ahead of this responder's clock",
            (signed_ms - now_ms) as f64 / 1000.0
        ));
    }
    let age = now_ms.saturating_sub(signed_ms);
    if u128::from(age) > max_age.as_millis() {
        return Err(format!(
            "signed {:.1}s ago, more than --max-alert-age {}s",
            age as f64 / 1000.0,
            max_age.as_secs()
        ));
    }
    Ok(())
}

/// How carrying out one action ended: the decision in data, before it is
/// written up. The claim on the pod is kept for `Done`, `DryRun` and
/// `Gone`, and given back for the rest.
#[derive(Debug)]
pub enum Verdict {
    /// The action needs no pod (`log`).
    Logged,
    /// Decided against before any rail.
    NoAction(NoAction),
    /// Refused by a rail.
    Refused(Refusal),
    /// Refused by a guard, which says why.
    Guarded(Refusal, String),
    /// Not taken because a guard could not be checked (fail closed); another
    /// delivery may check it again.
    Unavailable(Refusal, String),
    Done,
    DryRun,
    Gone,
    Replaced,
    Failed {
        reason: String,
        transient: bool,
    },
}

impl Verdict {
    fn failed(context: &str, e: &CallError) -> Self {
        Verdict::Failed {
            reason: format!("{context}{e}"),
            transient: e.is_transient(),
        }
    }

    /// Whether another delivery may turn this into something else.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            Verdict::Failed {
                transient: true,
                ..
            } | Verdict::Unavailable(..)
        )
    }

    /// The verdict a shared-state gate gives.
    fn gated(gate: Gate) -> Self {
        match gate {
            Gate::Paused => Verdict::Refused(Refusal::Paused),
            Gate::RateLimited => Verdict::Refused(Refusal::RateLimited),
            Gate::PauseUnknown(why) => Verdict::Unavailable(Refusal::PauseUnknown, why),
            Gate::RateLimitUnavailable(why) => {
                Verdict::Unavailable(Refusal::RateLimitUnavailable, why)
            }
        }
    }

    /// Writes the verdict into `d`: outcome and reason.
    fn write(self, d: &mut Decision, action: &ActionSpec) {
        let what = describe(action);
        let (outcome, reason) = match self {
            Verdict::Logged if d.dry_run => (Outcome::DryRun, "logged".to_owned()),
            Verdict::Logged => (Outcome::Done, "logged".to_owned()),
            Verdict::NoAction(why) => (Outcome::Skipped, why.as_str().to_owned()),
            Verdict::Refused(why) => (Outcome::Skipped, why.as_str().to_owned()),
            Verdict::Guarded(why, detail) | Verdict::Unavailable(why, detail) => {
                (Outcome::Skipped, format!("{}: {detail}", why.as_str()))
            }
            Verdict::Done => (Outcome::Done, what),
            Verdict::DryRun => (Outcome::DryRun, format!("would {what}")),
            Verdict::Gone => (Outcome::Gone, "the pod no longer exists".to_owned()),
            Verdict::Replaced => (
                Outcome::Replaced,
                "the pod was replaced (UID differs); not touched".to_owned(),
            ),
            Verdict::Failed { reason, .. } => (Outcome::Failed, reason),
        };
        d.outcome = outcome;
        d.reason = reason;
    }
}

impl Responder {
    /// Handles one alert: decides, acts, and publishes the decisions.
    pub async fn handle(
        &self,
        subject: &str,
        payload: &[u8],
        headers: Option<&async_nats::HeaderMap>,
        delivery: Delivery,
    ) -> Settle {
        let received = Instant::now();
        if delivery.attempt <= 1 {
            self.audit.metrics.alerts.inc();
        }
        let alert = match Alert::from_json(payload) {
            Ok(alert) => alert,
            Err(e) => {
                let mut d = Decision::new(Action::None, subject);
                d.reason = format!("{}: {e}", NoAction::Malformed.as_str());
                return self.only(d, received).await;
            }
        };
        // Only a trusted signer's alert is acted on; the decision still
        // says what the alert claimed.
        if let Some(verifier) = &self.verifier {
            let refused = match verifier.verify(subject, payload, headers) {
                Err(e) => {
                    self.audit.metrics.bad_signatures.inc();
                    Some(format!("{}: {e}", NoAction::BadSignature.as_str()))
                }
                Ok(signed) => freshness(signed.at_ms, control::now_ms(), self.max_alert_age)
                    .err()
                    .map(|why| format!("{}: {why}", NoAction::Stale.as_str())),
            };
            if let Some(reason) = refused {
                let pod = alert.pod().ok().flatten();
                let mut d = decision_for(&alert, pod.as_ref(), None, subject, self.dry_run);
                d.reason = reason;
                return self.only(d, received).await;
            }
        }
        // Names are checked before any rail, policy or API call.
        let pod = match alert.pod() {
            Ok(pod) => pod,
            Err(e) => {
                let mut d = decision_for(&alert, None, None, subject, self.dry_run);
                d.reason = format!("{}: {e}", NoAction::InvalidName.as_str());
                return self.only(d, received).await;
            }
        };
        let rules = self.policy.evaluate(&alert);
        if rules.is_empty() {
            let mut d = decision_for(&alert, pod.as_ref(), None, subject, self.dry_run);
            d.reason = NoAction::NoPolicyMatch.as_str().to_owned();
            return self.only(d, received).await;
        }
        let mut settle = Settle::Ack;
        for rule in rules {
            for action in &rule.actions {
                let step = self
                    .act(
                        &alert,
                        pod.as_ref(),
                        (rule, action),
                        subject,
                        delivery,
                        received,
                    )
                    .await;
                settle = match (settle, step) {
                    (Settle::Retry, _) | (_, Settle::Retry) => Settle::Retry,
                    (Settle::Term, _) | (_, Settle::Term) => Settle::Term,
                    _ => Settle::Ack,
                };
            }
        }
        settle
    }

    /// Decides one action, and records the decision unless a transient
    /// failure leaves it to the next delivery.
    async fn act(
        &self,
        alert: &Alert,
        pod: Option<&PodRef>,
        (rule, action): (&PolicyRule, &ActionSpec),
        subject: &str,
        delivery: Delivery,
        received: Instant,
    ) -> Settle {
        let mut d = decision_for(alert, pod, Some(rule), subject, self.dry_run);
        d.action = action.kind();
        // The pod the action is about (none for `log`, which writes no Event).
        let mut target = pod.cloned().filter(|_| action.needs_pod());
        let verdict = self
            .decide(
                alert,
                target.as_mut(),
                (rule, action),
                d.dry_run,
                delivery.last,
            )
            .await;
        let transient = verdict.is_transient();
        if transient && !delivery.last {
            // Not final: the decision is made again on the next delivery.
            self.audit.metrics.retries.inc();
            tracing::warn!(action = action.name(), attempt = delivery.attempt, verdict = ?verdict, "transient failure; the alert will be delivered again");
            return Settle::Retry;
        }
        verdict.write(&mut d, action);
        if transient {
            d.reason = format!("{} (delivery {}, the last)", d.reason, delivery.attempt);
        }
        // Results and Events name the pod as the API answered for it.
        if let Some(target) = &target {
            d.namespace = Some(target.namespace.clone());
            d.pod = Some(target.name.clone());
            d.pod_uid.clone_from(&target.uid);
        }
        d.latency_ms = received.elapsed().as_secs_f64() * 1000.0;
        self.audit.record(&d, target.as_ref()).await;
        if transient {
            Settle::Term
        } else {
            Settle::Ack
        }
    }

    /// Records a single decision about an alert that leads to no action.
    async fn only(&self, mut d: Decision, received: Instant) -> Settle {
        d.latency_ms = received.elapsed().as_secs_f64() * 1000.0;
        self.audit.record(&d, None).await;
        Settle::Ack
    }

    /// Decides on one action and carries it out: the rails before and after
    /// reading the pod, the guards, then the API call. `pod` is updated to
    /// what the API answered.
    async fn decide(
        &self,
        alert: &Alert,
        pod: Option<&mut PodRef>,
        (rule, action): (&PolicyRule, &ActionSpec),
        dry_run: bool,
        last_delivery: bool,
    ) -> Verdict {
        if !action.needs_pod() {
            return Verdict::Logged;
        }
        let Some(pod) = pod else {
            return Verdict::NoAction(NoAction::NoPod);
        };
        let key = match self.rails.admit(pod, &alert.rule, action.kind()) {
            Ok(key) => key,
            Err(refusal) => return Verdict::Refused(refusal),
        };
        // The same claim for every replica, unless dry-running (a dry run
        // must not hold back a responder that acts).
        let claim = if dry_run {
            None
        } else {
            let lease = self.cluster.timeout() * 3;
            let claimed = self
                .control
                .claim_action(&key, self.rails.dedup_window(), lease, last_delivery)
                .await;
            match claimed {
                Ok(control::ClaimResult::Claimed(claim)) => Some(claim),
                Ok(control::ClaimResult::Duplicate) => return Verdict::Refused(Refusal::Duplicate),
                Ok(control::ClaimResult::InProgress) => {
                    self.rails.release(&key);
                    return Verdict::Failed {
                        reason: "another responder is taking this action on this pod now".into(),
                        transient: true,
                    };
                }
                Err(e) => {
                    self.rails.release(&key);
                    return Verdict::Failed {
                        reason: format!("cannot check for duplicates across replicas: {e}"),
                        transient: true,
                    };
                }
            }
        };
        let mut reservation = None;
        let verdict = self
            .execute(pod, &key, (rule, action), dry_run, &mut reservation)
            .await;
        let kept = matches!(verdict, Verdict::Done | Verdict::DryRun | Verdict::Gone);
        if let Some(claim) = &claim {
            if kept {
                self.control.complete_claim(claim).await;
            } else {
                self.control.release_claim(claim).await;
            }
        }
        if !kept {
            self.rails.release(&key);
        }
        if let Some(reservation) = reservation.filter(|_| !matches!(verdict, Verdict::Done)) {
            self.control.release_replica(&reservation).await;
        }
        verdict
    }

    /// Reads the pod, asks the rails and the guards, and acts. A deletion
    /// reserved against the pod's workload is left in `reservation`.
    async fn execute(
        &self,
        pod: &mut PodRef,
        key: &DedupKey,
        (rule, action): (&PolicyRule, &ActionSpec),
        dry_run: bool,
        reservation: &mut Option<Reservation>,
    ) -> Verdict {
        let found = match self.cluster.get_pod(pod).await {
            Ok(None) => return Verdict::Gone,
            Ok(Some(found)) => found,
            Err(e) => return Verdict::failed("cannot read the pod: ", &e),
        };
        if let Some(namespace) = &found.metadata.namespace {
            pod.namespace.clone_from(namespace);
        }
        if let Some(name) = &found.metadata.name {
            pod.name.clone_from(name);
        }
        // Without a UID in the alert, the one just read still guards
        // against the pod being replaced before the action.
        if pod.uid.is_none() {
            pod.uid.clone_from(&found.metadata.uid);
        }
        if let Err(refusal) = self.rails.permit(key, &found) {
            return Verdict::Refused(refusal);
        }
        if let ActionSpec::DeletePod { .. } = action {
            let min = rule
                .min_healthy_replicas
                .unwrap_or(self.rails.min_healthy_replicas());
            match self.keep_healthy(&found, min).await {
                Ok(r) => *reservation = r,
                Err(verdict) => return verdict,
            }
        }
        if action.is_destructive() {
            // The kill switch, then the cluster-wide budget: a paused
            // responder uses none of it.
            if let Err(gate) = self.control.check_pause() {
                return Verdict::gated(gate);
            }
            let limit = self.rails.max_actions_per_minute();
            if let Err(gate) = self.control.take_slot(limit, !dry_run).await {
                return Verdict::gated(gate);
            }
        }
        if dry_run {
            return Verdict::DryRun;
        }
        let result = match action {
            ActionSpec::DeletePod {
                grace_period_seconds,
            } => self.cluster.delete_pod(pod, *grace_period_seconds).await,
            ActionSpec::LabelPod { labels } => self.cluster.label_pod(pod, labels).await,
            ActionSpec::IsolatePod { labels } => self.cluster.isolate_pod(pod, labels).await,
            ActionSpec::Log => Ok(Applied::Done),
        };
        match result {
            Ok(Applied::Done) => Verdict::Done,
            Ok(Applied::Gone) => Verdict::Gone,
            Ok(Applied::Replaced) => Verdict::Replaced,
            Err(e) => Verdict::failed("", &e),
        }
    }

    /// `min_healthy_replicas`: the pod's workload keeps at least `min`
    /// healthy replicas once the pod is deleted; the deletion reserved.
    /// A workload that cannot be read is a refusal (or, when the API
    /// failed for now, a transient failure), never a deletion.
    async fn keep_healthy(
        &self,
        found: &k8s_openapi::api::core::v1::Pod,
        min: MinHealthy,
    ) -> Result<Option<Reservation>, Verdict> {
        if min.is_off() {
            return Ok(None);
        }
        let workload = match self.cluster.workload_of(found).await {
            Ok(Some(workload)) => workload,
            Ok(None) => return Ok(None),
            Err(e) if e.is_transient() => {
                return Err(Verdict::Failed {
                    reason: format!("cannot check min_healthy_replicas: {e}"),
                    transient: true,
                })
            }
            Err(e) => {
                return Err(Verdict::Guarded(
                    Refusal::MinHealthyReplicas,
                    format!("cannot tell the workload's healthy replicas: {e}"),
                ))
            }
        };
        let healthy = workload::is_healthy(found);
        match self.control.reserve_replica(&workload, healthy, min).await {
            Ok(reservation) => Ok(Some(reservation)),
            Err(Ok(why)) => Err(Verdict::Guarded(Refusal::MinHealthyReplicas, why)),
            // The shared record cannot be used: not now (fail closed,
            // tried again with JetStream).
            Err(Err(e)) => Err(Verdict::Failed {
                reason: format!("cannot check min_healthy_replicas: {e}"),
                transient: true,
            }),
        }
    }
}

/// The decision about an alert, before any verdict: what the alert says.
fn decision_for(
    alert: &Alert,
    pod: Option<&PodRef>,
    rule: Option<&PolicyRule>,
    subject: &str,
    dry_run: bool,
) -> Decision {
    Decision {
        policy_rule: rule.map(|r| r.name.clone()),
        rule: Some(alert.rule.clone()),
        priority: Some(alert.priority),
        namespace: pod.map(|p| p.namespace.clone()),
        pod: pod.map(|p| p.name.clone()),
        pod_uid: pod.and_then(|p| p.uid.clone()),
        hostname: Some(alert.hostname.clone()).filter(|h| !h.is_empty()),
        alert_time: Some(alert.time.clone()).filter(|t| !t.is_empty()),
        dry_run: dry_run || rule.is_some_and(|r| r.dry_run),
        ..Decision::new(Action::None, subject)
    }
}

fn describe(action: &ActionSpec) -> String {
    let labels = |l: &std::collections::BTreeMap<String, String>| {
        l.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    match action {
        ActionSpec::DeletePod {
            grace_period_seconds,
        } => {
            format!("delete the pod (grace period {grace_period_seconds}s)")
        }
        ActionSpec::LabelPod { labels: l } => format!("label the pod {}", labels(l)),
        ActionSpec::IsolatePod { labels: l } => {
            format!(
                "isolate the pod: label {} under a deny-all NetworkPolicy",
                labels(l)
            )
        }
        ActionSpec::Log => "log".into(),
    }
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
    result
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
                tracing::error!(error = %e, ?delay, "cannot read the kill switch; not taking alerts until it can be read");
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

/// How far back a durable the responder makes starts.
const DURABLE_LOOKBACK: Duration = Duration::from_secs(600);

/// Where a durable the responder makes starts: [`DURABLE_LOOKBACK`] ago
/// (or at the stream's start if the clock cannot say).
fn lookback_start() -> consumer::DeliverPolicy {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(DURABLE_LOOKBACK);
    match async_nats::datetime::from_nanos(since_epoch.as_nanos() as i128) {
        Ok(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
        Err(_) => consumer::DeliverPolicy::All,
    }
}

/// How often the durable consumer's settings are checked.
const CONSUMER_CHECK: Duration = Duration::from_secs(10);

/// The durable consumer's settings, as the responder makes it.
fn durable_config(params: &DurableParams) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(params.durable.clone()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: params.ack_wait,
        max_deliver: i64::from(params.max_deliver),
        // A durable made (or made again, after someone deleted it) starts
        // at the alerts of the last minutes, not at the stream's first
        // (days of old alerts acted on anew).
        deliver_policy: lookback_start(),
        // The whole stream unless a narrower subject is asked for.
        filter_subject: match params.subject.as_str() {
            "" | ">" | "falco.>" => String::new(),
            s => s.to_owned(),
        },
        ..Default::default()
    }
}

/// Which of the settings that decide what the responder sees and when
/// differ from `expected`: the filter, the acknowledgement policy and wait,
/// the deliveries, the rate, the sampling, the headers-only switch.
fn tampered(found: &consumer::Config, expected: &consumer::pull::Config) -> Option<&'static str> {
    let filters = |one: &str, many: &[String]| -> Vec<String> {
        let mut all: Vec<String> = many.to_vec();
        if !one.is_empty() {
            all.push(one.to_owned());
        }
        all.sort();
        all
    };
    let expected_filters = filters(&expected.filter_subject, &expected.filter_subjects);
    let found_filters = filters(&found.filter_subject, &found.filter_subjects);
    if expected_filters != found_filters {
        return Some("filter");
    }
    if found.ack_policy != expected.ack_policy {
        return Some("ack policy");
    }
    if found.ack_wait != expected.ack_wait {
        return Some("ack wait");
    }
    if found.max_deliver != expected.max_deliver {
        return Some("max deliver");
    }
    if found.headers_only {
        return Some("headers-only switch");
    }
    if found.rate_limit != 0 {
        return Some("rate limit");
    }
    if found.sample_frequency != 0 {
        return Some("sampling");
    }
    None
}

/// Why the durable consumer is not there yet (retried).
#[derive(Debug, thiserror::Error)]
enum ConsumerError {
    #[error("cannot set the durable consumer back: {0}")]
    Restore(String),
    #[error("cannot find the stream")]
    Stream(#[source] jetstream::context::GetStreamError),
    #[error("cannot find or create the consumer")]
    Consumer(#[source] jetstream::stream::ConsumerError),
}

/// The durable consumer's settings.
struct DurableParams {
    stream: String,
    durable: String,
    subject: String,
    ack_wait: Duration,
    max_deliver: u32,
}

/// Takes alerts off NATS and hands them to the responder, a bounded number
/// at a time, until shutdown; then finishes those in hand until the deadline.
struct Consume<'a> {
    client: &'a async_nats::Client,
    responder: &'a Responder,
    /// The results' subject prefix: alerts there are the responder's own.
    results: String,
    concurrency: usize,
    subscribed: &'a ReadyFlag,
    shutdown: &'a CancellationToken,
    deadline: &'a CancellationToken,
}

impl Consume<'_> {
    async fn run(&self, subscription: Subscription) -> Result<(), RespondError> {
        match subscription {
            Subscription::Core { subject, queue } => self.core(subject, queue).await,
            Subscription::JetStream {
                stream,
                durable,
                subject,
                ack_wait,
                max_deliver,
            } => {
                let params = DurableParams {
                    stream,
                    durable,
                    subject,
                    ack_wait,
                    max_deliver: max_deliver.max(1),
                };
                self.jetstream(&params).await
            }
        }
    }

    async fn core(&self, subject: String, queue: String) -> Result<(), RespondError> {
        let mut sub = self
            .client
            .queue_subscribe(subject.clone(), queue.clone())
            .await
            .map_err(|source| RespondError::Subscribe {
                subject: subject.clone(),
                source,
            })?;
        // Ready only once the server has the subscription.
        match crate::nats::round_trip(self.client).await {
            Ok(()) => self.subscribed.set(true),
            Err(e) => tracing::warn!(error = %e, "cannot confirm the subscription yet"),
        }
        tracing::info!(%subject, %queue, "responding to alerts (core NATS, queue group)");
        let mut inflight = FuturesUnordered::new();
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(()) = inflight.next(), if !inflight.is_empty() => {}
                message = sub.next(), if inflight.len() < self.concurrency => {
                    let Some(message) = message else { break };
                    if is_under(message.subject.as_str(), &self.results) {
                        continue;
                    }
                    inflight.push(async move {
                        self.responder
                            .handle(
                                message.subject.as_str(),
                                &message.payload,
                                message.headers.as_ref(),
                                Delivery::ONLY,
                            )
                            .await;
                    });
                }
            }
        }
        self.subscribed.set(false);
        self.finish(inflight).await;
        Ok(())
    }

    async fn jetstream(&self, params: &DurableParams) -> Result<(), RespondError> {
        let mut inflight = FuturesUnordered::new();
        'consumer: loop {
            let Some(consumer) = self.durable_consumer(params).await else {
                break;
            };
            // Pull no more than can be handled at once: an alert waiting in
            // a buffer past the ack wait would be delivered twice.
            // Short pulls with heartbeats: a consumer deleted under us (which
            // older servers do not announce) shows as missed heartbeats.
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(self.concurrency)
                .expires(Duration::from_secs(10))
                .heartbeat(Duration::from_secs(2))
                .messages()
                .await
            {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read from the durable consumer; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'consumer,
                        _ = self.shutdown.cancelled() => break 'consumer,
                    }
                }
            };
            self.subscribed.set(true);
            let expected = durable_config(params);
            let mut check = tokio::time::interval(CONSUMER_CHECK);
            check.reset();
            loop {
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => break 'consumer,
                    Some(()) = inflight.next(), if !inflight.is_empty() => {}
                    _ = check.tick() => {
                        let mut consumer = consumer.clone();
                        if let Ok(info) = consumer.info().await {
                            if let Some(changed) = tampered(&info.config, &expected) {
                                tracing::error!(durable = %params.durable, changed, "the durable consumer's settings were changed under the responder");
                                self.subscribed.set(false);
                                continue 'consumer;
                            }
                        }
                    }
                    next = messages.next(), if inflight.len() < self.concurrency => match next {
                        Some(Ok(message)) => inflight.push(self.settle(message, params)),
                        Some(Err(e)) if matches!(
                            e.kind(),
                            consumer::pull::MessagesErrorKind::ConsumerDeleted
                                | consumer::pull::MessagesErrorKind::MissingHeartbeat
                                | consumer::pull::MessagesErrorKind::RequestLimitExceeded
                        ) => {
                            tracing::warn!(error = %e, durable = %params.durable, "the durable consumer is gone or silent; finding or recreating it");
                            self.subscribed.set(false);
                            continue 'consumer;
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "JetStream consumer error"),
                        None => {
                            tracing::warn!(durable = %params.durable, "the durable consumer's messages ended; recreating it");
                            self.subscribed.set(false);
                            continue 'consumer;
                        }
                    }
                }
            }
        }
        self.subscribed.set(false);
        self.finish(inflight).await;
        Ok(())
    }

    /// Handles one JetStream message and settles it: acknowledged (and the
    /// acknowledgement confirmed) once done, handed back after a transient
    /// failure, terminated after the last. While it is handled, JetStream
    /// is told so, so the ack wait does not run out under it.
    async fn settle(&self, message: jetstream::Message, params: &DurableParams) {
        let attempt = message
            .info()
            .map(|i| u32::try_from(i.delivered).unwrap_or(1))
            .unwrap_or(1)
            .max(1);
        let delivery = Delivery {
            attempt,
            last: attempt >= params.max_deliver,
        };
        let settle = if is_under(message.subject.as_str(), &self.results) {
            Settle::Ack
        } else {
            let work = self.responder.handle(
                message.subject.as_str(),
                &message.payload,
                message.headers.as_ref(),
                delivery,
            );
            tokio::pin!(work);
            let every = (params.ack_wait / 3).max(Duration::from_millis(100));
            let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    settle = &mut work => break settle,
                    _ = progress.tick() => {
                        if let Err(e) = message.ack_with(AckKind::Progress).await {
                            tracing::debug!(error = %e, "cannot extend the ack wait");
                        }
                    }
                }
            }
        };
        let result = match settle {
            Settle::Ack => message.double_ack().await,
            Settle::Retry => {
                message
                    .ack_with(AckKind::Nak(Some(retry_delay(attempt))))
                    .await
            }
            Settle::Term => message.ack_with(AckKind::Term).await,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, ?settle, "cannot settle an alert with JetStream; it will be redelivered");
        }
    }

    /// The durable consumer, waiting (with backoff) for the stream to exist;
    /// `None` on shutdown.
    async fn durable_consumer(&self, params: &DurableParams) -> Option<consumer::PullConsumer> {
        let js = jetstream::new(self.client.clone());
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let config = durable_config(params);
        loop {
            let attempt = async {
                let stream = js
                    .get_stream(&params.stream)
                    .await
                    .map_err(ConsumerError::Stream)?;
                let found: consumer::PullConsumer = stream
                    .get_or_create_consumer(&params.durable, config.clone())
                    .await
                    .map_err(ConsumerError::Consumer)?;
                // Whoever may create it may also have changed it (a filter
                // that takes no alert, say): put it back as it must be.
                if let Some(changed) = tampered(&found.cached_info().config, &config) {
                    tracing::error!(durable = %params.durable, changed, "the durable consumer's settings were changed; setting them back");
                    // Where it starts cannot change, and need not.
                    let restore = consumer::pull::Config {
                        deliver_policy: found.cached_info().config.deliver_policy,
                        ..config.clone()
                    };
                    let restored: consumer::PullConsumer = stream
                        .create_consumer(restore)
                        .await
                        .map_err(|e| ConsumerError::Restore(e.to_string()))?;
                    if let Some(still) = tampered(&restored.cached_info().config, &config) {
                        return Err(ConsumerError::Restore(format!(
                            "its {still} stays changed (delete the consumer to have it made again)"
                        )));
                    }
                    return Ok(restored);
                }
                Ok(found)
            };
            match attempt.await {
                Ok(c) => {
                    tracing::info!(
                        stream = %params.stream,
                        durable = %params.durable,
                        "responding to alerts (JetStream durable consumer)"
                    );
                    return Some(c);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(stream = %params.stream, durable = %params.durable, error = %crate::telemetry::logging::chain(&e), ?delay, "JetStream consumer not available; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Lets the alerts in hand finish, until the drain deadline.
    async fn finish<F: std::future::Future<Output = ()>>(&self, mut inflight: FuturesUnordered<F>) {
        if inflight.is_empty() {
            return;
        }
        tracing::info!(in_hand = inflight.len(), "finishing the alerts in hand");
        tokio::select! {
            _ = async { while inflight.next().await.is_some() {} } => {}
            _ = self.deadline.cancelled() => {
                tracing::warn!(in_hand = inflight.len(), "drain timeout: stopped handling alerts in hand (JetStream delivers them again)");
            }
        }
    }
}

/// How long JetStream waits before delivering an alert again after the
/// `attempt`th delivery failed: 0.5 s, doubling, at most 30 s.
pub fn retry_delay(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(6);
    (Duration::from_millis(500) * 2u32.pow(doublings)).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_alerts_are_fresh_within_the_age_and_the_skew() {
        let five = Duration::from_secs(300);
        let now = 1_764_900_000_000;
        assert_eq!(freshness(now, now, five), Ok(()));
        assert_eq!(freshness(now - 300_000, now, five), Ok(()));
        let old = freshness(now - 300_001, now, five).unwrap_err();
        assert_eq!(old, "signed 300.0s ago, more than --max-alert-age 300s");
        assert_eq!(
            freshness(now + 60_000, now, five),
            Ok(()),
            "within the skew"
        );
        let ahead = freshness(now + 60_001, now, five).unwrap_err();
        assert!(ahead.contains("ahead"), "{ahead}");
        assert_eq!(freshness(0, now, Duration::ZERO), Ok(()), "no limit");
        assert!(freshness(u64::MAX, 0, five).is_err());
        assert!(freshness(0, u64::MAX, five).is_err());
    }
    use audit::event_reason;

    /// Each verdict's outcome and reason, and which of them get an Event:
    /// decided in data, without NATS or the Kubernetes API.
    #[test]
    fn verdicts_write_decisions_and_only_acts_and_failures_get_events() {
        let delete = ActionSpec::DeletePod {
            grace_period_seconds: 0,
        };
        let cases = [
            (Verdict::Logged, "done", "logged"),
            (
                Verdict::NoAction(NoAction::NoPod),
                "skipped",
                "no_pod_in_alert",
            ),
            (
                Verdict::Refused(Refusal::RateLimited),
                "skipped",
                "rate_limited",
            ),
            (Verdict::Done, "done", "delete the pod (grace period 0s)"),
            (
                Verdict::DryRun,
                "dry_run",
                "would delete the pod (grace period 0s)",
            ),
            (Verdict::Gone, "gone", "the pod no longer exists"),
            (
                Verdict::Replaced,
                "replaced",
                "the pod was replaced (UID differs); not touched",
            ),
            (
                Verdict::Failed {
                    reason: "boom".into(),
                    transient: true,
                },
                "failed",
                "boom",
            ),
        ];
        let mut with_events = Vec::new();
        for (verdict, outcome, reason) in cases {
            let mut d = Decision::new(Action::DeletePod, "falco.critical.x");
            verdict.write(&mut d, &delete);
            assert_eq!((d.outcome.as_str(), d.reason.as_str()), (outcome, reason));
            if event_reason(d.outcome).is_some() {
                with_events.push(outcome);
            }
        }
        assert_eq!(with_events, ["done", "done", "failed"]);
        let mut dry = Decision::new(Action::Log, "s");
        dry.dry_run = true;
        Verdict::Logged.write(&mut dry, &ActionSpec::Log);
        assert_eq!(dry.outcome, Outcome::DryRun);
        assert_eq!(retry_delay(1), Duration::from_millis(500));
        assert_eq!(retry_delay(3), Duration::from_secs(2));
        assert_eq!(retry_delay(50), Duration::from_secs(30));
    }
}
