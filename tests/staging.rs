//! The output's temporary directories and `--force`: staging names unique across pid
//! namespaces, stale directories recognised by an unlocked marker, and `--force` refusing
//! to replace what is not a model checkpoint.

use std::fs;

use crate::common::{extrapolate, list_dir, small_pair, Scratch};

#[test]
fn force_does_not_replace_a_directory_that_is_not_a_checkpoint() {
    let s = Scratch::new();
    small_pair(&s, 9);
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
    small_pair(&s, 9);
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
    small_pair(&s, 9);
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

#[test]
fn alpha_outputs_that_name_the_same_directory_are_a_usage_error() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let d = s.out("d");
    fs::create_dir_all(d.join("0.1")).unwrap();
    fs::create_dir_all(d.join("0.2")).unwrap();
    // Different strings, one directory: `d/0.1/../out` and `d/0.2/../out`.
    let template = d.join("{alpha}/../out");
    for dry_run in [true, false] {
        let mut run = extrapolate(&s.path("sft"), &s.path("aligned"), "0.1,0.2", &template);
        if dry_run {
            run = run.arg("--dry-run");
        }
        run.assert_fails(
            2,
            &[
                "names the same directory twice",
                &*d.join("0.1/../out").to_string_lossy(),
                &*d.join("0.2/../out").to_string_lossy(),
            ],
        );
        assert_eq!(list_dir(&d), ["0.1", "0.2"]);
    }
    // Through a symlinked parent: `links/0.1` and `links/0.2` both lead to `d/0.1`.
    let links = s.out("links");
    fs::create_dir(&links).unwrap();
    std::os::unix::fs::symlink(d.join("0.1"), links.join("0.1")).unwrap();
    std::os::unix::fs::symlink(d.join("0.1"), links.join("0.2")).unwrap();
    extrapolate(
        &s.path("sft"),
        &s.path("aligned"),
        "0.1,0.2",
        &links.join("{alpha}/m"),
    )
    .assert_fails(2, &["names the same directory twice"]);
    assert_eq!(list_dir(&d.join("0.1")), Vec::<String>::new());
    // Different directories are fine.
    extrapolate(
        &s.path("sft"),
        &s.path("aligned"),
        "0.1,0.2",
        &d.join("{alpha}/out"),
    )
    .assert_ok();
    assert_eq!(list_dir(&d.join("0.1")), ["out"]);
    assert_eq!(list_dir(&d.join("0.2")), ["out"]);
}

#[test]
fn output_forms_that_cannot_be_replaced_are_refused_before_the_run_and_in_dry_run() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let ck = s.out("ck");
    fs::create_dir(&ck).unwrap();
    fs::write(ck.join("config.json"), "{}").unwrap();
    let link = s.out("link");
    std::os::unix::fs::symlink(&ck, &link).unwrap();
    let fresh = s.out("fresh");
    for dry_run in [true, false] {
        for (out, needles) in [
            (s.out("ck/."), vec!["ends in `.`"]),
            (s.out("fresh/."), vec!["ends in `.`"]),
            (s.out("ck/.."), vec!["ends in `..`"]),
            (
                s.out("link/"),
                vec!["is a symbolic link", "give the directory itself"],
            ),
            (link.clone(), vec!["is a symbolic link"]),
        ] {
            let mut run =
                extrapolate(&s.path("sft"), &s.path("aligned"), "0.5", &out).arg("--force");
            if dry_run {
                run = run.arg("--dry-run");
            }
            run.assert_fails(1, &needles);
            assert_eq!(list_dir(&s.outputs()), ["ck", "link"]);
            assert_eq!(list_dir(&ck), ["config.json"]);
            assert!(!fresh.exists());
        }
    }
    // `out/` is `out`.
    extrapolate(&s.path("sft"), &s.path("aligned"), "0.5", &s.out("ck/"))
        .arg("--force")
        .assert_ok();
    assert!(ck.join("model.safetensors").is_file());
    assert_eq!(list_dir(&s.outputs()), ["ck", "link"]);
}

#[test]
fn output_names_up_to_the_file_system_limit_work() {
    let s = Scratch::new();
    small_pair(&s, 9);
    // 255 bytes: the usual limit for one name (ext4, xfs, btrfs, tmpfs).
    let name = "m".repeat(255);
    let out = s.out(&name);
    extrapolate(&s.path("sft"), &s.path("aligned"), "0.5", &out).assert_ok();
    assert!(out.join("model.safetensors").is_file());
    // Replacing it goes through the staging name and the moved-aside old output too.
    extrapolate(&s.path("sft"), &s.path("aligned"), "0.7", &out)
        .arg("--force")
        .assert_ok();
    assert_eq!(list_dir(&s.outputs()), [name]);
}
