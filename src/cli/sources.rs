//! `falco-nats sources`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::nats::NatsArgs;
use super::shared::listen_address;
use crate::sources::{SourcesOptions, DEFAULT_LISTEN};

/// `sources` settings.
#[derive(Debug, Clone, Args)]
pub struct SourcesArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The hub's stream, which sources every node's stream (made when missing)
    #[arg(long, env = "FALCO_NATS_STREAM", default_value = "FALCO_ALL")]
    pub stream: String,
    /// Each node's stream, on its leaf nats-server
    #[arg(long, env = "FALCO_NATS_SOURCE_STREAM", default_value = "FALCO")]
    pub source_stream: String,
    /// Only the nodes this label selector matches (where Falco runs), e.g. falco=true
    #[arg(long, env = "FALCO_NATS_NODE_SELECTOR")]
    pub node_selector: Option<String>,
    /// How long a node is gone before its source is removed
    #[arg(long, env = "FALCO_NATS_REMOVE_AFTER", value_parser = humantime::parse_duration, default_value = "10m")]
    pub remove_after: Duration,
    /// How often the nodes are listed when no watch event says a node came or went
    #[arg(long, env = "FALCO_NATS_RESYNC", value_parser = humantime::parse_duration, default_value = "60s")]
    pub resync: Duration,
    /// Replicas of the hub's stream, when it is made (3 on a clustered hub)
    #[arg(long, env = "FALCO_NATS_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,
    /// Age of the hub stream's alerts, when it is made
    #[arg(long, env = "FALCO_NATS_STREAM_MAX_AGE", value_parser = humantime::parse_duration, default_value = "7d")]
    pub stream_max_age: Duration,
    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config, then in-cluster)
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Longest wait for one Kubernetes or JetStream call
    #[arg(long, env = "FALCO_NATS_KUBE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub kube_timeout: Duration,
    /// Address of /healthz, /readyz and /metrics ("off" to disable)
    #[arg(long, env = "FALCO_NATS_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,
}

impl SourcesArgs {
    /// The listen address, or `None` when disabled.
    pub fn listen_address(&self) -> Option<&str> {
        listen_address(&self.listen)
    }
}

impl From<SourcesArgs> for SourcesOptions {
    fn from(args: SourcesArgs) -> Self {
        SourcesOptions {
            nats: args.nats.into(),
            stream: args.stream,
            source_stream: args.source_stream,
            node_selector: args.node_selector.filter(|s| !s.trim().is_empty()),
            remove_after: args.remove_after,
            resync: args.resync.max(Duration::from_secs(1)),
            replicas: usize::from(args.replicas),
            max_age: args.stream_max_age,
            kubeconfig: args.kubeconfig,
            timeout: args.kube_timeout,
        }
    }
}
