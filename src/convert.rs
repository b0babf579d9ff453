//! Turns a gRPC `falco.outputs.response` into Falco's documented JSON alert.
//!
//! With Falco's `json_output: true`, `response.output` already is Falco's JSON
//! line and is forwarded byte for byte. Otherwise the JSON is built from the
//! response's fields in the layout of Falco >= 0.39: compact, keys sorted
//! (`hostname, output, output_fields, priority, rule, source, tags, time`),
//! keys of `output_fields` sorted too.
//!
//! What cannot be exact: gRPC carries every `output_fields` value as a string.
//! `"<NA>"` becomes `null`, and the fields in [`INTEGER_FIELDS`] and
//! [`BOOLEAN_FIELDS`] get their JSON types back; every other value stays a
//! string, so a list (`"(a,b)"`) or a numeric field we do not know of differs
//! from what Falco's own JSON output would hold. `evt.time`, missing from the
//! maps of Falco >= 0.39, is synthesised from `response.time`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::event::{AlertError, FalcoEvent};
use crate::priority::Priority;
use crate::proto::outputs::Response;
use prost::Message;

mod wire;

/// `output_fields` whose values are integers in Falco's JSON output.
pub const INTEGER_FIELDS: &[&str] = &[
    "evt.count",
    "evt.cpu",
    "evt.num",
    "evt.rawres",
    "evt.rawtime",
    "evt.time",
    "fd.cport",
    "fd.dport",
    "fd.ino",
    "fd.lport",
    "fd.num",
    "fd.rport",
    "fd.sport",
    "group.gid",
    "proc.pgid",
    "proc.pid",
    "proc.ppid",
    "proc.pvpid",
    "proc.sid",
    "proc.tty",
    "proc.vpgid",
    "proc.vpid",
    "thread.tid",
    "thread.vtid",
    "user.loginuid",
    "user.uid",
];

/// `output_fields` whose values are booleans in Falco's JSON output.
pub const BOOLEAN_FIELDS: &[&str] = &[
    "container.privileged",
    "evt.is_open_exec",
    "evt.is_open_read",
    "evt.is_open_write",
    "proc.is_exe_from_memfd",
    "proc.is_exe_upper_layer",
    "proc.is_exe_writable",
    "proc.is_sid_leader",
    "proc.is_vpgid_leader",
];

/// Falco's marker for a field without a value.
const NOT_AVAILABLE: &[u8] = b"<NA>";
/// The field synthesised from `response.time` where the map has none.
const EVT_TIME: &[u8] = b"evt.time";

/// Converts one gRPC response into a [`FalcoEvent`].
///
/// An unknown priority number is an error: the caller counts and logs it.
pub fn event_from_response(response: Response) -> Result<FalcoEvent, AlertError> {
    event_from_response_at(response, utc_now)
}

/// [`event_from_response`] with the clock it reads when the message has no time.
pub(crate) fn event_from_response_at(
    response: Response,
    now: fn() -> (i64, u32),
) -> Result<FalcoEvent, AlertError> {
    #[allow(deprecated)]
    let deprecated = response.source_deprecated;
    let fields = response
        .output_fields
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect();
    let parts = Parts {
        time: response.time.as_ref().map(|t| (t.seconds, t.nanos)),
        priority: Priority::from_number(response.priority)?,
        rule: &response.rule,
        output: &response.output,
        // A map: sorted, each key once.
        fields,
        hostname: &response.hostname,
        tags: response.tags.iter().map(String::as_bytes).collect(),
        source: source_name(&response.source, deprecated),
        size: response.output.len() * 3,
    };
    Ok(parts.event(now))
}

/// Converts one gRPC response from its protobuf bytes (as Falco sent them)
/// into a [`FalcoEvent`]: the same alert as [`event_from_response`] of the
/// decoded message, without building the message. Falco's own JSON line
/// (`json_output: true`) is copied out: a slice would hold tonic's whole
/// read buffer for as long as the alert waits in the queue.
pub fn event_from_wire(message: Bytes) -> Result<FalcoEvent, AlertError> {
    event_from_wire_at(message, utc_now)
}

/// [`event_from_wire`] with the clock it reads when the message has no time.
pub(crate) fn event_from_wire_at(
    message: Bytes,
    now: fn() -> (i64, u32),
) -> Result<FalcoEvent, AlertError> {
    let Ok(wire) = wire::read(&message) else {
        // Groups, errors, anything odd: prost's answer stands.
        return event_from_response_at(Response::decode(message)?, now);
    };
    let parts = Parts {
        time: wire.time,
        priority: Priority::from_number(wire.priority)?,
        rule: wire.rule,
        output: wire.output,
        fields: wire.fields,
        hostname: wire.hostname,
        tags: wire.tags,
        source: source_name(wire.source, wire.source_deprecated),
        size: message.len(),
    };
    Ok(parts.event(now))
}

/// Seconds and nanoseconds since the epoch, now.
fn utc_now() -> (i64, u32) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_secs() as i64, now.subsec_nanos())
}

/// The source's name: field 9, or the deprecated enum for old Falco.
fn source_name(source: &str, deprecated: i32) -> &str {
    if !source.is_empty() {
        return source;
    }
    match deprecated {
        1 => "k8s_audit",
        2 => "internal",
        3 => "plugin",
        _ => crate::event::DEFAULT_SOURCE,
    }
}

/// One alert's parts as gRPC carried them, borrowed from a decoded
/// `Response` or from its bytes.
struct Parts<'a> {
    time: Option<(i64, i32)>,
    priority: Priority,
    rule: &'a str,
    output: &'a str,
    /// `output_fields`: sorted by key, each key once; UTF-8.
    fields: Vec<(&'a [u8], &'a [u8])>,
    hostname: &'a str,
    /// UTF-8.
    tags: Vec<&'a [u8]>,
    source: &'a str,
    /// About how long the alert's JSON will be.
    size: usize,
}

impl Parts<'_> {
    /// The alert: Falco's own JSON line if `output` is one, else the JSON
    /// built from the parts.
    fn event(mut self, now: fn() -> (i64, u32)) -> FalcoEvent {
        let payload = match json_output(self.output) {
            Some(line) => Bytes::copy_from_slice(line.as_bytes()),
            None => Bytes::from(self.json(now)),
        };
        FalcoEvent {
            payload,
            priority: self.priority,
            rule: self.rule.to_owned(),
            hostname: self.hostname.to_owned(),
            source: self.source.to_owned(),
            received_at: Instant::now(),
        }
    }

    /// (Long: one object written key by key, in the order Falco sorts them;
    /// split up, the order would be harder to see.)
    /// Writes the Falco >= 0.39 layout directly: keys in sorted order, no
    /// intermediate JSON tree.
    fn json(&mut self, now: fn() -> (i64, u32)) -> Vec<u8> {
        let (secs, nanos) = match self.time {
            Some((secs, nanos)) => normalise(secs, nanos),
            None => now(),
        };
        let evt_time = secs
            .checked_mul(1_000_000_000)
            .and_then(|s| s.checked_add(i64::from(nanos)));
        self.tags.sort_unstable();

        let mut out = Vec::with_capacity(self.size + self.size / 4 + 160);
        out.extend_from_slice(b"{\"hostname\":");
        push_str(&mut out, self.hostname.as_bytes());
        out.extend_from_slice(b",\"output\":");
        push_str(&mut out, self.output.as_bytes());
        out.extend_from_slice(b",\"output_fields\":{");
        // `evt.time` is synthesised where the map has none, in its place
        // in byte order.
        let (before, after, synthesised) = match (
            evt_time,
            self.fields.binary_search_by(|(k, _)| (*k).cmp(EVT_TIME)),
        ) {
            (Some(ns), Err(at)) => (&self.fields[..at], &self.fields[at..], Some(ns)),
            _ => (&self.fields[..], &[][..], None),
        };
        let written = before
            .iter()
            .map(|&(key, value)| (key, Field::Text(value)))
            .chain(synthesised.map(|ns| (EVT_TIME, Field::Int(ns))))
            .chain(after.iter().map(|&(key, value)| (key, Field::Text(value))));
        for (i, (key, value)) in written.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_str(&mut out, key);
            out.push(b':');
            match value {
                Field::Text(value) => push_typed(&mut out, key, value),
                Field::Int(ns) => push_int(&mut out, ns),
            }
        }
        out.extend_from_slice(b"},\"priority\":");
        push_str(&mut out, self.priority.as_str().as_bytes());
        out.extend_from_slice(b",\"rule\":");
        push_str(&mut out, self.rule.as_bytes());
        out.extend_from_slice(b",\"source\":");
        push_str(&mut out, self.source.as_bytes());
        out.extend_from_slice(b",\"tags\":[");
        for (i, tag) in self.tags.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_str(&mut out, tag);
        }
        out.extend_from_slice(b"],\"time\":\"");
        push_rfc3339_nanos(&mut out, secs, nanos);
        out.extend_from_slice(b"\"}");
        out
    }
}

/// An `output_fields` value before it is written.
enum Field<'a> {
    /// As gRPC carried it (UTF-8).
    Text(&'a [u8]),
    /// Synthesised (`evt.time`).
    Int(i64),
}

/// Falco's own JSON line, if `output` is one (`json_output: true`), less
/// surrounding whitespace.
fn json_output(output: &str) -> Option<&str> {
    let trimmed = output.trim();
    (trimmed.starts_with('{') && serde_json::from_str::<serde::de::IgnoredAny>(trimmed).is_ok())
        .then_some(trimmed)
}

/// Writes `s` (UTF-8) as a JSON string, escaped as serde_json escapes it:
/// runs of plain characters copied whole, `"`, `\` and control characters
/// escaped.
fn push_str(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let mut rest = s;
    loop {
        let plain = crate::scan::plain_run(rest);
        out.extend_from_slice(&rest[..plain]);
        let Some(&c) = rest.get(plain) else { break };
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(c >> 4)],
                HEX[usize::from(c & 0xf)],
            ]),
        }
        rest = &rest[plain + 1..];
    }
    out.push(b'"');
}

fn push_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Writes a gRPC string value (UTF-8) with its JSON type given back (see
/// the module docs).
fn push_typed(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    if value == NOT_AVAILABLE {
        out.extend_from_slice(b"null");
        return;
    }
    let listed = |list: &[&str]| list.binary_search_by(|k| k.as_bytes().cmp(key)).is_ok();
    // The value first: most are not numbers, and few are booleans.
    if matches!(value.first(), Some(b'0'..=b'9' | b'-' | b'+')) {
        let number = std::str::from_utf8(value).unwrap_or_default();
        if let Ok(n) = number.parse::<i64>() {
            if listed(INTEGER_FIELDS) {
                return push_int(out, n);
            }
        } else if let Ok(n) = number.parse::<u64>() {
            if listed(INTEGER_FIELDS) {
                return push_int(out, n);
            }
        }
    } else if (value == b"true" || value == b"false") && listed(BOOLEAN_FIELDS) {
        out.extend_from_slice(value);
        return;
    }
    push_str(out, value);
}

/// Brings `nanos` into `0..1e9`, carrying into `secs`.
fn normalise(secs: i64, nanos: i32) -> (i64, u32) {
    let extra = i64::from(nanos).div_euclid(1_000_000_000);
    let nanos = i64::from(nanos).rem_euclid(1_000_000_000) as u32;
    (secs.saturating_add(extra), nanos)
}

/// Formats a UTC instant as Falco does: RFC 3339, nine fractional digits, `Z`.
pub fn format_rfc3339_nanos(secs: i64, nanos: u32) -> String {
    let mut out = Vec::with_capacity(30);
    push_rfc3339_nanos(&mut out, secs, nanos);
    String::from_utf8(out).expect("digits and ASCII punctuation")
}

/// Writes [`format_rfc3339_nanos`]'s text; digit by digit for years 0 to 9999.
fn push_rfc3339_nanos(out: &mut Vec<u8>, secs: i64, nanos: u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let year = match u32::try_from(year) {
        Ok(year @ 0..=9999) if nanos < 1_000_000_000 => year,
        _ => {
            let text = format!(
                "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{nanos:09}Z"
            );
            out.extend_from_slice(text.as_bytes());
            return;
        }
    };
    push_digits(out, year, 4);
    for (separator, n, width) in [
        (b'-', month, 2),
        (b'-', day, 2),
        (b'T', hour, 2),
        (b':', minute, 2),
        (b':', second, 2),
        (b'.', nanos, 9),
    ] {
        out.push(separator);
        push_digits(out, n, width);
    }
    out.push(b'Z');
}

/// Writes the last `width` decimal digits of `n`, leading zeros included.
fn push_digits(out: &mut Vec<u8>, n: u32, width: u32) {
    for i in (0..width).rev() {
        out.push(b'0' + (n / 10u32.pow(i) % 10) as u8);
    }
}

/// Proleptic Gregorian date of a count of days since 1970-01-01
/// (the well-known era-based conversion).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Timestamp;
    use serde_json::Value;

    /// An alert with text output (also the wire reader's tests' fixture).
    pub(super) fn response() -> Response {
        Response {
            time: Some(Timestamp {
                seconds: 1_685_022_245,
                nanos: 478_445_995,
            }),
            priority: 5,
            rule: "Terminal shell in container".into(),
            output: "13:44:05.478445995: Notice A shell was spawned in a container".into(),
            output_fields: [
                ("user.name", "root"),
                ("container.id", "ee97d9c4186f"),
                ("proc.tty", "34816"),
                ("user.loginuid", "-1"),
                ("k8s.pod.name", "<NA>"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            hostname: "falco-xczjd".into(),
            tags: vec!["shell".into(), "container".into(), "mitre_execution".into()],
            source: "syscall".into(),
            ..Default::default()
        }
    }

    fn json(r: Response) -> String {
        String::from_utf8(event_from_response(r).unwrap().payload.to_vec()).unwrap()
    }

    #[test]
    fn sorted_keys_are_not_assumed_the_tables_are_sorted() {
        assert!(INTEGER_FIELDS.windows(2).all(|w| w[0] < w[1]));
        assert!(BOOLEAN_FIELDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn builds_falco_039_layout() {
        let expected = concat!(
            r#"{"hostname":"falco-xczjd","#,
            r#""output":"13:44:05.478445995: Notice A shell was spawned in a container","#,
            r#""output_fields":{"container.id":"ee97d9c4186f","evt.time":1685022245478445995,"#,
            r#""k8s.pod.name":null,"proc.tty":34816,"user.loginuid":-1,"user.name":"root"},"#,
            r#""priority":"Notice","rule":"Terminal shell in container","source":"syscall","#,
            r#""tags":["container","mitre_execution","shell"],"time":"2023-05-25T13:44:05.478445995Z"}"#
        );
        assert_eq!(json(response()), expected);
    }

    #[test]
    fn escapes_like_falco() {
        let mut r = response();
        r.output = "naïve \"quoted\" \\ tab\t nl\n bell\u{7} ünïcødé 🐧".into();
        r.output_fields.clear();
        r.tags.clear();
        r.rule = "Règle".into();
        let expected = concat!(
            r#"{"hostname":"falco-xczjd","#,
            r#""output":"naïve \"quoted\" \\ tab\t nl\n bell\u0007 ünïcødé 🐧","#,
            r#""output_fields":{"evt.time":1685022245478445995},"#,
            r#""priority":"Notice","rule":"Règle","source":"syscall","tags":[],"#,
            r#""time":"2023-05-25T13:44:05.478445995Z"}"#
        );
        assert_eq!(json(r), expected);
    }

    #[test]
    fn forwards_json_output_verbatim() {
        let line = r#"{"hostname":"h","output":"x ü","output_fields":{"evt.time":1,"proc.pid":"odd but kept"},"priority":"Critical","rule":"R","source":"syscall","tags":[],"time":"2023-05-25T13:44:05.478445995Z"}"#;
        let mut r = response();
        r.output = line.to_owned();
        r.priority = 2;
        let ev = event_from_response(r).unwrap();
        assert_eq!(ev.payload, line.as_bytes());
        assert_eq!(ev.priority, Priority::Critical);
        assert_eq!(ev.rule, "Terminal shell in container");
    }

    #[test]
    fn text_that_only_looks_like_json_is_not_forwarded() {
        let mut r = response();
        r.output = "{not json} Notice something".into();
        let out = json(r);
        assert!(
            out.starts_with(r#"{"hostname":"falco-xczjd","output":"{not json} Notice something""#)
        );
    }

    #[test]
    fn keeps_existing_evt_time_and_types_booleans() {
        let mut r = response();
        r.output_fields.insert("evt.time".into(), "42".into());
        r.output_fields
            .insert("container.privileged".into(), "true".into());
        r.output_fields
            .insert("proc.pid".into(), "not-a-number".into());
        r.output_fields.insert("fd.name".into(), "(a,b)".into());
        let v: Value = serde_json::from_str(&json(r)).unwrap();
        let f = &v["output_fields"];
        assert_eq!(f["evt.time"], Value::from(42));
        assert_eq!(f["container.privileged"], Value::Bool(true));
        assert_eq!(f["proc.pid"], Value::from("not-a-number"));
        assert_eq!(f["fd.name"], Value::from("(a,b)"));
    }

    #[test]
    fn unknown_priority_is_an_error() {
        let mut r = response();
        r.priority = 9;
        let err = event_from_response(r).unwrap_err();
        assert_eq!(err.reason(), "unknown_priority");
        assert!(err.to_string().contains('9'));
    }

    #[test]
    fn internal_source_from_deprecated_enum() {
        let mut r = response();
        r.source.clear();
        #[allow(deprecated)]
        {
            r.source_deprecated = 2;
        }
        r.tags.clear();
        let v: Value = serde_json::from_str(&json(r)).unwrap();
        assert_eq!(v["source"], "internal");
        assert_eq!(v["tags"], Value::Array(vec![]));
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut every: String = (0u8..0x80).map(char::from).collect();
        every.push_str("ünïcødé 🐧 \u{2028}");
        for s in [
            every.as_str(),
            "",
            "plain",
            "\"",
            "a\u{1f}b",
            "twelve bytes\n",
        ] {
            let mut out = Vec::new();
            push_str(&mut out, s.as_bytes());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }

    #[test]
    fn the_wire_path_gives_the_same_alert_and_refuses_what_does_not_decode() {
        let r = response();
        let wire = event_from_wire(Bytes::from(r.encode_to_vec())).unwrap();
        assert_eq!(wire.payload, event_from_response(r).unwrap().payload);
        let err = event_from_wire(Bytes::from_static(b"\x22\x05cut")).unwrap_err();
        assert_eq!(err.reason(), "not_protobuf");
        assert!(err.to_string().contains("gRPC message"), "{err}");
    }

    #[test]
    fn formats_time() {
        assert_eq!(format_rfc3339_nanos(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            format_rfc3339_nanos(951_782_400, 5),
            "2000-02-29T00:00:00.000000005Z"
        );
        assert_eq!(
            format_rfc3339_nanos(-1, 999_999_999),
            "1969-12-31T23:59:59.999999999Z"
        );
        assert_eq!(
            format_rfc3339_nanos(4_102_444_799, 0),
            "2099-12-31T23:59:59.000000000Z"
        );
        assert_eq!(normalise(10, -1), (9, 999_999_999));
        assert_eq!(normalise(10, 1_500_000_000), (11, 500_000_000));
    }
}
