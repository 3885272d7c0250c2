//! `cargo xtask modules`: the module graph of the `forwarder` crate, from its
//! sources, and a check that no module imports one that imports it back.
//!
//! Each file is a module (`a/mod.rs` is `a`, `a/b.rs` is `a::b`). An edge
//! A -> B is any path in A that names B through `crate::`, `super::` or `self::`
//! (in `use` items, types and expressions alike), resolved to the deepest
//! module that exists. Code under `#[cfg(test)]` is left out: tests may
//! reach across. Parsing is syn's, not a regex, so paths inside strings and
//! comments do not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use syn::visit::Visit;

/// Module path (`sessions::nat`) → the modules it names.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module path of `file` under `src`.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("walked under src");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    match last.as_str() {
        "lib.rs" | "main.rs" | "mod.rs" => {}
        other => parts.push(other.trim_end_matches(".rs").to_string()),
    }
    if parts.is_empty() {
        "crate".into()
    } else {
        parts.join("::")
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("cfg")
            && attr
                .parse_args::<syn::Meta>()
                .is_ok_and(|meta| meta.path().is_ident("test"))
    })
}

/// Collects every `crate::`/`super::` path of one file, outside test code.
struct Paths<'a> {
    module: &'a str,
    found: Vec<Vec<String>>,
}

impl Paths<'_> {
    /// `super::x` from `a::b` is `a::x`; `self::x` is `a::b::x`; `crate::x` is `x`.
    fn absolute(&self, segments: &[String]) -> Option<Vec<String>> {
        let mut base: Vec<String> = if self.module == "crate" {
            Vec::new()
        } else {
            self.module.split("::").map(String::from).collect()
        };
        let mut rest = segments;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &rest[1..];
            }
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            Some("self") => rest = &rest[1..],
            _ => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    fn add(&mut self, segments: Vec<String>) {
        if let Some(path) = self.absolute(&segments) {
            self.found.push(path);
        }
    }
}

fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(path) => {
            prefix.push(path.ident.to_string());
            use_paths(&path.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(name) => {
            out.push([prefix.as_slice(), &[name.ident.to_string()]].concat())
        }
        syn::UseTree::Rename(rename) => {
            out.push([prefix.as_slice(), &[rename.ident.to_string()]].concat())
        }
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(group) => group
            .items
            .iter()
            .for_each(|item| use_paths(item, prefix, out)),
    }
}

impl<'ast> Visit<'ast> for Paths<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Impl(i) => &i.attrs,
            _ => &[],
        };
        if is_cfg_test(attrs) {
            return;
        }
        if let syn::Item::Use(item) = item {
            let mut found = Vec::new();
            use_paths(&item.tree, &mut Vec::new(), &mut found);
            found.into_iter().for_each(|path| self.add(path));
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        self.add(path.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        // Paths inside macro calls (format args, tracing fields) are tokens,
        // not syntax: read them as a sequence of `a::b::c` runs.
        let text = mac.tokens.to_string();
        for word in text.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':' || c == ' '))
        {
            let compact: String = word.split_whitespace().collect();
            if ["crate::", "super::", "self::"]
                .iter()
                .any(|prefix| compact.starts_with(prefix))
            {
                self.add(compact.split("::").map(String::from).collect());
            }
        }
        syn::visit::visit_macro(self, mac);
    }
}

/// The graph of the crate whose sources are under `src`.
pub fn graph(src: &Path) -> Result<Graph> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph = Graph::new();
    for file in &files {
        let module = module_of(src, file);
        let text = std::fs::read_to_string(file)?;
        let syntax =
            syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
        let mut paths = Paths {
            module: &module,
            found: Vec::new(),
        };
        paths.visit_file(&syntax);
        let edges = graph.entry(module.clone()).or_default();
        for path in paths.found {
            // The deepest module the path names; the rest is an item in it.
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|m| modules.contains(m));
            if let Some(target) = target
                && target != module
                && !module.starts_with(&format!("{target}::"))
            {
                edges.insert(target);
            }
        }
    }
    Ok(graph)
}

/// A cycle, if there is one, as the modules along it.
pub fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        state: &mut BTreeMap<String, bool>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), false);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next) {
                Some(false) => {
                    let start = stack.iter().position(|m| m == next).expect("on the stack");
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(true) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, state, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_string(), true);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node)
            && let Some(cycle) = visit(node, graph, &mut state, &mut Vec::new())
        {
            return Some(cycle);
        }
    }
    None
}

/// Prints the graph of `forwarder/src` and fails on a cycle.
pub fn run() -> Result<()> {
    let src = forwarder_testbed::workspace_root().join("forwarder/src");
    let graph = graph(&src)?;
    println!("module graph of forwarder (A -> what A uses), tests excluded:");
    for (module, uses) in &graph {
        let uses: Vec<&str> = uses.iter().map(String::as_str).collect();
        println!(
            "  {module} -> {}",
            if uses.is_empty() {
                "(nothing)".into()
            } else {
                uses.join(", ")
            }
        );
    }
    if let Some(cycle) = find_cycle(&graph) {
        bail!("import cycle: {}", cycle.join(" -> "));
    }
    println!("no import cycles");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwarder_crate_has_no_import_cycle() {
        let src = forwarder_testbed::workspace_root().join("forwarder/src");
        let graph = graph(&src).unwrap();
        assert!(graph.len() > 10, "too few modules found: {graph:?}");
        assert!(graph["daemon"].contains("sessions"), "{graph:?}");
        assert_eq!(find_cycle(&graph), None, "{graph:#?}");
    }

    #[test]
    fn cycles_are_found() {
        let mut graph = Graph::new();
        graph.entry("a".into()).or_default().insert("b".into());
        graph.entry("b".into()).or_default().insert("c".into());
        graph.entry("c".into()).or_default().insert("a".into());
        assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
        graph.get_mut("c").unwrap().clear();
        assert_eq!(find_cycle(&graph), None);
    }
}
