//! `--format falcosidekick`: any accepted alert becomes JSON in
//! falcosidekick's shape that keeps the alert's fields, never a panic.
//! The property lives in `falco_nats::fuzzing::falcosidekick_payload`,
//! shared with the stable mutation run in `tests/it/fuzz_smoke.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| falco_nats::fuzzing::falcosidekick_payload(data));
