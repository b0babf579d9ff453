//! `falco-nats tail`: a Falco-aware `nats sub`. Prints each alert on one
//! readable line (time, priority in colour, rule, namespace/pod, the output
//! text), or the raw JSON with `--json`; the responder's decisions (only
//! those on the result subjects) below the alerts. Alerts and decisions are
//! read with the same types the responder writes them with.
//!
//! Every string in an alert is written by whoever controls the watched
//! container: control characters (C0, DEL, C1) are printed escaped, never
//! raw, so an alert cannot retitle, clear or otherwise drive the terminal.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};
use std::sync::Arc;

use futures_util::StreamExt;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::alert::Alert;
use crate::decision::{Decision, Outcome};
use crate::nats::subject::is_below;
use crate::nats::{connect, ConnectionWatch, NatsError, NatsOptions};
use crate::priority::Priority;
use crate::server::Listen;
use crate::telemetry::health::{self, Readiness, ReadyFlag};

/// When to colour the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColorChoice {
    /// When the output is a terminal.
    #[default]
    Auto,
    Always,
    Never,
}

/// What `tail` subscribes to and how it prints.
#[derive(Debug, Clone)]
pub struct TailOptions {
    pub nats: NatsOptions,
    pub subject: String,
    /// The raw JSON instead of a readable line.
    pub json: bool,
    pub min_priority: Priority,
    pub color: ColorChoice,
    /// Stop after this many lines (0: never).
    pub count: u64,
    /// Messages below this subject are decisions; the others are alerts.
    pub result_subject: String,
}

/// Why `tail` stopped.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("cannot subscribe to {subject:?}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error("cannot write the output")]
    Write(#[from] std::io::Error),
}

/// Subscribes and prints to `out` until `shutdown` (or `count` lines);
/// colours when asked, or (auto) when `out` is a terminal. With a
/// `listener`, serves the probes and the connection's metrics on it.
pub async fn run<W: Write + IsTerminal>(
    options: TailOptions,
    out: W,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), TailError> {
    let mut registry = Registry::default();
    let readiness = Readiness::default();
    let watch = ConnectionWatch::register(&readiness, &mut registry);
    let subscribed = readiness.check("subscription");
    let client = connect(&options.nats, watch).await?.client;
    let http_metrics = crate::telemetry::metrics::HttpServerMetrics::new(&mut registry);
    let router = health::router(readiness, Arc::new(registry));
    let server = Listen::probes(listener, router, http_metrics);
    let result = print(&options, &client, out, &subscribed, &shutdown).await;
    server.stop().await;
    result
}

async fn print<W: Write + IsTerminal>(
    options: &TailOptions,
    client: &async_nats::Client,
    mut out: W,
    subscribed: &ReadyFlag,
    shutdown: &CancellationToken,
) -> Result<(), TailError> {
    let color = match options.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => out.is_terminal(),
    };
    let mut sub = client
        .subscribe(options.subject.clone())
        .await
        .map_err(|source| TailError::Subscribe {
            subject: options.subject.clone(),
            source,
        })?;
    subscribed.set(true);
    let mut printed = 0u64;
    loop {
        let message = tokio::select! {
            m = sub.next() => m,
            _ = shutdown.cancelled() => break,
        };
        let Some(message) = message else { break };
        let is_result = is_below(message.subject.as_str(), &options.result_subject);
        let line = match (options.json, is_result) {
            (true, true) => Some(escape_json_controls(&String::from_utf8_lossy(
                &message.payload,
            ))),
            (true, false) => Alert::from_json(&message.payload)
                .ok()
                .filter(|a| a.priority >= options.min_priority)
                .map(|_| escape_json_controls(&String::from_utf8_lossy(&message.payload))),
            (false, true) => Decision::from_json(&message.payload)
                .ok()
                .map(|d| format_decision(&d, color)),
            (false, false) => Alert::from_json(&message.payload)
                .ok()
                .filter(|a| a.priority >= options.min_priority)
                .map(|a| format_alert(&a, color)),
        };
        if let Some(line) = line {
            writeln!(out, "{line}")?;
            out.flush()?;
            printed += 1;
            if options.count != 0 && printed >= options.count {
                break;
            }
        }
    }
    Ok(())
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

fn paint(priority: Priority) -> &'static str {
    match priority {
        Priority::Emergency | Priority::Alert | Priority::Critical => "\x1b[1;31m",
        Priority::Error => "\x1b[31m",
        Priority::Warning => "\x1b[33m",
        Priority::Notice => "\x1b[36m",
        Priority::Informational | Priority::Debug => "\x1b[2m",
    }
}

/// One readable line for a Falco alert.
pub fn format_alert(alert: &Alert, color: bool) -> String {
    let place = match (alert.field("k8s.ns.name"), alert.field("k8s.pod.name")) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ if alert.hostname.is_empty() => "-".to_owned(),
        _ => alert.hostname.clone(),
    };
    // Falco's output starts with "<time>: <Priority> "; the line shows both already.
    let text = alert
        .output
        .split_once(": ")
        .and_then(|(_, rest)| rest.strip_prefix(alert.priority.as_str()))
        .map(str::trim_start)
        .unwrap_or(&alert.output);
    let time = if alert.time.is_empty() {
        "-"
    } else {
        &alert.time
    };
    let (on, off) = if color {
        (paint(alert.priority), "\x1b[0m")
    } else {
        ("", "")
    };
    format!(
        "{} {on}{:<13}{off} {} [{}] {}",
        clean(time),
        alert.priority.as_str(),
        clean(&alert.rule),
        clean(&place),
        clean(text)
    )
}

/// One readable line for a responder's decision.
pub fn format_decision(d: &Decision, color: bool) -> String {
    let place = match (&d.namespace, &d.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => "-".into(),
    };
    let (on, off) = match (color, d.outcome) {
        (false, _) => ("", ""),
        (true, Outcome::Done) => ("\x1b[1;35m", "\x1b[0m"),
        (true, Outcome::Failed) => ("\x1b[1;31m", "\x1b[0m"),
        (true, _) => ("\x1b[35m", "\x1b[0m"),
    };
    format!(
        "  -> {on}{} {}{off} [{}] {} (rule: {})",
        d.action.as_str(),
        d.outcome.as_str(),
        clean(&place),
        clean(&d.reason),
        clean(d.rule.as_deref().unwrap_or("-"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALERT: &str = r#"{"hostname":"node-1","output":"13:44:05.478445995: Critical Executing binary not part of base image (proc=xmrig)","output_fields":{"k8s.ns.name":"shop","k8s.pod.name":"web-1"},"priority":"Critical","rule":"Drop and execute new binary in container","source":"syscall","tags":[],"time":"2023-05-25T13:44:05.478445995Z"}"#;

    fn alert(json: &str) -> Alert {
        Alert::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn prints_one_readable_line() {
        assert_eq!(
            format_alert(&alert(ALERT), false),
            "2023-05-25T13:44:05.478445995Z Critical      Drop and execute new binary in container [shop/web-1] Executing binary not part of base image (proc=xmrig)"
        );
        let coloured = format_alert(&alert(ALERT), true);
        assert!(coloured.contains("\x1b[1;31mCritical"));
    }

    #[test]
    fn prints_decisions() {
        let d = br#"{"action":"delete-pod","outcome":"dry_run","reason":"would delete the pod (grace period 0s)","namespace":"shop","pod":"web-1","rule":"Drop and execute new binary in container"}"#;
        assert_eq!(
            format_decision(&Decision::from_json(d).unwrap(), false),
            "  -> delete-pod dry_run [shop/web-1] would delete the pod (grace period 0s) (rule: Drop and execute new binary in container)"
        );
        assert!(
            Decision::from_json(ALERT.as_bytes()).is_err(),
            "an alert is not a decision"
        );
        assert!(Alert::from_json(d).is_err(), "a decision is not an alert");
        assert!(is_below("falco.response.delete_pod", "falco.response"));
        assert!(!is_below("falco.response", "falco.response"));
        assert!(!is_below("falco.responsex.a", "falco.response"));
        assert!(!is_below("falco.critical.x", "falco.response"));
    }

    #[test]
    fn internal_alerts_show_the_host() {
        let internal = r#"{"hostname":"node-1","output":"Falco internal: syscall event drop","output_fields":{},"priority":"Debug","rule":"Falco internal: syscall event drop","time":"t"}"#;
        let line = format_alert(&alert(internal), false);
        assert!(
            line.contains("[node-1] Falco internal: syscall event drop"),
            "{line}"
        );
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
            let line = format_alert(&alert(&evil), color);
            let printed = if color {
                line.replace("\x1b[1;31m", "").replace("\x1b[0m", "")
            } else {
                line.clone()
            };
            assert!(!printed.chars().any(char::is_control), "{line:?}");
            assert!(printed.contains("\\u{1b}]0;owned\\u{7}"), "{printed}");
        }
        let decision = serde_json::json!({"action": "delete-pod", "outcome": "done", "reason": "r\u{1b}[2J\n", "namespace": "a\u{9b}", "pod": "b"}).to_string();
        let line = format_decision(&Decision::from_json(decision.as_bytes()).unwrap(), false);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        let json = escape_json_controls("{\"o\":\"\u{9b}2J\u{7f}\"}");
        assert_eq!(json, "{\"o\":\"\\u009b2J\\u007f\"}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["o"], "\u{9b}2J\u{7f}");
    }
}
