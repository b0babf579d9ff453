//! What `tail` prints of any message: never a control character.
//! The property lives in `falco_nats::fuzzing::tail_line`, shared with the
//! stable mutation run in `tests/fuzz_smoke.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| falco_nats::fuzzing::tail_line(data));
