//! The module boundaries of `mesh-node`, read from its source: no module imports one that
//! imports it back, `hbone` is a transport (it names neither `proxy` nor `redirect`), and
//! `redirect` is named only by the wiring and enrollment.
//!
//! A module's dependencies are the top-level modules its files name through `crate::` or
//! `super::` paths: in `use` items, in expressions and types, and in attribute strings (serde's
//! `default = "crate::..."`). Doc comments do not count.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// Top-level module → the top-level modules it names.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The dependency graph of the crate whose `lib.rs` is in `src`.
fn graph(src: &Path) -> Graph {
    let tops: BTreeSet<String> = std::fs::read_dir(src)
        .expect("src")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let name = name.strip_suffix(".rs").unwrap_or(&name).to_owned();
            (name != "lib" && name != "main").then_some(name)
        })
        .collect();
    let mut graph: Graph = tops.iter().map(|t| (t.clone(), BTreeSet::new())).collect();
    for file in rust_files(src) {
        let module = module_path(src, &file);
        let Some(top) = module.first().cloned() else {
            continue; // lib.rs, main.rs: the crate roots declare the modules.
        };
        let text = std::fs::read_to_string(&file).expect("source file");
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut names = Names {
            module,
            found: BTreeSet::new(),
        };
        names.visit_file(&ast);
        let deps = graph.get_mut(&top).expect("a top-level module");
        deps.extend(
            names
                .found
                .into_iter()
                .filter(|t| *t != top && tops.contains(t)),
        );
    }
    graph
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("directory") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// `src/a/b.rs` and `src/a/b/mod.rs` → `[a, b]`; `src/lib.rs` → `[]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.strip_suffix(".rs").unwrap_or(&last);
    if parts.is_empty() && (stem == "lib" || stem == "main") {
        return Vec::new();
    }
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    parts
}

/// Collects the top-level modules a file names.
struct Names {
    /// The module being read (the file's, then any inline `mod` inside it).
    module: Vec<String>,
    found: BTreeSet<String>,
}

impl Names {
    /// The top-level module a path of `segments` lands in, when it is a path into this crate.
    fn resolve(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else {
            return;
        };
        let target = match first.as_str() {
            "crate" => segments.get(1).cloned(),
            "super" | "self" => {
                let ups = segments.iter().take_while(|s| *s == "super").count();
                let rest = &segments[ups.max(usize::from(first == "self"))..];
                let base = &self.module[..self.module.len().saturating_sub(ups)];
                match base.first() {
                    Some(top) => Some(top.clone()),
                    None => rest.first().cloned(),
                }
            }
            _ => None,
        };
        self.found.extend(target);
    }

    /// Every path a `use` tree spells out, with its `prefix`.
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.leaf(prefix, &n.ident),
            syn::UseTree::Rename(r) => self.leaf(prefix, &r.ident),
            syn::UseTree::Glob(_) => {
                let path = prefix.clone();
                self.resolve(&path);
            }
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }

    /// A string that is a path (`"crate::workload::yes"`).
    fn path_in_string(&mut self, value: &str) {
        if value.starts_with("crate::") || value.starts_with("super::") {
            let segments: Vec<String> = value.split("::").map(str::to_owned).collect();
            self.resolve(&segments);
        }
    }

    fn leaf(&mut self, prefix: &[String], ident: &syn::Ident) {
        let mut path = prefix.to_vec();
        path.push(ident.to_string());
        self.resolve(&path);
    }
}

impl<'ast> Visit<'ast> for Names {
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        if item.content.is_some() {
            self.module.push(item.ident.to_string());
            syn::visit::visit_item_mod(self, item);
            self.module.pop();
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.resolve(&segments);
        syn::visit::visit_path(self, path);
    }

    fn visit_lit_str(&mut self, lit: &'ast syn::LitStr) {
        self.path_in_string(&lit.value());
    }

    /// Attribute arguments stay tokens: their strings are looked at as text.
    fn visit_attribute(&mut self, attr: &'ast syn::Attribute) {
        if let syn::Meta::List(list) = &attr.meta {
            let tokens = list.tokens.to_string();
            for quoted in tokens.split('"').skip(1).step_by(2) {
                self.path_in_string(quoted);
            }
        }
        syn::visit::visit_attribute(self, attr);
    }
}

/// A cycle of `graph` (its modules in order, the first repeated at the end), if there is one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut found = stack[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, done, stack) {
                return Some(found);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

fn mesh_node() -> Graph {
    graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

fn show(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(m, deps)| format!("{m} -> {deps:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = mesh_node();
    // The reading works: these edges are the data path's spine.
    for (from, to) in [("proxy", "hbone"), ("app", "proxy"), ("policy", "workload")] {
        assert!(
            graph[from].contains(to),
            "{from} -> {to} not seen:\n{}",
            show(&graph)
        );
    }
    if let Some(found) = cycle(&graph) {
        panic!("import cycle {}:\n{}", found.join(" -> "), show(&graph));
    }
}

#[test]
fn hbone_is_a_transport() {
    let graph = mesh_node();
    let wrong: Vec<&String> = graph["hbone"]
        .iter()
        .filter(|m| ["proxy", "redirect"].contains(&m.as_str()))
        .collect();
    assert!(wrong.is_empty(), "hbone names {wrong:?}");
}

#[test]
fn only_the_wiring_and_enrollment_name_redirect() {
    let graph = mesh_node();
    let users: Vec<&String> = graph
        .iter()
        .filter(|(_, deps)| deps.contains("redirect"))
        .map(|(m, _)| m)
        .collect();
    // `app` wires the daemon, `cli` removes pins (`mesh-node cleanup`), `inpod` enrolls pods.
    assert_eq!(users, ["app", "cli", "inpod"], "{}", show(&graph));
}

/// A temporary source tree, removed on drop.
struct Tree(PathBuf);

impl Tree {
    fn new(files: &[(&str, &str)]) -> Self {
        let root = std::env::temp_dir().join(format!("mesh-modules-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (path, text) in files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
            std::fs::write(path, text).expect("write");
        }
        Self(root)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_reader_resolves_paths_and_finds_cycles() {
    let tree = Tree::new(&[
        ("lib.rs", "pub mod a; pub mod b; pub mod c; pub mod d;"),
        // A doc comment naming a module is no dependency.
        ("a.rs", "//! See crate::d.\nuse crate::{b::{self, X}};\n"),
        ("b/mod.rs", "mod inner;\n"),
        // `super::super` from b/inner.rs is the crate root.
        ("b/inner.rs", "fn f() { super::super::c::g(); }\n"),
        (
            "c.rs",
            "#[derive(serde::Deserialize)] struct S { #[serde(default = \"crate::a::x\")] x: u8 }\n\
             mod tests { use super::*; }\n",
        ),
        ("d.rs", "fn f() -> self::Local { todo!() }\n"),
    ]);
    let graph = graph(&tree.0);
    let deps = |m: &str| graph[m].iter().cloned().collect::<Vec<_>>();
    assert_eq!(deps("a"), ["b"]);
    assert_eq!(deps("b"), ["c"]);
    assert_eq!(deps("c"), ["a"]);
    assert!(deps("d").is_empty());
    assert_eq!(
        cycle(&graph).expect("a cycle"),
        ["a", "b", "c", "a"],
        "{}",
        show(&graph)
    );
}
