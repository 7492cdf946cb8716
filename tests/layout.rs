//! The output's files: sharding, index, header metadata, side files, model card, provenance,
//! determinism, permissions, and what `--json` and `--dry-run` print.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::common::*;

/// A bf16 model with a few f32 tensors (as norms often are) and an int buffer, so that
/// data order within a file is neither alphabetical nor by dtype.
fn model(seed: u64) -> (Vec<Tensor>, Vec<Tensor>) {
    let (mut t0s, mut t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, seed);
    for (t0, t1) in t0s.iter_mut().zip(t1s.iter_mut()) {
        if t0.name.ends_with("norm.weight") {
            *t0 = t0.cast(Dtype::F32);
            *t1 = t1.cast(Dtype::F32);
        }
    }
    let ids = Tensor::i64("model.rotary_emb.ids", &[4], &[0, 1, 2, 3]);
    t0s.insert(3, ids.clone());
    t1s.insert(3, ids);
    (t0s, t1s)
}

/// Reversed, so the hand-written θ1 files hold their tensors in an unusual order.
fn reversed(groups: Vec<Vec<Tensor>>) -> Vec<Vec<Tensor>> {
    groups
        .into_iter()
        .map(|g| g.into_iter().rev().collect())
        .collect()
}

/// The header's JSON text lists `__metadata__` first, then the tensors in data order, and
/// is padded to a multiple of 8 bytes.
fn assert_header_in_data_order(shard: &ShardFile) {
    assert_eq!(
        shard.header_len % 8,
        0,
        "{}: header not 8-byte aligned",
        shard.name
    );
    let text = std::str::from_utf8(&shard.bytes[8..8 + shard.header_len as usize]).unwrap();
    let mut last = if shard.metadata.is_some() {
        text.find("\"__metadata__\":")
            .expect("__metadata__ in the header text")
    } else {
        0
    };
    for name in &shard.order {
        let pos = text
            .find(&format!("\"{name}\":"))
            .unwrap_or_else(|| panic!("`{name}` not in the header text"));
        assert!(
            pos > last,
            "{}: `{name}` is out of data order in the header",
            shard.name
        );
        last = pos;
    }
}

/// The output mirrors θ1: file names, tensor → file, order within each file, metadata, and
/// (for an indexed θ1) the index in HF form with the right total size.
fn assert_mirrors(out: &Checkpoint, aligned: &Checkpoint) {
    assert_eq!(out.shard_names(), aligned.shard_names(), "file names");
    assert_eq!(
        out.layout(),
        aligned.layout(),
        "tensor → file map and order"
    );
    for (o, a) in out.shards.iter().zip(&aligned.shards) {
        assert_eq!(o.metadata, a.metadata, "{}: __metadata__", o.name);
        assert_header_in_data_order(o);
    }
    match &aligned.index {
        Some(a_index) => {
            let o_index = out.index.as_ref().expect("an index like θ1's");
            assert_eq!(*o_index, expected_index(out), "index in HF form");
            assert_eq!(o_index["weight_map"], a_index["weight_map"]);
            let total: usize = out.tensors.values().map(Tensor::nbytes).sum();
            assert_eq!(o_index["metadata"]["total_size"], total);
        }
        None => assert!(
            out.index.is_none(),
            "θ1 has no index, so neither has the output"
        ),
    }
}

#[test]
fn sft_single_file_and_aligned_three_shards_mirror_aligned() {
    let (t0s, t1s) = model(21);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded_ordered(&s.path("dpo"), &reversed(split(&t1s, 3)));
    extrapolate(&sft, &dpo, "0.3", &s.out("o")).assert_ok();
    let out = read_checkpoint(&s.out("o"));
    let aligned = read_checkpoint(&dpo);
    assert_eq!(aligned.shards.len(), 3);
    assert_mirrors(&out, &aligned);
    assert_eq!(
        out.shard_names(),
        [shard_name(1, 3), shard_name(2, 3), shard_name(3, 3)]
    );
    assert_tensors_eq(
        &out.tensors,
        &reference(&t0s, &t1s, 0.3, None),
        Some((&t0s, &t1s, 0.3)),
    );
}

#[test]
fn sft_three_shards_and_aligned_two_shards_mirror_aligned() {
    let (t0s, t1s) = model(22);
    let s = Scratch::new();
    let sft = sharded(&s.path("sft"), &split(&t0s, 3));
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    extrapolate(&sft, &dpo, "2.5", &s.out("o")).assert_ok();
    let out = read_checkpoint(&s.out("o"));
    assert_mirrors(&out, &read_checkpoint(&dpo));
    assert_eq!(out.shard_names(), [shard_name(1, 2), shard_name(2, 2)]);
    assert_tensors_eq(
        &out.tensors,
        &reference(&t0s, &t1s, 2.5, None),
        Some((&t0s, &t1s, 2.5)),
    );
}

#[test]
fn sft_sharded_and_aligned_single_file_give_a_single_file() {
    let (t0s, t1s) = model(23);
    let s = Scratch::new();
    let sft = sharded(&s.path("sft"), &split(&t0s, 3));
    let dpo = s.path("dpo");
    fs::create_dir(&dpo).unwrap();
    write_st_ordered(&dpo.join("model.safetensors"), &t1s, Some(pt_metadata()));
    extrapolate(&sft, &dpo, "0.3", &s.out("o")).assert_ok();
    let out = read_checkpoint(&s.out("o"));
    assert_mirrors(&out, &read_checkpoint(&dpo));
    assert_eq!(
        out.order(),
        t1s.iter().map(|t| t.name.clone()).collect::<Vec<_>>()
    );
    assert_eq!(
        list_dir(&s.out("o")),
        ["README.md", "expo.json", "model.safetensors"]
    );
}

#[test]
fn single_file_arguments_keep_the_file_name() {
    let (t0s, t1s) = model(24);
    let s = Scratch::new();
    let sft = s.path("a.safetensors");
    let dpo = s.path("b").join("weights.safetensors");
    write_st(&sft, &t0s, None);
    write_st(&dpo, &t1s, None);
    side_files(&s.path("b"), "dpo");
    let run = extrapolate(&sft, &dpo, "0.3", &s.out("o")).assert_ok();
    assert!(
        run.stderr.contains("warning: "),
        "expected a warning that no side files are copied"
    );
    assert_eq!(
        list_dir(&s.out("o")),
        ["README.md", "expo.json", "weights.safetensors"]
    );
    let out = read_checkpoint(&s.out("o"));
    assert_eq!(out.shards[0].metadata, None);
    assert_tensors_eq(&out.tensors, &reference(&t0s, &t1s, 0.3, None), None);
}

#[test]
fn max_shard_size_reshards_in_aligned_order() {
    let (t0s, t1s) = model(25);
    let s = Scratch::new();
    let sft = sharded(&s.path("sft"), &split(&t0s, 2));
    let dpo = sharded_ordered(&s.path("dpo"), &reversed(split(&t1s, 3)));
    let aligned = read_checkpoint(&dpo);
    extrapolate(&sft, &dpo, "0.3", &s.out("mirrored")).assert_ok();
    let mirrored = read_checkpoint(&s.out("mirrored"));

    let total: usize = t1s.iter().map(Tensor::nbytes).sum();
    let largest = t1s.iter().map(Tensor::nbytes).max().unwrap();
    let sizes = [
        "1".to_string(),
        format!("{largest}"),
        "600B".to_string(),
        "1KB".to_string(),
        "0.0015MB".to_string(),
        format!("{}", total - 1),
        format!("{total}"),
        "1GiB".to_string(),
    ];
    for size in sizes {
        let max = size_bytes(&size);
        let dir = s.out(&format!("max-{size}"));
        extrapolate(&sft, &dpo, "0.3", &dir)
            .args(&["--max-shard-size", &size])
            .assert_ok();
        let out = read_checkpoint(&dir);
        let ctx = format!("--max-shard-size {size}");
        assert_eq!(
            out.tensors, mirrored.tensors,
            "{ctx}: tensors differ from the mirrored run"
        );
        assert_eq!(out.order(), aligned.order(), "{ctx}: not in θ1's order");
        let n = out.shards.len();
        if max >= total {
            assert_eq!(out.shard_names(), ["model.safetensors"], "{ctx}");
            assert!(out.index.is_none(), "{ctx}: one shard needs no index");
        } else {
            assert!(n > 1, "{ctx}");
            let names: Vec<String> = (1..=n).map(|k| shard_name(k, n)).collect();
            assert_eq!(out.shard_names(), names, "{ctx}");
            let index = out.index.as_ref().expect("an index");
            assert_eq!(*index, expected_index(&out), "{ctx}: index");
            assert_eq!(index["metadata"]["total_size"], total, "{ctx}");
        }
        for shard in &out.shards {
            let data: usize = shard.order.iter().map(|t| out.tensors[t].nbytes()).sum();
            assert!(
                data <= max || shard.order.len() == 1,
                "{ctx}: {} holds {data} bytes",
                shard.name
            );
            assert_eq!(
                shard.metadata, aligned.shards[0].metadata,
                "{ctx}: __metadata__"
            );
            assert_header_in_data_order(shard);
        }
        // Nothing but the new files: no stale index or shard names from θ1.
        let mut expected: Vec<String> = out.shard_names();
        if n > 1 {
            expected.push("model.safetensors.index.json".into());
        }
        expected.extend(["README.md".to_string(), "expo.json".to_string()]);
        expected.sort();
        assert_eq!(list_dir(&dir), expected, "{ctx}");
    }
}

/// Sizes as the tests spell them (bytes, B, KB, MB with decimals, GiB).
fn size_bytes(s: &str) -> usize {
    let (num, mult) = if let Some(n) = s.strip_suffix("GiB") {
        (n, 1usize << 30)
    } else if let Some(n) = s.strip_suffix("MB") {
        (n, 1_000_000)
    } else if let Some(n) = s.strip_suffix("KB") {
        (n, 1_000)
    } else if let Some(n) = s.strip_suffix('B') {
        (n, 1)
    } else {
        (s, 1)
    };
    (num.parse::<f64>().unwrap() * mult as f64).round() as usize
}

#[test]
fn header_metadata_of_aligned_is_kept_in_every_shard() {
    let (t0s, t1s) = model(26);
    let s = Scratch::new();
    let sft = sharded(&s.path("sft"), &split(&t0s, 2));
    let dpo = s.path("dpo");
    fs::create_dir(&dpo).unwrap();
    let meta = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("producer".to_string(), "unit \"test\" ☃".to_string()),
    ]);
    let groups = split(&t1s, 3);
    let mut files = Vec::new();
    for (k, g) in groups.iter().enumerate() {
        let name = shard_name(k + 1, 3);
        write_st(&dpo.join(&name), g, Some(meta.clone()));
        files.push((name, g.clone()));
    }
    write_index(&dpo, &files);
    let want: std::collections::BTreeMap<String, String> = meta.into_iter().collect();

    extrapolate(&sft, &dpo, "0.3", &s.out("mirrored")).assert_ok();
    extrapolate(&sft, &dpo, "0.3", &s.out("resharded"))
        .args(&["--max-shard-size", "700"])
        .assert_ok();
    for dir in ["mirrored", "resharded"] {
        let out = read_checkpoint(&s.out(dir));
        assert!(out.shards.len() > 1, "{dir}");
        for shard in &out.shards {
            assert_eq!(shard.metadata.as_ref(), Some(&want), "{dir}/{}", shard.name);
        }
    }
}

#[test]
fn side_files_come_from_aligned_and_readme_is_replaced() {
    let (t0s, t1s) = model(27);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    side_files(&sft, "sft");
    fs::write(sft.join("chat_template.jinja"), "sft template").unwrap();
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    side_files(&dpo, "dpo");
    let extra = [
        (
            "chat_template.jinja",
            "{% for m in messages %}{{ m.content }}{% endfor %}\n",
        ),
        ("modeling_custom.py", "class Custom: pass\n"),
        (
            "tokenizer/special_tokens_map.json",
            "{\"eos_token\": \"</s>\"}\n",
        ),
        ("tokenizer/deeper/vocab.txt", "a\nb\n"),
    ];
    for (name, text) in extra {
        let path = dpo.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    // Not to be copied: other weight formats, hidden entries, a stray safetensors file.
    for name in [
        "pytorch_model.bin",
        "training_args.pt",
        "optimizer.pth",
        ".git/HEAD",
        ".cache/huggingface/x.lock",
        ".hidden.json",
    ] {
        let path = dpo.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, "not for the output").unwrap();
    }
    write_st(&dpo.join("consolidated.safetensors"), &t1s, None);

    let out = s.out("o");
    let run = extrapolate(&sft, &dpo, "0.3", &out).assert_ok();
    assert!(
        run.stderr.contains("warning: ") && run.stderr.contains("consolidated.safetensors"),
        "expected a warning about the stray weights:\n{}",
        run.stderr
    );

    let mut want = vec![
        "README.md".to_string(),
        "config.json".into(),
        "expo.json".into(),
        "generation_config.json".into(),
        "model.safetensors.index.json".into(),
        "tokenizer.json".into(),
        shard_name(1, 2),
        shard_name(2, 2),
    ];
    want.extend(extra.iter().map(|(n, _)| n.to_string()));
    want.sort();
    assert_eq!(list_tree(&out), want);
    for name in ["config.json", "generation_config.json", "tokenizer.json"]
        .into_iter()
        .chain(extra.iter().map(|e| e.0))
    {
        assert_eq!(
            fs::read(out.join(name)).unwrap(),
            fs::read(dpo.join(name)).unwrap(),
            "{name}"
        );
    }

    // The model card: YAML front matter for the Hub, then prose; θ1's card is not copied.
    let card = fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        !card.contains("The dpo model card"),
        "θ1's README.md was copied"
    );
    let front = card
        .strip_prefix("---\n")
        .and_then(|rest| rest.split_once("\n---\n"))
        .map(|(front, _)| front)
        .unwrap_or_else(|| panic!("no YAML front matter:\n{card}"));
    let lines: Vec<&str> = front.lines().collect();
    // Both inputs are local paths, which are not Hub ids: no base_model (the paths are in
    // the card's body and expo.json; tests/sidefiles.rs covers base_model).
    assert!(!front.contains("base_model"), "{front}");
    assert!(
        lines.contains(&"license: apache-2.0"),
        "θ1's license is carried over: {front}"
    );
    let tags = lines.iter().position(|l| *l == "tags:").expect("tags");
    let tag_items: Vec<&str> = lines[tags + 1..]
        .iter()
        .take_while(|l| l.starts_with("- "))
        .copied()
        .collect();
    assert!(tag_items.contains(&"- expo"), "{front}");
    assert!(tag_items.contains(&"- model-extrapolation"), "{front}");

    // The provenance record.
    let prov: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("expo.json")).unwrap()).unwrap();
    assert_eq!(prov["tool"], "expo");
    assert_eq!(prov["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(prov["alpha"], 0.3);
    assert_eq!(prov["tensors"]["total"], t1s.len());
    assert_eq!(prov["tensors"]["extrapolated"], t1s.len() - 1);
    assert_eq!(prov["tensors"]["copied"], 1);
    assert_eq!(
        prov["shards"],
        serde_json::json!([shard_name(1, 2), shard_name(2, 2)])
    );
    let side: Vec<&str> = prov["side_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        side.contains(&"config.json") && side.contains(&"chat_template.jinja"),
        "{side:?}"
    );
}

#[test]
fn weight_files_are_deterministic() {
    let (t0s, t1s) = model(28);
    let s = Scratch::new();
    let sft = sharded(&s.path("sft"), &split(&t0s, 2));
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 3));
    for extra in [&[][..], &["--max-shard-size", "900"][..]] {
        extrapolate(&sft, &dpo, "0.3", &s.out("a"))
            .args(extra)
            .assert_ok();
        extrapolate(&sft, &dpo, "0.3", &s.out("b"))
            .args(extra)
            .assert_ok();
        let (a, b) = (weight_files(&s.out("a")), weight_files(&s.out("b")));
        assert!(a.len() >= 3, "{extra:?}: shards and an index");
        assert_eq!(a, b, "{extra:?}: two runs differ");
        fs::remove_dir_all(s.out("a")).unwrap();
        fs::remove_dir_all(s.out("b")).unwrap();
    }
}

/// The umask the tests (and the expo they spawn) run under.
fn current_umask() -> u32 {
    let out = std::process::Command::new("sh")
        .args(["-c", "umask"])
        .output()
        .unwrap();
    u32::from_str_radix(String::from_utf8(out.stdout).unwrap().trim(), 8).unwrap()
}

#[test]
fn output_files_get_default_permissions() {
    let (t0s, t1s) = model(29);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    side_files(&dpo, "dpo");
    let out = s.out("o");
    extrapolate(&sft, &dpo, "0.3", &out).assert_ok();
    let umask = current_umask();
    let (file_mode, dir_mode) = (0o666 & !umask, 0o777 & !umask);
    if umask == 0o022 {
        assert_eq!(file_mode, 0o644);
    }
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out), dir_mode, "output directory");
    for name in list_tree(&out) {
        assert_eq!(
            mode(&out.join(&name)),
            file_mode,
            "{name}: mode {:o}",
            mode(&out.join(&name))
        );
    }
}

#[test]
fn json_prints_one_object_on_stdout_and_the_summary_on_stderr() {
    let (t0s, t1s) = model(30);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    let run = extrapolate(&sft, &dpo, "0.3", &s.out("o"))
        .arg("--json")
        .assert_ok();
    let json = run.json.unwrap();
    assert_eq!(json["tensors"]["total"], t1s.len());
    assert_eq!(json["tensors"]["extrapolated"], t1s.len() - 1);
    assert_eq!(json["tensors"]["copied"], 1);
    assert_eq!(json["alpha"], 0.3);
    assert_eq!(json["dry_run"], false);
    let files: Vec<&str> = json["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, [shard_name(1, 2), shard_name(2, 2)]);
    assert_eq!(json["index"], "model.safetensors.index.json");
    assert!(run.stderr.contains("expo: wrote"), "{}", run.stderr);

    // --quiet drops the summary: nothing at all on stderr for a clean run.
    // Far-apart test inputs would draw the premise warning, which --quiet keeps.
    let run = extrapolate(&sft, &dpo, "0.3", &s.out("q"))
        .args(&["--json", "--quiet", "--warn-relative-change", "1e9"])
        .assert_ok();
    assert_eq!(run.stderr, "");
    assert_eq!(run.json.unwrap()["tensors"]["total"], t1s.len());

    // Without --json nothing goes to stdout (checked by assert_ok).
    extrapolate(&sft, &dpo, "0.3", &s.out("plain")).assert_ok();
}

#[test]
fn dry_run_writes_nothing_and_prints_the_plan() {
    let (t0s, t1s) = model(31);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 3));
    side_files(&dpo, "dpo");
    let before_inputs = (list_tree(&sft), list_tree(&dpo));
    let run = extrapolate(&sft, &dpo, "0.3", &s.out("o"))
        .arg("--dry-run")
        .assert_ok();
    s.assert_no_output();
    assert_eq!((list_tree(&sft), list_tree(&dpo)), before_inputs);
    for k in 1..=3 {
        assert!(
            run.stdout.contains(&shard_name(k, 3)),
            "plan lacks shard {k}:\n{}",
            run.stdout
        );
    }
    for t in &t1s {
        assert!(
            run.stdout.contains(&t.name),
            "plan lacks `{}`:\n{}",
            t.name,
            run.stdout
        );
    }
    assert!(
        run.stdout.contains("model.safetensors.index.json"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("config.json"), "{}", run.stdout);

    // With --max-shard-size the plan shows the new shards.
    let run = extrapolate(&sft, &dpo, "0.3", &s.out("o"))
        .args(&["-n", "--max-shard-size", "1"])
        .assert_ok();
    s.assert_no_output();
    let n = t1s.len();
    assert!(run.stdout.contains(&shard_name(n, n)), "{}", run.stdout);
}

#[test]
fn dry_run_json_is_parseable() {
    let (t0s, t1s) = model(32);
    let s = Scratch::new();
    let sft = sharded(&s.path("sft"), &split(&t0s, 2));
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    let run = extrapolate(&sft, &dpo, "0.3", &s.out("o"))
        .args(&["--dry-run", "--json"])
        .assert_ok();
    s.assert_no_output();
    let json = run.json.unwrap();
    assert_eq!(json["dry_run"], true);
    assert_eq!(json["tensors"]["total"], t1s.len());
    let shards = json["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    let mut names: Vec<&str> = shards
        .iter()
        .flat_map(|s| s["tensors"].as_array().unwrap())
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<&str> = t1s.iter().map(|t| t.name.as_str()).collect();
    want.sort();
    assert_eq!(names, want);
}

#[test]
fn existing_empty_output_directory_is_used_without_force() {
    let (t0s, t1s) = model(33);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    fs::create_dir(s.out("o")).unwrap();
    extrapolate(&sft, &dpo, "0.3", &s.out("o")).assert_ok();
    assert_eq!(
        list_dir(&s.out("o")),
        ["README.md", "expo.json", "model.safetensors"]
    );
    assert_no_staging(&s.outputs());
}

#[test]
fn force_replaces_a_non_empty_output() {
    let (t0s, t1s) = model(34);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    let out = s.out("o");
    fs::create_dir_all(out.join("old/sub")).unwrap();
    fs::write(out.join("stale.safetensors"), "old").unwrap();
    fs::write(out.join("old/sub/file"), "old").unwrap();
    extrapolate(&sft, &dpo, "0.3", &out)
        .arg("--force")
        .assert_ok();
    assert_eq!(
        list_dir(&out),
        ["README.md", "expo.json", "model.safetensors"]
    );
    assert_eq!(
        list_dir(&s.outputs()),
        ["o"],
        "no leftovers beside the output"
    );
    let ck = read_checkpoint(&out);
    assert_tensors_eq(&ck.tensors, &reference(&t0s, &t1s, 0.3, None), None);
}

#[test]
fn relative_paths_and_a_trailing_slash_work() {
    let (t0s, t1s) = model(35);
    let s = Scratch::new();
    single(&s.path("sft"), &t0s);
    sharded(&s.path("dpo"), &split(&t1s, 2));
    expo(&[
        "extrapolate",
        "--sft",
        "sft",
        "--aligned",
        "./dpo/",
        "--alpha",
        "0.3",
        "--output",
        "outputs/o/",
    ])
    .current_dir(s.root())
    .assert_ok();
    let out = read_checkpoint(&s.out("o"));
    assert_mirrors(&out, &read_checkpoint(&s.path("dpo")));
    assert_no_staging(s.root());
    assert_no_staging(&s.outputs());
}

#[test]
fn an_index_file_can_be_given_instead_of_a_directory() {
    let (t0s, t1s) = model(36);
    let s = Scratch::new();
    let sft = sharded(&s.path("sft"), &split(&t0s, 3));
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    side_files(&dpo, "dpo");
    extrapolate(
        &sft.join("model.safetensors.index.json"),
        &dpo.join("model.safetensors.index.json"),
        "0.3",
        &s.out("o"),
    )
    .assert_ok();
    let out = read_checkpoint(&s.out("o"));
    assert_mirrors(&out, &read_checkpoint(&dpo));
    assert_tensors_eq(&out.tensors, &reference(&t0s, &t1s, 0.3, None), None);
}

#[test]
fn unusual_tensor_names_round_trip() {
    let names = [
        "a \"quoted\" name",
        "back\\slash",
        "ünïcödé.wéight",
        "tab\there",
        "x",
        "__metadata__x",
    ];
    let mut rng = Rng::new(37);
    let mut t0s = Vec::new();
    let mut t1s = Vec::new();
    for name in names {
        let (a, b) = pair_tensors(name, &random_pairs(&mut rng, 3), Dtype::BF16, Dtype::BF16);
        t0s.push(a);
        t1s.push(b);
    }
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    extrapolate(&sft, &dpo, "0.3", &s.out("o")).assert_ok();
    let out = read_checkpoint(&s.out("o"));
    assert_eq!(out.layout(), read_checkpoint(&dpo).layout());
    assert_eq!(*out.index.as_ref().unwrap(), expected_index(&out));
    assert_tensors_eq(&out.tensors, &reference(&t0s, &t1s, 0.3, None), None);
}

#[test]
fn suspicious_inputs_warn_but_succeed() {
    let (t0s, t1s) = model(38);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    let run = extrapolate(&dpo, &dpo, "0.3", &s.out("same")).assert_ok();
    assert!(
        run.stderr.contains("warning: ") && run.stderr.contains("same"),
        "{}",
        run.stderr
    );
    let out = read_checkpoint(&s.out("same"));
    assert_tensors_eq(&out.tensors, &reference(&t1s, &t1s, 0.3, None), None);

    let run = extrapolate(&sft, &dpo, "-1.5", &s.out("swapped")).assert_ok();
    assert!(
        run.stderr.contains("warning: ") && run.stderr.contains("swap"),
        "{}",
        run.stderr
    );
    let out = read_checkpoint(&s.out("swapped"));
    assert_tensors_eq(&out.tensors, &reference(&t0s, &t1s, -1.5, None), None);
}

#[test]
fn index_shards_in_a_subdirectory_are_mirrored() {
    let (t0s, t1s) = model(39);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = s.path("dpo");
    let groups = split(&t1s, 2);
    let files: Vec<(String, Vec<Tensor>)> = groups
        .iter()
        .enumerate()
        .map(|(k, g)| (format!("weights/{}", shard_name(k + 1, 2)), g.clone()))
        .collect();
    for (name, tensors) in &files {
        write_st(&dpo.join(name), tensors, Some(pt_metadata()));
    }
    write_index(&dpo, &files);
    let out = s.out("o");
    extrapolate(&sft, &dpo, "0.3", &out).assert_ok();
    let mut want_files: Vec<String> = files.iter().map(|f| f.0.clone()).collect();
    want_files.extend(["README.md", "expo.json", "model.safetensors.index.json"].map(String::from));
    want_files.sort();
    assert_eq!(list_tree(&out), want_files);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(
        index,
        index_json(&files),
        "index in HF form, same weight map"
    );
    let mut got = std::collections::BTreeMap::new();
    for (name, tensors) in &files {
        let (shard, ts) = read_shard(&out.join(name));
        let want_order: Vec<String> = read_shard(&dpo.join(name)).0.order;
        assert_eq!(shard.order, want_order, "{name}");
        assert_eq!(ts.len(), tensors.len());
        got.extend(by_name(&ts));
    }
    assert_tensors_eq(&got, &reference(&t0s, &t1s, 0.3, None), None);
}
