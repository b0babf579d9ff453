//! `falco-nats tail`.

use clap::{Args, ValueEnum};

use super::nats::NatsArgs;
use super::shared::listen_address;
use crate::priority::Priority;
use crate::respond::DEFAULT_RESULT_SUBJECT;
use crate::tail::{ColorChoice, TailOptions};

/// When to colour the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum ColorArg {
    /// When the output is a terminal
    #[default]
    Auto,
    Always,
    Never,
}

impl From<ColorArg> for ColorChoice {
    fn from(a: ColorArg) -> Self {
        match a {
            ColorArg::Auto => ColorChoice::Auto,
            ColorArg::Always => ColorChoice::Always,
            ColorArg::Never => ColorChoice::Never,
        }
    }
}

/// `tail` settings.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
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
    pub color: ColorArg,
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
            nats: a.nats.into(),
            subject: a.subject,
            json: a.json,
            min_priority: a.min_priority,
            color: a.color.into(),
            count: a.count,
            result_subject: a.result_subject,
        }
    }
}
