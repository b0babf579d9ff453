//! Takes alerts off NATS and hands them to the [`Responder`]: core NATS
//! through a queue group, or a durable JetStream pull consumer, whose
//! messages are settled as the verdicts say ([`Settle`]). A bounded number
//! of alerts are handled at once; on shutdown, those in hand are finished
//! until the drain deadline.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;

use super::outcome::Settle;
use super::responder::{Delivery, Responder};
use crate::backoff::Backoff;
use crate::nats::subject::is_under;
use crate::telemetry::health::ReadyFlag;

/// Where alerts come from.
#[derive(Debug, Clone)]
pub enum Subscription {
    /// Core NATS, shared among replicas by a queue group.
    Core { subject: String, queue: String },
    /// A durable JetStream pull consumer.
    JetStream {
        stream: String,
        durable: String,
        subject: String,
        ack_wait: Duration,
        /// Deliveries of one alert at most; the last failure is final.
        max_deliver: u32,
    },
}

/// Why the responder cannot take alerts.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("cannot subscribe to {subject:?}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
}

/// How far back a durable the responder makes starts.
const DURABLE_LOOKBACK: Duration = Duration::from_secs(600);

/// Where a durable the responder makes starts: [`DURABLE_LOOKBACK`] ago
/// (or at the stream's start if the clock cannot say).
fn lookback_start() -> consumer::DeliverPolicy {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(DURABLE_LOOKBACK);
    match async_nats::datetime::from_nanos(since_epoch.as_nanos() as i128) {
        Ok(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
        Err(_) => consumer::DeliverPolicy::All,
    }
}

/// How often the durable consumer's settings are checked.
const CONSUMER_CHECK: Duration = Duration::from_secs(10);

/// The durable consumer's settings, as the responder makes it.
fn durable_config(params: &DurableParams) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(params.durable.clone()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: params.ack_wait,
        max_deliver: i64::from(params.max_deliver),
        // A durable made (or made again, after someone deleted it) starts
        // at the alerts of the last minutes, not at the stream's first
        // (days of old alerts acted on anew).
        deliver_policy: lookback_start(),
        // The whole stream unless a narrower subject is asked for.
        filter_subject: match params.subject.as_str() {
            "" | ">" | "falco.>" => String::new(),
            s => s.to_owned(),
        },
        ..Default::default()
    }
}

/// Which of the settings that decide what the responder sees and when
/// differ from `expected`: the filter, the acknowledgement policy and wait,
/// the deliveries, the rate, the sampling, the headers-only switch.
fn tampered(found: &consumer::Config, expected: &consumer::pull::Config) -> Option<&'static str> {
    let filters = |one: &str, many: &[String]| -> Vec<String> {
        let mut all: Vec<String> = many.to_vec();
        if !one.is_empty() {
            all.push(one.to_owned());
        }
        all.sort();
        all
    };
    let expected_filters = filters(&expected.filter_subject, &expected.filter_subjects);
    let found_filters = filters(&found.filter_subject, &found.filter_subjects);
    if expected_filters != found_filters {
        return Some("filter");
    }
    if found.ack_policy != expected.ack_policy {
        return Some("ack policy");
    }
    if found.ack_wait != expected.ack_wait {
        return Some("ack wait");
    }
    if found.max_deliver != expected.max_deliver {
        return Some("max deliver");
    }
    if found.headers_only {
        return Some("headers-only switch");
    }
    if found.rate_limit != 0 {
        return Some("rate limit");
    }
    if found.sample_frequency != 0 {
        return Some("sampling");
    }
    None
}

/// Why the durable consumer is not there yet (retried).
#[derive(Debug, thiserror::Error)]
enum ConsumerError {
    #[error("cannot set the durable consumer back")]
    Restore(#[source] jetstream::stream::ConsumerError),
    #[error(
        "the durable consumer's {0} stays changed (delete the consumer to have it made again)"
    )]
    StaysChanged(&'static str),
    #[error("cannot find the stream")]
    Stream(#[source] jetstream::context::GetStreamError),
    #[error("cannot find or create the consumer")]
    Consumer(#[source] jetstream::stream::ConsumerError),
}

/// The durable consumer's settings.
struct DurableParams {
    stream: String,
    durable: String,
    subject: String,
    ack_wait: Duration,
    max_deliver: u32,
}

/// Takes alerts off NATS and hands them to the responder, a bounded number
/// at a time, until shutdown; then finishes those in hand until the deadline.
pub(super) struct Consume<'a> {
    pub client: &'a async_nats::Client,
    pub responder: &'a Responder,
    /// The results' subject prefix: alerts there are the responder's own.
    pub results: String,
    pub concurrency: usize,
    pub subscribed: &'a ReadyFlag,
    pub shutdown: &'a CancellationToken,
    pub deadline: &'a CancellationToken,
}

impl Consume<'_> {
    pub async fn run(&self, subscription: Subscription) -> Result<(), ConsumeError> {
        match subscription {
            Subscription::Core { subject, queue } => self.core(subject, queue).await,
            Subscription::JetStream {
                stream,
                durable,
                subject,
                ack_wait,
                max_deliver,
            } => {
                let params = DurableParams {
                    stream,
                    durable,
                    subject,
                    ack_wait,
                    max_deliver: max_deliver.max(1),
                };
                self.jetstream(&params).await
            }
        }
    }

    async fn core(&self, subject: String, queue: String) -> Result<(), ConsumeError> {
        let mut sub = self
            .client
            .queue_subscribe(subject.clone(), queue.clone())
            .await
            .map_err(|source| ConsumeError::Subscribe {
                subject: subject.clone(),
                source,
            })?;
        // Ready only once the server has the subscription.
        match crate::nats::round_trip(self.client).await {
            Ok(()) => self.subscribed.set(true),
            Err(e) => tracing::warn!(error = %e, "cannot confirm the subscription yet"),
        }
        tracing::info!(%subject, %queue, "responding to alerts (core NATS, queue group)");
        let mut inflight = FuturesUnordered::new();
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(()) = inflight.next(), if !inflight.is_empty() => {}
                message = sub.next(), if inflight.len() < self.concurrency => {
                    let Some(message) = message else { break };
                    if is_under(message.subject.as_str(), &self.results) {
                        continue;
                    }
                    inflight.push(async move {
                        self.responder
                            .handle(
                                message.subject.as_str(),
                                &message.payload,
                                message.headers.as_ref(),
                                Delivery::ONLY,
                            )
                            .await;
                    });
                }
            }
        }
        self.subscribed.set(false);
        self.finish(inflight).await;
        Ok(())
    }

    async fn jetstream(&self, params: &DurableParams) -> Result<(), ConsumeError> {
        let mut inflight = FuturesUnordered::new();
        'consumer: loop {
            let Some(consumer) = self.durable_consumer(params).await else {
                break;
            };
            // Pull no more than can be handled at once: an alert waiting in
            // a buffer past the ack wait would be delivered twice.
            // Short pulls with heartbeats: a consumer deleted under us (which
            // older servers do not announce) shows as missed heartbeats.
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(self.concurrency)
                .expires(Duration::from_secs(10))
                .heartbeat(Duration::from_secs(2))
                .messages()
                .await
            {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read from the durable consumer; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'consumer,
                        _ = self.shutdown.cancelled() => break 'consumer,
                    }
                }
            };
            self.subscribed.set(true);
            let expected = durable_config(params);
            let mut check = tokio::time::interval(CONSUMER_CHECK);
            check.reset();
            loop {
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => break 'consumer,
                    Some(()) = inflight.next(), if !inflight.is_empty() => {}
                    _ = check.tick() => {
                        let mut consumer = consumer.clone();
                        if let Ok(info) = consumer.info().await {
                            if let Some(changed) = tampered(&info.config, &expected) {
                                tracing::error!(durable = %params.durable, changed, "the durable consumer's settings were changed under the responder");
                                self.subscribed.set(false);
                                continue 'consumer;
                            }
                        }
                    }
                    next = messages.next(), if inflight.len() < self.concurrency => match next {
                        Some(Ok(message)) => inflight.push(self.settle(message, params)),
                        Some(Err(e)) if matches!(
                            e.kind(),
                            consumer::pull::MessagesErrorKind::ConsumerDeleted
                                | consumer::pull::MessagesErrorKind::MissingHeartbeat
                                | consumer::pull::MessagesErrorKind::RequestLimitExceeded
                        ) => {
                            tracing::warn!(error = %e, durable = %params.durable, "the durable consumer is gone or silent; finding or recreating it");
                            self.subscribed.set(false);
                            continue 'consumer;
                        }
                        Some(Err(e)) => tracing::warn!(error = %e, "JetStream consumer error"),
                        None => {
                            tracing::warn!(durable = %params.durable, "the durable consumer's messages ended; recreating it");
                            self.subscribed.set(false);
                            continue 'consumer;
                        }
                    }
                }
            }
        }
        self.subscribed.set(false);
        self.finish(inflight).await;
        Ok(())
    }

    /// Handles one JetStream message and settles it: acknowledged (and the
    /// acknowledgement confirmed) once done, handed back after a transient
    /// failure, terminated after the last. While it is handled, JetStream
    /// is told so, so the ack wait does not run out under it.
    async fn settle(&self, message: jetstream::Message, params: &DurableParams) {
        let attempt = message
            .info()
            .map(|i| u32::try_from(i.delivered).unwrap_or(1))
            .unwrap_or(1)
            .max(1);
        let delivery = Delivery {
            attempt,
            last: attempt >= params.max_deliver,
        };
        let settle = if is_under(message.subject.as_str(), &self.results) {
            Settle::Ack
        } else {
            let work = self.responder.handle(
                message.subject.as_str(),
                &message.payload,
                message.headers.as_ref(),
                delivery,
            );
            tokio::pin!(work);
            let every = (params.ack_wait / 3).max(Duration::from_millis(100));
            let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    settle = &mut work => break settle,
                    _ = progress.tick() => {
                        if let Err(e) = message.ack_with(AckKind::Progress).await {
                            tracing::debug!(error = %e, "cannot extend the ack wait");
                        }
                    }
                }
            }
        };
        let result = match settle {
            Settle::Ack => message.double_ack().await,
            Settle::Retry => {
                message
                    .ack_with(AckKind::Nak(Some(retry_delay(attempt))))
                    .await
            }
            Settle::Term => message.ack_with(AckKind::Term).await,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, ?settle, "cannot settle an alert with JetStream; it will be redelivered");
        }
    }

    /// The durable consumer, waiting (with backoff) for the stream to exist;
    /// `None` on shutdown.
    async fn durable_consumer(&self, params: &DurableParams) -> Option<consumer::PullConsumer> {
        let js = jetstream::new(self.client.clone());
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let config = durable_config(params);
        loop {
            let attempt = async {
                let stream = js
                    .get_stream(&params.stream)
                    .await
                    .map_err(ConsumerError::Stream)?;
                let found: consumer::PullConsumer = stream
                    .get_or_create_consumer(&params.durable, config.clone())
                    .await
                    .map_err(ConsumerError::Consumer)?;
                // Whoever may create it may also have changed it (a filter
                // that takes no alert, say): put it back as it must be.
                if let Some(changed) = tampered(&found.cached_info().config, &config) {
                    tracing::error!(durable = %params.durable, changed, "the durable consumer's settings were changed; setting them back");
                    // Where it starts cannot change, and need not.
                    let restore = consumer::pull::Config {
                        deliver_policy: found.cached_info().config.deliver_policy,
                        ..config.clone()
                    };
                    let restored: consumer::PullConsumer = stream
                        .create_consumer(restore)
                        .await
                        .map_err(ConsumerError::Restore)?;
                    if let Some(still) = tampered(&restored.cached_info().config, &config) {
                        return Err(ConsumerError::StaysChanged(still));
                    }
                    return Ok(restored);
                }
                Ok(found)
            };
            match attempt.await {
                Ok(c) => {
                    tracing::info!(
                        stream = %params.stream,
                        durable = %params.durable,
                        "responding to alerts (JetStream durable consumer)"
                    );
                    return Some(c);
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(stream = %params.stream, durable = %params.durable, error = %crate::telemetry::logging::chain(&e), ?delay, "JetStream consumer not available; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Lets the alerts in hand finish, until the drain deadline.
    async fn finish<F: std::future::Future<Output = ()>>(&self, mut inflight: FuturesUnordered<F>) {
        if inflight.is_empty() {
            return;
        }
        tracing::info!(in_hand = inflight.len(), "finishing the alerts in hand");
        tokio::select! {
            _ = async { while inflight.next().await.is_some() {} } => {}
            _ = self.deadline.cancelled() => {
                tracing::warn!(in_hand = inflight.len(), "drain timeout: stopped handling alerts in hand (JetStream delivers them again)");
            }
        }
    }
}

/// How long JetStream waits before delivering an alert again after the
/// `attempt`th delivery failed: 0.5 s, doubling, at most 30 s.
pub fn retry_delay(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(6);
    (Duration::from_millis(500) * 2u32.pow(doublings)).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_from_half_a_second_to_thirty() {
        assert_eq!(retry_delay(1), Duration::from_millis(500));
        assert_eq!(retry_delay(3), Duration::from_secs(2));
        assert_eq!(retry_delay(50), Duration::from_secs(30));
    }
}
