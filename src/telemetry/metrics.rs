//! Prometheus metrics of the bridge and of the responder, in the
//! OpenMetrics text format. (The NATS connection's own are
//! [`crate::nats::ConnectionMetrics`], the same for every subcommand.)

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::mpsc;

use crate::event::FalcoEvent;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// One label, with a value from a small fixed set (never a pod or rule name).
pub type Label = [(&'static str, &'static str); 1];

/// The bridge's metrics. Cheap to clone: every metric is shared.
#[derive(Clone)]
pub struct BridgeMetrics {
    /// Alerts read from an input, by input.
    pub received: Family<Label, Counter>,
    /// Alerts queued for NATS (past `--min-priority`), by input and priority.
    pub accepted: Family<[(&'static str, &'static str); 2], Counter>,
    /// Alerts published (core) or stored and acknowledged (JetStream).
    pub published: Counter,
    /// Alerts JetStream had already stored (a re-publish after a reconnect).
    pub duplicates: Counter,
    /// Publish attempts that failed (each JetStream retry counts).
    pub publish_failures: Counter,
    /// Alerts rejected, by reason.
    pub rejected: Family<Label, Counter>,
    /// Alerts below `--min-priority`.
    pub filtered: Counter,
    /// Input reconnects, by input.
    pub input_reconnects: Family<Label, Counter>,
    /// Core NATS: alerts published but not confirmed by the server when the
    /// connection dropped (an upper bound of what was lost).
    pub possibly_lost: Counter,
    /// 1 while the input is connected.
    pub input_connected: Gauge,
    /// Alerts read and not yet confirmed by NATS (JetStream: acknowledged;
    /// core: confirmed by a round trip), nor given up on.
    pub unconfirmed: Gauge,
    /// Time from receiving an alert to publishing it (JetStream: to its ack).
    pub publish_latency: Histogram,
    /// JetStream fast batches that failed part way (their unconfirmed
    /// alerts published again one by one).
    pub fast_batches_failed: Counter,
    /// JetStream fast batches ended and acknowledged whole.
    pub fast_batches: Counter,
}

impl BridgeMetrics {
    /// Creates the metrics and registers them under `falco_nats_`. (Long:
    /// one registration with its help text per metric, nothing else.)
    pub fn new(registry: &mut Registry) -> Self {
        let m = BridgeMetrics {
            received: Family::default(),
            accepted: Family::default(),
            published: Counter::default(),
            duplicates: Counter::default(),
            publish_failures: Counter::default(),
            rejected: Family::default(),
            filtered: Counter::default(),
            input_reconnects: Family::default(),
            possibly_lost: Counter::default(),
            input_connected: Gauge::default(),
            unconfirmed: Gauge::default(),
            publish_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            fast_batches_failed: Counter::default(),
            fast_batches: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("falco_nats");
        r.register(
            "alerts_received",
            "Alerts read from the input",
            m.received.clone(),
        );
        // Every series a dashboard reads shows from the start, at zero.
        for reason in crate::event::AlertError::REASONS {
            drop(m.rejected.get_or_create(&[("reason", reason)]));
        }
        r.register(
            "alerts_accepted",
            "Alerts queued for NATS, by input and priority",
            m.accepted.clone(),
        );
        r.register(
            "alerts_published",
            "Alerts published to NATS (JetStream: acknowledged)",
            m.published.clone(),
        );
        r.register(
            "alerts_duplicate",
            "Alerts JetStream had already stored",
            m.duplicates.clone(),
        );
        r.register(
            "publish_failures",
            "Failed publish attempts",
            m.publish_failures.clone(),
        );
        r.register(
            "alerts_rejected",
            "Alerts rejected, by reason",
            m.rejected.clone(),
        );
        r.register(
            "alerts_filtered",
            "Alerts below the minimum priority",
            m.filtered.clone(),
        );
        r.register(
            "input_reconnects",
            "Reconnects of the input",
            m.input_reconnects.clone(),
        );
        r.register(
            "alerts_possibly_lost",
            "Core NATS: alerts published but not yet confirmed by the server when the connection dropped (an upper bound of what was lost)",
            m.possibly_lost.clone(),
        );
        r.register(
            "input_connected",
            "1 while the input is connected",
            m.input_connected.clone(),
        );
        r.register(
            "alerts_unconfirmed",
            "Alerts read and not yet confirmed by NATS (nor given up on)",
            m.unconfirmed.clone(),
        );
        r.register(
            "publish_latency_seconds",
            "Time from receiving an alert to publishing it",
            m.publish_latency.clone(),
        );
        r.register(
            "jetstream_fast_batches",
            "JetStream fast batches ended and acknowledged whole",
            m.fast_batches.clone(),
        );
        r.register(
            "jetstream_fast_batches_failed",
            "JetStream fast batches that failed part way (their unconfirmed alerts published again one by one)",
            m.fast_batches_failed.clone(),
        );
        m
    }

    /// Counts and logs a rejected alert.
    pub fn reject(&self, input: &'static str, err: &crate::event::AlertError) {
        self.rejected
            .get_or_create(&[("reason", err.reason())])
            .inc();
        // Quoted and escaped: the error may quote what the alert held.
        tracing::error!(input, reason = err.reason(), error = ?crate::telemetry::logging::chain(err), "alert rejected");
    }
}

/// The ui's metrics.
#[derive(Clone, Default)]
pub struct UiMetrics {
    pub clients: Gauge,
    pub dropped: Counter,
    pub events: Family<[(&'static str, &'static str); 1], Counter>,
    pub history: Gauge,
    /// Requests refused for a missing, wrong or repeated token.
    pub auth_failures: Counter,
}

impl UiMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = UiMetrics::default();
        let r = registry.sub_registry_with_prefix("falco_nats_ui");
        r.register(
            "clients",
            "Pages with an open event stream",
            m.clients.clone(),
        );
        r.register(
            "clients_dropped",
            "Pages cut off for falling behind (their browsers reconnect)",
            m.dropped.clone(),
        );
        r.register(
            "events",
            "Alerts and decisions received, by kind",
            m.events.clone(),
        );
        r.register(
            "history_loaded",
            "Messages loaded from the stream at start",
            m.history.clone(),
        );
        r.register(
            "auth_failures",
            "Requests refused for a missing, wrong or repeated token (each answered after a delay that grows with them)",
            m.auth_failures.clone(),
        );
        m
    }
}

/// The responder's metrics.
#[derive(Clone)]
pub struct RespondMetrics {
    pub alerts: Counter,
    pub decisions: Family<[(&'static str, &'static str); 2], Counter>,
    pub latency: Histogram,
    pub event_failures: Counter,
    pub retries: Counter,
    pub bad_signatures: Counter,
    /// 1 for the kill switch's state (running, paused, unknown), 0 for the others.
    /// 1 for the guards' mode (`shared` or `local`).
    pub guards: Family<[(&'static str, &'static str); 1], Gauge>,
    pub kill_switch: Family<[(&'static str, &'static str); 1], Gauge>,
}

impl RespondMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = RespondMetrics {
            alerts: Counter::default(),
            decisions: Family::default(),
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            event_failures: Counter::default(),
            retries: Counter::default(),
            bad_signatures: Counter::default(),
            kill_switch: Family::default(),
            guards: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("falco_nats_respond");
        r.register(
            "alerts",
            "Alerts received by the responder",
            m.alerts.clone(),
        );
        r.register(
            "decisions",
            "Decisions, by action and outcome",
            m.decisions.clone(),
        );
        r.register(
            "decision_latency_seconds",
            "Time from receiving an alert to a decision",
            m.latency.clone(),
        );
        r.register(
            "event_failures",
            "Kubernetes Events that could not be recorded",
            m.event_failures.clone(),
        );
        r.register(
            "kill_switch",
            "The kill switch as this responder knows it: 1 for the current state (running, paused, unknown; off with --guards local)",
            m.kill_switch.clone(),
        );
        r.register(
            "guards",
            "Where the guards keep their state: 1 for the mode (shared: JetStream, every replica; local: this replica only, no kill switch)",
            m.guards.clone(),
        );
        r.register(
            "bad_signatures",
            "Alerts not acted on because their signature is missing or does not verify (--verify-key)",
            m.bad_signatures.clone(),
        );
        r.register(
            "retries",
            "Alerts handed back to JetStream for another delivery after a transient failure",
            m.retries.clone(),
        );
        m
    }
}

/// The `--listen` server's connections: what the limits on stalled and
/// surplus connections did. Unregistered (the default) they count for no
/// one; the bridge registers them, where the server is the HTTP input.
#[derive(Debug, Clone, Default)]
pub struct HttpServerMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed because a request stalled, by phase (`tls`,
    /// `headers`, `body`; `idle`: no next request on a keep-alive
    /// connection in time, or its headers stalled).
    pub stalled: Family<Label, Counter>,
    /// Connections refused at once: `--max-connections` were open.
    pub refused: Counter,
    /// Connections closed to make room for a newer one from the same peer
    /// (IP address), which had its share open.
    pub refused_per_peer: Counter,
}

impl HttpServerMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = HttpServerMetrics::default();
        for phase in ["tls", "headers", "body", "idle"] {
            drop(m.stalled.get_or_create(&[("phase", phase)]));
        }
        let r = registry.sub_registry_with_prefix("falco_nats_http");
        r.register("connections", "HTTP connections open", m.open.clone());
        r.register(
            "stalled",
            "HTTP connections closed because a request did not arrive in time, by phase (idle: no next request on a keep-alive connection)",
            m.stalled.clone(),
        );
        r.register(
            "connections_refused",
            "HTTP connections refused because --max-connections were open",
            m.refused.clone(),
        );
        r.register(
            "connections_refused_per_peer",
            "HTTP connections closed because their peer (IP address) had its share open and opened another: the oldest goes",
            m.refused_per_peer.clone(),
        );
        m
    }

    /// Counts a connection closed in `phase` for stalling.
    pub fn stalled(&self, phase: &'static str) {
        self.stalled.get_or_create(&[("phase", phase)]).inc();
    }
}

/// `falco_nats_queue_depth`: the alerts waiting between input and NATS,
/// read from the queue itself at each scrape (nothing counts them by hand).
/// It holds the queue weakly: the queue still closes when its senders go.
#[derive(Debug)]
pub struct QueueDepth(pub mpsc::WeakSender<FalcoEvent>);

impl Collector for QueueDepth {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let depth = self
            .0
            .upgrade()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity());
        let gauge = ConstGauge::new(i64::try_from(depth).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "falco_nats_queue_depth",
            "Alerts waiting between input and NATS",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// Renders a registry in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}
