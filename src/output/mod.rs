//! The NATS side: connection flags in the style of the `nats` CLI, one
//! long-lived connection that reconnects forever, and the [`Publisher`] that
//! turns alerts into messages (core NATS or JetStream).

mod connection;
mod ledger;
mod publisher;
pub mod subject;

pub use connection::{connect, ConnectionWatch, DeniedSubjects, NatsError, NatsOptions};
pub use ledger::{DeliveryLedger, CONFIRM_EVERY};
pub use publisher::{
    alert_headers, round_trip, JetStreamOptions, PublishOptions, Publisher, StreamMismatch,
};
pub use subject::SubjectTemplate;
