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
const NOT_AVAILABLE: &str = "<NA>";

/// Converts one gRPC response into a [`FalcoEvent`].
///
/// An unknown priority number is an error: the caller counts and logs it.
pub fn event_from_response(mut response: Response) -> Result<FalcoEvent, AlertError> {
    let priority = Priority::from_number(response.priority)?;
    let source = source_name(&mut response);
    let payload = if is_json_output(&response.output) {
        // Falco's own JSON line: moved, not copied, less surrounding whitespace.
        let output = std::mem::take(&mut response.output);
        let trimmed = output.trim();
        if trimmed.len() == output.len() {
            Bytes::from(output)
        } else {
            Bytes::copy_from_slice(trimmed.as_bytes())
        }
    } else {
        Bytes::from(build_json(&response, priority, &source))
    };
    Ok(FalcoEvent {
        payload,
        priority,
        rule: response.rule,
        hostname: response.hostname,
        source,
        received_at: Instant::now(),
    })
}

/// The source as a string: field 9 (taken), or the deprecated enum for old Falco.
fn source_name(response: &mut Response) -> String {
    if !response.source.is_empty() {
        return std::mem::take(&mut response.source);
    }
    #[allow(deprecated)]
    let deprecated = response.source_deprecated;
    match deprecated {
        1 => "k8s_audit",
        2 => "internal",
        3 => "plugin",
        _ => crate::event::DEFAULT_SOURCE,
    }
    .to_owned()
}

/// Whether Falco already formatted the output as a JSON object.
fn is_json_output(output: &str) -> bool {
    let trimmed = output.trim();
    trimmed.starts_with('{') && serde_json::from_str::<serde::de::IgnoredAny>(trimmed).is_ok()
}

/// (Long: one object written key by key, in the order Falco sorts them;
/// split up, the order would be harder to see.)
/// Writes the Falco >= 0.39 layout directly: keys in sorted order, strings
/// escaped by serde_json, no intermediate JSON tree.
fn build_json(response: &Response, priority: Priority, source: &str) -> Vec<u8> {
    let (secs, nanos) = match &response.time {
        Some(t) => normalise(t.seconds, t.nanos),
        None => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            (now.as_secs() as i64, now.subsec_nanos())
        }
    };
    let mut fields: Vec<(&str, Field<'_>)> = response
        .output_fields
        .iter()
        .map(|(k, v)| (k.as_str(), Field::Text(v)))
        .collect();
    if !response.output_fields.contains_key("evt.time") {
        if let Some(ns) = secs
            .checked_mul(1_000_000_000)
            .and_then(|s| s.checked_add(i64::from(nanos)))
        {
            fields.push(("evt.time", Field::Int(ns)));
        }
    }
    // Byte order, as a sorted map of strings has it (the map is sorted; the
    // synthesised `evt.time` may need moving into place).
    fields.sort_by(|a, b| a.0.cmp(b.0));
    let mut tags: Vec<&str> = response.tags.iter().map(String::as_str).collect();
    tags.sort_unstable();

    let mut out = Vec::with_capacity(256 + response.output.len() * 2);
    out.extend_from_slice(b"{\"hostname\":");
    push_str(&mut out, &response.hostname);
    out.extend_from_slice(b",\"output\":");
    push_str(&mut out, &response.output);
    out.extend_from_slice(b",\"output_fields\":{");
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_str(&mut out, key);
        out.push(b':');
        match value {
            Field::Int(n) => push_json(&mut out, n),
            Field::Text(v) => push_typed(&mut out, key, v),
        }
    }
    out.extend_from_slice(b"},\"priority\":");
    push_str(&mut out, priority.as_str());
    out.extend_from_slice(b",\"rule\":");
    push_str(&mut out, &response.rule);
    out.extend_from_slice(b",\"source\":");
    push_str(&mut out, source);
    out.extend_from_slice(b",\"tags\":[");
    for (i, tag) in tags.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_str(&mut out, tag);
    }
    out.extend_from_slice(b"],\"time\":");
    push_str(&mut out, &format_rfc3339_nanos(secs, nanos));
    out.push(b'}');
    out
}

/// An `output_fields` value before it is written.
enum Field<'a> {
    /// As gRPC carried it.
    Text(&'a str),
    /// Synthesised (`evt.time`).
    Int(i64),
}

/// Writes a JSON value; serialising strings and numbers into a Vec cannot fail.
fn push_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(out, value);
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    push_json(out, s);
}

/// Writes a gRPC string value with its JSON type given back (see the module docs).
fn push_typed(out: &mut Vec<u8>, key: &str, value: &str) {
    if value == NOT_AVAILABLE {
        out.extend_from_slice(b"null");
        return;
    }
    if INTEGER_FIELDS.binary_search(&key).is_ok() {
        if let Ok(n) = value.parse::<i64>() {
            return push_json(out, &n);
        }
        if let Ok(n) = value.parse::<u64>() {
            return push_json(out, &n);
        }
    }
    if BOOLEAN_FIELDS.binary_search(&key).is_ok() && (value == "true" || value == "false") {
        out.extend_from_slice(value.as_bytes());
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
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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

    fn response() -> Response {
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
