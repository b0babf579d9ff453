//! [`Alert`]: a Falco alert as its readers take it off NATS (the responder,
//! `tail`), typed once. The bridge's side is [`crate::event::FalcoEvent`],
//! which keeps the JSON as it came.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::event::DEFAULT_SOURCE;
use crate::priority::Priority;

/// A Falco alert read from its JSON.
#[derive(Debug, Clone, Deserialize)]
pub struct Alert {
    pub rule: String,
    pub priority: Priority,
    #[serde(default)]
    pub output: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    #[serde(default = "default_source")]
    pub source: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub time: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub output_fields: BTreeMap<String, Value>,
}

/// A message that is not a Falco alert.
#[derive(Debug, thiserror::Error)]
#[error("not a JSON Falco alert: {0}")]
pub struct MalformedAlert(#[from] serde_json::Error);

fn default_source() -> String {
    DEFAULT_SOURCE.to_owned()
}

/// `null` reads as the empty value, as a missing key does.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Alert {
    pub fn from_json(payload: &[u8]) -> Result<Self, MalformedAlert> {
        Ok(serde_json::from_slice(payload)?)
    }

    /// An `output_fields` value as text; `None` when missing or `null`.
    pub fn field(&self, name: &str) -> Option<String> {
        match self.output_fields.get(name)? {
            Value::Null => None,
            Value::String(s) if s == "<NA>" => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }

    /// The pod the alert is about: namespace, name and, when present, UID;
    /// `Ok(None)` when the alert names none. Every part is written by
    /// whoever controls the watched container, and `kube` joins them into
    /// request paths without encoding: a part that is not a valid Kubernetes
    /// name (a DNS-1123 label for the namespace, a DNS-1123 subdomain for
    /// the pod, UUID characters for the UID) is an error, never a request.
    pub fn pod(&self) -> Result<Option<PodRef>, InvalidName> {
        let (Some(namespace), Some(name)) = (
            self.field("k8s.ns.name").filter(|s| !s.is_empty()),
            self.field("k8s.pod.name").filter(|s| !s.is_empty()),
        ) else {
            return Ok(None);
        };
        if !is_dns1123_label(&namespace) {
            return Err(InvalidName::new("namespace", &namespace));
        }
        if !is_dns1123_subdomain(&name) {
            return Err(InvalidName::new("pod name", &name));
        }
        let uid = self.field("k8s.pod.uid").filter(|s| !s.is_empty());
        if let Some(uid) = &uid {
            if !is_uid(uid) {
                return Err(InvalidName::new("pod UID", uid));
            }
        }
        Ok(Some(PodRef {
            namespace,
            name,
            uid,
        }))
    }
}

/// A name in an alert that cannot address a Kubernetes object. Its text is
/// quoted, escaped and cut short: it comes from the watched container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {shown} is not a valid Kubernetes name")]
pub struct InvalidName {
    what: &'static str,
    shown: String,
}

impl InvalidName {
    fn new(what: &'static str, value: &str) -> Self {
        const SHOWN: usize = 80;
        let cut: String = value.chars().take(SHOWN).collect();
        let more = if value.chars().nth(SHOWN).is_some() {
            "..."
        } else {
            ""
        };
        InvalidName {
            what,
            shown: format!("{cut:?}{more}"),
        }
    }
}

/// A DNS-1123 label: at most 63 of `[a-z0-9-]`, starting and ending with
/// `[a-z0-9]` (namespaces).
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| alnum(c) || *c == b'-')
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
}

/// A DNS-1123 subdomain: at most 253 characters of dot-separated labels
/// (pod names).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// A Kubernetes UID: a UUID, or at least nothing but its characters.
fn is_uid(s: &str) -> bool {
    s.len() <= 64 && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

/// A pod named by an alert.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pod_and_fields() {
        let a = Alert::from_json(
            br#"{"rule":"r","priority":"Critical","output_fields":{"k8s.ns.name":"shop","k8s.pod.name":"web","k8s.pod.uid":null,"proc.pid":42,"x":"<NA>"}}"#,
        )
        .unwrap();
        assert_eq!(
            a.pod().unwrap(),
            Some(PodRef {
                namespace: "shop".into(),
                name: "web".into(),
                uid: None
            })
        );
        assert_eq!(a.field("proc.pid").as_deref(), Some("42"));
        assert_eq!(a.field("x"), None);
        assert_eq!(a.source, DEFAULT_SOURCE);
    }

    #[test]
    fn malformed_alerts_are_errors() {
        assert!(Alert::from_json(b"nope").is_err());
        assert!(Alert::from_json(br#"{"rule":"r"}"#).is_err());
        assert!(Alert::from_json(br#"{"rule":"r","priority":"Severe"}"#).is_err());
        let no_pod = Alert::from_json(br#"{"rule":"r","priority":"Debug"}"#).unwrap();
        assert_eq!(no_pod.pod(), Ok(None));
    }

    #[test]
    fn names_must_be_kubernetes_names() {
        for good in ["a", "shop", "a-1", "0abc", &"x".repeat(63)] {
            assert!(is_dns1123_label(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a/b",
            "..",
            &"x".repeat(64),
        ] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
        assert!(is_dns1123_subdomain("web-7d9c.v2"));
        for bad in ["web.", ".web", "a..b", "web#", "web?x", &"a.".repeat(127)] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
        let a = Alert::from_json(
            format!(
                r#"{{"rule":"r","priority":"Critical","output_fields":{{"k8s.ns.name":"shop","k8s.pod.name":"{}"}}}}"#,
                "w".repeat(500)
            )
            .as_bytes(),
        )
        .unwrap();
        let err = a.pod().unwrap_err().to_string();
        assert!(err.len() < 140 && err.contains("..."), "{err}");
    }
}
