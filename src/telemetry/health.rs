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
/// Details (a state worth seeing, such as the responders' kill switch)
/// follow on their own lines either way.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<Vec<(&'static str, ReadyFlag)>>>,
    details: Arc<Mutex<Vec<(&'static str, Detail)>>>,
}

/// One line of `/readyz` details, set by the component it describes.
#[derive(Clone, Default, Debug)]
pub struct Detail(Arc<Mutex<String>>);

impl Detail {
    pub fn set(&self, text: String) {
        *self
            .0
            .lock()
            .expect("no code panics while holding a detail") = text;
    }

    pub fn get(&self) -> String {
        self.0
            .lock()
            .expect("no code panics while holding a detail")
            .clone()
    }
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

    /// Adds a detail line `name: ...`, empty until set.
    pub fn detail(&self, name: &'static str) -> Detail {
        let detail = Detail::default();
        self.details
            .lock()
            .expect("no code panics while holding the details")
            .push((name, detail.clone()));
        detail
    }

    /// The detail lines, `name: text`.
    pub fn details(&self) -> String {
        let details = self
            .details
            .lock()
            .expect("no code panics while holding the details");
        let mut out = String::new();
        for (name, detail) in details.iter() {
            out += &format!("{name}: {}\n", detail.get());
        }
        out
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
    let details = state.readiness.details();
    if missing.is_empty() {
        (StatusCode::OK, format!("ready\n{details}"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n{details}", missing.join(", ")),
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
