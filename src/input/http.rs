//! [`http_routes`]: receives alerts from Falco's `http_output` and from
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

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use super::AlertSink;
use crate::server::VerifiedClientCertificate;
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

#[derive(Clone)]
struct Receiver {
    sink: AlertSink,
    options: Arc<HttpOptions>,
    metrics: HttpServerMetrics,
}

/// The alert-receiving route, to merge into the probe router. An empty
/// token is refused before this (the command line says so).
pub fn http_routes(sink: AlertSink, options: HttpOptions, metrics: HttpServerMetrics) -> Router {
    sink.set_connected(true);
    Router::new()
        .route("/", post(receive))
        .with_state(Receiver {
            sink,
            options: Arc::new(options),
            metrics,
        })
}

fn text(status: StatusCode, message: String) -> Response {
    (status, message + "\n").into_response()
}

async fn receive(State(rx): State<Receiver>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let options = &*rx.options;
    if options.client_certificate
        && parts
            .extensions
            .get::<VerifiedClientCertificate>()
            .is_none()
    {
        return text(
            StatusCode::FORBIDDEN,
            "a client certificate signed by the bridge's --tls-client-ca is required".into(),
        );
    }
    if let Some(token) = &options.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token\n",
            )
                .into_response();
        }
    }
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity");
    if !encoding.eq_ignore_ascii_case("identity") {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding {encoding} is not supported: set Falco's http_output.compress_uploads: false"),
        );
    }
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than --max-body ({} bytes)", options.max_body),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > options.max_body as u64) {
        return too_large();
    }
    let body = match tokio::time::timeout(
        options.body_timeout,
        axum::body::to_bytes(body, options.max_body),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => return too_large(),
        Err(_) => {
            rx.metrics.stalled("body");
            return (
                StatusCode::REQUEST_TIMEOUT,
                [(header::CONNECTION, "close")],
                "the body did not arrive in time\n",
            )
                .into_response();
        }
    };
    match crate::event::FalcoEvent::from_json(body) {
        Ok(event) => match rx.sink.send(event).await {
            Ok(()) => text(StatusCode::OK, "queued".into()),
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the bridge is stopping".into(),
            ),
        },
        Err(err) => {
            rx.sink.reject(&err);
            text(StatusCode::BAD_REQUEST, err.to_string())
        }
    }
}

/// Compares secrets without an early exit on the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares_tokens() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
