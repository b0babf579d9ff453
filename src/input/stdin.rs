//! [`StdinInput`]: one JSON alert per line on standard input, for Falco's
//! `program_output` (`program: "falco-nats bridge --input stdin"`,
//! `keep_alive: true`). End of input means Falco stopped: the bridge
//! publishes what it read and exits 0.

use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use super::{pump_lines, AlertSink, InputError, LinesEnd};

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
