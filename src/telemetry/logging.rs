//! Logging with `tracing`: `RUST_LOG` picks the levels, `--log-format` the shape.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info`.
/// Calling it twice is harmless (the second call does nothing). Text lines
/// are coloured only on a terminal (and not with `NO_COLOR` set): a pod's
/// log, a file or a pipe gets plain text.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()),
        ))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Whether text log lines get colours: on a terminal, unless `NO_COLOR`
/// (any non-empty value) asks otherwise.
fn colour(terminal: bool, no_color: bool) -> bool {
    terminal && !no_color
}

/// An error with its chain of causes, `a: b: c`, for a log field; a cause
/// its error already says (some print their source, kube's API errors
/// with its details after it) is not repeated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colour(true, false));
        assert!(!colour(false, false));
        assert!(!colour(true, true));
        assert!(!colour(false, true));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Said {
        text: &'static str,
        #[source]
        source: Option<Box<Said>>,
    }

    #[test]
    fn a_chain_says_each_cause_once() {
        let said = |text, source: Option<Said>| Said {
            text,
            source: source.map(Box::new),
        };
        let root = said("refused", None);
        assert_eq!(
            chain(&said("cannot read key", Some(root))),
            "cannot read key: refused"
        );
        // A message that quotes its cause, at its end or before details.
        let root = said("refused", None);
        let quoting = said("ApiError: refused (Status { code: 403 })", Some(root));
        assert_eq!(chain(&quoting), "ApiError: refused (Status { code: 403 })");
        let inner = said("no answer", None);
        let middle = said("cannot write: no answer", Some(inner));
        assert_eq!(
            chain(&said("the bucket", Some(middle))),
            "the bucket: cannot write: no answer"
        );
    }
}
