//! The simulated Falco's `http_output`: each alert a `POST` of its JSON on
//! one kept-alive HTTP/1.1 connection, as Falco sends them. Unlike Falco,
//! which drops an alert its post failed for, the simulator posts it again
//! on a new connection until it is taken: the bridge may start after it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::alerts::AlertFactory;
use super::pacer::Pacer;

/// A URL the simulator cannot post to.
#[derive(Debug, thiserror::Error)]
#[error("cannot post to {0:?}: the simulator posts to http://HOST:PORT/PATH")]
pub struct NotHttpUrl(pub String);

/// Posts alerts to `url` (plain `http://host:port/path`) until the pacer
/// is done or `shutdown`.
pub(super) async fn post_alerts(
    url: &Uri,
    factory: &mut AlertFactory,
    mut pacer: Pacer,
    shutdown: &CancellationToken,
) -> Result<(), NotHttpUrl> {
    let (host, port) = match (url.scheme_str(), url.host()) {
        (Some("http"), Some(host)) => (host.to_owned(), url.port_u16().unwrap_or(80)),
        _ => return Err(NotHttpUrl(url.to_string())),
    };
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut refusals = 0u64;
    while pacer.next(shutdown).await {
        let alert = Bytes::from(factory.next_json());
        // The same alert until it is taken, or the simulator is stopped.
        loop {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                sender = connect(&host, port).await;
            }
            let taken = match sender.as_mut() {
                Some(s) => post(s, url, alert.clone()).await,
                None => Err(PostError::Connect),
            };
            match taken {
                Ok(()) => break,
                Err(e) => {
                    refusals += 1;
                    let reason = crate::telemetry::logging::chain(&e);
                    if refusals.is_power_of_two() {
                        tracing::warn!(%url, %reason, refusals, "the alert was not taken; posting it again");
                    }
                    sender = None;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
        }
    }
    Ok(())
}

async fn connect(host: &str, port: u16) -> Option<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "the simulator's HTTP connection ended");
        }
    });
    Some(sender)
}

/// Why an alert was not taken.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("cannot connect")]
    Connect,
    #[error(transparent)]
    Request(#[from] hyper::http::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("{status}: {body}")]
    Refused {
        status: hyper::StatusCode,
        body: String,
    },
}

/// One alert posted; `Err` unless the answer was 200.
async fn post(
    sender: &mut SendRequest<Full<Bytes>>,
    url: &Uri,
    alert: Bytes,
) -> Result<(), PostError> {
    let authority = url.authority().map(|a| a.as_str()).unwrap_or_default();
    let request = Request::post(url.path())
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "falcosecurity/falco")
        .body(Full::new(alert))?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    // The body read whole, so the connection can carry the next post.
    let body = response.into_body().collect().await?.to_bytes();
    if status == hyper::StatusCode::OK {
        Ok(())
    } else {
        Err(PostError::Refused {
            status,
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        })
    }
}
