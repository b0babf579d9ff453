//! The probes and scrapes on every `--listen` ([`crate::server`] serves them): `/healthz` (the process runs),
//! `/readyz` (every readiness check passes: input and NATS connected) and
//! `/metrics` (Prometheus). Inputs that speak HTTP add their routes to it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

/// A set of named readiness checks; `/readyz` passes when all are up.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<Vec<(&'static str, ReadyFlag)>>>,
}

/// One readiness check, set by the component it watches.
#[derive(Clone, Default, Debug)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Readiness {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, ReadyFlag)>> {
        self.checks
            .lock()
            .expect("no code panics while holding the readiness checks")
    }

    /// Adds a check, initially not ready.
    pub fn check(&self, name: &'static str) -> ReadyFlag {
        let flag = ReadyFlag::default();
        self.lock().push((name, flag.clone()));
        flag
    }

    /// The names of the checks that are not ready; empty when ready.
    pub fn not_ready(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|(_, f)| !f.get())
            .map(|(n, _)| *n)
            .collect()
    }
}

#[derive(Clone)]
struct HealthState {
    readiness: Readiness,
    registry: Arc<Registry>,
}

/// The probe and metrics routes.
pub fn router(readiness: Readiness, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(HealthState {
            readiness,
            registry,
        })
}

async fn readyz(State(state): State<HealthState>) -> impl IntoResponse {
    let missing = state.readiness.not_ready();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", missing.join(", ")),
        )
    }
}

async fn metrics(State(state): State<HealthState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        super::metrics::render(&state.registry),
    )
}
