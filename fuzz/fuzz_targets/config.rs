//! `Config::parse` on any UTF-8 text: never a panic, only a config or a
//! list of errors. A config is the operator's, not a peer's, but `sluice
//! check` and a SIGHUP reload parse whatever the file holds, and a reload
//! that panicked would take the running proxy down with it.
//!
//! Relative paths resolve against a directory that does not exist, so no
//! file is read through one. An input that names a device or kernel file
//! by an absolute path is skipped: `api_key_file = "/dev/zero"` would read
//! forever, which says nothing about the parser.

#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;

/// Whether `s` is an absolute path under a directory of special files.
fn special(s: &str) -> bool {
    let path = Path::new(s);
    path.is_absolute()
        && path
            .components()
            .find(|c| matches!(c, Component::Normal(_) | Component::ParentDir))
            .is_some_and(|c| {
                matches!(
                    c.as_os_str().to_str(),
                    Some("dev" | "proc" | "sys" | "run" | "var")
                )
            })
}

/// Whether any string in the document (as TOML reads it, escapes undone)
/// is such a path.
fn names_special(value: &toml::Value) -> bool {
    match value {
        toml::Value::String(s) => special(s),
        toml::Value::Array(items) => items.iter().any(names_special),
        toml::Value::Table(t) => t.values().any(names_special),
        _ => false,
    }
}

fuzz_target!(|text: &str| {
    if let Ok(doc) = text.parse::<toml::Table>() {
        if doc.values().any(names_special) {
            return;
        }
    }
    let dir = Path::new("/nonexistent/sluice-fuzz");
    let _ = sluice::Config::parse(text, "fuzz.toml", dir, &|_| None);
});
