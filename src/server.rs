//! The HTTP server every subcommand's `--listen` runs: plain or TLS
//! (optionally asking for client certificates), HTTP/1.1 only (what Falco
//! speaks), with a time limit on a request's headers and a shutdown that
//! closes connections after a grace period. What it serves is the caller's
//! [`Endpoints`]: a router (probes, metrics), and a [`Route`] answered
//! before it (the bridge's HTTP input hands in its alert endpoint). Each request the
//! router gets carries a [`VerifiedClientCertificate`] extension when its
//! connection presented a verified client certificate.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use futures_util::future::{Either, FutureExt};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::telemetry::metrics::HttpServerMetrics;

/// An endpoint answered before the router, without its layers (the
/// bridge's `POST /`, every alert's path): the caller hands it in, so the
/// server knows nothing of what it does.
pub trait Route: Clone + Send + Sync + 'static {
    /// Whether `request` is this route's.
    fn takes(&self, request: &hyper::Request<hyper::body::Incoming>) -> bool;
    /// Answers it; `verified` when its connection presented a client
    /// certificate the server verified.
    fn answer(
        self,
        request: hyper::Request<hyper::body::Incoming>,
        verified: bool,
    ) -> impl std::future::Future<Output = axum::response::Response> + Send;
}

/// No route before the router: the probes-only servers.
#[derive(Clone, Copy)]
pub enum NoRoute {}

impl Route for NoRoute {
    fn takes(&self, _: &hyper::Request<hyper::body::Incoming>) -> bool {
        match *self {}
    }

    async fn answer(
        self,
        _: hyper::Request<hyper::body::Incoming>,
        _: bool,
    ) -> axum::response::Response {
        match self {}
    }
}

/// What the `--listen` server answers: the router, and the route answered
/// before it if there is one.
#[derive(Clone)]
pub struct Endpoints<R: Route = NoRoute> {
    router: Router,
    first: Option<R>,
}

impl<R: Route> Endpoints<R> {
    /// `first` answers the requests it takes; `router` all others.
    pub fn with_route(router: Router, first: R) -> Self {
        Endpoints {
            router,
            first: Some(first),
        }
    }
}

impl From<Router> for Endpoints<NoRoute> {
    fn from(router: Router) -> Self {
        Endpoints {
            router,
            first: None,
        }
    }
}

/// On a request whose connection presented a client certificate that the
/// `--tls-client-ca` verified (a certificate that does not verify ends the
/// TLS handshake, so no request comes from it); absent otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedClientCertificate;

/// Serves one connection (after its TLS handshake, with `tls`) until it
/// ends or the graceful shutdown closes it.
async fn connection<R: Route>(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    endpoints: Endpoints<R>,
    tls: Option<TlsAcceptor>,
    limits: Arc<ServerLimits>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    // Whether a request was served: a time-out after one is an idle
    // keep-alive connection (or a next request that stalled), before any
    // a request whose headers never came.
    let served = Arc::new(AtomicBool::new(false));
    let mark = Arc::clone(&served);
    let service = |verified: bool| {
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            mark.store(true, Ordering::Relaxed);
            match &endpoints.first {
                Some(first) if first.takes(&request) => {
                    Either::Left(first.clone().answer(request, verified).map(Ok))
                }
                _ => {
                    if verified {
                        request.extensions_mut().insert(VerifiedClientCertificate);
                    }
                    Either::Right(endpoints.router.clone().oneshot(request))
                }
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let result = match tls {
        None => {
            let conn = builder.serve_connection(TokioIo::new(tcp), service(false));
            watcher.watch(conn.into_owned()).await
        }
        Some(acceptor) => {
            let handshake = tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp)).await;
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    limits.metrics.stalled("tls");
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let verified = stream.get_ref().1.peer_certificates().is_some();
            let conn = builder.serve_connection(TokioIo::new(stream), service(verified));
            watcher.watch(conn.into_owned()).await
        }
    };
    if let Err(e) = result {
        let timed_out = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        if timed_out {
            limits.metrics.stalled(if served.load(Ordering::Relaxed) {
                "idle"
            } else {
                "headers"
            });
        }
        tracing::debug!(%peer, error = %e, timed_out, "connection ended with an error");
    }
}

/// Small answers go out at once: Falco waits for each before its next POST.
fn no_delay(tcp: &tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}

/// A TLS set-up that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate {path:?}: {source}")]
    Cert {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("cannot read the TLS key {path:?}: {source}")]
    Key {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("cannot read the client CA {path:?}: {source}")]
    ClientCa {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("no usable CA certificate in the client CA {path:?}: {source}")]
    ClientVerifier {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("invalid TLS certificate or key: {0}")]
    Config(#[from] rustls::Error),
}

/// A TLS acceptor from PEM files (a certificate chain and its private key),
/// with the ring crypto provider. With `client_ca`, clients are asked for
/// a certificate: one that this CA did not sign ends the handshake, and a
/// connection without one is let in, its requests without
/// [`VerifiedClientCertificate`], so that the probes still answer the kubelet (which has no
/// certificate) and the routes that need one refuse it.
pub fn tls_acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert {
            path: cert.to_owned(),
            source,
        })?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.to_owned(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Verifies client certificates against the CA certificates in `path`;
/// a client without one is let through (see [`tls_acceptor`]).
fn client_verifier(
    path: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let read_error = |source| TlsError::ClientCa {
        path: path.to_owned(),
        source,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(read_error)? {
        // A certificate the store cannot take is left out; an empty store
        // is refused by the builder below.
        let _ = roots.add(cert.map_err(read_error)?);
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .allow_unauthenticated()
        .build()
        .map_err(|source| TlsError::ClientVerifier {
            path: path.to_owned(),
            source,
        })
}

/// What the `--listen` server allows a connection.
#[derive(Debug, Clone, Default)]
pub struct ServerLimits {
    /// Longest time for a TLS handshake, and for a request's headers. On
    /// a keep-alive connection the clock starts when the previous answer
    /// is sent, so this is also how long a connection may stay idle.
    pub header_timeout: Duration,
    /// Connections served at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Connections served at once from one peer (IP address; an IPv4
    /// address mapped into IPv6 counts as itself): a new one beyond it
    /// closes that peer's oldest, so one client cannot fill
    /// `max_connections`, nor keep a newer client of the same address (the
    /// kubelet, on the node's address) out (0: no limit of its own).
    pub max_per_peer: usize,
    pub metrics: HttpServerMetrics,
}

impl ServerLimits {
    /// The limits of the probes-and-metrics servers (`respond`, `tail`,
    /// `ui`): a kubelet's probe or a scrape sends its request at once, so
    /// the header time-out is short, and no one peer may hold more than
    /// [`PROBES_MAX_PER_PEER`] connections: a pod that opens a thousand
    /// idle ones does not keep the kubelet's probes out.
    pub fn probes(metrics: HttpServerMetrics) -> Self {
        ServerLimits {
            header_timeout: PROBES_HEADER_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_peer: PROBES_MAX_PER_PEER,
            metrics,
        }
    }

    /// The same, with another share per peer (the ui: its pages' event
    /// streams, all from one proxy's address behind an Ingress).
    pub fn probes_with_share(metrics: HttpServerMetrics, max_per_peer: usize) -> Self {
        ServerLimits {
            max_per_peer,
            ..Self::probes(metrics)
        }
    }
}

/// A probes server's header time-out.
pub const PROBES_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections one peer may hold open on a probes server.
pub const PROBES_MAX_PER_PEER: usize = 32;

/// Connections open per peer address, oldest first, for
/// [`ServerLimits::max_per_peer`]: each its number and the token that
/// closes it.
#[derive(Default)]
struct PerPeer(
    std::sync::Mutex<
        std::collections::HashMap<
            std::net::IpAddr,
            std::collections::VecDeque<(u64, CancellationToken)>,
        >,
    >,
);

/// The address a peer counts as: an IPv4 address mapped into IPv6 as itself.
fn peer_address(peer: std::net::SocketAddr) -> std::net::IpAddr {
    match peer.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    }
}

impl PerPeer {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<
            std::net::IpAddr,
            std::collections::VecDeque<(u64, CancellationToken)>,
        >,
    > {
        self.0
            .lock()
            .expect("no code panics while holding the per-peer connections")
    }

    /// Counts connection `id` from `peer`; when that peer had `max` open
    /// (0: no limit), its oldest is closed to make room: the token closing
    /// it.
    fn take(
        &self,
        peer: std::net::IpAddr,
        id: u64,
        close: CancellationToken,
        max: usize,
    ) -> Option<CancellationToken> {
        let mut map = self.lock();
        let open = map.entry(peer).or_default();
        let evicted = (max > 0 && open.len() >= max)
            .then(|| open.pop_front().map(|(_, token)| token))
            .flatten();
        open.push_back((id, close));
        evicted
    }

    fn give_back(&self, peer: std::net::IpAddr, id: u64) {
        let mut map = self.lock();
        if let Some(open) = map.get_mut(&peer) {
            open.retain(|(n, _)| *n != id);
            if open.is_empty() {
                map.remove(&peer);
            }
        }
    }
}

/// The `--listen` server of a subcommand, if it has one: started, and
/// stopped when the subcommand is done.
pub struct Listen {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Listen {
    pub fn start<R: Route>(
        listener: Option<TcpListener>,
        endpoints: Endpoints<R>,
        tls: Option<TlsAcceptor>,
        limits: ServerLimits,
        grace: Duration,
    ) -> Self {
        let stop = CancellationToken::new();
        let task = listener.map(|listener| {
            tokio::spawn(serve(listener, endpoints, tls, limits, stop.clone(), grace))
        });
        Listen { stop, task }
    }

    /// The probes-and-metrics server of `respond`, `tail` and `ui`: plain
    /// HTTP, [`ServerLimits::probes`], a second's grace at the end.
    /// `metrics`: registered where its `/metrics` shows them.
    pub fn probes(
        listener: Option<TcpListener>,
        router: Router,
        metrics: HttpServerMetrics,
    ) -> Self {
        Listen::start(
            listener,
            Endpoints::from(router),
            None,
            ServerLimits::probes(metrics),
            Duration::from_secs(1),
        )
    }

    /// Stops serving (after the grace period) and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

/// How long a client may take to send a request's headers (and to wait
/// before its next request). Falco sends a whole request at once; a client
/// that does not is cut off.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once by default: Falco holds one per node.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Serves `router` (HTTP/1.1 only, which is what Falco speaks; over TLS
/// with `tls`) until `stop` is cancelled. Then requests under way may
/// finish for `grace`; after it, every connection still open is closed,
/// however little of a request its client has sent.
pub async fn serve<R: Route>(
    listener: TcpListener,
    endpoints: Endpoints<R>,
    tls: Option<TlsAcceptor>,
    limits: ServerLimits,
    stop: CancellationToken,
    grace: Duration,
) -> std::io::Result<()> {
    let limits = Arc::new(limits);
    let per_peer = Arc::new(PerPeer::default());
    let mut next_id: u64 = 0;
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = stop.cancelled() => break,
        };
        // Counted by the connections themselves: a task that ended is not
        // open, whether or not it was reaped from the set yet.
        let open_now = usize::try_from(limits.metrics.open.get()).unwrap_or(0);
        if open_now >= limits.max_connections {
            // Closed at once: a flood of idle connections cannot starve
            // the senders already connected.
            limits.metrics.refused.inc();
            tracing::debug!(%peer, max = limits.max_connections, "connection refused: --max-connections are open");
            drop(tcp);
            continue;
        }
        next_id += 1;
        let id = next_id;
        let close = CancellationToken::new();
        let address = peer_address(peer);
        if let Some(oldest) = per_peer.take(address, id, close.clone(), limits.max_per_peer) {
            limits.metrics.refused_per_peer.inc();
            tracing::debug!(%peer, max = limits.max_per_peer, "its peer had its share open: its oldest connection closed");
            oldest.cancel();
        }
        no_delay(&tcp);
        let open = limits.metrics.open.clone();
        open.inc();
        let peers = Arc::clone(&per_peer);
        let conn = connection(
            tcp,
            peer,
            endpoints.clone(),
            tls.clone(),
            Arc::clone(&limits),
            graceful.watcher(),
        );
        connections.spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = close.cancelled() => {}
            }
            open.dec();
            peers.give_back(address, id);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(open = connections.len(), ?grace, "HTTP connections still open at the shutdown deadline; closing them");
        }
    }
    connections.shutdown().await;
    Ok(())
}
