//! [`GrpcInput`]: Falco's gRPC outputs service over a Unix socket (Falco <= 0.43).
//!
//! `sub` is polled: Falco sends what is queued after each request it reads,
//! then waits for the next one. The input sends a request when the stream
//! opens, then on a timer that runs fast while alerts flow (every 250 µs
//! right after one, on a thread of its own) and slows to `poll_interval` when
//! Falco is quiet. When the stream
//! ends (a rules or config reload restarts Falco's gRPC server) or the socket
//! is missing, it reconnects with capped exponential backoff, forever.
//!
//! On shutdown it closes its side of the stream and reads on until Falco
//! ends the call, so an alert Falco already took off its queue is not lost
//! (Falco's queue is global: an alert it sent to a client that went away is
//! gone). `--drain-timeout` bounds the wait.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::client::Grpc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

use super::{AlertSink, InputError};
use crate::backoff::Backoff;
use crate::convert::event_from_wire;
use crate::proto::outputs::Request;
use crate::proto::version::service_client::ServiceClient as VersionClient;

/// Falco's default gRPC socket.
pub const DEFAULT_SOCKET: &str = "unix:///run/falco/falco.sock";

/// Poll interval right after an alert (within [`HOT_FOR`] of the last one).
/// Finer than tokio's 1 ms timer: the poller runs on its own thread.
const HOT_POLL: Duration = Duration::from_micros(250);
/// How long after the last alert the input polls at [`HOT_POLL`].
const HOT_FOR: Duration = Duration::from_millis(20);
/// Poll interval while alerts flow less often.
const ACTIVE_POLL: Duration = Duration::from_millis(1);
/// The poller's shortest and longest sleep (it checks for a stop after each).
const NAP_MIN: Duration = Duration::from_micros(100);
const NAP_MAX: Duration = Duration::from_millis(10);
/// While alerts keep coming (Falco is draining its queue), the nap doubles
/// from [`NAP_MIN`] this many times (to 800 µs): a long drain wakes the
/// poller about a thousand times a second instead of ten thousand.
const BUSY_DOUBLINGS: u32 = 3;
/// No poll unless the input has waited this long for Falco to send
/// anything: before that, Falco may still be draining its queue.
const QUIET: Duration = Duration::from_micros(200);
/// How long after the last alert the input keeps polling fast.
const ACTIVE_FOR: Duration = Duration::from_secs(1);

/// The largest message the input takes from Falco.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Which RPC reads the alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GrpcMethod {
    /// The polled bidirectional stream (Falco's recommended way).
    #[default]
    Sub,
    /// Repeated calls that each drain Falco's queue.
    Get,
}

/// gRPC input settings.
#[derive(Debug, Clone)]
pub struct GrpcOptions {
    /// Path of Falco's Unix socket.
    pub socket: PathBuf,
    pub method: GrpcMethod,
    /// Poll interval while Falco is quiet.
    pub poll_interval: Duration,
    /// Longest wait between reconnect attempts.
    pub reconnect_max: Duration,
}

/// Parses `unix:///path`, `unix:/path` or a plain path into the socket path.
pub fn socket_path(address: &str) -> Result<PathBuf, InputError> {
    let path = if let Some(rest) = address.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = address.strip_prefix("unix:") {
        rest
    } else if address.contains("://") {
        return Err(InputError::NotUnixSocket(address.to_owned()));
    } else {
        address
    };
    if path.is_empty() {
        return Err(InputError::NotUnixSocket(address.to_owned()));
    }
    Ok(PathBuf::from(path))
}

/// How one connection to Falco ended.
enum SessionEnd {
    /// We are shutting down.
    Shutdown,
    /// Falco ended the stream (a reload) or the queue closed.
    StreamEnded { delivered: u64 },
}

/// Why one connection to Falco failed.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect to Falco's socket: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("Falco's gRPC call failed: {0}")]
    Call(#[from] Status),
    #[error("cannot start the poll thread: {0}")]
    PollThread(std::io::Error),
}

/// Reads alerts from Falco's gRPC outputs service until shut down.
pub struct GrpcInput {
    options: GrpcOptions,
    sink: AlertSink,
}

impl GrpcInput {
    pub fn new(options: GrpcOptions, sink: AlertSink) -> Self {
        GrpcInput { options, sink }
    }

    /// Runs until `shutdown`; never gives up on Falco by itself.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), InputError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.options.reconnect_max);
        let socket = self.options.socket.display().to_string();
        tracing::info!(%socket, method = ?self.options.method, "reading Falco alerts over gRPC");
        let mut attempts = 0u64;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let outcome = self.session(&shutdown).await;
            self.sink.set_connected(false);
            match outcome {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::StreamEnded { delivered }) => {
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    tracing::warn!(%socket, delivered, "Falco ended the gRPC stream (a rules or config reload?); reconnecting");
                    backoff.reset();
                }
                Err(e) => {
                    attempts += 1;
                    // Log the first failures loudly, then once in a while.
                    if attempts <= 3 || attempts.is_multiple_of(20) {
                        tracing::warn!(%socket, error = %e, attempts, "Falco gRPC unavailable; retrying");
                    } else {
                        tracing::debug!(%socket, error = %e, attempts, "Falco gRPC unavailable; retrying");
                    }
                }
            }
            self.sink.reconnected();
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        let path = self.options.socket.clone();
        // The URI is required by tonic but unused: the connector dials the socket.
        Endpoint::from_static("http://falco.sock")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<SessionEnd, SessionError> {
        let channel = self.connect().await?;
        log_version(channel.clone()).await;
        // Connected. Falco may send no response headers before its first
        // alert, so the call below can wait that long: no timeout on it.
        self.sink.set_connected(true);
        let client = Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE);
        match self.options.method {
            GrpcMethod::Sub => self.sub(client, shutdown).await,
            GrpcMethod::Get => self.get(client, shutdown).await,
        }
    }

    /// Handles one alert (a `response` message as Falco sent it); `false`
    /// when the bridge is stopping.
    async fn deliver(&self, response: Bytes) -> bool {
        self.sink.offer(event_from_wire(response)).await.is_ok()
    }

    async fn sub(
        &self,
        mut client: Grpc<Channel>,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, SessionError> {
        let (requests, rx) = mpsc::channel::<Request>(4);
        let poller = Poller::new(self.options.poll_interval);
        // Polling starts before the call is answered: Falco may hold back
        // the response headers until it has an alert to send.
        let polling = poller.clone();
        std::thread::Builder::new()
            .name("falco-grpc-poll".into())
            .spawn(move || polling.run(requests))
            .map_err(SessionError::PollThread)?;
        let _stop_polling = poller.state.stop.clone().drop_guard();
        poller.waiting();
        ready(&mut client).await?;
        tracing::info!("subscribing to Falco's alerts");
        let call = client.streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static("/falco.outputs.service/sub"),
            AlertCodec,
        );
        let mut stream = tokio::select! {
            answered = call => answered?.into_inner(),
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };

        let mut delivered = 0u64;
        let mut closing = false;
        loop {
            poller.waiting();
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(response)) => {
                        delivered += 1;
                        poller.alert_arrived();
                        if !self.deliver(response).await {
                            return Ok(SessionEnd::Shutdown);
                        }
                    }
                    Ok(None) if closing => return Ok(SessionEnd::Shutdown),
                    Ok(None) => return Ok(SessionEnd::StreamEnded { delivered }),
                    Err(status) if closing => {
                        tracing::debug!(error = %status, "stream ended with an error after we closed it");
                        return Ok(SessionEnd::Shutdown);
                    }
                    Err(status) => return Err(status.into()),
                },
                _ = shutdown.cancelled(), if !closing => {
                    // Close our side: Falco sends what it already took off its
                    // queue, then ends the call (the bridge's drain timeout
                    // bounds the wait).
                    tracing::info!("closing the gRPC stream; reading what Falco still sends");
                    poller.stop();
                    closing = true;
                }
            }
        }
    }

    async fn get(
        &self,
        mut client: Grpc<Channel>,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, SessionError> {
        loop {
            ready(&mut client).await?;
            let mut stream = client
                .server_streaming(
                    tonic::Request::new(Request {}),
                    PathAndQuery::from_static("/falco.outputs.service/get"),
                    AlertCodec,
                )
                .await?
                .into_inner();
            let mut batch = 0u64;
            while let Some(response) = stream.message().await? {
                batch += 1;
                if !self.deliver(response).await {
                    return Ok(SessionEnd::Shutdown);
                }
            }
            if shutdown.is_cancelled() {
                return Ok(SessionEnd::Shutdown);
            }
            if batch == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(self.options.poll_interval) => {}
                    _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
                }
            }
        }
    }
}

/// Waits until the channel can take a call (tonic asks this before each).
async fn ready(client: &mut Grpc<Channel>) -> Result<(), Status> {
    client
        .ready()
        .await
        .map_err(|e| Status::unavailable(format!("Falco's gRPC service is not ready: {e}")))
}

/// The outputs service's codec on the client side: requests encoded by
/// prost, each `response` handed on as its bytes, for
/// [`event_from_wire`] to read without building the message.
#[derive(Debug, Clone, Copy, Default)]
struct AlertCodec;

impl Codec for AlertCodec {
    type Encode = Request;
    type Decode = Bytes;
    type Encoder = AlertCodec;
    type Decoder = AlertCodec;

    fn encoder(&mut self) -> Self::Encoder {
        AlertCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        AlertCodec
    }
}

impl Encoder for AlertCodec {
    type Item = Request;
    type Error = Status;

    fn encode(&mut self, request: Request, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        prost::Message::encode(&request, dst)
            .map_err(|e| Status::internal(format!("cannot encode a request: {e}")))
    }
}

impl Decoder for AlertCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        // The message's bytes, split off tonic's buffer (not copied).
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Sends `sub`'s poll requests: one at once, then one every [`HOT_POLL`] for
/// [`HOT_FOR`] after an alert, every [`ACTIVE_POLL`] until [`ACTIVE_FOR`],
/// and every `idle` while Falco is quiet (Falco drains its whole queue on
/// each request). It runs on a thread of its own because tokio's timer
/// cannot wait less than a millisecond. It sends only once the input has
/// waited [`QUIET`] for Falco to send anything. While Falco drains its queue
/// it reads no request, and requests it does not read pile up in the HTTP/2
/// stream (a server may close a connection flooded with them); the input's
/// own pauses (a full queue, a thread the kernel did not run) are no sign of
/// a finished drain, so the time since the last alert is not enough.
#[derive(Clone)]
struct Poller {
    idle: Duration,
    state: Arc<PollerState>,
}

struct PollerState {
    stop: CancellationToken,
    started: Instant,
    /// Microseconds after `started` of the last alert (0: none yet).
    last_alert: AtomicU64,
    /// Microseconds after `started` at which the input began waiting for
    /// Falco to send (0: it is busy with an alert).
    waiting_since: AtomicU64,
}

impl Poller {
    fn new(idle: Duration) -> Self {
        Poller {
            idle,
            state: Arc::new(PollerState {
                stop: CancellationToken::new(),
                started: Instant::now(),
                last_alert: AtomicU64::new(0),
                waiting_since: AtomicU64::new(0),
            }),
        }
    }

    /// An alert arrived: the input is busy with it, no longer waiting.
    fn alert_arrived(&self) {
        let micros = self.state.started.elapsed().as_micros() as u64;
        self.state
            .last_alert
            .store(micros.max(1), Ordering::Relaxed);
        self.state.waiting_since.store(0, Ordering::Relaxed);
    }

    /// The input starts waiting for Falco to send.
    fn waiting(&self) {
        let micros = self.state.started.elapsed().as_micros() as u64;
        self.state
            .waiting_since
            .store(micros.max(1), Ordering::Relaxed);
    }

    /// Stops polling and closes the request stream.
    fn stop(&self) {
        self.state.stop.cancel();
    }

    /// What the poller knows now, in microseconds since it started.
    fn clock(&self, last_request: u64, busy_checks: u32) -> PollClock {
        PollClock {
            now: micros(self.state.started.elapsed()),
            last_request,
            busy_checks,
            last_alert: self.state.last_alert.load(Ordering::Relaxed),
            waiting_since: self.state.waiting_since.load(Ordering::Relaxed),
        }
    }

    /// Polls until stopped or the call is gone; runs on its own thread.
    fn run(self, requests: mpsc::Sender<Request>) {
        let _ = requests.try_send(Request {});
        let mut last_request = micros(self.state.started.elapsed());
        let (mut busy_checks, mut alert_seen) = (0, 0);
        loop {
            let clock = self.clock(last_request, busy_checks);
            busy_checks = if clock.draining(alert_seen) {
                busy_checks + 1
            } else {
                0
            };
            alert_seen = clock.last_alert;
            match next_poll(self.idle, &clock) {
                PollStep::Sleep(nap) => std::thread::sleep(nap),
                PollStep::Send => {
                    // A full request buffer means Falco has requests enough.
                    let _ = requests.try_send(Request {});
                    last_request = micros(self.state.started.elapsed());
                }
            }
            if self.state.stop.is_cancelled() || requests.is_closed() {
                return;
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The poller's view of time, in microseconds since it started.
#[derive(Debug, Clone, Copy)]
struct PollClock {
    now: u64,
    /// When it last sent a request.
    last_request: u64,
    /// When the last alert came (0: none yet).
    last_alert: u64,
    /// When the input began waiting for Falco to send (0: busy with an alert).
    waiting_since: u64,
    /// How many checks in a row before this one found the input busy with
    /// alerts that kept coming (Falco draining its queue).
    busy_checks: u32,
}

impl PollClock {
    /// Whether Falco may still be sending: the input is busy with an alert
    /// or has not yet waited [`QUIET`].
    fn busy(&self) -> bool {
        self.waiting_since == 0 || self.now.saturating_sub(self.waiting_since) < micros(QUIET)
    }

    /// Whether Falco is draining its queue: the input is busy, and an alert
    /// came since the poller's last look (when the last was `alert_seen`).
    fn draining(&self, alert_seen: u64) -> bool {
        self.busy() && self.last_alert != alert_seen
    }
}

/// What the poller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PollStep {
    Send,
    Sleep(Duration),
}

/// The poller's timing decision, a pure function of its clock: poll every
/// [`HOT_POLL`] for [`HOT_FOR`] after an alert, every [`ACTIVE_POLL`] until
/// [`ACTIVE_FOR`], then every `idle`; but never while the input has not yet
/// waited [`QUIET`] for Falco; sleep between [`NAP_MIN`] and [`NAP_MAX`].
fn next_poll(idle: Duration, clock: &PollClock) -> PollStep {
    let since_alert = (clock.last_alert != 0).then(|| clock.now.saturating_sub(clock.last_alert));
    let interval = match since_alert {
        Some(us) if us < micros(HOT_FOR) => HOT_POLL,
        Some(us) if us < micros(ACTIVE_FOR) => ACTIVE_POLL,
        _ => idle,
    };
    let since_request = Duration::from_micros(clock.now.saturating_sub(clock.last_request));
    let busy = clock.busy();
    if since_request >= interval && !busy {
        return PollStep::Send;
    }
    let nap = interval.saturating_sub(since_request);
    let nap = if busy {
        nap.max(NAP_MIN * (1 << clock.busy_checks.min(BUSY_DOUBLINGS)))
    } else {
        nap
    };
    PollStep::Sleep(nap.clamp(NAP_MIN, NAP_MAX))
}

/// Asks Falco for its version and logs it, warning about the gRPC removal.
async fn log_version(channel: Channel) {
    let mut client = VersionClient::new(channel);
    let call = client.version(crate::proto::version::Request {});
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(response)) => {
            let v = response.into_inner();
            tracing::info!(version = %v.version, engine = %v.engine_version, "connected to Falco");
            if (v.major, v.minor) >= (0, 43) {
                tracing::warn!(version = %v.version, "Falco 0.43 deprecated the gRPC output and 0.44 removed it: plan a move to --input http or fifo");
            }
        }
        Ok(Err(status)) => {
            tracing::warn!(error = %status, "connected to Falco, but its version service did not answer")
        }
        Err(_) => tracing::warn!("connected to Falco, but its version service timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(now: u64, last_request: u64, last_alert: u64, waiting_since: u64) -> PollClock {
        PollClock {
            now,
            last_request,
            last_alert,
            waiting_since,
            busy_checks: 0,
        }
    }

    const IDLE: Duration = Duration::from_millis(10);

    #[test]
    fn polls_fast_after_an_alert_once_the_input_waits() {
        // 300 µs after an alert, the last poll 300 µs ago, waiting 250 µs.
        assert_eq!(
            next_poll(IDLE, &clock(10_300, 10_000, 10_000, 10_050)),
            PollStep::Send
        );
        // The same, but the input waited only 100 µs: Falco may still be sending.
        assert_eq!(
            next_poll(IDLE, &clock(10_300, 10_000, 10_000, 10_200)),
            PollStep::Sleep(NAP_MIN)
        );
        // Busy with an alert: never a poll.
        assert_eq!(
            next_poll(IDLE, &clock(90_000, 10_000, 10_000, 0)),
            PollStep::Sleep(NAP_MIN)
        );
        // Not yet due: sleeps what is left, at least NAP_MIN.
        assert_eq!(
            next_poll(IDLE, &clock(10_100, 10_000, 10_000, 10_000)),
            PollStep::Sleep(Duration::from_micros(150))
        );
    }

    #[test]
    fn naps_longer_while_falco_drains_its_queue() {
        let busy = |checks| PollClock {
            busy_checks: checks,
            ..clock(90_000, 10_000, 89_990, 89_995)
        };
        let naps: Vec<_> = (0..6).map(|n| next_poll(IDLE, &busy(n))).collect();
        let micros = |us| PollStep::Sleep(Duration::from_micros(us));
        assert_eq!(
            naps,
            [
                micros(100),
                micros(200),
                micros(400),
                micros(800),
                micros(800),
                micros(800)
            ]
        );
        // Counted as draining only while alerts keep coming.
        assert!(busy(0).draining(1));
        assert!(!busy(0).draining(89_990));
        // Once the input waits, the next check polls as before.
        let quiet = PollClock {
            busy_checks: 5,
            ..clock(90_500, 10_000, 89_990, 90_100)
        };
        assert!(!quiet.busy());
        assert_eq!(next_poll(IDLE, &quiet), PollStep::Send);
    }

    #[test]
    fn slows_down_as_falco_goes_quiet() {
        // 500 ms after the last alert: every ACTIVE_POLL (1 ms).
        let at = 600_000;
        assert_eq!(
            next_poll(IDLE, &clock(at, at - 400, at - 500_000, at - 1_000)),
            PollStep::Sleep(Duration::from_micros(600))
        );
        assert_eq!(
            next_poll(IDLE, &clock(at, at - 1_000, at - 500_000, at - 1_000)),
            PollStep::Send
        );
        // Two seconds after it, or with no alert yet: every `idle`.
        let at = 3_000_000;
        assert_eq!(
            next_poll(IDLE, &clock(at, at - 2_000, at - 2_000_000, at - 2_000)),
            PollStep::Sleep(Duration::from_millis(8))
        );
        assert_eq!(
            next_poll(IDLE, &clock(at, at - 10_000, 0, 1)),
            PollStep::Send
        );
        // A long idle interval still wakes every NAP_MAX to check for a stop.
        assert_eq!(
            next_poll(Duration::from_secs(1), &clock(at, at, 0, 1)),
            PollStep::Sleep(NAP_MAX)
        );
    }

    #[test]
    fn parses_socket_addresses() {
        assert_eq!(
            socket_path(DEFAULT_SOCKET).unwrap(),
            PathBuf::from("/run/falco/falco.sock")
        );
        assert_eq!(
            socket_path("unix:/tmp/f.sock").unwrap(),
            PathBuf::from("/tmp/f.sock")
        );
        assert_eq!(
            socket_path("/tmp/f.sock").unwrap(),
            PathBuf::from("/tmp/f.sock")
        );
        assert!(
            socket_path("localhost:5060").is_ok(),
            "a relative path is a path"
        );
        assert!(socket_path("tcp://localhost:5060").is_err());
        assert!(socket_path("unix://").is_err());
    }
}
