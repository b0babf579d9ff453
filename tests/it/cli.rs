//! The binary's other faces: `tail` against a real nats-server, and what
//! `--help` and errors show (never a secret).

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn tail_prints_the_expected_line_for_a_known_alert() {
    use tokio::io::AsyncBufReadExt;
    let nats = NatsServer::start();
    let probes = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_falco-nats"))
        .args([
            "tail",
            "--color",
            "never",
            "--min-priority",
            "warning",
            "--listen",
            &probes.to_string(),
            "-s",
            &nats.url(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let client = nats.client().await;
    let notice = r#"{"hostname":"node-1","output":"13:44:05.478445995: Notice A shell was spawned (user=root)","output_fields":{"k8s.ns.name":"shop","k8s.pod.name":"web-1"},"priority":"Notice","rule":"Terminal shell in container","source":"syscall","tags":[],"time":"2023-05-25T13:44:05.478445995Z"}"#;
    let critical = r#"{"hostname":"node-1","output":"13:44:06.000000001: Critical Executing binary not part of base image (proc=xmrig)","output_fields":{"k8s.ns.name":"shop","k8s.pod.name":"web-1"},"priority":"Critical","rule":"Drop and execute new binary in container","source":"syscall","tags":[],"time":"2023-05-25T13:44:06.000000001Z"}"#;
    let decision = r#"{"action":"delete-pod","outcome":"done","reason":"delete the pod (grace period 0s)","namespace":"shop","pod":"web-1","rule":"Drop and execute new binary in container","subject":"x","dry_run":false,"latency_ms":1.0}"#;
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    // tail subscribes after it starts: publish until its first line shows.
    let deadline = std::time::Instant::now() + WAIT;
    let first = loop {
        assert!(std::time::Instant::now() < deadline, "tail printed nothing");
        client
            .publish("falco.notice.terminal_shell_in_container", notice.into())
            .await
            .unwrap();
        client
            .publish(
                "falco.critical.drop_and_execute_new_binary_in_container",
                critical.into(),
            )
            .await
            .unwrap();
        client.flush().await.unwrap();
        if let Ok(line) = tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await
        {
            break line.unwrap().unwrap();
        }
    };
    assert_eq!(
        first,
        "2023-05-25T13:44:06.000000001Z Critical      Drop and execute new binary in container [shop/web-1] Executing binary not part of base image (proc=xmrig)"
    );
    client
        .publish("falco.response.delete_pod", decision.into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let second = loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if !line.contains("Critical") {
            break line;
        }
    };
    assert_eq!(
        second,
        "  -> delete-pod done [shop/web-1] delete the pod (grace period 0s) (rule: Drop and execute new binary in container)"
    );
    // Its connection's state, on its own --listen.
    assert_eq!(http_get(probes, "/readyz").await.0, 200);
    let (_, metrics) = http_get(probes, "/metrics").await;
    assert_eq!(
        metric_value(&metrics, "falco_nats_nats_connected"),
        1.0,
        "{metrics}"
    );
    child.kill().await.unwrap();
}

/// Issue 9, item 5: secrets given in the environment (a NATS URL with a
/// password, the password, the tokens) never show in `--help`, and an
/// unreadable server URL's error masks its credentials.
#[tokio::test]
async fn secrets_never_show_in_help_or_errors() {
    let secrets = [
        ("NATS_URL", "nats://alice:url-secret@bad host:4222"),
        ("NATS_PASSWORD", "password-secret"),
        ("NATS_TOKEN", "token-secret"),
        ("FALCO_NATS_HTTP_TOKEN", "http-secret"),
    ];
    for sub in ["bridge", "respond", "tail"] {
        let out = Command::new(env!("CARGO_BIN_EXE_falco-nats"))
            .args([sub, "--help"])
            .envs(secrets)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        for (_, secret) in secrets {
            assert!(!text.contains(secret), "{sub} --help shows {secret}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_falco-nats"))
        .args(["tail", "--count", "1"])
        .env("NATS_URL", secrets[0].1)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("invalid NATS server URL"), "{text}");
    assert!(!text.contains("url-secret"), "{text}");
}

/// Issue 12, item 5: log lines carry no ANSI colour codes unless stderr is
/// a terminal: a pod's log or a file gets plain text. On a terminal (a
/// pseudo-terminal made by `script`) they are coloured, unless `NO_COLOR`.
#[tokio::test]
async fn log_lines_are_plain_text_unless_written_to_a_terminal() {
    let nats = NatsServer::start();
    let bridge = |stderr_to: &str, no_color: bool| {
        let cmd = format!(
            "{} bridge --input stdin --log-format text -s {} </dev/null 2>{stderr_to}",
            env!("CARGO_BIN_EXE_falco-nats"),
            nats.url()
        );
        let mut c = Command::new("sh");
        c.arg("-c").arg(cmd).env_remove("NO_COLOR");
        if no_color {
            c.env("NO_COLOR", "1");
        }
        c
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bridge.log");
    // To a file, as a container runtime collects it.
    let out = bridge(file.to_str().unwrap(), false).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = std::fs::read_to_string(&file).unwrap();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a file: {log:?}");
    // On a terminal: `script` gives the command one and copies what it
    // wrote to its own stdout.
    let on_tty = |no_color: bool| {
        let inner = bridge("/dev/tty", no_color);
        let line = format!(
            "{} {}",
            inner.get_program().to_string_lossy(),
            inner
                .get_args()
                .map(|a| format!("'{}'", a.to_string_lossy().replace('\'', "'\\''")))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut c = Command::new("script");
        c.args(["-qec", &line, "/dev/null"]).env_remove("NO_COLOR");
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_tty(false);
    assert!(coloured.contains("INFO"), "{coloured}");
    assert!(
        coloured.contains('\u{1b}'),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_tty(true);
    assert!(plain.contains("INFO"), "{plain}");
    assert!(!plain.contains('\u{1b}'), "NO_COLOR ignored: {plain:?}");
}
