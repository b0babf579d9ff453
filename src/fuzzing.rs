//! The properties the fuzz targets check, in one place for both runs:
//! `fuzz/` (cargo-fuzz, coverage-guided, nightly, run by hand) and
//! `tests/fuzz_smoke.rs` (a seeded mutation run on stable, in `cargo test`).
//! Each function takes arbitrary bytes and panics only when the property
//! does not hold.

use bytes::Bytes;
use prost::Message;

use crate::alert::Alert;
use crate::convert::{event_from_response, event_from_response_at, event_from_wire_at};
use crate::event::{AlertError, FalcoEvent};
use crate::nats::subject::{SubjectTemplate, DEFAULT_SUBJECT};
use crate::proto::outputs::Response;
use crate::respond::policy::Policy;

/// The JSON line reader (FIFO, stdin, HTTP bodies): any bytes give an alert
/// or an error (with a reason, by its type); an accepted alert is forwarded
/// byte for byte, less surrounding whitespace, and renders valid subjects.
/// And it answers as serde_json did before the one-pass scan
/// ([`crate::scan`]): the same lines accepted with the same fields, the same
/// reasons for the rest (less the scan's limit on nesting).
pub fn json_line(data: &[u8]) {
    let result = FalcoEvent::from_json(Bytes::copy_from_slice(data));
    let fields = result.as_ref().map(|e| {
        (
            e.priority,
            e.rule.clone(),
            e.hostname.clone(),
            e.source.clone(),
        )
    });
    let reference = serde_reference::read(data);
    let nested = matches!(&result, Err(e) if e.to_string().contains("nested deeper"));
    if !nested {
        assert_eq!(
            reason(&result),
            reason(&reference),
            "scan: {result:?}, serde_json: {reference:?}"
        );
        if let (Ok(fields), Ok(expected)) = (&fields, &reference) {
            assert_eq!(fields, expected, "fields read");
        }
    }
    let Ok(event) = result else {
        return;
    };
    assert_eq!(
        &event.payload[..],
        data.trim_ascii(),
        "forwarded byte for byte"
    );
    for template in [DEFAULT_SUBJECT, "x.{hostname}.{source}.{priority}.{rule}"] {
        let template: SubjectTemplate = template.parse().expect("a valid template");
        assert_valid_subject(&template.render(&event));
    }
}

/// A subject NATS takes: tokens that are not empty, no wildcard, no
/// whitespace or control character, and far below the control-line limit.
fn assert_valid_subject(subject: &str) {
    assert!(subject.len() < 1024, "{} bytes", subject.len());
    for token in subject.split('.') {
        assert!(!token.is_empty(), "empty token in {subject:?}");
        assert!(token != "*" && token != ">", "wildcard in {subject:?}");
        assert!(
            !token.chars().any(|c| c.is_whitespace() || c.is_control()),
            "whitespace in {subject:?}"
        );
    }
}

/// `--format falcosidekick`: any accepted alert becomes JSON (or a clear
/// error, for a time that is not RFC 3339) with falcosidekick's keys in its
/// order, the alert's rule, priority and output, every `output_fields` value
/// as it was, a source, sorted tags, and a hostname exactly when it had one.
pub fn falcosidekick_payload(data: &[u8]) {
    let Ok(event) = FalcoEvent::from_json(Bytes::copy_from_slice(data)) else {
        return;
    };
    // The reader skips what it does not need without checking every escape
    // (a lone surrogate passes); serde_json's own reading is the reference.
    let Ok(original) = serde_json::from_slice::<serde_json::Value>(&event.payload) else {
        return;
    };
    let (rule, priority) = (event.rule.clone(), event.priority);
    let uuid = uuid::Uuid::nil();
    let Ok(converted) = crate::format::falcosidekick(event, &uuid) else {
        return;
    };
    let text = std::str::from_utf8(&converted.payload).expect("UTF-8");
    assert!(
        text.starts_with(r#"{"uuid":"00000000-0000-0000-0000-000000000000","output":"#),
        "{text}"
    );
    let out: serde_json::Value = serde_json::from_str(text).expect("the payload is JSON");
    assert_eq!(out["rule"], rule.as_str());
    assert_eq!(out["priority"], priority.as_str());
    assert_eq!(
        out["output"],
        original.get("output").cloned().unwrap_or("".into())
    );
    match original.get("output_fields") {
        Some(serde_json::Value::Object(fields)) => {
            let written = out["output_fields"].as_object().expect("an object");
            assert_eq!(written.len(), fields.len());
            for (key, value) in fields {
                assert_eq!(&written[key], value, "{key}");
            }
        }
        _ => assert!(out["output_fields"].is_null(), "{text}"),
    }
    assert!(!out["source"].as_str().expect("a source").is_empty());
    if let Some(tags) = out.get("tags") {
        let tags: Vec<&str> = tags
            .as_array()
            .expect("a list")
            .iter()
            .map(|t| t.as_str().expect("a string"))
            .collect();
        assert!(
            !tags.is_empty() && tags.windows(2).all(|w| w[0] <= w[1]),
            "{tags:?}"
        );
    }
    let hostname = original
        .get("hostname")
        .and_then(|h| h.as_str())
        .unwrap_or("");
    assert_eq!(
        out.get("hostname").and_then(|h| h.as_str()).unwrap_or(""),
        hostname
    );
    assert_eq!(out.get("hostname").is_some(), !hostname.is_empty());
}

/// gRPC to JSON: any bytes the wire reader converts as prost's decoder
/// and [`event_from_response`] do (the same alert, or an error with the
/// same reason), and any decodable `falco.outputs.response` converts to
/// JSON that parses (or to an error, for an unknown priority).
pub fn grpc_to_json(data: &[u8]) {
    fn clock() -> (i64, u32) {
        (1_700_000_000, 5)
    }
    let decoded = Response::decode(data);
    let by_wire = event_from_wire_at(Bytes::copy_from_slice(data), clock);
    let by_prost = decoded
        .clone()
        .map_err(AlertError::from)
        .and_then(|r| event_from_response_at(r, clock));
    match (&by_wire, &by_prost) {
        (Ok(wire), Ok(prost)) => {
            assert_eq!(
                (
                    &wire.payload,
                    wire.priority,
                    &wire.rule,
                    &wire.hostname,
                    &wire.source
                ),
                (
                    &prost.payload,
                    prost.priority,
                    &prost.rule,
                    &prost.hostname,
                    &prost.source
                ),
                "the wire reader and prost disagree"
            );
        }
        (Err(wire), Err(prost)) => assert_eq!(wire.reason(), prost.reason(), "{wire} / {prost}"),
        _ => panic!("the wire reader gives {by_wire:?}, prost {by_prost:?}"),
    }
    let Ok(response) = decoded else {
        return;
    };
    let built_from = response.clone();
    let Ok(event) = event_from_response(response) else {
        return;
    };
    let output = built_from.output.trim();
    if output.starts_with('{') && serde_json::from_str::<serde::de::IgnoredAny>(output).is_ok() {
        // Falco's own JSON line (`json_output: true`), forwarded as it came
        // (checked as the line inputs check theirs).
        assert_eq!(event.payload, output.as_bytes());
        return;
    }
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&event.payload) else {
        panic!(
            "the JSON must parse: {:?}",
            String::from_utf8_lossy(&event.payload)
        );
    };
    // Built from the fields: it reads back to them.
    assert_eq!(json["rule"], built_from.rule.as_str());
    assert_eq!(json["output"], built_from.output.as_str());
    assert_eq!(json["hostname"], built_from.hostname.as_str());
    assert_eq!(json["priority"], event.priority.as_str());
    let mut tags = built_from.tags.clone();
    tags.sort();
    assert_eq!(json["tags"], serde_json::json!(tags));
    let fields = json["output_fields"].as_object().expect("output_fields");
    for (key, value) in &built_from.output_fields {
        let written = &fields[key.as_str()];
        match written {
            serde_json::Value::String(s) => assert_eq!(s, value),
            serde_json::Value::Null => assert_eq!(value, "<NA>"),
            serde_json::Value::Number(n) => {
                let read = value.trim();
                let same = read.parse::<i64>().ok().map(serde_json::Number::from)
                    == Some(n.clone())
                    || read.parse::<u64>().ok().map(serde_json::Number::from) == Some(n.clone());
                assert!(same, "{key}: {value:?} written as {n}");
            }
            serde_json::Value::Bool(b) => assert_eq!(value.trim().parse::<bool>().ok(), Some(*b)),
            other => panic!("{key}: {value:?} written as {other}"),
        }
    }
}

/// Alerts a fuzzed policy is evaluated on.
const SAMPLE_ALERTS: [&str; 2] = [
    r#"{"rule":"Terminal shell in container","priority":"Critical","tags":["container","shell"],"source":"syscall","output_fields":{"k8s.ns.name":"shop","k8s.pod.name":"web"}}"#,
    r#"{"rule":"Drop and execute new binary in container","priority":"Notice","tags":[],"output_fields":{}}"#,
];

/// The policy parser: any text gives a policy that evaluates as documented,
/// or an error that points into the text.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse("fuzz.yaml", text) {
        // Evaluation picks, in the policy's order, the matching rules up to
        // the first that does not say `continue` (checked against a model).
        Ok(policy) => {
            for alert in SAMPLE_ALERTS {
                let alert = Alert::from_json(alert.as_bytes()).expect("a sample alert");
                let picked: Vec<*const _> = policy
                    .evaluate(&alert)
                    .into_iter()
                    .map(std::ptr::from_ref)
                    .collect();
                let mut model = Vec::new();
                for rule in &policy.rules {
                    if rule.matcher.matches(&alert) {
                        model.push(std::ptr::from_ref(rule));
                        if !rule.continue_after {
                            break;
                        }
                    }
                }
                assert_eq!(picked, model);
            }
        }
        // An error points into the text, when it names a line; YAML breaks
        // lines at a CR alone too.
        Err(e) => {
            if let Some(line) = e.line {
                let lines = 1 + text.replace("\r\n", "\n").matches(['\n', '\r']).count();
                assert!(line >= 1 && line <= lines + 1, "{e}");
            }
        }
    }
}

/// The responder's reading of an alert's pod: any bytes give no pod, an
/// error, or a pod whose namespace and name hold nothing a request path
/// could be bent with (only `[a-z0-9.-]`, within Kubernetes' lengths).
pub fn alert_pod(data: &[u8]) {
    let Ok(alert) = crate::alert::Alert::from_json(data) else {
        return;
    };
    if let Ok(Some(pod)) = alert.pod() {
        let path_safe = |s: &str, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && !s.contains("..")
        };
        assert!(path_safe(&pod.namespace, 63) && !pod.namespace.contains('.'));
        assert!(path_safe(&pod.name, 253));
        if let Some(uid) = &pod.uid {
            assert!(uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        }
    }
}

/// What `tail` prints of an alert: never a control character, whatever
/// the alert holds (colour codes aside, which `tail` writes itself).
pub fn tail_line(data: &[u8]) {
    if let Ok(alert) = crate::alert::Alert::from_json(data) {
        let line = crate::tail::format_alert(&alert, false);
        assert!(!line.chars().any(char::is_control), "{line:?}");
    }
    if let Ok(decision) = crate::decision::Decision::from_json(data) {
        let line = crate::tail::format_decision(&decision, false);
        assert!(!line.chars().any(char::is_control), "{line:?}");
    }
}

fn reason<T>(r: &Result<T, crate::event::AlertError>) -> &'static str {
    match r {
        Ok(_) => "accepted",
        Err(e) => e.reason(),
    }
}

/// How the bridge read an alert's fields before [`crate::scan`]: serde's
/// derive over serde_json, kept as the reference the scan is held to.
mod serde_reference {
    use std::borrow::Cow;

    use serde::Deserialize;

    use crate::event::{AlertError, DEFAULT_SOURCE};
    use crate::priority::Priority;

    #[derive(Deserialize)]
    struct AlertHead<'a> {
        #[serde(borrow, default)]
        priority: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        rule: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        hostname: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        source: Option<Cow<'a, str>>,
    }

    pub type Fields = (Priority, String, String, String);

    /// serde_json's refusal, as the scan's kind of error.
    fn not_json() -> crate::scan::ScanError {
        crate::scan::ScanError::Syntax {
            what: "serde_json refused it",
            at: 0,
        }
    }

    pub fn read(data: &[u8]) -> Result<Fields, AlertError> {
        let text = std::str::from_utf8(data.trim_ascii()).map_err(|_| AlertError::NotUtf8)?;
        let json = || serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok();
        // The scan's refusal; serde's derive read a struct from an array.
        if !text.starts_with('{') {
            return Err(if json() {
                AlertError::NotAnAlert("an alert is a JSON object".into())
            } else {
                AlertError::NotJson(not_json())
            });
        }
        let head: AlertHead<'_> = serde_json::from_str(text).map_err(|e| {
            // A number where a string belongs is a wrong type, even one out
            // of f64's range, which serde_json reports as it builds the
            // error message.
            let is_json = (matches!(e.classify(), serde_json::error::Category::Data)
                || e.to_string().starts_with("number out of range"))
                && json();
            if is_json {
                AlertError::Unreadable(e)
            } else {
                AlertError::NotJson(not_json())
            }
        })?;
        let priority = head
            .priority
            .ok_or(AlertError::MissingField("priority"))?
            .parse::<Priority>()?;
        let rule = head.rule.ok_or(AlertError::MissingField("rule"))?;
        Ok((
            priority,
            rule.into_owned(),
            head.hostname.map(Cow::into_owned).unwrap_or_default(),
            head.source
                .map(Cow::into_owned)
                .unwrap_or_else(|| DEFAULT_SOURCE.to_owned()),
        ))
    }
}
