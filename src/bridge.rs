//! `falco-nats bridge`: one input, a bounded queue, one publisher.
//!
//! [`run`] wires them together and serves the probes; on shutdown it stops
//! the input, publishes (and with JetStream, has acknowledged) everything
//! already read, flushes, and returns.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use tokio_util::sync::CancellationToken;

use crate::format::Format;
use crate::input::fifo::{FifoInput, FifoOptions};
use crate::input::grpc::{GrpcInput, GrpcOptions};
use crate::input::http::{AlertEndpoint, HttpOptions};
use crate::input::stdin::{self, StdinInput, StdinOptions};
use crate::input::{AlertSink, InputError};
use crate::nats::{
    connect, ConnectionWatch, DeliveryLedger, NatsError, NatsOptions, PublishOptions, Publisher,
    StreamMismatch,
};
use crate::priority::Priority;
use crate::server::{Endpoints, Listen, Route, ServerLimits};
use crate::telemetry::health::{self, Readiness};
use crate::telemetry::metrics::{BridgeMetrics, HttpServerMetrics, QueueDepth};

/// The bridge's default `--listen` address. falcosidekick uses 2801-2803
/// and Falco's own web server 8765, so falco-nats takes 2810.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:2810";

/// Which input the bridge reads.
#[derive(Debug, Clone)]
pub enum InputOptions {
    Grpc(GrpcOptions),
    Fifo(FifoOptions),
    /// `POST /` on the `--listen` address.
    Http(HttpOptions),
    /// Lines on standard input.
    Stdin(StdinOptions),
}

impl InputOptions {
    fn name(&self) -> &'static str {
        match self {
            InputOptions::Grpc(_) => "grpc",
            InputOptions::Fifo(_) => "fifo",
            InputOptions::Http(_) => "http",
            InputOptions::Stdin(_) => "stdin",
        }
    }
}

/// A certificate chain and key (PEM) for HTTPS on the `--listen` address.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// Client certificates signed by this CA are required on `POST /`.
    pub client_ca: Option<std::path::PathBuf>,
}

/// Everything the bridge needs.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    pub input: InputOptions,
    pub nats: NatsOptions,
    pub publish: PublishOptions,
    /// Alerts below this priority are dropped (and counted).
    pub min_priority: Priority,
    /// The payload's shape: Falco's JSON, or falcosidekick's.
    pub format: Format,
    /// Alerts held between the input and NATS at most.
    pub queue_size: usize,
    /// Longest time to publish what was read, once shutdown starts.
    pub drain_timeout: Duration,
    /// Serve `--listen` over HTTPS.
    pub tls: Option<TlsFiles>,
    /// The --listen server's limits (its metrics are made by [`run`]).
    pub server: ServerLimits,
}

/// Why the bridge stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(
        "{pending} alerts read were not confirmed by NATS when the drain timeout of {timeout:?} ran out"
    )]
    DrainTimeout { pending: i64, timeout: Duration },
    #[error(transparent)]
    Tls(#[from] crate::server::TlsError),
    #[error("--input http needs the --listen address")]
    HttpWithoutListener,
    #[error(transparent)]
    Stream(#[from] StreamMismatch),
}

/// Runs the bridge until `shutdown` is cancelled (or the input fails),
/// serving `/healthz`, `/readyz` and `/metrics` on `listener` if given.
pub async fn run(
    options: BridgeOptions,
    listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), BridgeError> {
    let mut registry = Registry::default();
    let metrics = BridgeMetrics::new(&mut registry);
    let readiness = Readiness::default();
    let input_ready = readiness.check("input");
    let watch = ConnectionWatch {
        // Core NATS publishing: the ledger of what a dropped connection may lose.
        ledger: DeliveryLedger::new(metrics.possibly_lost.clone(), metrics.unconfirmed.clone()),
        ..ConnectionWatch::register(&readiness, &mut registry)
    };
    let tls = match &options.tls {
        Some(files) => Some(crate::server::tls_acceptor(
            &files.cert,
            &files.key,
            files.client_ca.as_deref(),
        )?),
        None => None,
    };
    if matches!(options.input, InputOptions::Http(_)) && listener.is_none() {
        return Err(BridgeError::HttpWithoutListener);
    }
    let connection = connect(&options.nats, watch).await?;
    let (tx, rx) = mpsc::channel(options.queue_size.max(1));
    registry.register_collector(Box::new(QueueDepth(tx.downgrade())));
    let publisher = Publisher::new(connection, options.publish.clone(), metrics.clone());
    let output = tokio::spawn(publisher.run(rx));
    let input_name = options.input.name();
    let sink = AlertSink::new(
        tx,
        input_name,
        options.min_priority,
        options.format,
        metrics.clone(),
        input_ready,
    );

    // One server on --listen: the probes, and with the HTTP input its route,
    // in which case the server is the input and stops with it (connections
    // still open after half the drain timeout are closed).
    let limits = ServerLimits {
        metrics: HttpServerMetrics::new(&mut registry),
        ..options.server.clone()
    };
    let probes = health::router(readiness, Arc::new(registry));
    let grace = options.drain_timeout / 2;
    let serve = Serve {
        listener,
        probes,
        tls,
        limits,
        grace,
    };
    let (input, server) = Input::start(options.input, sink, serve);
    let deadline = crate::drain::deadline_after(&shutdown, options.drain_timeout);
    let ended = drive(input, output, &shutdown, &deadline).await;
    if let Some(server) = server {
        server.stop().await;
    }
    deadline.cancel();
    ended.into_result(input_name, metrics.unconfirmed.get(), options.drain_timeout)
}

/// The input the bridge reads.
enum Input {
    Grpc(GrpcInput),
    Fifo(FifoInput),
    Stdin(StdinInput<std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>>),
    /// The HTTP server holds the queue's sender; stopping it closes the queue.
    Http(Listen),
}

/// What the `--listen` server is made of.
struct Serve {
    listener: Option<TcpListener>,
    probes: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ServerLimits,
    grace: Duration,
}

impl Serve {
    fn start<R: Route>(self, endpoints: Endpoints<R>) -> Listen {
        Listen::start(self.listener, endpoints, self.tls, self.limits, self.grace)
    }
}

impl Input {
    /// Starts the input filling `sink`, and the `--listen` server beside it.
    /// The HTTP input is that server's `POST /` (the server then is the
    /// input, and stops with it: no second server comes back).
    fn start(options: InputOptions, sink: AlertSink, serve: Serve) -> (Self, Option<Listen>) {
        let input = match options {
            InputOptions::Grpc(o) => Input::Grpc(GrpcInput::new(o, sink)),
            InputOptions::Fifo(o) => Input::Fifo(FifoInput::new(o, sink)),
            InputOptions::Stdin(o) => {
                Input::Stdin(StdinInput::new(stdin::open(), o.max_line, sink))
            }
            InputOptions::Http(o) => {
                let alerts = AlertEndpoint::new(sink, o, serve.limits.metrics.clone());
                let endpoints = Endpoints::with_route(serve.probes.clone(), alerts);
                return (Input::Http(serve.start(endpoints)), None);
            }
        };
        let probes = Endpoints::from(serve.probes.clone());
        (input, Some(serve.start(probes)))
    }

    /// Reads until `stop` (or the input ends or fails).
    async fn run(self, stop: CancellationToken) -> Result<(), InputError> {
        match self {
            Input::Grpc(input) => input.run(stop).await,
            Input::Fifo(input) => input.run(stop).await,
            Input::Stdin(input) => input.run(stop).await,
            Input::Http(server) => {
                stop.cancelled().await;
                server.stop().await;
                Ok(())
            }
        }
    }
}

/// How the input and the output ended.
struct Ended {
    /// `None` when the deadline came first, or the output failed first.
    input: Option<Result<(), InputError>>,
    /// `None` when the deadline came first.
    output: Option<Result<Result<(), StreamMismatch>, tokio::task::JoinError>>,
}

/// Runs the input until shutdown (or its end), then lets the output
/// publish what was read, both within the drain deadline. The output ends
/// before the input only when it cannot publish at all (or, with the HTTP
/// input, once the server that holds the queue has stopped).
async fn drive(
    input: Input,
    mut output: JoinHandle<Result<(), StreamMismatch>>,
    shutdown: &CancellationToken,
    deadline: &CancellationToken,
) -> Ended {
    let mut reading = Box::pin(input.run(shutdown.child_token()));
    let mut ended = Ended {
        input: None,
        output: None,
    };
    tokio::select! {
        biased;
        result = &mut reading => ended.input = Some(result),
        _ = deadline.cancelled() => {}
        result = &mut output => {
            let failed = matches!(result, Ok(Err(_)) | Err(_));
            ended.output = Some(result);
            if !failed {
                tokio::select! {
                    result = &mut reading => ended.input = Some(result),
                    _ = deadline.cancelled() => {}
                }
            }
        }
    }
    drop(reading);
    // An input that stopped by itself starts the shutdown too.
    shutdown.cancel();
    if ended.output.is_none() && ended.input.is_some() {
        tracing::info!("input stopped; publishing what was read");
        tokio::select! {
            result = &mut output => ended.output = Some(result),
            _ = deadline.cancelled() => {}
        }
    }
    if ended.output.is_none() {
        output.abort();
    }
    ended
}

impl Ended {
    /// The bridge's result: the input's, unless the output could not
    /// publish or the drain deadline left `unconfirmed` alerts behind.
    fn into_result(
        self,
        input_name: &str,
        unconfirmed: i64,
        timeout: Duration,
    ) -> Result<(), BridgeError> {
        if let Some(Err(e)) = &self.input {
            tracing::error!(input = input_name, error = %e, "input failed");
        }
        match &self.output {
            Some(Ok(Err(mismatch))) => return Err(BridgeError::Stream(mismatch.clone())),
            Some(Err(join)) => tracing::error!(error = %join, "the publisher stopped unexpectedly"),
            _ => {}
        }
        // Either one missing means the deadline came first: exactly what was
        // read and not confirmed (queued, in flight, or in the client's
        // buffer) is reported.
        let (Some(_), Some(input)) = (self.output, self.input) else {
            return Err(BridgeError::DrainTimeout {
                pending: unconfirmed,
                timeout,
            });
        };
        tracing::info!("bridge stopped");
        input.map_err(Into::into)
    }
}
