//! The drain deadline: once shutdown starts, how long a subcommand has to
//! finish what it holds (alerts read, decisions under way) before it stops
//! anyway. Every part of a subcommand watches the same deadline.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A token cancelled `timeout` after `shutdown` is.
pub fn deadline_after(shutdown: &CancellationToken, timeout: Duration) -> CancellationToken {
    let deadline = CancellationToken::new();
    tokio::spawn({
        let (shutdown, deadline) = (shutdown.clone(), deadline.clone());
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(timeout).await;
            deadline.cancel();
        }
    });
    deadline
}
