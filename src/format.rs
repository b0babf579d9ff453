//! The payload's shape on NATS: Falco's own JSON line, byte for byte (the
//! default), or what falcosidekick's NATS output publishes
//! (`--format falcosidekick`), so that consumers written for falcosidekick
//! move over unchanged.
//!
//! falcosidekick decodes Falco's alert into its own struct and encodes it
//! again with Go's `encoding/json`: the keys in the struct's order (`uuid`,
//! `output`, `priority`, `rule`, `time`, `output_fields`, `source`, `tags`,
//! `hostname`), a random UUID per alert, `tags` sorted and left out when
//! empty, `hostname` left out when empty, a missing or empty `source` made
//! `syscalls` (and `internal` for its own "Test rule"), the time in Go's
//! RFC 3339 with trailing zeros of the fraction cut, `output_fields` with
//! sorted keys and numbers as Falco wrote them, and strings escaped as Go
//! does (`<`, `>`, `&`, U+2028 and U+2029 as `\u` escapes). [`falcosidekick`]
//! writes the same bytes (the UUID aside). What cannot be the same: a number
//! inside a list or object in `output_fields` is written as serde_json
//! writes it (Go keeps its text); Falco writes none there.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::{AlertError, FalcoEvent};

/// What the bridge publishes for each alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Falco's JSON line, unchanged.
    #[default]
    Falco,
    /// falcosidekick's NATS payload: Falco's fields and a `uuid`.
    Falcosidekick,
}

impl Format {
    /// The alert as this format publishes it.
    pub fn apply(self, event: FalcoEvent) -> Result<FalcoEvent, AlertError> {
        match self {
            Format::Falco => Ok(event),
            Format::Falcosidekick => falcosidekick(event, &uuid::Uuid::new_v4()),
        }
    }
}

/// The source falcosidekick gives an alert without one.
const SIDEKICK_DEFAULT_SOURCE: &str = "syscalls";

/// The fields falcosidekick reads beyond those the event holds already.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    output: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    output_fields: Option<BTreeMap<String, &'a RawValue>>,
    #[serde(borrow, default)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tags: Option<Vec<Cow<'a, str>>>,
}

/// `event` as falcosidekick publishes it, with `uuid`.
pub fn falcosidekick(event: FalcoEvent, uuid: &uuid::Uuid) -> Result<FalcoEvent, AlertError> {
    let text = std::str::from_utf8(&event.payload).map_err(|_| AlertError::NotUtf8)?;
    let fields: Fields<'_> = serde_json::from_str(text).map_err(AlertError::Unreadable)?;
    let time = go_time(fields.time.as_deref().unwrap_or(""))?;
    let source = match fields.source.as_deref() {
        _ if event.rule == "Test rule" => "internal",
        None | Some("") => SIDEKICK_DEFAULT_SOURCE,
        Some(s) => s,
    }
    .to_owned();
    let mut out = String::with_capacity(event.payload.len() + 64);
    out.push_str("{\"uuid\":");
    go_string(&mut out, &uuid.hyphenated().to_string());
    out.push_str(",\"output\":");
    go_string(&mut out, fields.output.as_deref().unwrap_or(""));
    out.push_str(",\"priority\":");
    go_string(&mut out, event.priority.as_str());
    out.push_str(",\"rule\":");
    go_string(&mut out, &event.rule);
    out.push_str(",\"time\":");
    go_string(&mut out, &time);
    out.push_str(",\"output_fields\":");
    match &fields.output_fields {
        None => out.push_str("null"),
        Some(map) => {
            out.push('{');
            for (i, (key, value)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_string(&mut out, key);
                out.push(':');
                go_raw(&mut out, value)?;
            }
            out.push('}');
        }
    }
    out.push_str(",\"source\":");
    go_string(&mut out, &source);
    let mut tags: Vec<&str> = fields.tags.iter().flatten().map(|t| t.as_ref()).collect();
    if !tags.is_empty() {
        tags.sort_unstable();
        out.push_str(",\"tags\":[");
        for (i, tag) in tags.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            go_string(&mut out, tag);
        }
        out.push(']');
    }
    if !event.hostname.is_empty() {
        out.push_str(",\"hostname\":");
        go_string(&mut out, &event.hostname);
    }
    out.push('}');
    Ok(FalcoEvent {
        payload: Bytes::from(out),
        source,
        ..event
    })
}

/// A Falco time (RFC 3339) as Go's `time.Time` writes it back: the
/// fraction's trailing zeros cut, no fraction when it is zero. A missing
/// time is Go's zero time; text that is not RFC 3339 is refused, as
/// falcosidekick refuses the alert.
fn go_time(time: &str) -> Result<String, AlertError> {
    if time.is_empty() {
        return Ok("0001-01-01T00:00:00Z".to_owned());
    }
    let bad = || AlertError::NotAnAlert(format!("time {time:?} is not RFC 3339"));
    let b = time.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return Err(bad());
    }
    let (seconds, rest) = time.split_at(19);
    let (fraction, zone) = match rest.strip_prefix('.') {
        Some(r) => {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            if n == 0 || n > 9 {
                return Err(bad());
            }
            r.split_at(n)
        }
        None => ("", rest),
    };
    let zone = match zone {
        "Z" | "z" => "Z",
        z if z.len() == 6
            && matches!(z.as_bytes()[0], b'+' | b'-')
            && z.as_bytes()[3] == b':'
            && z.as_bytes()[1..3].iter().all(u8::is_ascii_digit)
            && z.as_bytes()[4..6].iter().all(u8::is_ascii_digit) =>
        {
            // "+00:00" is UTC: Go writes Z.
            if &z[1..] == "00:00" {
                "Z"
            } else {
                z
            }
        }
        _ => return Err(bad()),
    };
    let fraction = fraction.trim_end_matches('0');
    let mut out = seconds.replacen('t', "T", 1);
    if !fraction.is_empty() {
        out.push('.');
        out.push_str(fraction);
    }
    out.push_str(zone);
    Ok(out)
}

/// A JSON string as Go's `encoding/json` writes it.
fn go_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                // Writing into a String cannot fail.
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One `output_fields` value as Go writes it back after reading it with
/// `UseNumber`: numbers, `true`, `false` and `null` as they are; strings
/// escaped as Go escapes; lists and objects written anew.
fn go_raw(out: &mut String, raw: &RawValue) -> Result<(), AlertError> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => {
            let s: String = serde_json::from_str(text).map_err(AlertError::Unreadable)?;
            go_string(out, &s);
        }
        Some(b'[' | b'{') => {
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(AlertError::Unreadable)?;
            go_value(out, &value);
        }
        _ => out.push_str(text),
    }
    Ok(())
}

fn go_value(out: &mut String, value: &serde_json::Value) {
    match value {
        serde_json::Value::String(s) => go_string(out, s),
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_value(out, item);
            }
            out.push(']');
        }
        serde_json::Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                go_string(out, key);
                out.push(':');
                go_value(out, item);
            }
            out.push('}');
        }
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "5d2bba3e-7b0e-4c86-a6f1-1f3e0b0f3a10";

    fn convert(line: &str) -> String {
        let event = FalcoEvent::from_json(Bytes::from(line.to_owned())).unwrap();
        let out = falcosidekick(event, &UUID.parse().unwrap()).unwrap();
        String::from_utf8(out.payload.to_vec()).unwrap()
    }

    #[test]
    fn a_falco_alert_becomes_falcosidekicks_payload() {
        let line = r#"{"hostname":"falco-xczjd","output":"13:44:05.478445995: Critical A shell <bash> & more","output_fields":{"container.id":"ee97d9c4186f","evt.time":1685022245478445995,"proc.tty":34816,"user.loginuid":-1,"user.name":"root","fd.name":null,"ratio":1.50},"priority":"Critical","rule":"Terminal shell in container","source":"syscall","tags":["shell","container","mitre_execution"],"time":"2023-05-25T13:44:05.478445000Z"}"#;
        assert_eq!(
            convert(line),
            format!(
                r#"{{"uuid":"{UUID}","output":"13:44:05.478445995: Critical A shell \u003cbash\u003e \u0026 more","priority":"Critical","rule":"Terminal shell in container","time":"2023-05-25T13:44:05.478445Z","output_fields":{{"container.id":"ee97d9c4186f","evt.time":1685022245478445995,"fd.name":null,"proc.tty":34816,"ratio":1.50,"user.loginuid":-1,"user.name":"root"}},"source":"syscall","tags":["container","mitre_execution","shell"],"hostname":"falco-xczjd"}}"#
            )
        );
    }

    #[test]
    fn falcosidekicks_defaults_for_what_is_missing() {
        // No source, tags, hostname, output_fields; a whole-second time.
        let line = r#"{"output":"x","priority":"Informational","rule":"R","time":"2023-05-25T13:44:05.000000000Z"}"#;
        assert_eq!(
            convert(line),
            format!(
                r#"{{"uuid":"{UUID}","output":"x","priority":"Informational","rule":"R","time":"2023-05-25T13:44:05Z","output_fields":null,"source":"syscalls","tags":[],"hostname":""}}"#
            )
            .replace(r#","tags":[]"#, "")
            .replace(r#","hostname":"""#, "")
        );
        let empty = r#"{"output":"x","priority":"Debug","rule":"Test rule","source":"","tags":[],"hostname":"","time":"2023-05-25T13:44:05.1+00:00"}"#;
        assert!(convert(empty).ends_with(
            r#""time":"2023-05-25T13:44:05.1Z","output_fields":null,"source":"internal"}"#
        ));
    }

    #[test]
    fn strings_are_escaped_as_go_escapes_them() {
        let mut out = String::new();
        go_string(&mut out, "a\"b\\c\nd\re\tf\u{1}g\u{7f}h\u{2028}i<>&é");
        assert_eq!(
            out,
            r#""a\"b\\c\nd\re\tf\u0001g\u{7f}h\u2028i\u003c\u003e\u0026é""#
                .replace("\\u{7f}", "\u{7f}")
        );
    }

    #[test]
    fn times_are_rfc3339_or_refused() {
        for (given, written) in [
            (
                "2023-05-25T13:44:05.478445995Z",
                "2023-05-25T13:44:05.478445995Z",
            ),
            ("2023-05-25T13:44:05.100000000Z", "2023-05-25T13:44:05.1Z"),
            ("2023-05-25T13:44:05Z", "2023-05-25T13:44:05Z"),
            ("2023-05-25T13:44:05.5+02:00", "2023-05-25T13:44:05.5+02:00"),
            ("", "0001-01-01T00:00:00Z"),
        ] {
            assert_eq!(go_time(given).unwrap(), written, "{given}");
        }
        for bad in [
            "yesterday",
            "2023-05-25 13:44:05Z",
            "2023-05-25T13:44:05.Z",
            "2023-05-25T13:44:05+0200",
        ] {
            assert!(go_time(bad).is_err(), "{bad}");
        }
    }
}
