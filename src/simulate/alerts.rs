//! Realistic Falco alerts: rules from Falco's default rule set, with the
//! Kubernetes and process fields Falco attaches, about 1 KiB of JSON each.
//!
//! Alerts are deterministic: the n-th alert of a factory is always the same
//! rule on the same pod, and `evt.num` carries n, so tests can check that
//! each alert arrives exactly once.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;

use crate::convert::event_from_response;
use crate::priority::Priority;
use crate::proto::outputs::Response;

/// A Falco rule as the simulator fires it.
struct Scenario {
    rule: &'static str,
    priority: Priority,
    tags: &'static [&'static str],
    /// The rule's message, before Falco's `(field=value ...)` suffix.
    message: &'static str,
    /// Fields beyond the common process and Kubernetes ones.
    fields: &'static [(&'static str, &'static str)],
    source: &'static str,
    /// Internal events carry no Kubernetes or process fields.
    internal: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        rule: "Terminal shell in container",
        priority: Priority::Notice,
        tags: &[
            "maturity_stable",
            "container",
            "shell",
            "mitre_execution",
            "T1059",
        ],
        message: "A shell was spawned in a container with an attached terminal",
        fields: &[
            ("evt.type", "execve"),
            ("proc.name", "bash"),
            ("proc.exepath", "/bin/bash"),
            ("proc.cmdline", "bash -il"),
            ("proc.pname", "runc"),
            ("proc.tty", "34816"),
        ],
        source: "syscall",
        internal: false,
    },
    Scenario {
        rule: "Drop and execute new binary in container",
        priority: Priority::Critical,
        tags: &[
            "maturity_stable",
            "container",
            "process",
            "mitre_persistence",
            "TA0003",
            "PCI_DSS_11.5.1",
        ],
        message: "Executing binary not part of base image",
        fields: &[
            ("evt.type", "execve"),
            ("proc.name", "xmrig"),
            ("proc.exepath", "/tmp/xmrig"),
            ("proc.cmdline", "xmrig -o pool.example:3333"),
            ("proc.pname", "sh"),
            ("proc.tty", "0"),
            ("proc.is_exe_upper_layer", "true"),
        ],
        source: "syscall",
        internal: false,
    },
    Scenario {
        rule: "Read sensitive file untrusted",
        priority: Priority::Warning,
        tags: &[
            "maturity_stable",
            "host",
            "container",
            "filesystem",
            "mitre_credential_access",
            "T1555",
        ],
        message: "Sensitive file opened for reading by non-trusted program",
        fields: &[
            ("evt.type", "openat"),
            ("fd.name", "/etc/shadow"),
            ("proc.name", "cat"),
            ("proc.exepath", "/usr/bin/cat"),
            ("proc.cmdline", "cat /etc/shadow"),
            ("proc.pname", "bash"),
            ("proc.tty", "34816"),
        ],
        source: "syscall",
        internal: false,
    },
    Scenario {
        rule: "Write below etc",
        priority: Priority::Error,
        tags: &[
            "maturity_stable",
            "host",
            "container",
            "filesystem",
            "mitre_persistence",
            "T1098",
        ],
        message: "File below /etc opened for writing",
        fields: &[
            ("evt.type", "openat"),
            ("fd.name", "/etc/ld.so.preload"),
            ("proc.name", "sh"),
            ("proc.exepath", "/bin/sh"),
            ("proc.cmdline", "sh -c echo /tmp/x.so > /etc/ld.so.preload"),
            ("proc.pname", "python3"),
            ("proc.tty", "0"),
        ],
        source: "syscall",
        internal: false,
    },
    Scenario {
        rule: "Unexpected outbound connection destination",
        priority: Priority::Notice,
        tags: &[
            "maturity_sandbox",
            "container",
            "network",
            "mitre_command_and_control",
            "TA0011",
        ],
        message: "Disallowed outbound connection destination",
        fields: &[
            ("evt.type", "connect"),
            ("fd.name", "10.244.1.17:48122->203.0.113.7:4444"),
            ("fd.sport", "48122"),
            ("fd.dport", "4444"),
            ("proc.name", "nc"),
            ("proc.exepath", "/usr/bin/nc"),
            ("proc.cmdline", "nc 203.0.113.7 4444"),
            ("proc.pname", "bash"),
            ("proc.tty", "0"),
        ],
        source: "syscall",
        internal: false,
    },
    Scenario {
        rule: "Contact K8S API Server From Container",
        priority: Priority::Notice,
        tags: &[
            "maturity_stable",
            "container",
            "network",
            "k8s",
            "mitre_discovery",
            "T1565",
        ],
        message: "Unexpected connection to K8s API Server from container",
        fields: &[
            ("evt.type", "connect"),
            ("fd.name", "10.244.1.17:51514->10.96.0.1:443"),
            ("fd.sport", "51514"),
            ("fd.dport", "443"),
            ("proc.name", "curl"),
            ("proc.exepath", "/usr/bin/curl"),
            ("proc.cmdline", "curl -k https://kubernetes.default/api"),
            ("proc.pname", "bash"),
            ("proc.tty", "0"),
        ],
        source: "syscall",
        internal: false,
    },
    Scenario {
        rule: "Falco internal: syscall event drop",
        priority: Priority::Critical,
        tags: &[],
        message: "Falco internal: syscall event drop. 1520 system calls dropped in last second.",
        fields: &[
            ("n_drops", "1520"),
            ("n_evts", "482133"),
            ("n_drops_buffer_total", "1520"),
            ("ebpf_enabled", "1"),
        ],
        source: "internal",
        internal: true,
    },
];

/// A workload the simulated alerts come from.
pub struct Pod {
    pub namespace: &'static str,
    pub name: &'static str,
    pub uid: &'static str,
    pub image: &'static str,
    pub tag: &'static str,
    pub container: &'static str,
    pub container_id: &'static str,
}

/// The pods the simulated alerts name, in the order alerts cycle through them.
pub const PODS: &[Pod] = &[
    Pod {
        namespace: "shop",
        name: "web-7d9f8c6b5-x2k4p",
        uid: "5b0e3f51-1b7e-4c5e-9a43-0b6f4c1d2e01",
        image: "docker.io/library/nginx",
        tag: "1.27",
        container: "web",
        container_id: "ee97d9c4186f",
    },
    Pod {
        namespace: "shop",
        name: "cart-5c8d7b9f4-q8w2n",
        uid: "0c1d2e3f-4a5b-4c6d-8e9f-a0b1c2d3e402",
        image: "ghcr.io/example/cart",
        tag: "v2.3.1",
        container: "cart",
        container_id: "4f1a9b2c7d3e",
    },
    Pod {
        namespace: "payments",
        name: "api-6b7c8d9e0-z5x6c",
        uid: "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c03",
        image: "ghcr.io/example/payments-api",
        tag: "1.14.0",
        container: "api",
        container_id: "9c8b7a6f5e4d",
    },
    Pod {
        namespace: "batch",
        name: "report-28417730-hk2lm",
        uid: "d4c3b2a1-f6e5-4b7a-9d8c-1f0e3b2a4c04",
        image: "docker.io/library/python",
        tag: "3.12-slim",
        container: "report",
        container_id: "1a2b3c4d5e6f",
    },
];

/// What a watched process wrote into its command line and file name: an
/// OSC title sequence, a screen clear, CR LF and a forged log line, other
/// C0 controls, DEL, a C1 control (NEL) and a no-break space, then bytes
/// that are not UTF-8 (a lone 0xFF 0xFE, an encoded surrogate, a truncated
/// sequence), a non-character (U+FFFE), a right-to-left override and a
/// line separator, and path pieces.
pub const UNTRUSTED_BYTES: &[u8] =
    b"\x1b]0;owned\x07\x1b[2J\r\nFake: rule=\"x\"\x01\x1f\x7f\xc2\x85\xc2\xa0|\xff\xfe|\xed\xa0\x80|\xe2\x82|\xef\xbf\xbe\xe2\x80\xae\xe2\x80\xa8/../#?";

/// The Falco release that writes the alerts: it decides what a watched
/// process's control characters and invalid UTF-8 become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FalcoRelease {
    /// 0.44: libs replace each control character (C0, DEL, C1) and
    /// non-character with U+FFFD when they read a field, and invalid UTF-8
    /// with U+FFFD (falco#3866).
    V044,
    /// 0.45: field values keep their control characters, which the JSON
    /// encoder escapes (`\u001b`, `\n`); each maximal invalid UTF-8
    /// subpart becomes one U+FFFD (falco#3942).
    V045,
}

impl FalcoRelease {
    /// `raw` as this release puts it in a field value.
    pub fn field_value(self, raw: &[u8]) -> String {
        // One U+FFFD per maximal subpart, as Falco's utf8::sanitize.
        let text = String::from_utf8_lossy(raw);
        match self {
            FalcoRelease::V045 => text.into_owned(),
            FalcoRelease::V044 => text
                .chars()
                .map(|c| {
                    let noncharacter =
                        matches!(u32::from(c), 0xfdd0..=0xfdef) || u32::from(c) & 0xfffe == 0xfffe;
                    if c.is_control() || noncharacter {
                        char::REPLACEMENT_CHARACTER
                    } else {
                        c
                    }
                })
                .collect(),
        }
    }
}

/// Makes alerts in Falco's shapes: gRPC responses and JSON lines.
pub struct AlertFactory {
    hostname: String,
    json_output: bool,
    seq: u64,
    /// The release whose rendering of [`UNTRUSTED_BYTES`] ends every
    /// command line and file name; `None`: the rule set's plain values.
    untrusted: Option<FalcoRelease>,
}

impl AlertFactory {
    /// `json_output` mirrors Falco's setting: with it, a gRPC response's
    /// `output` holds the JSON line.
    pub fn new(hostname: impl Into<String>, json_output: bool) -> Self {
        AlertFactory {
            hostname: hostname.into(),
            json_output,
            seq: 0,
            untrusted: None,
        }
    }

    /// Every alert's command line and file name end in
    /// [`UNTRUSTED_BYTES`] as `release` writes them: what a hostile
    /// container makes Falco say.
    pub fn with_untrusted_strings(mut self, release: FalcoRelease) -> Self {
        self.untrusted = Some(release);
        self
    }

    /// How many alerts were made so far.
    pub fn made(&self) -> u64 {
        self.seq
    }

    /// The next alert as Falco's gRPC output sends it.
    pub fn next_response(&mut self) -> Response {
        self.seq += 1;
        let mut response = self.response(self.seq);
        if self.json_output {
            response.output = Self::json_of(response.clone());
        }
        response
    }

    /// The next alert as Falco's JSON output writes it (one line, no newline).
    pub fn next_json(&mut self) -> String {
        self.seq += 1;
        Self::json_of(self.response(self.seq))
    }

    fn json_of(response: Response) -> String {
        event_from_response(response)
            .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
            .unwrap_or_default()
    }

    /// The `n`-th alert (from 1) in its gRPC form with text output. (Long:
    /// mostly the table of the fields every alert carries.)
    fn response(&self, n: u64) -> Response {
        let scenario = &SCENARIOS[(n as usize - 1) % SCENARIOS.len()];
        let pod = &PODS[((n as usize - 1) / SCENARIOS.len()) % PODS.len()];
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let time = Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        };
        let clock = crate::convert::format_rfc3339_nanos(time.seconds, now.subsec_nanos());
        let clock = clock.get(11..29).unwrap_or_default().to_owned();

        let mut fields: BTreeMap<String, String> = scenario
            .fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if let Some(release) = self.untrusted {
            let tail = release.field_value(UNTRUSTED_BYTES);
            for key in ["proc.cmdline", "fd.name"] {
                if let Some(value) = fields.get_mut(key) {
                    value.push(' ');
                    value.push_str(&tail);
                }
            }
        }
        let suffix = if scenario.internal {
            String::new()
        } else {
            let pid = 4000 + n % 60_000;
            let common = [
                ("container.id", pod.container_id.to_owned()),
                ("container.name", pod.container.to_owned()),
                ("container.image.repository", pod.image.to_owned()),
                ("container.image.tag", pod.tag.to_owned()),
                ("k8s.ns.name", pod.namespace.to_owned()),
                ("k8s.pod.name", pod.name.to_owned()),
                ("k8s.pod.uid", pod.uid.to_owned()),
                ("proc.pid", pid.to_string()),
                ("proc.ppid", (pid - 1).to_string()),
                ("user.name", "root".to_owned()),
                ("user.uid", "0".to_owned()),
                ("user.loginuid", "-1".to_owned()),
                ("evt.num", n.to_string()),
            ];
            for (k, v) in common {
                fields.insert(k.to_owned(), v);
            }
            let get = |k: &str| fields.get(k).map(String::as_str).unwrap_or("<NA>");
            format!(
                " (evt_type={} user={} user_uid={} user_loginuid={} process={} proc_exepath={} parent={} command={} terminal={} container_id={} container_image={} container_image_tag={} container_name={} k8s_ns={} k8s_pod_name={})",
                get("evt.type"), get("user.name"), get("user.uid"), get("user.loginuid"), get("proc.name"),
                get("proc.exepath"), get("proc.pname"), get("proc.cmdline"), get("proc.tty"), get("container.id"),
                get("container.image.repository"), get("container.image.tag"), get("container.name"),
                get("k8s.ns.name"), get("k8s.pod.name"),
            )
        };
        if scenario.internal {
            fields.insert("evt.num".into(), n.to_string());
        }
        Response {
            time: Some(time),
            priority: scenario.priority.number(),
            rule: scenario.rule.to_owned(),
            output: format!(
                "{clock}: {} {}{suffix}",
                scenario.priority, scenario.message
            ),
            output_fields: fields,
            hostname: self.hostname.clone(),
            tags: scenario.tags.iter().map(|t| (*t).to_owned()).collect(),
            source: scenario.source.to_owned(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::FalcoEvent;

    #[test]
    fn alerts_are_realistic_json_of_about_a_kibibyte() {
        let mut factory = AlertFactory::new("node-1", false);
        let mut sizes = Vec::new();
        for _ in 0..SCENARIOS.len() * PODS.len() {
            let line = factory.next_json();
            let event = FalcoEvent::from_json(line.clone().into()).expect("valid alert");
            assert_eq!(event.hostname, "node-1");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert!(
                v["output_fields"]["evt.num"].is_u64() || v["output_fields"]["evt.num"].is_i64()
            );
            sizes.push(line.len());
        }
        let avg = sizes.iter().sum::<usize>() / sizes.len();
        assert!((700..1400).contains(&avg), "average alert size {avg}");
    }

    #[test]
    fn untrusted_strings_are_written_as_each_release_writes_them() {
        for (release, expected) in [
            (
                FalcoRelease::V045,
                // Controls kept (escaped by the JSON writer), DEL, NEL and
                // NBSP raw, one U+FFFD per maximal invalid subpart.
                r#"\u001b]0;owned\u0007\u001b[2J\r\nFake: rule=\"x\"\u0001\u001f\u{7f}\u{85}\u{a0}|\u{fffd}\u{fffd}|\u{fffd}\u{fffd}\u{fffd}|\u{fffd}|\u{fffe}\u{202e}\u{2028}/../#?"#,
            ),
            (
                FalcoRelease::V044,
                r#"\u{fffd}]0;owned\u{fffd}\u{fffd}[2J\u{fffd}\u{fffd}Fake: rule=\"x\"\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{a0}|\u{fffd}\u{fffd}|\u{fffd}\u{fffd}\u{fffd}|\u{fffd}|\u{fffd}\u{202e}\u{2028}/../#?"#,
            ),
        ] {
            let expected = expected
                .replace(r"\u{fffd}", "\u{fffd}")
                .replace(r"\u{7f}", "\u{7f}")
                .replace(r"\u{85}", "\u{85}")
                .replace(r"\u{a0}", "\u{a0}")
                .replace(r"\u{fffe}", "\u{fffe}")
                .replace(r"\u{202e}", "\u{202e}")
                .replace(r"\u{2028}", "\u{2028}");
            let mut factory = AlertFactory::new("node-1", false).with_untrusted_strings(release);
            let line = factory.next_json();
            let start = line.find("bash -il ").expect("the command line") + "bash -il ".len();
            let end = start + line[start..].find("/../#?").expect("its end") + "/../#?".len();
            assert_eq!(&line[start..end], expected, "{release:?}");
            FalcoEvent::from_json(line.clone().into()).expect("valid alert");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(
                v["output_fields"]["proc.cmdline"],
                format!("bash -il {}", release.field_value(UNTRUSTED_BYTES))
            );
        }
    }

    #[test]
    fn json_output_puts_the_line_in_output() {
        let mut factory = AlertFactory::new("node-1", true);
        let r = factory.next_response();
        assert!(r.output.starts_with("{\"hostname\":\"node-1\""));
        let e = event_from_response(r.clone()).unwrap();
        assert_eq!(e.payload, r.output.as_bytes());
    }
}
