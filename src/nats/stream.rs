//! The stream the bridge publishes to: made if missing, checked when it
//! exists (it must take every subject the template makes, with the
//! replicas asked), and which refusals of it are for good.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::backoff::Backoff;
use crate::nats::subject::{covers, SubjectTemplate};

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
pub(super) async fn ensure_stream(
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
pub(super) fn permanent_refusal(e: &jetstream::context::PublishError) -> Option<&'static str> {
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
pub(super) async fn stream_refuses(
    context: &jetstream::Context,
    name: &str,
    subject: &str,
) -> bool {
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
