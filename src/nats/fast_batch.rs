//! JetStream fast batch publishing (nats-server 2.14 and later, on a stream
//! with `allow_batched`): the alerts of a batch go out back to back, each
//! with a reply subject that names the batch, its sequence in it and the
//! operation; the stream stores each as it arrives and answers the batch
//! once, with one acknowledgement for all of it, instead of once per alert.
//!
//! The reply subject the server reads, from the right:
//! `<inbox>.<batch id>.<flow>.<gap mode>.<sequence>.<operation>.$FI`, the
//! operation being 0 (the first message), 1 (one more), 2 (the last one,
//! which commits). The server also answers on that subject with flow
//! messages (`{"type":"ack"|"gap"|"err",...}`) and, at the commit, with a
//! publish acknowledgement carrying `batch` and `count`.
//!
//! Each alert keeps its `Nats-Msg-Id`, which the stream deduplicates inside
//! batches too: a batch that fails part way (a gap, an error, a leader
//! change, no answer in time) is published again alert by alert, and what
//! the stream already stored is dropped as a duplicate. Exactly once holds.

use std::time::Duration;

use async_nats::{Client, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

use crate::event::FalcoEvent;
use crate::nats::publisher::alert_headers;
use crate::nats::subject::SubjectTemplate;

/// Gap mode "fail": the server ends the batch at the first lost message,
/// and the bridge publishes the batch again.
const GAP_FAIL: &str = "fail";

/// The operations of a fast batch, as the server numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Start = 0,
    Append = 1,
    Commit = 2,
}

/// Why a batch was not acknowledged whole: its alerts are published again
/// one by one.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("cannot publish the batch: {0}")]
    Publish(#[from] async_nats::PublishError),
    #[error("no acknowledgement of the batch within {0:?}")]
    TimedOut(Duration),
    #[error("the reply subscription ended (connection closed)")]
    Closed,
    #[error("the stream refused the batch: {0}")]
    Refused(String),
    #[error("the stream stored {stored} of the batch's {sent} alerts")]
    Partial { stored: u64, sent: u64 },
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
}

/// What the server sends on a batch's reply subject. Flow messages carry
/// `type`; the final acknowledgement carries `stream` and `count`, or `error`.
#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(rename = "type")]
    kind: Option<String>,
    count: Option<u64>,
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    description: String,
}

impl FastBatches {
    /// Subscribes to this connection's batch replies. `timeout` bounds the
    /// wait for a batch's acknowledgement after its last alert was sent.
    pub async fn new(
        client: Client,
        timeout: Duration,
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
        })
    }

    /// Publishes `alerts` as one batch and waits until the stream
    /// acknowledges all of it. On an error some, all or none may be stored:
    /// the caller publishes them again by message id.
    pub async fn publish(
        &mut self,
        subject: &SubjectTemplate,
        alerts: &[FalcoEvent],
    ) -> Result<(), BatchError> {
        let sent = alerts.len() as u64;
        if sent == 0 {
            return Ok(());
        }
        self.next += 1;
        // The batch's own prefix: `<inbox><token>-<n>.<flow>.fail.`; the
        // flow (how often the server reports progress) is the batch size, so
        // the bridge never has to stall inside a batch.
        let batch = format!("{}{}-{:x}.", self.inbox, self.token, self.next);
        let prefix = format!("{batch}{}.{GAP_FAIL}.", sent.min(u64::from(u16::MAX)));
        for (i, event) in alerts.iter().enumerate() {
            let seq = i as u64 + 1;
            let op = if seq == sent {
                Operation::Commit
            } else if seq == 1 {
                Operation::Start
            } else {
                Operation::Append
            };
            let reply = format!("{prefix}{seq}.{}.$FI", op as u8);
            self.client
                .publish_with_reply_and_headers(
                    subject.render(event),
                    reply,
                    alert_headers(event),
                    event.payload.clone(),
                )
                .await?;
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.replies.next())
                .await
                .map_err(|_| BatchError::TimedOut(self.timeout))?
                .ok_or(BatchError::Closed)?;
            // Late answers to an earlier batch (it timed out) are not this one's.
            if !message.subject.as_str().starts_with(&batch) {
                continue;
            }
            match classify(&message.payload) {
                Answer::Progress => continue,
                Answer::Done { count } if count == sent => return Ok(()),
                Answer::Done { count } => {
                    return Err(BatchError::Partial {
                        stored: count,
                        sent,
                    })
                }
                // A gap or an error ends a gap-fail batch: the acknowledgement
                // of what was stored follows, but the batch is redone anyway.
                Answer::Failed(why) => return Err(BatchError::Refused(why)),
            }
        }
    }
}

/// What one answer on a batch's reply subject means.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Flow control: progress inside the batch.
    Progress,
    /// The batch's acknowledgement: `count` messages in it were taken.
    Done { count: u64 },
    /// A gap, an error for one message, or the batch refused.
    Failed(String),
}

fn classify(payload: &Bytes) -> Answer {
    let reply: Reply = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => return Answer::Failed(format!("unreadable answer: {e}")),
    };
    if let Some(error) = reply.error {
        return Answer::Failed(error.description);
    }
    match (reply.kind.as_deref(), reply.count) {
        (Some("ack"), _) => Answer::Progress,
        (Some(other), _) => {
            Answer::Failed(format!("{other}: {}", String::from_utf8_lossy(payload)))
        }
        (None, Some(count)) => Answer::Done { count },
        (None, None) => Answer::Failed(format!(
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
        assert_eq!(a(r#"{"type":"ack","seq":0,"msgs":256}"#), Answer::Progress);
        assert_eq!(
            a(r#"{"stream":"FALCO","seq":512,"batch":"x-1","count":256}"#),
            Answer::Done { count: 256 }
        );
        assert_eq!(
            a(r#"{"stream":"FALCO","seq":3,"duplicate": true,"batch":"x-1","count":1}"#),
            Answer::Done { count: 1 }
        );
        assert!(matches!(
            a(r#"{"type":"gap","last_seq":3,"seq":5}"#),
            Answer::Failed(_)
        ));
        assert!(matches!(
            a(r#"{"type":"err","seq":7,"error":{"code":400,"err_code":10071,"description":"wrong last sequence"}}"#),
            Answer::Failed(d) if d == "wrong last sequence"
        ));
        assert!(matches!(
            a(r#"{"error":{"code":400,"err_code":10205,"description":"batch publish is disabled"},"stream":"FALCO"}"#),
            Answer::Failed(d) if d.contains("disabled")
        ));
        // A plain publish acknowledgement: no count, so not a batch's.
        assert!(matches!(
            a(r#"{"stream":"FALCO","seq":3}"#),
            Answer::Failed(_)
        ));
        assert!(matches!(a("not json"), Answer::Failed(_)));
    }
}
