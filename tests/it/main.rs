//! The integration tests, in one binary: real nats-servers, the mock
//! Falco on real Unix sockets, real FIFOs and processes, the Kubernetes API
//! stand-in reached by a real `kube::Client`. One module a subject;
//! `support` holds what they share. `cargo test --test it respond::` runs
//! one module.

mod support;

mod admission;
mod architecture;
mod bridge_fifo;
mod bridge_grpc;
mod bridge_http;
mod bridge_jetstream;
mod bridge_stdin;
mod cli;
mod cluster;
mod dashboard;
mod deploy;
mod deploy_helm;
mod deploy_nats;
mod deploy_real;
mod docs;
mod falco_releases;
mod faults;
mod fleet;
mod fuzz_smoke;
mod guards;
mod image;
mod instructions;
mod leaf;
mod respond;
mod respond_kube;
mod security;
mod sources;
mod ui;
