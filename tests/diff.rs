//! `expo diff`: numbers against an independent f64 reference computed here, self-diff,
//! the JSON schema, the three-checkpoint table, determinism across thread counts, and
//! errors.
//!
//! The reference decodes the stored bytes with tests/common's exact widening, forms
//! every term in f64 and sums the terms sorted by magnitude, smallest first — a different
//! method from expo's blocked compensated summation.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::common::{expo, is_float, sharded_n, single, Dtype, Rng, Tensor as T};

/// θ0 and θ1 of a small LLaMA-shaped model: mixed float dtypes on the two sides, an
/// identical tensor, an all-zero tensor, and two non-float tensors (one identical, one not).
fn pair(seed: u64, delta: f64) -> (Vec<T>, Vec<T>) {
    let mut rng = Rng::new(seed);
    let mut t0 = Vec::new();
    let mut t1 = Vec::new();
    let mut float = |name: &str, d0: Dtype, d1: Dtype, shape: &[usize], scale: f64| {
        let n = shape.iter().product();
        let a = T::float(name, d0, shape, &rng.vec(n, scale));
        let b: Vec<f64> = a
            .values()
            .iter()
            .map(|&x| x + delta * scale * rng.unit())
            .collect();
        t1.push(a.with(d1, &b));
        t0.push(a);
    };
    float(
        "model.embed_tokens.weight",
        Dtype::F32,
        Dtype::BF16,
        &[64, 48],
        0.02,
    );
    float(
        "model.layers.0.self_attn.q_proj.weight",
        Dtype::BF16,
        Dtype::BF16,
        &[48, 48],
        0.03,
    );
    float(
        "model.layers.0.input_layernorm.weight",
        Dtype::F16,
        Dtype::F16,
        &[48],
        1.0,
    );
    float(
        "model.layers.1.mlp.up_proj.weight",
        Dtype::F64,
        Dtype::F64,
        &[96, 48],
        0.02,
    );
    float("lm_head.weight", Dtype::F32, Dtype::F32, &[64, 48], 0.02);
    let same = T::float(
        "model.layers.1.input_layernorm.weight",
        Dtype::BF16,
        &[48],
        &rng.vec(48, 1.0),
    );
    t0.push(same.clone());
    t1.push(same);
    let zero = T::float("model.layers.1.mlp.bias", Dtype::F32, &[8], &[0.0; 8]);
    t0.push(zero.clone());
    t1.push(zero);
    let ints: Vec<i64> = (0..8).collect();
    let pos = T::i64("model.rotary.positions", &[8], &ints);
    t0.push(pos.clone());
    t1.push(pos);
    let mask0 = [true; 16];
    let mut mask1 = mask0;
    for i in [2, 5, 11] {
        mask1[i] = false;
    }
    t0.push(T::boolean("model.mask", &[16], &mask0));
    t1.push(T::boolean("model.mask", &[16], &mask1));
    (t0, t1)
}

/// Sum of terms sorted by magnitude, smallest first.
fn sorted_sum(mut terms: Vec<f64>) -> f64 {
    terms.sort_by(|a, b| a.abs().total_cmp(&b.abs()));
    terms.iter().sum()
}

/// The reference sums of one tensor pair: (Σ(b−a)², Σa², Σb², Σab, n, changed).
#[derive(Debug, Clone, Copy)]
struct Ref {
    dd: f64,
    aa: f64,
    bb: f64,
    ab: f64,
    n: usize,
    changed: usize,
}

impl Ref {
    fn of(a: &T, b: &T) -> Ref {
        let (x, y) = (a.values(), b.values());
        let pairs: Vec<(f64, f64)> = x
            .iter()
            .zip(&y)
            .filter(|(p, q)| p.is_finite() && q.is_finite())
            .map(|(&p, &q)| (p, q))
            .collect();
        Ref {
            dd: sorted_sum(pairs.iter().map(|(p, q)| (q - p) * (q - p)).collect()),
            aa: sorted_sum(pairs.iter().map(|(p, _)| p * p).collect()),
            bb: sorted_sum(pairs.iter().map(|(_, q)| q * q).collect()),
            ab: sorted_sum(pairs.iter().map(|(p, q)| p * q).collect()),
            n: x.len(),
            changed: x
                .iter()
                .zip(&y)
                .filter(|(p, q)| p != q && !(p.is_nan() && q.is_nan()))
                .count(),
        }
    }

    fn frobenius(&self) -> f64 {
        self.dd.sqrt()
    }

    fn cosine(&self) -> Option<f64> {
        (self.aa > 0.0 && self.bb > 0.0).then(|| self.ab / (self.aa.sqrt() * self.bb.sqrt()))
    }
}

/// Relative agreement (both zero counts as agreement).
#[track_caller]
fn close(got: &Value, want: f64, tol: f64, what: &str) {
    let got = got
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: {got} is not a number"));
    let err = if got == want {
        0.0
    } else {
        (got - want).abs() / want.abs().max(f64::MIN_POSITIVE)
    };
    assert!(
        err <= tol,
        "{what}: expo {got:e}, reference {want:e} (rel {err:e})"
    );
}

/// Runs `expo diff ARGS --json` and parses stdout.
fn diff_json(args: &[&Path], extra: &[&str]) -> Value {
    expo(&["diff"])
        .args(args)
        .args(extra)
        .args(&["--json", "--quiet"])
        .assert_ok()
        .json
        .expect("stdout is one JSON object")
}

/// Runs `expo diff ARGS` and returns (stdout, stderr).
fn diff_text(args: &[&Path], extra: &[&str]) -> (String, String) {
    let out = expo(&["diff"]).args(args).args(extra).assert_ok();
    (out.stdout, out.stderr)
}

/// The tolerance the issue asks for is 1e-9; expo is far tighter.
const TOL: f64 = 1e-12;

#[test]
fn numbers_match_an_independent_f64_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let (t0, t1) = pair(1, 1e-2);
    let a = sharded_n(&tmp.path().join("sft"), &t0, 2);
    let b = single(&tmp.path().join("dpo"), &t1);
    let v = expo_pair(&a, &b);

    let refs: BTreeMap<String, Ref> = t0
        .iter()
        .zip(&t1)
        .filter(|(x, _)| is_float(x.dtype))
        .map(|(x, y)| (x.name.clone(), Ref::of(x, y)))
        .collect();

    // Per tensor, in θ1's order (the order of its file), float tensors only.
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), refs.len());
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let r = refs[name];
        let n = r.n as f64;
        close(&t["frobenius"], r.frobenius(), TOL, name);
        close(
            &t["normalized_frobenius"],
            r.frobenius() / n.sqrt(),
            TOL,
            name,
        );
        if r.dd == 0.0 {
            assert_eq!(t["relative_change"], 0.0, "{name}");
        } else {
            close(
                &t["relative_change"],
                r.frobenius() / r.aa.sqrt(),
                TOL,
                name,
            );
        }
        match r.cosine() {
            Some(c) => close(&t["cosine"], c, TOL, name),
            None => assert!(t["cosine"].is_null(), "{name}: {}", t["cosine"]),
        }
        close(&t["changed_fraction"], r.changed as f64 / n, 0.0, name);
        assert_eq!(t["changed_elements"], r.changed as u64, "{name}");
        assert_eq!(t["elements"], r.n as u64, "{name}");
        assert_eq!(t["identical"], r.changed == 0, "{name}");
        close(&t["base_norm"], r.aa.sqrt(), TOL, name);
        close(&t["target_norm"], r.bb.sqrt(), TOL, name);
    }
    let mixed = tensors
        .iter()
        .find(|t| t["name"] == "model.embed_tokens.weight")
        .unwrap();
    assert_eq!(mixed["dtypes"], serde_json::json!(["F32", "BF16"]));

    // Summary in the paper's terms.
    let s = &v["summary"];
    let nonempty: Vec<&Ref> = refs.values().filter(|r| r.n > 0).collect();
    let mean = |f: &dyn Fn(&Ref) -> f64| {
        sorted_sum(nonempty.iter().map(|r| f(r)).collect()) / nonempty.len() as f64
    };
    close(&s["mean_frobenius"], mean(&|r| r.frobenius()), TOL, "mean");
    close(
        &s["mean_normalized_frobenius"],
        mean(&|r| r.frobenius() / (r.n as f64).sqrt()),
        TOL,
        "mean normalized",
    );
    let dd = sorted_sum(refs.values().map(|r| r.dd).collect());
    let aa = sorted_sum(refs.values().map(|r| r.aa).collect());
    let bb = sorted_sum(refs.values().map(|r| r.bb).collect());
    let ab = sorted_sum(refs.values().map(|r| r.ab).collect());
    close(&s["delta_norm"], dd.sqrt(), TOL, "delta_norm");
    close(&s["base_norm"], aa.sqrt(), TOL, "base_norm");
    close(&s["target_norm"], bb.sqrt(), TOL, "target_norm");
    close(
        &s["relative_change"],
        dd.sqrt() / aa.sqrt(),
        TOL,
        "relative_change",
    );
    close(&s["cosine"], ab / (aa.sqrt() * bb.sqrt()), TOL, "cosine");
    // The bf16 layernorm, the zero bias and the i64 positions are identical.
    assert_eq!(s["identical_tensors"], 3);
    assert_eq!(s["tensors"], 9);
    assert_eq!(s["float_tensors"], 7);
    assert_eq!(s["non_float_tensors"], 2);
    let changed: usize = refs.values().map(|r| r.changed).sum();
    let elements: usize = refs.values().map(|r| r.n).sum();
    assert_eq!(s["changed_elements"], changed as u64);
    assert_eq!(s["elements"], elements as u64);
    assert_eq!(s["nonfinite_elements"], 0);
    assert_eq!(s["premise_doubtful"], true, "Δ is 1e-2 relative");

    // Non-float tensors: compared on the bytes, reported, not in the norms.
    let others = v["non_float_tensors"].as_array().unwrap();
    let by: BTreeMap<&str, &Value> = others
        .iter()
        .map(|o| (o["name"].as_str().unwrap(), o))
        .collect();
    assert_eq!(by["model.rotary.positions"]["identical"], true);
    assert_eq!(by["model.mask"]["identical"], false);
    assert_eq!(by["model.mask"]["changed_elements"], 3);
    assert_eq!(by["model.mask"]["dtype"], "BOOL");

    // Per-layer roll-up: layers 0 and 1, then the tensors outside any layer.
    let layers = v["layers"].as_array().unwrap();
    let names: Vec<&Value> = layers.iter().map(|l| &l["name"]).collect();
    assert_eq!(
        names,
        [
            &Value::from("model.layers.0"),
            &Value::from("model.layers.1"),
            &Value::Null
        ]
    );
    for (layer, prefix) in layers
        .iter()
        .zip(["model.layers.0.", "model.layers.1.", ""])
    {
        let members: Vec<&Ref> = refs
            .iter()
            .filter(|(n, _)| {
                if prefix.is_empty() {
                    !n.starts_with("model.layers.")
                } else {
                    n.starts_with(prefix)
                }
            })
            .map(|(_, r)| r)
            .collect();
        assert_eq!(layer["tensors"], members.len());
        let dd = sorted_sum(members.iter().map(|r| r.dd).collect());
        let aa = sorted_sum(members.iter().map(|r| r.aa).collect());
        close(&layer["delta_norm"], dd.sqrt(), TOL, prefix);
        close(&layer["base_norm"], aa.sqrt(), TOL, prefix);
        close(
            &layer["relative_change"],
            dd.sqrt() / aa.sqrt(),
            TOL,
            prefix,
        );
    }
    assert_eq!(layers[0]["layer"], 0);
    assert!(layers[2]["layer"].is_null());

    // Top tensors: by decreasing relative change, 10 by default (7 float tensors here).
    let top: Vec<&str> = v["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(top.len(), 7);
    let rel = |name: &str| {
        let r = refs[name];
        if r.dd == 0.0 {
            0.0
        } else {
            r.dd.sqrt() / r.aa.sqrt()
        }
    };
    for w in top.windows(2) {
        assert!(rel(w[0]) >= rel(w[1]), "{top:?}");
    }
    assert_eq!(v["from"], a.display().to_string());
    assert_eq!(v["to"], b.display().to_string());
}

/// `expo diff --sft A --aligned B --json`.
fn expo_pair(a: &Path, b: &Path) -> Value {
    expo(&["diff"])
        .arg("--sft")
        .arg(a)
        .arg("--aligned")
        .arg(b)
        .args(&["--json", "--quiet"])
        .assert_ok()
        .json
        .expect("stdout is one JSON object")
}

#[test]
fn positional_pair_is_the_same_as_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let (t0, t1) = pair(2, 1e-3);
    let a = single(&tmp.path().join("a"), &t0);
    let b = sharded_n(&tmp.path().join("b"), &t1, 2);
    assert_eq!(expo_pair(&a, &b), diff_json(&[&a, &b], &[]));
}

#[test]
fn self_diff_reports_zeros_and_identical_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let (t0, _) = pair(3, 1e-2);
    let a = sharded_n(&tmp.path().join("a"), &t0, 2);
    let v = diff_json(&[&a, &a], &[]);
    let s = &v["summary"];
    for key in [
        "mean_frobenius",
        "mean_normalized_frobenius",
        "delta_norm",
        "relative_change",
        "changed_fraction",
    ] {
        assert_eq!(s[key], 0.0, "{key}");
    }
    assert_eq!(s["cosine"], 1.0);
    assert_eq!(s["identical_tensors"], s["tensors"]);
    assert_eq!(s["identical_tensors"], 9);
    assert_eq!(s["changed_elements"], 0);
    assert_eq!(s["premise_doubtful"], false);
    assert!(s["base_norm"].as_f64().unwrap() > 0.0);
    for t in v["tensors"].as_array().unwrap() {
        assert_eq!(t["frobenius"], 0.0);
        assert_eq!(t["normalized_frobenius"], 0.0);
        assert_eq!(t["relative_change"], 0.0);
        assert_eq!(t["changed_fraction"], 0.0);
        assert_eq!(t["identical"], true);
        // Identical non-zero tensors have a cosine of exactly 1; the zero bias has none.
        if t["name"] == "model.layers.1.mlp.bias" {
            assert!(t["cosine"].is_null());
        } else {
            assert_eq!(t["cosine"], 1.0, "{}", t["name"]);
        }
    }
    for t in v["non_float_tensors"].as_array().unwrap() {
        assert_eq!(t["identical"], true);
    }

    let (out, err) = diff_text(&[&a, &a], &[]);
    assert!(out.contains("identical tensors        9 of 9"), "{out}");
    assert!(out.contains("ExPO premise             ok"), "{out}");
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn json_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let (t0, t1) = pair(4, 1e-4);
    let a = single(&tmp.path().join("a"), &t0);
    let b = single(&tmp.path().join("b"), &t1);
    let v = diff_json(&[&a, &b], &["--top", "3"]);
    for key in [
        "from",
        "to",
        "summary",
        "tensors",
        "non_float_tensors",
        "layers",
        "top",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    for key in [
        "mean_frobenius",
        "mean_normalized_frobenius",
        "delta_norm",
        "base_norm",
        "target_norm",
        "relative_change",
        "cosine",
        "changed_fraction",
        "relative_change_warning",
    ] {
        assert!(
            v["summary"][key].is_f64(),
            "summary.{key}: {}",
            v["summary"][key]
        );
    }
    for key in [
        "identical_tensors",
        "tensors",
        "float_tensors",
        "non_float_tensors",
        "elements",
        "changed_elements",
        "nonfinite_elements",
    ] {
        assert!(v["summary"][key].is_u64(), "summary.{key}");
    }
    assert!(v["summary"]["premise_doubtful"].is_boolean());
    for t in v["tensors"].as_array().unwrap() {
        for key in [
            "frobenius",
            "normalized_frobenius",
            "relative_change",
            "changed_fraction",
            "base_norm",
            "target_norm",
        ] {
            assert!(t[key].is_f64(), "{}.{key}: {}", t["name"], t[key]);
        }
        assert!(t["name"].is_string());
        assert!(t["cosine"].is_f64() || t["name"] == "model.layers.1.mlp.bias");
        assert!(t["shape"].is_array() && t["dtypes"].is_array());
    }
    assert_eq!(v["top"].as_array().unwrap().len(), 3);
    assert_eq!(v["summary"]["relative_change_warning"], 2e-3);
}

#[test]
fn three_checkpoints_give_the_pairwise_table() {
    let tmp = tempfile::tempdir().unwrap();
    let (pre, sft) = pair(5, 5e-2);
    // DPO: a much smaller step from SFT.
    let mut rng = Rng::new(99);
    let dpo: Vec<T> = sft
        .iter()
        .map(|t| {
            if !is_float(t.dtype) {
                return t.clone();
            }
            let v: Vec<f64> = t
                .values()
                .iter()
                .map(|&x| x * (1.0 + 1e-3 * rng.unit()))
                .collect();
            t.with(t.dtype, &v)
        })
        .collect();
    let a = single(&tmp.path().join("pre"), &pre);
    let b = sharded_n(&tmp.path().join("sft"), &sft, 2);
    let c = single(&tmp.path().join("dpo"), &dpo);

    let (out, _) = diff_text(&[&a, &b, &c], &["--quiet"]);
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("A → ") || l.starts_with("B → "))
        .collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(rows[0].starts_with("A → B"));
    assert!(rows[1].starts_with("B → C"));
    assert!(rows[2].starts_with("A → C"));
    assert!(rows[0].ends_with("doubtful"), "{out}");
    assert!(rows[1].ends_with("ok"), "{out}");
    for (letter, path) in [("A", &a), ("B", &b), ("C", &c)] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(letter) && l.contains(&path.display().to_string())),
            "{out}"
        );
    }

    let v = diff_json(&[&a, &b, &c], &[]);
    let pairs = v["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 3);
    let ends: Vec<(u64, u64)> = pairs
        .iter()
        .map(|p| {
            (
                p["from_index"].as_u64().unwrap(),
                p["to_index"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ends, [(0, 1), (1, 2), (0, 2)]);
    assert_eq!(v["checkpoints"].as_array().unwrap().len(), 3);
    // Each pair is exactly what a two-checkpoint diff reports.
    for (p, (x, y)) in pairs.iter().zip([(&a, &b), (&b, &c), (&a, &c)]) {
        let direct = diff_json(&[x, y], &[]);
        assert_eq!(p["summary"], direct["summary"]);
        assert_eq!(p["tensors"], direct["tensors"]);
    }
    // Table 1's shape: the SFT step is far larger than the DPO step.
    let norm = |p: &Value| p["summary"]["mean_normalized_frobenius"].as_f64().unwrap();
    assert!(norm(&pairs[0]) > 10.0 * norm(&pairs[1]));
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // A tensor of 2.5 Mi elements spans three work chunks.
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(6);
    let n = 5 << 19;
    let x = T::float(
        "model.layers.0.mlp.down_proj.weight",
        Dtype::F32,
        &[n / 1024, 1024],
        &rng.vec(n, 0.05),
    );
    let yv: Vec<f64> = x.values().iter().map(|&v| v + 1e-4 * rng.unit()).collect();
    let y = x.with(Dtype::BF16, &yv);
    let small = T::float("lm_head.weight", Dtype::F16, &[3, 5], &rng.vec(15, 1.0));
    let small2 = small.with(Dtype::F16, &rng.vec(15, 1.0));
    let a = single(&tmp.path().join("a"), &[x.clone(), small.clone()]);
    let b = single(&tmp.path().join("b"), &[y.clone(), small2.clone()]);
    let one = diff_json(&[&a, &b], &["--threads", "1"]);
    for j in ["2", "3", "8"] {
        assert_eq!(
            one,
            diff_json(&[&a, &b], &["--threads", j]),
            "--threads {j}"
        );
    }
    let r = Ref::of(&x, &y);
    let t = one["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == x.name)
        .unwrap();
    close(&t["frobenius"], r.frobenius(), TOL, "big tensor");
    close(&t["cosine"], r.cosine().unwrap(), TOL, "big tensor cosine");
    close(
        &t["relative_change"],
        r.frobenius() / r.aa.sqrt(),
        TOL,
        "big tensor relative change",
    );
}

#[test]
fn nonfinite_values_are_counted_and_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let a0 = T::float(
        "model.layers.0.w",
        Dtype::F32,
        &[6],
        &[1.0, 2.0, f64::NAN, 4.0, 5.0, 6.0],
    );
    let a1 = a0.with(Dtype::F32, &[1.5, 2.0, f64::NAN, f64::INFINITY, 5.0, 7.0]);
    let a = single(&tmp.path().join("a"), std::slice::from_ref(&a0));
    let b = single(&tmp.path().join("b"), std::slice::from_ref(&a1));
    let out = expo(&["diff"]).arg(&a).arg(&b).arg("--json").assert_ok();
    let stderr = out.stderr;
    assert!(
        stderr.contains("warning:") && stderr.contains("infinite or NaN"),
        "{stderr}"
    );
    let v = out.json.expect("stdout is one JSON object");
    let t = &v["tensors"][0];
    assert_eq!(t["nonfinite_elements"], 2);
    // NaN against NaN is unchanged; 4 → inf, 1 → 1.5 and 6 → 7 changed.
    assert_eq!(t["changed_elements"], 3);
    close(&t["frobenius"], (0.25f64 + 1.0).sqrt(), TOL, "finite part");
    close(
        &t["base_norm"],
        (1.0f64 + 4.0 + 25.0 + 36.0).sqrt(),
        TOL,
        "base",
    );
}

#[test]
fn top_k_and_layers_in_the_human_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (t0, t1) = pair(7, 1e-3);
    let a = single(&tmp.path().join("a"), &t0);
    let b = single(&tmp.path().join("b"), &t1);
    let (out, err) = diff_text(&[&a, &b], &["--top", "2"]);
    assert!(out.contains("Top 2 tensors by ‖Δ‖/‖θ0‖"), "{out}");
    let top_rows = out
        .split("Top 2 tensors")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap()
        .lines()
        .count();
    assert_eq!(top_rows, 4, "title, header and two rows:\n{out}");
    assert!(out.contains("Per layer"));
    assert!(out.contains("model.layers.0 "));
    assert!(out.contains("(not in a layer)"));
    assert!(
        out.contains("changed: model.mask (BOOL, 3 of 16 elements)"),
        "{out}"
    );
    assert!(out.contains("mean ‖Δ‖/√n per tensor"));
    // Not quiet: the timing line on stderr.
    assert!(err.contains("expo: compared 2 checkpoints"), "{err}");

    let (all, _) = diff_text(&[&a, &b], &["--top", "all", "--quiet"]);
    assert!(all.contains("Top 7 tensors"), "{all}");
    let (none, _) = diff_text(&[&a, &b], &["--top", "0", "--quiet"]);
    assert!(!none.contains("Top "), "{none}");
}

#[test]
fn premise_warning_only_when_the_change_is_large() {
    let tmp = tempfile::tempdir().unwrap();
    let (t0, far) = pair(8, 5e-2);
    let (_, near) = pair(8, 1e-5);
    let a = single(&tmp.path().join("a"), &t0);
    let f = single(&tmp.path().join("far"), &far);
    let n = single(&tmp.path().join("near"), &near);
    let (_, err) = diff_text(&[&a, &f], &["--quiet"]);
    assert!(err.contains("warning:") && err.contains("premise"), "{err}");
    let (out, err) = diff_text(&[&a, &n], &["--quiet"]);
    assert!(!err.contains("warning"), "{err}");
    assert!(out.contains("ExPO premise             ok"), "{out}");
}

#[test]
fn mismatched_checkpoints_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (t0, t1) = pair(9, 1e-3);
    let a = single(&tmp.path().join("a"), &t0);
    // A different shape, a different integer dtype and a missing tensor.
    let mut bad = t1.clone();
    bad[0] = T::float(&bad[0].name, Dtype::F32, &[48, 64], &[0.0; 48 * 64]);
    let pos = bad
        .iter()
        .position(|t| t.name == "model.rotary.positions")
        .unwrap();
    bad[pos] = T::float("model.rotary.positions", Dtype::F32, &[8], &[0.0; 8]);
    bad.retain(|t| t.name != "lm_head.weight");
    let b = single(&tmp.path().join("b"), &bad);
    let out = expo(&["diff"]).arg(&a).arg(&b).assert_fails(
        1,
        &[
            "model.embed_tokens.weight` has shape [64, 48]",
            "[48, 64]",
            "`model.rotary.positions` is I64",
            "`lm_head.weight` is in",
            "3 problems",
        ],
    );
    assert!(out.stderr.starts_with("expo: error:"), "{}", out.stderr);

    expo(&["diff"])
        .arg(&a)
        .arg(tmp.path().join("missing"))
        .assert_fails(1, &["does not exist"]);
}

#[test]
fn usage_errors() {
    for args in [
        &["diff"][..],
        &["diff", "a"],
        &["diff", "--sft", "a"],
        &["diff", "--aligned", "b"],
        &["diff", "--sft", "a", "--aligned", "b", "c"],
        &["diff", "a", "b", "--top", "x"],
        &["diff", "a", "b", "--threads", "0"],
        &["inspect"],
    ] {
        expo(args).assert_fails(2, &[]);
    }
}

#[test]
fn bundled_examples() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let v = diff_json(
        &[&examples.join("tiny-sft"), &examples.join("tiny-dpo")],
        &[],
    );
    assert_eq!(v["summary"]["tensors"], 21);
    // Sparse changes (1 element in 64) leave a few small tensors untouched.
    assert_eq!(v["summary"]["identical_tensors"], 4);
    // Like a real DPO step: a small relative change, below the premise threshold.
    let rel = v["summary"]["relative_change"].as_f64().unwrap();
    assert!((5e-4..2e-3).contains(&rel), "{rel}");
    assert_eq!(v["summary"]["premise_doubtful"], false);
}
