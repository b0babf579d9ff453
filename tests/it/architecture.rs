//! The crate's layout holds: its modules' dependencies run one way (no
//! import circle, between the top-level modules nor between files), only
//! `cli/` and `main.rs` know clap, and no file grows past what reads
//! top-down. Read from the sources, as a reviewer would.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/` but `lib.rs` and `main.rs`, by its module
/// path (`respond::guards`; a `mod.rs` is its directory's module).
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src(), &mut files);
    let mut modules = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(src()).unwrap().with_extension("");
        let mut parts: Vec<String> = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts == ["lib"] || parts == ["main"] {
            continue;
        }
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        modules.insert(parts.join("::"), file);
    }
    modules
}

/// A file's code: before its tests, without comments.
fn code(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Splits at the commas outside braces.
fn split_top(text: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0, 0, Vec::new());
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The paths a `use` tree names: `a::{b, c::{d, self}}` is `a::b`,
/// `a::c::d`, `a::c`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let (Some(open), Some(close)) = (tree.find('{'), tree.rfind('}')) else {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        return vec![path.to_owned()];
    };
    let base = tree[..open].trim().trim_end_matches("::");
    split_top(&tree[open + 1..close])
        .into_iter()
        .flat_map(expand)
        .map(|p| match p.as_str() {
            "self" => base.to_owned(),
            _ => format!("{base}::{p}"),
        })
        .collect()
}

/// The module paths `code` names from `crate`, `super` or `self`: its
/// `use` statements and the paths written inline; and in a `mod.rs`, its
/// `children` named bare (`consume::Consume`), as `self::` paths.
fn named_paths(code: &str, children: &[&str]) -> Vec<String> {
    let mut paths = Vec::new();
    let starts = |s: &str| {
        ["crate::", "super::", "self::"]
            .iter()
            .any(|p| s.starts_with(p))
    };
    let child = |s: &str| children.iter().any(|c| s.starts_with(&format!("{c}::")));
    for piece in code.split("use ").skip(1) {
        let statement = piece.split(';').next().unwrap_or_default().trim_start();
        if starts(statement) {
            paths.extend(expand(statement));
        } else if child(statement) {
            paths.extend(expand(statement).into_iter().map(|p| format!("self::{p}")));
        }
    }
    let path_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for (i, _) in code.match_indices("::") {
        let begin = code[..i]
            .rfind(|c: char| !path_char(c))
            .map_or(0, |b| b + 1);
        let end = code[i..]
            .find(|c: char| !path_char(c))
            .map_or(code.len(), |e| i + e);
        let path = &code[begin..end];
        let path = path.trim_end_matches(':');
        if starts(path) {
            paths.push(path.to_owned());
        } else if child(path) {
            paths.push(format!("self::{path}"));
        }
    }
    paths.sort();
    paths.dedup();
    paths
}

/// The module a path names: the longest known prefix, `super` and `self`
/// read from `me`.
fn resolve(me: &str, path: &str, known: &BTreeMap<String, PathBuf>) -> Option<String> {
    let mut at: Vec<&str> = me.split("::").collect();
    let mut segments = path.split("::").filter(|s| !s.is_empty()).peekable();
    match segments.peek() {
        Some(&"crate") => {
            at.clear();
            segments.next();
        }
        _ => {
            while let Some(&s) = segments.peek() {
                match s {
                    "super" => {
                        at.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                segments.next();
            }
        }
    }
    let full: Vec<&str> = at.into_iter().chain(segments).collect();
    (1..=full.len())
        .rev()
        .map(|n| full[..n].join("::"))
        .find(|candidate| known.contains_key(candidate))
}

/// Each module and the modules it uses, at file level or (`top`) at the
/// crate's top level.
fn graph(top: bool) -> BTreeMap<String, BTreeSet<String>> {
    let known = modules();
    let level = |m: &str| {
        if top {
            m.split("::").next().unwrap_or(m).to_owned()
        } else {
            m.to_owned()
        }
    };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (me, file) in &known {
        let node = level(me);
        let children: Vec<&str> = if file.ends_with("mod.rs") {
            known
                .keys()
                .filter_map(|k| k.strip_prefix(&format!("{me}::")))
                .filter(|rest| !rest.contains("::"))
                .collect()
        } else {
            Vec::new()
        };
        let uses = graph.entry(node.clone()).or_default();
        for path in named_paths(&code(file), &children) {
            if let Some(target) = resolve(me, &path, &known).map(|t| level(&t)) {
                if target != node {
                    uses.insert(target);
                }
            }
        }
    }
    graph
}

/// The first circle found, as a path.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if !done.insert(node.to_owned()) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn dependencies_run_one_way() {
    let files = graph(false);
    assert!(files.len() > 60, "only {} modules read", files.len());
    // The reader sees what it must: a few edges the layout rests on.
    assert!(files["respond::guards"].contains("respond::control"));
    assert!(files["nats::fast_batch"].contains("nats::headers"));
    assert!(!files["nats::fast_batch"].contains("nats::publisher"));
    assert!(files["nats::headers"].contains("signing"));
    assert!(
        files["respond"].contains("respond::consume"),
        "a parent uses its children"
    );
    assert_eq!(circle(&files), None, "an import circle between files");
    let top = graph(true);
    assert!(top["respond"].contains("nats"));
    assert_eq!(circle(&top), None, "an import circle between modules");
    // And the check finds one when there is one.
    let mut with_circle = top.clone();
    with_circle
        .get_mut("nats")
        .unwrap()
        .insert("respond".to_owned());
    assert!(circle(&with_circle).is_some());
}

#[test]
fn only_the_command_line_knows_clap() {
    let knows: Vec<String> = modules()
        .into_iter()
        .filter(|(module, file)| {
            module != "cli" && !module.starts_with("cli::") && code(file).contains("clap")
        })
        .map(|(module, _)| module)
        .collect();
    assert!(knows.is_empty(), "clap outside cli/: {knows:?}");
    let lib = code(&src().join("lib.rs"));
    assert!(!lib.contains("clap"), "lib.rs");
}

/// Each file reads top-down in one sitting: the three the architecture
/// issue split stay split.
#[test]
fn no_file_grows_past_what_reads_top_down() {
    for (file, most) in [
        ("nats/publisher.rs", 400),
        ("respond/mod.rs", 400),
        ("respond/responder.rs", 400),
        ("respond/consume.rs", 450),
        ("cli/mod.rs", 400),
    ] {
        let lines = std::fs::read_to_string(src().join(file))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= most, "{file}: {lines} lines, more than {most}");
    }
}
