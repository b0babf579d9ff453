//! The responders' shared buckets (`--kv-*`, `--pause-bucket`), `pause`,
//! `resume` and `keygen`.

use std::path::PathBuf;

use clap::Args;

use super::nats::NatsArgs;
use crate::respond::control::{self, ControlOptions};

/// A `--kv-key-file` that gives no seal.
#[derive(Debug, thiserror::Error)]
pub enum KvArgsError {
    #[error("cannot read --kv-key-file {path:?}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--kv-key-file {path:?} holds {len} bytes; at least 16 are needed (every responder the same; `openssl rand -hex 32` makes one)")]
    ShortKey { path: PathBuf, len: usize },
}

/// The key-value buckets the responders share (kill switch, rate limit).
#[derive(Debug, Clone, Args)]
pub struct KvArgs {
    /// JetStream key-value bucket of the shared rate limit
    #[arg(long, env = "FALCO_NATS_KV_BUCKET", default_value = control::DEFAULT_BUCKET)]
    pub kv_bucket: String,
    /// JetStream key-value bucket of the kill switch (responders only read it)
    #[arg(long, env = "FALCO_NATS_PAUSE_BUCKET", default_value = control::DEFAULT_PAUSE_BUCKET)]
    pub pause_bucket: String,
    /// A file with the secret the responders seal their shared records
    /// with (at least 16 bytes; every replica the same): records written
    /// by anyone else are not believed
    #[arg(long, env = "FALCO_NATS_KV_KEY_FILE")]
    pub kv_key_file: Option<PathBuf>,
    /// Replicas of those buckets when they are created (3 on a clustered JetStream)
    #[arg(long, env = "FALCO_NATS_KV_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub kv_replicas: u8,
}

impl KvArgs {
    pub fn options(&self) -> Result<ControlOptions, KvArgsError> {
        let record_key = match &self.kv_key_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| KvArgsError::Read {
                    path: path.clone(),
                    source,
                })?;
                let key = text.trim().as_bytes().to_vec();
                if key.len() < 16 {
                    return Err(KvArgsError::ShortKey {
                        path: path.clone(),
                        len: key.len(),
                    });
                }
                Some(key)
            }
        };
        Ok(ControlOptions {
            bucket: self.kv_bucket.clone(),
            pause_bucket: self.pause_bucket.clone(),
            replicas: usize::from(self.kv_replicas),
            record_key,
        })
    }
}

/// `pause` and `resume`.
#[derive(Debug, Clone, Args)]
pub struct PauseArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Why (kept with the state, shown by --status and in /readyz)
    #[arg(long, env = "FALCO_NATS_PAUSE_REASON", default_value = "")]
    pub reason: String,
    /// Only print the kill switch's state (exit code 0 running, 3 paused)
    #[arg(long, env = "FALCO_NATS_PAUSE_STATUS")]
    pub status: bool,
}

/// `keygen`: a new NKey seed for the bridge, or the public key of one.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct KeygenArgs {
    /// Write a new seed to this file (mode 0600; never overwritten) and
    /// print its public key
    #[arg(long, env = "FALCO_NATS_KEYGEN_OUT", value_name = "SEED_FILE")]
    pub out: Option<PathBuf>,
    /// Print the public key of the seed in this file
    #[arg(long, env = "FALCO_NATS_KEYGEN_PUBLIC", value_name = "SEED_FILE")]
    pub public: Option<PathBuf>,
}
