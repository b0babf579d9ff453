//! `falco-nats bridge`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::nats::NatsArgs;
use super::shared::{listen_address, parse_bytes, HttpTokenArgs, TokenError};
use crate::bridge::{self, BridgeOptions, InputOptions, TlsFiles};
use crate::format::Format;
use crate::input::fifo::{FifoOptions, DEFAULT_FIFO, DEFAULT_MAX_LINE};
use crate::input::grpc::{socket_path, GrpcMethod, GrpcOptions, DEFAULT_SOCKET};
use crate::input::http::{HttpOptions, DEFAULT_MAX_BODY};
use crate::input::stdin::StdinOptions;
use crate::input::InputError;
use crate::nats::subject::DEFAULT_SUBJECT;
use crate::nats::{JetStreamOptions, PublishOptions, SubjectTemplate};
use crate::priority::Priority;
use crate::server::{ServerLimits, DEFAULT_MAX_CONNECTIONS};
use crate::signing::{KeyError, Signer};

/// Why the bridge's flags do not make a configuration.
#[derive(Debug, thiserror::Error)]
pub enum BridgeArgsError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("--sign-key: {0}")]
    SignKey(#[from] KeyError),
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

/// Which RPC reads the alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum GrpcMethodArg {
    /// The polled bidirectional stream (Falco's recommended way)
    #[default]
    Sub,
    /// Repeated calls that each drain Falco's queue
    Get,
}

impl From<GrpcMethodArg> for GrpcMethod {
    fn from(a: GrpcMethodArg) -> Self {
        match a {
            GrpcMethodArg::Sub => GrpcMethod::Sub,
            GrpcMethodArg::Get => GrpcMethod::Get,
        }
    }
}

/// What the bridge publishes for each alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum FormatArg {
    /// Falco's JSON line, unchanged
    #[default]
    Falco,
    /// falcosidekick's NATS payload: Falco's fields and a `uuid`
    Falcosidekick,
}

impl From<FormatArg> for Format {
    fn from(a: FormatArg) -> Self {
        match a {
            FormatArg::Falco => Format::Falco,
            FormatArg::Falcosidekick => Format::Falcosidekick,
        }
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
    pub grpc_method: GrpcMethodArg,
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
    pub nats: NatsArgs,

    /// Subject template: {priority}, {rule}, {hostname}, {source}; FALCO for the 2018 flat subject
    #[arg(long, env = "FALCO_NATS_SUBJECT", default_value = DEFAULT_SUBJECT)]
    pub subject: SubjectTemplate,
    /// Drop alerts below this priority (Falco's `priority` setting)
    #[arg(long, env = "FALCO_NATS_MIN_PRIORITY", default_value = "debug")]
    pub min_priority: Priority,
    /// Payload: Falco's JSON line unchanged, or what falcosidekick's NATS
    /// output publishes (Falco's fields and a uuid)
    #[arg(long, env = "FALCO_NATS_FORMAT", value_enum, default_value_t = FormatArg::Falco)]
    pub format: FormatArg,

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

    pub fn into_options(self) -> Result<BridgeOptions, BridgeArgsError> {
        let input = match self.input {
            InputKind::Grpc => InputOptions::Grpc(GrpcOptions {
                socket: socket_path(&self.grpc_socket)?,
                method: self.grpc_method.into(),
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
            nats: self.nats.into(),
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
            format: self.format.into(),
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
