//! The crate's module graph points one way (ARCHITECTURE.md, "Layers"): no module imports, through
//! any chain of `use crate::...`, `super::...` or inline `crate::a::b` paths, a module that imports
//! it back, at the level of files and at the level of the top folders of `src/`; and the
//! foundations import nothing of the crate above them.
//!
//! A parent module and its children are one unit (a child may name its parent's items and a
//! parent re-exports its children), so those edges are not counted. The binaries (`src/bin/`)
//! sit on top of everything and are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path ("" for the crate root, "cache::manager") -> its source.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().unwrap() != "bin" {
                    walk(&path, out);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src()).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            out.insert(parts.join("::"), std::fs::read_to_string(&path).unwrap());
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &mut out);
    out
}

fn src() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The source without comments (doc links name modules without importing them).
fn code(source: &str) -> String {
    source
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands one `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap().trim().to_string()];
    };
    let head = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let (mut items, mut depth, mut current) = (Vec::new(), 0, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    items.push(current);
    items
        .iter()
        .filter(|item| !item.trim().is_empty())
        .flat_map(|item| expand(item))
        .map(|path| format!("{head}{path}"))
        .collect()
}

/// Edges between modules: `from` imports something of `to`.
fn edges(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    // The crate root's re-exports (`pub use cache::{BlockTables, PagedLayout};`): name -> module.
    let mut reexports = BTreeMap::new();
    for line in code(&modules[""]).lines() {
        if let Some(tree) = line
            .trim()
            .strip_prefix("pub use ")
            .and_then(|t| t.strip_suffix(';'))
        {
            for path in expand(tree) {
                if let Some((module, name)) = path.rsplit_once("::") {
                    reexports.insert(name.to_string(), module.to_string());
                }
            }
        }
    }
    // The module a path (relative to the crate root) names: its longest module prefix.
    let resolve = |path: &str| -> Option<String> {
        let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let owned;
        if let Some(module) = segments.first().and_then(|s| reexports.get(*s)) {
            owned = module.clone();
            segments.splice(0..1, owned.split("::"));
        }
        (1..=segments.len())
            .rev()
            .map(|n| segments[..n].join("::"))
            .find(|m| modules.contains_key(m))
    };
    let mut out = BTreeMap::new();
    for (module, source) in modules {
        let source = code(source);
        let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
        let mut paths = Vec::new();
        // `use crate::...;` and `use super::...;` trees (possibly over several lines).
        for (at, _) in source.match_indices("use ") {
            let rest = &source[at + 4..];
            let Some(end) = rest.find(';') else { continue };
            let tree = rest[..end].split_whitespace().collect::<Vec<_>>().join(" ");
            for path in expand(&tree) {
                if let Some(p) = path.strip_prefix("crate::") {
                    paths.push(p.to_string());
                } else if let Some(p) = path.strip_prefix("super::") {
                    paths.push(format!("{parent}::{p}"));
                }
            }
        }
        // Inline paths: `crate::a::b::item`, `super::a::item`.
        for (prefix, base) in [("crate::", ""), ("super::", parent)] {
            for (at, _) in source.match_indices(prefix) {
                let before = source[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                let rest = &source[at + prefix.len()..];
                let len = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .unwrap_or(rest.len());
                paths.push(format!("{base}::{}", &rest[..len]));
            }
        }
        let targets: BTreeSet<String> = paths
            .iter()
            .filter_map(|p| resolve(p))
            .filter(|t| t != module && !module.starts_with(&format!("{t}::")) && !t.is_empty())
            .filter(|t| !t.starts_with(&format!("{module}::")) || module.is_empty())
            .collect();
        out.insert(module.clone(), targets);
    }
    out
}

/// A cycle through `graph`, if it has one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let from = stack.iter().position(|n| n == next).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, state, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node) {
            if let Some(cycle) = visit(node, graph, &mut state, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

/// The graph of the top folders and files of `src/` ("cache", "plan"): `a` imports `b` when a
/// module under `a` imports one under `b`.
fn top_level(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| m.split("::").next().unwrap().to_string();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, targets) in graph.iter().filter(|(m, _)| !m.is_empty()) {
        let entry = out.entry(top(from)).or_default();
        entry.extend(targets.iter().map(|t| top(t)).filter(|t| *t != top(from)));
    }
    out
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = edges(&modules());
    assert!(
        graph.len() > 40 && graph["launch::attend"].contains("plan"),
        "the parser lost the graph: {graph:#?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("module cycle: {}", cycle.join(" -> "));
    }
    let folders = top_level(&graph);
    if let Some(cycle) = find_cycle(&folders) {
        panic!("cycle between top folders: {}", cycle.join(" -> "));
    }
}

#[test]
fn foundations_import_nothing_above_them() {
    // Bottom first: each may import only those before it.
    let foundations = ["dtype", "error", "shape", "variants", "fp8"];
    let folders = top_level(&edges(&modules()));
    for (i, module) in foundations.iter().enumerate() {
        let allowed: BTreeSet<String> = foundations[..i].iter().map(|s| s.to_string()).collect();
        let above: Vec<&String> = folders[*module].difference(&allowed).collect();
        assert!(
            above.is_empty(),
            "{module} imports {above:?}: a foundation imports only {allowed:?}"
        );
    }
}

#[test]
fn the_parser_sees_a_planted_cycle() {
    let mut modules = BTreeMap::new();
    modules.insert(
        String::new(),
        "pub use a::Thing;\nmod a;\nmod b;".to_string(),
    );
    modules.insert("a".into(), "use crate::b::Other;\npub struct Thing;".into());
    modules.insert(
        "b".into(),
        "// use crate::a::Thing; (a comment)\npub struct Other;\nfn f() { let _ = crate::Thing; }"
            .into(),
    );
    let graph = edges(&modules);
    assert_eq!(graph["a"].iter().collect::<Vec<_>>(), ["b"], "{graph:#?}");
    assert_eq!(graph["b"].iter().collect::<Vec<_>>(), ["a"], "{graph:#?}");
    assert!(find_cycle(&graph).is_some());
    modules.insert("b".into(), "pub struct Other;".into());
    assert!(find_cycle(&edges(&modules)).is_none());
}
