//! `falco-nats pause` and `resume`: the kill switch as an operator pulls,
//! releases or reads it (`--status`), giving up after 10 s without NATS.

use std::time::Duration;

use super::control::{self, ControlError, ControlOptions, PauseState};
use crate::nats::{NatsError, NatsOptions};
use crate::telemetry::health::Readiness;

/// How long NATS has to answer.
const PATIENCE: Duration = Duration::from_secs(10);

/// What the operator asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillSwitchCommand {
    /// Pull it (`paused`: every responder stops its destructive actions)
    /// or release it, for this reason.
    Set { paused: bool, reason: String },
    /// Only say how the switch stands.
    Status,
}

/// What the command did or found: the line to print, and whether the
/// responders are paused now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillSwitchAnswer {
    pub line: String,
    pub paused: bool,
}

/// Why the command could not do or say it.
#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot flush to NATS: {0}")]
    Flush(#[from] async_nats::client::FlushError),
    #[error("NATS did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("the kill switch cannot be read: {0}")]
    Unknown(String),
    #[error("no kill switch here")]
    Off,
}

/// Runs `command` against the buckets of `options` on the NATS of `nats`.
pub async fn run(
    nats: &NatsOptions,
    options: &ControlOptions,
    command: KillSwitchCommand,
) -> Result<KillSwitchAnswer, KillSwitchError> {
    tokio::time::timeout(PATIENCE, answer(nats, options, command))
        .await
        .map_err(|_| KillSwitchError::TimedOut(PATIENCE))?
}

async fn answer(
    nats: &NatsOptions,
    options: &ControlOptions,
    command: KillSwitchCommand,
) -> Result<KillSwitchAnswer, KillSwitchError> {
    let mut registry = prometheus_client::registry::Registry::default();
    let watch = crate::nats::ConnectionWatch::register(&Readiness::default(), &mut registry);
    let client = crate::nats::connect(nats, watch).await?.client;
    let (paused, reason) = match command {
        KillSwitchCommand::Status => {
            return match control::pause_status(&client, options).await? {
                PauseState::Running(None) => Ok(KillSwitchAnswer {
                    line: "running (never paused)".to_owned(),
                    paused: false,
                }),
                PauseState::Running(Some(record)) => Ok(KillSwitchAnswer {
                    line: record.to_string(),
                    paused: false,
                }),
                PauseState::Paused(record) => Ok(KillSwitchAnswer {
                    line: record.to_string(),
                    paused: true,
                }),
                PauseState::Unknown(why) => Err(KillSwitchError::Unknown(why)),
                PauseState::Off => Err(KillSwitchError::Off),
            };
        }
        KillSwitchCommand::Set { paused, reason } => (paused, reason),
    };
    let record = control::set_pause(&client, options, paused, &reason).await?;
    client.flush().await?;
    Ok(KillSwitchAnswer {
        line: record.to_string(),
        paused,
    })
}
