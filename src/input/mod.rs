//! The inputs that read Falco's alerts: [`grpc::GrpcInput`] (Falco <= 0.43),
//! [`fifo::FifoInput`] (`file_output` into a named pipe), [`http::AlertEndpoint`]
//! (`http_output`, falcosidekick's webhook) and [`stdin::StdinInput`]
//! (`program_output`). Each hands its alerts to an [`AlertSink`], the
//! bounded queue in front of NATS.

pub mod fifo;
pub mod grpc;
pub mod http;
pub mod lines;
pub mod stdin;

use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use lines::{Line, LineReader};

use crate::event::{AlertError, FalcoEvent};
use crate::format::Format;
use crate::priority::Priority;
use crate::telemetry::health::ReadyFlag;
use crate::telemetry::metrics::BridgeMetrics;

/// An input that cannot run at all (as opposed to one waiting for Falco).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("--grpc-socket {0:?} is not a Unix socket address (use unix:///path/to/falco.sock)")]
    NotUnixSocket(String),
    #[error("{path:?} exists and is not a FIFO")]
    NotAFifo { path: std::path::PathBuf },
    #[error("FIFO {path:?} does not exist (create it, or pass --create-fifo)")]
    FifoMissing { path: std::path::PathBuf },
    #[error("cannot create FIFO {path:?}: {source}")]
    CreateFifo {
        path: std::path::PathBuf,
        source: nix::Error,
    },
    #[error("cannot read {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// How reading alert lines ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinesEnd {
    /// The input ended (end of file).
    EndOfInput,
    /// Shutdown, or the queue closed.
    Stopped,
}

/// Reads one JSON alert per line from `reader` into `sink` until the input
/// ends or `shutdown`; a line over `max_line` is rejected and the next one
/// read. On shutdown, the complete lines already read (up to a buffer's
/// worth) are queued before returning: nothing read is thrown away.
pub async fn pump_lines<R: AsyncRead + Unpin>(
    reader: R,
    max_line: usize,
    sink: &AlertSink,
    shutdown: &CancellationToken,
) -> std::io::Result<LinesEnd> {
    let mut lines = LineReader::new(reader, max_line);
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = shutdown.cancelled() => break,
        };
        let Some(line) = line else {
            return Ok(LinesEnd::EndOfInput);
        };
        if forward(line, max_line, sink).await.is_err() {
            return Ok(LinesEnd::Stopped);
        }
    }
    let mut queued = 0usize;
    while let Some(line) = lines.next_buffered_line() {
        if forward(line, max_line, sink).await.is_err() {
            break;
        }
        queued += 1;
    }
    if queued > 0 {
        tracing::info!(
            input = sink.input(),
            lines = queued,
            "queued the lines read before the shutdown"
        );
    }
    if lines.partial() > 0 {
        tracing::warn!(
            input = sink.input(),
            bytes = lines.partial(),
            "shutdown in the middle of a line: its start is dropped"
        );
    }
    Ok(LinesEnd::Stopped)
}

/// Hands one line to the sink (a blank one is no alert, and skipped).
async fn forward(line: Line, max_line: usize, sink: &AlertSink) -> Result<(), QueueClosed> {
    let read = match line {
        Line::Complete(raw) if raw.iter().all(u8::is_ascii_whitespace) => return Ok(()),
        Line::Complete(raw) => FalcoEvent::from_json(raw),
        Line::Oversized(size) => Err(AlertError::TooLarge {
            size,
            limit: max_line,
        }),
    };
    sink.offer(read).await.map(drop)
}

/// The queue was closed: the bridge is stopping.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the alert queue is closed")]
pub struct QueueClosed;

/// What became of an alert an input read.
#[derive(Debug)]
pub enum Offered {
    /// Queued for NATS (or left out by `--min-priority`).
    Taken,
    /// Not an alert the bridge can forward: counted and logged, and said
    /// to an input that answers its sender (HTTP's 400).
    Rejected(AlertError),
}

/// Where an input puts its alerts: counts them, applies `--min-priority`,
/// and waits while the queue to NATS is full (Falco keeps its own queue).
#[derive(Clone)]
pub struct AlertSink {
    tx: mpsc::Sender<FalcoEvent>,
    input: &'static str,
    min_priority: Priority,
    format: Format,
    received: Counter,
    /// `falco_nats_alerts_accepted_total` of this input, by priority (in
    /// the order of the priorities' numbers).
    accepted: [Counter; 8],
    metrics: BridgeMetrics,
    /// Set while the input is connected to Falco.
    pub connected: ReadyFlag,
}

impl AlertSink {
    pub fn new(
        tx: mpsc::Sender<FalcoEvent>,
        input: &'static str,
        min_priority: Priority,
        format: Format,
        metrics: BridgeMetrics,
        connected: ReadyFlag,
    ) -> Self {
        let received = metrics.received.get_or_create(&[("input", input)]).clone();
        // Shown from the start, at zero.
        drop(metrics.input_reconnects.get_or_create(&[("input", input)]));
        let accepted = Priority::ALL.map(|p| {
            metrics
                .accepted
                .get_or_create(&[("input", input), ("priority", p.as_lower_str())])
                .clone()
        });
        AlertSink {
            tx,
            input,
            min_priority,
            format,
            received,
            accepted,
            metrics,
            connected,
        }
    }

    /// The input's name, for logs and metrics.
    pub fn input(&self) -> &'static str {
        self.input
    }

    /// Queues one alert (in the `--format` asked for), waiting for room.
    pub async fn send(&self, event: FalcoEvent) -> Result<(), QueueClosed> {
        self.received.inc();
        if event.priority < self.min_priority {
            self.metrics.filtered.inc();
            return Ok(());
        }
        let event = match self.format.apply(event) {
            Ok(event) => event,
            Err(err) => {
                self.metrics.reject(self.input, &err);
                return Ok(());
            }
        };
        self.accepted[event.priority as usize].inc();
        self.metrics.unconfirmed.inc();
        self.tx.send(event).await.map_err(|_| {
            self.metrics.unconfirmed.dec();
            QueueClosed
        })
    }

    /// Takes what an input read (a line, a body, a gRPC response, each
    /// read into an alert): queues the alert, or counts and logs why it
    /// cannot be. Every input hands over through here.
    pub async fn offer(
        &self,
        read: Result<FalcoEvent, AlertError>,
    ) -> Result<Offered, QueueClosed> {
        match read {
            Ok(event) => self.send(event).await.map(|()| Offered::Taken),
            Err(err) => {
                self.received.inc();
                self.metrics.reject(self.input, &err);
                Ok(Offered::Rejected(err))
            }
        }
    }

    /// Counts a reconnect to Falco.
    pub fn reconnected(&self) {
        self.metrics
            .input_reconnects
            .get_or_create(&[("input", self.input)])
            .inc();
    }

    /// Marks the input connected or not (readiness and the gauge).
    pub fn set_connected(&self, connected: bool) {
        self.connected.set(connected);
        self.metrics.input_connected.set(i64::from(connected));
    }
}
