//! Observability shared by every subcommand: logging set-up, Prometheus
//! metrics, and the HTTP listener with `/healthz`, `/readyz` and `/metrics`.

pub mod health;
pub mod logging;
pub mod metrics;
