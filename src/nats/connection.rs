//! Connecting to NATS: the `nats` CLI's options (`cli::NatsArgs` reads them from flags
//! and environment variables), the connection's metrics and events.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::{Client, ConnectOptions, Event, ServerAddr, ServerError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::nats::ledger::DeliveryLedger;
use crate::telemetry::health::{Readiness, ReadyFlag};

/// Where and how to connect (the flags: `cli::NatsArgs`).
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// NATS server URLs, comma separated (credentials in a URL are taken out
    /// of it and never printed)
    pub server: String,
    /// User credentials file (JWT and NKey seed)
    pub creds: Option<PathBuf>,
    /// User NKey seed file
    pub nkey: Option<PathBuf>,
    /// Username
    pub user: Option<String>,
    /// Password
    pub password: Option<String>,
    /// File holding the password (a mounted Secret)
    pub password_file: Option<PathBuf>,
    /// Authentication token
    pub token: Option<String>,
    /// File holding the authentication token (a mounted Secret)
    pub token_file: Option<PathBuf>,
    /// TLS client certificate file
    pub tlscert: Option<PathBuf>,
    /// TLS client private key file
    pub tlskey: Option<PathBuf>,
    /// TLS certificate authority chain file
    pub tlsca: Option<PathBuf>,
    /// Prefix of this connection's reply subjects, so a user's permissions
    /// can allow its own inbox only (e.g. _INBOX_bridge)
    pub inbox_prefix: String,
    /// Name of the connection, as the server's monitoring shows it
    pub connection_name: String,
}

/// A NATS set-up error: bad flags or unreadable credentials.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// `url` has any credentials masked.
    #[error("invalid NATS server URL {url:?}: {source}")]
    BadUrl {
        url: String,
        source: async_nats::Error,
    },
    #[error("{what} is empty: give a value, or leave it out")]
    EmptySecret { what: &'static str },
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

/// The connection's state as metrics: the same for every subcommand.
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    /// 1 while connected.
    pub connected: Gauge,
    pub reconnects: Counter,
    /// Publishes the server refused for lack of permission.
    pub permission_denied: Counter,
}

impl ConnectionMetrics {
    /// Creates the metrics and registers them under `falco_nats_nats_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = ConnectionMetrics::default();
        let r = registry.sub_registry_with_prefix("falco_nats_nats");
        r.register(
            "connected",
            "1 while NATS is connected",
            m.connected.clone(),
        );
        r.register("reconnects", "Reconnects to NATS", m.reconnects.clone());
        r.register(
            "permission_denied",
            "Publishes the NATS server refused for lack of permission",
            m.permission_denied.clone(),
        );
        m
    }
}

/// What a connection reports to: a readiness check, its metrics, and (core
/// NATS publishing) the ledger of what a dropped connection may have lost.
#[derive(Clone, Default)]
pub struct ConnectionWatch {
    pub ready: ReadyFlag,
    pub metrics: ConnectionMetrics,
    pub ledger: DeliveryLedger,
}

impl ConnectionWatch {
    /// A watch with a `nats` readiness check in `readiness` and the
    /// connection's metrics in `registry`: what every subcommand needs.
    pub fn register(readiness: &Readiness, registry: &mut Registry) -> Self {
        ConnectionWatch {
            ready: readiness.check("nats"),
            metrics: ConnectionMetrics::register(registry),
            ledger: DeliveryLedger::default(),
        }
    }
}

/// The one long-lived connection, with what publishing on it needs.
#[derive(Clone)]
pub struct NatsConnection {
    pub client: Client,
    /// Subjects the server refused to this user.
    pub denied: DeniedSubjects,
    /// Core NATS: what the server confirmed, and what a drop may have lost.
    pub ledger: DeliveryLedger,
}

/// Subjects the server refused to let this connection publish to.
#[derive(Clone, Default, Debug)]
pub struct DeniedSubjects(Arc<Mutex<HashSet<String>>>);

impl DeniedSubjects {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0
            .lock()
            .expect("no code panics while holding the denied-subjects lock")
    }

    pub fn contains(&self, subject: &str) -> bool {
        self.set().contains(subject)
    }

    /// Records a refused subject; `true` the first time.
    fn insert(&self, subject: &str) -> bool {
        self.set().insert(subject.to_owned())
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
            password_file: None,
            token: None,
            token_file: None,
            inbox_prefix: "_INBOX".into(),
            tlscert: None,
            tlskey: None,
            tlsca: None,
            connection_name: "falco-nats".into(),
        }
    }

    /// The server addresses, without credentials, and the credentials the
    /// URLs held (`user:password@` or `token@`): async-nats and its logs
    /// never see them in an address.
    fn servers(&self) -> Result<(Vec<ServerAddr>, Option<UrlCredentials>), NatsError> {
        let mut credentials = None;
        let mut servers = Vec::new();
        for url in self
            .server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let bad = |source: async_nats::Error| NatsError::BadUrl {
                url: mask_credentials(url),
                source,
            };
            let addr = url.parse::<ServerAddr>().map_err(|e| bad(e.into()))?;
            if !addr.has_user_pass() {
                servers.push(addr);
                continue;
            }
            let found = match (addr.username(), addr.password()) {
                (Some(user), Some(password)) => {
                    UrlCredentials::UserPassword(percent_decode(user), percent_decode(password))
                }
                (Some(token), None) => UrlCredentials::Token(percent_decode(token)),
                _ => UrlCredentials::None,
            };
            credentials.get_or_insert(found);
            let mut bare = addr.into_inner();
            // Removing the user part of a nats:// URL cannot fail.
            let _ = bare.set_password(None);
            let _ = bare.set_username("");
            servers.push(ServerAddr::from_url(bare).map_err(|e| bad(e.into()))?);
        }
        Ok((servers, credentials))
    }

    async fn connect_options(
        &self,
        from_url: Option<UrlCredentials>,
    ) -> Result<ConnectOptions, NatsError> {
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
            let seed = read_secret("NKey seed", path).await?;
            opts = opts.nkey(seed);
        }
        let password = match (&self.password, &self.password_file) {
            (Some(p), _) => Some(non_empty("--password", p.clone())?),
            (None, Some(path)) => Some(read_secret("password", path).await?),
            (None, None) => None,
        };
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(non_empty("--token", t.clone())?),
            (None, Some(path)) => Some(read_secret("token", path).await?),
            (None, None) => None,
        };
        match (&self.user, password) {
            (Some(user), Some(password)) => opts = opts.user_and_password(user.clone(), password),
            (Some(_), None) => return Err(NatsError::UserWithoutPassword),
            (None, _) if token.is_none() => match from_url {
                Some(UrlCredentials::UserPassword(user, password)) => {
                    opts = opts.user_and_password(user, password)
                }
                Some(UrlCredentials::Token(t)) => opts = opts.token(t),
                _ => {}
            },
            _ => {}
        }
        if let Some(token) = token {
            opts = opts.token(token);
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
        Ok(opts
            .name(&self.connection_name)
            .custom_inbox_prefix(&self.inbox_prefix))
    }
}

/// Credentials found in a server URL.
#[derive(Clone)]
enum UrlCredentials {
    UserPassword(String, String),
    Token(String),
    None,
}

/// A secret from a file (a mounted Secret): its content less the trailing
/// newline; an empty one is an error.
async fn read_secret(what: &'static str, path: &std::path::Path) -> Result<String, NatsError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| NatsError::ReadFile {
            what,
            path: path.to_owned(),
            source,
        })?;
    non_empty(what, text.trim_end_matches(['\r', '\n']).to_owned())
}

fn non_empty(what: &'static str, value: String) -> Result<String, NatsError> {
    if value.is_empty() {
        return Err(NatsError::EmptySecret { what });
    }
    Ok(value)
}

/// `url` with whatever stands between `://` and `@` replaced by `***`.
pub fn mask_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let host_start = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..host_start].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Decodes `%XX` escapes in a URL's user part (a password may hold `@`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                // Two hex digits make one byte: h * 16 + l < 256.
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens the one long-lived connection. It returns at once and connects in
/// the background, retrying the first connection and every reconnection
/// forever; `watch` follows the state.
pub async fn connect(
    options: &NatsOptions,
    watch: ConnectionWatch,
) -> Result<NatsConnection, NatsError> {
    let (servers, from_url) = options.servers()?;
    let connected_before = Arc::new(AtomicBool::new(false));
    let denied = DeniedSubjects::default();
    let ledger = watch.ledger.clone();
    let events_denied = denied.clone();
    let from_url_again = from_url.clone();
    let ready = watch.ready.clone();
    let client = options
        .connect_options(from_url)
        .await?
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let watch = watch.clone();
            let denied = events_denied.clone();
            let connected_before = connected_before.clone();
            async move { on_event(event, &watch, &denied, &connected_before) }
        })
        .connect(servers.clone())
        .await?;
    tokio::spawn(say_why_not_connected(
        options.clone(),
        servers,
        from_url_again,
        ready,
    ));
    Ok(NatsConnection {
        client,
        denied,
        ledger,
    })
}

/// A client still not connected a few seconds after the start says why:
/// async-nats reports a failed retry only as its kind ("IO error"), so one
/// attempt of its own, without retries and with a short time-out, gives
/// the cause (a refused port, an unknown CA, a wrong name), logged once
/// unless the client connected meanwhile. It holds only the connection's
/// readiness, not the client: a shutdown does not wait for it.
async fn say_why_not_connected(
    options: NatsOptions,
    servers: Vec<ServerAddr>,
    from_url: Option<UrlCredentials>,
    connected: ReadyFlag,
) {
    let connected = || connected.get();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    if connected() {
        return;
    }
    let Ok(attempt) = options.connect_options(from_url).await else {
        return;
    };
    let attempt = attempt.connection_timeout(std::time::Duration::from_secs(2));
    if let Err(e) = attempt.connect(servers).await {
        if !connected() {
            tracing::warn!(
                error = crate::telemetry::logging::chain(&e),
                "cannot connect to NATS yet; retrying in the background"
            );
        }
    }
}

/// Follows the connection's events: readiness, metrics, the ledger on a
/// drop, and the subjects the server refuses.
fn on_event(
    event: Event,
    watch: &ConnectionWatch,
    denied: &DeniedSubjects,
    connected_before: &AtomicBool,
) {
    match event {
        Event::Connected => {
            watch.ready.set(true);
            watch.metrics.connected.set(1);
            tracing::info!("connected to NATS");
            if connected_before.swap(true, Ordering::Relaxed) {
                watch.metrics.reconnects.inc();
            }
        }
        Event::Disconnected => {
            watch.ready.set(false);
            watch.metrics.connected.set(0);
            let at_risk = watch.ledger.disconnected();
            if at_risk > 0 {
                tracing::warn!(possibly_lost = at_risk, "disconnected from NATS; reconnecting (alerts published since the server last confirmed may be lost: counted in falco_nats_alerts_possibly_lost_total)");
            } else {
                tracing::warn!("disconnected from NATS; reconnecting");
            }
        }
        Event::Closed => {
            watch.ready.set(false);
            watch.metrics.connected.set(0);
            tracing::info!("NATS connection closed");
        }
        // Failed reconnect attempts: the disconnect was logged already.
        Event::ClientError(e) => tracing::debug!(error = %e, "NATS client error"),
        Event::ServerError(ServerError::Other(message)) => match denied_publish_subject(&message) {
            Some(subject) => {
                watch.metrics.permission_denied.inc();
                if denied.insert(subject) {
                    tracing::error!(%subject, "NATS refused a publish: the user has no permission for this subject (check --subject and the user's publish permissions)");
                }
            }
            None => tracing::error!(error = %message, "NATS server error"),
        },
        Event::ServerError(e) => tracing::error!(error = %e, "NATS server error"),
        other => tracing::warn!(event = %other, "NATS connection event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_urls_and_are_never_shown() {
        let options = NatsOptions::for_server(
            "nats://alice:s3cr%40t@127.0.0.1:4222, nats://127.0.0.1:4223,tls://tok@nats:4443",
        );
        let (servers, creds) = options.servers().unwrap();
        let shown: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
        assert!(
            shown
                .iter()
                .all(|s| !s.contains("alice") && !s.contains("s3cr") && !s.contains("tok@")),
            "{shown:?}"
        );
        assert_eq!(servers.len(), 3);
        match creds {
            Some(UrlCredentials::UserPassword(u, p)) => {
                assert_eq!((u.as_str(), p.as_str()), ("alice", "s3cr@t"))
            }
            _ => panic!("user and password expected"),
        }
        assert_eq!(
            mask_credentials("nats://alice:secret@nats:4222/x"),
            "nats://***@nats:4222/x"
        );
        assert_eq!(mask_credentials("nats://nats:4222"), "nats://nats:4222");
        let err = NatsOptions::for_server("nats://alice:secret@bad host:4222")
            .servers()
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }

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
