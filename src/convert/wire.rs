//! Falco's `falco.outputs.response` read straight from its protobuf bytes:
//! every string borrowed from the message, nothing built but two small
//! lists (the `output_fields` pairs and the tags).
//!
//! prost's generated decoder copies each of an alert's hundred or so strings
//! into a `String` of its own and inserts fifty of them into a map, which
//! costs more than the rest of the bridge together. This reader handles the
//! wire format Falco and every protobuf library write: known fields with
//! their wire types, unknown fields of wire types 0, 1, 2 and 5, any field
//! repeated, map entries in any order. Anything else, and anything wrong
//! (a group, a bad wire type, a cut message, invalid UTF-8), is
//! [`Unusual`]: the caller then decodes the message with prost, whose
//! answer, an alert or an error, stands. `fuzzing::grpc_to_json` holds the two
//! to the same alert for every mutated message.

/// What the message held, as prost would decode it (strings last-wins,
/// `time` merged, tags in wire order, the map as a map). The map's keys and
/// values and the tags are bytes, each valid UTF-8.
#[derive(Debug, Default)]
pub(super) struct Wire<'a> {
    /// `time`: seconds and nanoseconds, if the message had the field.
    pub time: Option<(i64, i32)>,
    pub priority: i32,
    pub source_deprecated: i32,
    pub rule: &'a str,
    pub output: &'a str,
    /// `output_fields`: sorted by key, each key once (a later entry wins).
    pub fields: Vec<(&'a [u8], &'a [u8])>,
    pub hostname: &'a str,
    pub tags: Vec<&'a [u8]>,
    pub source: &'a str,
}

/// A message this reader leaves to prost.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Unusual;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LENGTH: u8 = 2;
const FIXED32: u8 = 5;

/// Reads one `response`. Its strings are checked for UTF-8 at once: if no
/// byte of any is above 0x7f, all are ASCII; otherwise the message is read
/// again, each string checked on its own.
pub(super) fn read(message: &[u8]) -> Result<Wire<'_>, Unusual> {
    let (mut wire, high) = read_checking(message, false)?;
    if high >= 0x80 {
        wire = read_checking(message, true)?.0;
    }
    // Falco's map may come in any order, and a later entry of a key
    // replaces an earlier one, as prost's map keeps it.
    if !wire.fields.windows(2).all(|w| w[0].0 < w[1].0) {
        wire.fields.sort_by(|a, b| a.0.cmp(b.0));
        wire.fields.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 = later.1;
            }
            same
        });
    }
    Ok(wire)
}

/// Reads one `response`, each string checked for UTF-8 if `check`; also
/// returns the bits of every string's bytes ORed together.
fn read_checking(message: &[u8], check: bool) -> Result<(Wire<'_>, u8), Unusual> {
    let mut r = Reader::new(message, check);
    let mut wire = Wire {
        // Falco's alerts carry tens of fields (32 pairs fit the allocator's
        // small sizes) and a few tags.
        fields: Vec::with_capacity(32),
        tags: Vec::with_capacity(8),
        ..Wire::default()
    };
    while !r.done() {
        let (tag, kind) = r.key()?;
        match (tag, kind) {
            (1, LENGTH) => {
                let (mut secs, mut nanos) = wire.time.unwrap_or_default();
                let mut t = Reader::new(r.bytes()?, check);
                while !t.done() {
                    match t.key()? {
                        // int64 and int32: the varint's low bits.
                        (1, VARINT) => secs = t.varint()? as i64,
                        (2, VARINT) => nanos = t.varint()? as i32,
                        (1 | 2, _) => return Err(Unusual),
                        (_, kind) => t.skip(kind)?,
                    }
                }
                wire.time = Some((secs, nanos));
            }
            (2, VARINT) => wire.priority = r.varint()? as i32,
            (3, VARINT) => wire.source_deprecated = r.varint()? as i32,
            (4, LENGTH) => wire.rule = r.text()?,
            (5, LENGTH) => wire.output = r.text()?,
            (6, LENGTH) => {
                let (mut key, mut value): (&[u8], &[u8]) = (b"", b"");
                let mut e = Reader::new(r.bytes()?, check);
                while !e.done() {
                    match e.key()? {
                        (1, LENGTH) => key = e.string()?,
                        (2, LENGTH) => value = e.string()?,
                        (1 | 2, _) => return Err(Unusual),
                        (_, kind) => e.skip(kind)?,
                    }
                }
                r.high |= e.high;
                wire.fields.push((key, value));
            }
            (7, LENGTH) => wire.hostname = r.text()?,
            (8, LENGTH) => wire.tags.push(r.string()?),
            (9, LENGTH) => wire.source = r.text()?,
            (1..=9, _) => return Err(Unusual),
            (_, kind) => r.skip(kind)?,
        }
    }
    Ok((wire, r.high))
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    /// Check each string for UTF-8.
    check: bool,
    /// Every unchecked string's bytes ORed together.
    high: u8,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], check: bool) -> Self {
        Reader {
            b,
            at: 0,
            check,
            high: 0,
        }
    }

    fn done(&self) -> bool {
        self.at >= self.b.len()
    }

    /// A base-128 varint of at most ten bytes, the tenth 0 or 1 (prost's rule).
    #[inline]
    fn varint(&mut self) -> Result<u64, Unusual> {
        // Most are one byte: keys, and lengths below 128.
        match self.b.get(self.at) {
            Some(&byte) if byte < 0x80 => {
                self.at += 1;
                Ok(u64::from(byte))
            }
            _ => self.long_varint(),
        }
    }

    #[inline(never)]
    fn long_varint(&mut self) -> Result<u64, Unusual> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = *self.b.get(self.at).ok_or(Unusual)?;
            self.at += 1;
            if i == 9 && byte > 1 {
                return Err(Unusual);
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(Unusual)
    }

    /// A field's number and wire type.
    fn key(&mut self) -> Result<(u32, u8), Unusual> {
        let key = u32::try_from(self.varint()?).map_err(|_| Unusual)?;
        let tag = key >> 3;
        if tag == 0 {
            return Err(Unusual);
        }
        Ok((tag, (key & 7) as u8))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], Unusual> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.b.len())
            .ok_or(Unusual)?;
        let taken = &self.b[self.at..end];
        self.at = end;
        Ok(taken)
    }

    /// A length-delimited field's bytes.
    fn bytes(&mut self) -> Result<&'a [u8], Unusual> {
        let len = usize::try_from(self.varint()?).map_err(|_| Unusual)?;
        self.take(len)
    }

    /// A string kept as text (rule, output, hostname, source): checked.
    fn text(&mut self) -> Result<&'a str, Unusual> {
        std::str::from_utf8(self.bytes()?).map_err(|_| Unusual)
    }

    /// A string's bytes: valid UTF-8 if checked, else folded into `high`.
    fn string(&mut self) -> Result<&'a [u8], Unusual> {
        let s = self.bytes()?;
        if self.check {
            std::str::from_utf8(s).map_err(|_| Unusual)?;
        } else {
            self.high |= s.iter().fold(0, |high, &b| high | b);
        }
        Ok(s)
    }

    /// Skips a field this reader does not use; groups are left to prost.
    fn skip(&mut self, kind: u8) -> Result<(), Unusual> {
        match kind {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LENGTH => self.bytes().map(drop),
            FIXED32 => self.take(4).map(drop),
            _ => Err(Unusual),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::tests::response;
    use crate::proto::outputs::Response;
    use prost::Message;

    /// The map as prost decodes it.
    fn map_of(r: &Response) -> Vec<(&[u8], &[u8])> {
        r.output_fields
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect()
    }

    #[test]
    fn reads_what_prost_writes() {
        let r = response();
        let bytes = r.encode_to_vec();
        let w = read(&bytes).unwrap();
        assert_eq!(w.time, Some((1_685_022_245, 478_445_995)));
        assert_eq!(w.priority, 5);
        assert_eq!(w.rule, "Terminal shell in container");
        assert_eq!(w.output, r.output);
        assert_eq!(w.fields, map_of(&r));
        assert_eq!(w.hostname, "falco-xczjd");
        assert_eq!(
            w.tags,
            [b"shell".as_slice(), b"container", b"mitre_execution"]
        );
        assert_eq!(w.source, "syscall");
    }

    #[test]
    fn strings_of_a_message_that_is_not_ascii_are_checked_one_by_one() {
        let mut r = response();
        r.output_fields
            .insert("fd.name".into(), "/tmp/règle 🐧".into());
        let bytes = r.encode_to_vec();
        assert_eq!(read(&bytes).unwrap().fields, map_of(&r));
        // The same bytes cut inside the penguin: not UTF-8.
        let at = bytes.windows(4).position(|w| w == "🐧".as_bytes()).unwrap();
        let mut cut = bytes.clone();
        cut[at + 3] = b'!';
        assert_eq!(read(&cut).unwrap_err(), Unusual);
    }

    #[test]
    fn repeated_fields_and_unknown_ones() {
        let mut bytes = response().encode_to_vec();
        // rule again (last wins), a map entry with its value first and an
        // unknown field inside, one repeating a key (it wins), unknown
        // fields of each plain wire type.
        bytes.extend_from_slice(&[0x22, 1, b'R']);
        bytes.extend_from_slice(&[0x32, 8, 0x12, 1, b'v', 0x18, 7, 0x0a, 1, b'k']);
        bytes.extend_from_slice(&[0x32, 14, 0x0a, 9]);
        bytes.extend_from_slice(b"user.name");
        bytes.extend_from_slice(&[0x12, 1, b'x']);
        bytes.extend_from_slice(&[0x50, 0x96, 0x01]); // 10: varint
        bytes.extend_from_slice(&[0x59, 1, 2, 3, 4, 5, 6, 7, 8]); // 11: fixed64
        bytes.extend_from_slice(&[0x62, 2, b'x', b'y']); // 12: bytes
        bytes.extend_from_slice(&[0x6d, 1, 2, 3, 4]); // 13: fixed32
        let w = read(&bytes).unwrap();
        assert_eq!(w.rule, "R");
        let prost = Response::decode(bytes.as_slice()).unwrap();
        assert_eq!(prost.rule, "R");
        assert_eq!(prost.output_fields["k"], "v");
        assert_eq!(prost.output_fields["user.name"], "x");
        assert_eq!(w.fields, map_of(&prost));
    }

    #[test]
    fn leaves_the_unusual_to_prost() {
        let good = response().encode_to_vec();
        // Cut short, anywhere inside the last field.
        for cut in 1..6 {
            assert_eq!(read(&good[..good.len() - cut]).unwrap_err(), Unusual);
        }
        for odd in [
            &[0x23, 0x24][..],             // field 4 as a group
            &[0x53, 0x54][..],             // an unknown group
            &[0x10, 0x80][..],             // a varint cut short
            &[0x12, 0x01, 0x02][..],       // priority as bytes
            &[0x22, 0x01, 0xff][..],       // rule not UTF-8
            &[0x02, 0x00][..],             // field number 0
            &[0x16][..],                   // wire type 6
            &[0x32, 0x02, 0x08, 0x01][..], // a map key as a varint
            &[0x0a, 0x02, 0x0a, 0x00][..], // time's seconds as bytes
        ] {
            assert_eq!(read(odd).unwrap_err(), Unusual, "{odd:?}");
        }
        // A ten-byte varint is read if its last byte is 0 or 1.
        let mut long = vec![0x10];
        long.extend_from_slice(&[0xff; 9]);
        long.push(1);
        assert_eq!(read(&long).unwrap().priority, -1);
        *long.last_mut().unwrap() = 2;
        assert_eq!(read(&long).unwrap_err(), Unusual);
    }
}
