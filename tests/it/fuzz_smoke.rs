//! A short fuzz run in `cargo test`: the fuzz targets' properties
//! (`falco_nats::fuzzing`) over seeded random mutations of valid inputs.
//! It is not coverage-guided (that is `cargo +nightly fuzz`, see
//! docs/development.md); it runs on stable, in CI, and a failure prints the input and the
//! seed that reproduce it. `FUZZ_SMOKE_ITERATIONS` and `FUZZ_SMOKE_SEED`
//! change the run.

use std::panic::{catch_unwind, AssertUnwindSafe};

use falco_nats::fuzzing;
use falco_nats::simulate::alerts::AlertFactory;
use prost::Message;

const POLICY: &str = include_str!("../../deploy/base/policy.yaml");

fn iterations() -> usize {
    std::env::var("FUZZ_SMOKE_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SMOKE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f41c0)
}

/// Bytes a parser treats specially.
const INTERESTING: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"\n",
    b"\r\n",
    b"<NA>",
    b"null",
    b"true",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"\xff",
    b"\xc3\x28",
    b"\xe2\x82",
    b"priority",
    b"k8s.ns.name",
    b"k8s.pod.name",
    b"/",
    b"#",
    b"?",
    b"..",
    b"%2F",
    b"\\u001b[2J",
    b"\\u009b",
    b"\xc2\x9b",
    b"\x7f",
    b"\xd1\x95",
    b"Critical",
    b"output_fields",
    b"- ",
    b"  ",
    b"&a",
    b"*a",
    b"!!",
    b"%",
    b"\t",
    b"\0",
];

/// One random change to `data`, sometimes borrowing from `other`.
fn mutate(rng: &mut fastrand::Rng, data: &mut Vec<u8>, other: &[u8]) {
    let len = data.len();
    match rng.u8(0..8) {
        0 if len > 0 => {
            let i = rng.usize(0..len);
            data[i] ^= 1 << rng.u8(0..8);
        }
        1 if len > 0 => {
            let i = rng.usize(0..len);
            data[i] = rng.u8(..);
        }
        2 => {
            let at = rng.usize(0..=len);
            let piece = INTERESTING[rng.usize(0..INTERESTING.len())];
            data.splice(at..at, piece.iter().copied());
        }
        3 if len > 0 => {
            let start = rng.usize(0..len);
            let end = rng.usize(start..=len.min(start + 64));
            data.drain(start..end);
        }
        4 if len > 0 => {
            let start = rng.usize(0..len);
            let end = rng.usize(start..=len.min(start + 64));
            let chunk = data[start..end].to_vec();
            let at = rng.usize(0..=len);
            data.splice(at..at, chunk);
        }
        5 if !other.is_empty() => {
            let cut = rng.usize(0..=len);
            let from = rng.usize(0..other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        6 => data.truncate(rng.usize(0..=len)),
        _ => {
            let at = rng.usize(0..=len);
            let n = rng.usize(1..8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            data.splice(at..at, bytes);
        }
    }
}

/// Runs `property` on the seeds, then on `iterations()` mutants of them
/// (one to eight changes each); panics with the reproducing input.
fn run(name: &str, seeds: &[Vec<u8>], property: fn(&[u8])) {
    let mut rng = fastrand::Rng::with_seed(seed());
    let check = |input: &[u8]| {
        if catch_unwind(AssertUnwindSafe(|| property(input))).is_err() {
            panic!(
                "{name}: property failed (seed {}) on input {:?}",
                seed(),
                String::from_utf8_lossy(input)
            );
        }
    };
    for s in seeds {
        check(s);
    }
    for _ in 0..iterations() {
        let mut input = seeds[rng.usize(0..seeds.len())].clone();
        let other = &seeds[rng.usize(0..seeds.len())];
        for _ in 0..rng.usize(1..=8) {
            mutate(&mut rng, &mut input, other);
        }
        check(&input);
    }
}

#[test]
fn json_line_survives_mutated_alerts() {
    let mut factory = AlertFactory::new("node-fuzz", false);
    let seeds: Vec<Vec<u8>> = (0..8)
        .map(|_| factory.next_json().into_bytes())
        .chain([b"{}".to_vec(), b"  ".to_vec()])
        .collect();
    run("json_line", &seeds, fuzzing::json_line);
}

#[test]
fn falcosidekick_payloads_keep_the_alert() {
    let mut factory = AlertFactory::new("node-fuzz", false);
    let seeds: Vec<Vec<u8>> = (0..8)
        .map(|_| factory.next_json().into_bytes())
        .chain([
            br#"{"output":"<a & b>","priority":"Debug","rule":"Test rule","tags":["b","a"],"time":"2023-05-25T13:44:05.1+02:00","output_fields":{"n":1.50,"l":[1,"\u2028"],"o":{"z":null}}}"#.to_vec(),
        ])
        .collect();
    run(
        "falcosidekick_payload",
        &seeds,
        fuzzing::falcosidekick_payload,
    );
}

#[test]
fn grpc_to_json_survives_mutated_responses() {
    let mut plain = AlertFactory::new("node-fuzz", false);
    let mut verbatim = AlertFactory::new("node-fuzz", true);
    let mut more = AlertFactory::new("node-merged", false);
    let seeds: Vec<Vec<u8>> = (0..4)
        .flat_map(|_| {
            [
                plain.next_response().encode_to_vec(),
                verbatim.next_response().encode_to_vec(),
            ]
        })
        .chain((0..4).map(|_| {
            // Two messages back to back are one, merged: strings replaced,
            // tags added, map entries out of order and keys repeated (a
            // later entry wins), as another protobuf library may write.
            let mut first = more.next_response();
            first
                .output_fields
                .insert("zz.last".into(), "kept? ünï 🐧".into());
            let mut merged = first.encode_to_vec();
            let mut second = more.next_response();
            second
                .output_fields
                .retain(|k, _| k.as_str() < "evt" || k.as_str() > "zz");
            second.output_fields.insert("zz.last".into(), "<NA>".into());
            second.output_fields.insert("aa.first".into(), "1".into());
            merged.extend(second.encode_to_vec());
            merged
        }))
        .collect();
    run("grpc_to_json", &seeds, fuzzing::grpc_to_json);
}

#[test]
fn policy_parser_survives_mutated_policies() {
    let seeds = vec![
        POLICY.as_bytes().to_vec(),
        b"rules:\n  - name: x\n    match: {priority: \">=Critical\"}\n    actions: [{action: delete-pod}]\n"
            .to_vec(),
    ];
    run("policy", &seeds, fuzzing::policy);
}

/// Alerts naming pods, some already hostile.
fn pod_alerts() -> Vec<Vec<u8>> {
    let alert = |ns: &str, pod: &str| {
        serde_json::json!({
            "output": "12:00:00.0: Critical x", "priority": "Critical", "rule": "r",
            "output_fields": {"k8s.ns.name": ns, "k8s.pod.name": pod, "k8s.pod.uid": "0f1e-2d"},
            "time": "t", "hostname": "h",
        })
        .to_string()
        .into_bytes()
    };
    vec![
        alert("shop", "web-7d9c.v2"),
        alert("kube-system/pods/coredns#", "x"),
        alert("shop", "web\u{1b}[2J"),
    ]
}

#[test]
fn alert_pod_names_stay_path_safe() {
    run("alert_pod", &pod_alerts(), fuzzing::alert_pod);
}

#[test]
fn tail_prints_no_control_characters() {
    let mut seeds = pod_alerts();
    seeds.push(
        br#"{"action":"delete-pod","outcome":"done","reason":"r","namespace":"a","pod":"b"}"#
            .to_vec(),
    );
    run("tail_line", &seeds, fuzzing::tail_line);
}
