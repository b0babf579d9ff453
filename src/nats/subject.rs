//! [`SubjectTemplate`]: the NATS subject an alert is published on.
//!
//! The default `falco.{priority}.{rule}` is falcosidekick's subject, so
//! existing `falco.critical.>` subscribers keep working; `FALCO` is the flat
//! subject of the 2018 proof of concept. Every placeholder value is made a
//! safe subject token: lower-cased, each run of characters outside `[a-z0-9]`
//! replaced by one `_`, leading and trailing `_` trimmed, `unknown` if empty,
//! and at most [`MAX_TOKEN`] bytes: a longer token is cut and ends with a
//! digest of the whole, so distinct long names stay distinct and no subject
//! comes near the server's 4,096-byte control line, whatever an alert holds.

use std::fmt;
use std::str::FromStr;

use crate::event::FalcoEvent;
use crate::nats::memo::Memo;
use crate::priority::Priority;

/// The default subject template.
pub const DEFAULT_SUBJECT: &str = "falco.{priority}.{rule}";

/// Longest subject token a placeholder becomes, in bytes.
pub const MAX_TOKEN: usize = 128;

/// Longest subject template, in bytes: with four placeholders at
/// [`MAX_TOKEN`], a subject stays far below the server's control-line limit.
pub const MAX_TEMPLATE: usize = 1024;

/// A parsed subject template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Priority,
    Rule,
    Hostname,
    Source,
}

/// A subject template that cannot produce valid NATS subjects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject template is empty")]
    Empty,
    #[error("unknown placeholder {{{0}}} in subject template (use {{priority}}, {{rule}}, {{hostname}} or {{source}})")]
    UnknownPlaceholder(String),
    #[error("unclosed '{{' in subject template {0:?}")]
    Unclosed(String),
    #[error("subject template {0:?} has an empty token, whitespace or a wildcard")]
    InvalidToken(String),
    #[error("subject template is longer than {MAX_TEMPLATE} bytes")]
    TooLong,
}

impl FromStr for SubjectTemplate {
    type Err = SubjectError;

    fn from_str(template: &str) -> Result<Self, Self::Err> {
        if template.is_empty() {
            return Err(SubjectError::Empty);
        }
        if template.len() > MAX_TEMPLATE {
            return Err(SubjectError::TooLong);
        }
        let bad_token = template
            .split('.')
            .any(|t| t.is_empty() || t == "*" || t == ">" || t.chars().any(|c| c.is_whitespace()));
        if bad_token {
            return Err(SubjectError::InvalidToken(template.to_owned()));
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| SubjectError::Unclosed(template.to_owned()))?;
            parts.push(match &after[..close] {
                "priority" => Part::Priority,
                "rule" => Part::Rule,
                "hostname" => Part::Hostname,
                "source" => Part::Source,
                other => return Err(SubjectError::UnknownPlaceholder(other.to_owned())),
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(SubjectTemplate {
            source: template.to_owned(),
            parts,
        })
    }
}

impl fmt::Display for SubjectTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// [`DEFAULT_SUBJECT`], built as its parts (a test checks it parses the same).
impl Default for SubjectTemplate {
    fn default() -> Self {
        SubjectTemplate {
            source: DEFAULT_SUBJECT.to_owned(),
            parts: vec![
                Part::Literal("falco.".into()),
                Part::Priority,
                Part::Literal(".".into()),
                Part::Rule,
            ],
        }
    }
}

impl SubjectTemplate {
    /// The subject for one alert.
    pub fn render(&self, event: &FalcoEvent) -> String {
        let mut out = String::with_capacity(self.source.len() + event.rule.len());
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Priority => out.push_str(event.priority.as_lower_str()),
                Part::Rule => push_token(&mut out, &event.rule),
                Part::Hostname => push_token(&mut out, &event.hostname),
                Part::Source => push_token(&mut out, &event.source),
            }
        }
        out
    }

    /// [`SubjectTemplate::render`] as the `Subject` async-nats publishes
    /// on, remembered per thread for recent (template, priority, rule, and
    /// hostname and source where the template uses them): alerts repeat a
    /// few rules, and a remembered subject is a shared buffer whose clone
    /// is a reference count, where rendering one walks the rule character
    /// by character and allocates twice.
    pub fn subject(&self, event: &FalcoEvent) -> async_nats::Subject {
        let host = if self.uses(&Part::Hostname) {
            event.hostname.as_str()
        } else {
            ""
        };
        let source = if self.uses(&Part::Source) {
            event.source.as_str()
        } else {
            ""
        };
        RENDERED.with(|memo| {
            let mut memo = memo.borrow_mut();
            let (.., subject) = memo.get_or_make(
                |(t, p, r, h, s, _)| {
                    *p == event.priority
                        && r == &event.rule
                        && h == host
                        && s == source
                        && t == &self.source
                },
                || {
                    let subject = async_nats::Subject::from(self.render(event));
                    let (host, source) = (host.to_owned(), source.to_owned());
                    (
                        self.source.clone(),
                        event.priority,
                        event.rule.clone(),
                        host,
                        source,
                        subject,
                    )
                },
            );
            subject.clone()
        })
    }

    fn uses(&self, part: &Part) -> bool {
        self.parts
            .iter()
            .any(|p| std::mem::discriminant(p) == std::mem::discriminant(part))
    }

    /// Subjects that cover everything this template can produce, for a
    /// JetStream stream: one per priority when the template has a
    /// `{priority}` token, `*` for the tokens of the other placeholders.
    pub fn stream_subjects(&self) -> Vec<String> {
        let tokens: Vec<&str> = self.source.split('.').collect();
        let has_priority_token = tokens.contains(&"{priority}");
        let render = |priority: Option<Priority>| -> String {
            tokens
                .iter()
                .map(|t| match (priority, *t) {
                    (Some(p), "{priority}") => p.as_lower_str(),
                    (_, t) if t.contains('{') => "*",
                    (_, t) => t,
                })
                .collect::<Vec<_>>()
                .join(".")
        };
        if has_priority_token {
            Priority::ALL.iter().map(|p| render(Some(*p))).collect()
        } else {
            vec![render(None)]
        }
    }
}

/// (template, priority, rule, hostname or "", source or "", subject)
type Rendered = (
    String,
    Priority,
    String,
    String,
    String,
    async_nats::Subject,
);

thread_local! {
    /// A memo, not state: what it returns depends on the template and the
    /// alert alone. Per thread, so no lock.
    static RENDERED: std::cell::RefCell<Memo<Rendered>> = std::cell::RefCell::new(Memo::default());
}

/// Appends `value` as one subject token (see the module docs).
fn push_token(out: &mut String, value: &str) {
    let start = out.len();
    let mut pending_sep = false;
    for c in value.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if pending_sep && out.len() > start {
                out.push('_');
            }
            pending_sep = false;
            out.push(c);
        } else {
            pending_sep = true;
        }
    }
    if out.len() == start {
        out.push_str("unknown");
    }
    if out.len() - start > MAX_TOKEN {
        // The token is ASCII: any byte index is a character boundary.
        let digest = xxhash_rust::xxh3::xxh3_64(&out.as_bytes()[start..]) as u32;
        out.truncate(start + MAX_TOKEN - 9);
        out.push_str(&format!("_{digest:08x}"));
    }
}

/// Whether the subject filter `filter` (with `*` and `>` wildcards) takes
/// every subject `subject` stands for (itself possibly with `*` tokens).
pub fn covers(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b && a != "*" && a != ">" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `subject` is `prefix` or below it.
pub fn is_under(subject: &str, prefix: &str) -> bool {
    subject
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Whether `subject` is below `prefix` (`prefix.>`), not `prefix` itself.
pub fn is_below(subject: &str, prefix: &str) -> bool {
    subject
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.len() > 1 && rest.starts_with('.'))
}

/// `value` as one subject token (see the module docs).
pub fn slug(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    push_token(&mut out, value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn event(priority: Priority, rule: &str, hostname: &str, source: &str) -> FalcoEvent {
        FalcoEvent {
            payload: Bytes::new(),
            priority,
            rule: rule.into(),
            hostname: hostname.into(),
            source: source.into(),
            received_at: std::time::Instant::now(),
        }
    }

    /// The remembered subject is always the rendered one: across
    /// templates (two bridges in one process), hosts and sources where a
    /// template uses them, and more combinations than are remembered.
    #[test]
    fn remembered_subjects_are_the_rendered_ones() {
        let templates: Vec<SubjectTemplate> = [
            DEFAULT_SUBJECT,
            "alerts.{hostname}.{rule}",
            "x.{source}.{priority}",
            "FALCO",
        ]
        .iter()
        .map(|t| t.parse().unwrap())
        .collect();
        for round in 0..3 {
            for i in 0..100 {
                let e = event(
                    Priority::ALL[i % 8],
                    &format!("Rule {}", i % 70),
                    &format!("node-{}", i % 3),
                    ["syscall", "k8s_audit"][i % 2],
                );
                for t in &templates {
                    assert_eq!(
                        t.subject(&e).as_str(),
                        t.render(&e),
                        "round {round}, {i}, {t}"
                    );
                }
            }
        }
    }

    #[test]
    fn slugs_like_falcosidekick() {
        assert_eq!(
            slug("Terminal shell in container"),
            "terminal_shell_in_container"
        );
        assert_eq!(slug("  Write below /etc!! "), "write_below_etc");
        assert_eq!(slug("Règle n°1"), "r_gle_n_1");
        assert_eq!(slug("k8s_audit"), "k8s_audit");
        assert_eq!(slug("node-1.example.com"), "node_1_example_com");
        assert_eq!(slug("***"), "unknown");
        assert_eq!(slug(""), "unknown");
    }

    #[test]
    fn long_values_make_bounded_distinct_tokens() {
        let a = slug(&"Rule ".repeat(1000));
        let b = slug(&format!("{}x", "Rule ".repeat(1000)));
        assert_eq!(a.len(), MAX_TOKEN);
        assert_eq!(b.len(), MAX_TOKEN);
        assert_ne!(a, b);
        assert!(a.starts_with("rule_rule_"), "{a}");
        assert_eq!(slug(&"r".repeat(MAX_TOKEN)), "r".repeat(MAX_TOKEN));
        let long = "x".repeat(MAX_TEMPLATE + 1);
        assert_eq!(long.parse::<SubjectTemplate>(), Err(SubjectError::TooLong));
    }

    #[test]
    fn renders_the_default_template() {
        let t = SubjectTemplate::default();
        assert_eq!(Ok(t.clone()), DEFAULT_SUBJECT.parse::<SubjectTemplate>());
        let ev = event(
            Priority::Notice,
            "Terminal shell in container",
            "h",
            "syscall",
        );
        assert_eq!(t.render(&ev), "falco.notice.terminal_shell_in_container");
    }

    #[test]
    fn renders_every_placeholder_and_the_flat_subject() {
        let t: SubjectTemplate = "alerts.{hostname}.{source}.{priority}.{rule}"
            .parse()
            .unwrap();
        let ev = event(
            Priority::Critical,
            "Read sensitive file",
            "Node-1.local",
            "k8s_audit",
        );
        assert_eq!(
            t.render(&ev),
            "alerts.node_1_local.k8s_audit.critical.read_sensitive_file"
        );
        let flat: SubjectTemplate = "FALCO".parse().unwrap();
        assert_eq!(flat.render(&ev), "FALCO");
        assert_eq!(flat.stream_subjects(), vec!["FALCO".to_owned()]);
    }

    #[test]
    fn rejects_bad_templates() {
        assert_eq!("".parse::<SubjectTemplate>(), Err(SubjectError::Empty));
        assert!(
            matches!("falco.{prio}".parse::<SubjectTemplate>(), Err(SubjectError::UnknownPlaceholder(p)) if p == "prio")
        );
        assert!(matches!(
            "falco.{rule".parse::<SubjectTemplate>(),
            Err(SubjectError::Unclosed(_))
        ));
        for bad in ["falco..x", "falco.>", "falco.*", "fal co", ".falco"] {
            assert!(
                matches!(
                    bad.parse::<SubjectTemplate>(),
                    Err(SubjectError::InvalidToken(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn filters_cover_subjects() {
        assert!(covers("falco.>", "falco.critical.*"));
        assert!(covers("falco.*.*", "falco.critical.*"));
        assert!(covers("falco.critical.*", "falco.critical.*"));
        assert!(covers("FALCO", "FALCO"));
        assert!(!covers("falco.critical.*", "falco.error.*"));
        assert!(
            !covers("falco.*.rule", "falco.error.*"),
            "a literal does not take every rule"
        );
        assert!(!covers("falco.*", "falco.critical.*"));
        assert!(!covers("falco.>", "falco"));
        assert!(!covers("falco.*.*.*", "falco.critical.*"));
    }

    #[test]
    fn stream_subjects_cover_the_template_and_not_response_subjects() {
        let t = SubjectTemplate::default();
        let subjects = t.stream_subjects();
        assert_eq!(subjects.len(), 8);
        assert!(subjects.contains(&"falco.critical.*".to_owned()));
        assert!(!subjects.iter().any(|s| s.starts_with("falco.response")));
        let t: SubjectTemplate = "falco.{hostname}.{rule}".parse().unwrap();
        assert_eq!(t.stream_subjects(), vec!["falco.*.*".to_owned()]);
    }
}
