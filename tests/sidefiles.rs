//! Side files (θ1's config, tokenizer, …) and what the output tells the ecosystem: side files
//! are checked when the inputs are validated and copied from what was checked; special files
//! are refused by name; nothing is skipped silently; output names never collide; the model
//! card names Hub ids only and keeps θ1's card metadata; `--dtype` updates config.json.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use crate::common::*;

/// θ0 and θ1 in `s` (`sft`, `dpo`), θ1 with the usual side files.
fn pair(s: &Scratch) -> (PathBuf, PathBuf) {
    let (t0s, t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 11);
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    side_files(&dpo, "dpo");
    (sft, dpo)
}

// ---------------------------------------------------------------------------------------
// Runs paused at a failpoint (common::Paused)
// ---------------------------------------------------------------------------------------

fn args(sft: &Path, dpo: &Path, out: &Path) -> Vec<OsString> {
    [
        "extrapolate".into(),
        "--sft".into(),
        sft.as_os_str().to_owned(),
        "--aligned".into(),
        dpo.as_os_str().to_owned(),
        "--alpha".into(),
        "0.3".into(),
        "--output".into(),
        out.as_os_str().to_owned(),
    ]
    .to_vec()
}

/// Runs expo paused just before the side files are copied, lets `act` change θ1's
/// directory, and returns the exit code and stderr.
fn race(act: impl FnOnce(&Path)) -> (i32, String, Scratch) {
    let s = Scratch::new();
    let (sft, dpo) = pair(&s);
    let out = s.out("expo");
    let paused = Paused::start(&args(&sft, &dpo, &out), "side-files-copy", &s.path("fp"));
    act(&dpo);
    let (code, err) = paused.finish();
    (code, err, s)
}

#[test]
fn a_side_file_renamed_over_during_the_run_is_an_error() {
    let (code, err, s) = race(|dpo| {
        // A download tool writes the new version aside and renames it over the old one.
        let tmp = dpo.join("config.json.incomplete");
        fs::write(&tmp, "{\"architectures\": [\"Other\"]}\n").unwrap();
        fs::rename(&tmp, dpo.join("config.json")).unwrap();
    });
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("config.json was replaced by another file after expo checked it"),
        "{err}"
    );
    s.assert_no_output();
}

#[test]
fn a_side_file_rewritten_in_place_during_the_run_is_an_error() {
    let (code, err, s) = race(|dpo| {
        fs::write(
            dpo.join("tokenizer.json"),
            "{\"version\": \"2.0\", \"longer\": true}\n",
        )
        .unwrap();
    });
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tokenizer.json changed size"), "{err}");
    s.assert_no_output();
}

#[test]
fn a_side_file_removed_during_the_run_is_an_error() {
    let (code, err, s) = race(|dpo| fs::remove_file(dpo.join("generation_config.json")).unwrap());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("generation_config.json was removed"), "{err}");
    s.assert_no_output();
}

#[test]
fn a_side_file_swapped_for_a_fifo_during_the_run_does_not_hang() {
    let (code, err, s) = race(|dpo| {
        let fifo = dpo.join("fifo.tmp");
        mkfifo(&fifo);
        fs::rename(&fifo, dpo.join("config.json")).unwrap();
    });
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("config.json was replaced"), "{err}");
    s.assert_no_output();
}

#[test]
fn sigterm_while_side_files_are_copied_stops_the_run() {
    let s = Scratch::new();
    let (sft, dpo) = pair(&s);
    let out = s.out("expo");
    let paused = Paused::start(&args(&sft, &dpo, &out), "side-files-copy", &s.path("fp"));
    paused.signal(libc::SIGTERM);
    let (code, err) = paused.wait();
    assert_eq!(code, 130, "{err}");
    s.assert_no_output();
}

// ---------------------------------------------------------------------------------------
// Special files and coverage
// ---------------------------------------------------------------------------------------

#[test]
fn a_fifo_among_the_side_files_is_refused_by_name() {
    let s = Scratch::new();
    let (sft, dpo) = pair(&s);
    mkfifo(&dpo.join("tokenizer.pipe"));
    let out = s.out("expo");
    let run = extrapolate(&sft, &dpo, "0.3", &out).assert_fails(
        1,
        &["tokenizer.pipe is a FIFO (named pipe), not a regular file"],
    );
    assert_eq!(
        run.stderr.matches("tokenizer.pipe").count(),
        1,
        "{}",
        run.stderr
    );
    s.assert_no_output();
    // Also in a dry run: it is found when the inputs are validated.
    extrapolate(&sft, &dpo, "0.3", &out)
        .arg("--dry-run")
        .assert_fails(1, &["tokenizer.pipe is a FIFO"]);
}

#[test]
fn a_link_to_dev_zero_is_refused_not_copied() {
    let s = Scratch::new();
    let (sft, dpo) = pair(&s);
    std::os::unix::fs::symlink("/dev/zero", dpo.join("vocab.txt")).unwrap();
    let out = s.out("expo");
    extrapolate(&sft, &dpo, "0.3", &out)
        .assert_fails(1, &["vocab.txt is a character device, not a regular file"]);
    s.assert_no_output();
}

#[test]
fn side_file_errors_print_their_cause_once() {
    let s = Scratch::new();
    let (sft, dpo) = pair(&s);
    // A symlink loop cannot be followed: an I/O error with a cause.
    std::os::unix::fs::symlink("loop.json", dpo.join("loop.json")).unwrap();
    let out = s.out("expo");
    let run = extrapolate(&sft, &dpo, "0.3", &out).assert_fails(1, &["loop.json"]);
    let cause = "Too many levels of symbolic links";
    assert_eq!(run.stderr.matches(cause).count(), 1, "{}", run.stderr);
    s.assert_no_output();
}

#[test]
fn symlinked_directories_deep_files_and_dangling_links_are_named() {
    let s = Scratch::new();
    let (sft, dpo) = pair(&s);
    let elsewhere = s.path("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::write(elsewhere.join("extra.txt"), "x").unwrap();
    std::os::unix::fs::symlink(&elsewhere, dpo.join("linked_dir")).unwrap();
    std::os::unix::fs::symlink("nowhere.json", dpo.join("dangling.json")).unwrap();
    let mut deep = dpo.join("deep");
    for _ in 0..16 {
        deep.push("d");
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("far.txt"), "far").unwrap();
    // A symlinked file is followed and copied as a file.
    fs::write(elsewhere.join("chat_template.jinja"), "{{ messages }}").unwrap();
    std::os::unix::fs::symlink(
        elsewhere.join("chat_template.jinja"),
        dpo.join("chat_template.jinja"),
    )
    .unwrap();

    let out = s.out("expo");
    let run = extrapolate(&sft, &dpo, "0.3", &out).assert_ok();
    for needle in [
        "warning: not copying linked_dir from --aligned: it is a symlink to a directory",
        "warning: not copying dangling.json from --aligned: it is a symlink whose target does not exist",
        "warning: not copying deep/d/d/d/d/d/d/d/d/d/d/d/d/d/d/d from --aligned: it is nested deeper than 16 directory levels",
    ] {
        assert!(run.stderr.contains(needle), "{needle}\n{}", run.stderr);
    }
    let copied = out.join("chat_template.jinja");
    assert!(!fs::symlink_metadata(&copied)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(&copied).unwrap(), b"{{ messages }}");
    assert!(!out.join("linked_dir").exists());
}

// ---------------------------------------------------------------------------------------
// Output names
// ---------------------------------------------------------------------------------------

#[test]
fn a_weight_file_named_readme_md_is_refused_before_any_work() {
    let s = Scratch::new();
    let (t0s, t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 12);
    let sft = single(&s.path("sft"), &t0s);
    fs::create_dir_all(s.path("dpo")).unwrap();
    let weights = s.path("dpo").join("README.md");
    write_st(&weights, &t1s, Some(pt_metadata()));
    let out = s.out("expo");
    extrapolate(&sft, &weights, "0.3", &out).assert_fails(
        1,
        &["the model card expo writes and θ1's weight file README.md would both be written to README.md"],
    );
    s.assert_no_output();
    extrapolate(&sft, &weights, "0.3", &out)
        .arg("--dry-run")
        .assert_fails(1, &["README.md"]);
}

#[test]
fn an_index_naming_a_shard_expo_json_is_refused_before_any_work() {
    let s = Scratch::new();
    let (t0s, t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 13);
    let sft = single(&s.path("sft"), &t0s);
    let dpo = s.path("dpo");
    fs::create_dir_all(&dpo).unwrap();
    let groups = split(&t1s, 2);
    let files = vec![
        ("expo.json".to_string(), groups[0].clone()),
        (shard_name(2, 2), groups[1].clone()),
    ];
    for (name, group) in &files {
        write_st(&dpo.join(name), group, Some(pt_metadata()));
    }
    write_index(&dpo, &files);
    let out = s.out("expo");
    extrapolate(&sft, &dpo, "0.3", &out).assert_fails(
        1,
        &["the provenance record expo writes and θ1's weight file expo.json would both be written to expo.json"],
    );
    s.assert_no_output();
}

// ---------------------------------------------------------------------------------------
// The model card and config.json
// ---------------------------------------------------------------------------------------

/// The YAML front matter of a card.
fn front_matter(card: &str) -> &str {
    card.strip_prefix("---\n")
        .and_then(|rest| rest.split_once("\n---\n"))
        .map(|(front, _)| front)
        .unwrap_or_else(|| panic!("no YAML front matter:\n{card}"))
}

#[test]
fn model_card_names_hub_ids_only_and_keeps_theta1_metadata() {
    let s = Scratch::new();
    let (sft, dpo) = pair(&s);
    fs::write(
        dpo.join("README.md"),
        "---\nlicense: other\nlicense_name: custom-license\nlicense_link: LICENSE\n\
         language:\n- en\n- fr\ndatasets:\n- HuggingFaceH4/ultrafeedback_binarized\n\
         pipeline_tag: text-generation\nlibrary_name: transformers\n\
         base_model: org/sft-model\nmodel-index:\n- name: dpo\n  results: []\ntags:\n- dpo\n\
         ---\n\n# The dpo model card\n",
    )
    .unwrap();
    let out = s.out("expo");
    extrapolate(&sft, &dpo, "0.3", &out).assert_ok();
    let card = fs::read_to_string(out.join("README.md")).unwrap();
    assert_eq!(
        front_matter(&card),
        "base_model:\n- \"org/sft-model\"\nlibrary_name: transformers\n\
         pipeline_tag: text-generation\nlicense: other\nlicense_name: custom-license\n\
         license_link: LICENSE\nlanguage:\n- en\n- fr\ndatasets:\n\
         - HuggingFaceH4/ultrafeedback_binarized\ntags:\n- expo\n- model-extrapolation"
    );
    // The local paths are in the card's body and in expo.json.
    let (sft_s, dpo_s) = (sft.display().to_string(), dpo.display().to_string());
    assert!(card.contains(&format!("`{sft_s}`")), "{card}");
    assert!(card.contains(&format!("`{dpo_s}`")), "{card}");
    let prov: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("expo.json")).unwrap()).unwrap();
    assert_eq!(prov["sft"]["given"], sft_s.as_str());
    assert_eq!(prov["aligned"]["given"], dpo_s.as_str());

    // θ1's card naming a local path: no base_model at all, never a path.
    fs::write(
        dpo.join("README.md"),
        "---\nbase_model: /data/sft\nlicense: mit\n---\n",
    )
    .unwrap();
    let out2 = s.out("expo2");
    extrapolate(&sft, &dpo, "0.3", &out2).assert_ok();
    let card = fs::read_to_string(out2.join("README.md")).unwrap();
    assert_eq!(
        front_matter(&card),
        "license: mit\ntags:\n- expo\n- model-extrapolation"
    );
}

const CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "hidden_size": 8,
  "rms_norm_eps": 1e-05,
  "torch_dtype":"bfloat16",
  "text_config": {"torch_dtype": "bfloat16", "rope_scaling": {"dtype": "keep"}},
  "quantization_config": {"dtype": "keep"},
  "transformers_version": "4.46.0"
}
"#;

#[test]
fn dtype_flag_updates_the_dtype_in_config_json_and_nothing_else() {
    let s = Scratch::new();
    let (sft, dpo) = pair(&s);
    fs::write(dpo.join("config.json"), CONFIG).unwrap();
    for (flag, name) in [("f32", "float32"), ("f16", "float16"), ("f64", "float64")] {
        let out = s.out(flag);
        extrapolate(&sft, &dpo, "0.3", &out)
            .args(&["--dtype", flag])
            .assert_ok();
        let want = CONFIG
            .replace(
                "\"torch_dtype\":\"bfloat16\"",
                &format!("\"torch_dtype\":\"{name}\""),
            )
            .replace(
                "{\"torch_dtype\": \"bfloat16\"",
                &format!("{{\"torch_dtype\": \"{name}\""),
            );
        assert_eq!(fs::read_to_string(out.join("config.json")).unwrap(), want);
    }
    // Without --dtype (or with θ1's own dtype) the file is copied byte for byte.
    for (i, extra) in [&[][..], &["--dtype", "auto"][..], &["--dtype", "bf16"][..]]
        .into_iter()
        .enumerate()
    {
        let out = s.out(&format!("same{i}"));
        extrapolate(&sft, &dpo, "0.3", &out).args(extra).assert_ok();
        assert_eq!(fs::read_to_string(out.join("config.json")).unwrap(), CONFIG);
    }
}

/// More side files than expo keeps open (64): the rest are reopened for the copy and must
/// still be the files checked.
fn many_side_files(dpo: &Path) -> Vec<String> {
    fs::create_dir_all(dpo.join("tok")).unwrap();
    (0..80)
        .map(|i| {
            let name = format!("tok/f{i:03}.txt");
            fs::write(dpo.join(&name), format!("file {i}\n")).unwrap();
            name
        })
        .collect()
}

#[test]
fn a_sweep_copies_every_side_file_into_every_output() {
    let s = Scratch::new();
    let (sft, dpo) = pair(&s);
    let names = many_side_files(&dpo);
    let template = s.out("expo-{alpha}");
    extrapolate(&sft, &dpo, "0.1,0.2", &template).assert_ok();
    for a in ["0.1", "0.2"] {
        let out = s.out(&format!("expo-{a}"));
        for name in names
            .iter()
            .map(String::as_str)
            .chain(["config.json", "tokenizer.json"])
        {
            assert_eq!(
                fs::read(out.join(name)).unwrap(),
                fs::read(dpo.join(name)).unwrap(),
                "{a}: {name}"
            );
        }
    }
}

#[test]
fn a_side_file_beyond_the_open_handles_replaced_during_the_run_is_an_error() {
    let s = Scratch::new();
    let (sft, dpo) = pair(&s);
    let names = many_side_files(&dpo);
    let last = names.last().unwrap().clone();
    let out = s.out("expo");
    let paused = Paused::start(&args(&sft, &dpo, &out), "side-files-copy", &s.path("fp"));
    let tmp = dpo.join("tok/new.tmp");
    fs::write(&tmp, "other\n").unwrap();
    fs::rename(&tmp, dpo.join(&last)).unwrap();
    let (code, err) = paused.finish();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("{last} was replaced by another file")),
        "{err}"
    );
    s.assert_no_output();
}
