//! The output's temporary directories and `--force`: staging names unique across pid
//! namespaces, stale directories recognised by an unlocked marker, and `--force` refusing
//! to replace what is not a model checkpoint.

mod common;

use std::fs;

use common::{extrapolate, list_dir, Dtype, Scratch};

/// A small pair in `s`: `sft/` and `aligned/`.
fn small_pair(s: &Scratch) {
    let (t0, t1) = common::tiny_llama(Dtype::BF16, Dtype::BF16, false, 9);
    common::single(&s.path("sft"), &t0);
    common::single(&s.path("aligned"), &t1);
    fs::write(s.path("aligned").join("config.json"), "{}\n").unwrap();
}

#[test]
fn force_does_not_replace_a_directory_that_is_not_a_checkpoint() {
    let s = Scratch::new();
    small_pair(&s);
    let project = s.out("project");
    fs::create_dir_all(project.join("src")).unwrap();
    fs::write(project.join("Cargo.toml"), "[package]\n").unwrap();
    fs::write(project.join("src/main.rs"), "fn main() {}\n").unwrap();
    extrapolate(&s.path("sft"), &s.path("aligned"), "0.5", &project)
        .arg("--force")
        .assert_fails(
            1,
            &[
                &*project.to_string_lossy(),
                "does not look like a model checkpoint",
                "even with --force",
                "by hand",
            ],
        );
    assert_eq!(list_dir(&project), ["Cargo.toml", "src"]);
    assert_eq!(list_dir(&s.outputs()), ["project"]);

    // A previous checkpoint is replaced.
    let old = s.out("old");
    fs::create_dir(&old).unwrap();
    fs::write(old.join("config.json"), "{}").unwrap();
    fs::write(old.join("notes.txt"), "x").unwrap();
    extrapolate(&s.path("sft"), &s.path("aligned"), "0.5", &old)
        .arg("--force")
        .assert_ok();
    assert!(old.join("model.safetensors").is_file() && !old.join("notes.txt").exists());
    assert_eq!(list_dir(&s.outputs()), ["old", "project"]);
}

#[test]
fn force_does_not_replace_the_current_directory_or_its_parents() {
    let s = Scratch::new();
    small_pair(&s);
    // A checkpoint-looking directory that is the working directory.
    let work = s.out("work");
    fs::create_dir_all(work.join("inner")).unwrap();
    fs::write(work.join("config.json"), "{}").unwrap();
    for (cwd, out) in [(&work, work.clone()), (&work.join("inner"), work.clone())] {
        extrapolate(&s.path("sft"), &s.path("aligned"), "0.5", &out)
            .arg("--force")
            .current_dir(cwd)
            .assert_fails(1, &["current directory", "even with --force"]);
        assert_eq!(list_dir(&work), ["config.json", "inner"]);
    }
    assert_eq!(list_dir(&s.outputs()), ["work"]);
}

#[test]
fn a_stale_directory_is_recognised_by_its_unlocked_marker_not_its_pid() {
    let s = Scratch::new();
    small_pair(&s);
    let outputs = s.outputs();
    fs::create_dir_all(&outputs).unwrap();
    // Left by a killed run that was pid 1 in its container, whatever pid 1 is here.
    let stale = outputs.join(".expo-tmp-result-1-00000000deadbeef");
    fs::create_dir(&stale).unwrap();
    fs::write(stale.join(".expo-staging"), "expo-staging 1\n").unwrap();
    fs::write(stale.join("model.safetensors"), "partial").unwrap();
    // A previous output moved aside by a killed --force run: reported elsewhere, kept.
    let aside = outputs.join(".expo-tmp-result-1-00000000cafef00d-old");
    fs::create_dir(&aside).unwrap();
    fs::write(aside.join(".expo-staging"), "expo-aside 1\n").unwrap();
    fs::write(aside.join("model.safetensors"), "previous").unwrap();

    let out = s.out("result");
    let done = extrapolate(&s.path("sft"), &s.path("aligned"), "0.5", &out).assert_ok();
    assert!(
        done.stderr.contains(&format!(
            "warning: removed {}, left behind by an expo run that was killed",
            stale.display()
        )),
        "{}",
        done.stderr
    );
    assert!(!stale.exists());
    assert_eq!(
        fs::read(aside.join("model.safetensors")).unwrap(),
        b"previous"
    );
    assert!(out.join("model.safetensors").is_file());
    assert_eq!(
        list_dir(&outputs),
        [".expo-tmp-result-1-00000000cafef00d-old", "result"]
    );
}
