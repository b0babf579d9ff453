//! The guards attacked through the shipped NATS configuration (issue 22):
//! the hub's nats.conf from deploy/base/nats.yaml and a node's leaf.conf
//! from deploy/components/leaf, as they are, in a current nats-server.
//!
//! `every_nats_identity_can_do_what_the_readme_says_and_nothing_more`
//! reads docs/security.md's table of what each NATS identity can do and tries
//! every cell for real, judging by the effect on the hub (an alert a
//! reader receives, a key that changed, a stream gone, an alert
//! acknowledged), not by an error message.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, HeaderMap, Subscriber};
use futures_util::{FutureExt, StreamExt};
use serde_json::Value;

use crate::support::shipped::{self, client_as, passwords};
use crate::support::*;
use falco_nats::respond::control::{self, ControlOptions};

/// How long a refused publish is given to show an effect anyway.
const SETTLE: Duration = Duration::from_millis(400);
const WAIT: Duration = Duration::from_secs(15);

/// The table's columns, in its order.
const ACTIONS: [&str; 7] = [
    "publish an alert",
    "publish a result",
    "write the kill switch",
    "purge or roll up a shared bucket",
    "delete a stream",
    "acknowledge an alert",
    "publish into another user's inbox",
];

/// docs/security.md's table: identity -> (action -> allowed).
fn readme_table() -> BTreeMap<String, BTreeMap<String, bool>> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/security.md"))
            .unwrap();
    let mut lines = readme
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("| NATS identity |"));
    let header: Vec<String> = cells(
        lines
            .next()
            .expect("docs/security.md's NATS identity table"),
    );
    assert_eq!(header[1..], ACTIONS, "the table's columns");
    lines.next(); // | --- |
    let mut table = BTreeMap::new();
    for line in lines.take_while(|l| l.starts_with('|')) {
        let row = cells(line);
        let answers = row[1..]
            .iter()
            .zip(ACTIONS)
            .map(|(cell, action)| {
                let allowed = match cell.as_str() {
                    "yes" => true,
                    "no" => false,
                    other => panic!("{}: {action}: {other:?} is neither yes nor no", row[0]),
                };
                (action.to_owned(), allowed)
            })
            .collect();
        table.insert(row[0].clone(), answers);
    }
    table
}

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_owned())
        .collect()
}

/// Everything a probe's effect is read from, on the hub.
struct Hub {
    admin: Client,
    js: jetstream::Context,
    /// A reader on `falco.>`: alerts and results that reached the hub.
    seen: Subscriber,
    /// Each user's own inbox, listened to for others' publishes.
    inboxes: Vec<(String, Subscriber)>,
    /// The pause record as the admin last wrote it.
    pause_revision: u64,
}

/// Messages waiting on `sub`, without waiting.
fn drain(sub: &mut Subscriber) -> Vec<async_nats::Message> {
    let mut got = Vec::new();
    while let Some(Some(m)) = sub.next().now_or_never() {
        got.push(m);
    }
    got
}

/// The admin user, and the stream FALCO it made as the bridge would.
async fn admin_with_falco(
    url: &str,
    pw: &BTreeMap<String, String>,
) -> (Client, jetstream::Context) {
    let admin = client_as(url, "admin", &pw["nats-user-admin"]).await;
    let js = jetstream::new(admin.clone());
    js.create_stream(stream::Config {
        name: "FALCO".into(),
        subjects: vec!["falco.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    (admin, js)
}

impl Hub {
    async fn start(url: &str, pw: &BTreeMap<String, String>) -> Hub {
        let (admin, js) = admin_with_falco(url, pw).await;
        let reader = client_as(url, "reader", &pw["nats-user-reader"]).await;
        let seen = reader.subscribe("falco.>").await.unwrap();
        reader.flush().await.unwrap();
        let mut inboxes = Vec::new();
        for name in ["bridge", "respond", "reader", "admin", "sources"] {
            let client = client_as(url, name, &pw[&format!("nats-user-{name}")]).await;
            let sub = client
                .subscribe(format!("_INBOX_{name}.probe.>"))
                .await
                .unwrap();
            client.flush().await.unwrap();
            inboxes.push((name.to_owned(), sub));
        }
        // Both buckets, made as the responder makes them.
        let options = ControlOptions::default();
        control::open_bucket(&admin, &options.bucket, 1, "test")
            .await
            .unwrap();
        let record = control::set_pause(&admin, &options, true, "the probes")
            .await
            .unwrap();
        assert_eq!(record.by, "admin", "who paused, as the server says");
        let mut hub = Hub {
            admin,
            js,
            seen,
            inboxes,
            pause_revision: 0,
        };
        hub.pause_revision = hub.pause_entry().await.unwrap().revision;
        hub
    }

    async fn pause_entry(&self) -> Option<async_nats::jetstream::kv::Entry> {
        self.js
            .get_key_value(control::DEFAULT_PAUSE_BUCKET)
            .await
            .unwrap()
            .entry(control::PAUSE_KEY)
            .await
            .unwrap()
    }

    /// A stream for `delete a stream` to delete.
    async fn probe_stream(&self) {
        self.js
            .get_or_create_stream(stream::Config {
                name: "PROBE".into(),
                subjects: vec!["probe.stream".into()],
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// An alert in FALCO delivered to a fresh consumer and not yet
    /// acknowledged: its ack subject, and the consumer.
    async fn unacked_alert(&self, row: usize, bridge: &Client) -> (String, String) {
        bridge
            .publish(format!("falco.critical.ack_me_{row}"), "{}".into())
            .await
            .unwrap();
        bridge.flush().await.unwrap();
        let stream = self.js.get_stream("FALCO").await.unwrap();
        let name = format!("probe{row}");
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: format!("falco.critical.ack_me_{row}"),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
        let message = tokio::time::timeout(WAIT, batch.next())
            .await
            .expect("the alert delivered")
            .unwrap()
            .unwrap();
        let reply = message.reply.clone().expect("an ack subject").to_string();
        (reply, name)
    }

    async fn ack_pending(&self, consumer: &str) -> usize {
        let stream = self.js.get_stream("FALCO").await.unwrap();
        let mut c: consumer::PullConsumer = stream.get_consumer(consumer).await.unwrap();
        c.info().await.unwrap().num_ack_pending
    }
}

/// One identity's client, or `None` when the server refuses it.
struct Row {
    name: String,
    index: usize,
    client: Option<Client>,
    /// The user's own inbox prefix (its own inbox is not "another's").
    own_inbox: Option<&'static str>,
}

/// Tries each action as `row`; what took effect.
async fn probe(hub: &mut Hub, row: &Row, bridge: &Client) -> BTreeMap<String, bool> {
    let mut found: BTreeMap<String, bool> =
        ACTIONS.iter().map(|a| (a.to_string(), false)).collect();
    let Some(client) = &row.client else {
        return found;
    };
    let i = row.index;
    let reply_subject = format!("_INBOX.probe{i}");
    let reply = reply_subject.as_str();
    hub.probe_stream().await;
    let (ack_subject, consumer) = hub.unacked_alert(i, bridge).await;
    drain(&mut hub.seen);
    for (_, sub) in hub.inboxes.iter_mut() {
        drain(sub);
    }

    let publish = |subject: String, headers: HeaderMap, payload: String| async move {
        // A refused publish only logs on the server and in the client's
        // events: the effect is what counts.
        let _ = client
            .publish_with_reply_and_headers(subject, reply.to_owned(), headers, payload.into())
            .await;
    };
    publish(
        format!("falco.critical.probe{i}"),
        HeaderMap::new(),
        "{}".into(),
    )
    .await;
    for subject in [format!("falco.response.probe{i}"), "falco.response".into()] {
        publish(subject, HeaderMap::new(), "{}".into()).await;
    }
    let record = serde_json::json!({"paused": false, "by": "probe", "reason": format!("row {i}"),
                                    "at": "2026-12-05T00:00:00Z"});
    publish(
        format!("$KV.{}.pause", control::DEFAULT_PAUSE_BUCKET),
        HeaderMap::new(),
        record.to_string(),
    )
    .await;
    let mut rollup = HeaderMap::new();
    rollup.insert("Nats-Rollup", "all");
    for bucket in [control::DEFAULT_BUCKET, control::DEFAULT_PAUSE_BUCKET] {
        let key = if bucket == control::DEFAULT_BUCKET {
            "actions"
        } else {
            "pause"
        };
        publish(
            format!("$KV.{bucket}.{key}"),
            rollup.clone(),
            format!("[{i}]"),
        )
        .await;
        publish(
            format!("$JS.API.STREAM.PURGE.KV_{bucket}"),
            HeaderMap::new(),
            String::new(),
        )
        .await;
    }
    publish(
        "$JS.API.STREAM.DELETE.PROBE".into(),
        HeaderMap::new(),
        String::new(),
    )
    .await;
    publish(ack_subject, HeaderMap::new(), "+ACK".into()).await;
    for user in ["bridge", "respond", "reader", "admin", "sources"] {
        if Some(user) != row.own_inbox {
            publish(
                format!("_INBOX_{user}.probe.{i}"),
                HeaderMap::new(),
                "x".into(),
            )
            .await;
        }
    }
    let _ = client.flush().await;
    tokio::time::sleep(SETTLE).await;

    let seen = drain(&mut hub.seen);
    let alert = seen
        .iter()
        .any(|m| m.subject.as_str() == format!("falco.critical.probe{i}"));
    let result = seen
        .iter()
        .any(|m| m.subject.as_str().starts_with("falco.response"));
    found.insert(ACTIONS[0].into(), alert);
    found.insert(ACTIONS[1].into(), result);

    let pause = hub.pause_entry().await;
    let pause_written = pause.as_ref().is_some_and(|e| {
        serde_json::from_slice::<Value>(&e.value).is_ok_and(|v| v["reason"] == format!("row {i}"))
    });
    found.insert(ACTIONS[2].into(), pause_written);

    let pause_gone = pause.is_none();
    let actions = hub
        .js
        .get_stream(format!("KV_{}", control::DEFAULT_BUCKET))
        .await
        .unwrap()
        .direct_get_last_for_subject(format!("$KV.{}.actions", control::DEFAULT_BUCKET))
        .await;
    let rolled_up = actions.is_ok_and(|m| m.payload.as_ref() == format!("[{i}]").as_bytes());
    found.insert(ACTIONS[3].into(), pause_gone || rolled_up);

    let deleted = hub.js.get_stream("PROBE").await.is_err();
    found.insert(ACTIONS[4].into(), deleted);

    found.insert(ACTIONS[5].into(), hub.ack_pending(&consumer).await == 0);

    let mut intruded = false;
    for (_, sub) in hub.inboxes.iter_mut() {
        intruded |= !drain(sub).is_empty();
    }
    found.insert(ACTIONS[6].into(), intruded);

    // Back to the admin's pause for the next row.
    if pause_written || pause_gone {
        control::set_pause(&hub.admin, &ControlOptions::default(), true, "the probes")
            .await
            .unwrap();
    }
    found
}

#[tokio::test]
async fn every_nats_identity_can_do_what_the_readme_says_and_nothing_more() {
    let expected = readme_table();
    let dir = tempfile::tempdir().unwrap();
    let pw = passwords();
    let (hub_server, leaf_port) = shipped::start_hub(dir.path(), &pw);
    let url = hub_server.url();
    let mut hub = Hub::start(&url, &pw).await;
    let bridge = client_as(&url, "bridge", &pw["nats-user-bridge"]).await;

    // A node's leaf server as shipped, and one an attacker runs with the
    // leaf credential (no local users, JetStream off).
    let node = shipped::start_leaf(dir.path(), "node-1", leaf_port, &pw);
    let rogue_conf = dir.path().join("rogue.conf");
    std::fs::write(
        &rogue_conf,
        format!(
            "leafnodes {{ remotes: [ {{ urls: [\"{}\"] }} ] }}\n",
            shipped::leaf_hub_url(leaf_port, &pw)
        ),
    )
    .unwrap();
    let mut rogue = NatsServer::start_with(&["-c", rogue_conf.to_str().unwrap()]);
    rogue.jetstream = false;
    rogue.restart();
    // Both leaf servers connected (an alert from each reaches the hub).
    let node_bridge = client_as(&node.url(), "bridge", &pw["nats-user-bridge"]).await;
    let rogue_client = async_nats::connect(rogue.url()).await.unwrap();
    for client in [&node_bridge, &rogue_client] {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            client
                .publish("falco.debug.hello", "{}".into())
                .await
                .unwrap();
            client.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            if drain(&mut hub.seen)
                .iter()
                .any(|m| m.subject.as_str() == "falco.debug.hello")
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a leaf never connected"
            );
        }
    }

    assert!(
        async_nats::ConnectOptions::with_user_and_password(
            "leaf".into(),
            pw["nats-user-leaf"].clone()
        )
        .connect(&url)
        .await
        .is_err(),
        "leaf on the client port"
    );
    assert!(
        async_nats::connect(&url).await.is_err(),
        "anonymous on the hub"
    );
    assert!(
        async_nats::connect(node.url()).await.is_err(),
        "anonymous on a node's leaf server"
    );

    let mut rows = Vec::new();
    for (index, name) in ["bridge", "respond", "reader", "admin", "sources"]
        .iter()
        .enumerate()
    {
        rows.push(Row {
            name: format!("`{name}`"),
            index,
            client: Some(client_as(&url, name, &pw[&format!("nats-user-{name}")]).await),
            own_inbox: Some(name),
        });
    }
    for (index, name) in [
        "`leaf` on the client port",
        "anyone without a user",
        "anyone without a user, on a node's leaf server",
    ]
    .into_iter()
    .enumerate()
    {
        rows.push(Row {
            name: name.into(),
            index: 10 + index,
            client: None,
            own_inbox: None,
        });
    }
    rows.push(Row {
        name: "`bridge` on a node's leaf server".into(),
        index: 20,
        client: Some(node_bridge),
        own_inbox: Some("bridge"),
    });
    rows.push(Row {
        name: "anyone with the `leaf` credential, through a leaf server of their own".into(),
        index: 21,
        client: Some(rogue_client),
        own_inbox: None,
    });

    let mut actual = BTreeMap::new();
    for row in &rows {
        actual.insert(row.name.clone(), probe(&mut hub, row, &bridge).await);
    }
    for (name, row) in &actual {
        eprintln!("{name}: {row:?}");
    }
    assert_eq!(
        actual, expected,
        "what each identity can do, tried on the shipped configuration (left), against docs/security.md's table (right)"
    );
    drop(hub_server);
}

/// `falco-nats pause` / `resume` with the shipped admin user.
fn kill_switch(url: &str, pw: &BTreeMap<String, String>, dir: &Path, args: &[&str]) -> Output {
    let file = dir.join("admin.password");
    std::fs::write(&file, &pw["nats-user-admin"]).unwrap();
    Command::new(env!("CARGO_BIN_EXE_falco-nats"))
        .args(args)
        .args(["-s", url, "--user", "admin", "--password-file"])
        .arg(&file)
        .args(["--inbox-prefix", "_INBOX_admin"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run falco-nats")
}

/// Issue 22, item 1: the responder's own user, on the shipped nats.conf,
/// tries every way to release the kill switch (a roll-up through the key
/// it may write, a purge, a delete, a write of the pause key); the pause
/// holds. A pause key deleted by whoever may write it reads as unknown,
/// never as running.
#[tokio::test]
async fn the_responders_user_cannot_release_the_kill_switch() {
    let dir = tempfile::tempdir().unwrap();
    let pw = passwords();
    let (hub, _) = shipped::start_hub(dir.path(), &pw);
    let url = hub.url();
    let respond = client_as(&url, "respond", &pw["nats-user-respond"]).await;
    // The responder makes its buckets as it starts.
    let options = ControlOptions::default();
    let opened = control::Control::open(&respond, &options).await.unwrap();
    assert_eq!(
        opened.pause_state(),
        control::PauseState::Running(None),
        "never paused"
    );

    let paused = kill_switch(&url, &pw, dir.path(), &["pause", "--reason", "incident 7"]);
    assert!(paused.status.success(), "{paused:?}");
    let said = String::from_utf8_lossy(&paused.stdout);
    assert!(said.starts_with("paused by \"admin\""), "{said}");

    // Every release the responder's user might try.
    let js = jetstream::new(respond.clone());
    let mut rollup = HeaderMap::new();
    rollup.insert("Nats-Rollup", "all");
    let rolled = js
        .publish_with_headers("$KV.falco-nats.actions", rollup.clone(), "[]".into())
        .await;
    let refused = match rolled {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a roll-up through the rate limit's key is refused");
    for (subject, headers, payload) in [
        (
            "$KV.falco-nats-pause.pause",
            HeaderMap::new(),
            r#"{"paused":false,"by":"me","at":"now"}"#,
        ),
        ("$KV.falco-nats-pause.pause", rollup.clone(), "x"),
        (
            "$JS.API.STREAM.PURGE.KV_falco-nats-pause",
            HeaderMap::new(),
            "",
        ),
        ("$JS.API.STREAM.PURGE.KV_falco-nats", HeaderMap::new(), ""),
        (
            "$JS.API.STREAM.MSG.DELETE.KV_falco-nats-pause",
            HeaderMap::new(),
            r#"{"seq":1}"#,
        ),
        (
            "$JS.API.STREAM.DELETE.KV_falco-nats-pause",
            HeaderMap::new(),
            "",
        ),
        (
            "$JS.API.STREAM.UPDATE.KV_falco-nats-pause",
            HeaderMap::new(),
            r#"{"name":"KV_falco-nats-pause","subjects":["$KV.falco-nats-pause.>"],"allow_rollup_hdrs":true}"#,
        ),
    ] {
        let _ = respond
            .publish_with_reply_and_headers(
                subject,
                "_INBOX_respond.x",
                headers,
                payload.to_owned().into(),
            )
            .await;
    }
    respond.flush().await.unwrap_or_default();
    tokio::time::sleep(SETTLE).await;
    let status = kill_switch(&url, &pw, dir.path(), &["pause", "--status"]);
    assert_eq!(status.status.code(), Some(3), "still paused: {status:?}");
    assert!(String::from_utf8_lossy(&status.stdout).contains("incident 7"));

    // Deleted by someone who may write it (the admin): unknown, not running.
    let admin = client_as(&url, "admin", &pw["nats-user-admin"]).await;
    let kv = jetstream::new(admin.clone())
        .get_key_value(control::DEFAULT_PAUSE_BUCKET)
        .await
        .unwrap();
    kv.delete(control::PAUSE_KEY).await.unwrap();
    let status = kill_switch(&url, &pw, dir.path(), &["pause", "--status"]);
    assert!(!status.status.success(), "{status:?}");
    let said = String::from_utf8_lossy(&status.stderr);
    assert!(said.contains("was deleted"), "{said}");
    let state = wait_state(&opened, |s| matches!(s, control::PauseState::Unknown(_))).await;
    eprintln!("a responder after the delete: {state:?}");
    let resumed = kill_switch(&url, &pw, dir.path(), &["resume"]);
    assert!(resumed.status.success(), "{resumed:?}");
    assert_eq!(
        kill_switch(&url, &pw, dir.path(), &["pause", "--status"])
            .status
            .code(),
        Some(0)
    );
}

/// Reads the kill switch as a responder does, until `done` holds.
async fn wait_state(
    control: &control::Control,
    done: impl Fn(&control::PauseState) -> bool,
) -> control::PauseState {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let state = control.refresh().await;
        if done(&state) {
            return state;
        }
        assert!(std::time::Instant::now() < deadline, "{state:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The responder's user cannot fill the server's store through the keys
/// it may write (the bucket has a size limit and a record size limit), so
/// the kill switch can always be written; a record over the record limit
/// is refused.
#[tokio::test]
async fn the_responders_user_cannot_fill_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let pw = passwords();
    let (hub, _) = shipped::start_hub(dir.path(), &pw);
    let url = hub.url();
    let respond = client_as(&url, "respond", &pw["nats-user-respond"]).await;
    control::Control::open(&respond, &ControlOptions::default())
        .await
        .unwrap();
    let js = jetstream::new(respond.clone());
    let big = vec![b'x'; 200 << 10];
    let mut stored = 0u64;
    for i in 0..600 {
        let put = js
            .publish(format!("$KV.falco-nats.seen.x.y.{i}"), big.clone().into())
            .await;
        if let Ok(ack) = put {
            if ack.await.is_ok() {
                stored += big.len() as u64;
            }
        }
    }
    eprintln!("{} MiB stored of 117 MiB tried", stored >> 20);
    assert!(stored <= 64 << 20, "the bucket's limit holds: {stored}");
    let too_big = js
        .publish("$KV.falco-nats.seen.x.y.big", vec![b'x'; 300 << 10].into())
        .await;
    assert!(
        match too_big {
            Ok(ack) => ack.await.is_err(),
            Err(_) => true,
        },
        "a record over 256 KiB is refused"
    );
    let paused = kill_switch(&url, &pw, dir.path(), &["pause", "--reason", "still works"]);
    assert!(paused.status.success(), "{paused:?}");
}

/// The responder's user may create the durable consumer, and so may
/// change it: a filter that takes no alert would silence every responder,
/// across restarts. The responder checks the consumer's settings as it
/// attaches and every 10 s, and sets them back.
#[tokio::test]
async fn a_changed_durable_consumer_is_set_back() {
    use falco_nats::respond::Subscription;
    let dir = tempfile::tempdir().unwrap();
    let pw = passwords();
    let (hub, _) = shipped::start_hub(dir.path(), &pw);
    let url = hub.url();
    let (_admin, js) = admin_with_falco(&url, &pw).await;
    let kube = crate::support::fake_kube::KubeApi::start().await.unwrap();
    kube.add_pod("shop", "web", "u-web", Some("ReplicaSet"));
    let mut options = respond_options(&url, &kubeconfig(&kube));
    options.nats = shipped::user(&url, "respond", &pw["nats-user-respond"], dir.path());
    options.subscription = Subscription::JetStream {
        stream: "FALCO".into(),
        durable: "falco-nats-respond".into(),
        subject: "falco.>".into(),
        ack_wait: Duration::from_secs(30),
        max_deliver: 5,
    };
    let responder = crate::support::responder::Responder::start(options).await;

    // The responder's credential, in other hands.
    let respond = client_as(&url, "respond", &pw["nats-user-respond"]).await;
    // Its settings as they are, with a filter that takes no alert.
    let info = respond
        .request("$JS.API.CONSUMER.INFO.FALCO.falco-nats-respond", "".into())
        .await
        .unwrap();
    let mut config: Value =
        serde_json::from_slice::<Value>(&info.payload).unwrap()["config"].clone();
    config["filter_subject"] = "falco.nothing.>".into();
    let silenced = serde_json::json!({"stream_name": "FALCO", "config": config});
    let answer = respond
        .request(
            "$JS.API.CONSUMER.CREATE.FALCO.falco-nats-respond",
            silenced.to_string().into(),
        )
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(
        answer["config"]["filter_subject"], "falco.nothing.>",
        "the change took: {answer}"
    );

    // Set back within the check's period (10 s)...
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream("FALCO")
        .await
        .unwrap()
        .get_consumer("falco-nats-respond")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !consumer
        .info()
        .await
        .unwrap()
        .config
        .filter_subject
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the consumer was never set back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ... and alerts are acted on again.
    let bridge = client_as(&url, "bridge", &pw["nats-user-bridge"]).await;
    bridge
        .publish(
            "falco.critical.drop_and_execute_new_binary_in_container",
            crate::support::responder::pod_alert("Critical", "shop", "web", None).into(),
        )
        .await
        .unwrap();
    bridge.flush().await.unwrap();
    wait_for("the alert acted on", WAIT, || async {
        !kube.has_pod("shop", "web")
    })
    .await;
    responder.stop().await;
}

/// The shared records (claims, reservations, the rate limit) are sealed
/// with the responders' secret (`--kv-key-file`, the Secret
/// falco-nats-kv-key that deploy/nats-users.sh makes): what the
/// responder's NATS credential writes in other hands is not believed. A
/// forged claim does not make a pod immune, forged deletions do not shield
/// a Deployment, and a forged rate-limit record stops destructive actions
/// (fail closed) rather than lifting the limit.
#[tokio::test]
async fn forged_shared_records_are_not_believed() {
    use falco_nats::decision::Action;
    use falco_nats::respond::rails::DedupKey;
    let dir = tempfile::tempdir().unwrap();
    let pw = passwords();
    let (hub, _) = shipped::start_hub(dir.path(), &pw);
    let url = hub.url();
    let kube = crate::support::fake_kube::KubeApi::start().await.unwrap();
    kube.add_pod("shop", "immune", "u-immune", None);
    kube.add_pod("shop", "other", "u-other", None);
    let rs = kube.add_deployment("shop", "web", 3, 3);
    for pod in ["web-a", "web-b", "web-c"] {
        kube.add_pod_of("shop", pod, ("ReplicaSet", &rs), true);
    }
    let mut options = respond_options(&url, &kubeconfig(&kube));
    options.nats = shipped::user(&url, "respond", &pw["nats-user-respond"], dir.path());
    options.limits.min_healthy_replicas = "2".parse().unwrap();
    options.control.record_key = Some(pw["falco-nats-kv-key"].as_bytes().to_vec());
    let reader = client_as(&url, "reader", &pw["nats-user-reader"]).await;
    let mut out = reader.subscribe("falco.response.>").await.unwrap();
    reader.flush().await.unwrap();
    let responder = crate::support::responder::Responder::start(options).await;

    // The responder's credential, in other hands: plain records.
    let attacker = client_as(&url, "respond", &pw["nats-user-respond"]).await;
    let js = jetstream::new(attacker.clone());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let claim = control::claim_key(&DedupKey {
        namespace: "shop".into(),
        pod: "immune".into(),
        uid: None,
        rule: "Drop and execute new binary in container".into(),
        action: Action::DeletePod,
    });
    for (key, value) in [
        (claim, format!("[{now},{now}]")),
        (
            "replicas.Deployment.shop.web".to_owned(),
            format!("[{now},{now},{now}]"),
        ),
    ] {
        js.publish(format!("$KV.falco-nats.{key}"), value.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let bridge = client_as(&url, "bridge", &pw["nats-user-bridge"]).await;
    for pod in ["immune", "web-a"] {
        crate::support::responder::publish(
            &bridge,
            crate::support::responder::pod_alert("Critical", "shop", pod, None),
        )
        .await;
    }
    let decisions = crate::support::responder::results(&mut out, 2).await;
    for d in &decisions {
        assert_eq!(d["outcome"], "done", "a forged record held it back: {d}");
    }
    // A forged rate limit: no destructive action until a responder's own.
    js.publish("$KV.falco-nats.actions", "[]".into())
        .await
        .unwrap()
        .await
        .unwrap();
    crate::support::responder::publish(
        &bridge,
        crate::support::responder::pod_alert("Critical", "shop", "other", None),
    )
    .await;
    let d = &crate::support::responder::results(&mut out, 1).await[0];
    assert_eq!(d["outcome"], "skipped", "{d}");
    let reason = d["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("rate_limit_unavailable: key \"actions\" holds a record not sealed"),
        "{reason}"
    );
    assert!(kube.has_pod("shop", "other"));
    responder.stop().await;
}
