//! The headers of an alert message: what a consumer filters on without
//! parsing the JSON (priority, rule, hostname, source), the message id
//! JetStream deduplicates on, and the signature; valid by construction (no
//! control character, at most [`MAX_HEADER_VALUE`] bytes), and remembered
//! per rule, since alerts repeat a few.

use async_nats::{HeaderMap, HeaderName};

use crate::event::FalcoEvent;
use crate::nats::memo::Memo;
use crate::priority::Priority;
use crate::signing::Signer;

/// Header names carried by every alert message.
pub mod header {
    pub const PRIORITY: &str = "Falco-Priority";
    pub const RULE: &str = "Falco-Rule";
    pub const HOSTNAME: &str = "Falco-Hostname";
    pub const SOURCE: &str = "Falco-Source";
    pub const MSG_ID: &str = "Nats-Msg-Id";
}

/// The header names, made once: inserting a `&str` name validates and
/// converts it for every message.
const PRIORITY_NAME: HeaderName = HeaderName::from_static(header::PRIORITY);
const RULE_NAME: HeaderName = HeaderName::from_static(header::RULE);
const HOSTNAME_NAME: HeaderName = HeaderName::from_static(header::HOSTNAME);
const SOURCE_NAME: HeaderName = HeaderName::from_static(header::SOURCE);
const MSG_ID_NAME: HeaderName = HeaderName::from_static(header::MSG_ID);
const KEY_NAME: HeaderName = HeaderName::from_static(crate::signing::KEY_HEADER);
const SIGNATURE_NAME: HeaderName = HeaderName::from_static(crate::signing::SIGNATURE_HEADER);
const SIGNED_AT_NAME: HeaderName = HeaderName::from_static(crate::signing::SIGNED_AT_HEADER);

/// The headers of an alert message: what a consumer filters on without
/// parsing the JSON, and the digest JetStream deduplicates on.
/// With a `signer`, the alert's signature over `subject` and the payload
/// too ([`crate::signing`]).
pub fn alert_headers(event: &FalcoEvent, subject: &str, signer: Option<&Signer>) -> HeaderMap {
    let mut headers = FILTER_HEADERS.with(|memo| {
        let mut memo = memo.borrow_mut();
        let (.., headers) = memo.get_or_make(
            |(priority, rule, source, _)| {
                *priority == event.priority && *rule == event.rule && *source == event.source
            },
            || {
                let headers = rule_headers(event);
                (
                    event.priority,
                    event.rule.clone(),
                    event.source.clone(),
                    headers,
                )
            },
        );
        headers.clone()
    });
    headers.insert(HOSTNAME_NAME, header_value(&event.hostname));
    let msg_id = event.msg_id();
    if let Some(signer) = signer {
        let at_ms = crate::signing::now_ms();
        headers.insert(KEY_NAME, signer.public_key());
        headers.insert(SIGNED_AT_NAME, itoa::Buffer::new().format(at_ms));
        headers.insert(
            SIGNATURE_NAME,
            signer.sign(subject, at_ms, &msg_id, &event.payload),
        );
    }
    headers.insert(MSG_ID_NAME, msg_id);
    headers
}

/// The headers an alert shares with others of its rule: priority, rule and
/// source, and the hostname and message id keys with empty values (the
/// map's room for them: replacing them does not grow it).
fn rule_headers(event: &FalcoEvent) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(PRIORITY_NAME, event.priority.as_str());
    headers.insert(RULE_NAME, header_value(&event.rule));
    headers.insert(SOURCE_NAME, header_value(&event.source));
    headers.insert(HOSTNAME_NAME, "");
    headers.insert(MSG_ID_NAME, "");
    headers
}

thread_local! {
    /// A memo, not state: alerts repeat a few rules, and cloning a
    /// remembered header map costs less than building one (async-nats
    /// hashes each name with SipHash and grows its map twice). The
    /// [`rule_headers`] of recent (priority, rule, source): keyed by the
    /// rule, not the host, since a bridge behind a Service hears from every
    /// node. Per thread, so no lock; what it returns depends on the alert
    /// alone.
    static FILTER_HEADERS: std::cell::RefCell<Memo<(Priority, String, String, HeaderMap)>> =
        std::cell::RefCell::new(Memo::default());
}

/// Longest header value, in bytes: a consumer filters on these, and no
/// alert field may make a message grow without bound.
pub const MAX_HEADER_VALUE: usize = 1024;

/// Header values may not hold control characters (a CR or LF would end the
/// header): they become spaces. Values are cut at [`MAX_HEADER_VALUE`] bytes
/// (on a character boundary).
fn header_value(value: &str) -> String {
    // The common case, printable ASCII within the limit, is copied whole.
    if value.len() <= MAX_HEADER_VALUE && value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len().min(MAX_HEADER_VALUE));
    for c in value.chars() {
        if out.len() + c.len_utf8() > MAX_HEADER_VALUE {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn headers_carry_the_filter_fields_and_a_stable_id() {
        let event = FalcoEvent {
            payload: Bytes::from_static(br#"{"rule":"x"}"#),
            priority: Priority::Critical,
            rule: "Evil\r\nPUB x 0\r\n".into(),
            hostname: "node-1".into(),
            source: "syscall".into(),
            received_at: std::time::Instant::now(),
        };
        let h = alert_headers(&event, "falco.x", None);
        assert_eq!(
            h.get(header::PRIORITY).map(|v| v.as_str()),
            Some("Critical")
        );
        assert_eq!(
            h.get(header::RULE).map(|v| v.as_str()),
            Some("Evil  PUB x 0  ")
        );
        assert_eq!(h.get(header::HOSTNAME).map(|v| v.as_str()), Some("node-1"));
        assert_eq!(h.get(header::SOURCE).map(|v| v.as_str()), Some("syscall"));
        assert_eq!(
            h.get(header::MSG_ID).map(|v| v.to_string()),
            Some(event.msg_id())
        );
        let long = header_value(&"é".repeat(5000));
        assert!(long.len() <= MAX_HEADER_VALUE && long.len() >= MAX_HEADER_VALUE - 1);
        assert!(long.chars().all(|c| c == 'é'));
        assert!(h.get(crate::signing::SIGNATURE_HEADER).is_none());
        // Signed: over the subject given, which the verifier checks.
        let (seed, public) = crate::signing::generate();
        let signer = Signer::from_seed(&seed).unwrap();
        let signed = alert_headers(&event, "falco.critical.evil", Some(&signer));
        let verifier = crate::signing::Verifier::from_public_keys([public.as_str()]).unwrap();
        let check = |subject| verifier.verify(subject, &event.payload, Some(&signed));
        assert_eq!(
            check("falco.critical.evil").map(|s| s.key),
            Ok(public.as_str())
        );
        assert!(check("falco.x").is_err());
    }

    #[test]
    fn remembered_headers_are_the_alerts_own() {
        let alert = |rule: &str, host: &str| {
            let line = format!(
                r#"{{"hostname":"{host}","output":"x","priority":"Notice","rule":"{rule}","source":"syscall","time":"2023-05-25T13:44:05.478445995Z"}}"#
            );
            FalcoEvent::from_json(bytes::Bytes::from(line)).unwrap()
        };
        // More combinations than are remembered, each seen twice, in turns.
        for round in 0..3 {
            for i in 0..(crate::nats::memo::ENTRIES * 2) {
                let event = alert(&format!("rule {}", i % 80), &format!("node-{}", i % 7));
                let headers = alert_headers(&event, "falco.x", None);
                let mut expected = HeaderMap::new();
                expected.insert(header::PRIORITY, "Notice");
                expected.insert(header::RULE, event.rule.as_str());
                expected.insert(header::HOSTNAME, event.hostname.as_str());
                expected.insert(header::SOURCE, "syscall");
                expected.insert(header::MSG_ID, event.msg_id());
                assert_eq!(headers, expected, "round {round}, alert {i}");
            }
        }
    }

    #[test]
    fn header_values_lose_control_characters_and_length_either_way() {
        assert_eq!(
            header_value("Terminal shell in container"),
            "Terminal shell in container"
        );
        assert_eq!(header_value("a\r\nb\tc\u{7f}d\u{85}e"), "a  b c d e");
        assert_eq!(header_value(&"x".repeat(5000)).len(), MAX_HEADER_VALUE);
        assert_eq!(
            header_value(&"x".repeat(MAX_HEADER_VALUE)).len(),
            MAX_HEADER_VALUE
        );
        assert_eq!(header_value("naïve"), "naïve");
    }
}
