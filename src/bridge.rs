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
use tokio_util::sync::CancellationToken;

use crate::input::fifo::{FifoInput, FifoOptions};
use crate::input::grpc::{GrpcInput, GrpcOptions};
use crate::input::http::{http_routes, HttpOptions};
use crate::input::stdin::{self, StdinInput};
use crate::input::{AlertSink, InputError};
use crate::nats::{
    connect, ConnectionMetrics, ConnectionWatch, DeliveryLedger, NatsError, NatsOptions,
    PublishOptions, Publisher, StreamMismatch,
};
use crate::priority::Priority;
use crate::telemetry::health::{self, Readiness};
use crate::telemetry::metrics::{BridgeMetrics, QueueDepth};

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
    /// Lines on standard input, up to this many bytes each.
    Stdin {
        max_line: usize,
    },
}

impl InputOptions {
    fn name(&self) -> &'static str {
        match self {
            InputOptions::Grpc(_) => "grpc",
            InputOptions::Fifo(_) => "fifo",
            InputOptions::Http(_) => "http",
            InputOptions::Stdin { .. } => "stdin",
        }
    }
}

/// A certificate chain and key (PEM) for HTTPS on the `--listen` address.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Everything the bridge needs.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    pub input: InputOptions,
    pub nats: NatsOptions,
    pub publish: PublishOptions,
    /// Alerts below this priority are dropped (and counted).
    pub min_priority: Priority,
    /// Alerts held between the input and NATS at most.
    pub queue_size: usize,
    /// Longest time to publish what was read, once shutdown starts.
    pub drain_timeout: Duration,
    /// Serve `--listen` over HTTPS.
    pub tls: Option<TlsFiles>,
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
        ready: readiness.check("nats"),
        metrics: ConnectionMetrics::register(&mut registry),
        ledger: DeliveryLedger::new(metrics.possibly_lost.clone(), metrics.unconfirmed.clone()),
    };
    let acceptor = match &options.tls {
        Some(files) => Some(crate::server::tls_acceptor(&files.cert, &files.key)?),
        None => None,
    };
    if matches!(options.input, InputOptions::Http(_)) && listener.is_none() {
        return Err(BridgeError::HttpWithoutListener);
    }
    let connection = connect(&options.nats, watch).await?;

    let (tx, rx) = mpsc::channel(options.queue_size.max(1));
    registry.register_collector(Box::new(QueueDepth(tx.downgrade())));
    let publisher = Publisher::new(connection, options.publish.clone(), metrics.clone());
    let mut output = tokio::spawn(publisher.run(rx));

    let input_name = options.input.name();
    let sink = AlertSink::new(
        tx,
        input_name,
        options.min_priority,
        metrics.clone(),
        input_ready,
    );

    // The HTTP server stops with the input when it is the input (after
    // half the drain timeout, connections still open are closed), else
    // once everything is published.
    let http_stop = CancellationToken::new();
    let mut router = health::router(readiness, Arc::new(registry));
    if let InputOptions::Http(http_options) = &options.input {
        router = router.merge(http_routes(sink.clone(), http_options.clone()));
    }
    let grace = options.drain_timeout / 2;
    let mut http = listener.map(|listener| {
        tokio::spawn(crate::server::serve(
            listener,
            router,
            acceptor,
            http_stop.clone(),
            grace,
        ))
    });
    // Once shutdown starts, the input and the output share one deadline.
    let deadline = crate::drain::deadline_after(&shutdown, options.drain_timeout);
    let input_stop = shutdown.child_token();
    let input = async {
        match options.input {
            InputOptions::Grpc(o) => GrpcInput::new(o, sink).run(input_stop).await,
            InputOptions::Fifo(o) => FifoInput::new(o, sink).run(input_stop).await,
            InputOptions::Stdin { max_line } => {
                StdinInput::new(stdin::open(), max_line, sink)
                    .run(input_stop)
                    .await
            }
            InputOptions::Http(_) => {
                // The server holds the sink; stopping it (after the requests
                // under way) closes the queue.
                drop(sink);
                input_stop.cancelled().await;
                http_stop.cancel();
                if let Some(server) = http.take() {
                    let _ = server.await;
                }
                Ok(())
            }
        }
    };
    // The input runs until shutdown. The output ends before it only when it
    // cannot publish at all (or, with the HTTP input, once the server that
    // holds the queue has stopped, on the way to the input's own end).
    let mut input = Box::pin(input);
    let mut drained = None;
    let mut input_result = tokio::select! {
        biased;
        result = &mut input => Some(result),
        _ = deadline.cancelled() => None,
        result = &mut output => {
            let failed = matches!(result, Ok(Err(_)) | Err(_));
            drained = Some(result);
            if failed {
                None
            } else {
                tokio::select! {
                    result = &mut input => Some(result),
                    _ = deadline.cancelled() => None,
                }
            }
        }
    };
    if let Some(Err(e)) = &input_result {
        tracing::error!(input = input_name, error = %e, "input failed");
    }
    // An input that stopped by itself starts the shutdown too.
    shutdown.cancel();
    // Done with the input (which may hold the HTTP server).
    drop(input);
    if drained.is_none() && input_result.is_some() {
        tracing::info!("input stopped; publishing what was read");
        drained = tokio::select! {
            result = &mut output => Some(result),
            _ = deadline.cancelled() => None,
        };
    }
    http_stop.cancel();
    if let Some(http) = http {
        let _ = http.await;
    }
    deadline.cancel();
    match &drained {
        Some(Ok(Err(mismatch))) => return Err(BridgeError::Stream(mismatch.clone())),
        Some(Ok(Ok(()))) => {}
        Some(Err(join)) => tracing::error!(error = %join, "the publisher stopped unexpectedly"),
        None => output.abort(),
    }
    let Some(input_result) = input_result.take().filter(|_| drained.is_some()) else {
        // Exactly what was read and not confirmed: queued, in flight, or
        // in the client's buffer.
        return Err(BridgeError::DrainTimeout {
            pending: metrics.unconfirmed.get(),
            timeout: options.drain_timeout,
        });
    };
    tracing::info!("bridge stopped");
    input_result.map_err(Into::into)
}
