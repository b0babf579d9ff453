//! The NATS side: connection flags in the style of the `nats` CLI, one
//! long-lived connection that reconnects forever, and the [`Publisher`] that
//! turns alerts into messages (core NATS or JetStream).
//!
//! Dependencies run one way: `publisher` → `fast_batch` and `acks`, `connection` → `ledger` →
//! `round_trip`; `subject` stands alone.

mod acks;
mod connection;
pub mod fast_batch;
mod ledger;
mod memo;
mod publisher;
mod round_trip;
pub mod subject;

pub use connection::{
    connect, ConnectionMetrics, ConnectionWatch, NatsConnection, NatsError, NatsOptions,
};
pub use fast_batch::FastBatches;
pub use ledger::DeliveryLedger;
pub use publisher::{alert_headers, JetStreamOptions, PublishOptions, Publisher, StreamMismatch};
pub use round_trip::{round_trip, RoundTripError};
pub use subject::SubjectTemplate;
