//! Signed alerts: the bridge signs each alert it publishes (Ed25519, with
//! an NKey seed) and the responder acts only on alerts signed by a key it
//! trusts. NATS permissions keep strangers off `falco.>`; a signature keeps
//! a stolen credential or a misconfigured account from deleting pods.
//!
//! What is signed: a fixed context, the subject, the signing time, the
//! message id and the payload, so a signature cannot be moved to another
//! subject (another priority) or another alert, nor a captured alert be
//! sent again later under a fresh message id: the responder refuses alerts
//! signed longer ago than `--max-alert-age` (skip reason `stale`), and
//! remembers the ones it acted on in the bucket every replica shares. The
//! payload stays Falco's JSON, byte for byte; the signature travels in
//! headers:
//!
//! - `Falco-Nats-Key`: the signer's public NKey (56 characters), so a
//!   responder trusting several keys (a rotation) knows which to use;
//! - `Falco-Nats-Signed-At`: when, in milliseconds since the Unix epoch;
//! - `Falco-Nats-Signature`: the 64-byte signature, base64url without padding
//!   (86 characters), over the above, `Nats-Msg-Id` and the payload.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nkeys::KeyPair;

/// Milliseconds since the Unix epoch: the clock signatures are dated in
/// (and the responders' shared records).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The header with the signer's public key.
pub const KEY_HEADER: &str = "Falco-Nats-Key";
/// The header with the signature.
pub const SIGNATURE_HEADER: &str = "Falco-Nats-Signature";
/// The header with the signing time (ms since the Unix epoch).
pub const SIGNED_AT_HEADER: &str = "Falco-Nats-Signed-At";
/// JetStream's message id, which the signature covers too.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Prepended to what is signed: a signature made here means nothing in
/// any other protocol that signs with the same key (v1 signed the subject
/// and payload only; its signatures do not verify as v2).
const CONTEXT: &[u8] = b"falco-nats alert v2\n";

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path:?}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write a new key file {path:?}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path:?} holds no NKey seed (a line starting with S, as `falco-nats keygen` writes)")]
    NoSeed { path: String },
    #[error("key file {path:?}: not a valid NKey seed")]
    BadSeed {
        path: String,
        #[source]
        source: nkeys::error::Error,
    },
    #[error("key file {path:?} holds a seed, which is a private key: give the responder the public key only (`falco-nats keygen --public SEED_FILE` prints it)")]
    SeedForVerifying { path: String },
    #[error("key file {path:?}: not a valid public NKey")]
    BadPublicKey {
        path: String,
        #[source]
        source: nkeys::error::Error,
    },
}

/// Why an alert's signature is not accepted. Every case is a skip with
/// reason `bad_signature`; the message says which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the alert is not signed")]
    Unsigned,
    #[error("the alert is signed by a key that is not trusted")]
    UnknownKey,
    #[error("the signature header is not 64 bytes of base64url")]
    Malformed,
    #[error("the signature has no signing time (Falco-Nats-Signed-At, milliseconds)")]
    NoTime,
    #[error("the signature has no message id (Nats-Msg-Id)")]
    NoMessageId,
    #[error("the signature does not match the subject, signing time, message id and payload")]
    Mismatch,
}

/// A verified signature: who signed, and when (ms since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signed<'a> {
    pub key: &'a str,
    pub at_ms: u64,
}

/// Signs alerts with one seed.
pub struct Signer {
    key: KeyPair,
    public: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// The bytes a signature covers.
fn signed_bytes(subject: &str, at_ms: u64, msg_id: &str, payload: &[u8]) -> Vec<u8> {
    let mut time = itoa::Buffer::new();
    let time = time.format(at_ms);
    let mut input = Vec::with_capacity(
        CONTEXT.len() + subject.len() + time.len() + msg_id.len() + 3 + payload.len(),
    );
    input.extend_from_slice(CONTEXT);
    // Subjects and header values cannot hold a newline, and the time is
    // digits: the boundaries are unambiguous.
    for part in [subject, time, msg_id] {
        input.extend_from_slice(part.as_bytes());
        input.push(b'\n');
    }
    input.extend_from_slice(payload);
    input
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The first line of `text` that looks like an NKey (seed or public key):
/// a file may carry comments, as `nats` credentials files do.
fn key_line(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("//"))
}

impl Signer {
    /// A signer from a file holding an NKey seed (`S...`).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = read(path)?;
        let shown = || path.display().to_string();
        let seed = key_line(&text)
            .filter(|l| l.starts_with('S'))
            .ok_or_else(|| KeyError::NoSeed { path: shown() })?;
        Self::from_seed(seed).map_err(|source| KeyError::BadSeed {
            path: shown(),
            source,
        })
    }

    /// A signer from an NKey seed.
    pub fn from_seed(seed: &str) -> Result<Self, nkeys::error::Error> {
        let key = KeyPair::from_seed(seed)?;
        let public = key.public_key();
        Ok(Signer { key, public })
    }

    /// The public key responders trust.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The signature of an alert on `subject` with message id `msg_id`,
    /// signed at `at_ms` (ms since the Unix epoch, [`SIGNED_AT_HEADER`]),
    /// for [`SIGNATURE_HEADER`].
    pub fn sign(&self, subject: &str, at_ms: u64, msg_id: &str, payload: &[u8]) -> String {
        let signature = self
            .key
            .sign(&signed_bytes(subject, at_ms, msg_id, payload))
            .expect("a signer is only made from a seed, which can sign");
        URL_SAFE_NO_PAD.encode(signature)
    }
}

/// The public keys alerts must be signed with (more than one during a rotation).
pub struct Verifier {
    keys: Vec<(String, KeyPair)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|(k, _)| k))
            .finish()
    }
}

impl Verifier {
    /// Trusts the public key in each file. A seed is refused: a responder
    /// needs no private key, and should not hold one.
    pub fn from_files(paths: &[std::path::PathBuf]) -> Result<Self, KeyError> {
        let mut keys = Vec::with_capacity(paths.len());
        for path in paths {
            let text = read(path)?;
            let shown = || path.display().to_string();
            let line = key_line(&text).unwrap_or_default();
            if line.starts_with('S') {
                return Err(KeyError::SeedForVerifying { path: shown() });
            }
            let key = KeyPair::from_public_key(line).map_err(|source| KeyError::BadPublicKey {
                path: shown(),
                source,
            })?;
            keys.push((line.to_owned(), key));
        }
        Ok(Verifier { keys })
    }

    /// Trusts these public keys.
    pub fn from_public_keys<'a>(
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, nkeys::error::Error> {
        let keys = keys
            .into_iter()
            .map(|k| KeyPair::from_public_key(k).map(|pair| (k.to_owned(), pair)))
            .collect::<Result<_, _>>()?;
        Ok(Verifier { keys })
    }

    /// Checks an alert's signature headers against the trusted keys; the
    /// trusted key that signed it, and when.
    pub fn verify(
        &self,
        subject: &str,
        payload: &[u8],
        headers: Option<&async_nats::HeaderMap>,
    ) -> Result<Signed<'_>, SignatureError> {
        let header = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .map(async_nats::HeaderValue::as_str)
        };
        let (Some(key), Some(signature)) = (header(KEY_HEADER), header(SIGNATURE_HEADER)) else {
            return Err(SignatureError::Unsigned);
        };
        let (name, pair) = self
            .keys
            .iter()
            .find(|(k, _)| k == key)
            .ok_or(SignatureError::UnknownKey)?;
        // 64 bytes are 86 characters; anything else is not decoded at all.
        if signature.len() != 86 {
            return Err(SignatureError::Malformed);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| SignatureError::Malformed)?;
        // Digits only, as the signer writes them: one time, one spelling.
        let at_ms = header(SIGNED_AT_HEADER)
            .filter(|t| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit()))
            .filter(|t| t.len() == 1 || !t.starts_with('0'))
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or(SignatureError::NoTime)?;
        let msg_id = header(MSG_ID_HEADER)
            .filter(|id| !id.is_empty())
            .ok_or(SignatureError::NoMessageId)?;
        pair.verify(&signed_bytes(subject, at_ms, msg_id, payload), &signature)
            .map_err(|_| SignatureError::Mismatch)?;
        Ok(Signed { key: name, at_ms })
    }
}

/// Writes a new seed to `path` (created, mode 0600, never overwritten);
/// its public key.
pub fn write_new_seed(path: &Path) -> Result<String, KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (seed, public) = generate();
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        writeln!(
            file,
            "# falco-nats alert signing seed (secret); public key {public}"
        )?;
        writeln!(file, "{seed}")?;
        file.sync_all()
    };
    write().map_err(|source| KeyError::Write {
        path: path.display().to_string(),
        source,
    })?;
    Ok(public)
}

/// A new user NKey: its seed (secret, for the bridge) and public key (for
/// responders).
pub fn generate() -> (String, String) {
    let pair = KeyPair::new_user();
    let seed = pair
        .seed()
        .expect("a key pair made from random bytes has its seed");
    (seed, pair.public_key())
}

/// Whether two secrets (bearer tokens) are equal, in a time that does not
/// depend on where they differ: the HTTP input's and the ui's one check.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: u64 = 1_764_900_000_000;
    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn headers(key: &str, signature: &str) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert(KEY_HEADER, key);
        h.insert(SIGNATURE_HEADER, signature);
        h.insert(SIGNED_AT_HEADER, AT.to_string());
        h.insert(MSG_ID_HEADER, ID);
        h
    }

    #[test]
    fn signatures_bind_key_subject_time_id_and_payload() {
        let (seed, public) = generate();
        let (other_seed, other_public) = generate();
        let signer = Signer::from_seed(&seed).unwrap();
        assert_eq!(signer.public_key(), public);
        let verifier = Verifier::from_public_keys([public.as_str()]).unwrap();
        let subject = "falco.critical.x";
        let payload = br#"{"rule":"x"}"#;
        let sig = signer.sign(subject, AT, ID, payload);
        assert_eq!(sig.len(), 86);
        let good = headers(&public, &sig);
        assert_eq!(
            verifier.verify(subject, payload, Some(&good)),
            Ok(Signed {
                key: public.as_str(),
                at_ms: AT
            })
        );
        assert_eq!(
            verifier.verify("falco.notice.x", payload, Some(&good)),
            Err(SignatureError::Mismatch),
            "moved to another subject"
        );
        assert_eq!(
            verifier.verify(subject, br#"{"rule":"y"}"#, Some(&good)),
            Err(SignatureError::Mismatch),
            "another payload"
        );
        // Sent again later, or under a fresh message id.
        for (name, value) in [
            (SIGNED_AT_HEADER, (AT + 60_000).to_string()),
            (MSG_ID_HEADER, "ffffffffffffffffffffffffffffffff".to_owned()),
        ] {
            let mut moved = good.clone();
            moved.insert(name, value);
            assert_eq!(
                verifier.verify(subject, payload, Some(&moved)),
                Err(SignatureError::Mismatch),
                "{name} changed"
            );
        }
        // One time, one spelling: no leading zeros, signs, spaces.
        for time in ["", "0123", "+1", " 1", "1.5", "99999999999999999999999"] {
            let mut odd = good.clone();
            odd.insert(SIGNED_AT_HEADER, time);
            assert_eq!(
                verifier.verify(subject, payload, Some(&odd)),
                Err(SignatureError::NoTime),
                "{time:?}"
            );
        }
        let mut no_id = headers(&public, &sig);
        no_id.insert(MSG_ID_HEADER, "");
        assert_eq!(
            verifier.verify(subject, payload, Some(&no_id)),
            Err(SignatureError::NoMessageId)
        );
        assert_eq!(
            verifier.verify(subject, payload, None),
            Err(SignatureError::Unsigned)
        );
        let other = Signer::from_seed(&other_seed).unwrap();
        let forged = headers(&other_public, &other.sign(subject, AT, ID, payload));
        assert_eq!(
            verifier.verify(subject, payload, Some(&forged)),
            Err(SignatureError::UnknownKey)
        );
        // Claiming the trusted key with another key's signature.
        let claimed = headers(&public, &other.sign(subject, AT, ID, payload));
        assert_eq!(
            verifier.verify(subject, payload, Some(&claimed)),
            Err(SignatureError::Mismatch)
        );
        for bad in [
            "",
            "AAAA",
            &"A".repeat(85),
            &"!".repeat(86),
            &"A".repeat(10_000),
        ] {
            assert_eq!(
                verifier.verify(subject, payload, Some(&headers(&public, bad))),
                Err(SignatureError::Malformed),
                "{bad:.20}"
            );
        }
        // Rotation: either key verifies.
        let both = Verifier::from_public_keys([public.as_str(), other_public.as_str()]).unwrap();
        assert!(both.verify(subject, payload, Some(&good)).is_ok());
        assert!(both.verify(subject, payload, Some(&forged)).is_ok());
    }

    #[test]
    fn key_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let (seed, public) = generate();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let seed_file = write("seed", &format!("# the bridge's key\n{seed}\n"));
        let public_file = write("pub", &format!("{public}\n"));
        assert!(Signer::from_file(&seed_file).is_ok());
        assert!(Verifier::from_files(std::slice::from_ref(&public_file)).is_ok());
        let e = Verifier::from_files(&[seed_file]).unwrap_err().to_string();
        assert!(e.contains("private key"), "{e}");
        let e = Signer::from_file(&public_file).unwrap_err().to_string();
        assert!(e.contains("no NKey seed"), "{e}");
        let e = Verifier::from_files(&[write("junk", "hello")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid public NKey"), "{e}");
        let e = Signer::from_file(&write("bad", "SUNOTASEED"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid NKey seed"), "{e}");
    }
}
