//! The NATS side: connection flags in the style of the `nats` CLI, one
//! long-lived connection that reconnects forever, and the [`Publisher`] that
//! turns alerts into messages (core NATS or JetStream).

mod connection;
mod ledger;
mod publisher;
mod round_trip;
pub mod subject;

pub use connection::{
    connect, ConnectionMetrics, ConnectionWatch, DeniedSubjects, NatsConnection, NatsError,
    NatsOptions,
};
pub use ledger::{DeliveryLedger, CONFIRM_EVERY};
pub use publisher::{alert_headers, JetStreamOptions, PublishOptions, Publisher, StreamMismatch};
pub use round_trip::{round_trip, RoundTripError, ROUND_TRIP_TIMEOUT};
pub use subject::SubjectTemplate;
