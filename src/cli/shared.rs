//! What more than one subcommand takes: `--listen`, the HTTP bearer token,
//! sizes.

use std::path::PathBuf;

use clap::Args;

/// A `--listen` value: an address, or `None` for `off` (or empty).
pub(super) fn listen_address(value: &str) -> Option<&str> {
    match value.trim() {
        "" | "off" | "none" => None,
        addr => Some(addr),
    }
}

/// A token flag or file that gives no token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0} is empty: give a token, or leave the flag out to accept alerts without one")]
    Empty(&'static str),
    #[error("cannot read the token file {path:?}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The bearer token HTTP clients must present: the bridge's HTTP input
/// (`--input http`), the ui's page and its events.
#[derive(Debug, Clone, Args)]
pub struct HttpTokenArgs {
    /// Bearer token HTTP clients must present: senders to the bridge's
    /// --input http (Falco's own http_output cannot send one: use TLS
    /// client certificates there), the ui's page (opened as /?token=...)
    #[arg(long, env = "FALCO_NATS_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// File holding that token (a mounted Secret)
    #[arg(
        long,
        env = "FALCO_NATS_HTTP_TOKEN_FILE",
        conflicts_with = "http_token"
    )]
    pub http_token_file: Option<PathBuf>,
}

impl HttpTokenArgs {
    /// The token, from the flag or the file. An empty one is an error: it
    /// must not silently turn authentication off.
    pub fn token(&self) -> Result<Option<String>, TokenError> {
        http_token(self.http_token.clone(), self.http_token_file.as_deref())
    }
}

fn http_token(
    flag: Option<String>,
    file: Option<&std::path::Path>,
) -> Result<Option<String>, TokenError> {
    let token = match (flag, file) {
        (Some(token), _) => Some((token, "--http-token (FALCO_NATS_HTTP_TOKEN)")),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                path: path.to_owned(),
                source,
            })?;
            let token = text.trim_end_matches(['\r', '\n']).to_owned();
            Some((token, "the --http-token-file"))
        }
        (None, None) => None,
    };
    match token {
        Some((t, what)) if t.is_empty() => Err(TokenError::Empty(what)),
        Some((t, _)) => Ok(Some(t)),
        None => Ok(None),
    }
}

/// A size: digits, then an optional K, M, G or T (with or without `i` and
/// `B`: powers of 1024).
pub(super) fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 4G, 512M, 1048576)"))?;
    let shift = match unit
        .trim()
        .trim_end_matches(['B', 'b'])
        .trim_end_matches('i')
    {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("{text:?}: unknown unit (K, M, G or T)")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("4G"), Ok(4 << 30));
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("1048576"), Ok(1_048_576));
        for bad in ["", "G", "4X", "-1", "99999999999T"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }
}
