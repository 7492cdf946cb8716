//! The numbers: every float element must equal the f64 reference rounded once, bit for bit.

use crate::common::*;

/// θ0/θ1 for one dtype pair: hand-picked edge values, pairs on which a shortcut (double
/// rounding through f32, or f32 arithmetic) gives another answer, and a tiny model.
/// Returns (θ0, θ1, number of tricky pairs).
fn numeric_inputs(
    sft: Dtype,
    aligned: Dtype,
    out: Dtype,
    alpha: f64,
    seed: u64,
) -> (Vec<Tensor>, Vec<Tensor>, usize) {
    let mut rng = Rng::new(seed);
    let (mut t0s, mut t1s) = tiny_llama(sft, aligned, false, seed);
    let (e0, e1) = pair_tensors("edge.values", &edge_pairs(aligned), sft, aligned);
    t0s.push(e0);
    t1s.push(e1);
    let tricky = tricky_pairs(sft, aligned, out, alpha, 16, seed);
    if !tricky.is_empty() {
        let (a, b) = pair_tensors("tricky.values", &tricky, sft, aligned);
        t0s.push(a);
        t1s.push(b);
    }
    let random = random_pairs(&mut rng, 7 * 9);
    let v0: Vec<f64> = random.iter().map(|p| p.0).collect();
    let v1: Vec<f64> = random.iter().map(|p| p.1).collect();
    t0s.push(Tensor::float("random.matrix", sft, &[7, 9], &v0));
    t1s.push(Tensor::float("random.matrix", aligned, &[7, 9], &v1));
    (t0s, t1s, tricky.len())
}

/// Runs expo on single-file inputs and compares every tensor with the reference.
fn check_exact(
    sft: Dtype,
    aligned: Dtype,
    dtype_flag: Option<Dtype>,
    alpha: &str,
    tricky_expected: bool,
) {
    let a = alpha_value(alpha);
    let out_dtype = dtype_flag.unwrap_or(aligned);
    let seed =
        (a * 1000.0) as u64 ^ (sft.bitsize() as u64) << 20 ^ (aligned.bitsize() as u64) << 30;
    let (t0s, t1s, tricky) = numeric_inputs(sft, aligned, out_dtype, a, seed);
    if tricky_expected {
        assert!(
            tricky > 0,
            "the test data must contain cases a shortcut gets wrong"
        );
    }
    let s = Scratch::new();
    let sft_dir = single(&s.path("sft"), &t0s);
    let dpo_dir = single(&s.path("dpo"), &t1s);
    let out = s.out("expo");
    // The inputs are deliberately far apart (to reach every rounding case), far beyond a
    // real alignment step; the premise warning is not what these tests are about.
    let mut cmd =
        extrapolate(&sft_dir, &dpo_dir, alpha, &out).args(&["--warn-relative-change", "1e9"]);
    if let Some(d) = dtype_flag {
        cmd = cmd.args(&["--dtype", cli_name(d)]);
    }
    let run = cmd.assert_ok();
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);

    let ck = read_checkpoint(&out);
    assert_eq!(ck.shard_names(), ["model.safetensors"]);
    assert!(ck.index.is_none(), "a single-file output has no index");
    let want = reference(&t0s, &t1s, a, dtype_flag);
    assert_tensors_eq(&ck.tensors, &want, Some((&t0s, &t1s, a)));

    // The data discriminates: the shortcut would have produced other bits.
    if tricky > 0 {
        let t0 = by_name(&t0s)["tricky.values"].values();
        let t1 = by_name(&t1s)["tricky.values"].values();
        let exact: Vec<f64> = t0
            .iter()
            .zip(&t1)
            .map(|(&x, &y)| formula(x, y, a))
            .collect();
        let shortcut: Vec<f64> = match out_dtype {
            Dtype::F32 => t0
                .iter()
                .zip(&t1)
                .map(|(&x, &y)| {
                    let (x, y, c) = (x as f32, y as f32, a as f32);
                    (y + c * (y - x)) as f64
                })
                .collect(),
            _ => exact.iter().map(|&r| r as f32 as f64).collect(),
        };
        let got = &ck.tensors["tricky.values"];
        let shortcut_bits = elem_bits(&encode(out_dtype, &shortcut), out_dtype);
        let got_bits = elem_bits(&got.data, out_dtype);
        let differing = got_bits
            .iter()
            .zip(&shortcut_bits)
            .filter(|(g, s)| g != s)
            .count();
        assert_eq!(
            differing, tricky,
            "expo must differ from the shortcut on every tricky pair"
        );
    }
}

#[test]
fn reference_rounding_is_exact_on_every_16_bit_pattern() {
    for d in [Dtype::BF16, Dtype::F16] {
        let inf = if d == Dtype::BF16 { 0x7f80u64 } else { 0x7c00 };
        for p in 0..inf {
            let v = bits_to_f64(p, d);
            assert_eq!(round_bits(v, d), p, "{d} {p:#x} does not round-trip");
            assert_eq!(round_bits(-v, d), p | 0x8000, "{d} -{p:#x}");
            if p + 1 < inf {
                let next = bits_to_f64(p + 1, d);
                let mid = (v + next) / 2.0;
                let even = if p % 2 == 0 { p } else { p + 1 };
                assert_eq!(round_bits(mid, d), even, "{d} tie above {p:#x}");
                assert_eq!(round_bits(mid.next_down(), d), p, "{d} below tie {p:#x}");
                assert_eq!(round_bits(mid.next_up(), d), p + 1, "{d} above tie {p:#x}");
            }
        }
        // Overflow: the tie between the largest finite value and 2^(emax+1) goes to inf.
        let max = bits_to_f64(inf - 1, d);
        let beyond = max + (max - bits_to_f64(inf - 2, d));
        let mid = (max + beyond) / 2.0;
        assert_eq!(round_bits(mid.next_down(), d), inf - 1);
        assert_eq!(round_bits(mid, d), inf);
        assert!(bits_to_f64(round_bits(f64::NAN, d), d).is_nan());
    }
    // Exact widening, checked against the bit layout for a few patterns.
    assert_eq!(bf16_to_f64(0x0001), 2f64.powi(-133));
    assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
    assert_eq!(f16_to_f64(0x7bff), 65504.0);
    assert_eq!(bf16_to_f64(0x3f81), 1.0 + 2f64.powi(-7));
}

#[test]
fn bf16_alpha_0_3_is_bit_exact() {
    check_exact(Dtype::BF16, Dtype::BF16, None, "0.3", true);
}

#[test]
fn bf16_alpha_2_5_is_bit_exact() {
    check_exact(Dtype::BF16, Dtype::BF16, None, "2.5", true);
}

#[test]
fn bf16_alpha_negative_0_5_is_bit_exact() {
    // θ1 + (−0.5)(θ1 − θ0) of two bf16 values never needs more than f32 precision to land
    // on a bf16 tie, so no double-rounding pair exists here; exact ties do (edge values).
    check_exact(Dtype::BF16, Dtype::BF16, None, "-0.5", false);
}

#[test]
fn f16_alpha_0_3_is_bit_exact() {
    check_exact(Dtype::F16, Dtype::F16, None, "0.3", true);
}

#[test]
fn f16_alpha_2_5_is_bit_exact() {
    check_exact(Dtype::F16, Dtype::F16, None, "2.5", true);
}

#[test]
fn f16_alpha_negative_0_5_is_bit_exact() {
    check_exact(Dtype::F16, Dtype::F16, None, "-0.5", false);
}

#[test]
fn f32_alpha_0_3_is_bit_exact() {
    check_exact(Dtype::F32, Dtype::F32, None, "0.3", true);
}

#[test]
fn f32_alpha_2_5_is_bit_exact() {
    check_exact(Dtype::F32, Dtype::F32, None, "2.5", true);
}

#[test]
fn f32_alpha_negative_0_5_is_bit_exact() {
    check_exact(Dtype::F32, Dtype::F32, None, "-0.5", true);
}

#[test]
fn f64_alpha_0_3_is_bit_exact() {
    check_exact(Dtype::F64, Dtype::F64, None, "0.3", false);
}

#[test]
fn mixed_f32_sft_and_bf16_aligned_give_bf16() {
    check_exact(Dtype::F32, Dtype::BF16, None, "0.3", true);
}

#[test]
fn mixed_f32_sft_and_bf16_aligned_at_negative_alpha_avoid_double_rounding() {
    check_exact(Dtype::F32, Dtype::BF16, None, "-0.5", true);
}

#[test]
fn dtype_f32_flag_computes_exactly_in_f32() {
    check_exact(Dtype::F32, Dtype::BF16, Some(Dtype::F32), "0.3", true);
}

#[test]
fn dtype_f64_flag_keeps_the_exact_f64_result() {
    check_exact(Dtype::BF16, Dtype::BF16, Some(Dtype::F64), "0.3", false);
}

#[test]
fn dtype_bf16_flag_narrows_f32_inputs() {
    check_exact(Dtype::F32, Dtype::F32, Some(Dtype::BF16), "2.5", true);
}

#[test]
fn dtype_flag_with_alpha_zero_converts_theta1() {
    check_exact(Dtype::F32, Dtype::F32, Some(Dtype::BF16), "0", false);
}

/// Known answers worked out by hand, independent of the reference rounding.
#[test]
fn known_answers_round_once_to_nearest_even() {
    let one = 1.0f64;
    let u = 2f64.powi(-7); // bf16 ulp at 1
    let s16 = 2f64.powi(-24); // smallest f16 subnormal
                              // (name, θ0 dtype, θ0, θ1 dtype, θ1, alpha, expected output bits)
    let cases: [(&str, Dtype, f64, Dtype, f64, &str, u64); 7] = [
        // exact 1 + 2^-8 + 2^-30: f32 would round to the tie 1 + 2^-8, then bf16 to 1.0.
        (
            "double_rounding",
            Dtype::F64,
            one + u + 2f64.powi(-29),
            Dtype::BF16,
            one,
            "-0.5",
            0x3f81,
        ),
        // exactly 1 + 2^-8: a tie, to even 1.0 (0x3f80).
        (
            "tie_down",
            Dtype::BF16,
            one + u,
            Dtype::BF16,
            one,
            "-0.5",
            0x3f80,
        ),
        // exactly 1 + 2^-7 + 2^-8: a tie between 0x3f81 and 0x3f82, to even 0x3f82.
        (
            "tie_up",
            Dtype::BF16,
            one,
            Dtype::BF16,
            one + u,
            "0.5",
            0x3f82,
        ),
        // −1 − 2^-8: a tie, to even −1.0.
        (
            "negative_tie",
            Dtype::BF16,
            -(one + u),
            Dtype::BF16,
            -one,
            "-0.5",
            0xbf80,
        ),
        // 1.5 × the smallest f16 subnormal: a tie between 1 and 2 units, to even 2.
        (
            "f16_subnormal_tie",
            Dtype::F16,
            0.0,
            Dtype::F16,
            s16,
            "0.5",
            0x0002,
        ),
        // 1.25 units: down to 1 unit.
        (
            "f16_subnormal_down",
            Dtype::F16,
            0.0,
            Dtype::F16,
            s16,
            "0.25",
            0x0001,
        ),
        // −0 + 0.3·(−0 − (+0)) = −0 + −0 = −0.
        (
            "negative_zero",
            Dtype::F32,
            0.0,
            Dtype::F32,
            -0.0,
            "0.3",
            0x8000_0000,
        ),
    ];
    for (name, d0, v0, d1, v1, alpha, bits) in cases {
        let s = Scratch::new();
        let t0 = Tensor::float(name, d0, &[1], &[v0]);
        let t1 = Tensor::float(name, d1, &[1], &[v1]);
        assert_eq!(t0.values(), [v0], "{name}: θ0 must be exact in {d0}");
        assert_eq!(t1.values(), [v1], "{name}: θ1 must be exact in {d1}");
        let sft = single(&s.path("sft"), std::slice::from_ref(&t0));
        let dpo = single(&s.path("dpo"), std::slice::from_ref(&t1));
        extrapolate(&sft, &dpo, alpha, &s.out("o")).assert_ok();
        let got = &read_checkpoint(&s.out("o")).tensors[name];
        assert_eq!(got.dtype, d1, "{name}");
        assert_eq!(elem_bits(&got.data, d1), [bits], "{name}");
    }
}

/// α = 0 must reproduce θ1 bit for bit, NaN payloads included.
fn check_alpha_zero(d: Dtype, alpha: &str) {
    let (mut t0s, mut t1s) = tiny_llama(d, d, false, 7);
    let n = elem_size(d);
    let specials: Vec<u64> = match d {
        Dtype::BF16 => vec![0x7fc1, 0xffa5, 0x7f80, 0xff80, 0x8000, 0x0001],
        Dtype::F16 => vec![0x7e01, 0xfc33, 0x7c00, 0xfc00, 0x8000, 0x0001],
        _ => vec![
            0x7fc0_0123,
            0xff80_0001,
            0x7f80_0000,
            0x8000_0000,
            0x0000_0001,
            0x8000_0001,
        ],
    };
    let data: Vec<u8> = specials
        .iter()
        .flat_map(|b| b.to_le_bytes()[..n].to_vec())
        .collect();
    t1s.push(Tensor::raw("specials", d, &[specials.len()], data));
    t0s.push(Tensor::float("specials", d, &[specials.len()], &[1.0; 6]));

    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    let out = s.out("o");
    let run = extrapolate(&sft, &dpo, alpha, &out)
        .args(&["--json"])
        .assert_ok();
    let json = run.json.unwrap();
    assert_eq!(json["tensors"]["extrapolated"], 0);
    assert_eq!(json["tensors"]["copied"], t1s.len());

    let ck = read_checkpoint(&out);
    for t in &t1s {
        assert_eq!(ck.tensors[&t.name], *t, "`{}` must be θ1's bytes", t.name);
    }
    // The whole data section equals θ1's: same tensors, same order, same bytes.
    let (theta1, _) = read_shard(&dpo.join("model.safetensors"));
    let data = |f: &ShardFile| f.bytes[8 + f.header_len as usize..].to_vec();
    assert_eq!(data(ck.shard("model.safetensors")), data(&theta1));
}

#[test]
fn alpha_zero_copies_bf16_bytes() {
    check_alpha_zero(Dtype::BF16, "0");
}

#[test]
fn alpha_zero_copies_f16_bytes() {
    check_alpha_zero(Dtype::F16, "0.0");
}

#[test]
fn alpha_zero_copies_f32_bytes() {
    check_alpha_zero(Dtype::F32, "-0");
}

#[test]
fn integer_and_bool_tensors_identical_on_both_sides_are_copied() {
    let (mut t0s, mut t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 3);
    let ints = Tensor::i64(
        "position_ids",
        &[2, 5],
        &[0, 1, 2, 3, 4, -5, i64::MAX, i64::MIN, 7, 9],
    );
    let mask = Tensor::boolean(
        "attention_mask",
        &[6],
        &[true, false, true, true, false, false],
    );
    let bytes = Tensor::raw("codebook", Dtype::U8, &[5], vec![0, 1, 127, 128, 255]);
    for t in [ints, mask, bytes] {
        t0s.push(t.clone());
        t1s.push(t);
    }
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    let run = extrapolate(&sft, &dpo, "0.3", &s.out("o"))
        .arg("--json")
        .assert_ok();
    let json = run.json.unwrap();
    assert_eq!(json["tensors"]["copied"], 3);
    assert_eq!(json["tensors"]["extrapolated"], t1s.len() - 3);
    let ck = read_checkpoint(&s.out("o"));
    for name in ["position_ids", "attention_mask", "codebook"] {
        assert_eq!(ck.tensors[name], by_name(&t1s)[name]);
    }
    assert_tensors_eq(
        &ck.tensors,
        &reference(&t0s, &t1s, 0.3, None),
        Some((&t0s, &t1s, 0.3)),
    );
}

#[test]
fn tied_embeddings_without_lm_head_work() {
    let (t0s, t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, true, 11);
    assert!(t1s.iter().all(|t| t.name != "lm_head.weight"));
    let s = Scratch::new();
    let sft = sharded(&s.path("sft"), &split(&t0s, 2));
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 3));
    extrapolate(&sft, &dpo, "0.3", &s.out("o")).assert_ok();
    let ck = read_checkpoint(&s.out("o"));
    assert!(!ck.tensors.contains_key("lm_head.weight"));
    assert!(ck.tensors.contains_key("model.embed_tokens.weight"));
    assert_tensors_eq(
        &ck.tensors,
        &reference(&t0s, &t1s, 0.3, None),
        Some((&t0s, &t1s, 0.3)),
    );
}

#[test]
fn scalars_and_empty_tensors() {
    let s = Scratch::new();
    let t0s = vec![
        Tensor::float("scalar", Dtype::BF16, &[], &[1.5]),
        Tensor::float("empty", Dtype::F16, &[0], &[]),
        Tensor::float("empty.matrix", Dtype::F32, &[3, 0], &[]),
        Tensor::float("w", Dtype::F32, &[2], &[1.0, -2.0]),
    ];
    let t1s = vec![
        Tensor::float("scalar", Dtype::BF16, &[], &[1.75]),
        Tensor::float("empty", Dtype::F16, &[0], &[]),
        Tensor::float("empty.matrix", Dtype::F32, &[3, 0], &[]),
        Tensor::float("w", Dtype::F32, &[2], &[1.25, -2.5]),
    ];
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    extrapolate(&sft, &dpo, "2.5", &s.out("o")).assert_ok();
    let ck = read_checkpoint(&s.out("o"));
    assert_tensors_eq(
        &ck.tensors,
        &reference(&t0s, &t1s, 2.5, None),
        Some((&t0s, &t1s, 2.5)),
    );
}

#[test]
fn non_finite_inputs_stay_non_finite_with_a_warning() {
    let s = Scratch::new();
    let t0s = vec![Tensor::float(
        "w",
        Dtype::BF16,
        &[4],
        &[1.0, 1.0, 2.0, f64::NAN],
    )];
    let t1s = vec![Tensor::float(
        "w",
        Dtype::BF16,
        &[4],
        &[f64::INFINITY, f64::NAN, 2.5, 1.0],
    )];
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    let run = extrapolate(&sft, &dpo, "0.3", &s.out("o")).assert_ok();
    assert!(
        run.stderr.contains("warning: ") && run.stderr.contains("`w`") && run.stderr.contains('3'),
        "expected a warning about 3 inherited non-finite values:\n{}",
        run.stderr
    );
    let ck = read_checkpoint(&s.out("o"));
    assert_tensors_eq(&ck.tensors, &reference(&t0s, &t1s, 0.3, None), None);
}

/// Random bf16 bits with a bounded exponent, generated directly (fast for big tensors).
fn random_bf16_bits(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|_| {
            let r = rng.next_u64();
            let sign = (r & 1) as u16;
            let exp = 0x70 + ((r >> 1) % 0x20) as u16;
            let mant = ((r >> 8) & 0x7f) as u16;
            ((sign << 15) | (exp << 7) | mant).to_le_bytes()
        })
        .collect()
}

#[test]
fn threads_1_output_equals_default_threads_output() {
    // Big enough to be cut into several chunks (2^20 elements; 4 MiB for copies).
    let n = (1 << 20) + 777;
    let mut rng = Rng::new(99);
    let big0 = Tensor::raw(
        "big.weight",
        Dtype::BF16,
        &[n],
        random_bf16_bits(&mut rng, n),
    );
    let big1 = Tensor::raw(
        "big.weight",
        Dtype::BF16,
        &[n],
        random_bf16_bits(&mut rng, n),
    );
    let blob_len = (4 << 20) + 333;
    let blob = Tensor::raw(
        "big.codes",
        Dtype::U8,
        &[blob_len],
        (0..blob_len).map(|i| (i * 7 % 251) as u8).collect(),
    );
    let (mut t0s, mut t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 5);
    t0s.extend([big0, blob.clone()]);
    t1s.extend([big1, blob]);
    let s = Scratch::new();
    let sft = sharded(&s.path("sft"), &split(&t0s, 2));
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));

    extrapolate(&sft, &dpo, "0.3", &s.out("default")).assert_ok();
    extrapolate(&sft, &dpo, "0.3", &s.out("one"))
        .args(&["--threads", "1"])
        .assert_ok();
    extrapolate(&sft, &dpo, "0.3", &s.out("three"))
        .args(&["-j", "3"])
        .assert_ok();
    let default = weight_files(&s.out("default"));
    assert_eq!(default.len(), 3, "two shards and the index");
    assert_eq!(weight_files(&s.out("one")), default);
    assert_eq!(weight_files(&s.out("three")), default);

    // Spot-check the big tensor against the reference, including both sides of the chunk
    // boundary, and the small tensors in full.
    let ck = read_checkpoint(&s.out("default"));
    let got = elem_bits(&ck.tensors["big.weight"].data, Dtype::BF16);
    let (v0, v1) = (
        by_name(&t0s)["big.weight"].values(),
        by_name(&t1s)["big.weight"].values(),
    );
    let boundary = 1 << 20;
    let sample = (0..n)
        .step_by(61)
        .chain(boundary - 100..boundary + 100)
        .chain(n - 50..n);
    for i in sample {
        let want = round_bits(formula(v0[i], v1[i], 0.3), Dtype::BF16);
        assert_eq!(got[i], want, "big.weight[{i}]");
    }
    assert_eq!(ck.tensors["big.codes"], by_name(&t1s)["big.codes"]);
    let small: Vec<Tensor> = t1s
        .iter()
        .filter(|t| !t.name.starts_with("big."))
        .cloned()
        .collect();
    let mut got_small = ck.tensors.clone();
    got_small.retain(|k, _| !k.starts_with("big."));
    assert_tensors_eq(&got_small, &reference(&t0s, &small, 0.3, None), None);
}

#[test]
fn alpha_sweep_outputs_equal_single_runs() {
    let (t0s, t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 12);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    extrapolate(&sft, &dpo, "0,0.3,-0.5,2.5", &s.out("sweep-{alpha}")).assert_ok();
    let alphas = ["0", "0.3", "-0.5", "2.5"];
    let mut want_dirs: Vec<String> = alphas.iter().map(|a| format!("sweep-{a}")).collect();
    want_dirs.sort();
    assert_eq!(list_dir(&s.outputs()), want_dirs);
    for a in alphas {
        let single_run = s.out(&format!("single-{a}"));
        extrapolate(&sft, &dpo, a, &single_run).assert_ok();
        let swept = s.out(&format!("sweep-{a}"));
        assert_eq!(weight_files(&swept), weight_files(&single_run), "alpha {a}");
        let ck = read_checkpoint(&swept);
        let alpha = alpha_value(a);
        assert_tensors_eq(
            &ck.tensors,
            &reference(&t0s, &t1s, alpha, None),
            Some((&t0s, &t1s, alpha)),
        );
    }
}

#[test]
fn per_module_alpha_and_skip() {
    let (t0s, t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 13);
    let s = Scratch::new();
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    let run = extrapolate(&sft, &dpo, "0.3", &s.out("o"))
        .args(&[
            "--skip",
            "^lm_head",
            "--alpha-for",
            "self_attn=x0.5",
            "--alpha-for",
            "layers\\.1\\.=2.5",
            "--alpha-for",
            "nothing_matches_this=1",
        ])
        .assert_ok();
    assert!(run.stderr.contains("warning: ") && run.stderr.contains("nothing_matches_this"));
    let ck = read_checkpoint(&s.out("o"));
    for (t0, t1) in t0s.iter().zip(&t1s) {
        let n = &t1.name;
        // --skip first, then the first matching rule, else the run's α.
        let alpha = if n.starts_with("lm_head") {
            0.0
        } else if n.contains("self_attn") {
            0.5 * 0.3
        } else if n.contains("layers.1.") {
            2.5
        } else {
            0.3
        };
        let want = reference(
            std::slice::from_ref(t0),
            std::slice::from_ref(t1),
            alpha,
            None,
        );
        let got = by_name(std::slice::from_ref(&ck.tensors[n]));
        let inputs = (std::slice::from_ref(t0), std::slice::from_ref(t1), alpha);
        assert_tensors_eq(&got, &want, Some((inputs.0, inputs.1, inputs.2)));
    }
}

/// Every (tensor, action) pair anywhere in a `--dry-run --json` document.
fn dry_run_actions(doc: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match doc {
        serde_json::Value::Object(map) => {
            if let (Some(name), Some(action)) = (map.get("name"), map.get("action")) {
                out.push((
                    name.as_str().unwrap_or_default().to_string(),
                    action.as_str().unwrap_or_default().to_string(),
                ));
            }
            map.values().for_each(|v| dry_run_actions(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dry_run_actions(v, out)),
        _ => {}
    }
}

#[test]
fn dry_run_json_names_each_tensors_action() {
    let s = Scratch::new();
    let (t0s, mut t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 91);
    t1s.push(Tensor::i64("position_ids", &[4], &[0, 1, 2, 3]));
    let mut t0s = t0s;
    t0s.push(Tensor::i64("position_ids", &[4], &[0, 1, 2, 3]));
    let sft = single(&s.path("sft"), &t0s);
    let dpo = single(&s.path("dpo"), &t1s);
    let out = s.out("o");
    let actions = |extra: &[&str]| {
        let run = extrapolate(&sft, &dpo, "0.3", &out)
            .args(&["--dry-run", "--json", "--skip", "embed_tokens"])
            .args(extra)
            .assert_ok();
        let doc = single_json_object(&run.stdout, "dry run");
        let mut found = Vec::new();
        dry_run_actions(&doc, &mut found);
        found.sort();
        found.dedup();
        found
    };
    let plain = actions(&[]);
    assert!(
        plain.contains(&("model.embed_tokens.weight".into(), "copy".into())),
        "{plain:?}"
    );
    assert!(
        plain.contains(&("position_ids".into(), "copy".into())),
        "{plain:?}"
    );
    assert!(
        plain.contains(&("lm_head.weight".into(), "extrapolate".into())),
        "{plain:?}"
    );
    assert_eq!(plain.len(), t1s.len(), "{plain:?}");
    let cast = actions(&["--dtype", "f32"]);
    assert!(
        cast.contains(&("model.embed_tokens.weight".into(), "convert".into())),
        "{cast:?}"
    );
    assert!(
        cast.contains(&("lm_head.weight".into(), "extrapolate".into())),
        "{cast:?}"
    );
    s.assert_no_output();
}

/// Checks a `--json` record's `shards[].bytes`, `tensor_bytes` and `output_bytes` against
/// the files of `dir` and against `tensor_bytes` computed from the reference tensors.
fn assert_byte_counts(record: &serde_json::Value, dir: &std::path::Path, tensor_bytes: u64) {
    let ctx = format!("{}: {record:#}", dir.display());
    let ck = read_checkpoint(dir);
    let shards = record["shards"].as_array().expect("shards");
    let listed: Vec<&str> = shards.iter().map(|s| s["file"].as_str().unwrap()).collect();
    assert_eq!(listed, ck.shard_names(), "{ctx}");
    let mut files = 0;
    for shard in shards {
        let name = shard["file"].as_str().unwrap();
        let len = std::fs::metadata(dir.join(name)).unwrap().len();
        assert_eq!(shard["bytes"], len, "{ctx}: {name}");
        files += len;
    }
    let index = dir.join("model.safetensors.index.json");
    let index_len = if index.exists() {
        std::fs::metadata(&index).unwrap().len()
    } else {
        0
    };
    assert_eq!(record["output_bytes"], files + index_len, "{ctx}");
    let on_disk: u64 = ck
        .shards
        .iter()
        .map(|s| s.bytes.len() as u64 - 8 - s.header_len)
        .sum();
    assert_eq!(on_disk, tensor_bytes, "{ctx}: data on disk");
    assert_eq!(record["tensor_bytes"], tensor_bytes, "{ctx}");
}

/// `--json`'s byte counts are the real sizes on disk, for one output and for each output of
/// a sweep, resharded or not, with and without `--dtype`; the dry run promises the same.
#[test]
fn json_byte_counts_are_the_sizes_on_disk() {
    // bf16 with f32 norms and an int buffer: three element sizes.
    let (mut t0s, mut t1s) = tiny_llama(Dtype::BF16, Dtype::BF16, false, 34);
    for (t0, t1) in t0s.iter_mut().zip(t1s.iter_mut()) {
        if t0.name.ends_with("norm.weight") {
            *t0 = t0.cast(Dtype::F32);
            *t1 = t1.cast(Dtype::F32);
        }
    }
    let ids = Tensor::i64("model.rotary_emb.ids", &[4], &[0, 1, 2, 3]);
    t0s.push(ids.clone());
    t1s.push(ids);
    let s = Scratch::new();
    let sft = sharded(&s.path("sft"), &split(&t0s, 2));
    let dpo = sharded(&s.path("dpo"), &split(&t1s, 2));
    let cases: [(&str, &[&str], Option<Dtype>); 4] = [
        ("mirrored", &[], None),
        ("resharded", &["--max-shard-size", "700"], None),
        ("single", &["--max-shard-size", "1GB"], None),
        ("f32", &["--dtype", "f32"], Some(Dtype::F32)),
    ];
    for (name, extra, out) in cases {
        let expected: u64 = reference(&t0s, &t1s, 0.3, out)
            .values()
            .map(|t| t.nbytes() as u64)
            .sum();
        let dir = s.out(name);
        let plan = extrapolate(&sft, &dpo, "0.3", &dir)
            .args(extra)
            .args(&["--dry-run", "--json"])
            .assert_ok()
            .json
            .unwrap();
        let run = extrapolate(&sft, &dpo, "0.3", &dir)
            .args(extra)
            .arg("--json")
            .assert_ok()
            .json
            .unwrap();
        assert_byte_counts(&run, &dir, expected);
        let ck = read_checkpoint(&dir);
        if name == "resharded" {
            assert!(ck.shards.len() > 2, "{name}: {}", ck.shards.len());
        }
        if name == "single" {
            assert!(ck.index.is_none(), "{name}");
        }
        // The plan's shard list carries per-tensor entries; its byte counts are the same.
        let plan_shards: Vec<_> = plan["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["file"].clone(), s["bytes"].clone()))
            .collect();
        let run_shards: Vec<_> = run["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["file"].clone(), s["bytes"].clone()))
            .collect();
        assert_eq!(plan_shards, run_shards, "{name}");
        assert_eq!(plan["output_bytes"], run["output_bytes"], "{name}");
        assert_eq!(plan["tensor_bytes"], run["tensor_bytes"], "{name}");
    }

    // A sweep: each output's record matches its own directory.
    let template = s.out("sweep-{alpha}");
    let run = extrapolate(&sft, &dpo, "0.1,0.3", &template)
        .args(&["--max-shard-size", "700", "--json"])
        .assert_ok()
        .json
        .unwrap();
    let outputs = run["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    for (record, alpha) in outputs.iter().zip(["0.1", "0.3"]) {
        let expected: u64 = reference(&t0s, &t1s, alpha_value(alpha), None)
            .values()
            .map(|t| t.nbytes() as u64)
            .sum();
        assert_byte_counts(record, &s.out(&format!("sweep-{alpha}")), expected);
    }
}
