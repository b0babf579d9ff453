//! [`FalcoEvent`]: one Falco alert as it crosses every boundary of falco-nats.
//!
//! The payload is the alert's JSON line exactly as NATS will carry it; the
//! other fields are the few that subjects, headers and filters need, read
//! once when the alert enters the bridge.

use std::borrow::Cow;
use std::time::Instant;

use crate::priority::{Priority, PriorityError};
use crate::scan::ScanError;
use bytes::Bytes;

/// The source Falco gives an alert that names none: its system-call source.
pub const DEFAULT_SOURCE: &str = "syscall";

/// One Falco alert.
#[derive(Debug, Clone)]
pub struct FalcoEvent {
    /// Falco's JSON line, without a trailing newline: the NATS payload.
    pub payload: Bytes,
    pub priority: Priority,
    pub rule: String,
    pub hostname: String,
    pub source: String,
    /// When the bridge received the alert (for the publish latency metric).
    pub received_at: Instant,
}

/// Why an alert was rejected. Each variant has a short `reason` for metrics.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("line is not JSON (Falco must run with `json_output: true`)")]
    NotJson(#[source] ScanError),
    /// What about its shape is not an alert's.
    #[error("JSON is not a Falco alert: {0}")]
    NotAnAlert(String),
    #[error("JSON is not a Falco alert")]
    Unreadable(#[source] serde_json::Error),
    #[error("alert has no {0:?} field")]
    MissingField(&'static str),
    #[error(transparent)]
    Priority(#[from] PriorityError),
    #[error("alert of {size} bytes is above the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("alert is not valid UTF-8")]
    NotUtf8,
    #[error("gRPC message is not a Falco response: {0}")]
    NotProtobuf(#[from] prost::DecodeError),
}

impl AlertError {
    /// Every [`Self::reason`], so that the metric shows each from the start.
    pub const REASONS: [&'static str; 6] = [
        "not_json",
        "not_an_alert",
        "unknown_priority",
        "oversized",
        "not_utf8",
        "not_protobuf",
    ];

    /// A bounded label for the `rejected` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AlertError::NotJson(_) => "not_json",
            AlertError::NotAnAlert(_) | AlertError::Unreadable(_) | AlertError::MissingField(_) => {
                "not_an_alert"
            }
            AlertError::Priority(_) => "unknown_priority",
            AlertError::TooLarge { .. } => "oversized",
            AlertError::NotUtf8 => "not_utf8",
            AlertError::NotProtobuf(_) => "not_protobuf",
        }
    }
}

impl FalcoEvent {
    /// Reads one Falco JSON alert (a FIFO or stdin line, an HTTP body).
    /// The payload is kept byte for byte, less surrounding whitespace.
    pub fn from_json(raw: Bytes) -> Result<Self, AlertError> {
        let start = raw
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(raw.len());
        let end = raw
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(start, |i| i + 1);
        let payload = raw.slice(start..end);
        let text = std::str::from_utf8(&payload).map_err(|_| AlertError::NotUtf8)?;
        let head = crate::scan::head(text).map_err(|e| match e {
            ScanError::Shape(shape) => AlertError::NotAnAlert(shape),
            syntax => AlertError::NotJson(syntax),
        })?;
        let priority = head
            .priority
            .ok_or(AlertError::MissingField("priority"))?
            .parse::<Priority>()?;
        let rule = head
            .rule
            .ok_or(AlertError::MissingField("rule"))?
            .into_owned();
        let hostname = head.hostname.map(Cow::into_owned).unwrap_or_default();
        let source = head
            .source
            .map(Cow::into_owned)
            .unwrap_or_else(|| DEFAULT_SOURCE.to_owned());
        Ok(FalcoEvent {
            payload,
            priority,
            rule,
            hostname,
            source,
            received_at: Instant::now(),
        })
    }

    /// A stable digest of the payload, used as `Nats-Msg-Id` so JetStream
    /// drops a duplicate when the bridge publishes the same alert again.
    pub fn msg_id(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = xxhash_rust::xxh3::xxh3_128(&self.payload);
        // 32 lower-case hex digits, as `{:032x}` writes them, without the
        // formatting machinery.
        let mut hex = [0u8; 32];
        for (i, digit) in hex.iter_mut().enumerate() {
            *digit = HEX[((digest >> ((31 - i) * 4)) & 0xf) as usize];
        }
        String::from_utf8(hex.to_vec()).expect("hex digits are ASCII")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"hostname":"falco-xczjd","output":"13:44:05.478445995: Critical A shell was spawned","output_fields":{"container.id":"ee97d9c4186f","evt.time":1685022245478445995},"priority":"Critical","rule":"Terminal shell in container","source":"syscall","tags":["container","shell"],"time":"2023-05-25T13:44:05.478445995Z"}"#;

    #[test]
    fn msg_id_is_the_digest_in_hex() {
        for line in [LINE, "{}", "{\"rule\":\"é\"}"] {
            let ev = FalcoEvent {
                payload: Bytes::from(line),
                priority: Priority::Debug,
                rule: String::new(),
                hostname: String::new(),
                source: String::new(),
                received_at: Instant::now(),
            };
            assert_eq!(
                ev.msg_id(),
                format!("{:032x}", xxhash_rust::xxh3::xxh3_128(line.as_bytes()))
            );
        }
    }

    #[test]
    fn every_reason_is_listed() {
        for err in [
            AlertError::NotJson(ScanError::Syntax { what: "", at: 0 }),
            AlertError::NotAnAlert(String::new()),
            AlertError::Unreadable(serde_json::from_str::<u8>("").unwrap_err()),
            AlertError::MissingField("rule"),
            AlertError::Priority(PriorityError::UnknownName(String::new())),
            AlertError::TooLarge { size: 2, limit: 1 },
            AlertError::NotUtf8,
        ] {
            assert!(AlertError::REASONS.contains(&err.reason()), "{err}");
        }
    }

    #[test]
    fn reads_a_falco_line_verbatim() {
        let ev = FalcoEvent::from_json(Bytes::from(format!("{LINE}\r\n"))).unwrap();
        assert_eq!(ev.payload, LINE.as_bytes());
        assert_eq!(ev.priority, Priority::Critical);
        assert_eq!(ev.rule, "Terminal shell in container");
        assert_eq!(ev.hostname, "falco-xczjd");
        assert_eq!(ev.source, "syscall");
        assert_eq!(ev.msg_id().len(), 32);
        assert_eq!(
            ev.msg_id(),
            FalcoEvent::from_json(Bytes::from(LINE)).unwrap().msg_id()
        );
    }

    #[test]
    fn rejects_bad_lines_with_reasons() {
        let cases = [
            ("13:44:05: Critical A shell was spawned", "not_json"),
            ("[1,2]", "not_an_alert"),
            (r#"{"rule":"x"}"#, "not_an_alert"),
            (r#"{"priority":"Critical"}"#, "not_an_alert"),
            (r#"{"priority":"Severe","rule":"x"}"#, "unknown_priority"),
            (r#"{"priority":"Critical","rule":"x""#, "not_json"),
        ];
        for (line, reason) in cases {
            let err = FalcoEvent::from_json(Bytes::from(line)).unwrap_err();
            assert_eq!(err.reason(), reason, "{line}: {err}");
        }
        let err = FalcoEvent::from_json(Bytes::from_static(b"\xff{}")).unwrap_err();
        assert_eq!(err.reason(), "not_utf8");
        let msg = FalcoEvent::from_json(Bytes::from("plain text"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("json_output: true"), "{msg}");
    }

    #[test]
    fn defaults_missing_hostname_and_source() {
        let ev = FalcoEvent::from_json(Bytes::from(r#"{"priority":"Notice","rule":"r"}"#)).unwrap();
        assert_eq!(ev.hostname, "");
        assert_eq!(ev.source, "syscall");
    }
}
