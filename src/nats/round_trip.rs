//! [`round_trip`]: proof that the server has everything this connection
//! published so far. The server handles a connection's messages in order,
//! so a message to our own inbox comes back only after everything sent
//! before it was received. (`Client::flush` alone can return while the
//! connection still buffers data the socket did not take.)

use std::time::Duration;

use async_nats::Client;
use futures_util::StreamExt;

/// How long the echo may take.
pub const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the server could not confirm.
#[derive(Debug, thiserror::Error)]
pub enum RoundTripError {
    #[error("cannot subscribe to our own inbox")]
    Subscribe(#[source] async_nats::SubscribeError),
    #[error("cannot publish to our own inbox")]
    Publish(#[source] async_nats::PublishError),
    #[error("cannot flush the connection")]
    Flush(#[source] async_nats::client::FlushError),
    #[error("the connection closed")]
    Closed,
    #[error("no answer from the server within {ROUND_TRIP_TIMEOUT:?} (may this user publish and subscribe to its own inbox, --inbox-prefix.>?)")]
    TimedOut,
}

/// Waits until the server has processed everything published so far on
/// this connection.
pub async fn round_trip(client: &Client) -> Result<(), RoundTripError> {
    let inbox = client.new_inbox();
    let mut echo = client
        .subscribe(inbox.clone())
        .await
        .map_err(RoundTripError::Subscribe)?;
    client
        .publish(inbox, bytes::Bytes::new())
        .await
        .map_err(RoundTripError::Publish)?;
    client.flush().await.map_err(RoundTripError::Flush)?;
    match tokio::time::timeout(ROUND_TRIP_TIMEOUT, echo.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(RoundTripError::Closed),
        Err(_) => Err(RoundTripError::TimedOut),
    }
}
