//! The import rules of README's Architecture section, read off the source:
//! - a top-level module imports only modules below it in `LAYERS` (so no cycles between them);
//! - within a folder, its files (other than `mod.rs`, the folder's face) import each other
//!   without a cycle;
//! - `model`, `data`, `train`, `optim`, `engine` never import ratatui or crossterm, and `app`
//!   and `ui` never import candle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top to bottom; a module may import only modules in later entries. Modules sharing an entry
/// may not import each other.
const LAYERS: &[&[&str]] = &[
    &["commands"],
    &["tui"],
    &["ui"],
    &["app"],
    &["research"],
    &["session"],
    &["sinks"],
    &["train"],
    &["config"],
    &["data"],
    &["optim"],
    &["model"],
    &["engine"],
    &["dist"],
    &["events", "series", "atomic_file", "fingerprint", "signals"],
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The source of a file without comments and without its test items (`#[cfg(test)] mod tests
/// { ... }`, cut out by matching braces, so the code after a test module is read too).
fn code_of(text: &str) -> String {
    let uncommented: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut out = String::new();
    let mut rest = uncommented.as_str();
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let item = &rest[i..];
        // the item ends at the brace that closes its first `{`, or at a `;` before any `{`
        let end = match (item.find('{'), item.find(';')) {
            (Some(open), semi) if semi.is_none_or(|s| open < s) => {
                let mut depth = 0usize;
                item[open..]
                    .char_indices()
                    .find(|&(_, c)| {
                        depth = match c {
                            '{' => depth + 1,
                            '}' => depth - 1,
                            _ => depth,
                        };
                        c == '}' && depth == 0
                    })
                    .map_or(item.len(), |(k, _)| open + k + 1)
            }
            (_, Some(semi)) => semi + 1,
            _ => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// Every path that follows `prefix` (`crate::` or `super::`): the identifiers joined by `::`,
/// with the items of a `{...}` group listed each on its own.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = vec![];
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        // not the tail of a longer identifier (`my_crate::`)
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut segs = vec![];
        let mut s = rest;
        loop {
            let ident: String = s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if ident.is_empty() {
                break;
            }
            segs.push(ident.clone());
            s = &s[ident.len()..];
            match s.strip_prefix("::") {
                Some(t) => s = t,
                None => break,
            }
        }
        if let Some(group) = s.strip_prefix('{') {
            let group: String = group.chars().take_while(|c| *c != '}').collect();
            for item in group.split(',') {
                let first: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !first.is_empty() && first != "self" {
                    let mut p = segs.clone();
                    p.push(first);
                    out.push(p);
                }
            }
        }
        if !segs.is_empty() {
            out.push(segs);
        }
    }
    out
}

/// The file (`x.rs`, or `x/mod.rs`) the longest prefix of `segs` names under `dir`.
fn resolve(dir: &Path, segs: &[String]) -> Option<PathBuf> {
    let mut found = None;
    let mut here = dir.to_path_buf();
    for s in segs {
        let file = here.join(format!("{s}.rs"));
        let folder = here.join(s);
        if file.is_file() {
            found = Some(file);
            here = folder;
        } else if folder.join("mod.rs").is_file() {
            found = Some(folder.join("mod.rs"));
            here = folder;
        } else {
            break;
        }
    }
    found
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The folder whose `super::` a file's paths are relative to.
fn parent_module_dir(file: &Path) -> PathBuf {
    let dir = file.parent().unwrap().to_path_buf();
    if file.file_name().is_some_and(|n| n == "mod.rs") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir
    }
}

fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// Every rule broken in the tree at `src`, one line each.
fn violations(src: &Path) -> Vec<String> {
    let mut problems = vec![];
    // file -> files it uses in the same folder (for the cycle check)
    let mut siblings: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for file in rust_files(src) {
        let module = top_module(src, &file);
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = code_of(&text);
        let name = file.strip_prefix(src).unwrap().display().to_string();
        let Some(mine) = rank(&module) else {
            problems.push(format!("{name}: module `{module}` has no place in LAYERS"));
            continue;
        };
        let mut targets = vec![];
        for segs in paths_after(&code, "crate::") {
            let other = segs[0].clone();
            if other != module {
                match rank(&other) {
                    Some(theirs) if theirs > mine => {}
                    Some(_) => problems.push(format!(
                        "{name}: `{module}` imports `crate::{}`, which is not below it",
                        segs.join("::")
                    )),
                    None => problems.push(format!("{name}: imports `crate::{other}`, which has no place in LAYERS")),
                }
            }
            targets.extend(resolve(src, &segs));
        }
        for segs in paths_after(&code, "super::") {
            targets.extend(resolve(&parent_module_dir(&file), &segs));
        }
        let folder = file.parent().unwrap();
        for t in targets {
            if t != file
                && t.parent() == Some(folder)
                && t.file_name().is_some_and(|n| n != "mod.rs")
                && file.file_name().is_some_and(|n| n != "mod.rs")
            {
                siblings.entry(file.clone()).or_default().insert(t);
            }
        }
        let crates_used = |c: &str| code.contains(&format!("{c}::")) || code.contains(&format!("use {c}"));
        if ["model", "data", "train", "optim", "engine"].contains(&module.as_str())
            && (crates_used("ratatui") || crates_used("crossterm"))
        {
            problems.push(format!("{name}: `{module}` uses ratatui or crossterm"));
        }
        if ["app", "ui"].contains(&module.as_str()) && (crates_used("candle_core") || crates_used("candle_nn")) {
            problems.push(format!("{name}: `{module}` uses candle"));
        }
    }
    // a cycle among the files of one folder
    for start in siblings.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((at, path)) = stack.pop() {
            for next in siblings.get(&at).into_iter().flatten() {
                if next == start {
                    let names: Vec<String> =
                        path.iter().chain([next]).map(|p| p.strip_prefix(src).unwrap().display().to_string()).collect();
                    problems.push(format!("cycle between files: {}", names.join(" -> ")));
                } else if !path.contains(next) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

#[test]
fn imports_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = violations(&src);
    assert!(problems.is_empty(), "import rules broken:\n{}", problems.join("\n"));
}

/// The check itself fails on a wrong import and on a cycle between files: a small tree with both.
#[test]
fn the_check_catches_a_wrong_import_and_a_file_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |p: &str, text: &str| {
        let path = src.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "pub mod model;\npub mod ui;\n");
    write("model/mod.rs", "pub mod a;\npub mod b;\npub mod c;\n");
    write("model/a.rs", "use super::b::B;\nuse crate::ui::render; // wrong: model is below ui\n");
    write("model/b.rs", "use crate::model::a::{A, self};\n");
    write("ui/mod.rs", "use crate::model::a::A;\nuse candle_core::Tensor;\n");
    // code after a test module is read too
    write("model/c.rs", "#[cfg(test)]\nmod tests {\n    fn f() { if true { } }\n}\n\nuse crate::ui::late;\n");
    let problems = violations(src);
    assert!(problems.iter().any(|p| p.contains("model/a.rs") && p.contains("crate::ui::render")), "{problems:?}");
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("cycle between files") && p.contains("model/a.rs") && p.contains("model/b.rs")),
        "{problems:?}"
    );
    assert!(problems.iter().any(|p| p.contains("`ui` uses candle")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("model/c.rs") && p.contains("crate::ui::late")), "{problems:?}");
    assert!(!problems.iter().any(|p| p.contains("ui/mod.rs: `ui` imports")), "ui may import model: {problems:?}");
}
