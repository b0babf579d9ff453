//! [`AlertEndpoint`]: receives alerts from Falco's `http_output` and from
//! falcosidekick's webhook forwarding: `POST /` with one Falco JSON alert.
//!
//! Served on the bridge's `--listen` address beside `/healthz`, `/readyz`
//! and `/metrics`. Answers 200 once the alert is queued (waiting while the
//! queue is full), 400 with the reason for a body that is not a Falco alert,
//! 413 above `--max-body`, 415 for a compressed body, and 401 without the
//! bearer token when one is configured: the token is checked before a byte
//! of the body is read. What Falco sent is what NATS gets.

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::task::Poll;

use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::{AlertSink, Offered, QueueClosed};
use crate::event::FalcoEvent;
use crate::telemetry::metrics::HttpServerMetrics;

/// Default largest accepted body: 1 MiB, as for a FIFO line.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// Default time limit for a request's body once its headers are in.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP input settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Largest accepted body in bytes.
    pub max_body: usize,
    /// When set, requests must carry `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Requests must come over a connection with a verified client
    /// certificate (`--tls-client-ca`).
    pub client_certificate: bool,
    /// Longest time to receive a request's body; a sender that stalls is
    /// answered 408 and its connection closed.
    pub body_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            max_body: DEFAULT_MAX_BODY,
            token: None,
            client_certificate: false,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }
}

/// The bridge's `POST /`, which the `--listen` server answers before its
/// router ([`crate::server::Endpoints`]): every alert takes this path, so it
/// goes through no routing layer, no boxed body and no timer when the body
/// came with the headers. Any other method on `/` is answered 405.
#[derive(Clone)]
pub struct AlertEndpoint(Arc<Receiver>);

struct Receiver {
    sink: AlertSink,
    options: HttpOptions,
    metrics: HttpServerMetrics,
}

impl AlertEndpoint {
    /// An empty token is refused before this (the command line says so).
    pub fn new(sink: AlertSink, options: HttpOptions, metrics: HttpServerMetrics) -> Self {
        sink.set_connected(true);
        AlertEndpoint(Arc::new(Receiver {
            sink,
            options,
            metrics,
        }))
    }
}

impl crate::server::Route for AlertEndpoint {
    /// Whether `request` is this endpoint's (its path is `/`).
    fn takes(&self, request: &Request<Incoming>) -> bool {
        request.uri().path() == "/"
    }

    /// Answers one request to `/`; `verified` when its connection came with
    /// a client certificate the bridge verified.
    async fn answer(self, request: Request<Incoming>, verified: bool) -> Response {
        if request.method() != Method::POST {
            return (
                StatusCode::METHOD_NOT_ALLOWED,
                [(header::ALLOW, "POST")],
                "alerts are POSTed to /\n",
            )
                .into_response();
        }
        let (parts, body) = request.into_parts();
        let rx = &*self.0;
        if let Err(refusal) = rx.admit(&parts.headers, verified) {
            return *refusal;
        }
        let body = match rx.body(body).await {
            Ok(body) => body,
            Err(refusal) => return *refusal,
        };
        match rx.sink.offer(FalcoEvent::from_json(body)).await {
            Ok(Offered::Taken) => (StatusCode::OK, "queued\n").into_response(),
            Ok(Offered::Rejected(err)) => text(
                StatusCode::BAD_REQUEST,
                crate::telemetry::logging::chain(&err),
            ),
            Err(QueueClosed) => {
                (StatusCode::SERVICE_UNAVAILABLE, "the bridge is stopping\n").into_response()
            }
        }
    }
}

/// A request turned away, with its answer (boxed: the usual result is a
/// small `Ok`).
type Refusal = Box<Response>;

fn text(status: StatusCode, message: String) -> Response {
    (status, message + "\n").into_response()
}

impl Receiver {
    /// The checks on a request's headers, before a byte of its body is read.
    fn admit(&self, headers: &HeaderMap, verified: bool) -> Result<(), Refusal> {
        let options = &self.options;
        if options.client_certificate && !verified {
            return Err(Box::new(text(
                StatusCode::FORBIDDEN,
                "a client certificate signed by the bridge's --tls-client-ca is required".into(),
            )));
        }
        if let Some(token) = &options.token {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !given.is_some_and(|g| crate::signing::same_secret(g.as_bytes(), token.as_bytes())) {
                return Err(Box::new(
                    (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        "missing or wrong bearer token\n",
                    )
                        .into_response(),
                ));
            }
        }
        if let Some(encoding) = headers.get(header::CONTENT_ENCODING) {
            let encoding = encoding.to_str().unwrap_or("(not text)");
            if !encoding.eq_ignore_ascii_case("identity") {
                return Err(Box::new(text(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "Content-Encoding {encoding} is not supported: send the alert uncompressed"
                    ),
                )));
            }
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > options.max_body as u64) {
            return Err(Box::new(self.too_large()));
        }
        Ok(())
    }

    fn too_large(&self) -> Response {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "body larger than --max-body ({} bytes)",
                self.options.max_body
            ),
        )
    }

    /// The whole body, at most `--max-body` bytes, within `--body-timeout`.
    /// A body that came with the headers (Falco sends each request at once)
    /// is taken without starting a timer.
    async fn body(&self, body: Incoming) -> Result<Bytes, Refusal> {
        let mut collect = std::pin::pin!(Limited::new(body, self.options.max_body).collect());
        let first = std::future::poll_fn(|cx| Poll::Ready(collect.as_mut().poll(cx))).await;
        let collected = match first {
            Poll::Ready(collected) => collected,
            Poll::Pending => match tokio::time::timeout(self.options.body_timeout, collect).await {
                Ok(collected) => collected,
                Err(_) => {
                    self.metrics.stalled("body");
                    return Err(Box::new(
                        (
                            StatusCode::REQUEST_TIMEOUT,
                            [(header::CONNECTION, "close")],
                            "the body did not arrive in time\n",
                        )
                            .into_response(),
                    ));
                }
            },
        };
        // Over the limit, or the connection broke mid-body.
        collected
            .map(|c| c.to_bytes())
            .map_err(|_| Box::new(self.too_large()))
    }
}
