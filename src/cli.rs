//! The command line: subcommands, flags and their environment variables.
//!
//! NATS flags are the `nats` CLI's (`-s/--server` with `NATS_URL`, ...);
//! every other flag reads `FALCO_NATS_<FLAG>` too. The 2018 proof of
//! concept's `-s` (server) and `-f` (pipe) work as they did.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::bridge::{self, BridgeOptions, InputOptions, TlsFiles};
use crate::format::Format;
use crate::input::fifo::{FifoOptions, DEFAULT_FIFO, DEFAULT_MAX_LINE};
use crate::input::grpc::{socket_path, GrpcMethod, GrpcOptions, DEFAULT_SOCKET};
use crate::input::http::{HttpOptions, DEFAULT_MAX_BODY};
use crate::input::stdin::StdinOptions;
use crate::input::InputError;
use crate::nats::subject::DEFAULT_SUBJECT;
use crate::nats::{JetStreamOptions, NatsOptions, PublishOptions, SubjectTemplate};
use crate::priority::Priority;
use crate::respond::control::{self, ControlOptions, MAX_ACTIONS_PER_MINUTE};
use crate::respond::policy::{Policy, PolicyError};
use crate::respond::rails::{RailsConfig, DEFAULT_PROTECTED};
use crate::respond::workload::MinHealthy;
use crate::respond::{self, RespondOptions, Subscription, DEFAULT_RESULT_SUBJECT};
use crate::server::{ServerLimits, DEFAULT_MAX_CONNECTIONS};
use crate::signing::{Signer, Verifier};
use crate::simulate::alerts::FalcoRelease;
use crate::simulate::{SimulateOptions, SimulateOutput};
use crate::tail::{ColorChoice, TailOptions};
use crate::telemetry::logging::LogFormat;
use crate::ui::UiOptions;

/// Carries Falco's alerts onto NATS, and acts on them.
#[derive(Debug, Parser)]
#[command(name = "falco-nats", version, about, propagate_version = true)]
pub struct Cli {
    /// Log line format (levels come from RUST_LOG, default info)
    #[arg(
        long,
        env = "FALCO_NATS_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true
    )]
    pub log_format: LogFormat,
    /// Worker threads of the async runtime (1: a single thread, the fastest on
    /// a node where Falco and NATS need the other cores; 0: one per core)
    #[arg(long, env = "FALCO_NATS_THREADS", default_value_t = 1, global = true)]
    pub threads: usize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read Falco's alerts and publish them to NATS
    Bridge(Box<BridgeArgs>),
    /// Act as a Falco that fires realistic alerts (for demos, tests and benchmarks)
    Simulate(SimulateArgs),
    /// Act on alerts from NATS: delete, label or isolate the offending pod under a policy
    Respond(Box<RespondArgs>),
    /// Print alerts from NATS, one readable line each
    Tail(Box<TailArgs>),
    /// Make a key pair for signed alerts (bridge --sign-key, respond --verify-key)
    Keygen(KeygenArgs),
    /// Serve a live page of alerts and the responders' decisions
    Ui(Box<UiArgs>),
    /// Pull the responders' kill switch: every replica stops destructive actions within a second
    Pause(PauseArgs),
    /// Release the responders' kill switch
    Resume(PauseArgs),
}

/// `ui` settings.
#[derive(Debug, Clone, Args)]
pub struct UiArgs {
    #[command(flatten)]
    pub nats: NatsOptions,
    /// Subject of the alerts (and the decisions) to show
    #[arg(long, env = "FALCO_NATS_SUBJECT", default_value = "falco.>")]
    pub subject: String,
    /// Subject prefix of the responders' decisions
    #[arg(long, env = "FALCO_NATS_RESULT_SUBJECT", default_value = DEFAULT_RESULT_SUBJECT)]
    pub result_subject: String,
    /// JetStream stream to load history from ("off", or a missing stream: live alerts only)
    #[arg(long, env = "FALCO_NATS_STREAM", default_value = "FALCO")]
    pub stream: String,
    /// Messages (alerts and decisions) loaded from the stream and kept, at most
    #[arg(long, env = "FALCO_NATS_UI_HISTORY", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub history: u64,
    /// Messages older than this are not loaded from the stream
    #[arg(long, env = "FALCO_NATS_UI_HISTORY_AGE", value_parser = humantime::parse_duration, default_value = "1h")]
    pub history_age: Duration,
    #[command(flatten)]
    pub http_token: HttpTokenArgs,
    /// Events a page may fall behind by before it is cut off (it reconnects)
    #[arg(long, env = "FALCO_NATS_UI_CLIENT_BUFFER", default_value_t = 1024)]
    pub client_buffer: usize,
    /// Address of the page, /healthz, /readyz and /metrics
    #[arg(long, env = "FALCO_NATS_UI_LISTEN", default_value = crate::ui::DEFAULT_LISTEN)]
    pub listen: String,
}

impl UiArgs {
    pub fn listen_address(&self) -> Option<&str> {
        listen_address(&self.listen)
    }

    pub fn into_options(self) -> Result<UiOptions, InputError> {
        let token = self.http_token.token()?;
        Ok(UiOptions {
            nats: self.nats,
            subject: self.subject,
            result_prefix: self.result_subject,
            stream: Some(self.stream).filter(|s| !matches!(s.trim(), "" | "off" | "none")),
            history: self.history as usize,
            history_age: self.history_age,
            token,
            client_buffer: self.client_buffer,
        })
    }
}

/// The key-value buckets the responders share (kill switch, rate limit).
#[derive(Debug, Clone, Args)]
pub struct KvArgs {
    /// JetStream key-value bucket of the shared rate limit
    #[arg(long, env = "FALCO_NATS_KV_BUCKET", default_value = control::DEFAULT_BUCKET)]
    pub kv_bucket: String,
    /// JetStream key-value bucket of the kill switch (responders only read it)
    #[arg(long, env = "FALCO_NATS_PAUSE_BUCKET", default_value = control::DEFAULT_PAUSE_BUCKET)]
    pub pause_bucket: String,
    /// A file with the secret the responders seal their shared records
    /// with (at least 16 bytes; every replica the same): records written
    /// by anyone else are not believed
    #[arg(long, env = "FALCO_NATS_KV_KEY_FILE")]
    pub kv_key_file: Option<PathBuf>,
    /// Replicas of those buckets when they are created (3 on a clustered JetStream)
    #[arg(long, env = "FALCO_NATS_KV_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub kv_replicas: u8,
}

impl KvArgs {
    pub fn options(&self) -> Result<ControlOptions, InputError> {
        let record_key = match &self.kv_key_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| InputError::Io {
                    what: format!("--kv-key-file {}", path.display()),
                    source,
                })?;
                let key = text.trim().as_bytes().to_vec();
                if key.len() < 16 {
                    return Err(InputError::ShortKvKey {
                        path: path.clone(),
                        len: key.len(),
                    });
                }
                Some(key)
            }
        };
        Ok(ControlOptions {
            bucket: self.kv_bucket.clone(),
            pause_bucket: self.pause_bucket.clone(),
            replicas: usize::from(self.kv_replicas),
            record_key,
        })
    }
}

/// `pause` and `resume`.
#[derive(Debug, Clone, Args)]
pub struct PauseArgs {
    #[command(flatten)]
    pub nats: NatsOptions,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Why (kept with the state, shown by --status and in /readyz)
    #[arg(long, env = "FALCO_NATS_PAUSE_REASON", default_value = "")]
    pub reason: String,
    /// Only print the kill switch's state (exit code 0 running, 3 paused)
    #[arg(long, env = "FALCO_NATS_PAUSE_STATUS")]
    pub status: bool,
}

/// `keygen`: a new NKey seed for the bridge, or the public key of one.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct KeygenArgs {
    /// Write a new seed to this file (mode 0600; never overwritten) and
    /// print its public key
    #[arg(long, env = "FALCO_NATS_KEYGEN_OUT", value_name = "SEED_FILE")]
    pub out: Option<PathBuf>,
    /// Print the public key of the seed in this file
    #[arg(long, env = "FALCO_NATS_KEYGEN_PUBLIC", value_name = "SEED_FILE")]
    pub public: Option<PathBuf>,
}

/// Whether JetStream alerts go out in fast batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FastBatch {
    /// When the stream allows batched publishing
    Auto,
    /// Never: one acknowledgement per alert
    Off,
}

/// Where the bridge reads alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputKind {
    /// Falco's gRPC outputs service (Falco <= 0.43)
    Grpc,
    /// A named pipe that Falco's file_output writes JSON lines into
    Fifo,
    /// POST / on the --listen address: Falco's http_output, falcosidekick's webhook
    Http,
    /// JSON lines on standard input: Falco's program_output
    Stdin,
}

/// A `--listen` value: an address, or `None` for `off` (or empty).
fn listen_address(value: &str) -> Option<&str> {
    match value.trim() {
        "" | "off" | "none" => None,
        addr => Some(addr),
    }
}

#[derive(Debug, Clone, Args)]
pub struct BridgeArgs {
    /// Where alerts come from
    #[arg(long, env = "FALCO_NATS_INPUT", value_enum, default_value = "grpc")]
    pub input: InputKind,

    /// Falco's gRPC socket (Falco's grpc.bind_address)
    #[arg(long, env = "FALCO_NATS_GRPC_SOCKET", default_value = DEFAULT_SOCKET)]
    pub grpc_socket: String,
    /// gRPC method: the polled `sub` stream, or repeated `get` calls
    #[arg(
        long,
        env = "FALCO_NATS_GRPC_METHOD",
        value_enum,
        default_value = "sub"
    )]
    pub grpc_method: GrpcMethod,
    /// How often to poll Falco while it is quiet (fast while alerts flow)
    #[arg(long, env = "FALCO_NATS_GRPC_POLL_INTERVAL", value_parser = humantime::parse_duration, default_value = "10ms")]
    pub grpc_poll_interval: Duration,
    /// Longest wait between reconnects to Falco
    #[arg(long, env = "FALCO_NATS_RECONNECT_MAX", value_parser = humantime::parse_duration, default_value = "10s")]
    pub reconnect_max: Duration,

    /// The FIFO Falco's file_output writes to
    #[arg(short = 'f', long, env = "FALCO_NATS_FIFO", default_value = DEFAULT_FIFO)]
    pub fifo: PathBuf,
    /// Create the FIFO if it does not exist
    #[arg(long, env = "FALCO_NATS_CREATE_FIFO")]
    pub create_fifo: bool,
    /// Longest accepted alert line in bytes (FIFO, stdin); longer ones are rejected and logged
    #[arg(long, env = "FALCO_NATS_MAX_LINE", default_value_t = DEFAULT_MAX_LINE)]
    pub max_line: usize,

    /// Largest accepted HTTP body in bytes (--input http); larger ones get 413
    #[arg(long, env = "FALCO_NATS_MAX_BODY", default_value_t = DEFAULT_MAX_BODY)]
    pub max_body: usize,
    #[command(flatten)]
    pub http_token: HttpTokenArgs,
    /// TLS certificate chain (PEM) for the --listen address
    #[arg(long, env = "FALCO_NATS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the --listen address
    #[arg(long, env = "FALCO_NATS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Longest time for a request's headers (and a TLS handshake) on the
    /// --listen address; also how long a keep-alive connection may idle
    #[arg(long, env = "FALCO_NATS_HTTP_HEADER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub http_header_timeout: Duration,
    /// Longest time for a POST's body once its headers are in (then 408)
    #[arg(long, env = "FALCO_NATS_HTTP_BODY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub http_body_timeout: Duration,
    /// Connections served at once on the --listen address; more are closed
    /// when accepted (Falco holds one per node)
    #[arg(long, env = "FALCO_NATS_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// CA certificates (PEM) that sign HTTP senders' client certificates:
    /// POST / then needs one (Falco's http_output.mtls); the probes do not
    #[arg(long, env = "FALCO_NATS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    #[command(flatten)]
    pub nats: NatsOptions,

    /// Subject template: {priority}, {rule}, {hostname}, {source}; FALCO for the 2018 flat subject
    #[arg(long, env = "FALCO_NATS_SUBJECT", default_value = DEFAULT_SUBJECT)]
    pub subject: SubjectTemplate,
    /// Drop alerts below this priority (Falco's `priority` setting)
    #[arg(long, env = "FALCO_NATS_MIN_PRIORITY", default_value = "debug")]
    pub min_priority: Priority,
    /// Payload: Falco's JSON line unchanged, or what falcosidekick's NATS
    /// output publishes (Falco's fields and a uuid)
    #[arg(long, env = "FALCO_NATS_FORMAT", value_enum, default_value_t = Format::Falco)]
    pub format: Format,

    /// Publish to JetStream, acknowledged and retried until stored
    #[arg(long, env = "FALCO_NATS_JETSTREAM")]
    pub jetstream: bool,
    /// JetStream stream, created over the subject template's subjects if missing
    #[arg(long, env = "FALCO_NATS_STREAM", default_value = "FALCO")]
    pub stream: String,
    /// JetStream duplicate window (drops re-published alerts within it)
    #[arg(long, env = "FALCO_NATS_DUPLICATE_WINDOW", value_parser = humantime::parse_duration, default_value = "2m")]
    pub duplicate_window: Duration,
    /// Age limit of a stream the bridge creates (0s: unlimited)
    #[arg(long, env = "FALCO_NATS_STREAM_MAX_AGE", value_parser = humantime::parse_duration, default_value = "7days")]
    pub stream_max_age: Duration,
    /// Size limit of a stream the bridge creates, in bytes with an
    /// optional K, M, G or T (powers of 1024); the oldest alerts go first
    /// (0: unlimited)
    #[arg(long, env = "FALCO_NATS_STREAM_MAX_BYTES", value_parser = parse_bytes, default_value = "0")]
    pub stream_max_bytes: u64,
    /// JetStream publishes awaiting acknowledgement at most
    #[arg(long, env = "FALCO_NATS_MAX_INFLIGHT", default_value_t = 256)]
    pub max_inflight: usize,
    /// Replicas of the stream the bridge creates (a clustered JetStream);
    /// an existing stream must then have as many
    #[arg(long, env = "FALCO_NATS_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: Option<u8>,
    /// JetStream fast batch publishing (nats-server 2.14+, `allow_batched`):
    /// "auto" uses it when the stream allows it, "off" acknowledges each alert
    #[arg(long, env = "FALCO_NATS_FAST_BATCH", value_enum, default_value_t = FastBatch::Auto)]
    pub fast_batch: FastBatch,
    /// Sign every alert with this NKey seed (Ed25519, over subject and
    /// payload) for `respond --verify-key`; the payload is unchanged
    #[arg(long, env = "FALCO_NATS_SIGN_KEY", value_name = "SEED_FILE")]
    pub sign_key: Option<PathBuf>,

    /// Alerts held between input and NATS at most (then the input waits)
    #[arg(long, env = "FALCO_NATS_QUEUE_SIZE", default_value_t = 1024)]
    pub queue_size: usize,
    /// On SIGTERM, longest time to publish what was already read
    #[arg(long, env = "FALCO_NATS_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "20s")]
    pub drain_timeout: Duration,
    /// Address of /healthz, /readyz and /metrics ("off" to disable)
    #[arg(long, env = "FALCO_NATS_LISTEN", default_value = bridge::DEFAULT_LISTEN)]
    pub listen: String,
}

impl BridgeArgs {
    /// The listen address, or `None` when disabled.
    pub fn listen_address(&self) -> Option<&str> {
        listen_address(&self.listen)
    }

    pub fn into_options(self) -> Result<BridgeOptions, InputError> {
        let input = match self.input {
            InputKind::Grpc => InputOptions::Grpc(GrpcOptions {
                socket: socket_path(&self.grpc_socket)?,
                method: self.grpc_method,
                poll_interval: self.grpc_poll_interval,
                reconnect_max: self.reconnect_max,
            }),
            InputKind::Fifo => InputOptions::Fifo(FifoOptions {
                path: self.fifo,
                create: self.create_fifo,
                max_line: self.max_line,
            }),
            InputKind::Http => InputOptions::Http(HttpOptions {
                max_body: self.max_body,
                token: self.http_token.token()?,
                client_certificate: self.tls_client_ca.is_some(),
                body_timeout: self.http_body_timeout,
            }),
            InputKind::Stdin => InputOptions::Stdin(StdinOptions {
                max_line: self.max_line,
            }),
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            _ => None,
        };
        Ok(BridgeOptions {
            input,
            nats: self.nats,
            publish: PublishOptions {
                subject: self.subject,
                jetstream: self.jetstream.then_some(JetStreamOptions {
                    stream: self.stream,
                    duplicate_window: self.duplicate_window,
                    max_age: self.stream_max_age,
                    max_bytes: self.stream_max_bytes,
                    max_inflight: self.max_inflight,
                    replicas: self.replicas.map(usize::from),
                    fast_batch: self.fast_batch == FastBatch::Auto,
                }),
                signer: match &self.sign_key {
                    Some(path) => Some(std::sync::Arc::new(Signer::from_file(path)?)),
                    None => None,
                },
            },
            min_priority: self.min_priority,
            format: self.format,
            queue_size: self.queue_size,
            drain_timeout: self.drain_timeout,
            tls,
            server: ServerLimits {
                header_timeout: self.http_header_timeout,
                max_connections: self.max_connections.max(1),
                ..ServerLimits::default()
            },
        })
    }
}

/// The bearer token HTTP clients must present: the bridge's HTTP input
/// (`--input http`), the ui's page and its events.
#[derive(Debug, Clone, Args)]
pub struct HttpTokenArgs {
    /// Bearer token HTTP clients must present: senders to the bridge's
    /// --input http (Falco's own http_output cannot send one: use TLS
    /// client certificates there), the ui's page (opened as /?token=...)
    #[arg(long, env = "FALCO_NATS_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// File holding that token (a mounted Secret)
    #[arg(
        long,
        env = "FALCO_NATS_HTTP_TOKEN_FILE",
        conflicts_with = "http_token"
    )]
    pub http_token_file: Option<PathBuf>,
}

impl HttpTokenArgs {
    /// The token, from the flag or the file. An empty one is an error: it
    /// must not silently turn authentication off.
    pub fn token(&self) -> Result<Option<String>, InputError> {
        http_token(self.http_token.clone(), self.http_token_file.as_deref())
    }
}

fn http_token(
    flag: Option<String>,
    file: Option<&std::path::Path>,
) -> Result<Option<String>, InputError> {
    let token = match (flag, file) {
        (Some(token), _) => Some((token, "--http-token (FALCO_NATS_HTTP_TOKEN)")),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|source| InputError::Io {
                what: path.display().to_string(),
                source,
            })?;
            let token = text.trim_end_matches(['\r', '\n']).to_owned();
            Some((token, "the --http-token-file"))
        }
        (None, None) => None,
    };
    match token {
        Some((t, what)) if t.is_empty() => Err(InputError::EmptyToken(what)),
        Some((t, _)) => Ok(Some(t)),
        None => Ok(None),
    }
}

#[derive(Debug, Clone, Args)]
pub struct RespondArgs {
    /// Validate this policy file, report errors with line numbers, and exit
    #[arg(long, env = "FALCO_NATS_CHECK_POLICY", value_name = "POLICY")]
    pub check: Option<PathBuf>,

    #[command(flatten)]
    pub nats: NatsOptions,
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
    KvKey(#[from] InputError),
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
            nats: self.nats,
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
                min_healthy_replicas: self.min_healthy_replicas,
                dedup_window: self.dedup_window,
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

/// `tail` settings.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub nats: NatsOptions,
    /// Subject to subscribe to
    #[arg(long, env = "FALCO_NATS_SUBJECT", default_value = "falco.>")]
    pub subject: String,
    /// Print the raw JSON of each alert
    #[arg(long, env = "FALCO_NATS_TAIL_JSON")]
    pub json: bool,
    /// Print only alerts at or above this priority
    #[arg(long, env = "FALCO_NATS_MIN_PRIORITY", default_value = "debug")]
    pub min_priority: Priority,
    /// Colour the priority
    #[arg(long, env = "FALCO_NATS_COLOR", value_enum, default_value_t)]
    pub color: ColorChoice,
    /// Exit after this many alerts (0: never)
    #[arg(long, env = "FALCO_NATS_TAIL_COUNT", default_value_t = 0)]
    pub count: u64,
    /// Subject prefix of the responder's results: only messages there are
    /// printed as decisions
    #[arg(
        long,
        env = "FALCO_NATS_RESULT_SUBJECT",
        default_value = DEFAULT_RESULT_SUBJECT
    )]
    pub result_subject: String,
    /// Address of /healthz, /readyz and /metrics (the NATS connection's
    /// state); off unless given
    #[arg(long, env = "FALCO_NATS_TAIL_LISTEN", default_value = "off")]
    pub listen: String,
}

impl TailArgs {
    /// The listen address, or `None` when disabled.
    pub fn listen_address(&self) -> Option<&str> {
        listen_address(&self.listen)
    }
}

impl From<TailArgs> for TailOptions {
    fn from(a: TailArgs) -> Self {
        TailOptions {
            nats: a.nats,
            subject: a.subject,
            json: a.json,
            min_priority: a.min_priority,
            color: a.color,
            count: a.count,
            result_subject: a.result_subject,
        }
    }
}

/// Where the simulated Falco sends alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SimulateKind {
    /// Serve Falco's gRPC outputs API on a Unix socket
    Grpc,
    /// Write JSON lines into a FIFO, like Falco's file_output
    Fifo,
    /// Post each alert to --url, like Falco's http_output
    Http,
}

#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// How the simulated Falco delivers alerts
    #[arg(
        long,
        env = "FALCO_NATS_SIMULATE_OUTPUT",
        value_enum,
        default_value = "grpc"
    )]
    pub output: SimulateKind,
    /// Unix socket to serve the gRPC API on
    #[arg(long, env = "FALCO_NATS_GRPC_SOCKET", default_value = DEFAULT_SOCKET)]
    pub grpc_socket: String,
    /// FIFO to write to (created if missing)
    #[arg(short = 'f', long, env = "FALCO_NATS_FIFO", default_value = DEFAULT_FIFO)]
    pub fifo: PathBuf,
    /// Where to post alerts with --output http (Falco's http_output.url)
    #[arg(
        long,
        env = "FALCO_NATS_SIMULATE_URL",
        default_value = "http://127.0.0.1:2810/"
    )]
    pub url: hyper::Uri,
    /// Alerts per second (0: as fast as possible)
    #[arg(long, env = "FALCO_NATS_SIMULATE_RATE", default_value_t = 10.0)]
    pub rate: f64,
    /// Alerts in all (0: no end)
    #[arg(long, env = "FALCO_NATS_SIMULATE_COUNT", default_value_t = 0)]
    pub count: u64,
    /// Falco's json_output: gRPC `output` carries the JSON line
    #[arg(long, env = "FALCO_NATS_SIMULATE_JSON_OUTPUT", action = clap::ArgAction::Set, default_value_t = false)]
    pub json_output: bool,
    /// Hostname in the alerts
    #[arg(
        long,
        env = "FALCO_NATS_SIMULATE_HOSTNAME",
        default_value = "falco-simulated"
    )]
    pub hostname: String,
    /// Also serve a Kubernetes API stand-in holding the simulated pods on this address
    #[arg(
        long,
        env = "FALCO_NATS_SIMULATE_KUBE_API",
        requires = "kubeconfig_out"
    )]
    pub kube_api: Option<String>,
    /// Where to write a kubeconfig for the stand-in (for `respond --kubeconfig`)
    #[arg(
        long,
        env = "FALCO_NATS_SIMULATE_KUBECONFIG_OUT",
        requires = "kube_api"
    )]
    pub kubeconfig_out: Option<PathBuf>,
    /// End every command line and file name with what a hostile container
    /// writes (terminal escapes, CR LF, DEL, C1, invalid UTF-8), as this Falco
    /// release puts it in an alert: 0.44 or 0.45
    #[arg(long, env = "FALCO_NATS_SIMULATE_HOSTILE_STRINGS", value_name = "FALCO_RELEASE", value_parser = parse_falco_release)]
    pub hostile_strings: Option<FalcoRelease>,
}

/// `0.44` or `0.45`: the Falco releases whose rendering of untrusted
/// strings the simulator knows.
fn parse_falco_release(text: &str) -> Result<FalcoRelease, String> {
    match text {
        "0.44" => Ok(FalcoRelease::V044),
        "0.45" => Ok(FalcoRelease::V045),
        other => Err(format!(
            "{other:?}: the simulator knows Falco 0.44 and 0.45"
        )),
    }
}

impl SimulateArgs {
    pub fn into_options(self) -> Result<SimulateOptions, InputError> {
        let output = match self.output {
            SimulateKind::Grpc => SimulateOutput::Grpc {
                socket: socket_path(&self.grpc_socket)?,
            },
            SimulateKind::Fifo => SimulateOutput::Fifo { path: self.fifo },
            SimulateKind::Http => SimulateOutput::Http { url: self.url },
        };
        Ok(SimulateOptions {
            output,
            rate: self.rate.max(0.0),
            count: self.count,
            json_output: self.json_output,
            hostile_strings: self.hostile_strings,
            hostname: self.hostname,
            kube_api: self.kube_api.zip(self.kubeconfig_out),
        })
    }
}

/// A size: digits, then an optional K, M, G or T (with or without `i` and
/// `B`: powers of 1024).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 4G, 512M, 1048576)"))?;
    let shift = match unit
        .trim()
        .trim_end_matches(['B', 'b'])
        .trim_end_matches('i')
    {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("{text:?}: unknown unit (K, M, G or T)")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("4G"), Ok(4 << 30));
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("1048576"), Ok(1_048_576));
        for bad in ["", "G", "4X", "-1", "99999999999T"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn proof_of_concept_flags_work() {
        let cli = Cli::try_parse_from([
            "falco-nats",
            "bridge",
            "--input",
            "fifo",
            "-s",
            "nats://nats:4222",
            "-f",
            "/tmp/nats-pipe",
        ])
        .unwrap();
        let Command::Bridge(args) = cli.command else {
            panic!("not bridge")
        };
        let args = *args;
        assert_eq!(args.nats.server, "nats://nats:4222");
        let opts = args.into_options().unwrap();
        match opts.input {
            InputOptions::Fifo(f) => assert_eq!(f.path, PathBuf::from("/tmp/nats-pipe")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_are_documented_ones() {
        let cli = Cli::try_parse_from(["falco-nats", "bridge"]).unwrap();
        let Command::Bridge(args) = cli.command else {
            panic!("not bridge")
        };
        let args = *args;
        assert_eq!(args.input, InputKind::Grpc);
        assert_eq!(args.listen_address(), Some("0.0.0.0:2810"));
        assert_eq!(args.subject.to_string(), "falco.{priority}.{rule}");
        let opts = args.into_options().unwrap();
        assert!(opts.publish.jetstream.is_none());
        assert_eq!(opts.min_priority, Priority::Debug);
    }

    /// Issue 9, item 5: an empty token refuses to start instead of turning
    /// authentication off; a token file works.
    #[test]
    fn http_tokens_and_secrets() {
        let parse = |args: &[&str]| {
            let mut all = vec!["falco-nats", "bridge", "--input", "http"];
            all.extend_from_slice(args);
            let Command::Bridge(args) = Cli::try_parse_from(all).unwrap().command else {
                panic!("not bridge")
            };
            (*args).into_options()
        };
        let err = parse(&["--http-token", ""]).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let opts = parse(&["--http-token-file", file.to_str().unwrap()]).unwrap();
        match opts.input {
            InputOptions::Http(h) => assert_eq!(h.token.as_deref(), Some("s3cret")),
            other => panic!("{other:?}"),
        }
        std::fs::write(&file, "\n").unwrap();
        assert!(parse(&["--http-token-file", file.to_str().unwrap()]).is_err());
        assert!(Cli::try_parse_from([
            "falco-nats",
            "bridge",
            "--http-token",
            "a",
            "--http-token-file",
            "b"
        ])
        .is_err());
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let err =
            Cli::try_parse_from(["falco-nats", "bridge", "--min-priority", "severe"]).unwrap_err();
        assert!(err.to_string().contains("unknown Falco priority"), "{err}");
        let err =
            Cli::try_parse_from(["falco-nats", "bridge", "--subject", "falco.{nope}"]).unwrap_err();
        assert!(err.to_string().contains("unknown placeholder"), "{err}");
    }
}
