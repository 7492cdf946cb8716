//! Models from the local Hugging Face cache: a fake cache laid out exactly as
//! `huggingface_hub` lays it out (refs/, snapshots/<commit>/ whose files are relative
//! symlinks into blobs/), and expo run on it with the cache location set on the command.
#![cfg(unix)]

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::common::{add_snapshot, expo, Expo};

const SFT: &str = "org/sft-model";
const DPO: &str = "org/dpo-model";
/// Commits of the fake repos (40 hex digits, as on the Hub).
const SFT_MAIN: &str = "1111111111111111111111111111111111111111";
const DPO_V1: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
const DPO_MAIN: &str = "b2c3d4e5f60718293a4b5c6d7e8f9012345678a1";
const DPO_PR: &str = "c3d4e5f60718293a4b5c6d7e8f9012345678a1b2";

/// The weights of each snapshot: one f32 tensor, distinct per commit.
fn weights(seed: f32) -> Vec<f32> {
    (0..6).map(|i| seed + i as f32 * 0.25).collect()
}

fn safetensors_bytes(values: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![2, 3], &data).unwrap();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize([("w", view)], Some(meta)).unwrap()
}

fn read_output(dir: &Path) -> Vec<f32> {
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("w").unwrap();
    assert_eq!(t.dtype(), Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// θ1 + α·(θ1 − θ0) in f64, rounded once (the values are exact in f32 here anyway).
fn expected(sft: &[f32], aligned: &[f32], alpha: f64) -> Vec<f32> {
    sft.iter()
        .zip(aligned)
        .map(|(&a, &b)| {
            let (a, b) = (a as f64, b as f64);
            (b + alpha * (b - a)) as f32
        })
        .collect()
}

fn model_files(seed: f32, extra: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("model.safetensors", safetensors_bytes(&weights(seed))),
        (
            "config.json",
            format!("{{\"model_type\": \"llama\", \"note\": \"{extra}\"}}\n").into_bytes(),
        ),
        (
            "README.md",
            b"---\nlicense: apache-2.0\n---\n# upstream card\n".to_vec(),
        ),
        (".gitattributes", b"*.safetensors filter=lfs\n".to_vec()),
        ("tokenizer/tokenizer_config.json", b"{}\n".to_vec()),
    ]
}

/// A temp dir with a fake hub cache at `hub/`: org/sft-model (main) and org/dpo-model
/// (main, tag v1, refs/pr/1, each a different commit with different weights).
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let f = Fixture { dir };
        f.populate(&f.hub());
        f
    }

    fn populate(&self, cache: &Path) {
        add_snapshot(cache, SFT, SFT_MAIN, &["main"], &model_files(1.0, "sft"));
        add_snapshot(cache, DPO, DPO_V1, &["v1"], &model_files(2.0, "dpo v1"));
        add_snapshot(
            cache,
            DPO,
            DPO_MAIN,
            &["main"],
            &model_files(3.0, "dpo main"),
        );
        add_snapshot(
            cache,
            DPO,
            DPO_PR,
            &["refs/pr/1"],
            &model_files(4.0, "dpo pr"),
        );
        // huggingface_hub also keeps a .no_exist/ tree; it must not confuse anything.
        let no_exist = cache
            .join("models--org--dpo-model/.no_exist")
            .join(DPO_MAIN);
        fs::create_dir_all(&no_exist).unwrap();
        fs::write(no_exist.join("pytorch_model.bin"), b"").unwrap();
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn hub(&self) -> PathBuf {
        self.path().join("hub")
    }

    fn out(&self) -> PathBuf {
        self.path().join("out")
    }

    /// `expo ARGS` run in the temp dir, with only the given cache variables set.
    fn expo_env(&self, args: &[&str], env: &[(&str, &Path)]) -> Expo {
        let mut cmd = expo(args).current_dir(self.path());
        for var in [
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "HF_HOME",
            "XDG_CACHE_HOME",
            "HF_HUB_OFFLINE",
        ] {
            cmd = cmd.env_remove(var);
        }
        // A home without a cache, so nothing falls through to the real one.
        cmd = cmd.env("HOME", self.path().join("nohome"));
        for (k, v) in env {
            cmd = cmd.env(k, v);
        }
        cmd
    }

    /// `expo ARGS` with HF_HUB_CACHE pointing at the fake cache.
    fn expo(&self, args: &[&str]) -> Expo {
        self.expo_env(args, &[("HF_HUB_CACHE", &self.hub())])
    }

    fn extrapolate(&self, sft: &str, aligned: &str) -> Expo {
        let out = self.out();
        self.expo(&[
            "extrapolate",
            "--sft",
            sft,
            "--aligned",
            aligned,
            "--alpha",
            "0.3",
            "--output",
            out.to_str().unwrap(),
            "--quiet",
        ])
    }

    fn provenance(&self) -> Value {
        serde_json::from_slice(&fs::read(self.out().join("expo.json")).unwrap()).unwrap()
    }
}

#[test]
fn hub_ids_resolve_to_the_main_snapshots() {
    let f = Fixture::new();
    f.extrapolate(SFT, DPO).assert_ok();
    assert_eq!(
        read_output(&f.out()),
        expected(&weights(1.0), &weights(3.0), 0.3)
    );

    // Side files come from θ1's snapshot, as regular files with the blobs' contents.
    let config = f.out().join("config.json");
    assert!(!fs::symlink_metadata(&config)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(fs::read_to_string(&config).unwrap().contains("dpo main"));
    assert!(f.out().join("tokenizer/tokenizer_config.json").is_file());
    assert!(!f.out().join(".gitattributes").exists());

    // Provenance: what was typed, the Hub id, the revision and the commit.
    let p = f.provenance();
    for (side, id, commit) in [("sft", SFT, SFT_MAIN), ("aligned", DPO, DPO_MAIN)] {
        assert_eq!(p[side]["given"], id, "{p}");
        assert_eq!(p[side]["hub_id"], id, "{p}");
        assert_eq!(p[side]["revision"], "main", "{p}");
        assert_eq!(p[side]["commit"], commit, "{p}");
        let path = p[side]["path"].as_str().unwrap();
        assert!(path.ends_with(&format!("snapshots/{commit}")), "{path}");
    }

    // The model card names the Hub ids as base models, and the commits.
    let card = fs::read_to_string(f.out().join("README.md")).unwrap();
    assert!(
        card.contains("base_model:\n- \"org/sft-model\"\n- \"org/dpo-model\"\n"),
        "{card}"
    );
    assert!(card.contains(DPO_MAIN) && card.contains(SFT_MAIN), "{card}");
    assert!(card.contains("license: apache-2.0"), "{card}");
}

#[test]
fn a_branch_or_tag_resolves_through_refs() {
    let f = Fixture::new();
    f.extrapolate(SFT, "org/dpo-model@v1").assert_ok();
    assert_eq!(
        read_output(&f.out()),
        expected(&weights(1.0), &weights(2.0), 0.3)
    );
    let p = f.provenance();
    assert_eq!(p["aligned"]["given"], "org/dpo-model@v1");
    assert_eq!(p["aligned"]["hub_id"], DPO);
    assert_eq!(p["aligned"]["revision"], "v1");
    assert_eq!(p["aligned"]["commit"], DPO_V1);
    let card = fs::read_to_string(f.out().join("README.md")).unwrap();
    assert!(card.contains("- \"org/dpo-model\"\n"), "{card}");
}

#[test]
fn a_ref_with_slashes_resolves() {
    let f = Fixture::new();
    f.extrapolate(SFT, "org/dpo-model@refs/pr/1").assert_ok();
    assert_eq!(
        read_output(&f.out()),
        expected(&weights(1.0), &weights(4.0), 0.3)
    );
    assert_eq!(f.provenance()["aligned"]["commit"], DPO_PR);
}

#[test]
fn a_commit_hash_is_used_directly() {
    let f = Fixture::new();
    // The snapshot of tag v1, by its full hash (no ref names it).
    f.extrapolate(SFT, &format!("{DPO}@{DPO_V1}")).assert_ok();
    assert_eq!(
        read_output(&f.out()),
        expected(&weights(1.0), &weights(2.0), 0.3)
    );
    let p = f.provenance();
    assert_eq!(p["aligned"]["revision"], DPO_V1);
    assert_eq!(p["aligned"]["commit"], DPO_V1);

    // A unique prefix of a cached commit works too.
    fs::remove_dir_all(f.out()).unwrap();
    f.extrapolate(SFT, &format!("{DPO}@{}", &DPO_PR[..10]))
        .assert_ok();
    assert_eq!(f.provenance()["aligned"]["commit"], DPO_PR);
}

#[test]
fn a_missing_model_says_where_expo_looked_and_how_to_download() {
    let f = Fixture::new();
    let err = f
        .extrapolate(SFT, "org/not-downloaded")
        .assert_fails(1, &[])
        .stderr;
    let looked = f.hub().join("models--org--not-downloaded");
    assert!(err.contains(&looked.display().to_string()), "{err}");
    assert!(
        err.contains("huggingface-cli download org/not-downloaded"),
        "{err}"
    );
    assert!(err.contains("--aligned"), "{err}");
    assert!(!f.out().exists());
}

#[test]
fn a_missing_revision_lists_what_is_cached() {
    let f = Fixture::new();
    let err = f
        .extrapolate("org/sft-model@v9", DPO)
        .assert_fails(1, &[])
        .stderr;
    assert!(err.contains("revision `v9`"), "{err}");
    assert!(err.contains("main"), "{err}");
    assert!(err.contains(SFT_MAIN), "{err}");
    assert!(
        err.contains(&f.hub().join("models--org--sft-model").display().to_string()),
        "{err}"
    );
    assert!(
        err.contains("huggingface-cli download org/sft-model --revision v9"),
        "{err}"
    );
    assert!(!f.out().exists());

    // A ref pointing at a snapshot that is gone is an incomplete download.
    fs::write(
        f.hub().join("models--org--dpo-model/refs/broken"),
        "d".repeat(40),
    )
    .unwrap();
    let err = f
        .extrapolate(SFT, "org/dpo-model@broken")
        .assert_fails(1, &[])
        .stderr;
    assert!(err.contains("incomplete download"), "{err}");

    // Revisions cannot climb out of the cache entry.
    let err = f
        .extrapolate(SFT, "org/dpo-model@../../x")
        .assert_fails(1, &[])
        .stderr;
    assert!(err.contains("not a valid revision"), "{err}");
}

#[test]
fn an_existing_local_path_wins_over_the_cache() {
    let f = Fixture::new();
    // ./org/dpo-model exists in the working directory: it is read, not the cache.
    let local = f.path().join(DPO);
    fs::create_dir_all(&local).unwrap();
    fs::write(
        local.join("model.safetensors"),
        safetensors_bytes(&weights(5.0)),
    )
    .unwrap();
    f.extrapolate(SFT, DPO).assert_ok();
    assert_eq!(
        read_output(&f.out()),
        expected(&weights(1.0), &weights(5.0), 0.3)
    );
    let p = f.provenance();
    assert_eq!(p["aligned"]["given"], DPO);
    assert!(p["aligned"].get("hub_id").is_none(), "{p}");
    assert!(p["aligned"].get("commit").is_none(), "{p}");
    assert!(p["sft"].get("hub_id").is_some(), "{p}");
}

#[test]
fn a_path_that_is_not_a_hub_id_is_just_missing() {
    let f = Fixture::new();
    let err = f
        .extrapolate("./nowhere/model", DPO)
        .assert_fails(1, &[])
        .stderr;
    assert!(err.contains("nowhere/model does not exist"), "{err}");
    assert!(!err.contains("huggingface-cli"), "{err}");
}

#[test]
fn hf_home_and_xdg_cache_home_are_fallbacks() {
    let f = Fixture::new();
    let args = |out: &Path| {
        [
            "extrapolate",
            "--sft",
            SFT,
            "--aligned",
            DPO,
            "-a",
            "0.5",
            "-o",
            out.to_str().unwrap(),
            "-q",
        ]
        .map(String::from)
    };

    // HF_HOME/hub.
    let hf_home = f.path().join("hf-home");
    f.populate(&hf_home.join("hub"));
    let out = f.path().join("out-hf-home");
    f.expo_env(
        &args(&out).iter().map(String::as_str).collect::<Vec<_>>(),
        &[("HF_HOME", &hf_home)],
    )
    .assert_ok();
    assert_eq!(
        read_output(&out),
        expected(&weights(1.0), &weights(3.0), 0.5)
    );

    // XDG_CACHE_HOME/huggingface/hub.
    let xdg = f.path().join("xdg");
    f.populate(&xdg.join("huggingface/hub"));
    let out = f.path().join("out-xdg");
    f.expo_env(
        &args(&out).iter().map(String::as_str).collect::<Vec<_>>(),
        &[("XDG_CACHE_HOME", &xdg)],
    )
    .assert_ok();

    // ~/.cache/huggingface/hub.
    let home = f.path().join("home");
    f.populate(&home.join(".cache/huggingface/hub"));
    let out = f.path().join("out-home");
    f.expo_env(
        &args(&out).iter().map(String::as_str).collect::<Vec<_>>(),
        &[("HOME", &home)],
    )
    .assert_ok();

    // HF_HUB_CACHE takes precedence over HF_HOME: an empty cache there means "not cached".
    let empty = f.path().join("empty-cache");
    fs::create_dir_all(&empty).unwrap();
    let out = f.path().join("out-none");
    let err = f
        .expo_env(
            &args(&out).iter().map(String::as_str).collect::<Vec<_>>(),
            &[("HF_HUB_CACHE", &empty), ("HF_HOME", &hf_home)],
        )
        .assert_fails(1, &[])
        .stderr;
    assert!(err.contains(&empty.display().to_string()), "{err}");
}

#[test]
fn output_inside_the_cache_entry_is_refused() {
    let f = Fixture::new();
    let inside = f.hub().join("models--org--dpo-model/blobs/expo-out");
    let err = f
        .expo(&[
            "extrapolate",
            "--sft",
            SFT,
            "--aligned",
            DPO,
            "--alpha",
            "0.3",
            "--output",
            inside.to_str().unwrap(),
        ])
        .assert_fails(2, &[])
        .stderr;
    assert!(err.contains("overlaps --aligned"), "{err}");
    assert!(!inside.exists());
}

#[test]
fn dry_run_shows_the_resolved_inputs() {
    let f = Fixture::new();
    let out = f.out();
    let dry_run = [
        "extrapolate",
        "--sft",
        SFT,
        "--aligned",
        "org/dpo-model@v1",
        "--alpha",
        "0.3",
        "--output",
        out.to_str().unwrap(),
        "--dry-run",
    ];
    let plan = f.expo(&dry_run).arg("--json").assert_ok().json.unwrap();
    assert_eq!(plan["aligned"]["hub_id"], DPO);
    assert_eq!(plan["aligned"]["revision"], "v1");
    assert_eq!(plan["aligned"]["commit"], DPO_V1);

    let text = f.expo(&dry_run).assert_ok().stdout;
    assert!(
        text.contains(&format!("org/dpo-model@v1 (cached v1 = commit {DPO_V1};")),
        "{text}"
    );
    assert!(!out.exists());
}

#[test]
fn a_huge_ref_file_is_refused_without_being_read_or_printed() {
    let f = Fixture::new();
    let repo = f.hub().join("models--org--dpo-model");
    let ref_path = repo.join("refs").join("big");
    // 4 MiB of hex digits: not a ref. It must be neither read whole nor echoed.
    fs::write(&ref_path, "a".repeat(4 << 20)).unwrap();
    let run = f.extrapolate(SFT, "org/dpo-model@big").assert_fails(
        1,
        &[
            &ref_path.display().to_string(),
            "larger than 1024 bytes",
            "not a ref",
        ],
    );
    assert!(
        run.stderr.len() < 1000,
        "{} bytes of error",
        run.stderr.len()
    );

    // A short ref that is not a commit is quoted, cut to a few dozen characters.
    fs::write(&ref_path, "z".repeat(600)).unwrap();
    let run = f
        .extrapolate(SFT, "org/dpo-model@big")
        .assert_fails(1, &["is not a commit hash", "…"]);
    assert!(
        run.stderr.len() < 1000,
        "{} bytes of error",
        run.stderr.len()
    );
}
