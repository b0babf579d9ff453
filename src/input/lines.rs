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

    /// The next line already in the buffer, reading nothing more: for a
    /// shutdown, which queues what was read before stopping. A last line
    /// without its newline is not complete and stays (see [`Self::partial`]).
    pub fn next_buffered_line(&mut self) -> Option<Line> {
        let line = self.take_line();
        if line.is_none() {
            // take_line may have started skipping an oversized line: that
            // is no line to return either.
            self.skipping = None;
        }
        line
    }

    /// Bytes of an incomplete last line held in the buffer.
    pub fn partial(&self) -> usize {
        self.buf.len()
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
        // One byte more than the limit may still be a line at the limit
        // whose `\r\n` has not arrived whole: the `\r` is not part of it.
        let room = self.max_line + usize::from(self.buf.last() == Some(&b'\r'));
        if self.skipping.is_some() || self.buf.len() > room {
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

    /// A line of exactly the limit ending in CRLF is accepted wherever a
    /// read ends, here between the `\r` and the `\n`.
    #[tokio::test]
    async fn a_crlf_line_at_the_limit_passes_whatever_the_reads() {
        let at = "c".repeat(1000);
        let reader = chunked_reader(&[format!("{at}\r").as_bytes(), b"\nnext\n"]);
        let mut lines = LineReader::new(reader, 1000);
        assert_eq!(lines.next_line().await.unwrap(), Some(complete(&at)));
        assert_eq!(lines.next_line().await.unwrap(), Some(complete("next")));
        // Two bytes over (no CR) is still oversized.
        let over = "d".repeat(1001);
        let reader = chunked_reader(&[over.as_bytes(), b"\r\nok\n"]);
        let mut lines = LineReader::new(reader, 1000);
        assert_eq!(
            lines.next_line().await.unwrap(),
            Some(Line::Oversized(1002))
        );
        assert_eq!(lines.next_line().await.unwrap(), Some(complete("ok")));
    }

    /// Complete lines already read are given out at shutdown; a partial
    /// last line is not.
    #[tokio::test]
    async fn buffered_lines_are_given_out_without_reading() {
        let reader = chunked_reader(&[b"a\nb\nc\npart"]);
        let mut lines = LineReader::new(reader, 100);
        assert_eq!(lines.next_line().await.unwrap(), Some(complete("a")));
        assert_eq!(lines.next_buffered_line(), Some(complete("b")));
        assert_eq!(lines.next_buffered_line(), Some(complete("c")));
        assert_eq!(lines.next_buffered_line(), None);
        assert_eq!(lines.partial(), 4);
    }

    /// A reader that returns each chunk from its own read call.
    fn chunked_reader(chunks: &[&[u8]]) -> impl AsyncRead + Unpin {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in chunks {
                tx.write_all(&chunk).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
        rx
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
