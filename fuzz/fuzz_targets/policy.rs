//! The policy parser: any text gives a policy or an error with a location,
//! never a panic.
#![no_main]

use falco_nats::respond::policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Policy::parse("fuzz.yaml", text) {
        Ok(policy) => assert!(!policy.rules.is_empty()),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
