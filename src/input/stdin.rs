//! [`StdinInput`]: one JSON alert per line on standard input, for Falco's
//! `program_output` (`program: "falco-nats bridge --input stdin"`,
//! `keep_alive: true`). End of input means Falco stopped: the bridge
//! publishes what it read and exits 0.

use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use super::lines::{Line, LineReader};
use super::{AlertSink, InputError};
use crate::event::AlertError;

/// Reads alerts from a byte stream (standard input) until it ends.
pub struct StdinInput<R> {
    reader: R,
    max_line: usize,
    sink: AlertSink,
}

impl<R: AsyncRead + Unpin> StdinInput<R> {
    pub fn new(reader: R, max_line: usize, sink: AlertSink) -> Self {
        StdinInput {
            reader,
            max_line,
            sink,
        }
    }

    /// Reads until end of input or `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), InputError> {
        self.sink.set_connected(true);
        let mut lines = LineReader::new(self.reader, self.max_line);
        let result = loop {
            let line = tokio::select! {
                line = lines.next_line() => line,
                _ = shutdown.cancelled() => break Ok(()),
            };
            match line {
                Ok(Some(Line::Complete(raw))) => {
                    if self.sink.send_json(raw).await.is_err() {
                        break Ok(());
                    }
                }
                Ok(Some(Line::Oversized(size))) => self.sink.reject(&AlertError::TooLarge {
                    size,
                    limit: self.max_line,
                }),
                Ok(None) => {
                    tracing::info!("end of standard input: Falco stopped");
                    break Ok(());
                }
                Err(source) => {
                    break Err(InputError::Io {
                        what: "standard input".into(),
                        source,
                    })
                }
            }
        };
        self.sink.set_connected(false);
        result
    }
}
