//! `falco-nats tail`: a Falco-aware `nats sub`. Prints each alert on one
//! readable line (time, priority in colour, rule, namespace/pod, the output
//! text), or the raw JSON with `--json`; the responder's decisions (only
//! those on the result subjects) below the alerts.
//!
//! Every string in an alert is written by whoever controls the watched
//! container: control characters (C0, DEL, C1) are printed escaped, never
//! raw, so an alert cannot retitle, clear or otherwise drive the terminal.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};

use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::nats::{connect, ConnectionWatch, NatsError, NatsOptions};
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
    /// Subject prefix of the responder's results: only messages there are
    /// printed as decisions
    #[arg(
        long,
        env = "FALCO_NATS_RESULT_SUBJECT",
        default_value = "falco.response"
    )]
    pub result_subject: String,
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
    let client = connect(&args.nats, ConnectionWatch::default())
        .await?
        .client;
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
        let is_result = is_under(message.subject.as_str(), &args.result_subject);
        let line = if args.json {
            let wanted = is_result
                || alert_priority(&message.payload).is_some_and(|p| p >= args.min_priority);
            wanted.then(|| escape_json_controls(&String::from_utf8_lossy(&message.payload)))
        } else if is_result {
            format_decision(&message.payload, color)
        } else {
            format_alert(&message.payload, args.min_priority, color)
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

/// Whether `subject` is `prefix` or below it.
fn is_under(subject: &str, prefix: &str) -> bool {
    subject
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// `s` with every control character (C0, DEL, C1) escaped as Rust writes
/// it (`\u{1b}`, `\n`): safe to print on a terminal.
pub fn clean(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A JSON text with control characters as `\uXXXX` escapes: the same JSON
/// where they sat inside strings (C1 and DEL may stand there raw), and
/// nothing a terminal acts on.
pub fn escape_json_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
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
        "{} {on}{:<13}{off} {} [{}] {}",
        clean(time),
        priority.as_str(),
        clean(rule),
        clean(&place),
        clean(text)
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
        "  -> {on}{} {}{off} [{}] {} (rule: {})",
        clean(action),
        clean(outcome),
        clean(&place),
        clean(reason),
        clean(rule)
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
        assert!(is_under("falco.response.delete_pod", "falco.response"));
        assert!(!is_under("falco.responsex.a", "falco.response"));
        assert!(!is_under("falco.critical.x", "falco.response"));
    }

    /// Issue 9, item 3: an alert's output carrying terminal escapes (retitle,
    /// clear screen, an 8-bit CSI) is printed escaped, coloured or not.
    #[test]
    fn control_characters_never_reach_the_terminal() {
        let evil = serde_json::json!({
            "hostname": "node\u{7}", "output": "12:00:00.0: Critical pwned \u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}31m\u{7f}\nFORGED",
            "output_fields": {"k8s.ns.name": "shop\u{1b}[8m", "k8s.pod.name": "web"},
            "priority": "Critical", "rule": "Rule\r\u{1b}[1A", "time": "t\u{1b}",
        })
        .to_string();
        for color in [false, true] {
            let line = format_alert(evil.as_bytes(), Priority::Debug, color).unwrap();
            let printed = if color {
                line.replace("\x1b[1;31m", "").replace("\x1b[0m", "")
            } else {
                line.clone()
            };
            assert!(!printed.chars().any(char::is_control), "{line:?}");
            assert!(printed.contains("\\u{1b}]0;owned\\u{7}"), "{printed}");
        }
        let decision = serde_json::json!({"action": "delete-pod\u{1b}[2J", "outcome": "done", "reason": "r\n", "namespace": "a", "pod": "b"}).to_string();
        let line = format_decision(decision.as_bytes(), false).unwrap();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        let json = escape_json_controls("{\"o\":\"\u{9b}2J\u{7f}\"}");
        assert_eq!(json, "{\"o\":\"\\u009b2J\\u007f\"}");
        let back: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["o"], "\u{9b}2J\u{7f}");
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
