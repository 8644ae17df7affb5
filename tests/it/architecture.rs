//! The module layering of `src/lib.rs`, checked on the source: a `crate::` path that points to a
//! module not allowed below the one that uses it fails this test. Lower modules must not reach
//! up into the request pipeline, the server or the command line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers of `src/lib.rs`, bottom first: a module may use any module of a lower layer, and
/// of its own layer only what [`SIBLINGS`] lists.
const LAYERS: &[&[&str]] = &[
    &["clock", "config", "reply", "net", "field"],
    &["telemetry", "cookies", "limits"],
    &["jose", "session", "proxy", "oidc"],
    &["rescue"],
    &["state"],
    &["access"],
    &["endpoints"],
    &["app"],
    &["server"],
    &["cli"],
];

/// Uses within one layer that are allowed.
const SIBLINGS: &[(&str, &str)] = &[("oidc", "jose")];

/// Each top-level module's layer.
fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// May `from` use `to`?
fn may_use(from: &str, to: &str) -> Option<bool> {
    let (from_layer, to_layer) = (layer_of(from)?, layer_of(to)?);
    Some(to_layer < from_layer || SIBLINGS.contains(&(from, to)))
}

/// Upward imports that exist today and are being taken apart. An entry that no longer occurs
/// fails the test too, so the list can only shrink.
const KNOWN_UPWARD: &[(&str, &str)] = &[];

/// The top-level modules each source file refers to through `crate::`, comments left out.
fn references(src: &Path) -> BTreeMap<(String, String), Vec<String>> {
    let mut found: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap();
            let first = relative.components().next().unwrap();
            let module = first
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (number, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for target in crate_paths(code) {
                    if target != module {
                        found
                            .entry((module.clone(), target))
                            .or_default()
                            .push(format!("{}:{}", relative.display(), number + 1));
                    }
                }
            }
        }
    }
    found
}

/// The first segment of every `crate::` path on a line, including `crate::{a, b::c}` groups.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            for item in inner.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
        rest = after;
    }
    out
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = references(&src);
    let mut upward = Vec::new();
    for ((from, to), places) in &found {
        let known = KNOWN_UPWARD.contains(&(from.as_str(), to.as_str()));
        match may_use(from, to) {
            None => upward.push(format!(
                "{from} -> {to}: a module not in LAYERS (add it to its layer)"
            )),
            Some(false) if !known => {
                upward.push(format!("{from} -> {to} at {}", places.join(", ")))
            }
            Some(_) => {}
        }
    }
    for (from, to) in KNOWN_UPWARD {
        if !found.contains_key(&(from.to_string(), to.to_string())) {
            upward.push(format!(
                "{from} -> {to} is gone: remove it from KNOWN_UPWARD"
            ));
        }
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn grouped_and_plain_paths_are_both_seen() {
    let seen = crate_paths("use crate::{config::Config, reply}; let x = crate::jose::f();");
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["config", "jose", "reply"]
    );
}

/// Per-worker state (upstream pools, store connections) is a value the server creates and passes
/// down, never ambient per-thread state that a lower module looks up behind the caller's back.
#[test]
fn no_module_keeps_per_thread_state() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for (number, line) in text.lines().enumerate() {
                    let code = line.split("//").next().unwrap_or("");
                    if code.contains("thread_local!") || code.contains("task_local!") {
                        let relative = path.strip_prefix(&src).unwrap();
                        found.push(format!("{}:{}", relative.display(), number + 1));
                    }
                }
            }
        }
    }
    assert!(found.is_empty(), "per-thread state at {}", found.join(", "));
}

#[test]
fn the_layer_table_forbids_the_imports_that_were_taken_apart() {
    for (from, to) in [
        ("oidc", "proxy"),
        ("session", "server"),
        ("access", "app"),
        ("endpoints", "app"),
        ("jose", "oidc"),
        ("config", "telemetry"),
    ] {
        assert_eq!(may_use(from, to), Some(false), "{from} -> {to}");
    }
    for (from, to) in [
        ("oidc", "jose"),
        ("access", "state"),
        ("endpoints", "access"),
        ("cli", "server"),
    ] {
        assert_eq!(may_use(from, to), Some(true), "{from} -> {to}");
    }
}
