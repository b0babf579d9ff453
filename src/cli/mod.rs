//! The command line: subcommands, flags and their environment variables,
//! one file a subcommand, each turning its flags into the options of the
//! module that runs it (which knows nothing of clap).
//!
//! NATS flags are the `nats` CLI's (`-s/--server` with `NATS_URL`, ...):
//! [`NatsArgs`]; every other flag reads `FALCO_NATS_<FLAG>` too. The 2018
//! proof of concept's `-s` (server) and `-f` (pipe) work as they did.

mod bridge;
mod control;
mod nats;
mod respond;
mod shared;
mod simulate;
mod sources;
mod tail;
mod ui;

use clap::{Parser, Subcommand, ValueEnum};

use crate::telemetry::logging::LogFormat;

pub use bridge::{BridgeArgs, BridgeArgsError, FastBatch, InputKind};
pub use control::{KeygenArgs, KvArgs, KvArgsError, PauseArgs};
pub use nats::NatsArgs;
pub use respond::{RespondArgs, RespondArgsError};
pub use shared::{HttpTokenArgs, TokenError};
pub use simulate::{SimulateArgs, SimulateKind};
pub use sources::SourcesArgs;
pub use tail::TailArgs;
pub use ui::UiArgs;

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
    pub log_format: LogFormatArg,
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
    /// Keep the hub stream's sources equal to the nodes (the leaf layout)
    Sources(Box<SourcesArgs>),
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormatArg {
    /// Human-readable lines
    #[default]
    Text,
    /// One JSON object per line, for log collectors
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(a: LogFormatArg) -> Self {
        match a {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::InputOptions;
    use crate::priority::Priority;
    use clap::CommandFactory;
    use std::path::PathBuf;

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
