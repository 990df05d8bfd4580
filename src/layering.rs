//! The import graph has one direction: transport (the server, the client,
//! their codecs and the drain) imports nothing from the proxy, routes,
//! limits, errors or config. This test reads the sources and fails when a
//! transport file names a module above it.

use std::path::{Path, PathBuf};

/// The transport modules, and what they may name with `crate::`.
const TRANSPORT: &[&str] = &["server", "client", "http1", "drain"];

fn sources(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            sources(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_owned());
    }
}

/// Every `crate::name` in `text`.
fn crate_paths(text: &str) -> Vec<&str> {
    text.match_indices("crate::")
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[test]
fn transport_imports_nothing_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for module in TRANSPORT {
        let dir = src.join(module);
        if dir.is_dir() {
            sources(&dir, &mut files);
        } else {
            files.push(src.join(format!("{module}.rs")));
        }
    }
    assert!(
        files.len() >= 8,
        "the transport sources were found: {files:?}"
    );
    let mut wrong = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for name in crate_paths(&text) {
            if !TRANSPORT.contains(&name) {
                wrong.push(format!("{}: crate::{name}", file.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "transport must not import these:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_an_import() {
    assert_eq!(
        crate_paths("use crate::proxy::Proxy;\nuse crate::http1::{self};"),
        ["proxy", "http1"]
    );
}
