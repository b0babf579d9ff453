//! [`FifoInput`]: reads Falco's `file_output` from a named pipe, one JSON
//! alert per line (Falco needs `json_output: true`).
//!
//! The pipe is opened for reading *and* writing, so it always has a writer:
//! when Falco closes it (`keep_alive: false` closes after every alert, a
//! restart closes it once) the read simply waits for the next writer instead
//! of seeing end-of-file and spinning.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::Mode;
use tokio::net::unix::pipe;
use tokio_util::sync::CancellationToken;

use super::{pump_lines, AlertSink, InputError};

/// Default FIFO path, as in the 2018 proof of concept.
pub const DEFAULT_FIFO: &str = "/var/run/falco/nats";

/// Default longest accepted line: 1 MiB.
pub const DEFAULT_MAX_LINE: usize = 1024 * 1024;

/// FIFO input settings.
#[derive(Debug, Clone)]
pub struct FifoOptions {
    pub path: PathBuf,
    /// Create the FIFO (mode 0600) if it does not exist.
    pub create: bool,
    /// Longest accepted line in bytes.
    pub max_line: usize,
}

/// Creates a FIFO (mode 0600) at `path` unless one is there already.
pub fn create_fifo(path: &Path) -> Result<(), InputError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_fifo() => return Ok(()),
        Ok(_) => return Err(InputError::NotAFifo { path: path.into() }),
        Err(_) => {}
    }
    match nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600)) {
        Ok(()) | Err(nix::Error::EEXIST) => {
            tracing::info!(path = %path.display(), "created FIFO");
            Ok(())
        }
        Err(source) => Err(InputError::CreateFifo {
            path: path.into(),
            source,
        }),
    }
}

/// Reads alerts from a FIFO until shut down.
pub struct FifoInput {
    options: FifoOptions,
    sink: AlertSink,
}

impl FifoInput {
    pub fn new(options: FifoOptions, sink: AlertSink) -> Self {
        FifoInput { options, sink }
    }

    /// Makes sure the path is a FIFO, creating it when asked to.
    fn prepare(&self) -> Result<(), InputError> {
        let path = &self.options.path;
        match std::fs::metadata(path) {
            Ok(meta) if meta.file_type().is_fifo() => Ok(()),
            Ok(_) => Err(InputError::NotAFifo { path: path.clone() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !self.options.create {
                    return Err(InputError::FifoMissing { path: path.clone() });
                }
                create_fifo(path)
            }
            Err(source) => Err(InputError::Io {
                what: path.display().to_string(),
                source,
            }),
        }
    }

    /// Reads until `shutdown`; lines already read are queued before returning.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), InputError> {
        self.prepare()?;
        let path = &self.options.path;
        let io_err = |source| InputError::Io {
            what: path.display().to_string(),
            source,
        };
        let receiver = pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(path)
            .map_err(io_err)?;
        tracing::info!(path = %path.display(), max_line = self.options.max_line, "reading Falco alerts from FIFO");
        self.sink.set_connected(true);
        // With the write end held too, the input never ends by itself.
        let result = pump_lines(receiver, self.options.max_line, &self.sink, &shutdown)
            .await
            .map(|_| ())
            .map_err(io_err);
        self.sink.set_connected(false);
        result
    }
}
