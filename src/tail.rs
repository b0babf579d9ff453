//! `falco-nats tail`: a Falco-aware `nats sub`. Prints each alert on one
//! readable line (time, priority in colour, rule, namespace/pod, the output
//! text), or the raw JSON with `--json`.

use std::io::{IsTerminal, Write};

use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::output::{connect, ConnectionWatch, NatsError, NatsOptions};
use crate::priority::Priority;

/// When to colour the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum ColorChoice {
    /// When standard output is a terminal.
    #[default]
    Auto,
    Always,
    Never,
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
    #[arg(long, env = "FALCO_NATS_MIN_PRIORITY", value_parser = crate::cli::parse_priority, default_value = "debug")]
    pub min_priority: Priority,
    /// Colour the priority
    #[arg(long, env = "FALCO_NATS_COLOR", value_enum, default_value_t)]
    pub color: ColorChoice,
    /// Exit after this many alerts (0: never)
    #[arg(long, env = "FALCO_NATS_TAIL_COUNT", default_value_t = 0)]
    pub count: u64,
}

/// Why `tail` stopped.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("cannot subscribe to {subject:?}: {source}")]
    Subscribe {
        subject: String,
        source: async_nats::SubscribeError,
    },
    #[error("cannot write to standard output: {0}")]
    Write(#[from] std::io::Error),
}

/// Subscribes and prints until `shutdown` (or `--count` alerts).
pub async fn run<W: Write>(
    args: TailArgs,
    mut out: W,
    shutdown: CancellationToken,
) -> Result<(), TailError> {
    let color = match args.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => std::io::stdout().is_terminal(),
    };
    let client = connect(&args.nats, ConnectionWatch::default()).await?;
    let mut sub = client
        .subscribe(args.subject.clone())
        .await
        .map_err(|source| TailError::Subscribe {
            subject: args.subject.clone(),
            source,
        })?;
    let mut printed = 0u64;
    loop {
        let message = tokio::select! {
            m = sub.next() => m,
            _ = shutdown.cancelled() => break,
        };
        let Some(message) = message else { break };
        let line = if args.json {
            alert_priority(&message.payload)
                .filter(|p| *p >= args.min_priority)
                .map(|_| String::from_utf8_lossy(&message.payload).into_owned())
        } else {
            format_decision(&message.payload, color)
                .or_else(|| format_alert(&message.payload, args.min_priority, color))
        };
        if let Some(line) = line {
            writeln!(out, "{line}")?;
            out.flush()?;
            printed += 1;
            if args.count != 0 && printed >= args.count {
                break;
            }
        }
    }
    Ok(())
}

fn alert_priority(payload: &[u8]) -> Option<Priority> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    v.get("priority")?.as_str()?.parse().ok()
}

fn paint(priority: Priority) -> &'static str {
    match priority {
        Priority::Emergency | Priority::Alert | Priority::Critical => "\x1b[1;31m",
        Priority::Error => "\x1b[31m",
        Priority::Warning => "\x1b[33m",
        Priority::Notice => "\x1b[36m",
        Priority::Informational | Priority::Debug => "\x1b[2m",
    }
}

/// One readable line for a Falco alert; `None` for what is not an alert
/// or is below `min_priority`.
pub fn format_alert(payload: &[u8], min_priority: Priority, color: bool) -> Option<String> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    if v.get("outcome").is_some() {
        // A responder's decision, not an alert.
        return None;
    }
    let priority: Priority = v.get("priority")?.as_str()?.parse().ok()?;
    if priority < min_priority {
        return None;
    }
    let rule = v.get("rule")?.as_str()?;
    let time = v.get("time").and_then(Value::as_str).unwrap_or("-");
    let fields = v.get("output_fields");
    let field = |k: &str| fields.and_then(|f| f.get(k)).and_then(Value::as_str);
    let place = match (field("k8s.ns.name"), field("k8s.pod.name")) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => v
            .get("hostname")
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_owned(),
    };
    // Falco's output starts with "<time>: <Priority> "; the line shows both already.
    let output = v.get("output").and_then(Value::as_str).unwrap_or("");
    let text = output
        .split_once(": ")
        .and_then(|(_, rest)| rest.strip_prefix(priority.as_str()))
        .map(str::trim_start)
        .unwrap_or(output);
    let (on, off) = if color {
        (paint(priority), "\x1b[0m")
    } else {
        ("", "")
    };
    Some(format!(
        "{time} {on}{:<13}{off} {rule} [{place}] {text}",
        priority.as_str()
    ))
}

/// One readable line for a responder's decision (`falco.response.*`).
pub fn format_decision(payload: &[u8], color: bool) -> Option<String> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let action = v.get("action")?.as_str()?;
    let outcome = v.get("outcome")?.as_str()?;
    let reason = v.get("reason").and_then(Value::as_str).unwrap_or("");
    let place = match (
        v.get("namespace").and_then(Value::as_str),
        v.get("pod").and_then(Value::as_str),
    ) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => "-".into(),
    };
    let rule = v.get("rule").and_then(Value::as_str).unwrap_or("-");
    let (on, off) = match (color, outcome) {
        (false, _) => ("", ""),
        (true, "done") => ("\x1b[1;35m", "\x1b[0m"),
        (true, "failed") => ("\x1b[1;31m", "\x1b[0m"),
        (true, _) => ("\x1b[35m", "\x1b[0m"),
    };
    Some(format!(
        "  -> {on}{action} {outcome}{off} [{place}] {reason} (rule: {rule})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALERT: &str = r#"{"hostname":"node-1","output":"13:44:05.478445995: Critical Executing binary not part of base image (proc=xmrig)","output_fields":{"k8s.ns.name":"shop","k8s.pod.name":"web-1"},"priority":"Critical","rule":"Drop and execute new binary in container","source":"syscall","tags":[],"time":"2023-05-25T13:44:05.478445995Z"}"#;

    #[test]
    fn prints_one_readable_line() {
        assert_eq!(
            format_alert(ALERT.as_bytes(), Priority::Debug, false).unwrap(),
            "2023-05-25T13:44:05.478445995Z Critical      Drop and execute new binary in container [shop/web-1] Executing binary not part of base image (proc=xmrig)"
        );
        let coloured = format_alert(ALERT.as_bytes(), Priority::Debug, true).unwrap();
        assert!(coloured.contains("\x1b[1;31mCritical"));
    }

    #[test]
    fn prints_decisions() {
        let d = br#"{"action":"delete-pod","outcome":"dry_run","reason":"would delete the pod (grace period 0s)","namespace":"shop","pod":"web-1","rule":"Drop and execute new binary in container"}"#;
        assert_eq!(
            format_decision(d, false).unwrap(),
            "  -> delete-pod dry_run [shop/web-1] would delete the pod (grace period 0s) (rule: Drop and execute new binary in container)"
        );
        assert!(format_decision(ALERT.as_bytes(), false).is_none());
        assert!(
            format_alert(d, Priority::Debug, false).is_none(),
            "a decision is not an alert"
        );
    }

    #[test]
    fn filters_and_skips_non_alerts() {
        assert!(format_alert(ALERT.as_bytes(), Priority::Emergency, false).is_none());
        assert!(format_alert(b"not json", Priority::Debug, false).is_none());
        assert!(format_alert(br#"{"action":"delete-pod"}"#, Priority::Debug, false).is_none());
        let internal = r#"{"hostname":"node-1","output":"Falco internal: syscall event drop","output_fields":{},"priority":"Debug","rule":"Falco internal: syscall event drop","time":"t"}"#;
        let line = format_alert(internal.as_bytes(), Priority::Debug, false).unwrap();
        assert!(
            line.contains("[node-1] Falco internal: syscall event drop"),
            "{line}"
        );
    }
}
