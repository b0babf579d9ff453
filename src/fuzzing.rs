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
