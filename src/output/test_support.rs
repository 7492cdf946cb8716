//! Helpers shared by the unit tests of `output`.

use std::fs;
use std::path::{Path, PathBuf};

use super::staging::active;
use super::{OutputTarget, STAGING_MARKER};

pub(super) fn marked(dir: &Path, content: &str) {
    fs::create_dir(dir).unwrap();
    fs::write(dir.join(STAGING_MARKER), content).unwrap();
    fs::write(dir.join("model.safetensors"), b"partial").unwrap();
}

pub(super) fn target(parent: &Path, name: &str, force: bool) -> OutputTarget {
    OutputTarget::check(&parent.join(name), force).unwrap()
}

pub(super) fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    n.sort();
    n
}

/// Entries of the process-wide list of active staging directories under `dir`.
pub(super) fn active_under(dir: &Path) -> Vec<PathBuf> {
    active()
        .iter()
        .filter(|(p, _)| p.starts_with(dir))
        .map(|(p, _)| p.clone())
        .collect()
}
