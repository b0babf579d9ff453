//! [`Publisher`]: publishes alerts on core NATS (fire and forget, no flush
//! per alert; here) or JetStream (acknowledged, retried with the same
//! `Nats-Msg-Id` until stored, a bounded number in flight: `jetstream.rs`).

use std::sync::Arc;

use async_nats::Client;
use tokio::sync::mpsc;

use super::jetstream::{JetStreamOptions, JetStreamPublisher, BATCH};
use super::stream::StreamMismatch;
use crate::event::FalcoEvent;
use crate::nats::connection::NatsConnection;
use crate::nats::headers::alert_headers;
use crate::nats::ledger::DeliveryLedger;
use crate::nats::round_trip::round_trip;
use crate::nats::subject::SubjectTemplate;
use crate::signing::Signer;
use crate::telemetry::metrics::BridgeMetrics;

/// How alerts are published.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub subject: SubjectTemplate,
    /// `None` for core NATS.
    pub jetstream: Option<JetStreamOptions>,
    /// Signs every alert (`--sign-key`).
    pub signer: Option<Arc<Signer>>,
}

/// Publishes the alerts it receives until its queue closes.
// Built once per process: the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Publisher {
    Core(CorePublisher),
    JetStream(JetStreamPublisher),
}

/// Core NATS: `publish` hands the message to the connection task, which
/// batches writes; nothing waits for the server.
pub struct CorePublisher {
    client: Client,
    subject: SubjectTemplate,
    signer: Option<Arc<Signer>>,
    metrics: BridgeMetrics,
    ledger: DeliveryLedger,
}

impl Publisher {
    /// Publishes on `connection`: JetStream stops retrying alerts on the
    /// subjects the server refused to it; core NATS has its ledger count what
    /// a dropped connection may have lost.
    pub fn new(
        connection: NatsConnection,
        options: PublishOptions,
        metrics: BridgeMetrics,
    ) -> Self {
        let NatsConnection {
            client,
            denied,
            ledger,
        } = connection;
        match options.jetstream {
            None => Publisher::Core(CorePublisher {
                client,
                subject: options.subject,
                signer: options.signer,
                metrics,
                ledger,
            }),
            Some(js) => Publisher::JetStream(JetStreamPublisher::new(
                client,
                denied,
                options.subject,
                options.signer,
                js,
                metrics,
            )),
        }
    }

    /// Publishes until `alerts` is closed and empty, then waits for every
    /// acknowledgement (JetStream) and for the server to confirm it has
    /// everything published (core). Fails only when an existing stream
    /// cannot take the alerts.
    pub async fn run(self, alerts: mpsc::Receiver<FalcoEvent>) -> Result<(), StreamMismatch> {
        let (client, published, ledger) = match self {
            Publisher::Core(p) => {
                let ledger = p.ledger.clone();
                let (client, published) = p.run(alerts).await;
                (client, published, Some(ledger))
            }
            Publisher::JetStream(p) => {
                let (client, published) = p.run(alerts).await?;
                (client, published, None)
            }
        };
        // Nothing to confirm when nothing was published (and NATS may never
        // have been reachable: a round trip would wait for it).
        if published == 0 {
            return Ok(());
        }
        let mark = ledger.as_ref().map(DeliveryLedger::mark);
        match round_trip(&client).await {
            Ok(()) => {
                if let (Some(ledger), Some(mark)) = (ledger, mark) {
                    ledger.confirm(mark);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot confirm that NATS received the last alerts")
            }
        }
        Ok(())
    }
}

impl CorePublisher {
    async fn run(self, mut alerts: mpsc::Receiver<FalcoEvent>) -> (Client, u64) {
        let mut count = 0u64;
        let mut batch = Vec::with_capacity(BATCH);
        let confirmer = tokio::spawn(self.ledger.clone().confirm_forever(self.client.clone()));
        // Whatever is queued is taken at once: one wake-up for many alerts.
        while alerts.recv_many(&mut batch, BATCH).await > 0 {
            for event in batch.drain(..) {
                count += 1;
                self.publish(event).await;
            }
        }
        confirmer.abort();
        (self.client, count)
    }

    async fn publish(&self, event: FalcoEvent) {
        let subject = self.subject.subject(&event);
        let headers = alert_headers(&event, subject.as_str(), self.signer.as_deref());
        let received_at = event.received_at;
        match self
            .client
            .publish_with_headers(subject, headers, event.payload)
            .await
        {
            Ok(()) => {
                self.ledger.handed();
                self.metrics.published.inc();
                self.metrics
                    .publish_latency
                    .observe(received_at.elapsed().as_secs_f64());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded
                ) =>
            {
                self.metrics.unconfirmed.dec();
                self.metrics
                    .rejected
                    .get_or_create(&[("reason", "too_large_for_nats")])
                    .inc();
                tracing::error!(rule = ?event.rule, error = %e, "alert is larger than the NATS server's max_payload; dropped");
            }
            Err(e) => {
                self.metrics.unconfirmed.dec();
                self.metrics.publish_failures.inc();
                tracing::error!(rule = ?event.rule, error = %e, "publish failed; alert lost");
            }
        }
    }
}
