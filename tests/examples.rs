//! The bundled example pair `examples/tiny-sft` + `examples/tiny-dpo`: it is exactly what
//! `examples/make_tiny.rs` generates, and `expo extrapolate` runs on it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::common;

#[path = "../examples/make_tiny.rs"]
mod make_tiny;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// The regular files of `dir` (not recursive) with their contents, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let entry = entry.unwrap();
        assert!(
            entry.file_type().unwrap().is_file(),
            "{}: unexpected non-file entry",
            entry.path().display()
        );
        let name = entry.file_name().into_string().unwrap();
        out.insert(name, fs::read(entry.path()).unwrap());
    }
    out
}

#[test]
fn committed_examples_match_the_generator() {
    let tmp = tempfile::tempdir().unwrap();
    make_tiny::generate(tmp.path()).unwrap();
    for name in [make_tiny::SFT_DIR, make_tiny::DPO_DIR] {
        let generated = files(&tmp.path().join(name));
        let committed = files(&examples_dir().join(name));
        assert_eq!(
            generated.keys().collect::<Vec<_>>(),
            committed.keys().collect::<Vec<_>>(),
            "examples/{name}: file list differs from the generator's; \
             rerun `cargo run --example make_tiny`"
        );
        for (file, bytes) in &generated {
            assert!(
                bytes == &committed[file],
                "examples/{name}/{file} differs from the generator's output; \
                 rerun `cargo run --example make_tiny`"
            );
        }
    }
}

#[test]
fn generator_is_deterministic() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    make_tiny::generate(a.path()).unwrap();
    make_tiny::generate(b.path()).unwrap();
    for name in [make_tiny::SFT_DIR, make_tiny::DPO_DIR] {
        assert!(files(&a.path().join(name)) == files(&b.path().join(name)));
    }
}

#[test]
fn extrapolate_runs_on_the_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("expo-demo");
    let examples = examples_dir();
    common::extrapolate(
        &examples.join("tiny-sft"),
        &examples.join("tiny-dpo"),
        "0.3",
        &out,
    )
    .arg("--quiet")
    .assert_ok();

    for file in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing from the output");
    }
    // θ1's side files are the ones copied.
    for file in [
        "config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        assert!(
            fs::read(out.join(file)).unwrap()
                == fs::read(examples.join("tiny-dpo").join(file)).unwrap(),
            "{file} is not tiny-dpo's"
        );
    }
}
