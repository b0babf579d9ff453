//! [`DeliveryLedger`]: what core NATS may have lost when a connection dropped.
//!
//! Core NATS acknowledges nothing. What the client wrote to a socket the
//! server never read is gone when the connection drops, and no error tells.
//! The server does process a connection's messages in order, though: when a
//! message to our own inbox comes back, everything published before it was
//! received. So the publisher counts what it hands to the client, a
//! background task confirms that count every [`CONFIRM_EVERY`] with such an
//! echo, and when the connection drops, whatever was handed over since the
//! last confirmation is counted as possibly lost. That is an upper bound:
//! some of those alerts may have reached the server, none of the others was
//! lost unseen. (Alerts published while disconnected wait in the client and
//! are sent after the reconnect.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::nats::round_trip::round_trip;

/// How often the count of published alerts is confirmed by an echo.
pub const CONFIRM_EVERY: Duration = Duration::from_millis(100);

/// Counts of alerts handed to the NATS client and confirmed by the server.
/// Cheap to clone: clones share the counts.
#[derive(Clone, Default)]
pub struct DeliveryLedger(Arc<Inner>);

#[derive(Default)]
struct Inner {
    handed: AtomicU64,
    /// Handed-over alerts known received or counted lost: only grows.
    confirmed: AtomicU64,
    possibly_lost: Counter,
    /// Alerts read and not yet confirmed: lowered by what is confirmed,
    /// or counted as possibly lost.
    unconfirmed: Gauge,
}

impl DeliveryLedger {
    /// A ledger that adds what it considers lost to `possibly_lost`, and
    /// takes what is confirmed or lost off `unconfirmed`.
    pub fn new(possibly_lost: Counter, unconfirmed: Gauge) -> Self {
        DeliveryLedger(Arc::new(Inner {
            possibly_lost,
            unconfirmed,
            ..Inner::default()
        }))
    }

    /// One alert was handed to the client.
    pub fn handed(&self) {
        self.0.handed.fetch_add(1, Ordering::Release);
    }

    /// The number of alerts handed over so far: an echo published after
    /// reading it confirms at least this many.
    pub fn mark(&self) -> u64 {
        self.0.handed.load(Ordering::Acquire)
    }

    /// The server received the first `mark` alerts.
    pub fn confirm(&self, mark: u64) {
        let before = self.0.confirmed.fetch_max(mark, Ordering::AcqRel);
        if mark > before {
            self.0.unconfirmed.dec_by(gauge_delta(mark - before));
        }
    }

    /// How many alerts are confirmed.
    pub fn confirmed(&self) -> u64 {
        self.0.confirmed.load(Ordering::Acquire)
    }

    /// The connection dropped: what was handed over since the last
    /// confirmation may be lost. Returns that number, also added to the
    /// counter.
    pub fn disconnected(&self) -> u64 {
        let handed = self.0.handed.load(Ordering::Acquire);
        let before = self.0.confirmed.fetch_max(handed, Ordering::AcqRel);
        let at_risk = handed.saturating_sub(before);
        self.0.possibly_lost.inc_by(at_risk);
        self.0.unconfirmed.dec_by(gauge_delta(at_risk));
        at_risk
    }

    /// Confirms the handed-over count every [`CONFIRM_EVERY`] with a round
    /// trip through our own inbox, until the task is dropped.
    pub async fn confirm_forever(self, client: Client) {
        let mut interval = tokio::time::interval(CONFIRM_EVERY);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let mark = self.mark();
            if mark > self.confirmed() && round_trip(&client).await.is_ok() {
                self.confirm(mark);
            }
        }
    }
}

fn gauge_delta(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_was_unconfirmed_when_the_connection_dropped() {
        let lost = Counter::default();
        let unconfirmed = Gauge::default();
        let ledger = DeliveryLedger::new(lost.clone(), unconfirmed.clone());
        unconfirmed.set(20);
        for _ in 0..10 {
            ledger.handed();
        }
        ledger.confirm(ledger.mark());
        for _ in 0..7 {
            ledger.handed();
        }
        assert_eq!(ledger.disconnected(), 7);
        // A late echo of an earlier mark changes nothing.
        ledger.confirm(10);
        assert_eq!(ledger.confirmed(), 17);
        assert_eq!(ledger.disconnected(), 0);
        for _ in 0..3 {
            ledger.handed();
        }
        assert_eq!(ledger.disconnected(), 3);
        assert_eq!(lost.get(), 10);
        assert_eq!(
            unconfirmed.get(),
            0,
            "every alert confirmed or counted lost"
        );
    }
}
