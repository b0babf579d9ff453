//! The NATS configuration deploy/ ships, as the tests run it: the hub's
//! nats.conf from deploy/base/nats.yaml and a node's leaf.conf from
//! deploy/components/leaf, read from those files (not copied), adapted only
//! in ports and store directories; the passwords deploy/nats-users.sh
//! makes; clients logged in as each shipped user.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use async_nats::ConnectOptions;
use falco_nats::nats::NatsOptions;
use serde::Deserialize;
use serde_json::Value;

use super::{free_port, NatsServer};

pub fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

pub fn yaml_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The passwords deploy/nats-users.sh makes, by Secret name (the bridge's
/// and the leaf's twice, in two namespaces, the same), and the ui's token.
pub fn passwords() -> BTreeMap<String, String> {
    let out = Command::new(deploy().join("nats-users.sh"))
        .output()
        .expect("run deploy/nats-users.sh");
    assert!(out.status.success());
    let mut by_name = BTreeMap::new();
    for doc in yaml_docs(&String::from_utf8(out.stdout).expect("UTF-8")) {
        assert_eq!(doc["kind"], "Secret");
        let name = doc["metadata"]["name"].as_str().expect("a name").to_owned();
        // The ui's page token (components/ui) is a Secret of the same kind.
        let secret = &doc["stringData"];
        let password = secret["password"]
            .as_str()
            .or(secret["token"].as_str())
            .or(secret["key"].as_str())
            .expect("a password or a token")
            .to_owned();
        assert!(password.len() >= 32, "{password}");
        if let Some(before) = by_name.insert(name, password.clone()) {
            assert_eq!(before, password, "one password per user");
        }
    }
    by_name
}

/// The environment the hub's pod gives nats.conf: every user's password.
pub fn hub_env(pw: &BTreeMap<String, String>) -> Vec<(&'static str, String)> {
    [
        ("NATS_BRIDGE_PASSWORD", "nats-user-bridge"),
        ("NATS_RESPOND_PASSWORD", "nats-user-respond"),
        ("NATS_READER_PASSWORD", "nats-user-reader"),
        ("NATS_ADMIN_PASSWORD", "nats-user-admin"),
        ("NATS_LEAF_PASSWORD", "nats-user-leaf"),
        ("NATS_SOURCES_PASSWORD", "nats-user-sources"),
    ]
    .into_iter()
    .map(|(var, secret)| (var, pw[secret].clone()))
    .collect()
}

/// The shipped nats.conf, on a test's own ports and store (in `dir`), and
/// the leaf node port it listens on instead of 7422.
pub fn hub_config(dir: &Path) -> (PathBuf, u16) {
    let text = std::fs::read_to_string(deploy().join("base/nats.yaml")).expect("nats.yaml");
    let config = yaml_docs(&text)
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the ConfigMap");
    let conf = config["data"]["nats.conf"]
        .as_str()
        .expect("nats.conf")
        .replace("http_port: 8222\n", "")
        // The test server's own -sd flag gives the store.
        .replace("store_dir: /data\n", "");
    assert!(conf.contains("port: 7422"), "the leaf node port");
    // A leaf node port of the test's own.
    let leaf_port = free_port();
    let conf = conf.replace("port: 7422", &format!("port: {leaf_port}"));
    let path = dir.join("nats.conf");
    std::fs::write(&path, conf).expect("write nats.conf");
    (path, leaf_port)
}

/// The hub as shipped, running: the server, its leaf node port.
pub fn start_hub(dir: &Path, pw: &BTreeMap<String, String>) -> (NatsServer, u16) {
    let (conf, leaf_port) = hub_config(dir);
    let env = hub_env(pw);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let hub = NatsServer::start_with_env(
        free_port(),
        &["-c", conf.to_str().expect("UTF-8 path")],
        &env,
    );
    (hub, leaf_port)
}

/// A node's leaf nats-server as deploy/components/leaf runs it, for node
/// `domain`, connected to the hub's leaf node port `leaf_port`.
pub fn start_leaf(
    dir: &Path,
    domain: &str,
    leaf_port: u16,
    pw: &BTreeMap<String, String>,
) -> NatsServer {
    let component = deploy().join("components/leaf");
    let config = yaml_docs(
        &std::fs::read_to_string(component.join("leaf-config.yaml")).expect("leaf-config.yaml"),
    );
    let port = free_port();
    let leaf_conf = config[0]["data"]["leaf.conf"]
        .as_str()
        .expect("leaf.conf")
        // The test's own ports and store (the -sd flag).
        .replace("http: 127.0.0.1:8222\n", "")
        .replace("store_dir: /data\n", "")
        .replace(
            "listen: 127.0.0.1:4222",
            &format!("listen: 127.0.0.1:{port}"),
        );
    let path = dir.join(format!("leaf-{domain}.conf"));
    std::fs::write(&path, leaf_conf).expect("write leaf.conf");
    let hub_url = leaf_hub_url(leaf_port, pw);
    NatsServer::start_with_env(
        port,
        &["-c", path.to_str().expect("UTF-8 path")],
        &[
            ("NATS_LEAF_DOMAIN", domain),
            ("NATS_HUB_URL", &hub_url),
            ("NATS_BRIDGE_PASSWORD", &pw["nats-user-bridge"]),
        ],
    )
}

/// The hub's address as the leaf container composes it
/// (deploy/components/leaf/falco-leaf.yaml), on the test's port.
pub fn leaf_hub_url(leaf_port: u16, pw: &BTreeMap<String, String>) -> String {
    let patch = yaml_docs(
        &std::fs::read_to_string(deploy().join("components/leaf/falco-leaf.yaml"))
            .expect("falco-leaf.yaml"),
    );
    let containers = patch[0]["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    let leaf = containers
        .iter()
        .find(|c| c["name"] == "nats-leaf")
        .expect("the nats-leaf container");
    let template = leaf["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "NATS_HUB_URL")
        .expect("NATS_HUB_URL")["value"]
        .as_str()
        .expect("a value")
        .to_owned();
    template
        .replace("$(NATS_LEAF_PASSWORD)", &pw["nats-user-leaf"])
        .replace(
            "nats.falco-nats.svc:7422",
            &format!("127.0.0.1:{leaf_port}"),
        )
}

/// NATS options for one of the shipped users, as its manifest sets them
/// (the password in a file, its own inbox prefix).
pub fn user(url: &str, name: &str, password: &str, dir: &Path) -> NatsOptions {
    let file = dir.join(format!("{name}.password"));
    std::fs::write(&file, format!("{password}\n")).expect("write the password");
    let mut options = NatsOptions::for_server(url);
    options.user = Some(name.into());
    options.password_file = Some(file);
    options.inbox_prefix = format!("_INBOX_{name}");
    options
}

/// A client logged in as a shipped user, with its inbox prefix.
pub async fn client_as(url: &str, name: &str, password: &str) -> async_nats::Client {
    ConnectOptions::with_user_and_password(name.into(), password.into())
        .custom_inbox_prefix(format!("_INBOX_{name}"))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("{name} connects to {url}: {e}"))
}
