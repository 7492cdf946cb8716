//! `expo inspect`: every tensor with its dtype, shape, file and bytes, and totals per dtype,
//! checked against what the test wrote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::{self, expo, shard_of, sharded, Dtype, Expo, Outcome, Tensor as T};

fn tensors() -> Vec<T> {
    let t = |name, dtype, shape: &[usize]| T::filled(name, dtype, shape, 7);
    vec![
        t("model.embed_tokens.weight", Dtype::BF16, &[32, 8]),
        t(
            "model.layers.0.self_attn.q_proj.weight",
            Dtype::BF16,
            &[8, 8],
        ),
        t("model.layers.0.input_layernorm.weight", Dtype::F32, &[8]),
        t("model.rotary.positions", Dtype::I64, &[5]),
        t("model.mask", Dtype::BOOL, &[3, 3]),
        t("model.scalar", Dtype::F64, &[]),
        t("lm_head.weight", Dtype::F16, &[32, 8]),
    ]
}

/// Writes the tensors as two shards (the first three, then the rest) and an index;
/// returns the directory and, per tensor, the shard file it went to.
fn write_sharded(dir: &Path, ts: &[T]) -> (PathBuf, BTreeMap<String, String>) {
    let groups = vec![ts[..3].to_vec(), ts[3..].to_vec()];
    (sharded(dir, &groups), shard_of(&groups))
}

/// `expo inspect ARGS…`.
fn inspect(args: &[&std::ffi::OsStr]) -> Expo {
    expo(&["inspect"]).args(args)
}

#[test]
fn json_lists_every_tensor_and_totals_per_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let ts = tensors();
    let (dir, files) = write_sharded(&tmp.path().join("ck"), &ts);
    let v = inspect(&[dir.as_os_str(), "--json".as_ref()])
        .assert_ok()
        .json
        .unwrap();

    assert_eq!(v["index"], "model.safetensors.index.json");
    let listed = v["tensors"].as_array().unwrap();
    assert_eq!(listed.len(), ts.len());
    for t in &ts {
        let j = listed
            .iter()
            .find(|j| j["name"] == t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(j["dtype"], t.dtype.to_string(), "{}", t.name);
        assert_eq!(j["shape"], serde_json::json!(t.shape), "{}", t.name);
        assert_eq!(j["elements"], t.elements(), "{}", t.name);
        assert_eq!(j["bytes"], t.nbytes(), "{}", t.name);
        assert_eq!(j["file"], files[&t.name], "{}", t.name);
    }

    // Totals per dtype and overall.
    let mut want: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for t in &ts {
        let e = want.entry(t.dtype.to_string()).or_default();
        e.0 += 1;
        e.1 += t.elements();
        e.2 += t.nbytes();
    }
    let dtypes = v["dtypes"].as_object().unwrap();
    assert_eq!(dtypes.len(), want.len());
    for (d, (n, elements, bytes)) in &want {
        assert_eq!(dtypes[d]["tensors"], *n, "{d}");
        assert_eq!(dtypes[d]["elements"], *elements, "{d}");
        assert_eq!(dtypes[d]["bytes"], *bytes, "{d}");
    }
    let total_bytes: usize = ts.iter().map(T::nbytes).sum();
    assert_eq!(v["total"]["tensors"], ts.len());
    assert_eq!(v["total"]["bytes"], total_bytes);
    assert_eq!(
        v["total"]["elements"],
        ts.iter().map(T::elements).sum::<usize>()
    );

    // Files: names, tensors and data bytes that add up, and their header metadata.
    let fs = v["files"].as_array().unwrap();
    assert_eq!(fs.len(), 2);
    assert_eq!(fs[0]["name"], "model-00001-of-00002.safetensors");
    assert_eq!(fs[0]["tensors"], 3);
    assert_eq!(fs[0]["metadata"]["format"], "pt");
    let sum: u64 = fs.iter().map(|f| f["bytes"].as_u64().unwrap()).sum();
    assert_eq!(sum, total_bytes as u64);
    for f in fs {
        let on_disk = std::fs::metadata(dir.join(f["name"].as_str().unwrap()))
            .unwrap()
            .len();
        assert_eq!(f["file_bytes"], on_disk);
    }
}

#[test]
fn human_listing() {
    let tmp = tempfile::tempdir().unwrap();
    let ts = tensors();
    let (dir, files) = write_sharded(&tmp.path().join("ck"), &ts);
    let Outcome {
        stdout: out,
        stderr: err,
        ..
    } = inspect(&[dir.as_os_str()]).assert_ok();
    assert!(err.is_empty(), "{err}");
    assert!(
        out.lines()
            .next()
            .unwrap()
            .contains("2 files listed in model.safetensors.index.json, 7 tensors"),
        "{out}"
    );
    for t in &ts {
        let line = out
            .lines()
            .find(|l| l.ends_with(&format!("  {}", t.name)))
            .unwrap_or_else(|| panic!("no line for {}:\n{out}", t.name));
        assert!(line.contains(&t.dtype.to_string()), "{line}");
        assert!(line.contains(&format!("{:?}", t.shape)), "{line}");
        assert!(line.contains(&files[&t.name]), "{line}");
    }
    let total = out
        .lines()
        .find(|l| l.trim_start().starts_with("total"))
        .unwrap();
    let bytes: usize = ts.iter().map(T::nbytes).sum();
    let grouped = bytes
        .to_string()
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(",");
    assert!(total.contains(&format!("({grouped} B)")), "{total}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("BF16")));
}

#[test]
fn single_files_and_index_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let ts = tensors();
    let (dir, _) = write_sharded(&tmp.path().join("ck"), &ts);
    let v = inspect(&[
        dir.join("model-00002-of-00002.safetensors").as_os_str(),
        "--json".as_ref(),
    ])
    .assert_ok()
    .json
    .unwrap();
    assert!(v["index"].is_null());
    assert_eq!(v["tensors"].as_array().unwrap().len(), 4);

    let v = inspect(&[
        dir.join("model.safetensors.index.json").as_os_str(),
        "--json".as_ref(),
    ])
    .assert_ok()
    .json
    .unwrap();
    assert_eq!(v["total"]["tensors"], 7);
}

#[test]
fn the_bundled_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny-dpo");
    let v = inspect(&[dir.as_os_str(), "--json".as_ref()])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(v["total"]["tensors"], 21);
    assert_eq!(v["dtypes"].as_object().unwrap().len(), 1);
    assert_eq!(v["dtypes"]["BF16"]["bytes"], v["total"]["bytes"]);
}

#[test]
fn errors() {
    let tmp = tempfile::tempdir().unwrap();
    inspect(&[tmp.path().join("nothing").as_os_str()]).assert_fails(1, &["does not exist"]);
    std::fs::write(tmp.path().join("pytorch_model.bin"), b"x").unwrap();
    inspect(&[tmp.path().as_os_str()]).assert_fails(1, &["safetensors only"]);
}

/// A Hugging Face cache holding `org/model` at commit `COMMIT` (refs/main points at it).
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn fake_cache(root: &Path) -> PathBuf {
    let (dir, _) = write_sharded(&root.join("model"), &tensors());
    let cache = root.join("hub");
    common::add_snapshot(
        &cache,
        "org/model",
        COMMIT,
        &["main"],
        &common::dir_files(&dir),
    );
    cache
}

#[test]
fn hub_ids_from_the_local_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = fake_cache(tmp.path());
    let v = expo(&["inspect", "org/model", "--json"])
        .env("HF_HUB_CACHE", &cache)
        .current_dir(tmp.path())
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(v["path"], "org/model");
    assert_eq!(v["hub"]["repo_id"], "org/model");
    assert_eq!(v["hub"]["commit"], COMMIT);
    assert_eq!(v["total"]["tensors"], 7);

    // diff reads Hub ids the same way.
    let v = expo(&["diff", "org/model", "org/model@main", "--json", "--quiet"])
        .env("HF_HUB_CACHE", &cache)
        .current_dir(tmp.path())
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(v["from"], "org/model");
    assert_eq!(v["summary"]["identical_tensors"], 7);
}
