//! The proxy crate's layering, checked from its source: its top-level modules (a file or a
//! folder under `src/`) import each other without cycles, and each one only reaches down the
//! order the crate doc gives. A new import that goes up the stack fails here with the file
//! that makes it, so the map in `lib.rs` stays true.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top: a module may use only those listed before it. This is the order in
/// `lib.rs`'s map.
const LAYERS: &[&str] = &[
    "keep",
    "drain",
    "proto",
    "respond",
    "telemetry",
    "identity",
    "upstream",
    "stages",
    "routing",
    "config",
    "state",
    "pipeline",
    "http",
    "conn",
    "source",
    "admin",
    "app",
    "init",
];

/// Every `crate::<module>` a file names outside its `#[cfg(test)]` module, with the grouped
/// form `use crate::{a, b::c}` read too.
fn crate_uses(source: &str) -> BTreeSet<String> {
    let code = match source.find("#[cfg(test)]\nmod tests") {
        Some(at) => &source[..at],
        None => source,
    };
    let mut uses = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            let mut depth = 0usize;
            let mut item = String::new();
            for c in group[..end].chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth = depth.saturating_sub(1),
                    ',' if depth == 0 => {
                        uses.insert(first_ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            uses.insert(first_ident(&item));
        } else {
            uses.insert(first_ident(rest));
        }
    }
    uses.remove("");
    uses
}

fn first_ident(s: &str) -> String {
    s.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// module -> (module it uses -> the files that use it).
fn graph() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let source = std::fs::read_to_string(&file).expect("read source");
        let edges = graph.entry(top.clone()).or_default();
        for used in crate_uses(&source) {
            if used != top {
                edges
                    .entry(used)
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    graph
}

#[test]
fn every_module_is_placed_in_the_layer_order() {
    let graph = graph();
    let unplaced: Vec<&String> = graph
        .keys()
        .filter(|m| !LAYERS.contains(&m.as_str()))
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules missing from LAYERS (and from lib.rs's map): {unplaced:?}"
    );
}

#[test]
fn modules_only_use_the_layers_below_them() {
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut upward = Vec::new();
    for (module, edges) in graph() {
        let Some(own) = rank(&module) else { continue };
        for (used, files) in edges {
            match rank(&used) {
                Some(theirs) if theirs < own => {}
                Some(_) => upward.push(format!("{module} -> {used} (in {files:?})")),
                None => {} // not a module of ours (e.g. `crate::Result` re-exports)
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that go up the stack (or sideways), which make cycles possible:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_reader_sees_grouped_and_nested_imports() {
    let uses = crate_uses(
        "use crate::{admin, drain::Drain, stages::{retry, timeout}};\nfn f() { crate::app::run(); }\n#[cfg(test)]\nmod tests { use crate::state; }",
    );
    let want: BTreeSet<String> = ["admin", "drain", "stages", "app"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(uses, want);
}
