//! The responder's guards against a real nats-server (the kill switch and
//! the shared rate limit live in its JetStream KV) and the Kubernetes API
//! stand-in (healthy replicas): what an operator relies on on a bad day.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::responder::{options, pod_alert, policy, publish, results, Responder, Scene};
use crate::support::*;
use async_nats::jetstream;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// Who `pause` says paused, on the tests' servers (no users): what the
/// server says of an anonymous client, or that it cannot say (2.9).
fn anonymous() -> &'static str {
    if nats_server_version() >= (2, 10) {
        "(no user: the server has no authentication)"
    } else {
        "(not said: nats-server before 2.10)"
    }
}

/// `falco-nats pause` / `resume` as an operator runs them.
fn kill_switch(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_falco-nats"))
        .args(args)
        .args(["-s", url])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run falco-nats")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The decisions' reasons by pod.
fn by_pod(decisions: &[Value]) -> BTreeMap<String, String> {
    decisions
        .iter()
        .map(|d| {
            (
                d["pod"].as_str().unwrap_or("-").to_owned(),
                format!(
                    "{} {}",
                    d["outcome"].as_str().unwrap(),
                    d["reason"].as_str().unwrap()
                ),
            )
        })
        .collect()
}

/// A storm of Critical alerts to two responders on their own connections;
/// `pause` mid-storm: no DELETE reaches the API once a second has passed
/// since `pause` returned, the decisions say `paused`, both responders show
/// it; `resume` brings deletions back.
#[tokio::test]
async fn the_kill_switch_stops_every_replica_within_a_second() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    const PODS: usize = 600;
    kube.add_pods("shop", "web", PODS);
    kube.set_latency(Duration::from_millis(2));
    let mut responders = Vec::new();
    for _ in 0..2 {
        let mut opts = options(&nats, &kube);
        opts.limits.max_actions_per_minute = 10_000;
        responders.push(Responder::start(opts).await);
    }
    // 200 alerts a second, each for its own pod.
    let storm = {
        let client = client.clone();
        tokio::spawn(async move {
            for i in 0..PODS {
                publish(
                    &client,
                    pod_alert("Critical", "shop", &format!("web-{i}"), None),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    wait_for("deletions to start", WAIT, || async {
        kube.deletes().len() >= 20
    })
    .await;
    let url = nats.url();
    let paused = tokio::task::spawn_blocking({
        let url = url.clone();
        move || kill_switch(&url, &["pause", "--reason", "incident 4711"])
    })
    .await
    .unwrap();
    let paused_at = Instant::now();
    assert!(paused.status.success(), "{paused:?}");
    assert!(
        stdout(&paused).starts_with(&format!("paused by {:?}", anonymous())),
        "{}",
        stdout(&paused)
    );
    let before = kube.deletes().len();

    // The storm goes on for two more seconds at least.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last_delete = kube
        .deletes()
        .iter()
        .map(|d| d.at)
        .max()
        .expect("deletions before the pause");
    let late = kube
        .deletes()
        .iter()
        .filter(|d| d.at > paused_at + Duration::from_secs(1))
        .count();
    let took = last_delete.saturating_duration_since(paused_at);
    eprintln!(
        "kill switch: {before} deletions before `pause` returned, {} after it; the last {took:?} after",
        kube.deletes().len() - before
    );
    assert_eq!(late, 0, "no DELETE a second after the pause");
    for r in &responders {
        assert_eq!(
            r.metric("falco_nats_respond_kill_switch{state=\"paused\"}")
                .await,
            1.0
        );
        let (code, body) = http_get(r.http, "/readyz").await;
        assert_eq!(code, 200, "paused is not unready: {body}");
        assert!(
            body.contains(&format!("kill switch: paused by {:?}", anonymous()))
                && body.contains("incident 4711"),
            "{body}"
        );
    }
    let status = kill_switch(&url, &["pause", "--status"]);
    assert_eq!(status.status.code(), Some(3), "{status:?}");
    assert!(stdout(&status).contains("incident 4711"));

    storm.await.unwrap();
    let decisions = results(&mut out, PODS).await;
    let skipped_paused = decisions.iter().filter(|d| d["reason"] == "paused").count();
    assert!(
        skipped_paused >= 200,
        "alerts after the pause are decided and reported as paused: {skipped_paused}"
    );
    assert_eq!(
        decisions.iter().filter(|d| d["outcome"] == "done").count(),
        kube.deletes().len()
    );

    // Resumed: the same kind of alert deletes again.
    let resumed = kill_switch(&url, &["resume", "--reason", "fixed"]);
    assert!(resumed.status.success(), "{resumed:?}");
    assert!(stdout(&resumed).starts_with(&format!("running by {:?}", anonymous())));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let deleted = kube.deletes().len();
    let waiting: Vec<usize> = (0..PODS)
        .filter(|i| kube.has_pod("shop", &format!("web-{i}")))
        .take(5)
        .collect();
    for i in &waiting {
        publish(
            &client,
            pod_alert("Critical", "shop", &format!("web-{i}"), None),
        )
        .await;
    }
    let after = results(&mut out, waiting.len()).await;
    assert!(after.iter().all(|d| d["outcome"] == "done"), "{after:?}");
    assert_eq!(kube.deletes().len(), deleted + waiting.len());
    assert_eq!(
        kill_switch(&url, &["pause", "--status"]).status.code(),
        Some(0)
    );
    for r in responders {
        r.stop().await;
    }
}

/// A responder that starts while paused is paused from its first alert;
/// a malformed kill switch or rate-limit record is not a reason to act.
#[tokio::test]
async fn paused_at_start_and_malformed_records_act_on_nothing() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    kube.add_pods("shop", "web", 3);
    let paused = kill_switch(&nats.url(), &["pause", "--reason", "before any responder"]);
    assert!(paused.status.success(), "{paused:?}");
    let responder = Responder::start(options(&nats, &kube)).await;
    publish(&client, pod_alert("Critical", "shop", "web-0", None)).await;
    assert_eq!(results(&mut out, 1).await[0]["reason"], "paused");

    let kv = jetstream::new(client.clone())
        .get_key_value("falco-nats-pause")
        .await
        .unwrap();
    kv.put("pause", "{\"paused\": maybe".into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    publish(&client, pod_alert("Critical", "shop", "web-1", None)).await;
    let d = &results(&mut out, 1).await[0];
    assert_eq!(d["outcome"], "skipped");
    let reason = d["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("pause_unknown: key \"pause\" holds a malformed value"),
        "{reason}"
    );
    assert_eq!(
        responder
            .metric("falco_nats_respond_kill_switch{state=\"unknown\"}")
            .await,
        1.0
    );

    kv.put(
        "pause",
        "{\"paused\":false,\"by\":\"x\",\"at\":\"now\"}".into(),
    )
    .await
    .unwrap();
    jetstream::new(client.clone())
        .get_key_value("falco-nats")
        .await
        .unwrap()
        .put("actions", "[1, \"two\"]".into())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    publish(&client, pod_alert("Critical", "shop", "web-2", None)).await;
    let reason = results(&mut out, 1).await[0]["reason"].clone();
    assert!(
        reason
            .as_str()
            .unwrap()
            .starts_with("rate_limit_unavailable: key \"actions\" holds a malformed value"),
        "{reason}"
    );
    assert!(kube.deletes().is_empty());
    responder.stop().await;
}

/// Three replicas, one budget: a storm of 1,000 Critical alerts for 1,000
/// pods yields exactly the limit in deletions, in total.
#[tokio::test]
async fn one_rate_limit_for_all_replicas() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    const PODS: usize = 1_000;
    const LIMIT: u32 = 25;
    kube.add_pods("shop", "web", PODS);
    let mut responders = Vec::new();
    for _ in 0..3 {
        let mut opts = options(&nats, &kube);
        opts.limits.max_actions_per_minute = LIMIT;
        responders.push(Responder::start(opts).await);
    }
    for i in 0..PODS {
        publish(
            &client,
            pod_alert("Critical", "shop", &format!("web-{i}"), None),
        )
        .await;
    }
    let decisions = results(&mut out, PODS).await;
    let count = |reason: &str| decisions.iter().filter(|d| d["reason"] == reason).count();
    let done = decisions.iter().filter(|d| d["outcome"] == "done").count();
    assert_eq!(
        done,
        LIMIT as usize,
        "{:?}",
        by_pod(&decisions).values().take(5).collect::<Vec<_>>()
    );
    assert_eq!(count("rate_limited"), PODS - LIMIT as usize);
    assert_eq!(kube.deletes().len(), LIMIT as usize);
    // Every replica took part.
    for r in &responders {
        assert!(
            r.metric(
                "falco_nats_respond_decisions_total{action=\"delete-pod\",outcome=\"skipped\"}"
            )
            .await
                > 0.0
        );
    }
    for r in responders {
        r.stop().await;
    }
}

/// min_healthy_replicas across replicas (issue 22, item 4): three
/// responders, a Deployment of 10 Ready pods whose status says 10/10 the
/// whole time, min_healthy_replicas 8, an alert for each pod at once:
/// exactly two deletions in total, not two per replica.
#[tokio::test]
async fn healthy_replicas_are_kept_across_replicas() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    const PODS: usize = 10;
    let rs = kube.add_deployment("shop", "web", PODS as u32, PODS as u32);
    for i in 0..PODS {
        kube.add_pod_of("shop", &format!("web-{i}"), ("ReplicaSet", &rs), true);
    }
    let mut responders = Vec::new();
    for _ in 0..3 {
        let mut opts = options(&nats, &kube);
        opts.limits.min_healthy_replicas = "8".parse().unwrap();
        opts.concurrency = 4;
        responders.push(Responder::start(opts).await);
    }
    for i in 0..PODS {
        publish(
            &client,
            pod_alert("Critical", "shop", &format!("web-{i}"), None),
        )
        .await;
    }
    let decisions = results(&mut out, PODS).await;
    let done = decisions.iter().filter(|d| d["outcome"] == "done").count();
    assert_eq!(done, 2, "{:?}", by_pod(&decisions));
    assert_eq!(kube.deletes().len(), 2);
    let kept = decisions
        .iter()
        .filter(|d| {
            d["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("min_healthy_replicas: Deployment shop/web has 10 of 10 replicas available and 2 deleted"))
        })
        .count();
    assert_eq!(kept, PODS - 2, "{:?}", by_pod(&decisions));
    for r in responders {
        r.stop().await;
    }
}

/// When the budget cannot be checked (here: NATS refuses the responder's
/// write of it), the destructive action is not taken, and the decision
/// says why. Label actions, which take no budget, go on.
#[tokio::test]
async fn the_rate_limit_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("auth.conf");
    std::fs::write(
        &conf,
        r#"
authorization {
  users = [
    { user: responder, password: pw,
      permissions: { publish: { allow: [">"], deny: ["$KV.falco-nats.actions"] }, subscribe: { allow: [">"] } } }
    { user: admin, password: adminpw }
  ]
}
"#,
    )
    .unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let kube = falco_nats::simulate::kube_api::KubeApi::start()
        .await
        .unwrap();
    kube.add_pods("shop", "web", 2);
    let client =
        async_nats::ConnectOptions::with_user_and_password("admin".into(), "adminpw".into())
            .connect(nats.url())
            .await
            .unwrap();
    let mut out = client.subscribe("falco.response.>").await.unwrap();
    client.flush().await.unwrap();
    let mut opts = respond_options(&nats.url(), &kubeconfig(&kube));
    opts.nats.user = Some("responder".into());
    opts.nats.password = Some("pw".into());
    opts.policy = policy(
        r#"
rules:
  - name: delete and label
    match: {priority: ">=Critical"}
    actions:
      - action: delete-pod
      - action: label-pod
"#,
    );
    let responder = Responder::start(opts).await;
    publish(&client, pod_alert("Critical", "shop", "web-0", None)).await;
    let decisions = results(&mut out, 2).await;
    let delete = decisions
        .iter()
        .find(|d| d["action"] == "delete-pod")
        .unwrap();
    let label = decisions
        .iter()
        .find(|d| d["action"] == "label-pod")
        .unwrap();
    assert_eq!(delete["outcome"], "skipped");
    assert!(
        delete["reason"]
            .as_str()
            .unwrap()
            .starts_with("rate_limit_unavailable: "),
        "{delete}"
    );
    assert_eq!(label["outcome"], "done", "{label}");
    assert!(kube.deletes().is_empty());
    assert!(kube.has_pod("shop", "web-0"));
    responder.stop().await;
}

/// `min_healthy_replicas`: the last healthy replicas of a Deployment or a
/// StatefulSet stay (globally, and per policy rule as a percentage); a pod
/// that is not Ready costs none; an owner that is missing or unreadable
/// is a skip with its reason, never a deletion.
#[tokio::test]
async fn healthy_replicas_are_kept() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    let rs = kube.add_deployment("shop", "web", 3, 3);
    for pod in ["web-a", "web-b", "web-c"] {
        kube.add_pod_of("shop", pod, ("ReplicaSet", &rs), true);
    }
    kube.add_statefulset("shop", "db", 4, 3);
    kube.add_pod_of("shop", "db-0", ("StatefulSet", "db"), false);
    for pod in ["db-1", "db-2", "db-3"] {
        kube.add_pod_of("shop", pod, ("StatefulSet", "db"), true);
    }
    kube.add_pod_of("shop", "orphan", ("ReplicaSet", "gone-5d8f7c9b6"), true);
    kube.add_deployment("locked", "api", 5, 5);
    kube.add_pod_of("locked", "api-a", ("ReplicaSet", "api-5d8f7c9b6"), true);
    kube.forbid_apps("locked");
    kube.add_pod("shop", "standalone", "uid-standalone", None);

    let mut opts = options(&nats, &kube);
    opts.limits.min_healthy_replicas = "2".parse().unwrap();
    opts.policy = policy(
        r#"
rules:
  - name: databases keep three quarters
    match: {rules: ["Database shell"]}
    min_healthy_replicas: "75%"
    actions: [{action: delete-pod}]
  - name: the rest
    match: {priority: ">=Critical"}
    actions: [{action: delete-pod}]
"#,
    );
    let responder = Responder::start(opts).await;
    let db_alert = |pod: &str| {
        crate::support::responder::alert(
            "Critical",
            "Database shell",
            serde_json::json!({"k8s.ns.name": "shop", "k8s.pod.name": pod}),
        )
    };
    // One at a time, so the order of the Deployment's deletions is known.
    let mut decide = async |payload: Vec<u8>| {
        publish(&client, payload).await;
        results(&mut out, 1).await.remove(0)
    };
    let d = decide(pod_alert("Critical", "shop", "web-a", None)).await;
    assert_eq!(d["outcome"], "done", "{d}");
    // The status still says 3 available: the deletion just made counts.
    let d = decide(pod_alert("Critical", "shop", "web-b", None)).await;
    assert_eq!(d["outcome"], "skipped");
    assert_eq!(
        d["reason"],
        "min_healthy_replicas: Deployment shop/web has 3 of 3 replicas available and 1 deleted in the last 30s; \
         deleting this pod would leave 1, fewer than 2 (min_healthy_replicas 2)"
    );
    // 75 % of 4 is 3: db-0 is not Ready (costs nothing), db-1 is.
    let d = decide(db_alert("db-0")).await;
    assert_eq!(d["outcome"], "done", "{d}");
    let d = decide(db_alert("db-1")).await;
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .starts_with("min_healthy_replicas: StatefulSet shop/db has 3 of 4 replicas available; deleting this pod would leave 2, fewer than 3 (min_healthy_replicas 75%)"),
        "{d}"
    );
    let d = decide(pod_alert("Critical", "shop", "orphan", None)).await;
    assert_eq!(
        d["reason"],
        "min_healthy_replicas: cannot tell the workload's healthy replicas: its ReplicaSet shop/gone-5d8f7c9b6 is not found"
    );
    let d = decide(pod_alert("Critical", "locked", "api-a", None)).await;
    let reason = d["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("min_healthy_replicas: cannot tell the workload's healthy replicas: cannot read its ReplicaSet locked/api-5d8f7c9b6")
            && reason.contains("forbidden"),
        "{reason}"
    );
    // No replicas to keep: the guard does not apply.
    let d = decide(pod_alert("Critical", "shop", "standalone", None)).await;
    assert_eq!(d["outcome"], "done", "{d}");

    let deleted: Vec<String> = kube.deletes().iter().map(|d| d.name.clone()).collect();
    assert_eq!(deleted, ["web-a", "db-0", "standalone"]);
    responder.stop().await;
}

/// `--skip-statefulset-pods` and `--skip-standalone-pods`, off by default.
#[tokio::test]
async fn statefulset_and_standalone_pods_can_be_skipped() {
    let Scene {
        nats,
        kube,
        client,
        mut out,
    } = Scene::start().await;
    let rs = kube.add_deployment("shop", "web", 3, 3);
    kube.add_pod_of("shop", "web-a", ("ReplicaSet", &rs), true);
    kube.add_statefulset("shop", "db", 3, 3);
    kube.add_pod_of("shop", "db-0", ("StatefulSet", "db"), true);
    kube.add_pod("shop", "standalone", "uid-standalone", None);
    let mut opts = options(&nats, &kube);
    opts.rails.skip_statefulset_pods = true;
    opts.rails.skip_standalone_pods = true;
    let responder = Responder::start(opts).await;
    for pod in ["web-a", "db-0", "standalone"] {
        publish(&client, pod_alert("Critical", "shop", pod, None)).await;
    }
    let decided = by_pod(&results(&mut out, 3).await);
    assert_eq!(decided["db-0"], "skipped statefulset_pod");
    assert_eq!(decided["standalone"], "skipped standalone_pod");
    assert!(decided["web-a"].starts_with("done"), "{decided:?}");
    assert_eq!(kube.deletes().len(), 1);
    responder.stop().await;
}

/// The responder on a NATS server without JetStream (the seed's plain
/// server, the NATS chart's default): it stops at once with an error that
/// names both ways out; with `--guards local` it acts on core NATS, a rate
/// limit per replica and no kill switch, and says so in /readyz and a
/// metric.
#[tokio::test]
async fn without_jetstream_the_responder_says_so_or_runs_with_local_guards() {
    let nats = NatsServer::start_without_jetstream();
    let kube = falco_nats::simulate::kube_api::KubeApi::start()
        .await
        .unwrap();
    kube.add_pods("shop", "web", 3);
    let opts = respond_options(&nats.url(), &kubeconfig(&kube));
    let stopped = tokio::time::timeout(
        Duration::from_secs(10),
        falco_nats::respond::run(opts, None, tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("it stops at once, not after retries");
    let e = stopped.unwrap_err().to_string();
    for says in ["no JetStream", "enable JetStream", "--guards local"] {
        assert!(e.contains(says), "{says}: {e}");
    }

    let client = nats.client().await;
    let mut out = client.subscribe("falco.response.>").await.unwrap();
    client.flush().await.unwrap();
    let mut opts = respond_options(&nats.url(), &kubeconfig(&kube));
    opts.guards = falco_nats::respond::control::Guards::Local;
    opts.limits.max_actions_per_minute = 2;
    let responder = Responder::start(opts).await;
    let (code, body) = http_get(responder.http, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("guards: local (--guards local): no kill switch"),
        "{body}"
    );
    assert!(
        body.contains("kill switch: none (--guards local)"),
        "{body}"
    );
    assert_eq!(
        responder
            .metric("falco_nats_respond_guards{mode=\"local\"}")
            .await,
        1.0
    );
    for i in 0..3 {
        publish(
            &client,
            pod_alert("Critical", "shop", &format!("web-{i}"), None),
        )
        .await;
    }
    let decisions = results(&mut out, 3).await;
    let reasons: Vec<&str> = decisions
        .iter()
        .map(|d| d["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["done", "done", "skipped"], "{decisions:?}");
    assert_eq!(decisions[2]["reason"], "rate_limited");
    assert_eq!(kube.deletes().len(), 2);
    responder.stop().await;
}
