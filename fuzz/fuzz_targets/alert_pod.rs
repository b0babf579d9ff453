//! The responder's reading of the pod an alert names: any bytes give no
//! pod, an error, or a namespace and name that cannot bend a request path.
//! The property lives in `falco_nats::fuzzing::alert_pod`, shared with the
//! stable mutation run in `tests/fuzz_smoke.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| falco_nats::fuzzing::alert_pod(data));
