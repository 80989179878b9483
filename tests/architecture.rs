//! The data path (protocol, session, router, pool) must not depend on the control
//! plane (cluster, cdc, admin, config, reload, fleet, state, server) through any
//! module that depends on the data path again: a cycle would tie the two together at
//! compile time, and a change in one would reach the other. Read from the sources:
//! every `crate::<module>` a module names (its unit tests left out), followed
//! transitively. Also holds every source file to about 600 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const DATA_PATH: &[&str] = &["protocol", "session", "router", "pool"];
const CONTROL_PLANE: &[&str] = &[
    "cluster", "cdc", "admin", "config", "reload", "fleet", "state", "server",
];
/// Modules that are tools, not parts of the proxy: they may name anything.
const TOOLS: &[&str] = &["fuzz", "testbed", "main", "lib"];
/// Longest a source file may be (a file is a layer a reader takes in at once).
const MAX_LINES: usize = 620;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// What each top-level module names of the others.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(src()).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        if TOOLS.contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests may reach anywhere.
        let text = match text.find("#[cfg(test)]\nmod tests") {
            Some(at) => &text[..at],
            None => &text[..],
        };
        let named = deps.entry(module.clone()).or_default();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != module && !TOOLS.contains(&name.as_str()) {
                named.insert(name);
            }
        }
    }
    deps
}

/// The path from `from` to `to` through the dependencies, if there is one.
fn path(deps: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut queue = vec![vec![from.to_string()]];
    while !queue.is_empty() {
        let mut next = Vec::new();
        for route in queue {
            let last = route.last().unwrap();
            for dep in deps.get(last).into_iter().flatten() {
                if dep == to {
                    let mut found = route.clone();
                    found.push(dep.clone());
                    return Some(found);
                }
                if seen.insert(dep.clone()) {
                    let mut longer = route.clone();
                    longer.push(dep.clone());
                    next.push(longer);
                }
            }
        }
        queue = next;
    }
    None
}

#[test]
fn the_data_path_and_the_control_plane_make_no_cycle() {
    let deps = dependencies();
    let mut cycles = Vec::new();
    for data in DATA_PATH {
        for control in CONTROL_PLANE {
            if let (Some(there), Some(back)) =
                (path(&deps, data, control), path(&deps, control, data))
            {
                cycles.push(format!(
                    "{} then back: {}",
                    there.join(" → "),
                    back.join(" → ")
                ));
            }
        }
    }
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
    // The check itself reads what it should: the session uses the cluster, and the
    // control plane uses the session.
    assert!(path(&deps, "session", "cluster").is_some());
    assert!(path(&deps, "server", "session").is_some());
}

#[test]
fn no_source_file_is_longer_than_a_reader_takes_in_at_once() {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let lines = std::fs::read_to_string(file).unwrap().lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", file.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}
