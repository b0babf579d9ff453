//! The NATS connection flags of `bridge`, `respond`, `tail`, `ui`, `pause`
//! and `resume`: the `nats` CLI's names and environment variables.

use std::path::PathBuf;

use clap::Args;

use crate::nats::NatsOptions;

/// The NATS flags, named as the `nats` CLI names them, with its variables.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URLs, comma separated (credentials in a URL are taken out
    /// of it and never printed)
    #[arg(
        short = 's',
        long = "server",
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
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
    /// File holding the password (a mounted Secret)
    #[arg(long, env = "NATS_PASSWORD_FILE", conflicts_with = "password")]
    pub password_file: Option<PathBuf>,
    /// Authentication token
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the authentication token (a mounted Secret)
    #[arg(long, env = "NATS_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// TLS client certificate file
    #[arg(long, env = "NATS_CERT")]
    pub tlscert: Option<PathBuf>,
    /// TLS client private key file
    #[arg(long, env = "NATS_KEY")]
    pub tlskey: Option<PathBuf>,
    /// TLS certificate authority chain file
    #[arg(long, env = "NATS_CA")]
    pub tlsca: Option<PathBuf>,
    /// Prefix of this connection's reply subjects, so a user's permissions
    /// can allow its own inbox only (e.g. _INBOX_bridge)
    #[arg(long, env = "NATS_INBOX_PREFIX", default_value = "_INBOX")]
    pub inbox_prefix: String,
    /// Name of the connection, as the server's monitoring shows it
    #[arg(
        long = "connection-name",
        env = "NATS_CONNECTION_NAME",
        default_value = "falco-nats"
    )]
    pub connection_name: String,
}

impl From<NatsArgs> for NatsOptions {
    fn from(a: NatsArgs) -> Self {
        NatsOptions {
            server: a.server,
            creds: a.creds,
            nkey: a.nkey,
            user: a.user,
            password: a.password,
            password_file: a.password_file,
            token: a.token,
            token_file: a.token_file,
            tlscert: a.tlscert,
            tlskey: a.tlskey,
            tlsca: a.tlsca,
            inbox_prefix: a.inbox_prefix,
            connection_name: a.connection_name,
        }
    }
}
