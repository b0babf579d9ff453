//! The NATS side: connection flags in the style of the `nats` CLI, one
//! long-lived connection that reconnects forever, and the [`Publisher`] that
//! turns alerts into messages (core NATS or JetStream).
//!
//! Dependencies run one way (`tests/it/architecture.rs` holds the whole
//! crate to it):
//! `publisher` → `jetstream` → `stream`, `fast_batch`, `acks`;
//! `publisher`, `jetstream`, `fast_batch` → `headers` → `memo`;
//! `connection` → `ledger` → `round_trip`; `subject` stands alone.

mod acks;
mod connection;
pub mod fast_batch;
mod headers;
mod jetstream;
mod ledger;
mod memo;
mod publisher;
mod round_trip;
mod stream;
pub mod subject;

pub use connection::{
    connect, ConnectionMetrics, ConnectionWatch, NatsConnection, NatsError, NatsOptions,
};
pub use fast_batch::FastBatches;
pub use headers::alert_headers;
pub use jetstream::JetStreamOptions;
pub use ledger::DeliveryLedger;
pub use publisher::{PublishOptions, Publisher};
pub use round_trip::{round_trip, RoundTripError};
pub use stream::StreamMismatch;
pub use subject::SubjectTemplate;
