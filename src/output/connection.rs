//! Connecting to NATS with the `nats` CLI's flags and environment variables.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::{Client, ConnectOptions, Event, ServerAddr, ServerError};
use clap::Args;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::output::ledger::DeliveryLedger;
use crate::telemetry::health::ReadyFlag;

/// Where and how to connect, named as the `nats` CLI names them.
#[derive(Debug, Clone, Args)]
pub struct NatsOptions {
    /// NATS server URLs, comma separated
    #[arg(
        short = 's',
        long = "server",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub server: String,
    /// User credentials file (JWT and NKey seed)
    #[arg(long, env = "NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// User NKey seed file
    #[arg(long, env = "NATS_NKEY")]
    pub nkey: Option<PathBuf>,
    /// Username
    #[arg(long, env = "NATS_USER")]
    pub user: Option<String>,
    /// Password
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Authentication token
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// TLS client certificate file
    #[arg(long, env = "NATS_CERT")]
    pub tlscert: Option<PathBuf>,
    /// TLS client private key file
    #[arg(long, env = "NATS_KEY")]
    pub tlskey: Option<PathBuf>,
    /// TLS certificate authority chain file
    #[arg(long, env = "NATS_CA")]
    pub tlsca: Option<PathBuf>,
    /// Name of the connection, as the server's monitoring shows it
    #[arg(
        long = "connection-name",
        env = "NATS_CONNECTION_NAME",
        default_value = "falco-nats"
    )]
    pub connection_name: String,
}

/// A NATS set-up error: bad flags or unreadable credentials.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("invalid NATS server URL {url:?}: {source}")]
    BadUrl {
        url: String,
        source: async_nats::Error,
    },
    #[error("cannot read {what} file {path:?}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--tlscert and --tlskey go together")]
    HalfClientCert,
    #[error("--user needs --password")]
    UserWithoutPassword,
    #[error("cannot connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
}

/// What a connection reports to: a readiness check, metrics, and the
/// subjects the server refused.
#[derive(Clone, Default)]
pub struct ConnectionWatch {
    pub ready: ReadyFlag,
    pub connected: Gauge,
    pub reconnects: Counter,
    /// Publishes the server refused for lack of permission.
    pub permission_denied: Counter,
    pub denied: DeniedSubjects,
    /// Core NATS: counts what a dropped connection may have lost.
    pub ledger: DeliveryLedger,
}

/// Subjects the server refused to let this connection publish to.
#[derive(Clone, Default, Debug)]
pub struct DeniedSubjects(Arc<Mutex<HashSet<String>>>);

impl DeniedSubjects {
    pub fn contains(&self, subject: &str) -> bool {
        self.0.lock().map(|s| s.contains(subject)).unwrap_or(false)
    }

    /// Records a refused subject; `true` the first time.
    fn insert(&self, subject: &str) -> bool {
        self.0
            .lock()
            .map(|mut s| s.insert(subject.to_owned()))
            .unwrap_or(false)
    }
}

/// The subject of a server's "Permissions Violation for Publish to X" error.
fn denied_publish_subject(message: &str) -> Option<&str> {
    let lower = message.to_ascii_lowercase();
    let at = lower.find("permissions violation for publish to")?;
    let rest = &message[at + "permissions violation for publish to".len()..];
    Some(
        rest.trim()
            .trim_matches(|c| c == '"' || c == '\'' || c == ' '),
    )
}

impl NatsOptions {
    /// The options for `server`, with defaults everywhere else (for tests and tools).
    pub fn for_server(server: impl Into<String>) -> Self {
        NatsOptions {
            server: server.into(),
            creds: None,
            nkey: None,
            user: None,
            password: None,
            token: None,
            tlscert: None,
            tlskey: None,
            tlsca: None,
            connection_name: "falco-nats".into(),
        }
    }

    fn servers(&self) -> Result<Vec<ServerAddr>, NatsError> {
        self.server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|url| {
                url.parse::<ServerAddr>().map_err(|e| NatsError::BadUrl {
                    url: url.to_owned(),
                    source: e.into(),
                })
            })
            .collect()
    }

    async fn connect_options(&self) -> Result<ConnectOptions, NatsError> {
        let mut opts = ConnectOptions::new();
        if let Some(path) = &self.creds {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|source| NatsError::ReadFile {
                    what: "credentials",
                    path: path.clone(),
                    source,
                })?;
        }
        if let Some(path) = &self.nkey {
            let seed =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| NatsError::ReadFile {
                        what: "NKey seed",
                        path: path.clone(),
                        source,
                    })?;
            opts = opts.nkey(seed.trim().to_owned());
        }
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => {
                opts = opts.user_and_password(user.clone(), password.clone())
            }
            (Some(_), None) => return Err(NatsError::UserWithoutPassword),
            _ => {}
        }
        if let Some(token) = &self.token {
            opts = opts.token(token.clone());
        }
        match (&self.tlscert, &self.tlskey) {
            (Some(cert), Some(key)) => {
                opts = opts
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true)
            }
            (None, None) => {}
            _ => return Err(NatsError::HalfClientCert),
        }
        if let Some(ca) = &self.tlsca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(opts.name(&self.connection_name))
    }
}

/// Opens the one long-lived connection. It returns at once and connects in
/// the background, retrying the first connection and every reconnection
/// forever; `watch` follows the state.
pub async fn connect(options: &NatsOptions, watch: ConnectionWatch) -> Result<Client, NatsError> {
    let servers = options.servers()?;
    let connected_before = Arc::new(AtomicBool::new(false));
    let client = options
        .connect_options()
        .await?
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let watch = watch.clone();
            let connected_before = connected_before.clone();
            async move {
                match event {
                    Event::Connected => {
                        watch.ready.set(true);
                        watch.connected.set(1);
                        tracing::info!("connected to NATS");
                        if connected_before.swap(true, Ordering::Relaxed) {
                            watch.reconnects.inc();
                        }
                    }
                    Event::Disconnected => {
                        watch.ready.set(false);
                        watch.connected.set(0);
                        let at_risk = watch.ledger.disconnected();
                        if at_risk > 0 {
                            tracing::warn!(possibly_lost = at_risk, "disconnected from NATS; reconnecting (alerts published since the server last confirmed may be lost: counted in falco_nats_alerts_possibly_lost_total)");
                        } else {
                            tracing::warn!("disconnected from NATS; reconnecting");
                        }
                    }
                    Event::Closed => {
                        watch.ready.set(false);
                        watch.connected.set(0);
                        tracing::info!("NATS connection closed");
                    }
                    // Failed reconnect attempts: the disconnect was logged already.
                    Event::ClientError(e) => tracing::debug!(error = %e, "NATS client error"),
                    Event::ServerError(ServerError::Other(message)) => {
                        match denied_publish_subject(&message) {
                            Some(subject) => {
                                watch.permission_denied.inc();
                                if watch.denied.insert(subject) {
                                    tracing::error!(%subject, "NATS refused a publish: the user has no permission for this subject (check --subject and the user's publish permissions)");
                                }
                            }
                            None => tracing::error!(error = %message, "NATS server error"),
                        }
                    }
                    Event::ServerError(e) => tracing::error!(error = %e, "NATS server error"),
                    other => tracing::warn!(event = %other, "NATS connection event"),
                }
            }
        })
        .connect(servers)
        .await?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_denied_subject() {
        assert_eq!(
            super::denied_publish_subject(
                "Permissions Violation for Publish to \"alerts.critical\""
            ),
            Some("alerts.critical")
        );
        assert_eq!(
            super::denied_publish_subject("Authorization Violation"),
            None
        );
    }
}
