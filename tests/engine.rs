//! The engine's limits and rules seen from the command line: non-finite inputs, the
//! open-files limit of sweeps, and the worker threads.

use std::path::Path;

use crate::common::*;

// ---------------------------------------------------------------------------------------
// Non-finite inputs
// ---------------------------------------------------------------------------------------

/// (θ0, θ1) pairs with a non-finite value on one side or both.
fn non_finite_pairs() -> Vec<(f64, f64)> {
    let (inf, nan) = (f64::INFINITY, f64::NAN);
    vec![
        (inf, inf),
        (-inf, -inf),
        (inf, -inf),
        (-inf, inf),
        (nan, 1.5),
        (1.5, nan),
        (nan, nan),
        (inf, 2.5),
        (-0.75, -inf),
        (nan, inf),
    ]
}

/// Where θ0 or θ1 is ±inf or NaN, the output is θ1's element: its very bits in θ1's dtype
/// (so inf on both sides stays inf, not inf − inf = NaN), converted with `--dtype`; the
/// other elements follow the formula; the warning counts the kept elements.
#[test]
fn non_finite_inputs_keep_the_aligned_element() {
    for (dtype, alpha) in [
        (Dtype::BF16, "0.3"),
        (Dtype::F16, "-2"),
        (Dtype::F32, "0.5"),
        (Dtype::F64, "-0.5"),
    ] {
        let s = Scratch::new();
        let specials = non_finite_pairs();
        // Specials at the start, between and after finite values, past a SIMD block.
        let mut pairs: Vec<(f64, f64)> = (0..70)
            .map(|i| (0.01 * i as f64, 0.01 * i as f64 + 0.005))
            .collect();
        for (k, &p) in specials.iter().enumerate() {
            pairs.insert(k * 7, p);
        }
        let (t0, t1) = pair_tensors("w", &pairs, dtype, dtype);
        let (t0s, t1s) = (vec![t0.clone()], vec![t1.clone()]);
        let sft = single(&s.path("sft"), &t0s);
        let dpo = single(&s.path("dpo"), &t1s);
        let run = extrapolate(&sft, &dpo, alpha, &s.out("o")).assert_ok();
        assert!(
            run.stderr.contains(&format!(
                "tensor `w`: {} values are infinite or NaN",
                specials.len()
            )),
            "{dtype}: expected a warning counting {} values:\n{}",
            specials.len(),
            run.stderr
        );
        let a = alpha_value(alpha);
        let got = read_checkpoint(&s.out("o"));
        assert_tensors_eq(
            &got.tensors,
            &reference(&t0s, &t1s, a, None),
            Some((&t0s, &t1s, a)),
        );
        // Bit for bit, NaNs included: θ1's elements are copied.
        let (gb, b1) = (
            elem_bits(&got.tensors["w"].data, dtype),
            elem_bits(&t1.data, dtype),
        );
        let v0 = t0.values();
        for (i, v1) in t1.values().iter().enumerate() {
            if !v0[i].is_finite() || !v1.is_finite() {
                assert_eq!(gb[i], b1[i], "{dtype} [{i}]: not θ1's bits");
            }
        }

        // With --dtype: θ1's element converted (inf stays inf, a finite θ1 rounded once).
        let wide = if dtype == Dtype::F64 {
            Dtype::BF16
        } else {
            Dtype::F64
        };
        extrapolate(&sft, &dpo, alpha, &s.out("converted"))
            .args(&["--dtype", cli_name(wide)])
            .assert_ok();
        let got = read_checkpoint(&s.out("converted"));
        assert_tensors_eq(
            &got.tensors,
            &reference(&t0s, &t1s, a, Some(wide)),
            Some((&t0s, &t1s, a)),
        );
    }
}

/// A finite θ1 that does not fit the output dtype is an overflow error even where θ0 is
/// not finite: the element is θ1's, converted, and the conversion overflows.
#[test]
fn a_kept_aligned_element_that_overflows_the_output_dtype_is_an_error() {
    let s = Scratch::new();
    let (t0, t1) = pair_tensors(
        "w",
        &[(f64::INFINITY, 1e30), (1.0, 1.25)],
        Dtype::F32,
        Dtype::F32,
    );
    let sft = single(&s.path("sft"), &[t0]);
    let dpo = single(&s.path("dpo"), &[t1]);
    extrapolate(&sft, &dpo, "0.3", &s.out("o"))
        .args(&["--dtype", "f16"])
        .assert_fails(1, &["`w`", "1 of 2 values", "F16"]);
    s.assert_no_output();
}

// ---------------------------------------------------------------------------------------
// Open files
// ---------------------------------------------------------------------------------------

/// A checkpoint of `shards` shards of one small bf16 tensor each.
fn many_shards(dir: &Path, shards: usize, seed: u64, base: Option<&[Tensor]>) -> Vec<Tensor> {
    let mut rng = Rng::new(seed);
    let tensors: Vec<Tensor> = (0..shards)
        .map(|k| {
            let name = format!("model.layers.{k}.weight");
            let values: Vec<f64> = match base {
                None => (0..64).map(|_| rng.unit() - 0.5).collect(),
                Some(b) => b[k]
                    .values()
                    .iter()
                    .map(|v| v + (rng.unit() - 0.5) * 1e-2)
                    .collect(),
            };
            Tensor::float(&name, Dtype::BF16, &[8, 8], &values)
        })
        .collect();
    sharded(dir, &split(&tensors, shards));
    tensors
}

fn twelve_alphas() -> (String, Vec<String>) {
    let alphas: Vec<String> = (1..=12).map(|k| format!("0.{k:02}")).collect();
    (alphas.join(","), alphas)
}

fn hard_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_max
}

fn check_sweep(s: &Scratch, t0s: &[Tensor], t1s: &[Tensor], alphas: &[String]) {
    for a in alphas {
        let ck = read_checkpoint(&s.out(&format!("sweep-{}", alpha_value(a))));
        assert_eq!(ck.shards.len(), t1s.len(), "alpha {a}");
        let alpha = alpha_value(a);
        assert_tensors_eq(
            &ck.tensors,
            &reference(t0s, t1s, alpha, None),
            Some((t0s, t1s, alpha)),
        );
    }
}

/// 12 outputs × 8 shards = 96 output files, under a limit of 64 open files (soft and
/// hard): the files are opened shard by shard, so the sweep completes.
#[test]
fn a_sweep_writes_more_files_than_the_open_files_limit() {
    let s = Scratch::new();
    let t0s = many_shards(&s.path("sft"), 8, 1, None);
    let t1s = many_shards(&s.path("dpo"), 8, 2, Some(&t0s));
    let (list, alphas) = twelve_alphas();
    extrapolate(
        &s.path("sft"),
        &s.path("dpo"),
        &list,
        &s.out("sweep-{alpha}"),
    )
    .ulimit("-n 64")
    .assert_ok();
    check_sweep(&s, &t0s, &t1s, &alphas);
}

/// A soft limit below what the sweep needs, under a high hard limit: expo raises the soft
/// limit and the sweep completes.
#[test]
fn a_sweep_raises_a_low_soft_open_files_limit() {
    if hard_open_files_limit() < 1024 {
        eprintln!("skipped: the hard open-files limit is below 1024");
        return;
    }
    let s = Scratch::new();
    let t0s = many_shards(&s.path("sft"), 8, 3, None);
    let t1s = many_shards(&s.path("dpo"), 8, 4, Some(&t0s));
    let (list, alphas) = twelve_alphas();
    extrapolate(
        &s.path("sft"),
        &s.path("dpo"),
        &list,
        &s.out("sweep-{alpha}"),
    )
    .args(&["--threads", "2"])
    .ulimit("-Sn 24")
    .assert_ok();
    check_sweep(&s, &t0s, &t1s, &alphas);
}

/// More outputs than the hard limit allows at once: an error before any work, in a dry
/// run too, that names the limit and how many outputs fit.
#[test]
fn a_sweep_that_cannot_fit_the_open_files_limit_fails_before_any_work() {
    let s = Scratch::new();
    let t0s = many_shards(&s.path("sft"), 2, 5, None);
    many_shards(&s.path("dpo"), 2, 6, Some(&t0s));
    let (list, _) = twelve_alphas();
    for dry_run in [true, false] {
        let mut run = extrapolate(
            &s.path("sft"),
            &s.path("dpo"),
            &list,
            &s.out("sweep-{alpha}"),
        )
        .ulimit("-n 24");
        if dry_run {
            run = run.arg("--dry-run");
        }
        run.assert_fails(
            1,
            &[
                "writing 12 outputs at once",
                "open-files limit is 24",
                "ulimit -n",
            ],
        );
        s.assert_no_output();
    }
}

// ---------------------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------------------

#[test]
fn too_many_threads_are_capped_with_a_warning() {
    let s = Scratch::new();
    let (t0s, t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 7);
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    let run = extrapolate(&sft, &dpo, "0.3", &s.out("o"))
        .args(&["--threads", "10000"])
        .assert_ok();
    assert!(
        run.stderr.contains("warning: --threads 10000 is more than")
            && run.stderr.contains("threads"),
        "{}",
        run.stderr
    );
    let ck = read_checkpoint(&s.out("o"));
    assert_tensors_eq(&ck.tensors, &reference(&t0s, &t1s, 0.3, None), None);

    let run = expo(&["diff", "--threads", "65535"])
        .arg(&sft)
        .arg(&dpo)
        .assert_ok();
    assert!(
        run.stderr.contains("warning: --threads 65535 is more than"),
        "{}",
        run.stderr
    );
}

/// SIGTERM while the worker threads start: expo stops there, exit 130, nothing written.
#[test]
fn sigterm_while_the_threads_start_is_honoured() {
    let s = Scratch::new();
    let (t0s, t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 8);
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    let mut args: Vec<std::ffi::OsString> =
        ["extrapolate", "--alpha", "0.3", "--threads", "8", "--sft"]
            .map(Into::into)
            .into();
    args.extend([
        sft.into_os_string(),
        "--aligned".into(),
        dpo.into_os_string(),
        "--output".into(),
        s.out("o").into_os_string(),
    ]);
    let paused = Paused::start(&args, "pool-start", &s.path("failpoints"));
    paused.signal(libc::SIGTERM);
    let (code, stderr) = paused.wait();
    assert_eq!(code, 130, "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    s.assert_no_output();
}
