//! Publishing to JetStream: every alert acknowledged by the stream, or
//! retried with the same `Nats-Msg-Id` until it is (one acknowledgement
//! each, read on one subscription by [`Acks`]), or in fast batches
//! ([`FastBatches`]) where the stream allows them; an alert the stream
//! refuses for good is counted and dropped, never retried.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;

use super::stream::{ensure_stream, permanent_refusal, stream_refuses, StreamMismatch};
use crate::backoff::Backoff;
use crate::event::FalcoEvent;
use crate::nats::acks::{AckAnswer, Acks};
use crate::nats::connection::DeniedSubjects;
use crate::nats::fast_batch::{BatchOutcome, FastBatches};
use crate::nats::headers::alert_headers;
use crate::nats::subject::SubjectTemplate;
use crate::signing::Signer;
use crate::telemetry::metrics::BridgeMetrics;

/// Alerts taken off the queue at once.
pub(super) const BATCH: usize = 64;

/// JetStream publishing.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// The stream, created if missing over the template's subjects.
    pub stream: String,
    /// JetStream drops a message whose `Nats-Msg-Id` it saw within this window.
    pub duplicate_window: Duration,
    /// Age limit of a stream created by the bridge (zero: unlimited).
    pub max_age: Duration,
    /// Size limit of a stream created by the bridge, in bytes (0:
    /// unlimited): what it stores cannot take the room the responders'
    /// buckets (the kill switch) need on the same server.
    pub max_bytes: u64,
    /// Publishes awaiting their acknowledgement at most.
    pub max_inflight: usize,
    /// Replicas of a stream the bridge creates (clustered JetStream); when
    /// set, an existing stream must have as many.
    pub replicas: Option<usize>,
    /// Create the stream with `allow_batched` and publish in fast batches
    /// when the stream allows them (nats-server 2.14 and later).
    pub fast_batch: bool,
}

/// JetStream: every alert is acknowledged by the stream, or retried.
pub struct JetStreamPublisher {
    client: Client,
    context: jetstream::Context,
    subject: SubjectTemplate,
    signer: Option<Arc<Signer>>,
    options: JetStreamOptions,
    metrics: BridgeMetrics,
    denied: DeniedSubjects,
}

impl JetStreamPublisher {
    /// Publishes on `client`; stops retrying alerts on the subjects in
    /// `denied` (the server refused them to this connection).
    pub fn new(
        client: Client,
        denied: DeniedSubjects,
        subject: SubjectTemplate,
        signer: Option<Arc<Signer>>,
        options: JetStreamOptions,
        metrics: BridgeMetrics,
    ) -> Self {
        JetStreamPublisher {
            context: jetstream::ContextBuilder::new()
                .max_ack_inflight(options.max_inflight.max(1))
                .build(client.clone()),
            client,
            subject,
            signer,
            options,
            metrics,
            denied,
        }
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.options.stream.clone(),
            subjects: self.subject.stream_subjects(),
            duplicate_window: self.options.duplicate_window,
            max_age: self.options.max_age,
            max_bytes: match self.options.max_bytes {
                0 => -1,
                n => i64::try_from(n).unwrap_or(i64::MAX),
            },
            discard: stream::DiscardPolicy::Old,
            num_replicas: self.options.replicas.unwrap_or(1),
            storage: stream::StorageType::File,
            allow_batch_publish: self.options.fast_batch,
            ..Default::default()
        }
    }

    pub(super) async fn run(
        self,
        mut alerts: mpsc::Receiver<FalcoEvent>,
    ) -> Result<(Client, u64), StreamMismatch> {
        // Shared by every in-flight publish: only needed again if the stream vanishes.
        let config = Arc::new(self.stream_config());
        // Wait for the stream, unless the input stops with nothing to publish.
        let existing = tokio::select! {
            ready = ensure_stream(&self.context, &config, &self.subject, self.options.replicas) => ready?,
            _ = closed_and_empty(&alerts) => return Ok((self.client, 0)),
        };
        let batches = match (self.options.fast_batch, existing.allow_batch_publish) {
            (true, true) => {
                match FastBatches::new(self.client.clone(), BATCH_ACK_WAIT, self.signer.clone())
                    .await
                {
                    Ok(batches) => Some(batches),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot subscribe for fast batch replies; acknowledging each alert");
                        None
                    }
                }
            }
            (true, false) => {
                tracing::info!(stream = %config.name, "the stream does not allow batched publishing (allow_batched, nats-server 2.14+); acknowledging each alert");
                None
            }
            (false, _) => None,
        };
        let count = match batches {
            Some(batches) => self.run_batched(alerts, batches, &config).await,
            None => self.run_each(&mut alerts, &config, None).await.0,
        };
        Ok((self.client, count))
    }

    /// One acknowledgement per alert, at most `max_inflight` awaited at
    /// once, until the queue is closed or (when given) `until` has come.
    /// Returns the alerts taken, and whether the queue was closed. The first
    /// attempt is a plain publish whose acknowledgement comes back with the
    /// others on one subscription ([`Acks`]); an alert whose first attempt
    /// fails goes on retrying alone.
    async fn run_each(
        &self,
        alerts: &mut mpsc::Receiver<FalcoEvent>,
        config: &Arc<stream::Config>,
        until: Option<tokio::time::Instant>,
    ) -> (u64, bool) {
        let mut count = 0u64;
        let mut closed = false;
        let max = self.options.max_inflight.max(1);
        // Without a subscription for the answers (the client is closed),
        // every alert is retried alone until the connection is back.
        let mut acks = match Acks::new(self.client.clone(), ACK_WAIT).await {
            Ok(acks) => Some(acks),
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe for acknowledgements; publishing alert by alert");
                None
            }
        };
        let mut retries = FuturesUnordered::new();
        // Whatever is queued is taken at once (as much as the in-flight
        // bound leaves room for): one pass of the loop for many alerts.
        let mut taken = Vec::with_capacity(BATCH);
        let stop = async {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stop);
        loop {
            let waiting = acks.as_ref().map_or(0, Acks::len);
            let room = max.saturating_sub(waiting + retries.len()).min(BATCH);
            tokio::select! {
                biased;
                Some(answer) = next_answer(&mut acks), if waiting > 0 => {
                    if let Some((event, e)) = self.answered(answer) {
                        retries.push(self.publish_one(config, event, Some(e)));
                    }
                }
                Some(()) = retries.next(), if !retries.is_empty() => {}
                n = alerts.recv_many(&mut taken, room), if room > 0 => {
                    if n == 0 {
                        closed = true;
                        break;
                    }
                    for event in taken.drain(..) {
                        count += 1;
                        let Some(acks) = acks.as_mut() else {
                            retries.push(self.publish_one(config, event, None));
                            continue;
                        };
                        let subject = self.subject.subject(&event);
                        let headers =
                            alert_headers(&event, subject.as_str(), self.signer.as_deref());
                        if let Err(failed) = acks.publish(subject, headers, event).await {
                            let (event, e) = *failed;
                            retries.push(self.publish_one(config, event, Some(e)));
                        }
                    }
                }
                () = &mut stop => break,
            }
        }
        while let Some(answer) = next_answer(&mut acks).await {
            if let Some((event, e)) = self.answered(answer) {
                retries.push(self.publish_one(config, event, Some(e)));
            }
        }
        while retries.next().await.is_some() {}
        (count, closed)
    }

    /// Records a stored alert; gives back one that failed, to retry.
    fn answered(
        &self,
        answer: AckAnswer,
    ) -> Option<(FalcoEvent, jetstream::context::PublishError)> {
        match answer {
            AckAnswer::Stored { event, duplicate } => {
                record_stored(&self.metrics, &event, duplicate);
                None
            }
            AckAnswer::Failed { event, error } => Some((event, error)),
        }
    }

    /// Alerts go out in fast batches, at most `max_inflight` unconfirmed.
    /// When a batch fails, what it left unconfirmed is published again
    /// alert by alert (the message ids keep one copy of each), and alerts
    /// are acknowledged one by one for a while: a batch that keeps failing
    /// must not cost a time-out each.
    async fn run_batched(
        &self,
        mut alerts: mpsc::Receiver<FalcoEvent>,
        mut batches: FastBatches,
        config: &Arc<stream::Config>,
    ) -> u64 {
        let mut count = 0u64;
        let mut outcome = Outcome {
            metrics: &self.metrics,
            denied: &self.denied,
        };
        loop {
            let run = batches
                .run(
                    &self.subject,
                    &mut alerts,
                    self.options.max_inflight,
                    &mut outcome,
                    &mut count,
                )
                .await;
            let Err(failure) = run else {
                return count;
            };
            self.metrics.fast_batches_failed.inc();
            tracing::warn!(error = %failure.error, unconfirmed = failure.unconfirmed.len(), "fast batch failed; publishing its unconfirmed alerts one by one");
            let mut each: FuturesUnordered<_> = failure
                .unconfirmed
                .into_iter()
                .map(|event| self.publish_one(config, event, None))
                .collect();
            while each.next().await.is_some() {}
            let until = tokio::time::Instant::now() + BATCH_PAUSE;
            let (n, closed) = self.run_each(&mut alerts, config, Some(until)).await;
            count += n;
            if closed {
                return count;
            }
        }
    }

    /// Publishes `event` until stored (or refused for good); `failed`: the
    /// error of a first attempt already made.
    fn publish_one(
        &self,
        config: &Arc<stream::Config>,
        event: FalcoEvent,
        failed: Option<jetstream::context::PublishError>,
    ) -> impl std::future::Future<Output = ()> {
        publish_until_acked(
            self.context.clone(),
            Arc::clone(config),
            {
                let subject = self.subject.render(&event);
                let headers = alert_headers(&event, &subject, self.signer.as_deref());
                (subject, headers)
            },
            event,
            self.metrics.clone(),
            self.denied.clone(),
            failed,
        )
    }
}

/// How long a publish's acknowledgement may take (async-nats's own
/// default for a JetStream context).
const ACK_WAIT: Duration = Duration::from_secs(5);

/// The next answer of `acks`, if there are any.
async fn next_answer(acks: &mut Option<Acks>) -> Option<AckAnswer> {
    acks.as_mut()?.next().await
}

/// How long to wait for an answer to a fast batch with alerts unconfirmed.
const BATCH_ACK_WAIT: Duration = Duration::from_secs(5);

/// What the bridge does with the alerts of a fast batch.
struct Outcome<'a> {
    metrics: &'a BridgeMetrics,
    denied: &'a DeniedSubjects,
}

impl BatchOutcome for Outcome<'_> {
    fn ended(&mut self) {
        self.metrics.fast_batches.inc();
    }

    fn stored(&mut self, event: &FalcoEvent) {
        record_stored(self.metrics, event, false);
    }

    fn denied(&self, subject: &str) -> bool {
        self.denied.contains(subject)
    }

    fn dropped(&mut self, event: FalcoEvent, subject: String) {
        record_dropped(
            self.metrics,
            &subject,
            &event,
            "permission_denied",
            &"NATS denied this connection publishing on the subject",
        );
    }
}

/// After a fast batch failed, alerts are acknowledged one by one this long.
const BATCH_PAUSE: Duration = Duration::from_secs(5);

/// Counts and logs an alert the stream refuses for good.
fn record_dropped(
    metrics: &BridgeMetrics,
    subject: &str,
    event: &FalcoEvent,
    reason: &'static str,
    error: &dyn std::fmt::Display,
) {
    metrics.unconfirmed.dec();
    metrics.publish_failures.inc();
    metrics.rejected.get_or_create(&[("reason", reason)]).inc();
    tracing::error!(%subject, rule = ?event.rule, reason, error = %error, "JetStream refuses this alert for good; dropped, not retried");
}

/// Counts an alert the stream acknowledged.
fn record_stored(metrics: &BridgeMetrics, event: &FalcoEvent, duplicate: bool) {
    if duplicate {
        metrics.duplicates.inc();
    }
    metrics.unconfirmed.dec();
    metrics.published.inc();
    metrics
        .publish_latency
        .observe(event.received_at.elapsed().as_secs_f64());
}

/// Resolves once the queue is closed and holds nothing.
async fn closed_and_empty(alerts: &mpsc::Receiver<FalcoEvent>) {
    while !(alerts.is_closed() && alerts.is_empty()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes one alert to JetStream until the stream acknowledges it, with
/// the same `Nats-Msg-Id` each time so the stream keeps exactly one copy.
/// An alert the stream refuses for good is counted, logged and dropped.
/// `failed`: the error of a first attempt already made.
async fn publish_until_acked(
    context: jetstream::Context,
    config: Arc<stream::Config>,
    (subject, headers): (String, HeaderMap),
    event: FalcoEvent,
    metrics: BridgeMetrics,
    denied: DeniedSubjects,
    mut failed: Option<jetstream::context::PublishError>,
) {
    use async_nats::jetstream::context::PublishErrorKind;
    let payload: Bytes = event.payload.clone();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut attempt = 0u32;
    let drop_alert = |reason: &'static str, error: &dyn std::fmt::Display| {
        record_dropped(&metrics, &subject, &event, reason, error)
    };
    loop {
        attempt += 1;
        let e = match failed.take() {
            Some(e) => e,
            None => {
                let result = match context
                    .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await
                {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(ack) => return record_stored(&metrics, &event, ack.duplicate),
                    Err(e) => e,
                }
            }
        };
        if let Some(reason) = permanent_refusal(&e) {
            return drop_alert(reason, &e);
        }
        if denied.contains(&subject) {
            return drop_alert("permission_denied", &e);
        }
        if e.kind() == PublishErrorKind::StreamNotFound {
            if stream_refuses(&context, &config.name, &subject).await {
                return drop_alert("subject_not_in_stream", &e);
            }
            // The server lost the stream (a fresh store): make it again.
            let _ = context.get_or_create_stream((*config).clone()).await;
        }
        metrics.publish_failures.inc();
        let delay = backoff.next_delay();
        if attempt == 1 || attempt.is_multiple_of(10) {
            tracing::warn!(rule = ?event.rule, attempt, error = %e, ?delay, "JetStream publish not acknowledged; retrying");
        }
        tokio::time::sleep(delay).await;
    }
}
