//! [`Publisher`]: publishes alerts on core NATS (fire and forget, no flush
//! per alert) or JetStream (acknowledged, retried with the same
//! `Nats-Msg-Id` until stored, a bounded number in flight).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap, HeaderName};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::event::FalcoEvent;
use crate::nats::acks::{Acks, Answer};
use crate::nats::connection::{DeniedSubjects, NatsConnection};
use crate::nats::fast_batch::{BatchOutcome, FastBatches};
use crate::nats::ledger::DeliveryLedger;
use crate::nats::memo::Memo;
use crate::nats::round_trip::round_trip;
use crate::nats::subject::{covers, SubjectTemplate};
use crate::priority::Priority;
use crate::signing::Signer;
use crate::telemetry::metrics::BridgeMetrics;

/// Header names carried by every alert message.
pub mod header {
    pub const PRIORITY: &str = "Falco-Priority";
    pub const RULE: &str = "Falco-Rule";
    pub const HOSTNAME: &str = "Falco-Hostname";
    pub const SOURCE: &str = "Falco-Source";
    pub const MSG_ID: &str = "Nats-Msg-Id";
}

/// How alerts are published.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub subject: SubjectTemplate,
    /// `None` for core NATS.
    pub jetstream: Option<JetStreamOptions>,
    /// Signs every alert (`--sign-key`).
    pub signer: Option<Arc<Signer>>,
}

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
            Some(js) => Publisher::JetStream(JetStreamPublisher {
                context: jetstream::ContextBuilder::new()
                    .max_ack_inflight(js.max_inflight.max(1))
                    .build(client.clone()),
                client,
                subject: options.subject,
                signer: options.signer,
                options: js,
                metrics,
                denied,
            }),
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

/// The header names, made once: inserting a `&str` name validates and
/// converts it for every message.
const PRIORITY_NAME: HeaderName = HeaderName::from_static(header::PRIORITY);
const RULE_NAME: HeaderName = HeaderName::from_static(header::RULE);
const HOSTNAME_NAME: HeaderName = HeaderName::from_static(header::HOSTNAME);
const SOURCE_NAME: HeaderName = HeaderName::from_static(header::SOURCE);
const MSG_ID_NAME: HeaderName = HeaderName::from_static(header::MSG_ID);
const KEY_NAME: HeaderName = HeaderName::from_static(crate::signing::KEY_HEADER);
const SIGNATURE_NAME: HeaderName = HeaderName::from_static(crate::signing::SIGNATURE_HEADER);
const SIGNED_AT_NAME: HeaderName = HeaderName::from_static(crate::signing::SIGNED_AT_HEADER);

/// The headers of an alert message: what a consumer filters on without
/// parsing the JSON, and the digest JetStream deduplicates on.
/// With a `signer`, the alert's signature over `subject` and the payload
/// too ([`crate::signing`]).
pub fn alert_headers(event: &FalcoEvent, subject: &str, signer: Option<&Signer>) -> HeaderMap {
    let mut headers = FILTER_HEADERS.with(|memo| {
        let mut memo = memo.borrow_mut();
        let (.., headers) = memo.get_or_make(
            |(priority, rule, source, _)| {
                *priority == event.priority && *rule == event.rule && *source == event.source
            },
            || {
                let headers = rule_headers(event);
                (
                    event.priority,
                    event.rule.clone(),
                    event.source.clone(),
                    headers,
                )
            },
        );
        headers.clone()
    });
    headers.insert(HOSTNAME_NAME, header_value(&event.hostname));
    let msg_id = event.msg_id();
    if let Some(signer) = signer {
        let at_ms = crate::respond::control::now_ms();
        headers.insert(KEY_NAME, signer.public_key());
        headers.insert(SIGNED_AT_NAME, itoa::Buffer::new().format(at_ms));
        headers.insert(
            SIGNATURE_NAME,
            signer.sign(subject, at_ms, &msg_id, &event.payload),
        );
    }
    headers.insert(MSG_ID_NAME, msg_id);
    headers
}

/// The headers an alert shares with others of its rule: priority, rule and
/// source, and the hostname and message id keys with empty values (the
/// map's room for them: replacing them does not grow it).
fn rule_headers(event: &FalcoEvent) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(PRIORITY_NAME, event.priority.as_str());
    headers.insert(RULE_NAME, header_value(&event.rule));
    headers.insert(SOURCE_NAME, header_value(&event.source));
    headers.insert(HOSTNAME_NAME, "");
    headers.insert(MSG_ID_NAME, "");
    headers
}

thread_local! {
    /// A memo, not state: alerts repeat a few rules, and cloning a
    /// remembered header map costs less than building one (async-nats
    /// hashes each name with SipHash and grows its map twice). The
    /// [`rule_headers`] of recent (priority, rule, source): keyed by the
    /// rule, not the host, since a bridge behind a Service hears from every
    /// node. Per thread, so no lock; what it returns depends on the alert
    /// alone.
    static FILTER_HEADERS: std::cell::RefCell<Memo<(Priority, String, String, HeaderMap)>> =
        std::cell::RefCell::new(Memo::default());
}

/// Longest header value, in bytes: a consumer filters on these, and no
/// alert field may make a message grow without bound.
pub const MAX_HEADER_VALUE: usize = 1024;

/// Header values may not hold control characters (a CR or LF would end the
/// header): they become spaces. Values are cut at [`MAX_HEADER_VALUE`] bytes
/// (on a character boundary).
fn header_value(value: &str) -> String {
    // The common case, printable ASCII within the limit, is copied whole.
    if value.len() <= MAX_HEADER_VALUE && value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len().min(MAX_HEADER_VALUE));
    for c in value.chars() {
        if out.len() + c.len_utf8() > MAX_HEADER_VALUE {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
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

/// Alerts taken off the queue at once.
const BATCH: usize = 64;

impl JetStreamPublisher {
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

    async fn run(
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
    fn answered(&self, answer: Answer) -> Option<(FalcoEvent, jetstream::context::PublishError)> {
        match answer {
            Answer::Stored { event, duplicate } => {
                record_stored(&self.metrics, &event, duplicate);
                None
            }
            Answer::Failed { event, error } => Some((event, error)),
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
async fn next_answer(acks: &mut Option<Acks>) -> Option<Answer> {
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

/// An existing stream the bridge cannot publish to as asked: it would
/// never succeed (or not as the user wants), so the bridge does not start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamMismatch {
    #[error("JetStream stream {stream:?} exists with subjects {existing:?}, which do not cover {missing:?} made by --subject {template}: add them to the stream (nats stream edit {stream} --subjects ...), or choose another --stream or --subject")]
    Subjects {
        stream: String,
        existing: Vec<String>,
        missing: Vec<String>,
        template: String,
    },
    #[error("JetStream stream {stream:?} exists with {existing} replicas, and --replicas asks for {asked}: change the stream (nats stream edit {stream} --replicas {asked}), or drop --replicas to use it as it is")]
    Replicas {
        stream: String,
        existing: usize,
        asked: usize,
    },
}

/// Creates the stream if it is missing, retrying until NATS answers, and
/// checks that an existing one covers every subject the template makes.
async fn ensure_stream(
    context: &jetstream::Context,
    config: &stream::Config,
    template: &SubjectTemplate,
    replicas: Option<usize>,
) -> Result<stream::Config, StreamMismatch> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        // The stream as found or created comes with its info: no second request.
        let found = context
            .get_or_create_stream(config.clone())
            .await
            .map(|stream| stream.cached_info().config.clone());
        match found {
            Ok(existing) => {
                check_stream(config, &existing, template, replicas)?;
                tracing::info!(stream = %config.name, subjects = %existing.subjects.join(","), replicas = existing.num_replicas, allow_batched = existing.allow_batch_publish, "JetStream stream ready");
                return Ok(existing);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(stream = %config.name, error = %e, ?delay, "cannot create or find the JetStream stream; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Whether an existing stream takes what the bridge publishes, as asked.
fn check_stream(
    wanted: &stream::Config,
    existing: &stream::Config,
    template: &SubjectTemplate,
    replicas: Option<usize>,
) -> Result<(), StreamMismatch> {
    let missing: Vec<String> = wanted
        .subjects
        .iter()
        .filter(|s| !existing.subjects.iter().any(|f| covers(f, s)))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(StreamMismatch::Subjects {
            stream: wanted.name.clone(),
            existing: existing.subjects.clone(),
            missing,
            template: template.to_string(),
        });
    }
    match replicas {
        // A stream reports 1 replica as 0 or 1 depending on the server.
        Some(asked) if asked != existing.num_replicas.max(1) => Err(StreamMismatch::Replicas {
            stream: wanted.name.clone(),
            existing: existing.num_replicas.max(1),
            asked,
        }),
        _ => Ok(()),
    }
}

/// Why JetStream refused an alert for good, as a `rejected` reason; `None`
/// when a retry may succeed (a time-out, no stream leader yet, an outage).
fn permanent_refusal(e: &jetstream::context::PublishError) -> Option<&'static str> {
    use async_nats::jetstream::context::PublishErrorKind;
    use async_nats::jetstream::ErrorCode;
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => Some("too_large_for_nats"),
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            Some("refused_by_stream")
        }
        PublishErrorKind::Other => {
            let api = std::error::Error::source(e)?.downcast_ref::<jetstream::Error>()?;
            match api.error_code() {
                ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM => Some("too_large_for_stream"),
                ErrorCode::STREAM_NOT_MATCH => Some("refused_by_stream"),
                // Other client errors: the same message will be refused again.
                _ if (400..500).contains(&api.code()) && ![408, 429].contains(&api.code()) => {
                    Some("refused_by_stream")
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether the stream exists and does not take `subject` (someone edited
/// it since the start); `false` when it is missing or cannot be read.
async fn stream_refuses(context: &jetstream::Context, name: &str, subject: &str) -> bool {
    match context.get_stream(name).await {
        Ok(stream) => !stream
            .cached_info()
            .config
            .subjects
            .iter()
            .any(|f| covers(f, subject)),
        Err(_) => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_the_filter_fields_and_a_stable_id() {
        let event = FalcoEvent {
            payload: Bytes::from_static(br#"{"rule":"x"}"#),
            priority: Priority::Critical,
            rule: "Evil\r\nPUB x 0\r\n".into(),
            hostname: "node-1".into(),
            source: "syscall".into(),
            received_at: std::time::Instant::now(),
        };
        let h = alert_headers(&event, "falco.x", None);
        assert_eq!(
            h.get(header::PRIORITY).map(|v| v.as_str()),
            Some("Critical")
        );
        assert_eq!(
            h.get(header::RULE).map(|v| v.as_str()),
            Some("Evil  PUB x 0  ")
        );
        assert_eq!(h.get(header::HOSTNAME).map(|v| v.as_str()), Some("node-1"));
        assert_eq!(h.get(header::SOURCE).map(|v| v.as_str()), Some("syscall"));
        assert_eq!(
            h.get(header::MSG_ID).map(|v| v.to_string()),
            Some(event.msg_id())
        );
        let long = header_value(&"é".repeat(5000));
        assert!(long.len() <= MAX_HEADER_VALUE && long.len() >= MAX_HEADER_VALUE - 1);
        assert!(long.chars().all(|c| c == 'é'));
        assert!(h.get(crate::signing::SIGNATURE_HEADER).is_none());
        // Signed: over the subject given, which the verifier checks.
        let (seed, public) = crate::signing::generate();
        let signer = Signer::from_seed(&seed).unwrap();
        let signed = alert_headers(&event, "falco.critical.evil", Some(&signer));
        let verifier = crate::signing::Verifier::from_public_keys([public.as_str()]).unwrap();
        let check = |subject| verifier.verify(subject, &event.payload, Some(&signed));
        assert_eq!(
            check("falco.critical.evil").map(|s| s.key),
            Ok(public.as_str())
        );
        assert!(check("falco.x").is_err());
    }

    #[test]
    fn remembered_headers_are_the_alerts_own() {
        let alert = |rule: &str, host: &str| {
            let line = format!(
                r#"{{"hostname":"{host}","output":"x","priority":"Notice","rule":"{rule}","source":"syscall","time":"2023-05-25T13:44:05.478445995Z"}}"#
            );
            FalcoEvent::from_json(bytes::Bytes::from(line)).unwrap()
        };
        // More combinations than are remembered, each seen twice, in turns.
        for round in 0..3 {
            for i in 0..(crate::nats::memo::ENTRIES * 2) {
                let event = alert(&format!("rule {}", i % 80), &format!("node-{}", i % 7));
                let headers = alert_headers(&event, "falco.x", None);
                let mut expected = HeaderMap::new();
                expected.insert(header::PRIORITY, "Notice");
                expected.insert(header::RULE, event.rule.as_str());
                expected.insert(header::HOSTNAME, event.hostname.as_str());
                expected.insert(header::SOURCE, "syscall");
                expected.insert(header::MSG_ID, event.msg_id());
                assert_eq!(headers, expected, "round {round}, alert {i}");
            }
        }
    }

    #[test]
    fn header_values_lose_control_characters_and_length_either_way() {
        assert_eq!(
            header_value("Terminal shell in container"),
            "Terminal shell in container"
        );
        assert_eq!(header_value("a\r\nb\tc\u{7f}d\u{85}e"), "a  b c d e");
        assert_eq!(header_value(&"x".repeat(5000)).len(), MAX_HEADER_VALUE);
        assert_eq!(
            header_value(&"x".repeat(MAX_HEADER_VALUE)).len(),
            MAX_HEADER_VALUE
        );
        assert_eq!(header_value("naïve"), "naïve");
    }
}
