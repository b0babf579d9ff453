//! `falco-nats ui`: a live page of alerts and the responders' decisions,
//! served by the binary itself.
//!
//! One feed per process takes alerts and decisions off NATS (from the
//! JetStream stream when there is one: the last `--history` messages of the
//! last `--history-age` first, then live; else core NATS, live only) into a
//! bounded ring, and hands each to every open page through a bounded
//! broadcast channel. A page gets the ring, then the live events, as
//! server-sent events; a page that falls a channel's worth behind is cut
//! off (its browser reconnects and starts again from the ring) rather than
//! buffered without end.
//!
//! Safe by construction: every string in an alert is the watched
//! container's; the page puts them into the DOM as text only, and a
//! Content-Security-Policy forbids any script but the page's own file.
//! Read-only: no request changes anything. `--token` guards the page, its
//! assets and its events (not the probes).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{self, Stream, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::nats::subject::{covers, is_below};
use crate::nats::{connect, ConnectionWatch, NatsError, NatsOptions};
use crate::server::Listen;
use crate::telemetry::health::{self, Readiness, ReadyFlag};
use crate::telemetry::metrics::UiMetrics;

/// The default `--listen`: loopback only (the page shows security alerts;
/// listen wider with a `--token`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:2812";

/// The cookie the page's token is kept in once given in its URL.
const COOKIE: &str = "falco_nats_ui_token";
/// Connections one address may hold on the ui (pages behind one proxy).
const UI_MAX_PER_PEER: usize = 256;
/// The shortest `--http-token` taken: guessing it must be hopeless.
pub const MIN_TOKEN: usize = 32;
/// The longest wait before a refusal: each refusal in the last minute adds
/// [`FAILURE_STEP`], up to this.
const MAX_FAILURE_DELAY: Duration = Duration::from_secs(2);
const FAILURE_STEP: Duration = Duration::from_millis(50);

/// What the page may load: its own script and style, nothing inline,
/// nothing from elsewhere, no frames, no forms.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// `ui` settings.
#[derive(Debug, Clone)]
pub struct UiOptions {
    pub nats: NatsOptions,
    /// Alerts (and decisions) to show.
    pub subject: String,
    /// Decisions are on `<prefix>.<action>`.
    pub result_prefix: String,
    /// The stream to read history from; none or missing: live only.
    pub stream: Option<String>,
    /// Messages kept (and loaded from the stream) at most.
    pub history: usize,
    /// Messages older than this are not loaded from the stream.
    pub history_age: Duration,
    /// Required for the page and its events when set.
    pub token: Option<String>,
    /// Events a page may fall behind by before it is cut off.
    pub client_buffer: usize,
}

/// Why the ui stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("the --http-token must be printable ASCII without spaces, quotes, ',', ';' or '\\' (it is kept in a cookie)")]
    Token,
    #[error("the --http-token is {0} characters; at least {MIN_TOKEN} are needed (make one with `openssl rand -hex 24`)")]
    ShortToken(usize),
    #[error("cannot subscribe to {subject:?}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
}

/// One message for the page: an alert or a decision, its JSON as received.
#[derive(Debug)]
pub struct UiEvent {
    pub seq: u64,
    pub decision: bool,
    /// The SSE data line: `{"seq":…,"subject":…,"msg":…}`.
    pub data: String,
}

/// The ring of recent events and the open pages' queues, under one lock:
/// a page joining gets the ring and every event after it, no gap, no
/// repeat. Each page has a bounded queue; a page whose queue is full is
/// dropped (its stream ends, its browser reconnects and resumes from the
/// ring), so a stalled page costs at most its queue.
struct Hub {
    /// This hub's name, new at every start: a page that reconnects to
    /// another (the ui restarted, its numbers begin again) starts afresh.
    instance: String,
    inner: Mutex<HubInner>,
    capacity: usize,
    client_buffer: usize,
    dropped: Counter,
}

struct HubInner {
    ring: VecDeque<Arc<UiEvent>>,
    next: u64,
    pages: Vec<mpsc::Sender<Arc<UiEvent>>>,
}

impl Hub {
    fn new(capacity: usize, client_buffer: usize, dropped: Counter) -> Self {
        Hub {
            instance: format!("{:016x}", fastrand::u64(..)),
            inner: Mutex::new(HubInner {
                ring: VecDeque::with_capacity(capacity.min(65_536)),
                next: 1,
                pages: Vec::new(),
            }),
            capacity: capacity.max(1),
            client_buffer: client_buffer.max(1),
            dropped,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
        self.inner
            .lock()
            .expect("no code panics while holding the ui's ring")
    }

    /// Adds a message: into the ring (the oldest out when full) and to every page.
    fn push(&self, subject: &str, payload: &[u8], decision: bool) {
        let mut inner = self.lock();
        let seq = inner.next;
        inner.next += 1;
        let event = Arc::new(UiEvent {
            seq,
            decision,
            data: event_data(seq, subject, payload),
        });
        if inner.ring.len() >= self.capacity {
            inner.ring.pop_front();
        }
        inner.ring.push_back(Arc::clone(&event));
        let dropped = &self.dropped;
        inner
            .pages
            .retain(|page| match page.try_send(Arc::clone(&event)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    dropped.inc();
                    tracing::warn!("a page fell behind; dropped (its browser reconnects)");
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    /// The last event a page saw, from its `Last-Event-ID`: only an id this
    /// instance gave counts (after a restart the numbers begin again).
    fn last_seen(&self, id: &str) -> Option<u64> {
        let (instance, seq) = id.split_once('.')?;
        (instance == self.instance).then(|| seq.parse().ok())?
    }

    /// The ring after `after` (a page's `Last-Event-ID`; whether it could
    /// resume), and the page's queue of live events from then on. An id
    /// this hub never gave (another instance's, or made up) resumes nothing.
    fn join(&self, after: Option<u64>) -> (Vec<Arc<UiEvent>>, bool, mpsc::Receiver<Arc<UiEvent>>) {
        let mut inner = self.lock();
        let resumed = match (after, inner.ring.front()) {
            (Some(id), _) if id >= inner.next => false,
            (Some(id), Some(first)) => id.saturating_add(1) >= first.seq,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let from = if resumed { after.unwrap_or(0) } else { 0 };
        let snapshot = inner
            .ring
            .iter()
            .filter(|e| e.seq > from)
            .cloned()
            .collect();
        let (tx, rx) = mpsc::channel(self.client_buffer);
        inner.pages.push(tx);
        (snapshot, resumed, rx)
    }
}

/// The largest message the page is sent whole (a Falco alert is 1 to 2
/// KiB); a larger one shows as a note of its size. With the ring and each
/// page's queue bounded in messages, this bounds them in bytes.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// The JSON the page receives for one message. The payload goes in as
/// JSON when it is (an alert, a decision), else as a string: the page
/// shows what came, whatever it is.
pub fn event_data(seq: u64, subject: &str, payload: &[u8]) -> String {
    if payload.len() > MAX_EVENT_BYTES {
        let note = format!(
            "(a message of {} bytes, larger than the ui shows: {MAX_EVENT_BYTES})",
            payload.len()
        );
        return serde_json::json!({ "seq": seq, "subject": subject, "msg": note }).to_string();
    }
    let msg: Box<serde_json::value::RawValue> = std::str::from_utf8(payload)
        .ok()
        .and_then(|text| serde_json::value::RawValue::from_string(text.trim().to_owned()).ok())
        .filter(|raw| raw.get().starts_with('{'))
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(payload);
            serde_json::value::to_raw_value(&text).expect("a string always serializes")
        });
    serde_json::json!({ "seq": seq, "subject": subject, "msg": msg }).to_string()
}

#[derive(Clone)]
struct UiState {
    hub: Arc<Hub>,
    metrics: UiMetrics,
    token: Option<Arc<str>>,
    failures: Arc<Failures>,
    stream: Option<String>,
    shutdown: CancellationToken,
}

/// Runs the ui until `shutdown`, serving the page, its events and the
/// probes on `listener`.
pub async fn run(
    options: UiOptions,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), UiError> {
    if let Some(token) = &options.token {
        if !token_fits_a_cookie(token) {
            return Err(UiError::Token);
        }
        if token.len() < MIN_TOKEN {
            return Err(UiError::ShortToken(token.len()));
        }
    }
    let mut registry = Registry::default();
    let readiness = Readiness::default();
    let watch = ConnectionWatch::register(&readiness, &mut registry);
    let fed = readiness.check("feed");
    let metrics = UiMetrics::register(&mut registry);
    let client = connect(&options.nats, watch).await?.client;
    let hub = Arc::new(Hub::new(
        options.history,
        options.client_buffer,
        metrics.dropped.clone(),
    ));
    if options.token.is_none() {
        tracing::warn!("no --token: anyone who reaches --listen sees every alert");
    }
    let feed = Feed {
        client: client.clone(),
        hub: Arc::clone(&hub),
        metrics: metrics.clone(),
        options: options.clone(),
        fed,
    };
    let stream = feed.start().await?;
    let state = UiState {
        hub,
        metrics,
        token: options.token.map(Arc::from),
        failures: Arc::default(),
        stream,
        shutdown: shutdown.clone(),
    };
    let http_metrics = crate::telemetry::metrics::HttpServerMetrics::new(&mut registry);
    let router = router(state).merge(health::router(readiness, Arc::new(registry)));
    // Every page's event stream may come from one proxy's address.
    let server = Listen::start(
        listener,
        crate::server::Endpoints::from(router),
        None,
        crate::server::ServerLimits::probes_with_share(http_metrics, UI_MAX_PER_PEER),
        Duration::from_secs(1),
    );
    shutdown.cancelled().await;
    server.stop().await;
    Ok(())
}

/// The page's routes, behind the token when there is one.
fn router(state: UiState) -> Router {
    Router::new()
        .route("/", get(index))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route("/events", get(events))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Headers every page response carries.
fn hardened(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// Whether a token can be a cookie's value as it is (RFC 6265's cookie-octet).
pub fn token_fits_a_cookie(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b',' | b';' | b'\\'))
}

/// The one token a request carries: `Authorization: Bearer`, else
/// `?token=` (the page's first load; an EventSource cannot set headers,
/// and the URL's wins over an older cookie), else the cookie. `Err` when a
/// request carries more than one where only one is taken (two query
/// values, two cookies, a header beside anything else): each request may
/// try one token, no more.
fn presented_token<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Result<Option<&'a str>, ()> {
    let mut bearer = Vec::new();
    for value in headers.get_all(header::AUTHORIZATION) {
        if let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) {
            bearer.push(token.trim());
        }
    }
    let mut cookies = Vec::new();
    for line in headers.get_all(header::COOKIE) {
        let Ok(line) = line.to_str() else {
            continue;
        };
        for pair in line.split(';') {
            if let Some(value) = pair
                .trim()
                .strip_prefix(COOKIE)
                .and_then(|r| r.strip_prefix('='))
            {
                cookies.push(value);
            }
        }
    }
    let in_query: Vec<&str> = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.strip_prefix("token="))
        .collect();
    let one = |found: &[&'a str]| match found {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(()),
    };
    if !bearer.is_empty() {
        if !cookies.is_empty() || !in_query.is_empty() {
            return Err(());
        }
        return one(&bearer);
    }
    match one(&in_query)? {
        Some(token) => Ok(Some(token)),
        None => one(&cookies),
    }
}

/// Refusals of the last minute, for their delay, and how many are being
/// held back now.
#[derive(Default)]
struct Failures {
    recent: std::sync::Mutex<std::collections::VecDeque<std::time::Instant>>,
    waiting: std::sync::atomic::AtomicUsize,
}

/// Refusals held back at once at most: beyond that they are answered at
/// once, so a flood of bad tokens cannot hold every connection a proxy in
/// front has (and keep real users out).
const MAX_WAITING_FAILURES: usize = 8;

impl Failures {
    /// Counts one more, and waits before its answer (unless enough are
    /// waiting already).
    async fn hold(&self) {
        use std::sync::atomic::Ordering;
        let delay = self.delay();
        if self.waiting.fetch_add(1, Ordering::Relaxed) < MAX_WAITING_FAILURES {
            tokio::time::sleep(delay).await;
        }
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts one more; how long to wait before answering it.
    fn delay(&self) -> Duration {
        let mut recent = self
            .recent
            .lock()
            .expect("no code panics while holding the failures");
        while recent
            .front()
            .is_some_and(|t| t.elapsed() > Duration::from_secs(60))
        {
            recent.pop_front();
        }
        if recent.len() < 10_000 {
            recent.push_back(std::time::Instant::now());
        }
        (FAILURE_STEP * recent.len() as u32).min(MAX_FAILURE_DELAY)
    }
}

/// Refuses a request without the token (when there is one); hardens every answer.
async fn guard(State(state): State<UiState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.token else {
        return hardened(next.run(request).await);
    };
    let query = request.uri().query().map(str::to_owned);
    let https = request
        .headers()
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let presented = presented_token(request.headers(), query.as_deref());
    // A token from the URL may be percent-encoded.
    let ok = matches!(presented, Ok(Some(p)) if crate::signing::same_secret(p.as_bytes(), token.as_bytes())
        || percent_decode(p).is_some_and(|d| crate::signing::same_secret(d.as_bytes(), token.as_bytes())));
    if !ok {
        state.metrics.auth_failures.inc();
        state.failures.hold().await;
        let message = match presented {
            Err(()) => "one token per request, please: open the page as /?token=…\n",
            Ok(_) => "a token is needed: open the page as /?token=…\n",
        };
        let mut refused = (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"falco-nats ui\"")],
            message,
        )
            .into_response();
        refused
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return hardened(refused);
    }
    let from_query = query.is_some_and(|q| q.split('&').any(|p| p.starts_with("token=")));
    let mut response = next.run(request).await;
    if from_query {
        // Kept for the page's own requests (assets, events), never sent elsewhere.
        // Secure when the page is served over TLS (by a proxy in front).
        let secure = if https { "; Secure" } else { "" };
        let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}");
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    hardened(response)
}

/// `%XX` decoded, or `None` when malformed or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The event stream of one page: `hello`, the ring (or what it missed,
/// with `Last-Event-ID`), then live events, until it falls behind or the
/// ui stops.
async fn events(
    State(state): State<UiState>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| state.hub.last_seen(v));
    let (snapshot, resumed, live) = state.hub.join(after);
    // A page too far behind to resume keeps what it holds and is told how
    // many it missed between that and the ring.
    let missed = match (after, resumed, snapshot.first()) {
        (Some(after), false, Some(first)) if after < first.seq => first.seq - after - 1,
        _ => 0,
    };
    state.metrics.clients.inc();
    let hello = Event::default()
        .event("hello")
        .retry(Duration::from_secs(2))
        .data(
            serde_json::json!({
                "instance": state.hub.instance,
                "resumed": resumed,
                "missed": missed,
                "history": snapshot.len(),
                "stream": state.stream,
            })
            .to_string(),
        );
    let first = stream::once(async move { Ok(hello) });
    let instance: Arc<str> = Arc::from(state.hub.instance.as_str());
    let replay = {
        let instance = Arc::clone(&instance);
        stream::iter(snapshot).map(move |e| Ok(sse(&instance, &e)))
    };
    let gone = ClientGone(state.metrics.clients.clone());
    let shutdown = state.shutdown.clone();
    let live = stream::unfold((live, false, gone), move |(mut rx, done, gone)| {
        let shutdown = shutdown.clone();
        let instance = Arc::clone(&instance);
        async move {
            if done {
                return None;
            }
            tokio::select! {
                received = rx.recv() => match received {
                    Some(e) => Some((Ok(sse(&instance, &e)), (rx, false, gone))),
                    // Dropped for falling behind: say so, and end.
                    None => {
                        let note = Event::default().event("dropped").data("behind");
                        Some((Ok(note), (rx, true, gone)))
                    }
                },
                _ = shutdown.cancelled() => None,
            }
        }
    });
    Sse::new(first.chain(replay).chain(live)).keep_alive(KeepAlive::default())
}

/// Counts a page's stream out when it ends, however it ends.
struct ClientGone(Gauge);

impl Drop for ClientGone {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An event as the page gets it; its id (`<instance>.<seq>`, the page's
/// `Last-Event-ID` when it reconnects) says which ui numbered it.
fn sse(instance: &str, e: &UiEvent) -> Event {
    Event::default()
        .event(if e.decision { "decision" } else { "alert" })
        .id(format!("{instance}.{}", e.seq))
        .data(&e.data)
}

/// Takes alerts and decisions off NATS into the hub.
#[derive(Clone)]
struct Feed {
    client: async_nats::Client,
    hub: Arc<Hub>,
    metrics: UiMetrics,
    options: UiOptions,
    fed: ReadyFlag,
}

impl Feed {
    /// Starts the feed: from the stream when it exists (history first),
    /// else core NATS. Returns the stream's name when it is used.
    async fn start(self) -> Result<Option<String>, UiError> {
        let stream = match &self.options.stream {
            Some(name) if !name.is_empty() => self.find_stream(name).await,
            _ => None,
        };
        let Some(stream) = stream else {
            let sub = self.subscribe(self.options.subject.clone()).await?;
            tracing::info!(subject = %self.options.subject, "live alerts from core NATS (no stream: no history)");
            self.fed.set(true);
            tokio::spawn(self.core(sub));
            return Ok(None);
        };
        let name = stream.cached_info().config.name.clone();
        // Decisions the stream does not hold come from core NATS beside it.
        let results = format!("{}.>", self.options.result_prefix);
        let covered = stream
            .cached_info()
            .config
            .subjects
            .iter()
            .any(|s| covers(s, &format!("{}.x", self.options.result_prefix)));
        if !covered {
            // A stream of their own keeps their history (docs/ui.md).
            let js = jetstream::new(self.client.clone());
            let own = match tokio::time::timeout(
                Duration::from_secs(5),
                js.stream_by_subject(results.clone()),
            )
            .await
            {
                Ok(Ok(found)) if found != name => self.find_stream(&found).await,
                _ => None,
            };
            // The decisions' feed does not decide readiness.
            let feed = Feed {
                fed: ReadyFlag::default(),
                ..self.clone()
            };
            match own {
                Some(decisions) => {
                    tracing::info!(stream = %decisions.cached_info().config.name, "decisions' history from their stream");
                    tokio::spawn(feed.jetstream(decisions));
                }
                None => {
                    tracing::info!(subject = %results, "decisions live from core NATS (no stream holds them)");
                    let sub = self.subscribe(results).await?;
                    tokio::spawn(feed.core(sub));
                }
            }
        }
        tokio::spawn(self.jetstream(stream));
        Ok(Some(name))
    }

    async fn find_stream(&self, name: &str) -> Option<jetstream::stream::Stream> {
        let js = jetstream::new(self.client.clone());
        match tokio::time::timeout(Duration::from_secs(5), js.get_stream(name)).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::info!(stream = name, error = %e, "no stream to read history from; live alerts only");
                None
            }
            Err(_) => {
                tracing::warn!(stream = name, "JetStream did not answer; live alerts only");
                None
            }
        }
    }

    async fn subscribe(&self, subject: String) -> Result<async_nats::Subscriber, UiError> {
        self.client
            .subscribe(subject.clone())
            .await
            .map_err(|source| UiError::Subscribe { subject, source })
    }

    fn take(&self, subject: &str, payload: &[u8]) {
        // Decisions only from below the prefix: `falco.response` itself is
        // no result subject (and the bridge may not publish there).
        let decision = is_below(subject, &self.options.result_prefix);
        self.metrics
            .events
            .get_or_create(&[("kind", if decision { "decision" } else { "alert" })])
            .inc();
        self.hub.push(subject, payload, decision);
    }

    async fn core(self, mut sub: async_nats::Subscriber) {
        while let Some(message) = sub.next().await {
            self.take(message.subject.as_str(), &message.payload);
        }
    }

    /// History, then live, from one ordered consumer: in the stream's
    /// order, nothing twice. Recreated from where it stopped if it fails.
    async fn jetstream(self, stream: jetstream::stream::Stream) {
        let info = stream.cached_info().state.clone();
        let history = self.options.history as u64;
        let start = info
            .first_sequence
            .max(info.last_sequence.saturating_sub(history.saturating_sub(1)))
            .max(1);
        let oldest = std::time::SystemTime::now()
            .checked_sub(self.options.history_age)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        let mut next = start;
        loop {
            let config = consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                ..Default::default()
            };
            let messages = match stream.create_consumer(config).await {
                Ok(c) => c.messages().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the stream; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            self.fed.set(true);
            while let Some(message) = messages.next().await {
                let message = match message {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "the stream's consumer failed; resuming");
                        break;
                    }
                };
                let Ok(meta) = message.info() else { continue };
                next = meta.stream_sequence + 1;
                let replaying = meta.stream_sequence <= info.last_sequence;
                if replaying {
                    if meta.published.unix_timestamp() < oldest {
                        continue;
                    }
                    self.metrics.history.inc();
                }
                self.take(message.subject.as_str(), &message.payload);
            }
            self.fed.set(false);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_json_as_json_and_anything_else_as_a_string() {
        let alert = event_data(7, "falco.critical.x", br#"{"rule":"<img src=x>"}"#);
        let v: serde_json::Value = serde_json::from_str(&alert).unwrap();
        assert_eq!(v["msg"]["rule"], "<img src=x>");
        assert_eq!(v["seq"], 7);
        for odd in [&b"not json"[..], b"[1,2]", b"\xff\xfe", b"{broken", b""] {
            let v: serde_json::Value = serde_json::from_str(&event_data(1, "s", odd)).unwrap();
            assert!(v["msg"].is_string(), "{odd:?}: {v}");
        }
        let huge = format!("{{\"output\":\"{}\"}}", "x".repeat(MAX_EVENT_BYTES));
        let data = event_data(2, "falco.x", huge.as_bytes());
        assert!(data.len() < 300, "{data}");
        assert!(data.contains("larger than the ui shows"));
    }

    #[test]
    fn the_ring_is_bounded_and_a_page_resumes_where_it_was() {
        let hub = Hub::new(3, 16, Counter::default());
        for i in 0..5 {
            hub.push("falco.x", format!("{{\"n\":{i}}}").as_bytes(), false);
        }
        let (all, resumed, _) = hub.join(None);
        assert!(!resumed);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
        let (missed, resumed, _) = hub.join(Some(4));
        assert!(resumed);
        assert_eq!(missed.iter().map(|e| e.seq).collect::<Vec<_>>(), [5]);
        let (again, resumed, _) = hub.join(Some(1));
        assert!(!resumed, "too old to resume: everything again");
        assert_eq!(again.len(), 3);
        let (none, resumed, _) = hub.join(Some(5));
        assert!(resumed && none.is_empty(), "up to date");
        // Last-Event-ID is the browser's (or anyone's) to write: one this
        // hub never gave (a restarted ui's page, say) gets the whole ring.
        let (all, resumed, _) = hub.join(Some(6));
        assert!(!resumed);
        assert_eq!(all.len(), 3);
        let (all, resumed, _) = hub.join(Some(u64::MAX));
        assert!(!resumed);
        assert_eq!(all.len(), 3);
        // Only this instance's ids are believed.
        let own = format!("{}.4", hub.instance);
        assert_eq!(hub.last_seen(&own), Some(4));
        assert_eq!(hub.last_seen("0123456789abcdef.4"), None, "another ui's");
        assert_eq!(hub.last_seen("4"), None);
        assert_eq!(hub.last_seen(&format!("{}.x", hub.instance)), None);
    }

    #[test]
    fn a_page_that_falls_behind_is_dropped_not_buffered() {
        let dropped = Counter::default();
        let hub = Hub::new(100, 4, dropped.clone());
        let (_, _, mut slow) = hub.join(None);
        let (_, _, mut fast) = hub.join(None);
        for i in 0..10 {
            hub.push("falco.x", b"{}", false);
            assert_eq!(fast.try_recv().unwrap().seq, i + 1);
        }
        assert_eq!(dropped.get(), 1);
        for seq in 1..=4 {
            assert_eq!(slow.try_recv().unwrap().seq, seq, "what it had queued");
        }
        assert!(matches!(
            slow.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn tokens_are_found_where_browsers_put_them() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; falco_nats_ui_token=s3cret"),
        );
        assert_eq!(presented_token(&h, None), Ok(Some("s3cret")));
        // The URL's wins over an older cookie.
        assert_eq!(presented_token(&h, Some("x=1&token=q")), Ok(Some("q")));
        // One token per request: never several to try at once.
        assert_eq!(presented_token(&h, Some("token=a&token=b")), Err(()));
        let mut two = HeaderMap::new();
        two.append(
            header::COOKIE,
            HeaderValue::from_static("falco_nats_ui_token=a"),
        );
        two.append(
            header::COOKIE,
            HeaderValue::from_static("falco_nats_ui_token=b"),
        );
        assert_eq!(presented_token(&two, None), Err(()));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        assert_eq!(
            presented_token(&h, None),
            Err(()),
            "a header beside a cookie"
        );
        let mut bearer = HeaderMap::new();
        bearer.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        assert_eq!(presented_token(&bearer, None), Ok(Some("t")));
        assert_eq!(presented_token(&HeaderMap::new(), None), Ok(None));
        use crate::signing::same_secret;
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert_eq!(percent_decode("a%2Fb+c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%"), None);
        assert!(token_fits_a_cookie("s3cret-Token_1.~"));
        for bad in ["", "a b", "a;b", "a,b", "a\"b", "a\\b", "é", "a\nb"] {
            assert!(!token_fits_a_cookie(bad), "{bad:?}");
        }
    }
}
