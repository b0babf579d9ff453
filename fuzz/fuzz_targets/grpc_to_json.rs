//! gRPC to JSON: any decodable `falco.outputs.response` converts to valid
//! JSON (or a clear error for an unknown priority), never a panic.
#![no_main]

use falco_nats::convert::event_from_response;
use falco_nats::proto::outputs::Response;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(response) = Response::decode(data) else { return };
    let json_output = response.output.trim_start().starts_with('{');
    if let Ok(event) = event_from_response(response) {
        let parsed = serde_json::from_slice::<serde_json::Value>(&event.payload);
        assert!(parsed.is_ok(), "the JSON must parse (json_output: {json_output})");
    }
});
