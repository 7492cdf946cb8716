//! Fuzzes expo's whole input path on hostile checkpoints: discovery, header and index
//! validation, pairing, planning, mapping, the exact-tensor check and the streaming writer.
//!
//! Input format (so that seeds are easy to write by hand):
//! - byte 0 picks the case: bits 0–1 the layout, bits 2–3 α, bits 4–5 `--dtype`;
//! - the rest is cut at every `SEP` into parts:
//!   - layout 0: part 0 is `model.safetensors`; both sides are that directory;
//!   - layout 1: part 0 is `model.safetensors.index.json`, parts 1.. are `a.safetensors`,
//!     `b.safetensors`, …; both sides are that directory;
//!   - layout 2: part 0 is θ0's `model.safetensors`, part 1 θ1's (pairing mismatches);
//!   - layout 3: as 0, but the file itself (not its directory) is passed.
//!
//! Requirements checked: no panic, no abort, no huge allocation (libFuzzer's
//! `-malloc_limit_mb`), every error about an input names the file or directory, and every
//! single file expo accepts is accepted by the `safetensors` crate too (the loaders' code;
//! `tests/header_crate.rs` checks the converse, up to expo's listed stricter rules).
//!
//! Run with `cargo +nightly fuzz run open_checkpoint -- -max_total_time=600`.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use expo::checkpoint::Checkpoint;
use expo::dtype::FloatDtype;
use expo::engine::{self, MappedCheckpoint, OutputJob};
use expo::plan::{build_plan, DtypeChoice, PlanOptions};
use libfuzzer_sys::fuzz_target;

const SEP: &[u8] = b"\n--8<--\n";
const SHARD_NAMES: [&str; 4] = [
    "a.safetensors",
    "b.safetensors",
    "c.safetensors",
    "d.safetensors",
];

struct Env {
    root: PathBuf,
    pool: rayon::ThreadPool,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        // tmpfs when there is one: fsync is free there.
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let root = base.join(format!("expo-fuzz-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        Env { root, pool }
    })
}

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&rest[..i]);
        rest = &rest[i + SEP.len()..];
    }
    parts.push(rest);
    parts
}

fn fresh(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
}

/// Opens a checkpoint; an error must name the path it is about.
fn open(path: &Path) -> Option<Checkpoint> {
    match Checkpoint::open(path) {
        Ok(ck) => Some(ck),
        Err(e) => {
            let msg = e.to_string();
            let dir = path.parent().unwrap();
            assert!(
                msg.contains(&*dir.to_string_lossy()),
                "error does not name the input: {msg}"
            );
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let env = env();
    let parts = split(rest);
    let sft_dir = env.root.join("sft");
    let aligned_dir = env.root.join("aligned");
    let out_dir = env.root.join("out");
    fresh(&sft_dir);
    fresh(&aligned_dir);
    fresh(&out_dir);

    let (sft_path, aligned_path) = match mode & 3 {
        0 | 3 => {
            fs::write(sft_dir.join("model.safetensors"), parts[0]).unwrap();
            let p = if mode & 3 == 3 {
                sft_dir.join("model.safetensors")
            } else {
                sft_dir.clone()
            };
            (p.clone(), p)
        }
        1 => {
            fs::write(sft_dir.join("model.safetensors.index.json"), parts[0]).unwrap();
            for (name, bytes) in SHARD_NAMES.iter().zip(&parts[1..]) {
                fs::write(sft_dir.join(name), bytes).unwrap();
            }
            (sft_dir.clone(), sft_dir.clone())
        }
        _ => {
            fs::write(sft_dir.join("model.safetensors"), parts[0]).unwrap();
            let second = parts.get(1).copied().unwrap_or(parts[0]);
            fs::write(aligned_dir.join("model.safetensors"), second).unwrap();
            (sft_dir.clone(), aligned_dir.clone())
        }
    };

    let Some(sft) = open(&sft_path) else { return };
    let Some(aligned) = open(&aligned_path) else {
        return;
    };
    // Single files: the safetensors crate must accept whatever expo accepted.
    let files: Vec<&[u8]> = match mode & 3 {
        1 => Vec::new(),
        2 => vec![parts[0], parts.get(1).copied().unwrap_or(parts[0])],
        _ => vec![parts[0]],
    };
    for bytes in files {
        if let Err(e) = safetensors::SafeTensors::read_metadata(bytes) {
            panic!("expo accepted a file the safetensors crate refuses: {e}");
        }
    }
    let opts = PlanOptions {
        alpha: [0.5, 0.0, -0.5, 3.0][(mode >> 2 & 3) as usize],
        dtype: [
            DtypeChoice::Auto,
            DtypeChoice::Fixed(FloatDtype::F32),
            DtypeChoice::Fixed(FloatDtype::BF16),
            DtypeChoice::Fixed(FloatDtype::F16),
        ][(mode >> 4 & 3) as usize],
        max_shard_size: (mode & 0x40 != 0).then_some(64),
        rules: Vec::new(),
    };
    let Ok(plan) = build_plan(&sft, &aligned, &opts) else {
        return;
    };
    let sft_maps = match MappedCheckpoint::map(&sft) {
        Ok(m) => m,
        Err(e) => panic!("mapping a validated checkpoint failed: {e}"),
    };
    let aligned_maps = MappedCheckpoint::map(&aligned).expect("mapping a validated checkpoint");
    if engine::verify_exact_tensors(&plan, (&sft, &sft_maps), (&aligned, &aligned_maps)).is_err() {
        return;
    }
    let cancel = AtomicBool::new(false);
    let report = engine::write_outputs(
        &[OutputJob {
            plan: &plan,
            dir: &out_dir,
        }],
        (&sft, &sft_maps),
        (&aligned, &aligned_maps),
        &env.pool,
        &cancel,
        &|_| {},
    );
    for r in report.outputs {
        if let Err(e) = r {
            // Overflow at a large α is an expected outcome; anything else is a bug here.
            assert!(
                matches!(e, engine::EngineError::Overflow { .. }),
                "writing failed: {e}"
            );
        }
    }
});
