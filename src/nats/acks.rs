//! [`Acks`]: plain JetStream publishes whose acknowledgements all come back
//! on one subscription (`<inbox>.<n>`), read by the bridge itself.
//!
//! async-nats's `jetstream::Context::publish` makes a fresh inbox for every
//! message, routes its answer through the client's request map, and reads
//! the acknowledgement as an untagged enum (serde buffers it and formats an
//! error for the variant that does not fit): about a fifth of the bridge's
//! instructions per alert in JetStream mode. Here a message's reply subject
//! is the inbox and a counter, the answer is found by that counter, and the
//! acknowledgement is read into one struct. What an answer means is
//! async-nats's: a stream's error keeps its code, no responders means no
//! stream, and an answer that does not come within the wait is a time-out.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::{Client, HeaderMap, StatusCode, Subject, Subscriber};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::time::Instant;

use crate::event::FalcoEvent;

/// Alerts published and not yet answered.
pub struct Acks {
    client: Client,
    replies: Subscriber,
    /// `<inbox>.`: a reply subject is this and the alert's number.
    prefix: String,
    /// The next alert's number.
    next: u64,
    /// The lowest number that may still be waiting (numbers are given in
    /// sending order, so it is the oldest).
    oldest: u64,
    waiting: HashMap<u64, Waiting, BuildHasherDefault<NumberHasher>>,
    wait: Duration,
}

/// Hashes an alert's number with one multiplication: the numbers are
/// consecutive and given out here, and SipHash cost more than the rest of
/// the map's work. (Fibonacci hashing: the product's high bits, which the
/// map's probing reads, differ for consecutive numbers.)
#[derive(Default)]
struct NumberHasher(u64);

impl Hasher for NumberHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = ((self.0 << 8) | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

struct Waiting {
    event: FalcoEvent,
    sent: Instant,
}

/// What became of one alert.
pub enum AckAnswer {
    Stored {
        event: FalcoEvent,
        duplicate: bool,
    },
    Failed {
        event: FalcoEvent,
        error: PublishError,
    },
}

impl Acks {
    /// Subscribes to a fresh inbox of `client`; answers not there within
    /// `wait` are time-outs.
    pub async fn new(client: Client, wait: Duration) -> Result<Self, async_nats::SubscribeError> {
        let inbox = client.new_inbox();
        let replies = client.subscribe(format!("{inbox}.*")).await?;
        Ok(Acks {
            client,
            replies,
            prefix: format!("{inbox}."),
            next: 0,
            oldest: 0,
            waiting: HashMap::default(),
            wait,
        })
    }

    /// Alerts sent and not yet answered.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Sends `event` on `subject`; an error that kept it from being sent
    /// gives the alert back with it.
    pub async fn publish(
        &mut self,
        subject: Subject,
        headers: HeaderMap,
        event: FalcoEvent,
    ) -> Result<(), Box<(FalcoEvent, PublishError)>> {
        let n = self.next;
        self.next += 1;
        let mut reply = String::with_capacity(self.prefix.len() + 20);
        reply.push_str(&self.prefix);
        push_decimal(&mut reply, n);
        let sent = self
            .client
            .publish_with_reply_and_headers(subject, reply, headers, event.payload.clone())
            .await;
        match sent {
            Ok(()) => {
                let sent = Instant::now();
                self.waiting.insert(n, Waiting { event, sent });
                Ok(())
            }
            Err(e) => {
                let kind = match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                        PublishErrorKind::MaxPayloadExceeded
                    }
                    _ => PublishErrorKind::Other,
                };
                Err(Box::new((event, PublishError::with_source(kind, e))))
            }
        }
    }

    /// The next answer, or the oldest alert whose answer is overdue;
    /// `None` once nothing waits. Cancel-safe: dropped before it returns,
    /// it has only moved past numbers already answered.
    pub async fn next(&mut self) -> Option<AckAnswer> {
        loop {
            while self.oldest < self.next && !self.waiting.contains_key(&self.oldest) {
                self.oldest += 1;
            }
            let due = self.waiting.get(&self.oldest)?.sent + self.wait;
            tokio::select! {
                biased;
                message = self.replies.next() => {
                    let Some(message) = message else {
                        // The subscription ended (the client is closed):
                        // every alert waiting fails, oldest first.
                        let event = self.waiting.remove(&self.oldest)?.event;
                        let error = PublishError::new(PublishErrorKind::BrokenPipe);
                        return Some(AckAnswer::Failed { event, error });
                    };
                    let Some(n) = message
                        .subject
                        .strip_prefix(self.prefix.as_str())
                        .and_then(|n| n.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    // A late answer to an alert already given up on (its
                    // retry is under way, with the same message id).
                    let Some(Waiting { event, .. }) = self.waiting.remove(&n) else {
                        continue;
                    };
                    return Some(match read(message.status, &message.payload) {
                        Ok(duplicate) => AckAnswer::Stored { event, duplicate },
                        Err(error) => AckAnswer::Failed { event, error },
                    });
                }
                () = tokio::time::sleep_until(due) => {
                    let event = self.waiting.remove(&self.oldest)?.event;
                    let error = PublishError::new(PublishErrorKind::TimedOut);
                    return Some(AckAnswer::Failed { event, error });
                }
            }
        }
    }
}

/// Appends `n` in decimal (without the formatting machinery: once an alert).
fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).expect("decimal digits are ASCII"));
}

/// A publish acknowledgement, or a stream's error.
#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    error: Option<jetstream::Error>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
}

/// Reads one answer: `Ok(duplicate)` for an acknowledgement.
fn read(status: Option<StatusCode>, payload: &[u8]) -> Result<bool, PublishError> {
    if status == Some(StatusCode::NO_RESPONDERS) {
        return Err(PublishError::new(PublishErrorKind::StreamNotFound));
    }
    let reply: Reply = serde_json::from_slice(payload)
        .map_err(|e| PublishError::with_source(PublishErrorKind::Other, e))?;
    if let Some(error) = reply.error {
        use jetstream::ErrorCode;
        let kind = match error.error_code() {
            ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID => PublishErrorKind::WrongLastMessageId,
            ErrorCode::STREAM_WRONG_LAST_SEQUENCE => PublishErrorKind::WrongLastSequence,
            _ => PublishErrorKind::Other,
        };
        return Err(PublishError::with_source(kind, error));
    }
    if reply.seq.is_none() {
        return Err(PublishError::with_source(
            PublishErrorKind::Other,
            format!(
                "not an acknowledgement: {}",
                String::from_utf8_lossy(&payload[..payload.len().min(200)])
            ),
        ));
    }
    Ok(reply.duplicate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 99, 12345, u64::MAX] {
            let mut s = String::from("x.");
            push_decimal(&mut s, n);
            assert_eq!(s, format!("x.{n}"));
        }
    }

    #[test]
    fn answers_are_read_as_async_nats_reads_them() {
        assert!(!read(None, br#"{"stream":"FALCO","seq":3}"#).unwrap());
        assert!(read(None, br#"{"stream":"FALCO","seq":3,"duplicate":true}"#).unwrap());
        assert!(!read(
            None,
            br#"{"stream":"FALCO","domain":"n1","seq":3,"duplicate":false}"#
        )
        .unwrap());
        let kind = |status, payload: &[u8]| read(status, payload).unwrap_err().kind();
        assert_eq!(
            kind(Some(StatusCode::NO_RESPONDERS), b""),
            PublishErrorKind::StreamNotFound
        );
        assert_eq!(
            kind(None, br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 2"},"stream":"FALCO","seq":0}"#),
            PublishErrorKind::WrongLastSequence
        );
        let e = read(None, br#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"}}"#).unwrap_err();
        assert_eq!(e.kind(), PublishErrorKind::Other);
        let api = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .expect("the stream's error is kept");
        assert_eq!(
            api.error_code(),
            jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
        );
        assert_eq!(kind(None, b"not json"), PublishErrorKind::Other);
        assert_eq!(kind(None, b"{}"), PublishErrorKind::Other);
    }
}
