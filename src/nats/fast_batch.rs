//! JetStream fast batch publishing (nats-server 2.14 and later, on a stream
//! with `allow_batched`): alerts go out back to back as one long batch, each
//! with a reply subject that names the batch, its sequence in it and the
//! operation; the stream stores each as it arrives and reports progress
//! once every `flow` messages instead of acknowledging each one. The bridge
//! keeps at most a window of alerts sent and not yet confirmed, and ends
//! the batch as soon as its queue has been empty for a moment, so the last
//! alerts of a burst are confirmed at once.
//!
//! The reply subject the server reads, from the right:
//! `<inbox>.<batch id>.<flow>.<gap mode>.<sequence>.<operation>.$FI`, the
//! operation being 0 (the first message), 1 (one more), 2 (the last one:
//! store it and commit). The newest alert is held back until the next one
//! comes (then it goes out as 0 or 1) or the queue stays empty (then it
//! goes out as 2, the commit): so every message of a batch is an alert.
//! (The server also knows 3, an empty end-of-batch marker; it is never
//! sent, because it would go to every core subscriber of the alert's
//! subject, `tail` and `nats sub` among them, as an empty message.) The
//! server answers on that subject with
//! flow messages (`{"type":"ack","seq":N}`: everything up to N is stored;
//! `"gap"`, `"err"`) and, at the commit, with a publish acknowledgement
//! carrying `batch` and `count`.
//!
//! Each alert keeps its `Nats-Msg-Id`, which the stream deduplicates inside
//! batches too: when a batch fails part way (a gap, an error, a leader
//! change, no answer in time), what was sent and not confirmed is handed
//! back to be published again alert by alert, and whatever the stream had
//! stored already is dropped as a duplicate. Exactly once holds.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Subject, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::time::Instant;

use crate::event::FalcoEvent;
use crate::nats::headers::alert_headers;
use crate::nats::subject::SubjectTemplate;
use crate::signing::Signer;

/// Gap mode "fail": the server ends the batch at the first lost message.
const GAP_FAIL: &str = "fail";

/// How long the queue stays empty before the open batch is ended.
const LINGER: Duration = Duration::from_millis(2);

/// The operations of a fast batch, as the server numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Start = 0,
    Append = 1,
    Commit = 2,
}

/// Why a batch was not confirmed whole.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("cannot publish in the batch: {0}")]
    Publish(#[from] async_nats::PublishError),
    #[error("no answer to the batch within {0:?}")]
    TimedOut(Duration),
    #[error("the reply subscription ended (connection closed)")]
    Closed,
    #[error("the stream refused the batch: {0}")]
    Refused(String),
    #[error("the stream stored {stored} of the batch's {sent} alerts")]
    Partial { stored: u64, sent: u64 },
}

/// A batch that failed: the alerts sent in it and not confirmed, to be
/// published again one by one.
#[derive(Debug)]
pub struct BatchFailure {
    pub error: BatchError,
    pub unconfirmed: Vec<FalcoEvent>,
}

/// What happens to the alerts of a batch, as it happens.
pub trait BatchOutcome: Send {
    /// A batch ended with every alert in it confirmed.
    fn ended(&mut self) {}
    /// The stream has stored `event`.
    fn stored(&mut self, event: &FalcoEvent);
    /// Whether NATS refused publishing on `subject` to this connection.
    fn denied(&self, subject: &str) -> bool;
    /// `event` goes on a denied subject: never sent, dropped.
    fn dropped(&mut self, event: FalcoEvent, subject: String);
}

/// One connection's fast batches: an inbox subscription for the server's
/// answers, and a counter that makes each batch id unique.
pub struct FastBatches {
    client: Client,
    /// `<inbox>.`; every batch's replies start with it.
    inbox: String,
    /// Unique among every publisher on the stream (the server keys batches
    /// by id alone): the inbox's own random token.
    token: String,
    replies: Subscriber,
    next: u64,
    timeout: Duration,
    signer: Option<Arc<Signer>>,
}

/// The batch being sent.
struct Open {
    /// `<inbox><token>-<n>.`: the start of every reply to this batch.
    id: String,
    /// `<id><flow>.fail.`: the reply subject up to the sequence.
    prefix: String,
    /// Messages sent in it.
    sent: u64,
    /// Sent and not yet confirmed, oldest first; the first has sequence
    /// `sent - unconfirmed.len() + 1`.
    unconfirmed: VecDeque<FalcoEvent>,
    /// The newest alert, not sent yet: the next alert sends it in the
    /// batch, an empty queue sends it as the commit.
    held: Option<(Subject, FalcoEvent)>,
    /// The commit was sent; its acknowledgement is awaited.
    ending: bool,
}

impl Open {
    /// Confirms every alert up to sequence `upto`.
    fn confirm(&mut self, upto: u64, outcome: &mut dyn BatchOutcome) {
        let first = self.sent - self.unconfirmed.len() as u64 + 1;
        let n = upto
            .saturating_sub(first - 1)
            .min(self.unconfirmed.len() as u64);
        for event in self.unconfirmed.drain(..n as usize) {
            outcome.stored(&event);
        }
    }

    /// What the batch leaves to publish again: the unconfirmed alerts and
    /// the held one, in their order.
    fn fail(self, error: BatchError) -> BatchFailure {
        let mut unconfirmed: Vec<FalcoEvent> = self.unconfirmed.into();
        unconfirmed.extend(self.held.map(|(_, event)| event));
        BatchFailure { error, unconfirmed }
    }
}

/// Result of [`FastBatches::run`].
pub type RunResult = Result<(), BatchFailure>;

impl FastBatches {
    /// Subscribes to this connection's batch replies. `timeout` bounds the
    /// wait for an answer while alerts await their confirmation.
    pub async fn new(
        client: Client,
        timeout: Duration,
        signer: Option<Arc<Signer>>,
    ) -> Result<Self, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let token = inbox.rsplit('.').next().unwrap_or("fb").to_owned();
        let replies = client.subscribe(format!("{inbox}.>")).await?;
        Ok(FastBatches {
            client,
            inbox: format!("{inbox}."),
            token,
            replies,
            next: 0,
            timeout,
            signer,
        })
    }

    /// Publishes what arrives on `alerts` in fast batches, at most `window`
    /// sent and not confirmed at once, until the queue is closed and every
    /// alert confirmed (`Ok`), or a batch fails (`Err`, with what it left
    /// unconfirmed; nothing of it is taken from the queue after that).
    /// `taken` counts the alerts taken from the queue.
    pub async fn run(
        &mut self,
        subject: &SubjectTemplate,
        alerts: &mut mpsc::Receiver<FalcoEvent>,
        window: usize,
        outcome: &mut dyn BatchOutcome,
        taken: &mut u64,
    ) -> RunResult {
        let window = window.max(1);
        let mut open: Option<Open> = None;
        let mut closed = false;
        loop {
            // The state decides what to wait for; an alert that arrives is
            // taken and sent below, in one place.
            let room = open
                .as_ref()
                .is_none_or(|o| !o.ending && o.unconfirmed.len() < window);
            let arrived = 'wait: {
                if room && !closed {
                    match alerts.try_recv() {
                        Ok(event) => break 'wait Some(event),
                        Err(TryRecvError::Disconnected) => closed = true,
                        Err(TryRecvError::Empty) => {}
                    }
                }
                let Some(batch) = open.as_mut() else {
                    if closed {
                        return Ok(());
                    }
                    // Nothing open, nothing queued: wait for the next alert.
                    let next = alerts.recv().await;
                    closed = next.is_none();
                    break 'wait next;
                };
                if batch.sent == 0 && batch.held.is_none() {
                    // Only denied alerts so far: nothing to end.
                    open = None;
                    break 'wait None;
                }
                if room && closed {
                    if let Err(e) = self.end(batch).await {
                        return Err(fail(open, e));
                    }
                    break 'wait None;
                }
                // Wait for an answer; with room, for the next alert as well,
                // and end the batch when none comes for a moment.
                let deadline = Instant::now() + self.timeout;
                tokio::select! {
                    biased;
                    reply = tokio::time::timeout_at(deadline, self.replies.next()) => {
                        let message = match reply {
                            Ok(Some(m)) => m,
                            Ok(None) => return Err(fail(open, BatchError::Closed)),
                            Err(_) => return Err(fail(open, BatchError::TimedOut(self.timeout))),
                        };
                        // Late answers to an earlier batch are not this one's.
                        if !message.subject.as_str().starts_with(&batch.id) {
                            break 'wait None;
                        }
                        match classify(&message.payload) {
                            BatchAnswer::Progress { upto } => batch.confirm(upto, outcome),
                            BatchAnswer::Done { count } => {
                                batch.confirm(count, outcome);
                                let sent = batch.sent;
                                let Some(batch) = open.take() else { break 'wait None };
                                if !batch.unconfirmed.is_empty() {
                                    return Err(batch.fail(BatchError::Partial { stored: count, sent }));
                                }
                                outcome.ended();
                            }
                            BatchAnswer::Failed(why) => return Err(fail(open, BatchError::Refused(why))),
                        }
                        None
                    }
                    next = alerts.recv(), if room && !closed => {
                        closed = next.is_none();
                        next
                    }
                    _ = tokio::time::sleep(LINGER), if room && !closed => {
                        if let Err(e) = self.end(batch).await {
                            return Err(fail(open, e));
                        }
                        None
                    }
                }
            };
            if let Some(event) = arrived {
                *taken += 1;
                if let Err(e) = self.send(subject, &mut open, event, window, outcome).await {
                    return Err(fail(open, e));
                }
            }
        }
    }

    /// Sends `event` in the open batch, opening one if needed; an alert on a
    /// denied subject is dropped instead.
    async fn send(
        &mut self,
        template: &SubjectTemplate,
        open: &mut Option<Open>,
        event: FalcoEvent,
        window: usize,
        outcome: &mut dyn BatchOutcome,
    ) -> Result<(), BatchError> {
        let subject = template.render(&event);
        if outcome.denied(&subject) {
            outcome.dropped(event, subject);
            return Ok(());
        }
        let subject = Subject::from(subject);
        let batch = open.get_or_insert_with(|| {
            self.next += 1;
            let id = format!("{}{}-{:x}.", self.inbox, self.token, self.next);
            // Progress twice per window: the next report is on its way
            // before the window fills.
            let flow = (window / 2).clamp(1, usize::from(u16::MAX));
            Open {
                prefix: format!("{id}{flow}.{GAP_FAIL}."),
                id,
                sent: 0,
                unconfirmed: VecDeque::with_capacity(window),
                held: None,
                ending: false,
            }
        });
        match batch.held.replace((subject, event)) {
            Some((subject, previous)) => {
                let op = if batch.sent == 0 {
                    Operation::Start
                } else {
                    Operation::Append
                };
                self.publish(batch, subject, previous, op).await
            }
            None => Ok(()),
        }
    }

    /// Ends the batch: the held alert goes out as the commit, and the
    /// batch's acknowledgement confirms the rest of it.
    async fn end(&mut self, batch: &mut Open) -> Result<(), BatchError> {
        batch.ending = true;
        match batch.held.take() {
            Some((subject, event)) => self.publish(batch, subject, event, Operation::Commit).await,
            // Every alert taken into a batch is held until the next one or
            // the end, and nothing else sends: an open batch always holds
            // its newest alert.
            None => unreachable!("an open batch without its newest alert"),
        }
    }

    /// Sends `event` as the batch's next message.
    async fn publish(
        &mut self,
        batch: &mut Open,
        subject: Subject,
        event: FalcoEvent,
        op: Operation,
    ) -> Result<(), BatchError> {
        batch.sent += 1;
        let reply = format!("{}{}.{}.$FI", batch.prefix, batch.sent, op as u8);
        let headers = alert_headers(&event, subject.as_str(), self.signer.as_deref());
        let payload = event.payload.clone();
        batch.unconfirmed.push_back(event);
        self.client
            .publish_with_reply_and_headers(subject, reply, headers, payload)
            .await?;
        Ok(())
    }
}

fn fail(open: Option<Open>, error: BatchError) -> BatchFailure {
    match open {
        Some(batch) => batch.fail(error),
        None => BatchFailure {
            error,
            unconfirmed: Vec::new(),
        },
    }
}

/// What the server sends on a batch's reply subject. Flow messages carry
/// `type` (and `seq`); the final acknowledgement carries `stream` and
/// `count`, or `error`.
#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(rename = "type")]
    kind: Option<String>,
    seq: Option<u64>,
    count: Option<u64>,
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    description: String,
}

/// What one answer on a batch's reply subject means.
#[derive(Debug, PartialEq, Eq)]
enum BatchAnswer {
    /// Flow control: everything up to sequence `upto` is stored.
    Progress { upto: u64 },
    /// The batch's acknowledgement: `count` messages in it were taken.
    Done { count: u64 },
    /// A gap, an error for one message, or the batch refused.
    Failed(String),
}

fn classify(payload: &Bytes) -> BatchAnswer {
    let reply: Reply = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => return BatchAnswer::Failed(format!("unreadable answer: {e}")),
    };
    if let Some(error) = reply.error {
        return BatchAnswer::Failed(error.description);
    }
    match (reply.kind.as_deref(), reply.count) {
        (Some("ack"), _) => BatchAnswer::Progress {
            upto: reply.seq.unwrap_or(0),
        },
        (Some(other), _) => {
            BatchAnswer::Failed(format!("{other}: {}", String::from_utf8_lossy(payload)))
        }
        (None, Some(count)) => BatchAnswer::Done { count },
        (None, None) => BatchAnswer::Failed(format!(
            "an acknowledgement without a batch count: {}",
            String::from_utf8_lossy(payload)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_told_apart() {
        let a = |s: &'static str| classify(&Bytes::from_static(s.as_bytes()));
        assert_eq!(
            a(r#"{"type":"ack","seq":0,"msgs":256}"#),
            BatchAnswer::Progress { upto: 0 }
        );
        assert_eq!(
            a(r#"{"type":"ack","seq":384,"msgs":128}"#),
            BatchAnswer::Progress { upto: 384 }
        );
        assert_eq!(
            a(r#"{"stream":"FALCO","seq":512,"batch":"x-1","count":256}"#),
            BatchAnswer::Done { count: 256 }
        );
        assert_eq!(
            a(r#"{"stream":"FALCO","seq":3,"duplicate": true,"batch":"x-1","count":1}"#),
            BatchAnswer::Done { count: 1 }
        );
        assert!(matches!(
            a(r#"{"type":"gap","last_seq":3,"seq":5}"#),
            BatchAnswer::Failed(_)
        ));
        assert!(matches!(
            a(r#"{"type":"err","seq":7,"error":{"code":400,"err_code":10071,"description":"wrong last sequence"}}"#),
            BatchAnswer::Failed(d) if d == "wrong last sequence"
        ));
        assert!(matches!(
            a(r#"{"error":{"code":400,"err_code":10205,"description":"batch publish is disabled"},"stream":"FALCO"}"#),
            BatchAnswer::Failed(d) if d.contains("disabled")
        ));
        // A plain publish acknowledgement: no count, so not a batch's.
        assert!(matches!(
            a(r#"{"stream":"FALCO","seq":3}"#),
            BatchAnswer::Failed(_)
        ));
        assert!(matches!(a("not json"), BatchAnswer::Failed(_)));
    }
}
