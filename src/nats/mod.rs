//! The NATS side: connection flags in the style of the `nats` CLI, one
//! long-lived connection that reconnects forever, and the [`Publisher`] that
//! turns alerts into messages (core NATS or JetStream).
//!
//! Dependencies run one way, and a test holds them to it:
//! `publisher` → `jetstream` → `stream`, `fast_batch`, `acks`;
//! `publisher`, `jetstream`, `fast_batch` → `headers` → `memo`;
//! `connection` → `ledger` → `round_trip`; `subject` stands alone.

mod acks;
mod connection;
pub mod fast_batch;
mod headers;
mod jetstream;
mod ledger;
mod memo;
mod publisher;
mod round_trip;
mod stream;
pub mod subject;

pub use connection::{
    connect, ConnectionMetrics, ConnectionWatch, NatsConnection, NatsError, NatsOptions,
};
pub use fast_batch::FastBatches;
pub use headers::alert_headers;
pub use jetstream::JetStreamOptions;
pub use ledger::DeliveryLedger;
pub use publisher::{PublishOptions, Publisher};
pub use round_trip::{round_trip, RoundTripError};
pub use stream::StreamMismatch;
pub use subject::SubjectTemplate;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// Each module of `nats/` and the modules of `nats/` it uses.
    fn graph() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
        let sources: [(&str, &str); 12] = [
            ("acks", include_str!("acks.rs")),
            ("connection", include_str!("connection.rs")),
            ("fast_batch", include_str!("fast_batch.rs")),
            ("headers", include_str!("headers.rs")),
            ("jetstream", include_str!("jetstream.rs")),
            ("ledger", include_str!("ledger.rs")),
            ("memo", include_str!("memo.rs")),
            ("publisher", include_str!("publisher.rs")),
            ("round_trip", include_str!("round_trip.rs")),
            ("stream", include_str!("stream.rs")),
            ("subject", include_str!("subject.rs")),
            ("mod", ""),
        ];
        let names: Vec<&str> = sources.iter().map(|(n, _)| *n).collect();
        let mut graph = BTreeMap::new();
        for (name, text) in sources {
            // The module's own code, not its tests.
            let code = text.split("#[cfg(test)]").next().unwrap_or(text);
            let uses: BTreeSet<&str> = names
                .iter()
                .copied()
                .filter(|other| {
                    *other != name
                        && (code.contains(&format!("crate::nats::{other}::"))
                            || code.contains(&format!("super::{other}::"))
                            || code.contains(&format!("super::{other}::{{")))
                })
                .collect();
            graph.insert(name, uses);
        }
        graph
    }

    #[test]
    fn dependencies_run_one_way() {
        let graph = graph();
        // Depth-first: a module met again on the path is a circle.
        fn visit<'a>(
            node: &'a str,
            graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
            path: &mut Vec<&'a str>,
            done: &mut BTreeSet<&'a str>,
        ) {
            if let Some(at) = path.iter().position(|n| *n == node) {
                panic!("an import circle in nats/: {:?}", &path[at..]);
            }
            if !done.insert(node) {
                return;
            }
            path.push(node);
            for next in &graph[node] {
                visit(next, graph, path, done);
            }
            path.pop();
        }
        let mut done = BTreeSet::new();
        for node in graph.keys() {
            visit(node, &graph, &mut Vec::new(), &mut done);
        }
        // The layering the module note describes.
        assert!(graph["publisher"].contains("jetstream"));
        assert!(graph["fast_batch"].contains("headers"));
        assert!(!graph["fast_batch"].contains("publisher"));
    }
}
