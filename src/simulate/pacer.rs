//! Paces the simulated Falco's alerts.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Paces alerts: `count` of them (0: no end) at `rate` per second (0: as
/// fast as possible), in bursts per millisecond at high rates.
pub(super) struct Pacer {
    start: Instant,
    rate: f64,
    count: u64,
    sent: u64,
}

impl Pacer {
    pub(super) fn new(rate: f64, count: u64) -> Self {
        Pacer {
            start: Instant::now(),
            rate,
            count,
            sent: 0,
        }
    }

    /// Waits until the next alert is due; `false` when all were sent or on shutdown.
    pub(super) async fn next(&mut self, shutdown: &CancellationToken) -> bool {
        loop {
            if shutdown.is_cancelled() || (self.count != 0 && self.sent >= self.count) {
                return false;
            }
            let due = if self.rate > 0.0 {
                (self.start.elapsed().as_secs_f64() * self.rate) as u64 + 1
            } else {
                u64::MAX
            };
            if self.sent < due {
                self.sent += 1;
                if self.rate <= 0.0 && self.sent.is_multiple_of(1024) {
                    tokio::task::yield_now().await;
                }
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                _ = shutdown.cancelled() => return false,
            }
        }
    }
}
