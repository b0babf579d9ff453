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
mod simulate;
mod tail;
mod ui;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::telemetry::logging::LogFormat;

pub use bridge::{BridgeArgs, BridgeArgsError, FastBatch, InputKind};
pub use control::{KeygenArgs, KvArgs, KvArgsError, PauseArgs};
pub use nats::NatsArgs;
pub use respond::{RespondArgs, RespondArgsError};
pub use simulate::{SimulateArgs, SimulateKind};
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

/// A `--listen` value: an address, or `None` for `off` (or empty).
pub(crate) fn listen_address(value: &str) -> Option<&str> {
    match value.trim() {
        "" | "off" | "none" => None,
        addr => Some(addr),
    }
}

/// A token flag or file that gives no token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0} is empty: give a token, or leave the flag out to accept alerts without one")]
    Empty(&'static str),
    #[error("cannot read the token file {path:?}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
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
    pub fn token(&self) -> Result<Option<String>, TokenError> {
        http_token(self.http_token.clone(), self.http_token_file.as_deref())
    }
}

fn http_token(
    flag: Option<String>,
    file: Option<&std::path::Path>,
) -> Result<Option<String>, TokenError> {
    let token = match (flag, file) {
        (Some(token), _) => Some((token, "--http-token (FALCO_NATS_HTTP_TOKEN)")),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                path: path.to_owned(),
                source,
            })?;
            let token = text.trim_end_matches(['\r', '\n']).to_owned();
            Some((token, "the --http-token-file"))
        }
        (None, None) => None,
    };
    match token {
        Some((t, what)) if t.is_empty() => Err(TokenError::Empty(what)),
        Some((t, _)) => Ok(Some(t)),
        None => Ok(None),
    }
}

/// A size: digits, then an optional K, M, G or T (with or without `i` and
/// `B`: powers of 1024).
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
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
    use crate::bridge::InputOptions;
    use crate::priority::Priority;
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
