//! The documentation says what the binary does: every link in the README
//! and `docs/` leads somewhere, the flag tables of `docs/flags.md` are each
//! subcommand's flags as the CLI defines them (every flag, with its
//! environment variable), and
//! the result subjects the docs name are the ones the responder publishes
//! on. (The metrics the docs name: `dashboard.rs`.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::support::manifests::{cli_flags, markdown_files};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The lines of a Markdown text outside code fences.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// A heading's anchor as GitHub makes it: lower case, punctuation dropped
/// (but `-` and `_`), spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    prose(text)
        .iter()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect()
}

/// Link targets of a line, inline code taken out first.
fn links(line: &str) -> Vec<String> {
    let mut text = String::new();
    for (i, piece) in line.split('`').enumerate() {
        if i % 2 == 0 {
            text.push_str(piece);
        }
    }
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].to_owned());
        rest = &after[end..];
    }
    out
}

#[test]
fn every_link_in_the_readme_and_the_docs_leads_somewhere() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap();
        for line in prose(&text) {
            for target in links(line) {
                if target.starts_with("http://") || target.starts_with("https://") {
                    continue;
                }
                checked += 1;
                let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
                let linked = if path.is_empty() {
                    file.clone()
                } else {
                    dir.join(path)
                };
                if !linked.exists() {
                    broken.push(format!("{}: {target} (no such file)", file.display()));
                    continue;
                }
                if !fragment.is_empty() {
                    let theirs = std::fs::read_to_string(&linked).unwrap_or_default();
                    if !anchors(&theirs).contains(fragment) {
                        broken.push(format!("{}: {target} (no such heading)", file.display()));
                    }
                }
            }
        }
    }
    assert!(checked > 30, "only {checked} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Code spans of a table cell.
fn spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// docs/flags.md's tables: for each `## ` section, flag -> environment
/// variable.
fn documented_flags() -> BTreeMap<String, BTreeMap<String, String>> {
    let text = std::fs::read_to_string(root().join("docs/flags.md")).unwrap();
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut section = String::new();
    for line in prose(&text) {
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading.to_owned();
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let flags: Vec<&str> = spans(cells[1])
            .into_iter()
            .flat_map(|s| s.split(", "))
            .filter(|f| f.starts_with("--"))
            .collect();
        let envs = spans(cells[2]);
        assert_eq!(
            flags.len(),
            envs.len(),
            "docs/flags.md, {section}: {line}: a variable for each flag"
        );
        for (flag, env) in flags.into_iter().zip(envs) {
            let flag = flag.split_whitespace().next().unwrap();
            sections
                .entry(section.clone())
                .or_default()
                .insert(flag.to_owned(), env.to_owned());
        }
    }
    sections
}

#[test]
fn the_flag_tables_are_what_each_subcommand_takes() {
    let documented = documented_flags();
    let (nats_heading, nats) = documented
        .iter()
        .find(|(h, _)| h.starts_with("NATS connection"))
        .expect("a NATS connection section");
    let with_nats: BTreeSet<&str> = spans(nats_heading).into_iter().collect();
    let bridge = documented
        .get("`falco-nats bridge`")
        .expect("a bridge section");
    // Every subcommand takes the global flags; the bridge's table has them.
    let global: BTreeMap<String, String> = ["--log-format", "--threads"]
        .iter()
        .map(|f| (f.to_string(), bridge[*f].clone()))
        .collect();
    let mut problems = Vec::new();
    // Every subcommand the binary has, so a new one cannot go undocumented.
    let subcommands: Vec<String> = {
        use clap::CommandFactory;
        falco_nats::cli::Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect()
    };
    assert!(subcommands.len() >= 9, "{subcommands:?}");
    for subcommand in subcommands.iter().map(String::as_str) {
        let section = documented
            .iter()
            .find(|(h, _)| h.starts_with(&format!("`falco-nats {subcommand}`")))
            .map(|(_, flags)| flags.clone())
            .unwrap_or_else(|| panic!("docs/flags.md has no section for {subcommand}"));
        let mut expected = section;
        expected.extend(global.clone());
        if with_nats.contains(subcommand) {
            expected.extend(nats.clone());
        }
        let actual = cli_flags(subcommand);
        for (flag, env) in &actual {
            match (env, expected.get(flag)) {
                (None, _) => problems.push(format!("{subcommand} {flag}: reads no variable")),
                (Some(_), None) => problems.push(format!("{subcommand} {flag}: not documented")),
                (Some(env), Some(doc)) if env != doc => problems.push(format!(
                    "{subcommand} {flag}: reads {env}, documented as {doc}"
                )),
                _ => {}
            }
        }
        for flag in expected.keys() {
            if !actual.contains_key(flag) {
                problems.push(format!("{subcommand} {flag}: documented, not taken"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The result subjects the docs name (`falco.response.<x>`) are where the
/// responder publishes: `<x>` is an action's name as a subject token, or
/// `none`.
#[test]
fn the_result_subjects_the_docs_name_are_the_responders() {
    let policy = falco_nats::respond::policy::Policy::parse(
        "all actions",
        "rules:\n  - name: all\n    actions:\n      - action: delete-pod\n      - action: label-pod\n      - action: isolate-pod\n      - action: log\n",
    )
    .unwrap();
    let mut published: BTreeSet<String> = policy.rules[0]
        .actions
        .iter()
        .map(|a| falco_nats::nats::subject::slug(a.name()))
        .collect();
    published.insert("none".to_owned());
    let mut named = BTreeSet::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for piece in text.split("falco.response.").skip(1) {
            let token: String = piece
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            if !token.is_empty() {
                named.insert((file.display().to_string(), token));
            }
        }
    }
    assert!(named.iter().any(|(_, t)| t == "delete_pod"));
    for (file, token) in named {
        assert!(
            published.contains(&token),
            "{file} names falco.response.{token}; the responder publishes on {published:?}"
        );
    }
}

/// The skip reasons the docs list are the responder's own, every one, in
/// its order; a reason named anywhere else in the docs (`reason \`x\``)
/// is one of them.
#[test]
fn the_skip_reasons_the_docs_list_are_the_responders() {
    use falco_nats::respond::outcome::Skip;
    let text = std::fs::read_to_string(root().join("docs/respond.md")).unwrap();
    let lines = prose(&text);
    let start = lines
        .iter()
        .position(|l| l.starts_with("### Why an action was skipped"))
        .expect("docs/respond.md has the skip reasons' section");
    let listed: Vec<&str> = lines[start..]
        .iter()
        .skip_while(|l| !l.starts_with("| reason"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| spans(l.split('|').nth(1).unwrap_or_default())[0])
        .collect();
    let own: Vec<&str> = Skip::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(listed, own, "docs/respond.md's table of skip reasons");
    // A `skipped` decision named with its reason elsewhere names a real one.
    let mut problems = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for piece in text.split("reason `").skip(1) {
            let name: String = piece
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let looks_like_skip = name.contains('_') || own.contains(&name.as_str());
            if looks_like_skip && !own.contains(&name.as_str()) && !name.starts_with("falco") {
                problems.push(format!("{}: reason `{name}`", file.display()));
            }
        }
    }
    assert!(problems.is_empty(), "not a skip reason: {problems:?}");
}
