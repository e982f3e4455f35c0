//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn configs() -> PathBuf {
    repo().join("models/configs")
}

pub fn tiny(name: &str) -> PathBuf {
    repo().join("tests/fixtures/tiny").join(name)
}

/// insta settings that keep snapshots in the top-level `snapshots/` folder.
pub fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_snapshot_path(repo().join("snapshots"));
    s.set_prepend_module_to_snapshot(false);
    s
}

/// Replaces machine-specific paths in messages.
pub fn scrub(text: &str, dirs: &[&Path]) -> String {
    let mut out = text.replace(&repo().display().to_string(), "[REPO]");
    for d in dirs {
        out = out.replace(&d.display().to_string(), "[TMP]");
    }
    out
}
