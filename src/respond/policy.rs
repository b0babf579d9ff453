//! The response policy: which alerts lead to which actions.
//!
//! A YAML file of rules, evaluated in order. A rule matches when every
//! condition it sets holds (rule names: any of them; priority with a
//! comparator; tags: all of them; source; `output_fields` conditions); it
//! lists actions, may be a dry run, and stops the evaluation unless it says
//! `continue: true`. Errors name the file, line and column.
//!
//! ```yaml
//! rules:
//!   - name: kill shells in production
//!     match:
//!       rules: ["Terminal shell in container", "Drop and execute new binary in container"]
//!       priority: ">=Notice"
//!       tags: [container]
//!       source: syscall
//!       output_fields:
//!         - "k8s.ns.name in (prod, payments)"
//!         - "k8s.pod.name exists"
//!     actions:
//!       - action: delete-pod
//!         grace_period_seconds: 0
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use super::workload::MinHealthy;
use crate::alert::Alert;
use crate::decision::Action;
use crate::priority::Priority;

/// A validated policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub rules: Vec<PolicyRule>,
}

/// One rule of the policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matcher: Match,
    pub actions: Vec<ActionSpec>,
    /// Decide and report, but write nothing to Kubernetes.
    #[serde(default)]
    pub dry_run: bool,
    /// Evaluate later rules too when this one matches.
    #[serde(default, rename = "continue")]
    pub continue_after: bool,
    /// Healthy replicas `delete-pod` leaves the pod's workload at least (a
    /// number or a percentage); unset: the responder's
    /// `--min-healthy-replicas`.
    #[serde(default)]
    pub min_healthy_replicas: Option<MinHealthy>,
}

/// What an alert must look like for a rule to apply. Unset parts match anything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Falco rule names; the alert's rule must be one of them.
    #[serde(default)]
    pub rules: Vec<String>,
    #[serde(default)]
    pub priority: Option<PriorityMatch>,
    /// Tags the alert must all carry.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Event sources; the alert's must be one of them.
    #[serde(default, deserialize_with = "one_or_many")]
    pub source: Vec<String>,
    /// Conditions on `output_fields`, all of which must hold.
    #[serde(default)]
    pub output_fields: Vec<Condition>,
}

/// An action a rule takes on the alert's pod.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ActionSpec {
    /// Delete the pod, with the pod's UID as a precondition when the alert has it.
    DeletePod {
        /// Seconds the pod gets to stop; 0 kills it at once. Negative or
        /// out-of-range values are policy errors, never a silent 0.
        #[serde(default, deserialize_with = "grace_period")]
        grace_period_seconds: u32,
    },
    /// Add labels to the pod (a merge patch).
    LabelPod {
        #[serde(default = "quarantine_labels")]
        labels: BTreeMap<String, String>,
    },
    /// Label the pod and make sure a deny-all NetworkPolicy selects that label.
    IsolatePod {
        #[serde(default = "quarantine_labels")]
        labels: BTreeMap<String, String>,
    },
    /// Only log (and report) the decision.
    Log,
}

/// The label `label-pod` and `isolate-pod` set unless told otherwise.
pub fn quarantine_labels() -> BTreeMap<String, String> {
    BTreeMap::from([("falco-nats/quarantine".to_owned(), "true".to_owned())])
}

impl ActionSpec {
    /// Which action this is.
    pub fn kind(&self) -> Action {
        match self {
            ActionSpec::DeletePod { .. } => Action::DeletePod,
            ActionSpec::LabelPod { .. } => Action::LabelPod,
            ActionSpec::IsolatePod { .. } => Action::IsolatePod,
            ActionSpec::Log => Action::Log,
        }
    }

    /// The action's name, as written in policies and result subjects.
    pub fn name(&self) -> &'static str {
        self.kind().as_str()
    }

    /// Whether the action removes or cuts off a workload (rate limited).
    pub fn is_destructive(&self) -> bool {
        matches!(
            self,
            ActionSpec::DeletePod { .. } | ActionSpec::IsolatePod { .. }
        )
    }

    /// Whether the action needs the alert to name a pod.
    pub fn needs_pod(&self) -> bool {
        !matches!(self, ActionSpec::Log)
    }
}

/// A grace period: seconds from 0 to 4,294,967,295, said so when out of range.
fn grace_period<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let seconds = i64::deserialize(d)?;
    u32::try_from(seconds).map_err(|_| {
        serde::de::Error::custom(format!(
            "grace_period_seconds {seconds} is out of range (0 to {})",
            u32::MAX
        ))
    })
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// A priority comparison such as `>=Critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PriorityMatch {
    pub op: Comparator,
    pub priority: Priority,
}

/// How an alert's priority compares with the policy's (by severity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparator {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

/// A policy text that does not say what it must: the message names the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyTextError {
    #[error(transparent)]
    Priority(#[from] crate::priority::PriorityError),
    #[error("condition {0:?}: {CONDITION_HELP}")]
    Condition(String),
    #[error("condition {0:?} names no field")]
    NoField(String),
    #[error("a list must be in parentheses: {0:?}")]
    NotAList(String),
    #[error("empty list")]
    EmptyList,
    #[error("invalid label prefix in {0:?}")]
    LabelPrefix(String),
    #[error("invalid label key {0:?}")]
    LabelKey(String),
    #[error("invalid label value {value:?} for {key:?}")]
    LabelValue { key: String, value: String },
}

impl TryFrom<String> for PriorityMatch {
    type Error = PolicyTextError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        let t = s.trim();
        let (op, rest) = [
            (">=", Comparator::Ge),
            ("<=", Comparator::Le),
            ("!=", Comparator::Ne),
            ("==", Comparator::Eq),
            (">", Comparator::Gt),
            ("<", Comparator::Lt),
            ("=", Comparator::Eq),
        ]
        .iter()
        .find_map(|(p, op)| t.strip_prefix(p).map(|rest| (*op, rest)))
        .unwrap_or((Comparator::Eq, t));
        let priority = rest.trim().parse::<Priority>()?;
        Ok(PriorityMatch { op, priority })
    }
}

impl PriorityMatch {
    pub fn matches(&self, p: Priority) -> bool {
        match self.op {
            Comparator::Eq => p == self.priority,
            Comparator::Ne => p != self.priority,
            Comparator::Gt => p > self.priority,
            Comparator::Ge => p >= self.priority,
            Comparator::Lt => p < self.priority,
            Comparator::Le => p <= self.priority,
        }
    }
}

/// A condition on one `output_fields` entry, such as `k8s.ns.name != falco`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Condition {
    pub field: String,
    pub test: FieldTest,
}

/// What a [`Condition`] checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldTest {
    Exists,
    NotExists,
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    StartsWith(String),
    Contains(String),
}

const CONDITION_HELP: &str = "expected `FIELD = VALUE`, `!=`, `in (A, B)`, `not in (A, B)`, `startswith`, `contains`, `exists` or `not exists`";

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner.to_owned();
        }
    }
    s.to_owned()
}

fn parse_list(s: &str) -> Result<Vec<String>, PolicyTextError> {
    let s = s.trim();
    let inner = s
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| PolicyTextError::NotAList(s.to_owned()))?;
    let items: Vec<String> = inner
        .split(',')
        .map(unquote)
        .filter(|v| !v.is_empty())
        .collect();
    if items.is_empty() {
        return Err(PolicyTextError::EmptyList);
    }
    Ok(items)
}

impl TryFrom<String> for Condition {
    type Error = PolicyTextError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        let t = s.trim();
        let (field, rest) = t
            .split_once(|c: char| c.is_whitespace() || c == '=' || c == '!')
            .map(|(f, _)| (f, t[f.len()..].trim_start()))
            .ok_or_else(|| PolicyTextError::Condition(t.to_owned()))?;
        if field.is_empty() {
            return Err(PolicyTextError::NoField(t.to_owned()));
        }
        let word = |w: &str| -> Option<&str> {
            let r = rest.strip_prefix(w)?;
            (r.is_empty() || r.starts_with(char::is_whitespace) || r.starts_with('(')).then_some(r)
        };
        let test = if rest == "exists" {
            FieldTest::Exists
        } else if rest == "not exists" {
            FieldTest::NotExists
        } else if let Some(r) = word("not in") {
            FieldTest::NotIn(parse_list(r)?)
        } else if let Some(r) = word("in") {
            FieldTest::In(parse_list(r)?)
        } else if let Some(r) = word("startswith") {
            FieldTest::StartsWith(unquote(r))
        } else if let Some(r) = word("contains") {
            FieldTest::Contains(unquote(r))
        } else if let Some(r) = rest.strip_prefix("!=") {
            FieldTest::NotEquals(unquote(r))
        } else if let Some(r) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
            FieldTest::Equals(unquote(r))
        } else {
            return Err(PolicyTextError::Condition(t.to_owned()));
        };
        Ok(Condition {
            field: field.to_owned(),
            test,
        })
    }
}

impl Condition {
    pub fn holds(&self, alert: &Alert) -> bool {
        let value = alert.field(&self.field);
        match (&self.test, value.as_deref()) {
            (FieldTest::Exists, v) => v.is_some(),
            (FieldTest::NotExists, v) => v.is_none(),
            (FieldTest::Equals(x), Some(v)) => v == x,
            (FieldTest::NotEquals(x), Some(v)) => v != x,
            // A missing field differs from any value.
            (FieldTest::NotEquals(_), None) => true,
            (FieldTest::In(xs), Some(v)) => xs.iter().any(|x| x == v),
            (FieldTest::NotIn(_), None) => true,
            (FieldTest::NotIn(xs), Some(v)) => !xs.iter().any(|x| x == v),
            (FieldTest::StartsWith(x), Some(v)) => v.starts_with(x.as_str()),
            (FieldTest::Contains(x), Some(v)) => v.contains(x.as_str()),
            (_, None) => false,
        }
    }
}

impl Match {
    pub fn matches(&self, alert: &Alert) -> bool {
        (self.rules.is_empty() || self.rules.contains(&alert.rule))
            && self.priority.is_none_or(|p| p.matches(alert.priority))
            && self.tags.iter().all(|t| alert.tags.contains(t))
            && (self.source.is_empty() || self.source.contains(&alert.source))
            && self.output_fields.iter().all(|c| c.holds(alert))
    }
}

/// A policy that cannot be used, with where the problem is.
#[derive(Debug, thiserror::Error)]
pub struct PolicyError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl Policy {
    /// The 2018 proof of concept's behaviour: delete the pod of every alert
    /// at or above `Critical`.
    pub fn proof_of_concept() -> Self {
        Policy {
            rules: vec![PolicyRule {
                name: "delete the pod on Critical or higher".into(),
                matcher: Match {
                    priority: Some(PriorityMatch {
                        op: Comparator::Ge,
                        priority: Priority::Critical,
                    }),
                    ..Match::default()
                },
                actions: vec![ActionSpec::DeletePod {
                    grace_period_seconds: 0,
                }],
                dry_run: false,
                continue_after: false,
                min_healthy_replicas: None,
            }],
        }
    }

    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: file.clone(),
            line: None,
            column: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&file, &text)
    }

    /// What `respond --check` says of a valid policy: its rules, each with
    /// its actions.
    pub fn summary(&self, file: &str) -> String {
        let mut out = format!("{file}: OK, {} rules", self.rules.len());
        for rule in &self.rules {
            let actions: Vec<&str> = rule.actions.iter().map(|a| a.name()).collect();
            let dry = if rule.dry_run { " (dry run)" } else { "" };
            out.push_str(&format!("\n  {}: {}{dry}", rule.name, actions.join(", ")));
        }
        out
    }

    /// Parses and validates policy YAML; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, PolicyError> {
        let policy: Policy = serde_norway::from_str(text).map_err(|e| {
            let location = e.location();
            PolicyError {
                file: file.to_owned(),
                line: location.as_ref().map(|l| l.line()),
                column: location.as_ref().map(|l| l.column()),
                message: strip_location(&e.to_string()),
            }
        })?;
        policy.validate(file, text)?;
        Ok(policy)
    }

    fn validate(&self, file: &str, text: &str) -> Result<(), PolicyError> {
        let error = |rule: &str, message: String| PolicyError {
            file: file.to_owned(),
            line: line_of(text, rule),
            column: None,
            message,
        };
        if self.rules.is_empty() {
            return Err(PolicyError {
                file: file.to_owned(),
                line: None,
                column: None,
                message: "the policy has no rules".into(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for rule in &self.rules {
            if rule.name.trim().is_empty() {
                return Err(error(&rule.name, "a rule has an empty name".into()));
            }
            if !seen.insert(rule.name.as_str()) {
                return Err(error(
                    &rule.name,
                    format!("rule {:?} is defined twice", rule.name),
                ));
            }
            if rule.actions.is_empty() {
                return Err(error(
                    &rule.name,
                    format!("rule {:?} has no actions", rule.name),
                ));
            }
            for action in &rule.actions {
                match action {
                    ActionSpec::LabelPod { labels } | ActionSpec::IsolatePod { labels } => {
                        if labels.is_empty() {
                            return Err(error(
                                &rule.name,
                                format!(
                                    "rule {:?}: {} needs at least one label",
                                    rule.name,
                                    action.name()
                                ),
                            ));
                        }
                        for (k, v) in labels {
                            check_label(k, v).map_err(|m| {
                                error(&rule.name, format!("rule {:?}: {m}", rule.name))
                            })?;
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The rules that apply to `alert`, in order, up to the first one that
    /// matches without `continue: true`.
    pub fn evaluate(&self, alert: &Alert) -> Vec<&PolicyRule> {
        let mut out = Vec::new();
        for rule in &self.rules {
            if rule.matcher.matches(alert) {
                out.push(rule);
                if !rule.continue_after {
                    break;
                }
            }
        }
        out
    }
}

/// serde's messages end in "at line L column C"; the error shows those apart.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The line (from 1) of the rule named `name`, for errors found after parsing.
fn line_of(text: &str, name: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start().trim_start_matches("- ").trim_start();
            l.strip_prefix("name:")
                .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'') == name)
                .unwrap_or(false)
        })
        .map(|i| i + 1)
}

/// Kubernetes label rules: an optional DNS prefix and `/`, a name of at most
/// 63 characters; values of at most 63 characters; alphanumerics, `-_.`.
fn check_label(key: &str, value: &str) -> Result<(), PolicyTextError> {
    let ok_chars = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let ok_ends = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() || prefix.len() > 253 || !ok_chars(prefix) {
                return Err(PolicyTextError::LabelPrefix(key.to_owned()));
            }
            name
        }
        None => key,
    };
    if name.is_empty() || name.len() > 63 || !ok_chars(name) || !ok_ends(name) {
        return Err(PolicyTextError::LabelKey(key.to_owned()));
    }
    if value.len() > 63 || !ok_chars(value) || (!value.is_empty() && !ok_ends(value)) {
        return Err(PolicyTextError::LabelValue {
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(json: &str) -> Alert {
        Alert::from_json(json.as_bytes()).unwrap()
    }

    const POLICY: &str = r#"
rules:
  - name: ignore falco itself
    match:
      output_fields: ["k8s.ns.name = falco"]
    actions: [{action: log}]
  - name: quarantine
    match:
      rules: ["Terminal shell in container"]
      priority: ">=Notice"
      tags: [container, shell]
      source: syscall
      output_fields:
        - "k8s.ns.name in (shop, 'payments')"
        - "k8s.pod.name exists"
        - "container.image.repository startswith docker.io/"
    actions:
      - action: label-pod
        labels: {quarantine: "true"}
    continue: true
  - name: delete criticals
    match:
      priority: ">=Critical"
      output_fields: ["k8s.ns.name != kube-system", "k8s.pod.uid not exists"]
    actions:
      - action: delete-pod
        grace_period_seconds: 5
    dry_run: true
"#;

    #[test]
    fn parses_and_evaluates_in_order() {
        let p = Policy::parse("p.yaml", POLICY).unwrap();
        assert_eq!(p.rules.len(), 3);
        assert_eq!(
            p.rules[2].actions,
            vec![ActionSpec::DeletePod {
                grace_period_seconds: 5
            }]
        );
        let shell = alert(
            r#"{"rule":"Terminal shell in container","priority":"Critical","tags":["container","shell","T1059"],"source":"syscall","output_fields":{"k8s.ns.name":"shop","k8s.pod.name":"web","container.image.repository":"docker.io/library/nginx"}}"#,
        );
        let names: Vec<&str> = p.evaluate(&shell).iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["quarantine", "delete criticals"]);

        let falco = alert(
            r#"{"rule":"Terminal shell in container","priority":"Critical","output_fields":{"k8s.ns.name":"falco","k8s.pod.name":"f"}}"#,
        );
        let names: Vec<&str> = p.evaluate(&falco).iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["ignore falco itself"],
            "a matching rule without continue stops"
        );

        let notice =
            alert(r#"{"rule":"Other","priority":"Notice","output_fields":{"k8s.ns.name":"shop"}}"#);
        assert!(p.evaluate(&notice).is_empty());
    }

    #[test]
    fn priority_comparators() {
        let m = |s: &str| PriorityMatch::try_from(s.to_owned()).unwrap();
        assert!(m(">=Critical").matches(Priority::Alert));
        assert!(!m(">=Critical").matches(Priority::Error));
        assert!(m("<Warning").matches(Priority::Notice));
        assert!(!m("<Warning").matches(Priority::Warning));
        assert!(m("=Notice").matches(Priority::Notice));
        assert!(m("Notice").matches(Priority::Notice));
        assert!(m("!= debug").matches(Priority::Notice));
        assert!(m("<=Error").matches(Priority::Error));
        assert!(m(">Error").matches(Priority::Critical));
        assert!(PriorityMatch::try_from(">=Severe".to_owned()).is_err());
    }

    #[test]
    fn conditions() {
        let c = |s: &str| Condition::try_from(s.to_owned()).unwrap();
        let a = alert(
            r#"{"rule":"r","priority":"Debug","output_fields":{"k8s.ns.name":"shop","proc.pid":42,"gone":null}}"#,
        );
        assert!(c("k8s.ns.name != falco").holds(&a));
        assert!(c("k8s.ns.name=shop").holds(&a));
        assert!(c("k8s.ns.name == 'shop'").holds(&a));
        assert!(c("proc.pid = 42").holds(&a));
        assert!(c("k8s.ns.name in (a, shop)").holds(&a));
        assert!(!c("k8s.ns.name not in (a, shop)").holds(&a));
        assert!(c("gone not exists").holds(&a));
        assert!(!c("gone exists").holds(&a));
        assert!(c("missing != x").holds(&a));
        assert!(!c("missing = x").holds(&a));
        assert!(c("k8s.ns.name contains ho").holds(&a));
        for bad in [
            "",
            "k8s.ns.name",
            "k8s.ns.name ~ x",
            "k8s.ns.name in a, b",
            "k8s.ns.name in ()",
        ] {
            assert!(Condition::try_from(bad.to_owned()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_carry_line_numbers() {
        let cases = [
            ("rules:\n  - name: a\n    match:\n      priority: \">=Severe\"\n    actions: [{action: log}]\n", 4, "unknown Falco priority"),
            ("rules:\n  - name: a\n    actions:\n      - action: explode-pod\n", 4, "explode-pod"),
            ("rules:\n  - name: a\n    mtach: {}\n    actions: [{action: log}]\n", 3, "mtach"),
            ("rules:\n  - name: a\n    match:\n      output_fields: [\"k8s.ns.name ~ x\"]\n    actions: [{action: log}]\n", 4, "k8s.ns.name ~ x"),
            ("rules:\n  - name: a\n    actions: []\n", 2, "no actions"),
            ("rules:\n  - name: a\n    actions: [{action: log}]\n  - name: a\n    actions: [{action: log}]\n", 2, "twice"),
            ("rules:\n  - name: a\n    actions:\n      - action: label-pod\n        labels: {\"bad key!\": x}\n", 2, "invalid label"),
            ("rules: [\n", 2, ""),
            // Too large for a grace period: an error, never an immediate kill.
            ("rules:\n  - name: a\n    actions:\n      - action: delete-pod\n        grace_period_seconds: 4294967296\n", 4, "grace_period_seconds 4294967296 is out of range"),
            ("rules:\n  - name: a\n    actions:\n      - action: delete-pod\n        grace_period_seconds: -1\n", 4, "grace_period_seconds -1 is out of range"),
        ];
        for (text, line, needle) in cases {
            let err = Policy::parse("p.yaml", text).unwrap_err();
            assert_eq!(err.line, Some(line), "{text}\n{err}");
            assert!(err.to_string().contains(needle), "{err}");
            assert!(
                err.to_string().starts_with(&format!("p.yaml:{line}")),
                "{err}"
            );
        }
    }

    #[test]
    fn default_labels_and_single_source() {
        let p = Policy::parse("p", "rules:\n  - name: a\n    match: {source: k8s_audit}\n    actions: [{action: isolate-pod}]\n").unwrap();
        assert_eq!(p.rules[0].matcher.source, vec!["k8s_audit".to_owned()]);
        assert_eq!(
            p.rules[0].actions,
            vec![ActionSpec::IsolatePod {
                labels: quarantine_labels()
            }]
        );
    }
}
