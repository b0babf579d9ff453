//! falco-nats: carries Falco's runtime-security alerts onto NATS, and acts on them.
//!
//! The library holds every component; `main.rs` only parses the command line
//! and calls into it, so tests start the real thing in-process.

#![forbid(unsafe_code)]

pub mod alert;
pub mod backoff;
pub mod bridge;
pub mod cli;
pub mod convert;
pub mod decision;
pub mod drain;
pub mod event;
#[doc(hidden)]
pub mod fuzzing;
pub mod input;
pub mod nats;
pub mod priority;
pub mod proto;
pub mod respond;
pub mod server;
pub mod simulate;
pub mod tail;
pub mod telemetry;
