//! What every responder replica shares through NATS, in two JetStream
//! key-value buckets:
//!
//! - `pause` in the bucket `--pause-bucket` (default `falco-nats-pause`):
//!   the kill switch. `falco-nats pause` writes who (the NATS user the
//!   server says it is), why and when; `resume` writes that it is over.
//!   Responders may only read that bucket, and its stream refuses roll-ups,
//!   purges and deletes, so no responder can release it. Each responder
//!   reads it every [`POLL`]; while paused, destructive actions are skipped
//!   (reason `paused`). When the key cannot be read for [`STALE_AFTER`], is
//!   malformed, is missing after having been set, or its stream's settings
//!   would let a writer undo it, the state is unknown and destructive
//!   actions are skipped too (`pause_unknown`): a kill switch that cannot be
//!   trusted is treated as pulled.
//! - `actions` in the bucket `--kv-bucket` (default `falco-nats`): the
//!   destructive actions of the last minute, across all replicas: their
//!   times, updated with compare-and-set on the key's revision, so two
//!   replicas cannot both take the last slot. When the bucket cannot be
//!   reached, the action is not taken (`rate_limit_unavailable`).
//! - `replicas.<kind>.<namespace>.<name>` in the same bucket: every
//!   replica's deletions of a workload's pods in the last 30 s
//!   (min_healthy_replicas), and `seen.<namespace>.<pod>.<digest>`: the
//!   claim on an action (the duplicate rule), a lease while under way.
//! - `--guards local`: the same records in this process's memory, and no
//!   kill switch (a server without JetStream).
//!
//! Nothing here comes from an alert; values are written by responders and
//! the `pause` command, but read as untrusted all the same: a malformed one
//! is an error with its reason, and the action is not taken. With
//! `--kv-key-file` the responders seal their records, and one someone else
//! wrote is not believed (`Seal`). Every bucket refuses roll-ups, purges
//! and message deletes, and has a size limit, so no writer of one key can
//! wipe the others or fill the server's store.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::outcome::{Skip, Skipped};
use super::rails::DedupKey;
use super::workload::{self, MinHealthy, Reservation, Workload};
use crate::signing::now_ms;
use crate::telemetry::logging::chain;

/// The default bucket of the shared rate limit.
pub const DEFAULT_BUCKET: &str = "falco-nats";
/// The default bucket of the kill switch.
pub const DEFAULT_PAUSE_BUCKET: &str = "falco-nats-pause";
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
/// A bucket's size limit: its records are small, and the claims of a day
/// (one per pod and action) fit many times over.
const BUCKET_MAX_BYTES: i64 = 64 << 20;
/// A record's size limit: the rate limit's, at its largest, is about
/// 140 KiB (10,000 times of 14 digits).
const BUCKET_MAX_MESSAGE: i32 = 256 << 10;

/// Where the shared state lives.
#[derive(Clone)]
pub struct ControlOptions {
    /// The rate limit's bucket.
    pub bucket: String,
    /// The kill switch's bucket.
    pub pause_bucket: String,
    /// Replicas of the buckets when this process creates them.
    pub replicas: usize,
    /// The secret the responders seal their shared records with
    /// (`--kv-key-file`): a record someone else wrote (with the responder's
    /// NATS credential, say) is then not believed.
    pub record_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for ControlOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlOptions")
            .field("bucket", &self.bucket)
            .field("pause_bucket", &self.pause_bucket)
            .field("replicas", &self.replicas)
            .field("record_key", &self.record_key.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            bucket: DEFAULT_BUCKET.to_owned(),
            pause_bucket: DEFAULT_PAUSE_BUCKET.to_owned(),
            replicas: 1,
            record_key: None,
        }
    }
}

/// What failed under a bucket operation: the client's own error, or
/// [`NoAnswer`].
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why the shared state cannot be used. The cause is its source: say it
/// with [`crate::telemetry::logging::chain`].
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot open or create the key-value bucket {bucket:?} (the kill switch and the shared rate limit need JetStream)")]
    Bucket {
        bucket: String,
        #[source]
        source: Cause,
    },
    #[error("cannot read key {key:?}")]
    Read {
        key: &'static str,
        #[source]
        source: Cause,
    },
    #[error("cannot write key {key:?}")]
    Write {
        key: &'static str,
        #[source]
        source: Cause,
    },
    #[error("key {key:?} holds a malformed value; fix or delete it")]
    Malformed {
        key: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0} responders competed for the last rate-limit slots; try again")]
    Contended(usize),
    #[error("cannot learn from the NATS server which user this is")]
    Identity(#[source] IdentityError),
    #[error("key {key:?} holds a record not sealed with --kv-key-file, not believed")]
    Forged {
        key: &'static str,
        #[source]
        source: Unsealed,
    },
}

/// A bucket operation that took too long.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {0:?}")]
pub struct NoAnswer(pub Duration);

/// Why a record is not believed sealed.
#[derive(Debug, thiserror::Error)]
pub enum Unsealed {
    #[error("it was deleted")]
    Deleted,
    #[error("its seal does not match")]
    Mismatch,
    #[error("not a sealed record")]
    NotSealed(#[source] serde_json::Error),
}

/// Why the server did not say who this is.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no answer within {0:?} (the user needs permission to publish $SYS.REQ.USER.INFO)")]
    NoAnswer(Duration),
    #[error(transparent)]
    Request(#[from] async_nats::RequestError),
    #[error("a malformed answer")]
    Malformed(#[source] serde_json::Error),
    #[error("the server answered {0}")]
    Refused(String),
    #[error("an answer without data")]
    NoData,
}

/// The kill switch's record, as `pause` and `resume` write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseRecord {
    pub paused: bool,
    /// Who: the NATS user that wrote it, as the server told the writer
    /// (only users allowed to publish into the bucket can write it).
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
        serde_json::from_slice(value).map_err(|source| ControlError::Malformed {
            key: PAUSE_KEY,
            source,
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
    /// Never paused (the key never set), or resumed.
    Running(Option<PauseRecord>),
    Paused(PauseRecord),
    /// Not read yet, not read lately, malformed, deleted or missing after
    /// having been set, or kept in a bucket that lets a writer undo it: why.
    Unknown(String),
    /// There is none: `--guards local`.
    Off,
}

impl PauseState {
    /// The state one read of the `pause` key gives: `entry` as read, and
    /// whether the key was ever set (the bucket's stream has held a message,
    /// or this process saw one). A key deleted, purged or missing after
    /// having been set is unknown, never running.
    pub fn from_read(entry: Option<&kv::Entry>, was_set: bool) -> Self {
        match entry {
            Some(e) if e.operation == kv::Operation::Put => match PauseRecord::parse(&e.value) {
                Ok(r) if r.paused => PauseState::Paused(r),
                Ok(r) => PauseState::Running(Some(r)),
                Err(e) => PauseState::Unknown(chain(&e)),
            },
            Some(e) => PauseState::Unknown(format!(
                "the key {PAUSE_KEY:?} was {} (revision {}); `falco-nats pause` or `resume` sets it again",
                if e.operation == kv::Operation::Delete { "deleted" } else { "purged" },
                e.revision
            )),
            None if was_set => PauseState::Unknown(format!(
                "the key {PAUSE_KEY:?} is missing after having been set; `falco-nats pause` or `resume` sets it again"
            )),
            None => PauseState::Running(None),
        }
    }
}

/// What in a bucket's stream settings would let one writer undo what
/// another wrote, or the bucket lose its keys by itself: roll-ups, purges,
/// deletes, an age limit, per-message TTLs or schedules, or messages coming
/// from elsewhere (a mirror, sources, a subject transform, other subjects).
/// Empty when the settings are safe.
pub fn unsafe_settings(config: &stream::Config, bucket: &str) -> Vec<&'static str> {
    let mut found = Vec::new();
    let mut check = |bad: bool, what: &'static str| {
        if bad {
            found.push(what);
        }
    };
    check(config.allow_rollup, "allows roll-ups");
    check(!config.deny_purge, "allows purges");
    check(!config.deny_delete, "allows deletes");
    check(!config.max_age.is_zero(), "has a maximum age");
    check(config.allow_message_ttl, "allows per-message TTLs");
    check(config.allow_message_schedules, "allows message schedules");
    check(config.mirror.is_some(), "mirrors another stream");
    check(
        config.sources.as_ref().is_some_and(|s| !s.is_empty()),
        "sources other streams",
    );
    check(config.subject_transform.is_some(), "transforms subjects");
    check(
        config.subjects != [format!("$KV.{bucket}.>")],
        "takes other subjects than its keys'",
    );
    check(
        config.max_messages_per_subject < 1,
        "keeps no value per key",
    );
    found
}

/// Where the guards keep their state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Guards {
    /// In JetStream, shared by every replica: the kill switch, one rate
    /// limit, shared reservations and claims.
    #[default]
    Shared,
    /// In each responder's memory (core NATS without JetStream): no kill
    /// switch, a limit per replica.
    Local,
}

/// The shared state, open.
pub struct Control {
    store: Store,
    seal: Seal,
    bucket: String,
    /// The last pause state read, when, and whether this process ever saw
    /// the key set.
    pause: Mutex<PauseMemo>,
}

/// The records' store: the buckets, or this process's memory.
enum Store {
    Shared {
        kv: Box<kv::Store>,
        pause_kv: Box<kv::Store>,
    },
    Local(Mutex<std::collections::HashMap<String, Vec<u64>>>),
}

struct PauseMemo {
    state: PauseState,
    at: Instant,
    seen_set: bool,
}

/// Opens a bucket, creating it (with `bucket_stream`'s safe settings)
/// when missing.
pub async fn open_bucket(
    client: &async_nats::Client,
    bucket: &str,
    replicas: usize,
    description: &str,
) -> Result<kv::Store, ControlError> {
    let js = jetstream::new(client.clone());
    let fail = |source: Cause| ControlError::Bucket {
        bucket: bucket.to_owned(),
        source,
    };
    let open = async {
        match js.get_key_value(bucket).await {
            Ok(store) => Ok(store),
            Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
                // The bucket's stream, made as a key-value bucket is made
                // (async-nats's own create asks the account first, which
                // nats-server 2.9's answer fails).
                js.create_stream(bucket_stream(bucket, replicas, description))
                    .await
                    .map_err(|e| fail(e.into()))?;
                js.get_key_value(bucket).await.map_err(|e| fail(e.into()))
            }
            Err(e) => Err(fail(e.into())),
        }
    };
    tokio::time::timeout(OP_TIMEOUT * 5, open)
        .await
        .map_err(|_| fail(NoAnswer(OP_TIMEOUT * 5).into()))?
}

/// The stream behind a bucket: what every NATS client gives a key-value
/// bucket (one value per key, direct gets), except that it refuses
/// roll-ups, purges and deletes: a writer of one key cannot wipe the others.
fn bucket_stream(bucket: &str, replicas: usize, description: &str) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        // Bounded: whoever may write a key cannot fill the server's store
        // (and so stop the kill switch being written).
        max_bytes: BUCKET_MAX_BYTES,
        max_messages: -1,
        max_message_size: BUCKET_MAX_MESSAGE,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        allow_rollup: false,
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

async fn open_pause_bucket(
    client: &async_nats::Client,
    options: &ControlOptions,
) -> Result<kv::Store, ControlError> {
    open_bucket(
        client,
        &options.pause_bucket,
        options.replicas,
        "falco-nats: the responders' kill switch (written by falco-nats pause and resume only)",
    )
    .await
}

/// Reads the kill switch once: its stream's settings and state, then the
/// key. `seen_set`: whether the caller saw the key set before; returned
/// with what this read adds to it.
async fn read_pause_state(
    kv: &kv::Store,
    seen_set: bool,
) -> Result<(PauseState, bool), ControlError> {
    let read = |source| ControlError::Read {
        key: PAUSE_KEY,
        source,
    };
    let info = timed(kv.stream.get_info(), read).await?;
    let found = unsafe_settings(&info.config, &kv.name);
    if !found.is_empty() {
        let why = format!(
            "the kill switch's stream {} {}: a writer could undo a pause (docs/respond.md: the kill switch)",
            info.config.name,
            found.join(", ")
        );
        return Ok((PauseState::Unknown(why), seen_set));
    }
    let entry = timed(kv.entry(PAUSE_KEY), read).await?;
    let was_set = seen_set || info.state.last_sequence > 0;
    let state = PauseState::from_read(entry.as_ref(), was_set);
    Ok((state, was_set || entry.is_some()))
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

/// `op`, failing with its error or [`NoAnswer`] after [`OP_TIMEOUT`].
async fn timed<T, E: std::error::Error + Send + Sync + 'static>(
    op: impl std::future::Future<Output = Result<T, E>>,
    fail: impl FnOnce(Cause) -> ControlError,
) -> Result<T, ControlError> {
    match tokio::time::timeout(OP_TIMEOUT, op).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(fail(e.into())),
        Err(_) => Err(fail(NoAnswer(OP_TIMEOUT).into())),
    }
}

impl Control {
    /// Opens the buckets and reads the kill switch once: a responder that
    /// starts while paused is paused from its first alert.
    pub async fn open(
        client: &async_nats::Client,
        options: &ControlOptions,
    ) -> Result<Self, ControlError> {
        let kv = open_bucket(
            client,
            &options.bucket,
            options.replicas,
            "falco-nats responders: the shared rate limit",
        )
        .await?;
        let found = unsafe_settings(&kv.stream.cached_info().config, &options.bucket);
        if !found.is_empty() {
            // Only the rate limit lives here; the kill switch has a bucket
            // of its own. Still worth an operator's edit.
            tracing::warn!(
                stream = %kv.stream_name,
                settings = %found.join(", "),
                "the rate limit's bucket lets one writer reset it (made by an older falco-nats?): \
                 nats stream edit it with --no-allow-rollup --deny-purge --deny-delete"
            );
        }
        let pause_kv = open_pause_bucket(client, options).await?;
        let seal = Seal(
            options
                .record_key
                .as_deref()
                .map(|k| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k)),
        );
        if seal.0.is_none() {
            tracing::warn!(
                bucket = %options.bucket,
                "no --kv-key-file: the shared records (claims, reservations, the rate limit) are believed whoever wrote them"
            );
        }
        let control = Control {
            seal,
            store: Store::Shared {
                kv: Box::new(kv),
                pause_kv: Box::new(pause_kv),
            },
            bucket: options.bucket.clone(),
            pause: Mutex::new(PauseMemo {
                state: PauseState::Unknown("not read yet".into()),
                at: Instant::now(),
                seen_set: false,
            }),
        };
        control.read_pause().await?;
        Ok(control)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Guards kept in this process only (`--guards local`): no kill
    /// switch, a rate limit and reservations per replica.
    pub fn local() -> Self {
        Control {
            seal: Seal(None),
            store: Store::Local(Mutex::default()),
            bucket: String::new(),
            pause: Mutex::new(PauseMemo {
                state: PauseState::Off,
                at: Instant::now(),
                seen_set: false,
            }),
        }
    }

    /// Where the guards keep their state.
    pub fn guards(&self) -> Guards {
        match self.store {
            Store::Shared { .. } => Guards::Shared,
            Store::Local(_) => Guards::Local,
        }
    }

    pub fn pause_bucket(&self) -> &str {
        match &self.store {
            Store::Shared { pause_kv, .. } => &pause_kv.name,
            Store::Local(_) => "",
        }
    }

    /// Reads the kill switch and remembers it.
    async fn read_pause(&self) -> Result<PauseState, ControlError> {
        let Store::Shared { pause_kv, .. } = &self.store else {
            return Ok(PauseState::Off);
        };
        let seen_set = self.lock().seen_set;
        let (state, seen_set) = read_pause_state(pause_kv, seen_set).await?;
        let mut memo = self.lock();
        memo.seen_set = seen_set;
        memo.state = state.clone();
        memo.at = Instant::now();
        Ok(state)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PauseMemo> {
        self.pause
            .lock()
            .expect("no code panics while holding the pause state")
    }

    /// The kill switch as last read; unknown when that was too long ago.
    pub fn pause_state(&self) -> PauseState {
        let memo = self.lock();
        if memo.state != PauseState::Off && memo.at.elapsed() > STALE_AFTER {
            return PauseState::Unknown(format!(
                "the kill switch was last read {:.1}s ago",
                memo.at.elapsed().as_secs_f64()
            ));
        }
        memo.state.clone()
    }

    /// Reads the kill switch now (the watcher does every [`POLL`]); the
    /// state as [`Self::pause_state`] then gives it.
    pub async fn refresh(&self) -> PauseState {
        if let Err(e) = self.read_pause().await {
            tracing::debug!(error = %chain(&e), "cannot read the kill switch");
        }
        self.pause_state()
    }

    /// Refuses destructive actions while paused, or while the kill switch's state is unknown.
    pub fn check_pause(&self) -> Result<(), Skipped> {
        match self.pause_state() {
            PauseState::Running(_) | PauseState::Off => Ok(()),
            PauseState::Paused(_) => Err(Skip::Paused.into()),
            PauseState::Unknown(why) => Err(Skip::PauseUnknown.because(why)),
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
            let now = self.refresh().await;
            if last.as_ref() != Some(&now) {
                changed(&now);
                last = Some(now);
            }
        }
    }

    /// Takes one slot of the cluster-wide budget of `limit` destructive
    /// actions per minute (`take` false: only looks, for dry runs).
    pub async fn take_slot(&self, limit: u32, take: bool) -> Result<(), Skipped> {
        let now = now_ms();
        let taken = self
            .update_times(ACTIONS_KEY, |times| {
                if !admit(times, now, limit, take) {
                    return Step::Keep(Err(Skip::RateLimited.into()));
                }
                if take {
                    Step::Write(Ok(()))
                } else {
                    Step::Keep(Ok(()))
                }
            })
            .await;
        match taken {
            Ok(result) => result,
            Err(e) => Err(Skip::RateLimitUnavailable.because(chain(&e))),
        }
    }

    /// Reserves the deletion of a pod of `workload` in the record every
    /// replica shares (min_healthy_replicas): refused (why) when it would
    /// leave fewer than `min` healthy replicas, counting what every replica
    /// deleted in the last [`workload::RECENT`]. A pod that is not
    /// `healthy` costs nothing. `Err`: the record cannot be used.
    pub async fn reserve_replica(
        &self,
        workload: &Workload,
        healthy: bool,
        min: MinHealthy,
    ) -> Result<Result<Reservation, workload::TooFewHealthy>, ControlError> {
        let key = workload::reservation_key(workload);
        if !healthy {
            return Ok(Ok(Reservation { key, at: None }));
        }
        let now = now_ms();
        let reserved = self
            .update_times(&key, |recent| {
                match workload::reserve_in(recent, workload, min, now) {
                    Ok(()) => Step::Write(Ok(())),
                    Err(why) => Step::Keep(Err(why)),
                }
            })
            .await?;
        Ok(reserved.map(|()| Reservation { key, at: Some(now) }))
    }

    /// Gives a reservation back: the pod was not deleted. Best effort: a
    /// reservation that cannot be given back lapses after
    /// [`workload::RECENT`].
    pub async fn release_replica(&self, reservation: &Reservation) {
        let Some(at) = reservation.at else { return };
        let released = self
            .update_times(&reservation.key, |recent| {
                match recent.iter().position(|&t| t == at) {
                    Some(i) => {
                        recent.remove(i);
                        Step::Write(())
                    }
                    None => Step::Keep(()),
                }
            })
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %chain(&e), key = %reservation.key, "cannot give a healthy-replica reservation back; it lapses in 30s");
        }
    }

    /// Claims an action on a pod for every replica (the rails' duplicate
    /// rule, shared), so a restarted responder and the other replicas
    /// remember it and an alert sent again (a replay, a redelivery) does
    /// not act twice. The record is `[claimed, done]` (ms; `done` 0 while
    /// the action is under way):
    /// - done within `window`: a duplicate;
    /// - under way for less than `lease`: another responder is acting now
    ///   (unless `take_over`, on an alert's last delivery);
    /// - otherwise (never claimed, long done, or claimed by a responder
    ///   that died mid-action): claimed now.
    pub async fn claim_action(
        &self,
        key: &DedupKey,
        window: Duration,
        lease: Duration,
        take_over: bool,
    ) -> Result<ClaimResult, ControlError> {
        let key = claim_key(key);
        let now = now_ms();
        let window_ms = window.as_millis().min(u128::from(u64::MAX)) as u64;
        let lease_ms = lease.as_millis().min(u128::from(u64::MAX)) as u64;
        let within =
            |t: u64, span: u64| t.saturating_add(span) > now && t <= now.saturating_add(span);
        self.update_times(&key, |record| {
            match record.as_slice() {
                [_, done] if *done > 0 && within(*done, window_ms) => {
                    return Step::Keep(ClaimResult::Duplicate)
                }
                [claimed, 0] if !take_over && within(*claimed, lease_ms) => {
                    return Step::Keep(ClaimResult::InProgress)
                }
                _ => {}
            }
            *record = vec![now, 0];
            Step::Write(ClaimResult::Claimed(Claim {
                key: key.clone(),
                at: now,
            }))
        })
        .await
    }

    /// Marks a claim's action done: duplicates are counted from now.
    pub async fn complete_claim(&self, claim: &Claim) {
        self.settle_claim(claim, true).await;
    }

    /// Gives a claim back: the action was not taken.
    pub async fn release_claim(&self, claim: &Claim) {
        self.settle_claim(claim, false).await;
    }

    async fn settle_claim(&self, claim: &Claim, done: bool) {
        let now = now_ms();
        let settled = self
            .update_times(&claim.key, |record| {
                // Only a claim still ours (not taken over since).
                if record.first() != Some(&claim.at) {
                    return Step::Keep(());
                }
                *record = if done {
                    vec![claim.at, now]
                } else {
                    Vec::new()
                };
                Step::Write(())
            })
            .await;
        if let Err(e) = settled {
            tracing::warn!(error = %chain(&e), key = %claim.key, done, "cannot settle a claim; it lapses with its lease");
        }
    }

    /// Reads the record of times under `key`, lets `decide` look at and
    /// change it, and writes it back with compare-and-set on the revision
    /// read when `decide` says so, reading again when another replica
    /// wrote first. A record that cannot be read, parsed or written is an
    /// error: the caller fails closed.
    async fn update_times<T>(
        &self,
        key: &str,
        mut decide: impl FnMut(&mut Vec<u64>) -> Step<T>,
    ) -> Result<T, ControlError> {
        let name = record_name(key);
        let kv = match &self.store {
            Store::Shared { kv, .. } => kv,
            Store::Local(records) => return Ok(update_local(records, key, decide)),
        };
        for attempt in 0..CAS_ATTEMPTS {
            let entry = timed(kv.entry(key), |source| ControlError::Read {
                key: name,
                source,
            })
            .await?;
            let (mut times, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    (self.seal.open(key, &e.value)?, Some(e.revision))
                }
                // Nothing a responder writes is a delete: with a seal, the
                // rate limit's record deleted is not believed either.
                Some(_) if self.seal.0.is_some() && name == ACTIONS_KEY => {
                    return Err(ControlError::Forged {
                        key: name,
                        source: Unsealed::Deleted,
                    })
                }
                Some(e) => (Vec::new(), Some(e.revision)),
                None => (Vec::new(), None),
            };
            let value = match decide(&mut times) {
                Step::Keep(result) => return Ok(result),
                Step::Write(result) => (result, times),
            };
            let (result, times) = value;
            let bytes = self.seal.close(key, &times).into();
            let written = match revision {
                Some(revision) => {
                    let update = kv.update(key, bytes, revision);
                    match tokio::time::timeout(OP_TIMEOUT, update).await {
                        Ok(Ok(_)) => Ok(true),
                        Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            Ok(false)
                        }
                        Ok(Err(e)) => Err(Cause::from(e)),
                        Err(_) => Err(NoAnswer(OP_TIMEOUT).into()),
                    }
                }
                None => {
                    let create = kv.create(key, bytes);
                    match tokio::time::timeout(OP_TIMEOUT, create).await {
                        Ok(Ok(_)) => Ok(true),
                        Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                        Ok(Err(e)) => Err(Cause::from(e)),
                        Err(_) => Err(NoAnswer(OP_TIMEOUT).into()),
                    }
                }
            };
            match written {
                Ok(true) => return Ok(result),
                // Another replica wrote first: read again.
                Ok(false) => {
                    let jitter = fastrand::u64(1..=5 + attempt as u64);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(source) => return Err(ControlError::Write { key: name, source }),
            }
        }
        Err(ControlError::Contended(CAS_ATTEMPTS))
    }
}

/// What [`Control::claim_action`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimResult {
    Claimed(Claim),
    /// The same action on the same pod was done within the window.
    Duplicate,
    /// Another responder is taking it now.
    InProgress,
}

/// An action claimed for every replica ([`Control::claim_action`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    key: String,
    at: u64,
}

/// The shared key of a claim: `seen.<namespace>.<pod>.<digest>`. Names
/// are checked Kubernetes names before any claim (a namespace has no dot;
/// a pod name's dots are key tokens); the digest covers the Falco rule,
/// the action and the UID, which may hold anything.
pub fn claim_key(key: &DedupKey) -> String {
    let mut hashed = Vec::with_capacity(key.rule.len() + 64);
    hashed.extend_from_slice(key.rule.as_bytes());
    hashed.push(0);
    hashed.extend_from_slice(key.action.as_str().as_bytes());
    hashed.push(0);
    hashed.extend_from_slice(key.uid.as_deref().unwrap_or_default().as_bytes());
    let digest = xxhash_rust::xxh3::xxh3_128(&hashed);
    format!("seen.{}.{}.{digest:032x}", key.namespace, key.pod)
}

/// The responders' seal on their shared records: HMAC-SHA256 (base64url,
/// as signatures are written) with the
/// secret of `--kv-key-file`, over a context, the record's key and its
/// times, so a record cannot be written by anyone without the secret nor
/// moved to another key. Without a secret, records are plain lists.
struct Seal(Option<ring::hmac::Key>);

/// A sealed record as stored.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sealed {
    t: Vec<u64>,
    mac: String,
}

impl Seal {
    /// What the seal covers: a context, the record's key, its times.
    fn sealed_bytes(record: &str, times: &[u64]) -> Vec<u8> {
        let mut input = b"falco-nats record v1\n".to_vec();
        input.extend_from_slice(record.as_bytes());
        input.push(b'\n');
        for t in times {
            input.extend_from_slice(&t.to_be_bytes());
        }
        input
    }

    fn mac(key: &ring::hmac::Key, record: &str, times: &[u64]) -> String {
        use base64::Engine;
        let tag = ring::hmac::sign(key, &Self::sealed_bytes(record, times));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    /// The stored form of `times` under `record`.
    fn close(&self, record: &str, times: &[u64]) -> Vec<u8> {
        let value = match &self.0 {
            None => serde_json::to_vec(times),
            Some(key) => serde_json::to_vec(&Sealed {
                t: times.to_vec(),
                mac: Self::mac(key, record, times),
            }),
        };
        value.expect("numbers and base64 always serialize")
    }

    /// The times in a stored record. With a seal: a record not sealed
    /// with it is refused for the rate limit (fail closed) and read as
    /// empty for claims and reservations (a forged one cannot hold an
    /// action back).
    fn open(&self, record: &str, value: &[u8]) -> Result<Vec<u64>, ControlError> {
        let name = record_name(record);
        let Some(key) = &self.0 else {
            return match serde_json::from_slice::<Vec<u64>>(value) {
                Ok(times) => Ok(times),
                // Sealed by a responder that has the secret: the times.
                Err(source) => serde_json::from_slice::<Sealed>(value)
                    .map(|s| s.t)
                    .map_err(|_| ControlError::Malformed { key: name, source }),
            };
        };
        let why = match serde_json::from_slice::<Sealed>(value) {
            Ok(sealed) => {
                // ring compares in constant time.
                use base64::Engine;
                let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(&sealed.mac)
                    .ok();
                let input = Self::sealed_bytes(record, &sealed.t);
                if tag.is_some_and(|tag| ring::hmac::verify(key, &input, &tag).is_ok()) {
                    return Ok(sealed.t);
                }
                Unsealed::Mismatch
            }
            Err(e) => Unsealed::NotSealed(e),
        };
        if name == ACTIONS_KEY {
            return Err(ControlError::Forged {
                key: name,
                source: why,
            });
        }
        tracing::warn!(key = record, reason = %chain(&why), "a shared record not sealed by a responder is ignored");
        Ok(Vec::new())
    }
}

/// [`Control::update_times`] in this process's memory (`--guards local`).
fn update_local<T>(
    records: &Mutex<std::collections::HashMap<String, Vec<u64>>>,
    key: &str,
    mut decide: impl FnMut(&mut Vec<u64>) -> Step<T>,
) -> T {
    let mut records = records
        .lock()
        .expect("no code panics while holding the local records");
    if records.len() >= 10_000 {
        // Nothing any window remembers is a day old.
        let day_ago = now_ms().saturating_sub(86_400_000);
        records.retain(|_, times| times.iter().any(|&t| t > day_ago));
    }
    let mut times = records.get(key).cloned().unwrap_or_default();
    match decide(&mut times) {
        Step::Keep(result) => result,
        Step::Write(result) => {
            records.insert(key.to_owned(), times);
            result
        }
    }
}

/// What [`Control::update_times`]'s caller decided about a record.
enum Step<T> {
    /// Leave the record as it was read; the answer.
    Keep(T),
    /// Write the changed record back; the answer once written.
    Write(T),
}

/// The name errors give a record: its kind (the key's first part).
fn record_name(key: &str) -> &'static str {
    match key.split('.').next() {
        Some("actions") => ACTIONS_KEY,
        Some("replicas") => "replicas",
        Some("seen") => "seen",
        _ => "record",
    }
}

/// Whether JetStream answers for this connection's account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JetStreamCheck {
    Available,
    /// The server has no JetStream, or not for this account: why.
    Missing(String),
    /// No answer now (a cluster electing a leader, say): why.
    Unavailable(String),
}

/// Asks `$JS.API.INFO` whether JetStream serves this connection's account.
pub async fn check_jetstream(client: &async_nats::Client) -> JetStreamCheck {
    let asked = tokio::time::timeout(
        OP_TIMEOUT,
        client.request("$JS.API.INFO", bytes::Bytes::new()),
    )
    .await;
    let answer = match asked {
        Err(_) => return JetStreamCheck::Unavailable(format!("no answer within {OP_TIMEOUT:?}")),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            return JetStreamCheck::Missing("the NATS server has no JetStream".into())
        }
        Ok(Err(e)) => return JetStreamCheck::Unavailable(e.to_string()),
        Ok(Ok(answer)) => answer,
    };
    let error = serde_json::from_slice::<serde_json::Value>(&answer.payload)
        .ok()
        .and_then(|v| v.get("error").cloned());
    match error {
        None => JetStreamCheck::Available,
        // JSNotEnabledForAccountErr, JSNotEnabledErr.
        Some(e) if matches!(e["err_code"].as_u64(), Some(10039 | 10076)) => {
            JetStreamCheck::Missing(format!(
                "JetStream is not enabled for this account: {}",
                e["description"].as_str().unwrap_or_default()
            ))
        }
        Some(e) => JetStreamCheck::Unavailable(e.to_string()),
    }
}

/// Who this connection is, as the NATS server says (`$SYS.REQ.USER.INFO`,
/// nats-server 2.10 and later): the user, and the account when it is not
/// the global one.
pub async fn identity(client: &async_nats::Client) -> Result<String, ControlError> {
    #[derive(Deserialize)]
    struct Answer {
        data: Option<UserInfo>,
        error: Option<serde_json::Value>,
    }
    #[derive(Deserialize)]
    struct UserInfo {
        #[serde(default)]
        user: String,
        #[serde(default)]
        account: String,
    }
    let fail = ControlError::Identity;
    let answer = tokio::time::timeout(
        OP_TIMEOUT,
        client.request("$SYS.REQ.USER.INFO", bytes::Bytes::new()),
    )
    .await
    .map_err(|_| fail(IdentityError::NoAnswer(OP_TIMEOUT)))?;
    let answer = match answer {
        Ok(answer) => answer,
        // nats-server before 2.10 has no such service: it cannot say.
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            return Ok("(not said: nats-server before 2.10)".to_owned())
        }
        Err(e) => return Err(fail(e.into())),
    };
    let answer: Answer =
        serde_json::from_slice(&answer.payload).map_err(|e| fail(IdentityError::Malformed(e)))?;
    if let Some(error) = answer.error {
        return Err(fail(IdentityError::Refused(error.to_string())));
    }
    let info = answer.data.ok_or(fail(IdentityError::NoData))?;
    let user = if info.user.is_empty() {
        "(no user: the server has no authentication)".to_owned()
    } else {
        info.user
    };
    Ok(match info.account.as_str() {
        "" | "$G" => user,
        account => format!("{user} (account {account})"),
    })
}

/// `falco-nats pause` / `resume`: writes the kill switch, signed by the
/// NATS user the server says this is. Returns what it wrote.
pub async fn set_pause(
    client: &async_nats::Client,
    options: &ControlOptions,
    paused: bool,
    reason: &str,
) -> Result<PauseRecord, ControlError> {
    let by = identity(client).await?;
    let record = PauseRecord::now(paused, &by, reason);
    let kv = open_pause_bucket(client, options).await?;
    let value = serde_json::to_vec(&record)
        .expect("a pause record always serializes")
        .into();
    timed(kv.put(PAUSE_KEY, value), |source| ControlError::Write {
        key: PAUSE_KEY,
        source,
    })
    .await?;
    Ok(record)
}

/// `falco-nats pause --status`: the kill switch as stored, read as a
/// responder reads it.
pub async fn pause_status(
    client: &async_nats::Client,
    options: &ControlOptions,
) -> Result<PauseState, ControlError> {
    let kv = open_pause_bucket(client, options).await?;
    Ok(read_pause_state(&kv, false).await?.0)
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
