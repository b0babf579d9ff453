//! [`StdinInput`]: one JSON alert per line on standard input, for Falco's
//! `program_output` (`program: "falco-nats bridge --input stdin"`,
//! `keep_alive: true`). End of input means Falco stopped: the bridge
//! publishes what it read and exits 0.

use std::os::fd::AsFd;
use std::pin::Pin;

use tokio::io::AsyncRead;
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;

use super::{pump_lines, AlertSink, InputError, LinesEnd};

/// Standard-input settings.
#[derive(Debug, Clone)]
pub struct StdinOptions {
    /// Longest accepted line in bytes.
    pub max_line: usize,
}

/// Standard input as an async reader. A pipe (what Falco's `program_output`
/// gives) is read without blocking, so a shutdown stops the read at once and
/// no line is read after it. Anything else (a file, a terminal) falls back
/// to tokio's blocking reader; the process does not wait for that thread at
/// exit.
pub fn open() -> Pin<Box<dyn AsyncRead + Send>> {
    let pipe = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(pipe::Receiver::from_file);
    match pipe {
        Ok(receiver) => Box::pin(receiver),
        Err(e) => {
            tracing::debug!(error = %e, "standard input is not a pipe; reading it with a blocking thread");
            Box::pin(tokio::io::stdin())
        }
    }
}

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
        let result = match pump_lines(self.reader, self.max_line, &self.sink, &shutdown).await {
            Ok(LinesEnd::EndOfInput) => {
                tracing::info!("end of standard input: Falco stopped");
                Ok(())
            }
            Ok(LinesEnd::Stopped) => Ok(()),
            Err(source) => Err(InputError::Io {
                what: "standard input".into(),
                source,
            }),
        };
        self.sink.set_connected(false);
        result
    }
}
