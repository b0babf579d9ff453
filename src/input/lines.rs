//! [`LineReader`]: splits a byte stream into lines of bounded length.
//!
//! A line longer than the limit is skipped up to its newline and reported as
//! [`Line::Oversized`], so the line after it is read intact; memory stays
//! bounded by the limit plus one read buffer.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// How much is read from the source at a time.
const READ_CHUNK: usize = 64 * 1024;

/// One line from a [`LineReader`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line, without its newline.
    Complete(Bytes),
    /// A line over the limit, skipped; its length in bytes.
    Oversized(usize),
}

/// Reads newline-terminated lines of at most `max_line` bytes.
pub struct LineReader<R> {
    reader: R,
    buf: BytesMut,
    max_line: usize,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    /// Length so far of an oversized line being skipped.
    skipping: Option<usize>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(reader: R, max_line: usize) -> Self {
        LineReader {
            reader,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_line: max_line.max(1),
            scanned: 0,
            skipping: None,
        }
    }

    /// The next line; `None` at the end of the input. A last line without
    /// a newline is returned too.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            if let Some(line) = self.take_line() {
                return Ok(Some(line));
            }
            self.buf.reserve(READ_CHUNK);
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return Ok(self.take_rest());
            }
        }
    }

    /// A line from the buffer if one is complete (or is known to be oversized).
    fn take_line(&mut self) -> Option<Line> {
        if let Some(pos) = memchr::memchr(b'\n', &self.buf[self.scanned..]) {
            let end = self.scanned + pos;
            let mut line = self.buf.split_to(end + 1);
            self.scanned = 0;
            if let Some(skipped) = self.skipping.take() {
                return Some(Line::Oversized(skipped + end));
            }
            line.truncate(end);
            if line.last() == Some(&b'\r') {
                line.truncate(end - 1);
            }
            if line.len() > self.max_line {
                return Some(Line::Oversized(line.len()));
            }
            return Some(Line::Complete(line.freeze()));
        }
        self.scanned = self.buf.len();
        if self.skipping.is_some() || self.buf.len() > self.max_line {
            // No newline yet and over the limit: drop what we hold and skip on.
            let held = self.buf.len();
            *self.skipping.get_or_insert(0) += held;
            self.buf.clear();
            self.scanned = 0;
        }
        None
    }

    fn take_rest(&mut self) -> Option<Line> {
        self.scanned = 0;
        if let Some(skipped) = self.skipping.take() {
            let total = skipped + self.buf.len();
            self.buf.clear();
            return Some(Line::Oversized(total));
        }
        if self.buf.is_empty() {
            return None;
        }
        let line = self.buf.split().freeze();
        Some(Line::Complete(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<Line> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap() {
            out.push(line);
        }
        out
    }

    fn complete(s: &str) -> Line {
        Line::Complete(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[tokio::test]
    async fn splits_lines_and_keeps_the_last_one() {
        assert_eq!(
            lines(b"a\nbb\r\n\nccc", 10).await,
            vec![complete("a"), complete("bb"), complete(""), complete("ccc")]
        );
    }

    #[tokio::test]
    async fn skips_oversized_lines_and_keeps_the_next() {
        let big = "x".repeat(200_000);
        let input = format!("ok1\n{big}\nok2\n{big}");
        assert_eq!(
            lines(input.as_bytes(), 1000).await,
            vec![
                complete("ok1"),
                Line::Oversized(200_000),
                complete("ok2"),
                Line::Oversized(200_000)
            ]
        );
    }

    #[tokio::test]
    async fn a_line_exactly_at_the_limit_passes() {
        let at = "y".repeat(1000);
        let over = "z".repeat(1001);
        let input = format!("{at}\n{over}\n");
        assert_eq!(
            lines(input.as_bytes(), 1000).await,
            vec![complete(&at), Line::Oversized(1001)]
        );
    }
}
