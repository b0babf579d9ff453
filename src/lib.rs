//! falco-nats: carries Falco's runtime-security alerts onto NATS, and acts on them.
//!
//! The library holds every component; `main.rs` only parses the command line
//! and calls into it, so tests start the real thing in-process.
//!
//! # Layout
//!
//! | module | job |
//! | --- | --- |
//! | [`cli`] | the command line, a file a subcommand: flags and their environment variables, turned into each module's options (no other module knows clap) |
//! | [`bridge`] | `bridge`: one input, a bounded queue, one publisher, the drain on shutdown |
//! | [`input`] | the inputs (`grpc`, `fifo`, `http`, `stdin`) and the [`input::AlertSink`] they fill |
//! | [`proto`], [`convert`] | Falco's gRPC API, and its responses turned into Falco's JSON |
//! | [`mod@format`] | `--format`: the alert as Falco wrote it, or as falcosidekick publishes it |
//! | [`event`], [`scan`] | [`event::FalcoEvent`]: an alert on the bridge's side, its JSON kept as it came; the one-pass check that reads its four fields |
//! | [`nats`] | the one connection ([`nats::NatsOptions`]), subjects, the headers, the publisher: core NATS, or JetStream (the stream, one ack each, fast batches) |
//! | [`alert`], [`decision`] | the read side: an alert and a responder's decision as typed values |
//! | [`respond`] | `respond`: the options and `run`; the [`respond::responder::Responder`] (one alert, a decision per action); the consumers that settle messages; one vocabulary of outcomes ([`respond::outcome`]); policy, rails and the guard chain; the Kubernetes calls; the audit of every decision; the shared guards' records ([`respond::control`]) and the `pause`/`resume` commands ([`respond::kill_switch`]) |
//! | [`signing`] | signed alerts (`--sign-key`, `--verify-key`) and the clock they are dated in |
//! | [`tail`] | `tail`: alerts and decisions printed readably |
//! | [`ui`] | `ui`: the live page of alerts and decisions, its event stream and ring |
//! | [`sources`], [`kubernetes`] | `sources`: the hub stream's sources kept equal to the nodes (the leaf layout); the Kubernetes client the responder and it make |
//! | [`simulate`] | a Falco stand-in (gRPC, FIFO, `http_output`; 0.44's and 0.45's hostile strings) and a Kubernetes API stand-in |
//! | [`server`], [`telemetry`], [`drain`] | the `--listen` server (the HTTP input's `POST /` answered before its router), probes, metrics, logs; the shutdown deadline |
//! | [`priority`], [`backoff`] | Falco's priorities; reconnect back-off |
//!
//! Dependencies run one way: no import circle between these modules nor
//! between their files, and clap only in `cli/` and `main.rs`
//! (`tests/it/architecture.rs`).
//!
//! One alert from an input to NATS: an input reads a line, a body or a gRPC
//! response ([`convert`] makes the JSON) → [`event::FalcoEvent::from_json`]
//! → [`input::AlertSink::offer`] (filter, queue; or count and log the
//! rejection) → [`nats::Publisher`]
//! (subject from [`nats::subject::SubjectTemplate`], headers, publish or
//! JetStream ack).
//!
//! From NATS to a decision: [`respond`] takes the message →
//! [`alert::Alert::from_json`] and [`alert::Alert::pod`] (names checked) →
//! [`respond::policy::Policy::evaluate`] → per action, the guard chain
//! ([`respond::guards::Chain::pass`]: the rails, the claim, a read of the
//! pod, healthy replicas, the kill switch, the budget) and its
//! [`respond::guards::Permit`], the API call → a
//! [`respond::outcome::Verdict`] written into a [`decision::Decision`] →
//! [`respond::audit::Audit::record`] (NATS result, metric, log, Event).

#![forbid(unsafe_code)]

pub mod alert;
pub mod backoff;
pub mod bridge;
pub mod cli;
pub mod convert;
pub mod decision;
pub mod drain;
pub mod event;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod input;
pub mod kubernetes;
pub mod nats;
pub mod priority;
pub mod proto;
pub mod respond;
pub mod scan;
pub mod server;
pub mod signing;
pub mod simulate;
pub mod sources;
pub mod tail;
pub mod telemetry;
pub mod ui;
