//! `falco-nats respond`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::control::{KvArgs, KvArgsError};
use super::nats::NatsArgs;
use super::shared::listen_address;
use crate::respond::control::MAX_ACTIONS_PER_MINUTE;
use crate::respond::guards::Limits;
use crate::respond::policy::{Policy, PolicyError};
use crate::respond::rails::{RailsConfig, DEFAULT_PROTECTED};
use crate::respond::workload::MinHealthy;
use crate::respond::{self, RespondOptions, Subscription, DEFAULT_RESULT_SUBJECT};
use crate::signing::Verifier;

#[derive(Debug, Clone, Args)]
pub struct RespondArgs {
    /// Validate this policy file, report errors with line numbers, and exit
    #[arg(long, env = "FALCO_NATS_CHECK_POLICY", value_name = "POLICY")]
    pub check: Option<PathBuf>,

    #[command(flatten)]
    pub nats: NatsArgs,
    /// Subject to take alerts from (FALCO for the 2018 flat subject)
    #[arg(long, env = "FALCO_NATS_SUBJECT", default_value = "falco.>")]
    pub subject: String,
    /// Queue group shared by the responder's replicas (core NATS)
    #[arg(long, env = "FALCO_NATS_QUEUE", default_value = "falco-nats-respond")]
    pub queue: String,
    /// Consume a JetStream stream with a durable consumer, acknowledging after acting
    #[arg(long, env = "FALCO_NATS_JETSTREAM")]
    pub jetstream: bool,
    /// JetStream stream to consume
    #[arg(long, env = "FALCO_NATS_STREAM", default_value = "FALCO")]
    pub stream: String,
    /// Durable consumer name, shared by the replicas
    #[arg(long, env = "FALCO_NATS_DURABLE", default_value = "falco-nats-respond")]
    pub durable: String,
    /// How long JetStream waits for an acknowledgement before redelivering
    #[arg(long, env = "FALCO_NATS_ACK_WAIT", value_parser = humantime::parse_duration, default_value = "60s")]
    pub ack_wait: Duration,
    /// Deliveries of one alert at most: after a transient failure (the API's
    /// 5xx, a time-out) JetStream delivers it again, until this many
    #[arg(long, env = "FALCO_NATS_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: u32,
    /// Alerts handled at once, at most (and pulled from JetStream at once)
    #[arg(long, env = "FALCO_NATS_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// Longest wait for one Kubernetes API call
    #[arg(long, env = "FALCO_NATS_KUBE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub kube_timeout: Duration,
    /// On SIGTERM, longest time to finish the alerts in hand and publish their results
    #[arg(long, env = "FALCO_NATS_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,

    /// Policy file (YAML); without one: delete the pod on priority >= Critical
    #[arg(long, env = "FALCO_NATS_POLICY")]
    pub policy: Option<PathBuf>,
    /// Decide and report only; write nothing to Kubernetes
    #[arg(long, env = "FALCO_NATS_DRY_RUN")]
    pub dry_run: bool,
    /// Namespaces never acted in, on top of kube-system, kube-public, falco and the responder's own
    #[arg(
        long = "protect-namespace",
        env = "FALCO_NATS_PROTECT_NAMESPACE",
        value_delimiter = ','
    )]
    pub protect_namespace: Vec<String>,
    /// Act only in these namespaces (default: all but the protected ones)
    #[arg(
        long = "only-namespace",
        env = "FALCO_NATS_ONLY_NAMESPACE",
        value_delimiter = ','
    )]
    pub only_namespace: Vec<String>,
    /// The responder's own namespace, protected (the downward API's POD_NAMESPACE)
    #[arg(long, env = "POD_NAMESPACE")]
    pub own_namespace: Option<String>,
    /// Act on pods owned by a DaemonSet too
    #[arg(long, env = "FALCO_NATS_ALLOW_DAEMONSET_PODS")]
    pub allow_daemonset_pods: bool,
    /// Act on static (mirror) pods too
    #[arg(long, env = "FALCO_NATS_ALLOW_STATIC_PODS")]
    pub allow_static_pods: bool,
    /// Never act on pods of a StatefulSet
    #[arg(long, env = "FALCO_NATS_SKIP_STATEFULSET_PODS")]
    pub skip_statefulset_pods: bool,
    /// Never act on pods without a controller (standalone pods)
    #[arg(long, env = "FALCO_NATS_SKIP_STANDALONE_PODS")]
    pub skip_standalone_pods: bool,
    /// Healthy replicas delete-pod leaves the pod's Deployment or
    /// StatefulSet at least: a number or a percentage (a policy rule's
    /// min_healthy_replicas overrides it)
    #[arg(long, env = "FALCO_NATS_MIN_HEALTHY_REPLICAS", default_value = "0")]
    pub min_healthy_replicas: MinHealthy,
    /// Where the guards keep their state: shared (JetStream: one kill
    /// switch and rate limit for every replica) or local (core NATS
    /// without JetStream: a limit per replica, no kill switch)
    #[arg(long, env = "FALCO_NATS_GUARDS", value_parser = ["shared", "local"], default_value = "shared")]
    pub guards: String,
    /// Signed alerts (--verify-key) signed longer ago than this are not
    /// acted on (reason stale); 0 for no limit
    #[arg(long, env = "FALCO_NATS_MAX_ALERT_AGE", value_parser = humantime::parse_duration, default_value = "5m")]
    pub max_alert_age: Duration,
    /// One action per pod, rule and action within this window
    #[arg(long, env = "FALCO_NATS_DEDUP_WINDOW", value_parser = humantime::parse_duration, default_value = "10m")]
    pub dedup_window: Duration,
    /// Destructive actions (delete, isolate) per minute at most, shared by
    /// every replica (counted in the --kv-bucket)
    #[arg(long, env = "FALCO_NATS_MAX_ACTIONS_PER_MINUTE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_ACTIONS_PER_MINUTE)))]
    pub max_actions_per_minute: u32,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Subject prefix of the result messages (<prefix>.<action>)
    #[arg(
        long,
        env = "FALCO_NATS_RESULT_SUBJECT",
        default_value = DEFAULT_RESULT_SUBJECT
    )]
    pub result_subject: String,
    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config, then in-cluster)
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Act only on alerts signed by one of these public NKeys (`bridge
    /// --sign-key`); repeat for a rotation. Others are skipped (bad_signature)
    #[arg(
        long = "verify-key",
        env = "FALCO_NATS_VERIFY_KEY",
        value_name = "PUBLIC_KEY_FILE",
        value_delimiter = ','
    )]
    pub verify_key: Vec<PathBuf>,
    /// Address of /healthz, /readyz and /metrics ("off" to disable)
    #[arg(long, env = "FALCO_NATS_LISTEN", default_value = respond::DEFAULT_LISTEN)]
    pub listen: String,
}

/// Why the responder's flags do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum RespondArgsError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("--verify-key: {0}")]
    VerifyKey(#[from] crate::signing::KeyError),
    #[error(transparent)]
    KvKey(#[from] KvArgsError),
}

impl RespondArgs {
    /// The listen address, or `None` when disabled.
    pub fn listen_address(&self) -> Option<&str> {
        listen_address(&self.listen)
    }

    /// The options, reading the policy file (a bad one is an error with its line).
    pub fn into_options(self) -> Result<RespondOptions, RespondArgsError> {
        let policy = match &self.policy {
            Some(path) => Policy::load(path)?,
            None => Policy::proof_of_concept(),
        };
        let mut protected: std::collections::BTreeSet<String> =
            DEFAULT_PROTECTED.iter().map(|s| s.to_string()).collect();
        protected.extend(
            self.protect_namespace
                .iter()
                .filter(|s| !s.is_empty())
                .cloned(),
        );
        protected.extend(self.own_namespace.iter().filter(|s| !s.is_empty()).cloned());
        let only: std::collections::BTreeSet<String> = self
            .only_namespace
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        Ok(RespondOptions {
            nats: self.nats.into(),
            subscription: if self.jetstream {
                Subscription::JetStream {
                    stream: self.stream,
                    durable: self.durable,
                    subject: self.subject,
                    ack_wait: self.ack_wait,
                    max_deliver: self.max_deliver,
                }
            } else {
                Subscription::Core {
                    subject: self.subject,
                    queue: self.queue,
                }
            },
            policy,
            rails: RailsConfig {
                protected_namespaces: protected,
                only_namespaces: (!only.is_empty()).then_some(only),
                allow_daemonset_pods: self.allow_daemonset_pods,
                allow_static_pods: self.allow_static_pods,
                skip_statefulset_pods: self.skip_statefulset_pods,
                skip_standalone_pods: self.skip_standalone_pods,
                dedup_window: self.dedup_window,
            },
            limits: Limits {
                min_healthy_replicas: self.min_healthy_replicas,
                max_actions_per_minute: self.max_actions_per_minute,
            },
            dry_run: self.dry_run,
            result_prefix: self.result_subject,
            kubeconfig: self.kubeconfig,
            kube_timeout: self.kube_timeout,
            concurrency: self.concurrency,
            drain_timeout: self.drain_timeout,
            control: self.kv.options()?,
            guards: if self.guards == "local" {
                crate::respond::control::Guards::Local
            } else {
                crate::respond::control::Guards::Shared
            },
            max_alert_age: self.max_alert_age,
            verifier: match self.verify_key.as_slice() {
                [] => None,
                keys => Some(Verifier::from_files(keys)?),
            },
        })
    }
}
