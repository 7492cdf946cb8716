//! Failures: every mismatch or bad input exits 1 (usage errors 2), says what is wrong, and
//! leaves nothing behind: no output directory and no `.expo-tmp-*` staging directory.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use crate::common::*;

/// θ0 and θ1 of a tiny bf16 model with an int buffer.
fn model() -> (Vec<Tensor>, Vec<Tensor>) {
    let (mut t0s, mut t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 41);
    let ids = Tensor::i64("position_ids", &[4], &[0, 1, 2, 3]);
    t0s.push(ids.clone());
    t1s.push(ids);
    (t0s, t1s)
}

fn replace(tensors: &mut [Tensor], t: Tensor) {
    let slot = tensors.iter_mut().find(|x| x.name == t.name).unwrap();
    *slot = t;
}

/// Runs expo expecting failure `code` with `needles` on stderr, then checks that nothing
/// was written and the inputs are untouched.
fn fails(
    s: &Scratch,
    sft: &Path,
    dpo: &Path,
    alpha: &str,
    extra: &[&str],
    code: i32,
    needles: &[&str],
) -> String {
    let before = (snapshot_path(sft), snapshot_path(dpo));
    let out = extrapolate(sft, dpo, alpha, &s.out("o"))
        .args(extra)
        .assert_fails(code, needles);
    s.assert_no_output();
    assert!(
        before == (snapshot_path(sft), snapshot_path(dpo)),
        "an input changed"
    );
    out.stderr
}

/// Every file under `path` (or the file itself) with its bytes; nothing if it is absent.
fn snapshot_path(path: &Path) -> Vec<(String, Vec<u8>)> {
    if !path.exists() {
        return Vec::new();
    }
    if path.is_file() {
        return vec![(String::new(), fs::read(path).unwrap())];
    }
    snapshot(path)
}

fn dirs(s: &Scratch, t0s: &[Tensor], t1s: &[Tensor]) -> (PathBuf, PathBuf) {
    (single(&s.path("sft"), t0s), single(&s.path("dpo"), t1s))
}

#[test]
fn tensor_only_in_one_side() {
    let (t0s, mut t1s) = model();
    t1s.push(Tensor::float("extra.bias", Dtype::BF16, &[2], &[1.0, 2.0]));
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &[],
        1,
        &["`extra.bias` is in --aligned but not in --sft"],
    );

    let s = Scratch::new();
    let mut t0s = t0s;
    t0s.push(Tensor::float("only.sft", Dtype::BF16, &[1], &[1.0]));
    t1s.retain(|t| t.name != "model.norm.weight");
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    // Every problem is listed, not only the first.
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &[],
        1,
        &[
            "`only.sft` is in --sft but not in --aligned",
            "`model.norm.weight` is in --sft but not in --aligned",
            "`extra.bias` is in --aligned but not in --sft",
        ],
    );
}

#[test]
fn shape_mismatch() {
    let (t0s, mut t1s) = model();
    replace(
        &mut t1s,
        Tensor::float("model.norm.weight", Dtype::BF16, &[2, 4], &[1.0; 8]),
    );
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &[],
        1,
        &["`model.norm.weight`", "[8]", "[2, 4]"],
    );
}

#[test]
fn dtype_mismatch_f32_vs_i64() {
    let (mut t0s, mut t1s) = model();
    t0s.push(Tensor::float("counts", Dtype::F32, &[3], &[1.0, 2.0, 3.0]));
    t1s.push(Tensor::i64("counts", &[3], &[1, 2, 3]));
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    fails(&s, &sft, &dpo, "0.3", &[], 1, &["`counts`", "F32", "I64"]);
}

#[test]
fn differing_integer_tensors_are_refused() {
    let (t0s, mut t1s) = model();
    replace(&mut t1s, Tensor::i64("position_ids", &[4], &[0, 1, 2, 4]));
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &[],
        1,
        &["`position_ids`", "I64", "identical"],
    );
    // A sweep with one α that is not 0 for the tensor fails as a whole, before any work.
    extrapolate(&sft, &dpo, "0,0.3", &s.out("o-{alpha}"))
        .assert_fails(1, &["`position_ids`", "identical"]);
    s.assert_no_output();
}

#[test]
fn differing_integer_tensors_are_taken_from_aligned_when_their_alpha_is_0() {
    // θ1 + α·(θ1 − θ0) is θ1 when α = 0, whatever θ0 holds: like every other tensor with
    // α = 0 (--skip, a rule, or the run's α), the int and bool buffers are θ1's.
    let (mut t0s, mut t1s) = model();
    t0s.push(Tensor::boolean("mask", &[3], &[true, false, true]));
    t1s.push(Tensor::boolean("mask", &[3], &[true, true, true]));
    let ids = Tensor::i64("position_ids", &[4], &[0, 1, 2, 4]);
    replace(&mut t1s, ids.clone());
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let t1 = by_name(&t1s);
    for (k, (alpha, extra)) in [
        ("0", &[][..]),
        ("0.3", &["--skip", "position_ids|mask"][..]),
        ("0.3", &["--alpha-for", "position_ids|mask=0"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let out = s.out(&format!("o-{k}"));
        extrapolate(&sft, &dpo, alpha, &out).args(extra).assert_ok();
        let got = read_checkpoint(&out);
        for name in ["position_ids", "mask"] {
            assert_eq!(got.tensors[name], t1[name], "{name} with {alpha} {extra:?}");
        }
    }
}

#[test]
fn differing_bool_tensors_are_refused() {
    let (mut t0s, mut t1s) = model();
    t0s.push(Tensor::boolean("mask", &[3], &[true, false, true]));
    t1s.push(Tensor::boolean("mask", &[3], &[true, true, true]));
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    fails(&s, &sft, &dpo, "0.3", &[], 1, &["`mask`", "BOOL"]);
}

#[test]
fn missing_shard_named_by_the_index() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    fs::remove_file(dpo.join(shard_name(2, 2))).unwrap();
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &[],
        1,
        &[&shard_name(2, 2), "does not exist"],
    );
}

#[test]
fn index_naming_a_tensor_its_shard_lacks() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let sft = sharded(&s.path("sft"), &split(&t0s, 2));
    let dpo = single(&s.path("dpo"), &t1s);
    let index_path = sft.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"]["ghost.weight"] = shard_name(1, 2).into();
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &[],
        1,
        &["`ghost.weight`", &shard_name(1, 2), "no such tensor"],
    );
}

#[test]
fn tensor_in_a_shard_but_not_in_the_index() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 3));
    let index_path = dpo.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.norm.weight")
        .unwrap();
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &[],
        1,
        &["`model.norm.weight`", "does not list"],
    );
}

#[test]
fn truncated_shard_file() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    let path = dpo.join(shard_name(2, 2));
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &[],
        1,
        &[&shard_name(2, 2), "truncated"],
    );

    // Cut inside the header too.
    fs::write(&path, &bytes[..20]).unwrap();
    fails(&s, &sft, &dpo, "0.3", &[], 1, &[&shard_name(2, 2)]);
}

#[test]
fn pytorch_bin_only_directory_is_refused_clearly() {
    let (t0s, _) = model();
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = s.path("dpo");
    fs::create_dir(&dpo).unwrap();
    fs::write(dpo.join("pytorch_model.bin"), b"PK\x03\x04 not really").unwrap();
    side_files(&dpo, "dpo");
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &[],
        1,
        &["pytorch_model.bin", "safetensors"],
    );
    // A .bin file given directly, too.
    let out = extrapolate(&sft, &dpo.join("pytorch_model.bin"), "0.3", &s.out("o"))
        .assert_fails(1, &["safetensors"]);
    assert!(out.stderr.contains("pytorch_model.bin"), "{}", out.stderr);
    s.assert_no_output();
}

#[test]
fn two_safetensors_files_without_index_are_ambiguous() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = s.path("dpo");
    let halves = split(&t1s, 2);
    write_st(&dpo.join("first.safetensors"), &halves[0], None);
    write_st(&dpo.join("second.safetensors"), &halves[1], None);
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &[],
        1,
        &["first.safetensors", "second.safetensors"],
    );
}

#[test]
fn no_weights_at_all() {
    let (t0s, _) = model();
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = s.path("dpo");
    fs::create_dir(&dpo).unwrap();
    side_files(&dpo, "dpo");
    fails(&s, &sft, &dpo, "0.3", &[], 1, &["no safetensors"]);
    fails(
        &s,
        &sft,
        &s.path("nowhere"),
        "0.3",
        &[],
        1,
        &["nowhere", "does not exist"],
    );
}

fn fp8_model() -> (Vec<Tensor>, Vec<Tensor>) {
    let (mut t0s, mut t1s) = model();
    t0s.push(Tensor::raw(
        "w8",
        Dtype::F8_E4M3,
        &[4],
        vec![0x38, 0x40, 0xb8, 0x00],
    ));
    t1s.push(Tensor::raw(
        "w8",
        Dtype::F8_E4M3,
        &[4],
        vec![0x39, 0x41, 0xb9, 0x80],
    ));
    (t0s, t1s)
}

#[test]
fn fp8_with_nonzero_alpha_is_refused() {
    let (t0s, t1s) = fp8_model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    fails(&s, &sft, &dpo, "0.3", &[], 1, &["`w8`", "F8_E4M3"]);
}

#[test]
fn fp8_with_alpha_zero_is_copied() {
    let (t0s, t1s) = fp8_model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    extrapolate(&sft, &dpo, "0", &s.out("o")).assert_ok();
    let ck = read_checkpoint(&s.out("o"));
    assert_eq!(ck.tensors, by_name(&t1s));
}

#[test]
fn f16_overflow_names_the_tensor_and_the_count() {
    let s = Scratch::new();
    let t0s = vec![
        Tensor::float("fine", Dtype::F16, &[2], &[1.0, 2.0]),
        Tensor::float(
            "hot",
            Dtype::F16,
            &[8],
            &[59000.0, -59000.0, 59500.0, 60000.0, 1.0, 2.0, 3.0, 59900.0],
        ),
    ];
    let t1s = vec![
        Tensor::float("fine", Dtype::F16, &[2], &[1.5, 2.5]),
        Tensor::float(
            "hot",
            Dtype::F16,
            &[8],
            // 60000 + 8·1000 and its negative overflow; 60000 + 8·500 = 64000 does not;
            // 61000 + 8·1000 overflows; 60000 + 8·100 = 60800 does not.
            &[60000.0, -60000.0, 60000.0, 61000.0, 1.0, 2.0, 3.0, 60000.0],
        ),
    ];
    for t in t0s.iter().chain(&t1s) {
        assert!(t.values().iter().all(|v| v.is_finite()));
    }
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    fails(&s, &sft, &dpo, "8", &[], 1, &["`hot`", "3 of 8"]);
    // The same in f32 is fine.
    extrapolate(&sft, &dpo, "8", &s.out("o"))
        .args(&["--dtype", "f32"])
        .assert_ok();
}

#[test]
fn non_empty_output_is_refused_without_force() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let out = s.out("o");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "precious").unwrap();
    extrapolate(&sft, &dpo, "0.3", &out).assert_fails(1, &["already exists", "--force"]);
    assert_eq!(list_dir(&out), ["keep.txt"]);
    assert_eq!(
        fs::read_to_string(out.join("keep.txt")).unwrap(),
        "precious"
    );
    assert_eq!(list_dir(&s.outputs()), ["o"]);

    // A file is never replaced, even with --force.
    let file = s.out("file");
    fs::write(&file, "x").unwrap();
    extrapolate(&sft, &dpo, "0.3", &file)
        .arg("--force")
        .assert_fails(1, &["not a directory"]);
    assert_eq!(fs::read_to_string(&file).unwrap(), "x");
}

#[test]
fn output_inside_an_input_is_refused() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let before = (snapshot_path(&sft), snapshot_path(&dpo));
    extrapolate(&sft, &dpo, "0.3", &dpo.join("expo")).assert_fails(2, &["overlaps", "--aligned"]);
    extrapolate(&sft, &dpo, "0.3", &sft.join("inside")).assert_fails(2, &["overlaps", "--sft"]);
    // Through a symlink to an input directory.
    std::os::unix::fs::symlink(&dpo, s.path("link")).unwrap();
    extrapolate(&sft, &dpo, "0.3", &s.path("link").join("expo"))
        .assert_fails(2, &["overlaps", "--aligned"]);
    extrapolate(&sft, &dpo, "0.3", &sft)
        .arg("--force")
        .assert_fails(2, &["overlaps", "--sft"]);
    // An output that contains an input: --force must not delete the input.
    extrapolate(&sft, &dpo, "0.3", s.root())
        .arg("--force")
        .assert_fails(2, &["overlaps"]);
    assert!(
        before == (snapshot_path(&sft), snapshot_path(&dpo)),
        "an input changed"
    );
    assert_no_staging(s.root());
    assert_no_staging(&sft);
    assert_no_staging(&dpo);
}

#[test]
fn output_parent_must_exist() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    extrapolate(&sft, &dpo, "0.3", &s.path("missing").join("o"))
        .assert_fails(1, &["missing", "does not exist"]);
    assert!(!s.path("missing").exists());
}

#[test]
fn usage_errors_exit_2() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let out = s.out("o");
    let base = |extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "extrapolate".into(),
            "--sft".into(),
            sft.clone().into(),
            "--aligned".into(),
            dpo.clone().into(),
            "--output".into(),
            out.clone().into(),
        ];
        args.extend(extra.iter().map(|a| a.into()));
        expo(&args)
    };
    base(&[]).assert_fails(2, &["--alpha"]);
    base(&["--alpha", "nan"]).assert_fails(2, &["alpha"]);
    base(&["--alpha", "inf"]).assert_fails(2, &["alpha"]);
    base(&["--alpha", "0.3x"]).assert_fails(2, &["0.3x"]);
    base(&["--alpha", "0.3", "--threads", "0"]).assert_fails(2, &["--threads"]);
    base(&["--alpha", "0.3", "--threads", "many"]).assert_fails(2, &["--threads"]);
    base(&["--alpha", "0.3", "--max-shard-size", "5XB"]).assert_fails(2, &["--max-shard-size"]);
    base(&["--alpha", "0.3", "--max-shard-size", "0"]).assert_fails(2, &["--max-shard-size"]);
    base(&["--alpha", "0.3", "--max-shard-size", "GB"]).assert_fails(2, &["--max-shard-size"]);
    base(&["--alpha", "0.3", "--dtype", "f8"]).assert_fails(2, &["--dtype"]);
    base(&["--alpha", "0.3", "--no-such-flag"]).assert_fails(2, &["--no-such-flag"]);
    expo(&["extrapolate", "--alpha", "0.3"]).assert_fails(2, &["--sft"]);
    expo(&["frobnicate"]).assert_fails(2, &["frobnicate"]);
    s.assert_no_output();
}

#[test]
fn help_and_version_exit_0() {
    let out = expo(&["--help"]).assert_ok();
    assert!(out.stdout.contains("extrapolate"), "{}", out.stdout);
    let out = expo(&["extrapolate", "--help"]).assert_ok();
    for flag in [
        "--sft",
        "--aligned",
        "--alpha",
        "--output",
        "--max-shard-size",
        "--dry-run",
        "--json",
        "--threads",
        "--force",
    ] {
        assert!(
            out.stdout.contains(flag),
            "help lacks {flag}:\n{}",
            out.stdout
        );
    }
    let out = expo(&["extrapolate", "-h"]).assert_ok();
    assert!(out.stdout.contains("--alpha"));
    let out = expo(&["--version"]).assert_ok();
    assert_eq!(
        out.stdout.trim(),
        format!("expo {}", env!("CARGO_PKG_VERSION"))
    );
    let out = expo(&["extrapolate", "--version"]).assert_ok();
    assert!(out.stdout.contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn failed_run_with_force_keeps_the_old_output() {
    let (t0s, mut t1s) = model();
    replace(
        &mut t1s,
        Tensor::float("model.norm.weight", Dtype::BF16, &[4], &[1.0; 4]),
    );
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let out = s.out("o");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("model.safetensors"), "the previous result").unwrap();
    extrapolate(&sft, &dpo, "0.3", &out)
        .arg("--force")
        .assert_fails(1, &["`model.norm.weight`"]);
    assert_eq!(list_dir(&out), ["model.safetensors"]);
    assert_eq!(
        fs::read_to_string(out.join("model.safetensors")).unwrap(),
        "the previous result"
    );
    assert_eq!(list_dir(&s.outputs()), ["o"], "no staging directory left");
}

#[test]
fn overflow_with_force_keeps_the_old_output() {
    let s = Scratch::new();
    let t0s = vec![Tensor::float("hot", Dtype::F16, &[2], &[59000.0, 1.0])];
    let t1s = vec![Tensor::float("hot", Dtype::F16, &[2], &[60000.0, 1.0])];
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let out = s.out("o");
    fs::create_dir(&out).unwrap();
    // A checkpoint (--force refuses to replace anything else).
    fs::write(out.join("config.json"), "old").unwrap();
    extrapolate(&sft, &dpo, "8", &out)
        .arg("--force")
        .assert_fails(1, &["`hot`", "1 of 2"]);
    assert_eq!(list_dir(&out), ["config.json"]);
    assert_eq!(list_dir(&s.outputs()), ["o"], "no staging directory left");
}

/// SIGTERM during a run: either the run had already finished (complete output) or it
/// stops with exit 130 and removes its staging directory; never a partial output.
#[test]
fn sigterm_leaves_nothing_or_a_complete_output() {
    let n = 1 << 22;
    let mut rng = Rng::new(5);
    let bits = |rng: &mut Rng| -> Vec<u8> {
        (0..n)
            .flat_map(|_| (0x3f00u16 | (rng.next_u64() & 0xff) as u16).to_le_bytes())
            .collect()
    };
    let t0s = vec![Tensor::raw("big", Dtype::BF16, &[n], bits(&mut rng))];
    let t1s = vec![Tensor::raw("big", Dtype::BF16, &[n], bits(&mut rng))];
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let out = s.out("o");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_expo"))
        .args(["extrapolate", "--alpha", "0.3", "--threads", "1", "--sft"])
        .arg(&sft)
        .arg("--aligned")
        .arg(&dpo)
        .arg("--output")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the staging directory exists (the handler is installed by then).
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(20) {
        let staging = list_dir(&s.outputs())
            .iter()
            .any(|n| n.starts_with(".expo-tmp-"));
        if staging || out.exists() || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("expo exited with {:?} after SIGTERM", output.status.code());
    match output.status.code() {
        Some(0) => {
            let ck = read_checkpoint(&out);
            assert_tensors_eq(&ck.tensors, &reference(&t0s, &t1s, 0.3, None), None);
            assert_eq!(list_dir(&s.outputs()), ["o"]);
        }
        Some(130) => {
            assert!(stderr.contains("interrupted"), "{stderr}");
            s.assert_no_output();
        }
        other => panic!("unexpected exit {other:?}: {stderr}"),
    }
}

#[test]
fn failure_leaves_an_existing_empty_output_directory_alone() {
    let (t0s, mut t1s) = model();
    t1s.retain(|t| t.name != "model.norm.weight");
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let out = s.out("o");
    fs::create_dir(&out).unwrap();
    extrapolate(&sft, &dpo, "0.3", &out).assert_fails(1, &["`model.norm.weight`"]);
    assert!(out.is_dir());
    assert_eq!(list_dir(&out), Vec::<String>::new());
    assert_eq!(list_dir(&s.outputs()), ["o"]);
}

#[test]
fn dry_run_also_validates() {
    let (t0s, mut t1s) = model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    // A non-empty output is reported by --dry-run too.
    let out = s.out("o");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("x"), "x").unwrap();
    extrapolate(&sft, &dpo, "0.3", &out)
        .arg("--dry-run")
        .assert_fails(1, &["--force"]);
    fs::remove_dir_all(&out).unwrap();
    // So is a mismatch, and a differing int buffer (which needs the data, not only headers).
    replace(&mut t1s, Tensor::i64("position_ids", &[4], &[3, 2, 1, 0]));
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &["--dry-run"],
        1,
        &["`position_ids`"],
    );
    fails(
        &s,
        &sft,
        &dpo,
        "0.3",
        &["--dry-run", "--json"],
        1,
        &["`position_ids`"],
    );
}

/// Overflow follows round-to-nearest: just below the midpoint between the largest finite
/// value and 2^(emax+1) rounds to the largest finite value; the midpoint itself rounds to
/// infinity, which is an error since the inputs were finite. Both through the arithmetic
/// path (α ≠ 0) and the pure conversion path (α = 0 with --dtype).
#[test]
fn overflow_threshold_is_round_to_nearest() {
    for (dtype, max_bits, max, half_ulp) in [
        (Dtype::BF16, 0x7f7fu64, bf16_to_f64(0x7f7f), 2f64.powi(119)),
        (Dtype::F16, 0x7bff, 65504.0, 16.0),
    ] {
        let tie = max + half_ulp;
        let below = (tie as f32).next_down() as f64;
        assert!(below < tie && below > max);
        for alpha in ["0.3", "0"] {
            let s = Scratch::new();
            let t0s = vec![Tensor::float("w", Dtype::F32, &[2], &[below, -below])];
            let t1s = t0s.clone();
            let (sft, dpo) = dirs(&s, &t0s, &t1s);
            extrapolate(&sft, &dpo, alpha, &s.out("o"))
                .args(&["--dtype", cli_name(dtype)])
                .assert_ok();
            let got = &read_checkpoint(&s.out("o")).tensors["w"];
            assert_eq!(
                elem_bits(&got.data, dtype),
                [max_bits, max_bits | 0x8000],
                "{dtype} α={alpha}"
            );

            let s = Scratch::new();
            let t0s = vec![Tensor::float("w", Dtype::F32, &[3], &[tie, 1.0, -tie])];
            let t1s = t0s.clone();
            let (sft, dpo) = dirs(&s, &t0s, &t1s);
            fails(
                &s,
                &sft,
                &dpo,
                alpha,
                &["--dtype", cli_name(dtype)],
                1,
                &["`w`", "2 of 3"],
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reporting failures
// ---------------------------------------------------------------------------------------

#[test]
fn with_json_every_command_prints_one_object_on_failure() {
    let (t0s, mut t1s) = model();
    t1s.push(Tensor::float("extra.bias", Dtype::BF16, &[2], &[1.0, 2.0]));
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let missing = s.path("missing");
    let error = |out: Outcome| out.json.unwrap()["error"].as_str().unwrap().to_string();
    // Failures of each command (exit 1): the object says what stderr says.
    let out = expo(&[
        OsStr::new("inspect"),
        missing.as_os_str(),
        OsStr::new("--json"),
    ])
    .assert_fails(1, &[]);
    assert!(out.stderr.contains(&error(out.clone())), "{out:?}");
    assert!(error(out).contains("missing"));
    let out = expo(&[
        OsStr::new("diff"),
        sft.as_os_str(),
        dpo.as_os_str(),
        OsStr::new("--json"),
    ])
    .assert_fails(1, &["`extra.bias`"]);
    assert!(error(out).contains("`extra.bias` is in"));
    let out = extrapolate(&sft, &dpo, "0.3", &s.out("o"))
        .arg("--json")
        .assert_fails(1, &["`extra.bias`"]);
    assert!(error(out).contains("do not match (1 problem)"));
    // Usage errors (exit 2), found by expo or by the argument parser.
    let out = extrapolate(&sft, &dpo, "0.3", &sft.join("o"))
        .arg("--json")
        .assert_fails(2, &["overlaps --sft"]);
    assert!(error(out).contains("overlaps --sft"));
    let out = extrapolate(&sft, &dpo, "zero", &s.out("o"))
        .arg("--json")
        .assert_fails(2, &["zero"]);
    assert!(error(out).contains("`zero` is not a number"));
    s.assert_no_output();
    // A sweep whose outputs fail after the work prints its own object, and only that one.
    let (t0s, t1s) = tiny_llama(Dtype::F16, Dtype::F16, false, 7);
    let (sft, dpo) = (
        single(&s.path("sft16"), &t0s),
        single(&s.path("dpo16"), &t1s),
    );
    let out = extrapolate(&sft, &dpo, "0.1,1e9", &s.out("o-{alpha}"))
        .arg("--json")
        .assert_fails(1, &["1 of 2 outputs failed", "infinite"]);
    let json = out.json.unwrap();
    assert_eq!(json["outputs"][0]["ok"], true);
    assert_eq!(json["outputs"][1]["ok"], false);
    assert!(json["errors"][0].as_str().unwrap().contains("infinite"));
}

#[test]
fn alpha_rules_that_underflow_or_overflow_are_usage_errors() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let err = fails(
        &s,
        &sft,
        &dpo,
        "1e300",
        &["--alpha-for", "norm=x1e10"],
        2,
        &["--alpha-for norm=x1e10 at alpha = 1e300: 1e10 × 1e300 overflows to infinity"],
    );
    // Numbers are printed short, not as 300 digits.
    assert!(err.len() < 300, "{err}");
    let err = fails(
        &s,
        &sft,
        &dpo,
        "1e-200",
        &["--skip", "embed", "--alpha-for", "norm=x1e-200"],
        2,
        &["--alpha-for norm=x1e-200 at alpha = 1e-200: 1e-200 × 1e-200 underflows to 0"],
    );
    assert!(err.len() < 300, "{err}");
    // A factor or a run's α of 0 gives 0 as asked.
    for (alpha, rule) in [("0", "norm=x2"), ("0.3", "norm=x0")] {
        let out = s.out(&format!("ok-{alpha}"));
        extrapolate(&sft, &dpo, alpha, &out)
            .args(&["--alpha-for", rule])
            .assert_ok();
    }
}

#[test]
fn stdout_failing_after_the_commit_says_the_output_is_complete() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let out = s.out("o");
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_expo"))
        .args([
            OsStr::new("extrapolate"),
            OsStr::new("--sft"),
            sft.as_os_str(),
        ])
        .args([
            OsStr::new("--aligned"),
            dpo.as_os_str(),
            OsStr::new("--alpha"),
        ])
        .args([OsStr::new("0.3"), OsStr::new("--output"), out.as_os_str()])
        .arg("--json")
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8(run.stderr).unwrap();
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "printing the --json summary on stdout failed, but the output is complete: {}",
            out.display()
        )),
        "{stderr}"
    );
    let got = read_checkpoint(&out);
    assert_eq!(got.tensors.len(), t1s.len());
}

#[test]
fn several_alphas_need_the_placeholder_in_output() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let out = s.out("o");
    for (alpha, n) in [("0.1,0.2", 2), ("0.1:0.3:0.1", 3), ("0.5,0.5,1", 2)] {
        let stderr = fails(&s, &sft, &dpo, alpha, &[], 2, &[]);
        let want = format!(
            "--alpha gives {n} values, so --output must contain {{alpha}} to name each output, e.g. --output '{}-{{alpha}}'",
            out.display()
        );
        assert!(stderr.contains(&want), "{alpha}: {stderr}");
        assert_eq!(stderr.matches("--alpha gives").count(), 1, "{stderr}");
    }
    // Repeated values are one α: one output, no placeholder needed.
    extrapolate(&sft, &dpo, "0.3,0.3", &out).assert_ok();
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn doubled_signs_in_alpha_are_usage_errors() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    for (alpha, bad) in [
        ("--1:2:1", "`--1` in a range must be a plain decimal number"),
        ("1:--2:1", "`--2` in a range must be a plain decimal number"),
        (
            "0:1:--0.5",
            "`--0.5` in a range must be a plain decimal number",
        ),
        ("+-1:2:1", "`+-1` in a range must be a plain decimal number"),
        ("--1", "`--1` is not a number"),
    ] {
        let joined = format!("--alpha={alpha}");
        for spelling in [vec![joined.as_str()], vec!["--alpha", alpha]] {
            let mut args: Vec<std::ffi::OsString> = vec![
                "extrapolate".into(),
                "--sft".into(),
                sft.clone().into(),
                "--aligned".into(),
                dpo.clone().into(),
                "--output".into(),
                s.out("o").into(),
            ];
            args.extend(spelling.iter().map(|a| a.into()));
            expo(&args).assert_fails(2, &[bad]);
            s.assert_no_output();
        }
    }
}

#[test]
fn exactly_ten_mismatches_are_all_listed_without_a_tail() {
    let (t0s, t1s) = model();
    for (extra, tail) in [(10, None), (11, Some("\n  … and 1 more"))] {
        let mut t1s = t1s.clone();
        for k in 0..extra {
            t1s.push(Tensor::float(
                &format!("extra.{k:02}"),
                Dtype::BF16,
                &[1],
                &[1.0],
            ));
        }
        let s = Scratch::new();
        let (sft, dpo) = dirs(&s, &t0s, &t1s);
        let stderr = fails(
            &s,
            &sft,
            &dpo,
            "0.3",
            &[],
            1,
            &[&format!("the checkpoints do not match ({extra} problems)")],
        );
        let listed = stderr
            .lines()
            .filter(|l| l.contains("is in --aligned but not in --sft"))
            .count();
        assert_eq!(listed, 10, "{stderr}");
        match tail {
            None => assert!(!stderr.contains("more"), "{stderr}"),
            Some(t) => assert!(stderr.trim_end().ends_with(t), "{stderr}"),
        }
    }
}

/// A stat of the output path that fails for another reason than "not found" is an error
/// naming the path and the cause, not a missing output to create.
#[test]
fn output_stat_errors_other_than_not_found_are_reported() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let (sft, dpo) = dirs(&s, &t0s, &t1s);
    let long = s.out(&"x".repeat(300));
    let stderr = extrapolate(&sft, &dpo, "0.3", &long)
        .assert_fails(1, &[&format!("{}: stat failed", long.display())])
        .stderr;
    assert!(stderr.contains("File name too long"), "{stderr}");
    assert_eq!(stderr.matches("File name too long").count(), 1, "{stderr}");
    s.assert_no_output();
}

/// A safetensors file from a raw header text and data section.
fn raw_st(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

/// The texts of the header errors a user meets most: a file shorter than the 8-byte length
/// prefix, exactly the prefix (an empty header, which is not "too short"), metadata that is
/// not strings, and truncated JSON. Each names the file and prints its cause once.
#[test]
fn header_error_texts() {
    let (t0s, t1s) = model();
    let s = Scratch::new();
    let (sft, _) = dirs(&s, &t0s, &t1s);
    let entry = r#""a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#;
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("seven", vec![0; 7], "file is 7 bytes, too short", ""),
        (
            "eight",
            0u64.to_le_bytes().to_vec(),
            "not valid JSON",
            "too short",
        ),
        (
            "meta",
            Vec::new(),
            "`__metadata__` must map strings to strings, found a number for key `format`",
            "",
        ),
        ("json", Vec::new(), "header is not valid JSON", "too short"),
    ];
    for (name, bytes, needle, absent) in cases {
        let file = s.path(name).join("model.safetensors");
        match name {
            "meta" => raw_st(
                &file,
                &format!(r#"{{"__metadata__":{{"format":1}},{entry}}}"#),
                &[0; 4],
            ),
            "json" => raw_st(&file, &format!("{{{entry}"), &[0; 4]),
            _ => {
                fs::create_dir_all(file.parent().unwrap()).unwrap();
                fs::write(&file, bytes).unwrap();
            }
        }
        let file_str = file.display().to_string();
        let stderr = fails(&s, &sft, &s.path(name), "0.3", &[], 1, &[&file_str, needle]);
        if !absent.is_empty() {
            assert!(!stderr.contains(absent), "{name}: {stderr}");
        }
        // The cause is printed once, not once per layer of the error chain.
        assert_eq!(stderr.matches(needle).count(), 1, "{name}: {stderr}");
    }
}
