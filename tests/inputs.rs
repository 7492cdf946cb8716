//! Valid checkpoints that real writers produce and expo must read: a `null` `__metadata__`
//! (MLX), the ROCm FP8 dtypes (torch), transformers' variant layout, index entries with a
//! `./` prefix, and a directory holding both `model.safetensors` and an index. Also how
//! input errors are worded: each cause once, naming the file.

use std::fs;
use std::path::Path;

use crate::common::*;

/// A small float model: θ0 and θ1.
fn model(seed: u64) -> (Vec<Tensor>, Vec<Tensor>) {
    tiny_llama(Dtype::BF16, Dtype::BF16, false, seed)
}

/// Writes a safetensors file whose header is `{"__metadata__":null, …}`, as MLX writes
/// when it is given no metadata.
fn write_null_metadata(path: &Path, tensors: &[Tensor]) {
    let mut header = String::from(r#"{"__metadata__":null"#);
    let mut offset = 0;
    for t in tensors {
        header.push_str(&format!(
            r#",{}:{{"dtype":"{}","shape":{:?},"data_offsets":[{offset},{}]}}"#,
            serde_json::to_string(&t.name).unwrap(),
            t.dtype,
            t.shape,
            offset + t.data.len()
        ));
        offset += t.data.len();
    }
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for t in tensors {
        bytes.extend_from_slice(&t.data);
    }
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_null_metadata_is_no_metadata() {
    let (t0s, t1s) = model(61);
    let s = Scratch::new();
    write_null_metadata(&s.path("sft").join("model.safetensors"), &t0s);
    write_null_metadata(&s.path("dpo").join("model.safetensors"), &t1s);
    let out = s.out("o");
    extrapolate(&s.path("sft"), &s.path("dpo"), "0.3", &out).assert_ok();
    let got = read_checkpoint(&out);
    assert_eq!(got.shards[0].metadata, None, "no metadata in, none out");
    assert_tensors_eq(&got.tensors, &reference(&t0s, &t1s, 0.3, None), None);
    expo(&["inspect".as_ref(), s.path("dpo").as_os_str()]).assert_ok();
    expo(&[
        "diff".as_ref(),
        s.path("sft").as_os_str(),
        s.path("dpo").as_os_str(),
    ])
    .assert_ok();
}

/// θ0 and θ1 with bf16 weights plus one tensor of each ROCm FP8 dtype, whose bytes differ.
fn fp8_model() -> (Vec<Tensor>, Vec<Tensor>) {
    let (mut t0s, mut t1s) = model(62);
    for (k, (name, dtype)) in [
        ("model.scale_a", Dtype::F8_E4M3FNUZ),
        ("model.scale_b", Dtype::F8_E5M2FNUZ),
    ]
    .into_iter()
    .enumerate()
    {
        t0s.push(Tensor::raw(name, dtype, &[2, 2], vec![1, 2, 3, k as u8]));
        t1s.push(Tensor::raw(name, dtype, &[2, 2], vec![9, 8, 0x80, k as u8]));
    }
    (t0s, t1s)
}

#[test]
fn rocm_fp8_dtypes_are_read_like_the_other_fp8_types() {
    let (t0s, t1s) = fp8_model();
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);

    let run = expo(&["inspect".as_ref(), dpo.as_os_str()]).assert_ok();
    assert!(run.stdout.contains("F8_E4M3FNUZ"), "{}", run.stdout);
    assert!(run.stdout.contains("F8_E5M2FNUZ"), "{}", run.stdout);
    let run = expo(&["diff".as_ref(), sft.as_os_str(), dpo.as_os_str()]).assert_ok();
    assert!(run.stdout.contains("model.scale_a"), "{}", run.stdout);

    // Copied from θ1 when skipped, or at α = 0.
    let out = s.out("skip");
    extrapolate(&sft, &dpo, "0.3", &out)
        .args(&["--skip", "scale_"])
        .assert_ok();
    let got = read_checkpoint(&out);
    let mut want = reference(&t0s, &t1s, 0.3, None);
    for t in &t1s[t1s.len() - 2..] {
        want.insert(t.name.clone(), t.clone());
    }
    assert_tensors_eq(&got.tensors, &want, None);
    let out = s.out("zero");
    extrapolate(&sft, &dpo, "0", &out).assert_ok();
    assert_eq!(weight_files(&out), weight_files(&dpo));

    // Extrapolating them is refused, naming the tensor.
    extrapolate(&sft, &dpo, "0.3", &s.out("refused"))
        .assert_fails(1, &["model.scale_a", "F8_E4M3FNUZ"]);
}

/// transformers' `save_pretrained(..., variant="fp16")` layout, as two shards.
fn write_variant(dir: &Path, tensors: &[Tensor]) -> Vec<(String, Vec<Tensor>)> {
    let groups = split(tensors, 2);
    let files: Vec<(String, Vec<Tensor>)> = groups
        .iter()
        .enumerate()
        .map(|(k, g)| {
            (
                format!("model.fp16-{:05}-of-00002.safetensors", k + 1),
                g.clone(),
            )
        })
        .collect();
    for (name, ts) in &files {
        write_st(&dir.join(name), ts, Some(pt_metadata()));
    }
    let index = serde_json::to_string_pretty(&index_json(&files)).unwrap();
    fs::write(dir.join("model.safetensors.index.fp16.json"), index).unwrap();
    fs::write(dir.join("config.json"), "{}").unwrap();
    files
}

#[test]
fn transformers_variant_layout_is_read_and_mirrored() {
    let (t0s, t1s) = model(63);
    let s = Scratch::new();
    fs::create_dir_all(s.path("sft")).unwrap();
    fs::create_dir_all(s.path("dpo")).unwrap();
    write_variant(&s.path("sft"), &t0s);
    let files = write_variant(&s.path("dpo"), &t1s);

    let out = s.out("o");
    extrapolate(&s.path("sft"), &s.path("dpo"), "0.3", &out).assert_ok();
    let mut want_files: Vec<String> = files.iter().map(|f| f.0.clone()).collect();
    want_files.extend(
        [
            "README.md",
            "config.json",
            "expo.json",
            "model.safetensors.index.fp16.json",
        ]
        .map(String::from),
    );
    want_files.sort();
    assert_eq!(list_dir(&out), want_files, "names mirrored, index included");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("model.safetensors.index.fp16.json")).unwrap())
            .unwrap();
    assert_eq!(index, index_json(&files));
    let got = read_checkpoint(&out);
    assert_tensors_eq(&got.tensors, &reference(&t0s, &t1s, 0.3, None), None);

    // The variant index given as a file works too.
    let index_arg = s.path("dpo").join("model.safetensors.index.fp16.json");
    let run = expo(&["inspect".as_ref(), index_arg.as_os_str()]).assert_ok();
    assert!(run.stdout.contains("model.fp16-00002-of-00002.safetensors"));
}

#[test]
fn a_json_file_that_is_no_index_is_said_to_be_so() {
    let (t0s, _) = model(64);
    let s = Scratch::new();
    let dir = single(&s.path("sft"), &t0s);
    fs::write(dir.join("config.json"), "{}").unwrap();
    let config = dir.join("config.json");
    expo(&["inspect".as_ref(), config.as_os_str()]).assert_fails(
        1,
        &[
            &format!("{} is not a safetensors index", config.display()),
            "give the checkpoint directory",
        ],
    );
}

#[test]
fn index_entries_with_a_dot_slash_prefix_are_read() {
    let (t0s, t1s) = model(65);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    let index_path = dpo.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    for v in index["weight_map"].as_object_mut().unwrap().values_mut() {
        *v = format!("./{}", v.as_str().unwrap()).into();
    }
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();

    let out = s.out("o");
    extrapolate(&sft, &dpo, "0.3", &out).assert_ok();
    let got = read_checkpoint(&out);
    assert_eq!(
        got.index.as_ref().unwrap()["weight_map"],
        index_json(&[
            (shard_name(1, 2), split(&t1s, 2)[0].clone()),
            (shard_name(2, 2), split(&t1s, 2)[1].clone()),
        ])["weight_map"],
        "the output names the shards without the prefix"
    );
    assert_tensors_eq(&got.tensors, &reference(&t0s, &t1s, 0.3, None), None);

    // Still confined to the checkpoint directory.
    let first = index["weight_map"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    index["weight_map"][&first] = "./../sft/model.safetensors".into();
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    extrapolate(&sft, &dpo, "0.3", &s.out("escape")).assert_fails(
        1,
        &[
            "./../sft/model.safetensors",
            "not a plain relative file name",
        ],
    );
}

#[test]
fn model_safetensors_is_read_before_an_index_as_transformers_does() {
    let (t0s, t1s) = model(66);
    let (_, stale) = model(67);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    // θ1: model.safetensors, plus a stale sharded copy of other weights and its index.
    let dpo = sharded(&s.path("dpo"), &split(&stale, 2));
    write_st(&dpo.join("model.safetensors"), &t1s, Some(pt_metadata()));

    let out = s.out("o");
    let run = extrapolate(&sft, &dpo, "0.3", &out).assert_ok();
    assert!(
        run.stderr.contains(&format!(
            "warning: {} holds both model.safetensors and model.safetensors.index.json; reading model.safetensors, as transformers does",
            dpo.display()
        )),
        "{}",
        run.stderr
    );
    assert_eq!(
        run.stderr.matches("holds both").count(),
        1,
        "{}",
        run.stderr
    );
    let got = read_checkpoint(&out);
    assert_eq!(
        list_dir(&out),
        ["README.md", "expo.json", "model.safetensors"]
    );
    assert_tensors_eq(&got.tensors, &reference(&t0s, &t1s, 0.3, None), None);
}

#[test]
fn diff_and_inspect_warn_when_model_safetensors_shadows_an_index() {
    let (t0s, t1s) = model(69);
    let (_, stale) = model(70);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded(&s.path("dpo"), &split(&stale, 2));
    write_st(&dpo.join("model.safetensors"), &t1s, Some(pt_metadata()));
    let warning = format!(
        "warning: {} holds both model.safetensors and model.safetensors.index.json",
        dpo.display()
    );
    let inspect = expo(&["inspect".as_ref(), dpo.as_os_str()]).assert_ok();
    assert_eq!(
        inspect.stderr.matches(&warning).count(),
        1,
        "{}",
        inspect.stderr
    );
    let diff = expo(&[
        "diff".as_ref(),
        "--sft".as_ref(),
        sft.as_os_str(),
        "--aligned".as_ref(),
        dpo.as_os_str(),
    ])
    .assert_ok();
    assert_eq!(diff.stderr.matches(&warning).count(), 1, "{}", diff.stderr);
}

#[test]
fn a_bad_header_is_reported_once_naming_the_file() {
    let (t0s, t1s) = model(68);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    let file = dpo.join("model.safetensors");
    let mut bytes = fs::read(&file).unwrap();
    bytes[8] = b'[';
    fs::write(&file, bytes).unwrap();
    let run = extrapolate(&sft, &dpo, "0.3", &s.out("o")).assert_fails(
        1,
        &[&file.display().to_string(), "header is not valid JSON"],
    );
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("expo: error:"))
        .unwrap();
    assert_eq!(line.matches("not valid JSON").count(), 1, "{line}");
    assert_eq!(line.matches("at line 1 column").count(), 1, "{line}");
    assert!(line.contains("download or save it again"), "{line}");
}

#[test]
fn an_ignored_variant_index_is_not_copied_as_a_side_file() {
    let (t0s, t1s) = model(69);
    let (_, stale) = model(70);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = s.path("dpo");
    fs::create_dir_all(&dpo).unwrap();
    write_variant(&dpo, &stale);
    write_st(&dpo.join("model.safetensors"), &t1s, Some(pt_metadata()));

    let out = s.out("o");
    let run = extrapolate(&sft, &dpo, "0.3", &out).assert_ok();
    assert!(
        run.stderr
            .contains("holds both model.safetensors and model.safetensors.index.fp16.json"),
        "{}",
        run.stderr
    );
    // Neither the variant index nor its shards: the output is model.safetensors alone.
    assert_eq!(
        list_dir(&out),
        ["README.md", "config.json", "expo.json", "model.safetensors"]
    );
    let got = read_checkpoint(&out);
    assert_tensors_eq(&got.tensors, &reference(&t0s, &t1s, 0.3, None), None);
}
