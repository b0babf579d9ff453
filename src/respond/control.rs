//! What every responder replica shares through NATS, in one JetStream
//! key-value bucket (`--kv-bucket`, default `falco-nats`):
//!
//! - `pause`: the kill switch. `falco-nats pause` writes who, why and when;
//!   `resume` writes that it is over. Each responder reads it every
//!   [`POLL`]; while paused, destructive actions are skipped (reason
//!   `paused`). When the key cannot be read for [`STALE_AFTER`], the state
//!   is unknown and destructive actions are skipped too (`pause_unknown`):
//!   a kill switch that cannot be read is treated as pulled.
//! - `actions`: the destructive actions of the last minute, across all
//!   replicas: their times, updated with compare-and-set on the key's
//!   revision, so two replicas cannot both take the last slot. When the
//!   bucket cannot be reached, the action is not taken
//!   (`rate_limit_unavailable`).
//!
//! Nothing here comes from an alert; values are written by responders and
//! the `pause` command, but read as untrusted all the same: a malformed one
//! is an error with its reason, and the action is not taken.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The default bucket.
pub const DEFAULT_BUCKET: &str = "falco-nats";
/// The kill switch's key.
pub const PAUSE_KEY: &str = "pause";
/// The shared rate limit's key.
pub const ACTIONS_KEY: &str = "actions";
/// How often each responder reads the kill switch.
pub const POLL: Duration = Duration::from_millis(200);
/// A pause state older than this is not trusted: unknown.
pub const STALE_AFTER: Duration = Duration::from_secs(2);
/// Longest wait for one key-value operation.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Compare-and-set attempts for one slot before giving up (fail closed).
const CAS_ATTEMPTS: usize = 64;
/// The rate limit's window.
const WINDOW_MS: u64 = 60_000;
/// The largest `--max-actions-per-minute`: the record holds one time per action.
pub const MAX_ACTIONS_PER_MINUTE: u32 = 10_000;

/// Where the shared state lives.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    pub bucket: String,
    /// Replicas of the bucket when this process creates it.
    pub replicas: usize,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            bucket: DEFAULT_BUCKET.to_owned(),
            replicas: 1,
        }
    }
}

/// Why the shared state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot open or create the key-value bucket {bucket:?} (the kill switch and the shared rate limit need JetStream): {reason}")]
    Bucket { bucket: String, reason: String },
    #[error("the key-value bucket did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("cannot read key {key:?}: {reason}")]
    Read { key: &'static str, reason: String },
    #[error("cannot write key {key:?}: {reason}")]
    Write { key: &'static str, reason: String },
    #[error("key {key:?} holds a malformed value ({reason}); fix or delete it")]
    Malformed { key: &'static str, reason: String },
    #[error("{0} responders competed for the last rate-limit slots; try again")]
    Contended(usize),
}

/// The kill switch's record, as `pause` and `resume` write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseRecord {
    pub paused: bool,
    /// Who: `--by`, else user@host.
    pub by: String,
    #[serde(default)]
    pub reason: String,
    /// When, RFC 3339.
    pub at: String,
}

impl PauseRecord {
    /// A record written now.
    pub fn now(paused: bool, by: &str, reason: &str) -> Self {
        PauseRecord {
            paused,
            by: by.to_owned(),
            reason: reason.to_owned(),
            at: k8s_openapi::jiff::Timestamp::now().to_string(),
        }
    }

    /// Reads a value of the `pause` key.
    pub fn parse(value: &[u8]) -> Result<Self, ControlError> {
        serde_json::from_slice(value).map_err(|e| ControlError::Malformed {
            key: PAUSE_KEY,
            reason: e.to_string(),
        })
    }
}

impl std::fmt::Display for PauseRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.paused { "paused" } else { "running" };
        write!(f, "{state} by {:?} at {}", self.by, self.at)?;
        if !self.reason.is_empty() {
            write!(f, ": {:?}", self.reason)?;
        }
        Ok(())
    }
}

/// What a responder knows of the kill switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PauseState {
    /// Never paused, resumed, or the key deleted.
    Running(Option<PauseRecord>),
    Paused(PauseRecord),
    /// Not read yet, not read lately, or malformed: why.
    Unknown(String),
}

impl PauseState {
    /// The state a read of the `pause` key gives.
    pub fn from_entry(entry: Option<&kv::Entry>) -> Self {
        match entry {
            Some(e) if e.operation == kv::Operation::Put => match PauseRecord::parse(&e.value) {
                Ok(r) if r.paused => PauseState::Paused(r),
                Ok(r) => PauseState::Running(Some(r)),
                Err(e) => PauseState::Unknown(e.to_string()),
            },
            _ => PauseState::Running(None),
        }
    }
}

/// The shared state, open.
pub struct Control {
    kv: kv::Store,
    bucket: String,
    /// The last pause state read, and when.
    pause: Mutex<(PauseState, Instant)>,
}

/// A refusal the shared state gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// The kill switch is pulled.
    Paused,
    /// The kill switch cannot be read lately (why).
    PauseUnknown(String),
    /// The cluster-wide rate limit is used up.
    RateLimited,
    /// The rate limit cannot be checked (why).
    RateLimitUnavailable(String),
}

/// Opens the bucket, creating it when missing.
pub async fn open_bucket(
    client: &async_nats::Client,
    options: &ControlOptions,
) -> Result<kv::Store, ControlError> {
    let js = jetstream::new(client.clone());
    let fail = |reason: String| ControlError::Bucket {
        bucket: options.bucket.clone(),
        reason,
    };
    let open = async {
        match js.get_key_value(&options.bucket).await {
            Ok(store) => Ok(store),
            Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
                // The bucket's stream, made as a key-value bucket is made
                // (async-nats's own create asks the account first, which
                // nats-server 2.9's answer fails).
                js.create_stream(bucket_stream(options))
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                js.get_key_value(&options.bucket)
                    .await
                    .map_err(|e| fail(e.to_string()))
            }
            Err(e) => Err(fail(e.to_string())),
        }
    };
    tokio::time::timeout(OP_TIMEOUT * 5, open)
        .await
        .map_err(|_| fail(format!("no answer within {:?}", OP_TIMEOUT * 5)))?
}

/// The stream behind a key-value bucket: the settings every NATS client
/// gives one (one value per key, rollups, direct gets, no deletes of messages).
fn bucket_stream(options: &ControlOptions) -> jetstream::stream::Config {
    use jetstream::stream;
    stream::Config {
        name: format!("KV_{}", options.bucket),
        description: Some("falco-nats responders: kill switch and shared rate limit".into()),
        subjects: vec![format!("$KV.{}.>", options.bucket)],
        max_messages_per_subject: 1,
        max_bytes: -1,
        max_messages: -1,
        max_message_size: -1,
        storage: stream::StorageType::File,
        num_replicas: options.replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The rate limit's decision on one record of action times: drops the
/// times out of the window, and takes a slot at `now` unless `limit` are
/// used (`take` false only looks). Whether a slot is (or would be) there.
pub fn admit(times: &mut Vec<u64>, now: u64, limit: u32, take: bool) -> bool {
    times.retain(|&t| t + WINDOW_MS > now && t <= now + WINDOW_MS);
    if times.len() >= limit as usize {
        return false;
    }
    if take {
        times.push(now);
    }
    true
}

async fn timed<T, E: std::fmt::Display>(
    op: impl std::future::Future<Output = Result<T, E>>,
    fail: impl FnOnce(String) -> ControlError,
) -> Result<T, ControlError> {
    match tokio::time::timeout(OP_TIMEOUT, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(ControlError::TimedOut(OP_TIMEOUT)),
    }
}

impl Control {
    /// Opens the bucket and reads the kill switch once: a responder that
    /// starts while paused is paused from its first alert.
    pub async fn open(
        client: &async_nats::Client,
        options: &ControlOptions,
    ) -> Result<Self, ControlError> {
        let kv = open_bucket(client, options).await?;
        let control = Control {
            kv,
            bucket: options.bucket.clone(),
            pause: Mutex::new((PauseState::Unknown("not read yet".into()), Instant::now())),
        };
        control.read_pause().await?;
        Ok(control)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Reads the kill switch and remembers it.
    async fn read_pause(&self) -> Result<PauseState, ControlError> {
        let entry = timed(self.kv.entry(PAUSE_KEY), |reason| ControlError::Read {
            key: PAUSE_KEY,
            reason,
        })
        .await?;
        let state = PauseState::from_entry(entry.as_ref());
        *self.lock() = (state.clone(), Instant::now());
        Ok(state)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (PauseState, Instant)> {
        self.pause
            .lock()
            .expect("no code panics while holding the pause state")
    }

    /// The kill switch as last read; unknown when that was too long ago.
    pub fn pause_state(&self) -> PauseState {
        let (state, at) = self.lock().clone();
        if at.elapsed() > STALE_AFTER {
            return PauseState::Unknown(format!(
                "the kill switch was last read {:.1}s ago",
                at.elapsed().as_secs_f64()
            ));
        }
        state
    }

    /// Refuses destructive actions while paused, or while the kill switch's state is unknown.
    pub fn check_pause(&self) -> Result<(), Gate> {
        match self.pause_state() {
            PauseState::Running(_) => Ok(()),
            PauseState::Paused(_) => Err(Gate::Paused),
            PauseState::Unknown(why) => Err(Gate::PauseUnknown(why)),
        }
    }

    /// Reads the kill switch every [`POLL`] until `shutdown`, calling
    /// `changed` when what it says changes.
    pub async fn watch_pause(
        self: Arc<Self>,
        shutdown: CancellationToken,
        changed: impl Fn(&PauseState),
    ) {
        let mut last: Option<PauseState> = None;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(e) = self.read_pause().await {
                tracing::debug!(error = %e, "cannot read the kill switch");
            }
            let now = self.pause_state();
            if last.as_ref() != Some(&now) {
                changed(&now);
                last = Some(now);
            }
        }
    }

    /// Takes one slot of the cluster-wide budget of `limit` destructive
    /// actions per minute (`take` false: only looks, for dry runs).
    pub async fn take_slot(&self, limit: u32, take: bool) -> Result<(), Gate> {
        let unavailable = |e: ControlError| Gate::RateLimitUnavailable(e.to_string());
        for attempt in 0..CAS_ATTEMPTS {
            let entry = timed(self.kv.entry(ACTIONS_KEY), |reason| ControlError::Read {
                key: ACTIONS_KEY,
                reason,
            })
            .await
            .map_err(unavailable)?;
            let (mut times, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    let times: Vec<u64> = serde_json::from_slice(&e.value).map_err(|err| {
                        unavailable(ControlError::Malformed {
                            key: ACTIONS_KEY,
                            reason: err.to_string(),
                        })
                    })?;
                    (times, Some(e.revision))
                }
                Some(e) => (Vec::new(), Some(e.revision)),
                None => (Vec::new(), None),
            };
            if !admit(&mut times, now_ms(), limit, take) {
                return Err(Gate::RateLimited);
            }
            if !take {
                return Ok(());
            }
            let value = serde_json::to_vec(&times)
                .expect("a list of numbers always serializes")
                .into();
            let written = match revision {
                Some(revision) => {
                    let update = self.kv.update(ACTIONS_KEY, value, revision);
                    match tokio::time::timeout(OP_TIMEOUT, update).await {
                        Ok(Ok(_)) => Ok(true),
                        Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            Ok(false)
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
                    }
                }
                None => {
                    let create = self.kv.create(ACTIONS_KEY, value);
                    match tokio::time::timeout(OP_TIMEOUT, create).await {
                        Ok(Ok(_)) => Ok(true),
                        Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
                    }
                }
            };
            match written {
                Ok(true) => return Ok(()),
                // Another replica wrote first: read again.
                Ok(false) => {
                    let jitter = fastrand::u64(1..=5 + attempt as u64);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(reason) => {
                    return Err(unavailable(ControlError::Write {
                        key: ACTIONS_KEY,
                        reason,
                    }))
                }
            }
        }
        Err(unavailable(ControlError::Contended(CAS_ATTEMPTS)))
    }
}

/// `falco-nats pause` / `resume`: writes the kill switch.
pub async fn set_pause(
    client: &async_nats::Client,
    options: &ControlOptions,
    record: &PauseRecord,
) -> Result<(), ControlError> {
    let kv = open_bucket(client, options).await?;
    let value = serde_json::to_vec(record)
        .expect("a pause record always serializes")
        .into();
    timed(kv.put(PAUSE_KEY, value), |reason| ControlError::Write {
        key: PAUSE_KEY,
        reason,
    })
    .await?;
    Ok(())
}

/// `falco-nats pause --status`: the kill switch as stored.
pub async fn pause_status(
    client: &async_nats::Client,
    options: &ControlOptions,
) -> Result<PauseState, ControlError> {
    let kv = open_bucket(client, options).await?;
    let entry = timed(kv.entry(PAUSE_KEY), |reason| ControlError::Read {
        key: PAUSE_KEY,
        reason,
    })
    .await?;
    Ok(PauseState::from_entry(entry.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_holds_the_limit_and_slides() {
        let mut times = Vec::new();
        for i in 0..3 {
            assert!(admit(&mut times, 1_000 + i, 3, true));
        }
        assert!(!admit(&mut times, 2_000, 3, true), "three in the minute");
        assert!(!admit(&mut times, 2_000, 3, false), "looking says the same");
        assert_eq!(times.len(), 3);
        assert!(
            admit(&mut times, 61_000, 3, true),
            "the first left the window"
        );
        assert_eq!(times, [1_001, 1_002, 61_000]);
        let mut looking = vec![1];
        assert!(admit(&mut looking, 2, 2, false));
        assert_eq!(looking, [1], "a dry run takes nothing");
        // A time far in the future (a clock gone wrong) does not hold the budget forever.
        let mut future = vec![u64::MAX / 2];
        assert!(admit(&mut future, 1_000, 1, true));
    }

    #[test]
    fn pause_records_read_strictly() {
        let record = PauseRecord::now(true, "ops@host", "incident 42");
        let json = serde_json::to_vec(&record).unwrap();
        assert_eq!(PauseRecord::parse(&json).unwrap(), record);
        for bad in [
            &b"yes"[..],
            br#"{"paused":"true","by":"x","at":"y"}"#,
            br#"{"paused":true}"#,
            br#"{"paused":true,"by":"x","at":"y","extra":1}"#,
        ] {
            let e = PauseRecord::parse(bad).unwrap_err().to_string();
            assert!(e.contains("malformed"), "{e}");
        }
        let shown = PauseRecord {
            reason: "a\nb".into(),
            ..record
        }
        .to_string();
        assert!(shown.starts_with("paused by \"ops@host\""), "{shown}");
        assert!(!shown.contains('\n'), "{shown}");
    }
}
