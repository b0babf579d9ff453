//! The properties the fuzz targets check, in one place for both runs:
//! `fuzz/` (cargo-fuzz, coverage-guided, nightly, run by hand) and
//! `tests/fuzz_smoke.rs` (a seeded mutation run on stable, in `cargo test`).
//! Each function takes arbitrary bytes and panics only when the property
//! does not hold.

use bytes::Bytes;
use prost::Message;

use crate::convert::event_from_response;
use crate::event::FalcoEvent;
use crate::proto::outputs::Response;
use crate::respond::policy::Policy;

/// The JSON line reader (FIFO, stdin, HTTP bodies): any bytes give an alert
/// or an error with a reason; an accepted alert is forwarded byte for byte,
/// less surrounding whitespace.
pub fn json_line(data: &[u8]) {
    match FalcoEvent::from_json(Bytes::copy_from_slice(data)) {
        Ok(event) => {
            assert_eq!(
                &event.payload[..],
                data.trim_ascii(),
                "forwarded byte for byte"
            );
            assert!(!event.msg_id().is_empty());
        }
        Err(e) => assert!(!e.reason().is_empty()),
    }
}

/// gRPC to JSON: any decodable `falco.outputs.response` converts to JSON
/// that parses (or to an error, for an unknown priority).
pub fn grpc_to_json(data: &[u8]) {
    let Ok(response) = Response::decode(data) else {
        return;
    };
    let verbatim = response.output.trim_start().starts_with('{');
    if let Ok(event) = event_from_response(response) {
        let parsed = serde_json::from_slice::<serde_json::Value>(&event.payload);
        assert!(
            parsed.is_ok(),
            "the JSON must parse (verbatim json_output: {verbatim}): {:?}",
            String::from_utf8_lossy(&event.payload)
        );
    }
}

/// The policy parser: any text gives a policy with rules, or an error that
/// says where.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse("fuzz.yaml", text) {
        Ok(policy) => assert!(!policy.rules.is_empty()),
        Err(e) => assert!(!e.to_string().is_empty()),
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
