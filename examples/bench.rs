//! End-to-end benchmark: generates a synthetic LLaMA-shaped bf16 pair, then times
//! `expo extrapolate` against `cp -r ALIGNED OUT && sync OUT/*` on the same disk, run
//! alternately, and prints medians, ranges, ratios and peak RSS.
//!
//! ```sh
//! cargo build --release && cargo run --release --example bench -- --params 500M
//! ```
//!
//! Options: `--params N[M|B]` (default 500M), `--runs R` (5), `--shards S` (3),
//! `--dir DIR` (where to put the pair and outputs; default a temp dir in the current
//! directory's filesystem), `--keep` (keep the generated pair), `--threads T`,
//! `--mode warm|cold|both|sweep|diff` (default warm). `sweep` times one 5-α run
//! (`--alpha 0.1:0.5:0.1`) against five separate runs, warm cache. `diff` times
//! `expo diff` (it only reads) against `expo extrapolate` on the same pair, run
//! alternately, warm cache. Cold runs drop the page cache before each run
//! (needs root) and compare expo's input read rate with `dd` reading the same files, the
//! disk's sequential read rate; use them for pairs larger than RAM.
//! `--expo PATH` (default target/release/expo).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn parse_count(s: &str) -> u64 {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('B') | Some('b') => (&s[..s.len() - 1], 1e9),
        Some('M') | Some('m') => (&s[..s.len() - 1], 1e6),
        Some('K') | Some('k') => (&s[..s.len() - 1], 1e3),
        _ => (s, 1.0),
    };
    (num.parse::<f64>()
        .expect("--params takes a number like 500M or 2B")
        * mul) as u64
}

/// A tensor of the synthetic model.
struct Spec {
    name: String,
    shape: Vec<u64>,
}

/// LLaMA-shaped tensor list with about `params` parameters.
fn llama_like(params: u64) -> Vec<Spec> {
    let vocab = 32000u64;
    let hidden: u64 = match params {
        0..=300_000_000 => 768,
        300_000_001..=1_500_000_000 => 1024,
        1_500_000_001..=6_000_000_000 => 2048,
        _ => 4096,
    };
    let inter = (hidden * 8 / 3).div_ceil(256) * 256;
    let per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden;
    let fixed = 2 * vocab * hidden + hidden;
    let layers = (params.saturating_sub(fixed) / per_layer).max(1);
    let mut v = vec![Spec {
        name: "model.embed_tokens.weight".into(),
        shape: vec![vocab, hidden],
    }];
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        for (n, shape) in [
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![hidden, hidden]),
            ("self_attn.v_proj.weight", vec![hidden, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, hidden]),
            ("mlp.gate_proj.weight", vec![inter, hidden]),
            ("mlp.up_proj.weight", vec![inter, hidden]),
            ("mlp.down_proj.weight", vec![hidden, inter]),
            ("input_layernorm.weight", vec![hidden]),
            ("post_attention_layernorm.weight", vec![hidden]),
        ] {
            v.push(Spec {
                name: format!("{p}{n}"),
                shape,
            });
        }
    }
    v.push(Spec {
        name: "model.norm.weight".into(),
        shape: vec![hidden],
    });
    v.push(Spec {
        name: "lm_head.weight".into(),
        shape: vec![vocab, hidden],
    });
    v
}

/// Fast seeded generator of plausible bf16 weights: |x| < 0.06, normal numbers.
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Fills `out` with bf16 values; with `base`, its values get small changes in their
    /// last mantissa bit (an aligned model close to its SFT model).
    fn fill(&mut self, out: &mut [u8], base: Option<&[u8]>) {
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            let r = self.next();
            let mut words = [0u16; 4];
            for (k, w) in words.iter_mut().enumerate() {
                let bits = (r >> (16 * k)) as u16;
                *w = match base {
                    None => {
                        // sign, exponent 2^-12..2^-5, random mantissa
                        let sign = bits & 0x8000;
                        let exp = 115 + ((bits >> 7) & 7);
                        sign | (exp << 7) | (bits & 0x7f)
                    }
                    Some(b) => {
                        let j = i * 8 + k * 2;
                        let old = u16::from_le_bytes([b[j], b[j + 1]]);
                        // One element in 16 moves by one unit in the last place:
                        // a relative change of about 1e-3, like a real DPO step.
                        old ^ u16::from(bits & 0xf == 0)
                    }
                };
            }
            for (k, w) in words.iter().enumerate() {
                chunk[2 * k..2 * k + 2].copy_from_slice(&w.to_le_bytes());
            }
        }
    }
}

/// Writes the checkpoint pair, sharded into `shards` files each.
fn generate(dir: &Path, specs: &[Spec], shards: usize) -> u64 {
    let total: u64 = specs
        .iter()
        .map(|s| s.shape.iter().product::<u64>() * 2)
        .sum();
    let max_shard = total.div_ceil(shards as u64);
    // Greedy split, as Hugging Face does.
    let mut groups: Vec<Vec<&Spec>> = vec![Vec::new()];
    let mut current = 0;
    for s in specs {
        let len = s.shape.iter().product::<u64>() * 2;
        if current + len > max_shard && !groups.last().unwrap().is_empty() {
            groups.push(Vec::new());
            current = 0;
        }
        groups.last_mut().unwrap().push(s);
        current += len;
    }
    let n = groups.len();
    for side in ["sft", "aligned"] {
        let d = dir.join(side);
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("config.json"),
            b"{\"architectures\": [\"LlamaForCausalLM\"], \"torch_dtype\": \"bfloat16\"}\n",
        )
        .unwrap();
        let mut weight_map = BTreeMap::new();
        let mut gen_sft = Gen(0x1234_5678_9abc_def1);
        let mut gen_dpo = Gen(0x0fed_cba9_8765_4321);
        for (k, group) in groups.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
            let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
            let mut off = 0u64;
            for s in group {
                let len = s.shape.iter().product::<u64>() * 2;
                let shape: Vec<String> = s.shape.iter().map(|d| d.to_string()).collect();
                header.push_str(&format!(
                    ",\"{}\":{{\"dtype\":\"BF16\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                    s.name,
                    shape.join(","),
                    off,
                    off + len
                ));
                off += len;
                weight_map.insert(s.name.clone(), file.clone());
            }
            header.push('}');
            while header.len() % 8 != 0 {
                header.push(' ');
            }
            let mut w = BufWriter::with_capacity(8 << 20, File::create(d.join(&file)).unwrap());
            w.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
            w.write_all(header.as_bytes()).unwrap();
            // Both sides replay the same SFT stream, so the aligned side can perturb it.
            let mut buf = vec![0u8; 8 << 20];
            let mut pert = vec![0u8; 8 << 20];
            let mut left = off;
            while left > 0 {
                let m = left.min(buf.len() as u64) as usize;
                gen_sft.fill(&mut buf[..m], None);
                if side == "aligned" {
                    gen_dpo.fill(&mut pert[..m], Some(&buf[..m]));
                    w.write_all(&pert[..m]).unwrap();
                } else {
                    w.write_all(&buf[..m]).unwrap();
                }
                left -= m as u64;
            }
            w.flush().unwrap();
        }
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        fs::write(
            d.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index).unwrap(),
        )
        .unwrap();
    }
    total
}

/// Runs a command and returns (seconds, peak RSS in KiB). Dirty data left by the previous
/// command (or by deleting its output) is flushed first, untimed, so that each command pays
/// only for its own writes.
fn run(cmd: &mut Command) -> (f64, u64) {
    let _ = Command::new("sync").status();
    let t = Instant::now();
    let child = cmd.spawn().expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child; status and usage point at live locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(rc, pid, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed"
    );
    std::mem::forget(child);
    (secs, usage.ru_maxrss as u64)
}

/// `--mode diff`: `expo diff` against `expo extrapolate` on the same warm pair, run
/// alternately (run 0 warms the cache and is not counted). The extrapolation's output is
/// deleted before each of its runs, untimed.
fn diff_vs_extrapolate(
    runs: usize,
    bytes: u64,
    extrapolate: &dyn Fn() -> Command,
    diff: &dyn Fn() -> Command,
) {
    let out = extrapolate()
        .get_args()
        .skip_while(|a| *a != "--output")
        .nth(1)
        .map(PathBuf::from)
        .expect("the extrapolate command names its output");
    let (mut ext_times, mut diff_times) = (Vec::new(), Vec::new());
    let (mut ext_rss, mut diff_rss) = (0, 0);
    for i in 0..=runs {
        let _ = fs::remove_dir_all(&out);
        let (es, er) = run(&mut extrapolate());
        let (ds, dr) = run(&mut diff());
        if i > 0 {
            ext_times.push(es);
            diff_times.push(ds);
            ext_rss = ext_rss.max(er);
            diff_rss = diff_rss.max(dr);
        }
        eprintln!(
            "diff run {i}{}: extrapolate {es:.3}s, diff {ds:.3}s ({} MiB peak RSS)",
            if i == 0 { " (not counted)" } else { "" },
            dr / 1024
        );
    }
    let (em, emin, emax) = stats(&ext_times);
    let (dm, dmin, dmax) = stats(&diff_times);
    println!(
        "| warm | `expo extrapolate --alpha 0.3` | {em:.3} | {emin:.3}–{emax:.3} | 1.00 | {} | {:.2} read |",
        ext_rss / 1024,
        2.0 * bytes as f64 / em / 1e9
    );
    println!(
        "| warm | `expo diff` | {dm:.3} | {dmin:.3}–{dmax:.3} | {:.2} × extrapolate | {} | {:.2} read |",
        dm / em,
        diff_rss / 1024,
        2.0 * bytes as f64 / dm / 1e9
    );
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

/// Rejects anything but the documented options (a mistyped one would otherwise run the
/// default benchmark), and prints the options for `--help`.
fn check_args() {
    const VALUED: [&str; 7] = [
        "--params",
        "--runs",
        "--shards",
        "--dir",
        "--threads",
        "--mode",
        "--expo",
    ];
    const FLAGS: [&str; 1] = ["--keep"];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: bench [--params N[M|B]] [--runs R] [--shards S] [--dir DIR] [--keep] \
                 [--threads T] [--mode warm|cold|both|sweep|diff] [--expo PATH]";
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--help" || a == "-h" {
            println!("{usage}");
            std::process::exit(0);
        } else if VALUED.contains(&a) && i + 1 < args.len() {
            i += 2;
        } else if FLAGS.contains(&a) || a == "--bench" {
            i += 1;
        } else {
            eprintln!("bench: unexpected argument {a:?}\n{usage}");
            std::process::exit(2);
        }
    }
}

fn main() {
    check_args();
    let params = parse_count(&arg("--params").unwrap_or_else(|| "500M".into()));
    let runs: usize = arg("--runs").map_or(5, |r| r.parse().expect("--runs N"));
    let shards: usize = arg("--shards").map_or(3, |r| r.parse().expect("--shards N"));
    let expo = PathBuf::from(arg("--expo").unwrap_or_else(|| "target/release/expo".into()));
    assert!(
        expo.exists(),
        "{} not found: run `cargo build --release` first",
        expo.display()
    );
    let base = arg("--dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let dir = tempfile::Builder::new()
        .prefix("expo-bench-")
        .tempdir_in(&base)
        .expect("temp dir");
    let specs = llama_like(params);
    let n_params: u64 = specs.iter().map(|s| s.shape.iter().product::<u64>()).sum();

    let t = Instant::now();
    let bytes = generate(dir.path(), &specs, shards);
    eprintln!(
        "generated a {:.2}B-parameter bf16 pair ({:.2} GB each, {} tensors, {} shards) in {:.1}s at {}",
        n_params as f64 / 1e9,
        bytes as f64 / 1e9,
        specs.len(),
        shards,
        t.elapsed().as_secs_f64(),
        dir.path().display()
    );
    let sft = dir.path().join("sft");
    let aligned = dir.path().join("aligned");
    let out = dir.path().join("out");
    let threads = arg("--threads");

    let mode = arg("--mode").unwrap_or_else(|| "warm".into());
    let expo_cmd = || {
        let mut e = Command::new(&expo);
        e.args(["extrapolate", "--quiet", "--alpha", "0.3", "--sft"])
            .arg(&sft)
            .arg("--aligned")
            .arg(&aligned)
            .arg("--output")
            .arg(&out);
        if let Some(t) = &threads {
            e.args(["--threads", t]);
        }
        e
    };
    println!();
    println!(
        "{:.2}B params, {:.2} GB per checkpoint, {} shards, median of {} runs",
        n_params as f64 / 1e9,
        bytes as f64 / 1e9,
        shards,
        runs
    );
    println!("| cache | command | median s | min–max s | ratio | peak RSS MiB | GB/s |");
    println!("|---|---|---|---|---|---|---|");
    if mode == "warm" || mode == "both" {
        let mut expo_times = Vec::new();
        let mut cp_times = Vec::new();
        let mut expo_rss = 0;
        let mut cp_rss = 0;
        // Run 0 warms the page cache and is not counted.
        for i in 0..=runs {
            let _ = fs::remove_dir_all(&out);
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!(
                "cp -r '{}' '{}' && sync '{}'/*",
                aligned.display(),
                out.display(),
                out.display()
            ));
            let (s, r) = run(&mut c);
            let _ = fs::remove_dir_all(&out);
            let (es, er) = run(&mut expo_cmd());
            if i > 0 {
                cp_times.push(s);
                expo_times.push(es);
                cp_rss = cp_rss.max(r);
                expo_rss = expo_rss.max(er);
            }
            eprintln!(
                "warm run {i}{}: cp {s:.3}s, expo {es:.3}s ({} MiB peak RSS)",
                if i == 0 { " (not counted)" } else { "" },
                er / 1024
            );
        }
        let _ = fs::remove_dir_all(&out);
        let (cm, cmin, cmax) = stats(&cp_times);
        let (em, emin, emax) = stats(&expo_times);
        println!(
            "| warm | `cp -r aligned out && sync out/*` | {cm:.3} | {cmin:.3}–{cmax:.3} | 1.00 | {} | {:.2} written |",
            cp_rss / 1024,
            bytes as f64 / cm / 1e9
        );
        println!(
            "| warm | `expo extrapolate --alpha 0.3` | {em:.3} | {emin:.3}–{emax:.3} | {:.2} × cp | {} | {:.2} written |",
            em / cm,
            expo_rss / 1024,
            bytes as f64 / em / 1e9
        );
    }
    if mode == "diff" {
        diff_vs_extrapolate(runs, bytes, &expo_cmd, &|| {
            let mut e = Command::new(&expo);
            e.args(["diff", "--quiet", "--sft"])
                .arg(&sft)
                .arg("--aligned")
                .arg(&aligned)
                .stdout(std::process::Stdio::null());
            if let Some(t) = &threads {
                e.args(["--threads", t]);
            }
            e
        });
        let _ = fs::remove_dir_all(&out);
    }
    if mode == "sweep" {
        let outs = dir.path().join("sweep");
        let clean = || {
            let _ = fs::remove_dir_all(&outs);
            fs::create_dir_all(&outs).unwrap();
        };
        let one = |alpha: &str, output: &Path| {
            let mut e = Command::new(&expo);
            e.args(["extrapolate", "--quiet", "--alpha", alpha, "--sft"])
                .arg(&sft)
                .arg("--aligned")
                .arg(&aligned)
                .arg("--output")
                .arg(output);
            if let Some(t) = &threads {
                e.args(["--threads", t]);
            }
            e
        };
        let mut sweep_times = Vec::new();
        let mut separate_times = Vec::new();
        let mut sweep_rss = 0;
        for i in 0..=runs {
            clean();
            let (s, r) = run(&mut one("0.1:0.5:0.1", &outs.join("out-{alpha}")));
            clean();
            let t = Instant::now();
            for a in ["0.1", "0.2", "0.3", "0.4", "0.5"] {
                run(&mut one(a, &outs.join(format!("out-{a}"))));
            }
            let sep = t.elapsed().as_secs_f64();
            if i > 0 {
                sweep_times.push(s);
                separate_times.push(sep);
                sweep_rss = sweep_rss.max(r);
            }
            eprintln!(
                "sweep run {i}{}: one 5-α run {s:.3}s, five runs {sep:.3}s",
                if i == 0 { " (not counted)" } else { "" }
            );
        }
        let _ = fs::remove_dir_all(&outs);
        let (sm, smin, smax) = stats(&sweep_times);
        let (pm, pmin, pmax) = stats(&separate_times);
        println!(
            "| warm | five runs, `--alpha 0.1` … `--alpha 0.5` | {pm:.3} | {pmin:.3}–{pmax:.3} | 1.00 | – | {:.2} written |",
            5.0 * bytes as f64 / pm / 1e9
        );
        println!(
            "| warm | one run, `--alpha 0.1:0.5:0.1` | {sm:.3} | {smin:.3}–{smax:.3} | {:.2} × five runs | {} | {:.2} written |",
            sm / pm,
            sweep_rss / 1024,
            5.0 * bytes as f64 / sm / 1e9
        );
    }
    if mode == "cold" || mode == "both" {
        let drop_caches = || {
            let _ = Command::new("sync").status();
            fs::write("/proc/sys/vm/drop_caches", "3\n")
                .expect("cold runs drop the page cache: run as root");
        };
        let files = format!(
            "'{}'/*.safetensors '{}'/*.safetensors",
            sft.display(),
            aligned.display()
        );
        let mut dd_times = Vec::new();
        let mut expo_times = Vec::new();
        let mut expo_rss = 0;
        for i in 1..=runs {
            drop_caches();
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!(
                "for f in {files}; do dd if=\"$f\" of=/dev/null bs=16M status=none; done"
            ));
            let (d, _) = run(&mut c);
            let _ = fs::remove_dir_all(&out);
            drop_caches();
            let (es, er) = run(&mut expo_cmd());
            let _ = fs::remove_dir_all(&out);
            dd_times.push(d);
            expo_times.push(es);
            expo_rss = expo_rss.max(er);
            eprintln!(
                "cold run {i}: dd {d:.3}s, expo {es:.3}s ({} MiB peak RSS)",
                er / 1024
            );
        }
        let input = 2 * bytes;
        let (dm, dmin, dmax) = stats(&dd_times);
        let (em, emin, emax) = stats(&expo_times);
        println!(
            "| cold | `dd` of both inputs (disk read rate) | {dm:.3} | {dmin:.3}–{dmax:.3} | 1.00 | – | {:.2} read |",
            input as f64 / dm / 1e9
        );
        println!(
            "| cold | `expo extrapolate --alpha 0.3` | {em:.3} | {emin:.3}–{emax:.3} | {:.0}% of dd rate | {} | {:.2} read |",
            100.0 * dm / em,
            expo_rss / 1024,
            input as f64 / em / 1e9
        );
    }
    if flag("--keep") {
        let kept = dir.keep();
        eprintln!("kept the pair at {}", kept.display());
    }
}
