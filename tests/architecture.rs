//! The rules of docs/ARCHITECTURE.md, checked on the source itself (no
//! services needed): each driver is named in one room only, and the
//! top-level modules of `src/` import each other without a circle.
//!
//! A room is a top-level module: `src/store.rs` with everything under
//! `src/store/`. The bench binary (`src/bin/`) is a crate of its own and is
//! not read. Comments and string literals are blanked before reading, so a
//! comment or a log filter that names a crate is not a use of it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file of the library and the relay binary, with its path
/// relative to the crate (`src/store/tls.rs`).
fn library_files() -> Vec<(String, String)> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "bin") && path.parent() == Some(&src()) {
                    continue;
                }
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    walk(&src(), &mut paths);
    paths.sort();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files: Vec<(String, String)> = paths
        .into_iter()
        .map(|path| {
            let text = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let name = path
                .strip_prefix(root)
                .expect("under the crate")
                .to_string_lossy()
                .replace('\\', "/");
            (name, code_only(&text))
        })
        .collect();
    assert!(
        files.len() > 20,
        "only {} files read under src/",
        files.len()
    );
    files
}

/// The room (top-level module) of a file: `src/store.rs` and `src/store/..`
/// are `store`; `src/lib.rs` and `src/main.rs` are the crate root (None).
fn room_of(file: &str) -> Option<String> {
    let rest = file.strip_prefix("src/")?;
    let first = rest.split('/').next()?;
    let room = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(room, "lib" | "main")).then(|| room.to_string())
}

/// The source with comments, strings and character literals blanked (their
/// text replaced by spaces, line breaks kept so line numbers still hold).
fn code_only(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if (c[i] == 'r' || (c[i] == 'b' && next == Some('r')))
            && (i == 0 || !ident(c[i - 1]))
            && {
                let mut j = i + if c[i] == 'b' { 2 } else { 1 };
                while c.get(j) == Some(&'#') {
                    j += 1;
                }
                c.get(j) == Some(&'"')
            }
        {
            // Raw string: r"..", r#".."#, br"..".
            i += if c[i] == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while c[i] == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1;
            while i < c.len() {
                if c[i] == '"' && (0..hashes).all(|k| c.get(i + 1 + k) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
            out.push_str("\"\"");
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                if i < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
            i += 1;
            out.push_str("\"\"");
        } else if c[i] == '\''
            && (next == Some('\\') || (next.is_some() && c.get(i + 2) == Some(&'\'')))
        {
            // A character literal ('a', '\n', '\u{..}'); 'a alone is a lifetime.
            i += 1;
            while i < c.len() && c[i] != '\'' {
                if c[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Where `name` appears as a path's first segment or a whole identifier
/// (`lapin::Error`, `use lapin::{..}`), as `file:line`.
fn places_naming(files: &[(String, String)], name: &str) -> Vec<(String, String)> {
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut found = Vec::new();
    for (file, code) in files {
        for (n, line) in code.lines().enumerate() {
            let hit = line.match_indices(name).any(|(at, _)| {
                let before = line[..at].chars().next_back();
                let after = line[at + name.len()..].chars().next();
                !before.is_some_and(ident) && !after.is_some_and(ident)
            });
            if hit {
                found.push((file.clone(), format!("{file}:{}: {}", n + 1, line.trim())));
            }
        }
    }
    found
}

/// Fails with every place outside `room` that names one of `crates`.
fn only_in_room(crates: &[&str], room: &str) {
    let files = library_files();
    let mut outside = Vec::new();
    let mut inside = 0;
    for name in crates {
        for (file, place) in places_naming(&files, name) {
            if room_of(&file).as_deref() == Some(room) {
                inside += 1;
            } else {
                outside.push(place);
            }
        }
    }
    assert!(
        inside > 0,
        "{crates:?} is named nowhere in src/{room}: is this check still reading the code?"
    );
    assert!(
        outside.is_empty(),
        "{crates:?} may be named only in src/{room}.rs and src/{room}/ (give the callers a type of that room instead); named in:\n  {}",
        outside.join("\n  ")
    );
}

#[test]
fn lapin_is_named_only_in_the_publisher() {
    only_in_room(&["lapin"], "publisher");
}

#[test]
fn tokio_postgres_is_named_only_in_the_store() {
    only_in_room(&["tokio_postgres", "tokio_postgres_rustls"], "store");
}

/// Flags and environment variables are read at the binary's edge only: what
/// the rooms below get is `config`'s plain data.
#[test]
fn the_command_line_is_parsed_only_at_the_edge() {
    only_in_room(&["clap"], "cli");
}

/// The first segment of each path that follows `crate::` in `code`:
/// `crate::config::X` and `use crate::{config::X, store::{self, Y}}` both
/// name `config` (and `store`).
fn crate_paths(code: &str) -> Vec<String> {
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let read_ident = |s: &str| -> String { s.chars().take_while(|&ch| ident(ch)).collect() };
    let mut names = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|ch| ident(ch) || ch == '$') {
            continue;
        }
        let rest = code[at + "crate::".len()..].trim_start();
        let Some(group) = rest.strip_prefix('{') else {
            names.push(read_ident(rest));
            continue;
        };
        // The items of the group at its own depth: each starts a path.
        let mut depth = 0;
        let mut item_start = true;
        for (i, ch) in group.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                ch if item_start && depth == 0 && ident(ch) => {
                    names.push(read_ident(&group[i..]));
                    item_start = false;
                }
                _ => {}
            }
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

/// room -> the rooms it imports, each with a file that does.
fn room_imports() -> BTreeMap<String, BTreeMap<String, String>> {
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (file, code) in library_files() {
        let Some(room) = room_of(&file) else { continue };
        let edges = graph.entry(room.clone()).or_default();
        for target in crate_paths(&code) {
            if target != room {
                edges.entry(target).or_insert_with(|| file.clone());
            }
        }
    }
    graph
}

/// A circle of rooms, as the rooms in order (the first again at the end).
fn find_circle(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Option<Vec<String>> {
    fn visit(
        room: &str,
        graph: &BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|r| r == room) {
            let mut circle = path[at..].to_vec();
            circle.push(room.to_string());
            return Some(circle);
        }
        if done.contains(room) {
            return None;
        }
        path.push(room.to_string());
        for next in graph.get(room).into_iter().flat_map(|e| e.keys()) {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(room.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|room| visit(room, graph, &mut Vec::new(), &mut done))
}

#[test]
fn top_level_modules_import_each_other_without_a_circle() {
    let graph = room_imports();
    // The reading works: the service starts the relay, the relay uses the store.
    for (from, to) in [("service", "relay"), ("relay", "store"), ("cli", "config")] {
        assert!(
            graph.get(from).is_some_and(|e| e.contains_key(to)),
            "no import {from} -> {to} found: is this check still reading the code? {graph:?}"
        );
    }
    if let Some(circle) = find_circle(&graph) {
        let steps: Vec<String> = circle
            .windows(2)
            .map(|w| format!("{} -> {} (in {})", w[0], w[1], graph[&w[0]][&w[1]]))
            .collect();
        panic!(
            "the top-level modules of src/ import each other in a circle: {}\n  {}\nmove what the lower module needs down (or into its room) so that imports run one way",
            circle.join(" -> "),
            steps.join("\n  ")
        );
    }
}

/// `config` is plain data: it uses no other room (so it cannot call a
/// driver's parser), except `redact` to show its URLs without passwords.
#[test]
fn config_is_plain_data_that_imports_no_other_room() {
    let graph = room_imports();
    let imported: Vec<&String> = graph
        .get("config")
        .expect("src/config.rs")
        .keys()
        .filter(|room| *room != "redact")
        .collect();
    assert!(
        imported.is_empty(),
        "config imports {imported:?}: parse and check settings in cli/settings.rs and hand config plain values"
    );
}

/// The rooms of the map in docs/ARCHITECTURE.md, by line (0 = the edge):
/// the backquoted names in the first cell of each row of its table.
fn map_lines() -> BTreeMap<String, usize> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ARCHITECTURE.md");
    let doc = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map = doc
        .split("\n## ")
        .find(|section| section.starts_with("The map"))
        .expect("a section '## The map' in docs/ARCHITECTURE.md");
    let mut lines = BTreeMap::new();
    let rows = map
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('|').nth(1));
    for (n, cell) in rows.enumerate() {
        for room in cell.split('`').skip(1).step_by(2) {
            lines.insert(room.to_string(), n);
        }
    }
    lines
}

#[test]
fn every_room_is_on_the_map_and_imports_run_down_it() {
    let graph = room_imports();
    let map = map_lines();
    let missing: Vec<&String> = graph.keys().filter(|r| !map.contains_key(*r)).collect();
    assert!(
        missing.is_empty(),
        "rooms of src/ missing from the map in docs/ARCHITECTURE.md: {missing:?}"
    );
    let gone: Vec<&String> = map.keys().filter(|r| !graph.contains_key(*r)).collect();
    assert!(
        gone.is_empty(),
        "the map in docs/ARCHITECTURE.md names rooms src/ does not have: {gone:?}"
    );
    let mut upward = Vec::new();
    for (from, edges) in &graph {
        for (to, file) in edges {
            if map[to] < map[from] {
                upward.push(format!("{from} -> {to} (in {file})"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that run up the map of docs/ARCHITECTURE.md (move the room on the map, or the code):\n  {}",
        upward.join("\n  ")
    );
}

#[test]
fn the_reader_sees_code_not_comments_or_strings() {
    let code = code_only(
        "// lapin here\nlet f = \"lapin=off\"; /* crate::x */ let c = '\"'; let r = r#\"crate::y\"#;\nuse crate::{a::B, b::{self, C}, c};\nfn f<'a>(x: &'a str) -> crate::d::E {}",
    );
    assert!(!code.contains("lapin"), "{code}");
    assert_eq!(code.lines().count(), 4, "{code}");
    assert_eq!(crate_paths(&code), ["a", "b", "c", "d"]);
    assert_eq!(
        room_of("src/store/admin/check.rs").as_deref(),
        Some("store")
    );
    assert_eq!(room_of("src/config.rs").as_deref(), Some("config"));
    assert_eq!(room_of("src/lib.rs"), None);
}
