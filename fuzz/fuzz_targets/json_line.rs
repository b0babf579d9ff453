//! The JSON line reader (FIFO, stdin, HTTP bodies): any bytes give an alert
//! or an error with a reason, never a panic; an accepted alert's payload is
//! the input less surrounding whitespace.
//! The property lives in `falco_nats::fuzzing::json_line`, shared with the
//! stable mutation run in `tests/fuzz_smoke.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| falco_nats::fuzzing::json_line(data));
