//! [`MockFalco`]: Falco's gRPC outputs and version services on a Unix
//! socket, with Falco's behaviour: one global queue (each alert goes to
//! exactly one client, and waits while none is connected), `sub` polled by
//! the client's requests, `get` draining the queue, and streams that end
//! when Falco reloads (`end_streams`) or stops (`stop`).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status, Streaming};

use crate::proto::outputs::service_server::{
    Service as OutputsApi, ServiceServer as OutputsServer,
};
use crate::proto::outputs::{Request, Response};
use crate::proto::version::service_server::{
    Service as VersionApi, ServiceServer as VersionServer,
};
use crate::proto::version::{Request as VersionRequest, Response as VersionResponse};

/// The version the mock reports: the last Falco with the gRPC output.
pub const MOCK_VERSION: (u32, u32, u32) = (0, 43, 0);

/// Falco's one queue of alerts, shared by every client.
#[derive(Default)]
struct AlertQueue {
    items: Mutex<VecDeque<Response>>,
}

impl AlertQueue {
    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<Response>> {
        self.items
            .lock()
            .expect("no code panics while holding the mock Falco's queue")
    }

    fn pop(&self) -> Option<Response> {
        self.items().pop_front()
    }

    fn push(&self, response: Response) {
        self.items().push_back(response);
    }

    fn len(&self) -> usize {
        self.items().len()
    }
}

#[derive(Clone)]
struct Outputs {
    queue: Arc<AlertQueue>,
    /// Cancelled to end the open streams (a reload); replaced afterwards.
    streams: Arc<Mutex<CancellationToken>>,
}

impl Outputs {
    fn streams(&self) -> std::sync::MutexGuard<'_, CancellationToken> {
        self.streams
            .lock()
            .expect("no code panics while holding the mock Falco's stream token")
    }

    fn stream_token(&self) -> CancellationToken {
        self.streams().clone()
    }

    /// Sends queued alerts until the queue is empty. Each alert is popped only
    /// once there is room to send it, so ending a stream loses nothing.
    /// Returns `false` when the stream must end.
    async fn drain(
        &self,
        tx: &mpsc::Sender<Result<Response, Status>>,
        end: &CancellationToken,
    ) -> bool {
        loop {
            let permit = tokio::select! {
                permit = tx.reserve() => match permit {
                    Ok(p) => p,
                    Err(_) => return false,
                },
                _ = end.cancelled() => return false,
            };
            match self.queue.pop() {
                Some(alert) => permit.send(Ok(alert)),
                None => return true,
            }
        }
    }
}

/// The response stream of `sub` and `get`.
pub type AlertStream = Pin<Box<dyn Stream<Item = Result<Response, Status>> + Send>>;

/// Like Falco's C++ server, which sends the response headers with the first
/// message: the call is answered only once the first alert (or the end of
/// the stream) is there.
async fn first_then_rest(mut rx: mpsc::Receiver<Result<Response, Status>>) -> AlertStream {
    match rx.recv().await {
        Some(first) => Box::pin(tokio_stream::once(first).chain(ReceiverStream::new(rx))),
        None => Box::pin(tokio_stream::empty()),
    }
}

#[tonic::async_trait]
impl OutputsApi for Outputs {
    type subStream = AlertStream;
    type getStream = AlertStream;

    async fn sub(
        &self,
        request: GrpcRequest<Streaming<Request>>,
    ) -> Result<GrpcResponse<Self::subStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        let end = self.stream_token();
        // Requests are taken off the connection as they come (gRPC's C++
        // transport buffers them; h2 would close a connection whose small
        // frames pile up unread) and answered in order, one drain each.
        let (polls, mut polled) = mpsc::unbounded_channel::<()>();
        let reading = end.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = requests.message() => next,
                    _ = reading.cancelled() => break,
                };
                match next {
                    Ok(Some(_)) if polls.send(()).is_ok() => {}
                    // The client closed its side, or went away.
                    _ => break,
                }
            }
        });
        tokio::spawn(async move {
            // Falco's server answers a request with its queue, so a fresh
            // `sub` call gets its first response only after a request.
            loop {
                let next = tokio::select! {
                    next = polled.recv() => next,
                    _ = end.cancelled() => break,
                };
                if next.is_none() || !this.drain(&tx, &end).await {
                    break;
                }
            }
        });
        Ok(GrpcResponse::new(first_then_rest(rx).await))
    }

    async fn get(
        &self,
        _request: GrpcRequest<Request>,
    ) -> Result<GrpcResponse<Self::getStream>, Status> {
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        let end = self.stream_token();
        tokio::spawn(async move {
            this.drain(&tx, &end).await;
        });
        Ok(GrpcResponse::new(first_then_rest(rx).await))
    }
}

struct Version;

#[tonic::async_trait]
impl VersionApi for Version {
    async fn version(
        &self,
        _request: GrpcRequest<VersionRequest>,
    ) -> Result<GrpcResponse<VersionResponse>, Status> {
        let (major, minor, patch) = MOCK_VERSION;
        Ok(GrpcResponse::new(VersionResponse {
            version: format!("{major}.{minor}.{patch}"),
            major,
            minor,
            patch,
            engine_version: "0.52.0".into(),
            engine_major: 0,
            engine_minor: 52,
            engine_patch: 0,
            ..Default::default()
        }))
    }
}

/// Queues alerts into a [`MockFalco`]'s queue.
#[derive(Clone)]
pub struct Feeder(Arc<AlertQueue>);

impl Feeder {
    pub fn push(&self, alert: Response) {
        self.0.push(alert);
    }

    /// Alerts queued and not yet sent.
    pub fn queued(&self) -> usize {
        self.0.len()
    }
}

/// A running gRPC server.
struct Running {
    stop: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// A stand-in for Falco's gRPC server on a Unix socket.
pub struct MockFalco {
    socket: PathBuf,
    outputs: Outputs,
    running: Option<Running>,
}

impl MockFalco {
    /// A mock that will serve on `socket` once started.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        MockFalco {
            socket: socket.into(),
            outputs: Outputs {
                queue: Arc::default(),
                streams: Arc::new(Mutex::new(CancellationToken::new())),
            },
            running: None,
        }
    }

    /// Binds the socket (replacing a stale one) and serves.
    pub async fn start(&mut self) -> std::io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket)?;
        let stop = CancellationToken::new();
        let router = tonic::transport::Server::builder()
            .add_service(OutputsServer::new(self.outputs.clone()))
            .add_service(VersionServer::new(Version));
        let task = tokio::spawn(router.serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            stop.clone().cancelled_owned(),
        ));
        self.running = Some(Running { stop, task });
        Ok(())
    }

    /// Ends every open stream and stops serving, like a Falco restart; the
    /// queue is kept. Alerts already handed to a stream are delivered first.
    pub async fn stop(&mut self) {
        self.end_streams();
        if let Some(running) = self.running.take() {
            running.stop.cancel();
            let _ = running.task.await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Ends the open streams but keeps serving (Falco's gRPC server restarting
    /// within one process, as on a hot reload).
    pub fn end_streams(&self) {
        let mut token = self.outputs.streams();
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Queues an alert, as Falco does when a rule fires.
    pub fn push(&self, alert: Response) {
        self.outputs.queue.push(alert);
    }

    /// A handle that queues alerts from another task, also while the
    /// server is stopped (Falco's queue outlives its gRPC server).
    pub fn feeder(&self) -> Feeder {
        Feeder(self.outputs.queue.clone())
    }

    /// Alerts queued and not yet sent to any client.
    pub fn queued(&self) -> usize {
        self.outputs.queue.len()
    }

    /// The socket path.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }
}
