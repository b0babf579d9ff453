//! The JSON line reader (FIFO, stdin, HTTP bodies): any bytes give an alert
//! or an error with a reason, never a panic; an accepted alert's payload is
//! the input less surrounding whitespace.
#![no_main]

use bytes::Bytes;
use falco_nats::event::FalcoEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match FalcoEvent::from_json(Bytes::copy_from_slice(data)) {
        Ok(event) => {
            assert_eq!(&event.payload[..], data.trim_ascii(), "forwarded byte for byte");
            let _ = event.msg_id();
        }
        Err(e) => {
            let _ = e.reason();
        }
    }
});
