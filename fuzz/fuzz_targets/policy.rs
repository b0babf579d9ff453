//! The policy parser: any text gives a policy or an error with a location,
//! never a panic.
//! The property lives in `falco_nats::fuzzing::policy`, shared with the
//! stable mutation run in `tests/fuzz_smoke.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| falco_nats::fuzzing::policy(data));
