//! [`Alert`]: the parts of a Falco JSON alert that the responder decides on.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::priority::Priority;

/// A Falco alert as the responder reads it off NATS.
#[derive(Debug, Clone)]
pub struct Alert {
    pub rule: String,
    pub priority: Priority,
    pub tags: Vec<String>,
    pub source: String,
    pub hostname: String,
    pub time: String,
    pub output_fields: BTreeMap<String, Value>,
}

/// A message that is not a Falco alert.
#[derive(Debug, thiserror::Error)]
pub enum MalformedAlert {
    #[error("not a JSON Falco alert: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Priority(#[from] crate::priority::PriorityError),
}

#[derive(Deserialize)]
struct Raw {
    rule: String,
    priority: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    output_fields: Option<BTreeMap<String, Value>>,
}

impl Alert {
    pub fn from_json(payload: &[u8]) -> Result<Self, MalformedAlert> {
        let raw: Raw = serde_json::from_slice(payload)?;
        Ok(Alert {
            priority: raw.priority.parse()?,
            rule: raw.rule,
            tags: raw.tags.unwrap_or_default(),
            source: raw.source.unwrap_or_else(|| "syscall".into()),
            hostname: raw.hostname.unwrap_or_default(),
            time: raw.time.unwrap_or_default(),
            output_fields: raw.output_fields.unwrap_or_default(),
        })
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

    /// The pod the alert is about: namespace, name and, when present, UID.
    pub fn pod(&self) -> Option<PodRef> {
        let namespace = self.field("k8s.ns.name").filter(|s| !s.is_empty())?;
        let name = self.field("k8s.pod.name").filter(|s| !s.is_empty())?;
        Some(PodRef {
            namespace,
            name,
            uid: self.field("k8s.pod.uid").filter(|s| !s.is_empty()),
        })
    }
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
            a.pod(),
            Some(PodRef {
                namespace: "shop".into(),
                name: "web".into(),
                uid: None
            })
        );
        assert_eq!(a.field("proc.pid").as_deref(), Some("42"));
        assert_eq!(a.field("x"), None);
        assert_eq!(a.source, "syscall");
    }

    #[test]
    fn malformed_alerts_are_errors() {
        assert!(Alert::from_json(b"nope").is_err());
        assert!(Alert::from_json(br#"{"rule":"r"}"#).is_err());
        assert!(Alert::from_json(br#"{"rule":"r","priority":"Severe"}"#).is_err());
        let no_pod = Alert::from_json(br#"{"rule":"r","priority":"Debug"}"#).unwrap();
        assert_eq!(no_pod.pod(), None);
    }
}
