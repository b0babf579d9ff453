//! `falco-nats ui`.

use std::time::Duration;

use clap::Args;

use super::nats::NatsArgs;
use super::shared::{listen_address, HttpTokenArgs, TokenError};
use crate::respond::DEFAULT_RESULT_SUBJECT;
use crate::ui::UiOptions;

/// `ui` settings.
#[derive(Debug, Clone, Args)]
pub struct UiArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
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

    pub fn into_options(self) -> Result<UiOptions, TokenError> {
        let token = self.http_token.token()?;
        Ok(UiOptions {
            nats: self.nats.into(),
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
