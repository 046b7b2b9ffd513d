//! The library's folders are layers, lowest first: `config` (values),
//! `api` (the agent API's types), `sys` (the kernel and the host),
//! `target` (one target's lifecycle), `observe`, `agent`, `cmd`. A file
//! may use its own layer and the ones below, never one above; no two files
//! use each other, however indirectly; the CNI plugin uses only `api`.
//! Read from the source text (`crate::…`, `super::…`, `use` groups), so a
//! new upward import fails here before review.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

const LAYERS: &[&str] = &[
    "error", "config", "api", "sys", "target", "observe", "agent", "cmd",
];

/// Module path of a source file: `sys/tc.rs` -> `sys::tc`, `agent/mod.rs` -> `agent`.
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

fn sources(dir: &Path, root: &Path, out: &mut Vec<(PathBuf, String)>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, root, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push((
                p.strip_prefix(root).unwrap().to_path_buf(),
                fs::read_to_string(&p).unwrap(),
            ));
        }
    }
}

/// The text without comments (doc links name modules too) and strings.
fn code_only(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut s = String::new();
        let mut in_str = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' => in_str = !in_str,
                '\\' if in_str => {
                    chars.next();
                }
                '/' if !in_str && chars.peek() == Some(&'/') => break,
                _ if in_str => {}
                _ => s.push(c),
            }
        }
        out.push_str(&s);
        out.push('\n');
    }
    out
}

/// Every path the text names after `prefix::`, expanding `use` groups:
/// `crate::{a::{b, c}, d}` gives `a::b`, `a::c`, `d`.
fn paths_after(text: &str, prefix: &str) -> Vec<String> {
    fn expand(s: &str, base: &str, out: &mut Vec<String>) {
        let s = s.trim();
        if let Some(inner) = s.strip_prefix('{') {
            let inner = &inner[..inner.rfind('}').unwrap_or(inner.len())];
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&inner[start..i], base, out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            expand(&inner[start..], base, out);
            return;
        }
        match s.find("::{") {
            Some(i) => expand(&s[i + 2..], &join(base, &s[..i]), out),
            None if !s.is_empty() => out.push(join(base, s.split(" as ").next().unwrap().trim())),
            None => {}
        }
    }
    fn join(a: &str, b: &str) -> String {
        if a.is_empty() {
            b.to_string()
        } else {
            format!("{a}::{b}")
        }
    }
    let mut out = Vec::new();
    let needle = format!("{prefix}::");
    let mut rest = text;
    while let Some(i) = rest.find(&needle) {
        let before = rest[..i].chars().last();
        rest = &rest[i + needle.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        // A path, then a group or not: `crate::{…}`, `crate::a::{…}`, `crate::a::b`.
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let head = rest[..end].trim_end_matches(':');
        let after = &rest[end..];
        if after.starts_with('{') {
            let mut depth = 0;
            let gend = after
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(after.len(), |(i, _)| i + 1);
            expand(&after[..gend], head, &mut out);
            rest = &after[gend..];
        } else {
            out.push(head.to_string());
            rest = after;
        }
    }
    out
}

struct Tree {
    /// Module path -> file, for the library.
    files: BTreeMap<String, PathBuf>,
    /// Module -> modules it uses (other files only).
    uses: BTreeMap<String, BTreeSet<String>>,
}

fn tree() -> Tree {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    sources(&src, &src, &mut all);
    all.retain(|(rel, _)| !rel.starts_with("bin") && rel != Path::new("main.rs"));
    let files: BTreeMap<String, PathBuf> = all
        .iter()
        .map(|(rel, _)| (module_of(rel), rel.clone()))
        .collect();
    // The crate root's `pub use` names: `crate::Options` is `config::options`'s.
    let lib = code_only(&fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut aliases = BTreeMap::new();
    for p in paths_after(&lib.replace("pub use ", "pub use crate::"), "crate") {
        let name = p.rsplit("::").next().unwrap().to_string();
        aliases.insert(name, p);
    }
    // The longest module a path names.
    let resolve = |path: &str| -> Option<String> {
        let segs: Vec<&str> = path.split("::").collect();
        let path = match aliases.get(segs[0]) {
            Some(full) if !files.contains_key(segs[0]) => std::iter::once(full.as_str())
                .chain(segs[1..].iter().copied())
                .collect::<Vec<_>>()
                .join("::"),
            _ => path.to_string(),
        };
        let segs: Vec<&str> = path.split("::").collect();
        (1..=segs.len())
            .rev()
            .map(|n| segs[..n].join("::"))
            .find(|m| files.contains_key(m))
    };
    let mut uses = BTreeMap::new();
    for (rel, text) in &all {
        let me = module_of(rel);
        if me.is_empty() {
            continue; // lib.rs: declares and re-exports
        }
        // Unit tests (`#[cfg(test)] mod tests`, at the end of a file) are
        // not the file's layer: their `super` is the file itself.
        let text = text.split("#[cfg(test)]\nmod ").next().unwrap_or(text);
        let code = code_only(text);
        // `super::` from `a/b.rs` is `a`; from `a/mod.rs` it is the parent of `a`.
        let parent = {
            let mut p: Vec<&str> = me.split("::").collect();
            p.pop();
            p.join("::")
        };
        let mut named: Vec<String> = paths_after(&code, "crate");
        let is_mod = rel.ends_with("mod.rs");
        for p in paths_after(&code, "super") {
            let base = if is_mod {
                let mut q: Vec<&str> = parent.split("::").collect();
                q.pop();
                q.join("::")
            } else {
                parent.clone()
            };
            named.push(if base.is_empty() {
                p
            } else {
                format!("{base}::{p}")
            });
        }
        for p in paths_after(&code, "self") {
            if is_mod {
                named.push(format!("{me}::{p}"));
            }
        }
        let set: BTreeSet<String> = named
            .iter()
            .filter_map(|p| resolve(p))
            .filter(|m| *m != me && !m.is_empty())
            // A folder's mod.rs is its face: a child naming a sibling
            // through it names the sibling, which `resolve` found already.
            .collect();
        uses.insert(me, set);
    }
    Tree { files, uses }
}

fn layer(module: &str) -> usize {
    let top = module.split("::").next().unwrap();
    LAYERS
        .iter()
        .position(|l| *l == top)
        .unwrap_or_else(|| panic!("module {module} is in no layer: add its folder to LAYERS"))
}

#[test]
fn no_import_runs_up_a_layer() {
    let t = tree();
    let mut up = Vec::new();
    for (from, tos) in &t.uses {
        for to in tos {
            if layer(to) > layer(from) {
                up.push(format!(
                    "{} -> {}",
                    t.files[from].display(),
                    t.files[to].display()
                ));
            }
        }
    }
    assert!(
        up.is_empty(),
        "imports that run up a layer:\n{}",
        up.join("\n")
    );
}

#[test]
fn no_two_files_use_each_other() {
    let t = tree();
    // Tarjan's strongly connected components over the file graph.
    struct S<'a> {
        uses: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        circles: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(s: &mut S<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        for w in s.uses.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let l = s.low[w].min(s.low[v]);
                s.low.insert(v, l);
            } else if s.on.contains(w) {
                let l = s.index[w].min(s.low[v]);
                s.low.insert(v, l);
            }
        }
        if s.low[v] == s.index[v] {
            let mut c = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on.remove(w);
                c.push(w);
                if w == v {
                    break;
                }
            }
            if c.len() > 1 {
                s.circles.push(c);
            }
        }
    }
    let mut s = S {
        uses: &t.uses,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        circles: Vec::new(),
    };
    for v in t.uses.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    let circles: Vec<String> = s.circles.iter().map(|c| c.join(" <-> ")).collect();
    assert!(
        circles.is_empty(),
        "files that use each other:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_cni_plugin_uses_only_the_api() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin/tproxy-cni");
    let mut all = Vec::new();
    sources(&dir, &dir, &mut all);
    assert!(!all.is_empty());
    for (rel, text) in all {
        for p in paths_after(&code_only(&text), "tproxy") {
            assert!(
                p == "api" || p.starts_with("api::"),
                "tproxy-cni {} uses tproxy::{p}: it may use only tproxy::api",
                rel.display()
            );
        }
    }
}

/// The reader itself: a group, an alias and a `super` from a folder's face.
#[test]
fn the_reader_sees_groups_and_aliases() {
    assert_eq!(
        paths_after(
            "use crate::{a::{b, c as d}, e};\nlet x = crate::f::g(1);",
            "crate"
        ),
        ["a::b", "a::c", "e", "f::g"]
    );
    assert_eq!(
        code_only("let s = \"crate::x\"; // crate::y\n").trim(),
        "let s = ;"
    );
    let t = tree();
    assert!(
        t.uses["cmd"].contains("config::options"),
        "{:?}",
        t.uses["cmd"]
    );
}
