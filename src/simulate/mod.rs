//! `falco-nats simulate`: a Falco stand-in for the demo, the benchmarks and
//! the tests. It serves Falco's gRPC outputs API on a Unix socket
//! ([`falco_grpc::MockFalco`]), writes JSON lines into a FIFO, or posts
//! each alert as Falco's `http_output` does, with
//! realistic alerts from [`alerts::AlertFactory`]; optionally it also serves
//! a Kubernetes API stand-in ([`kube_api::KubeApi`]) holding the pods those
//! alerts name, so the responder can run without a cluster.

pub mod alerts;
pub mod falco_grpc;
mod http_post;
pub mod kube_api;
mod pacer;

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;

use alerts::AlertFactory;
use falco_grpc::MockFalco;
use pacer::Pacer;

/// Where the simulated Falco sends its alerts.
#[derive(Debug, Clone)]
pub enum SimulateOutput {
    /// Serve the gRPC outputs API on this Unix socket.
    Grpc { socket: PathBuf },
    /// Write JSON lines into this FIFO (created if missing).
    Fifo { path: PathBuf },
    /// Post each alert to this URL, as Falco's `http_output` does.
    Http { url: hyper::Uri },
}

/// Simulation settings.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub output: SimulateOutput,
    /// Alerts per second; 0 sends as fast as possible.
    pub rate: f64,
    /// Alerts in all; 0 for no end.
    pub count: u64,
    /// Falco's `json_output`: gRPC `output` holds the JSON line.
    pub json_output: bool,
    pub hostname: String,
    /// End command lines and file names with [`alerts::UNTRUSTED_BYTES`]
    /// as this release writes them.
    pub hostile_strings: Option<alerts::FalcoRelease>,
    /// Also serve a Kubernetes API stand-in with the simulated pods here,
    /// and write a kubeconfig for it to the path.
    pub kube_api: Option<(String, PathBuf)>,
}

/// A simulation that could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("cannot serve on {path:?}: {source}")]
    Serve {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write to FIFO {path:?}: {source}")]
    Fifo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    CreateFifo(#[from] crate::input::InputError),
    #[error(transparent)]
    Url(#[from] http_post::NotHttpUrl),
}

/// Runs the simulated Falco until `shutdown`.
pub async fn run(
    options: SimulateOptions,
    shutdown: CancellationToken,
) -> Result<(), SimulateError> {
    let _kube = match &options.kube_api {
        Some((address, kubeconfig)) => Some(serve_kube_api(address, kubeconfig).await?),
        None => None,
    };
    let mut factory = AlertFactory::new(options.hostname.clone(), options.json_output);
    if let Some(release) = options.hostile_strings {
        factory = factory.with_untrusted_strings(release);
    }
    match &options.output {
        SimulateOutput::Grpc { socket } => {
            let mut falco = MockFalco::new(socket.clone());
            falco.start().await.map_err(|source| SimulateError::Serve {
                path: socket.clone(),
                source,
            })?;
            tracing::info!(socket = %socket.display(), rate = options.rate, count = options.count, "simulated Falco serving gRPC outputs");
            let mut pacer = Pacer::new(options.rate, options.count);
            while pacer.next(&shutdown).await {
                falco.push(factory.next_response());
            }
            let sent = factory.made();
            tracing::info!(sent, "simulated alerts queued; serving until stopped");
            shutdown.cancelled().await;
            falco.stop().await;
        }
        SimulateOutput::Fifo { path } => {
            crate::input::fifo::create_fifo(path)?;
            let mut writer = open_fifo_writer(path, &shutdown).await;
            tracing::info!(path = %path.display(), rate = options.rate, count = options.count, "simulated Falco writing to FIFO");
            let mut pacer = Pacer::new(options.rate, options.count);
            while let Some(w) = writer.as_mut() {
                if !pacer.next(&shutdown).await {
                    break;
                }
                let mut line = factory.next_json();
                line.push('\n');
                if let Err(source) = w.write_all(line.as_bytes()).await {
                    return Err(SimulateError::Fifo {
                        path: path.clone(),
                        source,
                    });
                }
            }
            let sent = factory.made();
            tracing::info!(sent, "simulated alerts written");
            shutdown.cancelled().await;
        }
        SimulateOutput::Http { url } => {
            tracing::info!(%url, rate = options.rate, count = options.count, "simulated Falco posting alerts (http_output)");
            let pacer = Pacer::new(options.rate, options.count);
            http_post::post_alerts(url, &mut factory, pacer, &shutdown).await?;
            let sent = factory.made();
            tracing::info!(sent, "simulated alerts posted");
            shutdown.cancelled().await;
        }
    }
    Ok(())
}

/// Serves the Kubernetes API stand-in holding the pods the alerts name.
async fn serve_kube_api(
    address: &str,
    kubeconfig: &std::path::Path,
) -> Result<kube_api::KubeApi, SimulateError> {
    let api = kube_api::KubeApi::start_on(address)
        .await
        .map_err(|source| SimulateError::Serve {
            path: PathBuf::from(address),
            source,
        })?;
    for pod in alerts::PODS {
        api.add_pod(pod.namespace, pod.name, pod.uid, Some("ReplicaSet"));
    }
    api.write_kubeconfig(kubeconfig)
        .map_err(|source| SimulateError::Serve {
            path: kubeconfig.to_owned(),
            source,
        })?;
    tracing::info!(url = %api.url, kubeconfig = %kubeconfig.display(), "Kubernetes API stand-in serving the simulated pods");
    Ok(api)
}

/// Opens the FIFO for writing, waiting for a reader like Falco does.
async fn open_fifo_writer(
    path: &std::path::Path,
    shutdown: &CancellationToken,
) -> Option<pipe::Sender> {
    loop {
        match pipe::OpenOptions::new().open_sender(path) {
            Ok(sender) => return Some(sender),
            Err(e) => {
                tracing::debug!(error = %e, "FIFO has no reader yet");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    }
}
