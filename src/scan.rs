//! One pass over an alert's JSON: checks that the whole line is JSON
//! (RFC 8259) and reads the four top-level fields the bridge needs
//! (`priority`, `rule`, `hostname`, `source`), without building anything for
//! the rest.
//!
//! A Falco alert is about a kilobyte, most of it the strings of `output` and
//! `output_fields`, which the bridge forwards untouched. Deserializing with
//! serde_json cost about a third of the bridge's instructions per alert, most
//! of it spent walking those strings one byte at a time; here they are
//! scanned eight bytes at a time. The answers are serde_json's: the same
//! lines are JSON, the same fields are read (escapes decoded, a lone
//! surrogate in them refused), a field read twice or of another type than a
//! string makes the line not an alert. `crate::fuzzing::json_line` holds the
//! two to the same answers on mutated alerts.
//!
//! Two differences, both refusals: the line must be an object (serde's
//! derive also read a struct from an array), and containers may nest
//! [`MAX_DEPTH`] deep (serde_json's limit for what it builds; it did not
//! count what it skipped).

use std::borrow::Cow;

/// Deepest nesting of objects and arrays taken, the line's own object
/// included.
pub const MAX_DEPTH: usize = 128;

/// The fields read; `None` for a field absent or `null`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Head<'a> {
    pub priority: Option<Cow<'a, str>>,
    pub rule: Option<Cow<'a, str>>,
    pub hostname: Option<Cow<'a, str>>,
    pub source: Option<Cow<'a, str>>,
}

/// Why a line was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// The line is not JSON.
    #[error("{what} at byte {at}")]
    Syntax { what: &'static str, at: usize },
    /// The line is JSON, but not the shape of an alert.
    #[error("{0}")]
    Shape(String),
}

const FIELDS: [&str; 4] = ["priority", "rule", "hostname", "source"];

/// Reads `text`, which must be one JSON object and nothing else (whitespace
/// around it aside).
pub fn head(text: &str) -> Result<Head<'_>, ScanError> {
    let mut s = Scanner { text, i: 0 };
    s.ws();
    if s.peek() != Some(b'{') {
        s.value(0)?;
        s.end()?;
        return Err(ScanError::Shape("an alert is a JSON object".into()));
    }
    s.i += 1;
    let mut fields: [Option<Cow<'_, str>>; 4] = Default::default();
    let mut seen = [false; 4];
    // The first reason the line is not an alert. Once there is one, the rest
    // is only checked as JSON, as serde_json checked it after its first
    // such error (it stopped reading fields there).
    let mut shape: Option<String> = None;
    s.ws();
    if s.peek() == Some(b'}') {
        s.i += 1;
    } else {
        loop {
            s.expect(b'"', "expected a key")?;
            let slot = if shape.is_none() {
                let key = s.string()?;
                FIELDS.iter().position(|f| *f == key)
            } else {
                s.skip_string()?;
                None
            };
            s.ws();
            s.expect(b':', "expected `:`")?;
            s.ws();
            match slot {
                Some(k) if seen[k] => {
                    shape = Some(format!("duplicate field `{}`", FIELDS[k]));
                    s.value(1)?;
                }
                Some(k) => {
                    seen[k] = true;
                    match s.peek() {
                        Some(b'"') => {
                            s.i += 1;
                            fields[k] = Some(s.string()?);
                        }
                        Some(b'n') => s.literal(b"null")?,
                        _ => {
                            let at = s.i;
                            s.value(1)?;
                            shape = Some(format!(
                                "field `{}` is not a string: {}",
                                FIELDS[k],
                                excerpt(&text[at..s.i])
                            ));
                        }
                    }
                }
                None => s.value(1)?,
            }
            s.ws();
            match s.bump() {
                Some(b',') => s.ws(),
                Some(b'}') => break,
                _ => return Err(s.error_before("expected `,` or `}`").into()),
            }
        }
    }
    s.end()?;
    if let Some(shape) = shape {
        return Err(ScanError::Shape(shape));
    }
    let [priority, rule, hostname, source] = fields;
    Ok(Head {
        priority,
        rule,
        hostname,
        source,
    })
}

/// At most 40 bytes of a value, for an error message.
fn excerpt(value: &str) -> String {
    match value.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &value[..i]),
        None => value.to_owned(),
    }
}

/// A syntax error inside the scanner: small enough to come back in
/// registers, which the scanner's many small steps notice.
#[derive(Debug, Clone, Copy)]
struct Bad {
    what: &'static str,
    at: usize,
}

impl From<Bad> for ScanError {
    fn from(Bad { what, at }: Bad) -> Self {
        ScanError::Syntax { what, at }
    }
}

struct Scanner<'a> {
    text: &'a str,
    i: usize,
}

impl<'a> Scanner<'a> {
    #[inline(always)]
    fn b(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b().get(self.i).copied()
    }

    #[inline(always)]
    fn bump(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    /// An error at the byte just consumed.
    fn error_before(&self, what: &'static str) -> Bad {
        Bad {
            what,
            at: self.i.saturating_sub(1).min(self.b().len()),
        }
    }

    fn error(&self, what: &'static str) -> Bad {
        Bad { what, at: self.i }
    }

    #[inline(always)]
    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), Bad> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.error(what))
        }
    }

    #[inline(always)]
    fn ws(&mut self) {
        // Falco writes no whitespace between tokens: one test, mostly.
        while let Some(&c) = self.b().get(self.i) {
            if c > b' ' || !matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                break;
            }
            self.i += 1;
        }
    }

    /// Only whitespace is left.
    fn end(&mut self) -> Result<(), Bad> {
        self.ws();
        if self.i < self.b().len() {
            return Err(self.error("trailing characters"));
        }
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Bad> {
        if self.b()[self.i.min(self.b().len())..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.error("expected a value"))
        }
    }

    /// One value of any kind, its nested containers checked without
    /// recursion; `depth` containers are open around it.
    fn value(&mut self, depth: usize) -> Result<(), Bad> {
        // One bit per open container inside this value, 1 for an object.
        let mut open: u128 = 0;
        let mut n = 0usize;
        loop {
            // A value starts here.
            let mut opened = false;
            match self.bump() {
                Some(c @ (b'{' | b'[')) => {
                    n += 1;
                    if depth + n > MAX_DEPTH {
                        return Err(self.error_before("nested deeper than 128"));
                    }
                    let object = c == b'{';
                    open = (open << 1) | u128::from(object);
                    self.ws();
                    let close = if object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                        n -= 1;
                        open >>= 1;
                    } else {
                        opened = true;
                        if object {
                            self.member_key()?;
                        }
                    }
                }
                Some(b'"') => self.skip_string()?,
                Some(b't') => {
                    self.i -= 1;
                    self.literal(b"true")?
                }
                Some(b'f') => {
                    self.i -= 1;
                    self.literal(b"false")?
                }
                Some(b'n') => {
                    self.i -= 1;
                    self.literal(b"null")?
                }
                Some(b'-' | b'0'..=b'9') => {
                    self.i -= 1;
                    self.number()?
                }
                _ => return Err(self.error_before("expected a value")),
            }
            if opened {
                self.ws();
                continue;
            }
            // After a value: close what ends here, until a comma.
            loop {
                if n == 0 {
                    return Ok(());
                }
                self.ws();
                let object = open & 1 == 1;
                match self.bump() {
                    Some(b',') => {
                        self.ws();
                        if object {
                            self.member_key()?;
                        }
                        self.ws();
                        break;
                    }
                    Some(b'}') if object => {}
                    Some(b']') if !object => {}
                    _ => return Err(self.error_before("expected `,` or a closing bracket")),
                }
                n -= 1;
                open >>= 1;
            }
        }
    }

    /// `"key":` inside an object that is skipped.
    #[inline(always)]
    fn member_key(&mut self) -> Result<(), Bad> {
        self.expect(b'"', "expected a key")?;
        self.skip_string()?;
        self.ws();
        self.expect(b':', "expected `:`")?;
        self.ws();
        Ok(())
    }

    fn number(&mut self) -> Result<(), Bad> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.bump() {
            Some(b'0') => {}
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.error_before("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.some_digits()?;
        }
        Ok(())
    }

    #[inline(always)]
    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn some_digits(&mut self) -> Result<(), Bad> {
        match self.peek() {
            Some(b'0'..=b'9') => {
                self.digits();
                Ok(())
            }
            _ => Err(self.error("invalid number")),
        }
    }

    /// Past the closing quote of a string whose opening quote is consumed;
    /// escapes are checked for their form only, as serde_json does for what
    /// it skips.
    #[inline(always)]
    fn skip_string(&mut self) -> Result<(), Bad> {
        loop {
            self.i += plain_run(&self.b()[self.i..]);
            match self.bump() {
                Some(b'"') => return Ok(()),
                Some(b'\\') => match self.bump() {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {}
                    Some(b'u') => {
                        self.hex4()?;
                    }
                    _ => return Err(self.error_before("invalid escape")),
                },
                Some(_) => return Err(self.error_before("control character in a string")),
                None => return Err(self.error_before("end of line in a string")),
            }
        }
    }

    /// A string whose opening quote is consumed, borrowed from the line
    /// when it has no escape, decoded when it has.
    fn string(&mut self) -> Result<Cow<'a, str>, Bad> {
        let start = self.i;
        self.i += plain_run(&self.b()[self.i..]);
        if self.peek() == Some(b'"') {
            let s = &self.text[start..self.i];
            self.i += 1;
            return Ok(Cow::Borrowed(s));
        }
        let mut out = String::with_capacity(self.i - start + 16);
        out.push_str(&self.text[start..self.i]);
        loop {
            match self.bump() {
                Some(b'"') => return Ok(Cow::Owned(out)),
                Some(b'\\') => {
                    let c = match self.bump() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => self.unicode_escape()?,
                        _ => return Err(self.error_before("invalid escape")),
                    };
                    out.push(c);
                }
                Some(_) => return Err(self.error_before("control character in a string")),
                None => return Err(self.error_before("end of line in a string")),
            }
            let from = self.i;
            self.i += plain_run(&self.b()[self.i..]);
            out.push_str(&self.text[from..self.i]);
        }
    }

    /// The character of `\uXXXX` (its `\u` consumed), a surrogate pair
    /// joined; a lone surrogate is an error.
    fn unicode_escape(&mut self) -> Result<char, Bad> {
        let first = u32::from(self.hex4()?);
        let code = match first {
            0xD800..=0xDBFF => {
                if !self.b()[self.i.min(self.b().len())..].starts_with(b"\\u") {
                    return Err(self.error("lone leading surrogate in an escape"));
                }
                self.i += 2;
                let second = u32::from(self.hex4()?);
                if !(0xDC00..=0xDFFF).contains(&second) {
                    return Err(self.error_before("lone leading surrogate in an escape"));
                }
                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
            }
            0xDC00..=0xDFFF => {
                return Err(self.error_before("lone trailing surrogate in an escape"))
            }
            c => c,
        };
        char::from_u32(code).ok_or_else(|| self.error_before("invalid escape"))
    }

    fn hex4(&mut self) -> Result<u16, Bad> {
        let mut v = 0u16;
        for _ in 0..4 {
            let d = match self.bump() {
                Some(c @ b'0'..=b'9') => c - b'0',
                Some(c @ b'a'..=b'f') => c - b'a' + 10,
                Some(c @ b'A'..=b'F') => c - b'A' + 10,
                _ => return Err(self.error_before("invalid \\u escape")),
            };
            v = (v << 4) | u16::from(d);
        }
        Ok(v)
    }
}

/// How many bytes from the start of `b` need no attention inside a string:
/// neither a quote, a backslash nor a control character. Eight bytes at a
/// time, all tested at once; the last few one at a time.
#[inline(always)]
pub(crate) fn plain_run(b: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    let mut chunks = b.chunks_exact(8);
    for chunk in &mut chunks {
        let v = u64::from_le_bytes(chunk.try_into().expect("chunks of eight bytes"));
        let quote = v ^ (ONES * u64::from(b'"'));
        let backslash = v ^ (ONES * u64::from(b'\\'));
        // A byte's high bit is set here if the byte is a quote, a backslash
        // or below 0x20 (or, falsely, if a lower byte is one: the borrow
        // carries up), so the lowest set bit is the first such byte.
        let hit = ((quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (v.wrapping_sub(ONES * 0x20) & !v))
            & HIGH;
        if hit != 0 {
            return i + (hit.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    for &c in chunks.remainder() {
        if c == b'"' || c == b'\\' || c < 0x20 {
            break;
        }
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Head<'_> {
        head(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn syntax(text: &str) {
        match head(text) {
            Err(ScanError::Syntax { .. }) => {}
            other => panic!("{text}: {other:?}"),
        }
    }

    fn shape(text: &str) -> String {
        match head(text) {
            Err(ScanError::Shape(s)) => s,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn reads_the_four_fields_borrowed() {
        let h = ok(
            r#" {"output":"x \" y","output_fields":{"a":[1,-2.5e+3,true,false,null,{}],"b":[]},"priority":"Critical","rule":"Shell","hostname":"node-1","source":"syscall","tags":["a"]} "#,
        );
        assert_eq!(h.priority.as_deref(), Some("Critical"));
        assert_eq!(h.rule.as_deref(), Some("Shell"));
        assert_eq!(h.hostname.as_deref(), Some("node-1"));
        assert_eq!(h.source.as_deref(), Some("syscall"));
        assert!(matches!(h.rule, Some(Cow::Borrowed(_))));
        assert_eq!(ok("{}"), Head::default());
        assert_eq!(ok(r#"{"rule":null}"#), Head::default());
    }

    #[test]
    fn decodes_escapes_in_the_fields_and_keys() {
        let h = ok(r#"{"ru\u006ce":"a\"b\\c\/d\b\f\n\r\t\u00e9\ud83d\ude00 end"}"#);
        assert_eq!(
            h.rule.as_deref(),
            Some("a\"b\\c/d\u{8}\u{c}\n\r\té\u{1F600} end")
        );
        syntax(r#"{"rule":"\ud800"}"#);
        syntax(r#"{"rule":"\ud800\u0041"}"#);
        syntax(r#"{"rule":"\udc00"}"#);
        syntax(r#"{"rule":"\x"}"#);
        // Skipped strings: the escape's form only, as serde_json.
        ok(r#"{"output":"\ud800"}"#);
        syntax(r#"{"output":"\u12"}"#);
    }

    #[test]
    fn refuses_what_is_not_json() {
        for text in [
            "",
            "{",
            "}",
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":[1 2]}"#,
            r#"{"a":{"b":1]}"#,
            r#"{"a":[}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":-}"#,
            r#"{"a":1e}"#,
            r#"{"a":tru}"#,
            r#"{"a":nul}"#,
            r#"{"a":"b"}x"#,
            r#"{"a":"b"} {}"#,
            "{\"a\":\"b\u{1}\"}",
            "{\"a\":\"line\nbreak\"}",
            r#"{a:1}"#,
            r#"{"a":'b'}"#,
            r#"{"a":"unterminated"#,
            r#"{"a":"ends in a backslash\"#,
            r#"{"a":1"#,
        ] {
            syntax(text);
        }
    }

    #[test]
    fn refuses_json_that_is_not_an_alert() {
        assert_eq!(shape("[]"), "an alert is a JSON object");
        assert_eq!(shape(r#"["Critical","r"]"#), "an alert is a JSON object");
        assert_eq!(shape(r#""x""#), "an alert is a JSON object");
        assert_eq!(
            shape(r#"{"rule":"a","rule":"b"}"#),
            "duplicate field `rule`"
        );
        assert_eq!(
            shape(r#"{"priority":1}"#),
            "field `priority` is not a string: 1"
        );
        assert!(shape(r#"{"rule":{"a":[1]}}"#).starts_with("field `rule`"));
        // Still JSON-checked to the end: a syntax error later wins.
        syntax(r#"{"rule":1,"x":}"#);
        // After a shape error, keys and fields are only checked as JSON.
        assert!(shape(r#"{"rule":1,"priority":"\ud800"}"#).starts_with("field `rule`"));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = |n: usize| format!("{{\"a\":{}{}}}", "[".repeat(n), "]".repeat(n));
        ok(&deep(MAX_DEPTH - 1));
        syntax(&deep(MAX_DEPTH));
        syntax(&deep(100_000));
    }

    #[test]
    fn plain_run_stops_at_each_special_byte() {
        for len in 0..24 {
            for at in 0..=len {
                for special in [b'"', b'\\', 0, 0x1f] {
                    let mut b = vec![b'a'; len];
                    b.extend_from_slice("é~\x7f".as_bytes());
                    if at < b.len() {
                        b[at] = special;
                    }
                    let expect = b
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                        .unwrap_or(b.len());
                    assert_eq!(plain_run(&b), expect, "{b:?}");
                }
            }
        }
    }
}
