//! The HTTP listener for probes and scrapes: `/healthz` (the process runs),
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
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The default `--listen` address. falcosidekick uses 2801-2803 and Falco's
/// own web server 8765, so falco-nats takes 2810.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:2810";

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
    /// Adds a check, initially not ready.
    pub fn check(&self, name: &'static str) -> ReadyFlag {
        let flag = ReadyFlag::default();
        if let Ok(mut checks) = self.checks.lock() {
            checks.push((name, flag.clone()));
        }
        flag
    }

    /// The names of the checks that are not ready; empty when ready.
    pub fn not_ready(&self) -> Vec<&'static str> {
        self.checks
            .lock()
            .map(|checks| {
                checks
                    .iter()
                    .filter(|(_, f)| !f.get())
                    .map(|(n, _)| *n)
                    .collect()
            })
            .unwrap_or_default()
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

/// Serves `router` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
