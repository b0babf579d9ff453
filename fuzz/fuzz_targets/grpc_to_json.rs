//! gRPC to JSON: any decodable `falco.outputs.response` converts to valid
//! JSON (or a clear error for an unknown priority), never a panic.
//! The property lives in `falco_nats::fuzzing::grpc_to_json`, shared with the
//! stable mutation run in `tests/fuzz_smoke.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| falco_nats::fuzzing::grpc_to_json(data));
