//! ExPO on PEFT LoRA adapters: adapters built here with known factors, checked against
//! θ0 + (1+α)·ΔW computed independently in f64 and rounded with the reference rounding.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;

use crate::common::adapter::{
    llama, lora_config, merged, product, random_tensor as t, write_adapter, PEFT_PREFIX as P,
};
use crate::common::*;
use serde_json::{json, Value};

/// Asserts that `got` holds exactly `expected` rounded to its dtype.
fn assert_rounded(got: &Tensor, expected: &[f64]) {
    let bits = elem_bits(&got.data, got.dtype);
    assert_eq!(bits.len(), expected.len(), "{}", got.name);
    for (i, (&b, &e)) in bits.iter().zip(expected).enumerate() {
        assert_eq!(
            b,
            round_bits(e, got.dtype),
            "{}[{i}]: got {}, expected {e}",
            got.name,
            bits_to_f64(b, got.dtype)
        );
    }
}

fn transpose(x: &[f64], n: usize, m: usize) -> Vec<f64> {
    let mut t = vec![0.0; x.len()];
    for i in 0..n {
        for j in 0..m {
            t[j * n + i] = x[i * m + j];
        }
    }
    t
}

const Q: &str = "model.layers.0.self_attn.q_proj";
const V: &str = "model.layers.0.self_attn.v_proj";
const O: &str = "model.layers.0.self_attn.o_proj";

#[test]
fn as_model_is_the_base_plus_the_scaled_update_rounded_once() {
    let s = Scratch::new();
    let l = llama(
        &s,
        Dtype::F32,
        lora_config(2, 4.0, &["q_proj", "v_proj", "o_proj"]),
    );
    let out = s.out("merged");
    extrapolate(&l.base, &l.adapter, "0.5", &out)
        .args(&["--as", "model"])
        .assert_ok();
    let got = read_dir_tensors(&out);
    // s = 4 / 2 = 2. q_proj and v_proj are [6, 4]; o_proj is square (Linear in Llama).
    for m in [Q, V, O] {
        assert_rounded(
            &got[&format!("{m}.weight")],
            &l.expected_linear(m, 2.0, 0.5),
        );
    }
    // Untouched tensors are the base's bytes; the layout mirrors --sft.
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert_eq!(got[name].data, l.base_tensors[name].data, "{name}");
    }
    assert_eq!(got.len(), l.base_tensors.len());
    let files = list_dir(&out);
    assert!(
        !files.contains(&"adapter_config.json".to_string()),
        "{files:?}"
    );
    assert!(
        !files.contains(&"adapter_model.safetensors".to_string()),
        "{files:?}"
    );
    assert!(
        files.contains(&"model.safetensors".to_string()),
        "{files:?}"
    );
    // config.json from --sft, byte for byte; the adapter's tokenizer file wins.
    assert_eq!(
        fs::read(out.join("config.json")).unwrap(),
        fs::read(l.base.join("config.json")).unwrap()
    );
    assert_eq!(
        fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        "{\"chat_template\": \"dpo\"}\n"
    );
    assert_eq!(
        fs::read(out.join("tokenizer.json")).unwrap(),
        fs::read(l.base.join("tokenizer.json")).unwrap()
    );
    let card = fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("base_model_relation: merge"), "{card}");
    let prov: Value = serde_json::from_slice(&fs::read(out.join("expo.json")).unwrap()).unwrap();
    assert_eq!(prov["as"], "model");
    assert_eq!(prov["alpha"], 0.5);
}

#[test]
fn as_adapter_scales_exactly_the_b_factors() {
    let s = Scratch::new();
    let l = llama(
        &s,
        Dtype::BF16,
        lora_config(2, 4.0, &["q_proj", "v_proj", "o_proj"]),
    );
    let out = s.out("expo-adapter");
    // The default for an adapter input is an adapter.
    let o = extrapolate(&l.base, &l.adapter, "0.3", &out)
        .arg("--json")
        .assert_ok();
    assert_eq!(o.json.unwrap()["as"], "adapter");
    assert_eq!(
        fs::read(out.join("adapter_config.json")).unwrap(),
        fs::read(l.adapter.join("adapter_config.json")).unwrap()
    );
    let got = read_dir_tensors(&out);
    assert_eq!(got.len(), l.adapter_tensors.len());
    for (name, t1) in &l.adapter_tensors {
        let g = &got[name];
        assert_eq!((g.dtype, &g.shape), (t1.dtype, &t1.shape), "{name}");
        if name.ends_with("lora_B.weight") {
            let expected: Vec<f64> = t1.values().iter().map(|b| 1.3 * b).collect();
            assert_rounded(g, &expected);
            assert_ne!(g.data, t1.data, "{name} was not scaled");
        } else {
            assert_eq!(g.data, t1.data, "{name} must be byte-identical");
        }
    }
    // The adapter's side files come along; its README is replaced by our card.
    assert_eq!(
        fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        "{\"chat_template\": \"dpo\"}\n"
    );
    let card = fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("base_model_relation: adapter"), "{card}");
    assert!(card.contains("org/base"), "{card}");
    assert!(out.join("expo.json").is_file());
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn an_alpha_list_writes_one_adapter_per_value_and_skip_leaves_a_module_unscaled() {
    let s = Scratch::new();
    let l = llama(
        &s,
        Dtype::F16,
        lora_config(2, 4.0, &["q_proj", "v_proj", "o_proj"]),
    );
    let template = s.out("a-{alpha}");
    extrapolate(&l.base, &l.adapter, "0.1,0.4", &template)
        .args(&["--skip", "v_proj"])
        .assert_ok();
    for (dir, alpha) in [("a-0.1", 0.1), ("a-0.4", 0.4)] {
        let got = read_dir_tensors(&s.out(dir));
        for m in [Q, O] {
            let name = format!("{P}{m}.lora_B.weight");
            let expected: Vec<f64> = l.adapter_tensors[&name]
                .values()
                .iter()
                .map(|b| (1.0 + alpha) * b)
                .collect();
            assert_rounded(&got[&name], &expected);
        }
        let name = format!("{P}{V}.lora_B.weight");
        assert_eq!(got[&name].data, l.adapter_tensors[&name].data);
    }
    // --as model with the skip: θ1 = θ0 + ΔW for v_proj.
    let out = s.out("m");
    extrapolate(&l.base, &l.adapter, "0.4", &out)
        .args(&["--as", "model", "--skip", "v_proj"])
        .assert_ok();
    let got = read_dir_tensors(&out);
    assert_rounded(
        &got[&format!("{V}.weight")],
        &l.expected_linear(V, 2.0, 0.0),
    );
    assert_rounded(
        &got[&format!("{Q}.weight")],
        &l.expected_linear(Q, 2.0, 0.4),
    );
}

#[test]
fn rslora_and_patterns_set_each_modules_scaling() {
    let s = Scratch::new();
    let mut config = lora_config(4, 8.0, &["q_proj", "v_proj", "o_proj"]);
    config["use_rslora"] = json!(true);
    // v_proj: r = 1 (rank_pattern); o_proj: lora_alpha = 3 (alpha_pattern, a regex).
    config["rank_pattern"] = json!({"v_proj": 1});
    config["alpha_pattern"] = json!({"self_attn\\.o_.*": 3});
    let l = llama(&s, Dtype::F32, config);
    let out = s.out("m");
    extrapolate(&l.base, &l.adapter, "0.25", &out)
        .args(&["--as", "model"])
        .assert_ok();
    let got = read_dir_tensors(&out);
    assert_rounded(
        &got[&format!("{Q}.weight")],
        &l.expected_linear(Q, 8.0 / 2.0, 0.25),
    );
    assert_rounded(
        &got[&format!("{V}.weight")],
        &l.expected_linear(V, 8.0 / 1.0, 0.25),
    );
    assert_rounded(
        &got[&format!("{O}.weight")],
        &l.expected_linear(O, 3.0 / 2.0, 0.25),
    );
}

#[test]
fn conv1d_modules_are_transposed_including_the_square_c_proj() {
    let s = Scratch::new();
    let mut rng = Rng::new(11);
    // GPT-2 files hold `h.0…`; the adapter names `transformer.h.0…`.
    let base_tensors = vec![
        t("wte.weight", Dtype::F32, &[10, 4], &mut rng, 1.0),
        t(
            "h.0.attn.c_attn.weight",
            Dtype::F32,
            &[4, 12],
            &mut rng,
            1.0,
        ),
        t("h.0.attn.c_attn.bias", Dtype::F32, &[12], &mut rng, 1.0),
        t("h.0.attn.c_proj.weight", Dtype::F32, &[4, 4], &mut rng, 1.0),
        t("h.0.mlp.c_fc.weight", Dtype::F16, &[4, 8], &mut rng, 1.0),
    ];
    let base = single(&s.path("gpt2"), &base_tensors);
    fs::write(
        base.join("config.json"),
        r#"{"model_type": "gpt2", "n_embd": 4}"#,
    )
    .unwrap();
    let mut adapter_tensors = Vec::new();
    for (m, out, inp) in [
        ("attn.c_attn", 12, 4),
        ("attn.c_proj", 4, 4),
        ("mlp.c_fc", 8, 4),
    ] {
        adapter_tensors.push(t(
            &format!("{P}transformer.h.0.{m}.lora_A.weight"),
            Dtype::F32,
            &[2, inp],
            &mut rng,
            0.5,
        ));
        adapter_tensors.push(t(
            &format!("{P}transformer.h.0.{m}.lora_B.weight"),
            Dtype::F32,
            &[out, 2],
            &mut rng,
            0.05,
        ));
    }
    let mut config = lora_config(2, 2.0, &["c_attn", "c_proj", "c_fc"]);
    // Wrong on purpose: real adapters exist with it; the base's shape decides.
    config["fan_in_fan_out"] = json!(false);
    let adapter = write_adapter(&s.path("adapter"), &config, &adapter_tensors);
    let out = s.out("m");
    extrapolate(&base, &adapter, "0.5", &out)
        .args(&["--as", "model"])
        .assert_ok();
    let got = read_dir_tensors(&out);
    let a_t: BTreeMap<_, _> = adapter_tensors
        .iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    for (m, out_f, inp) in [
        ("attn.c_attn", 12, 4),
        ("attn.c_proj", 4, 4),
        ("mlp.c_fc", 8, 4),
    ] {
        let a = a_t[&format!("{P}transformer.h.0.{m}.lora_A.weight")].values();
        let b = a_t[&format!("{P}transformer.h.0.{m}.lora_B.weight")].values();
        let p = transpose(&product(&b, &a, out_f, 2, inp), out_f, inp);
        let name = format!("h.0.{m}.weight");
        let w0 = base_tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .values();
        assert_rounded(&got[&name], &merged(&w0, &p, 1.0, 0.5));
    }
    assert_eq!(got["wte.weight"].data, base_tensors[0].data);
}

#[test]
fn embedding_lora_and_tied_heads() {
    let s = Scratch::new();
    let mut rng = Rng::new(5);
    // Tied: the base stores only the embedding; LoRA on the embedding (lora_embedding_A/B).
    let base_tensors = vec![
        t(
            "model.embed_tokens.weight",
            Dtype::BF16,
            &[10, 4],
            &mut rng,
            1.0,
        ),
        t("model.norm.weight", Dtype::BF16, &[4], &mut rng, 1.0),
    ];
    let base = single(&s.path("base"), &base_tensors);
    fs::write(
        base.join("config.json"),
        r#"{"model_type": "qwen2", "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let ea = t(
        &format!("{P}model.embed_tokens.lora_embedding_A"),
        Dtype::F32,
        &[3, 10],
        &mut rng,
        0.5,
    );
    let eb = t(
        &format!("{P}model.embed_tokens.lora_embedding_B"),
        Dtype::F32,
        &[4, 3],
        &mut rng,
        0.05,
    );
    let adapter = write_adapter(
        &s.path("adapter"),
        &lora_config(3, 6.0, &["embed_tokens"]),
        &[ea.clone(), eb.clone()],
    );
    let out = s.out("m");
    extrapolate(&base, &adapter, "0.5", &out)
        .args(&["--as", "model"])
        .assert_ok();
    // ΔW = s·(B·A)ᵀ, [vocab, dim].
    let p = transpose(&product(&eb.values(), &ea.values(), 4, 3, 10), 4, 10);
    let got = read_dir_tensors(&out);
    assert_rounded(
        &got["model.embed_tokens.weight"],
        &merged(&base_tensors[0].values(), &p, 2.0, 0.5),
    );

    // A LoRA on lm_head of a tied model that stores only the embedding moves the embedding.
    let a = t(
        &format!("{P}lm_head.lora_A.weight"),
        Dtype::F32,
        &[3, 4],
        &mut rng,
        0.5,
    );
    let b = t(
        &format!("{P}lm_head.lora_B.weight"),
        Dtype::F32,
        &[10, 3],
        &mut rng,
        0.05,
    );
    let adapter2 = write_adapter(
        &s.path("adapter2"),
        &lora_config(3, 6.0, &["lm_head"]),
        &[a.clone(), b.clone()],
    );
    let out2 = s.out("m2");
    extrapolate(&base, &adapter2, "0.5", &out2)
        .args(&["--as", "model"])
        .assert_ok();
    let p = product(&b.values(), &a.values(), 10, 3, 4);
    let got = read_dir_tensors(&out2);
    assert_rounded(
        &got["model.embed_tokens.weight"],
        &merged(&base_tensors[0].values(), &p, 2.0, 0.5),
    );
    // Both at once touch one matrix twice: refused.
    let adapter3 = write_adapter(
        &s.path("adapter3"),
        &lora_config(3, 6.0, &["lm_head", "embed_tokens"]),
        &[a, b, ea, eb],
    );
    extrapolate(&base, &adapter3, "0.5", &s.out("m3"))
        .args(&["--as", "model"])
        .assert_fails(1, &["model.embed_tokens.weight", "tie_word_embeddings"]);
    s.assert_no_output_except(&["m", "m2"]);
}

trait NoOutputExcept {
    fn assert_no_output_except(&self, keep: &[&str]);
}

impl NoOutputExcept for Scratch {
    fn assert_no_output_except(&self, keep: &[&str]) {
        let left: Vec<String> = list_dir(&self.outputs())
            .into_iter()
            .filter(|n| !keep.contains(&n.as_str()))
            .collect();
        assert_eq!(left, Vec::<String>::new(), "a failed run left files behind");
        assert_no_staging(self.root());
    }
}

#[test]
fn dora_merges_with_the_magnitude_and_extrapolates_the_merged_weight() {
    let s = Scratch::new();
    let mut config = lora_config(2, 4.0, &["q_proj", "v_proj", "o_proj"]);
    config["use_dora"] = json!(true);
    let mut l = llama(&s, Dtype::F32, config.clone());
    // Add magnitudes to every module and rewrite the adapter.
    let mut rng = Rng::new(99);
    let mut tensors: Vec<Tensor> = l.adapter_tensors.values().cloned().collect();
    for (m, out) in [(Q, 6), (V, 6), (O, 4)] {
        let v: Vec<f64> = (0..out).map(|_| 1.0 + rng.unit()).collect();
        tensors.push(Tensor::float(
            &format!("{P}{m}.lora_magnitude_vector"),
            Dtype::F32,
            &[out],
            &v,
        ));
    }
    write_adapter(&l.adapter, &config, &tensors);
    l.adapter_tensors = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    let out = s.out("m");
    extrapolate(&l.base, &l.adapter, "0.5", &out)
        .args(&["--as", "model"])
        .assert_ok();
    let got = read_dir_tensors(&out);
    for m in [Q, V, O] {
        let w0t = &l.base_tensors[&format!("{m}.weight")];
        let (rows, cols) = (w0t.shape[0], w0t.shape[1]);
        let w0 = w0t.values();
        let (a, b, r) = l.factors(m);
        let p = product(&b, &a, rows, r, cols);
        let mag = l.adapter_tensors[&format!("{P}{m}.lora_magnitude_vector")].values();
        let mut expected = vec![0.0; rows * cols];
        for i in 0..rows {
            let v: Vec<f64> = (0..cols)
                .map(|j| w0[i * cols + j] + 2.0 * p[i * cols + j])
                .collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            for j in 0..cols {
                let w1 = (mag[i] / norm) * v[j];
                expected[i * cols + j] = 1.5 * w1 - 0.5 * w0[i * cols + j];
            }
        }
        assert_rounded(&got[&format!("{m}.weight")], &expected);
    }
    // As an adapter: refused, naming the magnitude tensor.
    extrapolate(&l.base, &l.adapter, "0.5", &s.out("a"))
        .assert_fails(1, &["DoRA", "lora_magnitude_vector", "--as model"]);
    s.assert_no_output_except(&["m"]);
}

#[test]
fn lora_bias_and_full_tensors() {
    let s = Scratch::new();
    let mut rng = Rng::new(3);
    let base_tensors = vec![
        t(
            "model.layers.0.mlp.up_proj.weight",
            Dtype::BF16,
            &[6, 4],
            &mut rng,
            1.0,
        ),
        t(
            "model.layers.0.mlp.up_proj.bias",
            Dtype::BF16,
            &[6],
            &mut rng,
            1.0,
        ),
        t("lm_head.weight", Dtype::BF16, &[10, 4], &mut rng, 1.0),
    ];
    let base = single(&s.path("base"), &base_tensors);
    let a = t(
        &format!("{P}model.layers.0.mlp.up_proj.lora_A.weight"),
        Dtype::F32,
        &[2, 4],
        &mut rng,
        0.5,
    );
    let b = t(
        &format!("{P}model.layers.0.mlp.up_proj.lora_B.weight"),
        Dtype::F32,
        &[6, 2],
        &mut rng,
        0.05,
    );
    let bb = t(
        &format!("{P}model.layers.0.mlp.up_proj.lora_B.bias"),
        Dtype::F32,
        &[6],
        &mut rng,
        0.05,
    );
    // modules_to_save: a full copy of lm_head, trained (f32).
    let head1: Vec<f64> = base_tensors[2].values().iter().map(|x| x + 0.01).collect();
    let head = Tensor::float(&format!("{P}lm_head.weight"), Dtype::F32, &[10, 4], &head1);
    let mut config = lora_config(2, 4.0, &["up_proj"]);
    config["lora_bias"] = json!(true);
    config["modules_to_save"] = json!(["lm_head"]);
    let adapter = write_adapter(
        &s.path("adapter"),
        &config,
        &[a.clone(), b.clone(), bb.clone(), head.clone()],
    );

    let out = s.out("m");
    extrapolate(&base, &adapter, "0.5", &out)
        .args(&["--as", "model"])
        .assert_ok();
    let got = read_dir_tensors(&out);
    let p = product(&b.values(), &a.values(), 6, 2, 4);
    assert_rounded(
        &got["model.layers.0.mlp.up_proj.weight"],
        &merged(&base_tensors[0].values(), &p, 2.0, 0.5),
    );
    assert_rounded(
        &got["model.layers.0.mlp.up_proj.bias"],
        &merged(&base_tensors[1].values(), &bb.values(), 2.0, 0.5),
    );
    let head2: Vec<f64> = base_tensors[2]
        .values()
        .iter()
        .zip(head.values())
        .map(|(t0, t1)| formula(*t0, t1, 0.5))
        .collect();
    assert_rounded(&got["lm_head.weight"], &head2);
    assert_eq!(got["lm_head.weight"].dtype, Dtype::BF16);

    let out = s.out("a");
    extrapolate(&base, &adapter, "0.5", &out).assert_ok();
    let got = read_dir_tensors(&out);
    let scaled: Vec<f64> = bb.values().iter().map(|x| 1.5 * x).collect();
    assert_rounded(&got[&bb.name], &scaled);
    let head2: Vec<f64> = base_tensors[2]
        .values()
        .iter()
        .zip(head.values())
        .map(|(t0, t1)| formula(*t0, t1, 0.5))
        .collect();
    assert_rounded(&got[&head.name], &head2);
    assert_eq!(got[&head.name].dtype, Dtype::F32);
    assert_eq!(got[&a.name].data, a.data);
}

#[test]
fn a_head_with_no_base_is_refused_unless_skipped() {
    let s = Scratch::new();
    let mut rng = Rng::new(4);
    let base_tensors = vec![t(
        "model.layers.0.mlp.up_proj.weight",
        Dtype::BF16,
        &[6, 4],
        &mut rng,
        1.0,
    )];
    let base = single(&s.path("base"), &base_tensors);
    let a = t(
        &format!("{P}model.layers.0.mlp.up_proj.lora_A.weight"),
        Dtype::F32,
        &[2, 4],
        &mut rng,
        0.5,
    );
    let b = t(
        &format!("{P}model.layers.0.mlp.up_proj.lora_B.weight"),
        Dtype::F32,
        &[6, 2],
        &mut rng,
        0.05,
    );
    let score = t(
        &format!("{P}score.weight"),
        Dtype::F32,
        &[2, 4],
        &mut rng,
        0.5,
    );
    let adapter = write_adapter(
        &s.path("adapter"),
        &lora_config(2, 2.0, &["up_proj"]),
        &[a, b, score.clone()],
    );
    for kind in ["adapter", "model"] {
        extrapolate(&base, &adapter, "0.5", &s.out(kind))
            .args(&["--as", kind])
            .assert_fails(1, &["score.weight", "no counterpart", "--skip"]);
    }
    s.assert_no_output();
    for kind in ["adapter", "model"] {
        extrapolate(&base, &adapter, "0.5", &s.out(kind))
            .args(&["--as", kind, "--skip", "^score"])
            .assert_ok();
    }
    assert_eq!(
        read_dir_tensors(&s.out("adapter"))[&score.name].data,
        score.data
    );
    // In the checkpoint it is added under its model name.
    assert_eq!(
        read_dir_tensors(&s.out("model"))["score.weight"].data,
        score.data
    );
}

#[test]
fn refusals_exit_1_name_the_culprit_and_write_nothing() {
    let s = Scratch::new();
    let l = llama(&s, Dtype::F32, lora_config(2, 4.0, &["q_proj"]));
    let a = l.adapter_tensors[&format!("{P}{Q}.lora_A.weight")].clone();
    let b = l.adapter_tensors[&format!("{P}{Q}.lora_B.weight")].clone();
    let run = |name: &str, config: Value, tensors: Vec<Tensor>, needles: &[&str]| {
        let dir = write_adapter(&s.path(name), &config, &tensors);
        for kind in ["adapter", "model"] {
            extrapolate(&l.base, &dir, "0.5", &s.out(name))
                .args(&["--as", kind])
                .assert_fails(1, needles);
        }
    };
    let base_cfg = lora_config(2, 4.0, &["q_proj"]);
    let with = |k: &str, v: Value| {
        let mut c = base_cfg.clone();
        c[k] = v;
        c
    };
    let ab = vec![a.clone(), b.clone()];
    run(
        "pissa",
        with("init_lora_weights", json!("pissa")),
        ab.clone(),
        &["init_lora_weights", "pissa"],
    );
    run(
        "olora",
        with("init_lora_weights", json!("olora")),
        ab.clone(),
        &["olora"],
    );
    run(
        "corda",
        with("init_lora_weights", json!("corda")),
        ab.clone(),
        &["corda"],
    );
    run(
        "loftq",
        with("init_lora_weights", json!("loftq")),
        ab.clone(),
        &["loftq"],
    );
    run(
        "lora_ga",
        with("init_lora_weights", json!("lora_ga")),
        ab.clone(),
        &["lora_ga"],
    );
    run(
        "alora",
        with("alora_invocation_tokens", json!([1, 2])),
        ab.clone(),
        &["alora_invocation_tokens"],
    );
    run(
        "replication",
        with("layer_replication", json!([[0, 1]])),
        ab.clone(),
        &["layer_replication"],
    );
    run(
        "params",
        with("target_parameters", json!(["mlp.experts.w1"])),
        ab.clone(),
        &["target_parameters"],
    );
    let mut orig = ab.clone();
    orig.push(Tensor {
        name: format!("{P}lm_head.original_module.weight"),
        ..l.base_tensors["lm_head.weight"].clone()
    });
    run(
        "original",
        base_cfg.clone(),
        orig,
        &["lm_head.original_module.weight", "original_module"],
    );
    let mut bl = ab.clone();
    bl.push(Tensor {
        name: format!("{P}{Q}.base_layer.weight"),
        ..l.base_tensors[&format!("{Q}.weight")].clone()
    });
    run("base_layer", base_cfg.clone(), bl, &["base_layer"]);
    // No base tensor for the module.
    let stray = vec![
        Tensor {
            name: format!("{P}model.layers.7.self_attn.q_proj.lora_A.weight"),
            ..a.clone()
        },
        Tensor {
            name: format!("{P}model.layers.7.self_attn.q_proj.lora_B.weight"),
            ..b.clone()
        },
    ];
    run(
        "stray",
        base_cfg.clone(),
        stray,
        &[
            "model.layers.7.self_attn.q_proj.lora_A.weight",
            "no base tensor",
        ],
    );
    // The config's rank does not describe the file.
    run(
        "rank",
        with("r", json!(4)),
        ab.clone(),
        &["rank 2", "r = 4"],
    );
    // Only half of a module.
    run(
        "half",
        base_cfg.clone(),
        vec![a.clone()],
        &["lora_B.weight", "q_proj"],
    );
    s.assert_no_output();
    // --as adapter on a full checkpoint is a usage error.
    extrapolate(&l.base, &l.base, "0.5", &s.out("x"))
        .args(&["--as", "adapter"])
        .assert_fails(2, &["--as adapter", "adapter_config.json"]);
    s.assert_no_output();
}

#[test]
fn dry_run_writes_nothing_and_describes_the_modules() {
    let s = Scratch::new();
    let l = llama(
        &s,
        Dtype::F32,
        lora_config(2, 4.0, &["q_proj", "v_proj", "o_proj"]),
    );
    let o = extrapolate(&l.base, &l.adapter, "0.5", &s.out("m"))
        .args(&["--as", "model", "--dry-run", "--json"])
        .assert_ok();
    let doc = o.json.unwrap();
    assert_eq!(doc["dry_run"], true);
    assert_eq!(doc["modules"].as_array().unwrap().len(), 3);
    assert_eq!(doc["modules"][0]["scaling"], 2.0);
    s.assert_no_output();
    extrapolate(&l.base, &l.adapter, "0.5", &s.out("m"))
        .arg("--dry-run")
        .assert_ok();
    s.assert_no_output();
}

#[test]
fn inspect_lists_modules_and_says_whether_vllm_can_serve_it() {
    let s = Scratch::new();
    let l = llama(
        &s,
        Dtype::F32,
        lora_config(2, 4.0, &["q_proj", "v_proj", "o_proj"]),
    );
    let o = expo(&[
        OsStr::new("inspect"),
        l.adapter.as_os_str(),
        OsStr::new("--json"),
    ])
    .assert_ok();
    let doc = o.json.unwrap();
    assert_eq!(doc["kind"], "lora_adapter");
    assert_eq!(doc["modules"].as_array().unwrap().len(), 3);
    assert_eq!(doc["modules"][0]["scaling"], 2.0);
    assert_eq!(doc["vllm"]["servable"], true, "{doc}");
    let o = expo(&[OsStr::new("inspect"), l.adapter.as_os_str()]).assert_ok();
    assert!(o.stdout.contains("vLLM: can serve it"), "{}", o.stdout);
    assert!(o.stdout.contains(Q), "{}", o.stdout);

    // Patterns, a trained bias and a full tensor: vLLM cannot serve it, and says why.
    let mut config = lora_config(2, 4.0, &["q_proj"]);
    config["alpha_pattern"] = json!({"q_proj": 8});
    let mut tensors: Vec<Tensor> = l.adapter_tensors.values().cloned().collect();
    tensors.push(Tensor::float(
        &format!("{P}{Q}.lora_B.bias"),
        Dtype::F32,
        &[6],
        &[0.1; 6],
    ));
    tensors.push(Tensor {
        name: format!("{P}lm_head.weight"),
        ..l.base_tensors["lm_head.weight"].clone()
    });
    let dir = write_adapter(&s.path("odd"), &config, &tensors);
    let o = expo(&[OsStr::new("inspect"), dir.as_os_str(), OsStr::new("--json")]).assert_ok();
    let doc = o.json.unwrap();
    assert_eq!(doc["vllm"]["servable"], false);
    let problems = doc["vllm"]["problems"].to_string();
    for needle in ["alpha_pattern", "lm_head.weight", "lora_bias"] {
        assert!(problems.contains(needle), "{needle}: {problems}");
    }
}

#[test]
fn diff_measures_each_update_from_its_factors() {
    let s = Scratch::new();
    let l = llama(
        &s,
        Dtype::F32,
        lora_config(2, 4.0, &["q_proj", "v_proj", "o_proj"]),
    );
    let o = expo(&[
        OsStr::new("diff"),
        OsStr::new("--sft"),
        l.base.as_os_str(),
        OsStr::new("--aligned"),
        l.adapter.as_os_str(),
        OsStr::new("--json"),
    ])
    .assert_ok();
    let doc = o.json.unwrap();
    let (mut dtot, mut btot) = (0.0, 0.0);
    for m in doc["modules"].as_array().unwrap() {
        let name = m["tensor"].as_str().unwrap();
        let module = name.strip_suffix(".weight").unwrap();
        let w0 = l.base_tensors[name].values();
        let shape = &l.base_tensors[name].shape;
        let (a, b, r) = l.factors(module);
        let p = product(&b, &a, shape[0], r, shape[1]);
        let d = p.iter().map(|x| (2.0 * x) * (2.0 * x)).sum::<f64>();
        let bn = w0.iter().map(|x| x * x).sum::<f64>();
        dtot += d;
        btot += bn;
        let got = m["delta_norm"].as_f64().unwrap();
        assert!(
            (got - d.sqrt()).abs() <= 1e-12 * d.sqrt(),
            "{name}: {got} vs {}",
            d.sqrt()
        );
        let rc = m["relative_change"].as_f64().unwrap();
        assert!((rc - d.sqrt() / bn.sqrt()).abs() <= 1e-12 * rc, "{name}");
    }
    let rc = doc["summary"]["relative_change"].as_f64().unwrap();
    assert!((rc - dtot.sqrt() / btot.sqrt()).abs() <= 1e-12 * rc);
    assert_eq!(doc["summary"]["premise_doubtful"], rc > 2e-3);
}

#[test]
fn search_over_an_adapter_makes_adapter_candidates() {
    let s = Scratch::new();
    let l = llama(
        &s,
        Dtype::F32,
        lora_config(2, 4.0, &["q_proj", "v_proj", "o_proj"]),
    );
    let script = s.path("eval.sh");
    fs::write(
        &script,
        "#!/bin/sh\ntest -f \"$1/adapter_config.json\" || exit 125\nawk -v a=\"$EXPO_ALPHA\" 'BEGIN { printf \"%.9f\\n\", -(a-0.3)*(a-0.3) }'\n",
    )
    .unwrap();
    let o = expo(&["search"])
        .arg("--sft")
        .arg(&l.base)
        .arg("--aligned")
        .arg(&l.adapter)
        .arg("--eval")
        .arg(format!("sh '{}' {{output}}", script.display()))
        .arg("--run")
        .arg(s.out("run"))
        .arg("--json")
        .assert_ok();
    let j = o.json.unwrap();
    assert_eq!(j["status"], "resolved", "{j:#}");
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    let kept = s.out("run").join("alpha-0.3");
    let reference = s.out("reference");
    extrapolate(&l.base, &l.adapter, "0.3", &reference).assert_ok();
    assert_eq!(
        fs::read(kept.join("adapter_model.safetensors")).unwrap(),
        fs::read(reference.join("adapter_model.safetensors")).unwrap()
    );
}

/// Where θ0 is ±inf or NaN, `--as model` keeps θ0's bits (a NaN's payload included) and
/// computes every other element; rows long enough for the vector loops and their tails.
/// A factor holding NaN makes the run fail naming that tensor, not blaming α.
#[test]
fn non_finite_base_values_are_kept_and_non_finite_factors_are_refused() {
    let s = Scratch::new();
    let (rows, cols, r) = (5, 37, 2);
    let mut rng = Rng::new(11);
    let w0 = t(
        &format!("{Q}.weight"),
        Dtype::BF16,
        &[rows, cols],
        &mut rng,
        1.0,
    );
    let mut data = w0.data.clone();
    // A negative signalling NaN with a payload (arithmetic would make it quiet), a positive
    // quiet NaN, +inf and −inf.
    for (i, bits) in [
        (0usize, 0xff8au16),
        (17, 0x7fc1),
        (40, 0x7f80),
        (cols * 4 + 36, 0xff80),
    ] {
        data[2 * i..2 * i + 2].copy_from_slice(&bits.to_le_bytes());
    }
    let w0 = Tensor::raw(&w0.name, Dtype::BF16, &[rows, cols], data);
    let base = single(&s.path("base"), std::slice::from_ref(&w0));
    side_files(&base, "base");
    let a = t(
        &format!("{P}{Q}.lora_A.weight"),
        Dtype::F32,
        &[r, cols],
        &mut rng,
        0.5,
    );
    let b = t(
        &format!("{P}{Q}.lora_B.weight"),
        Dtype::F32,
        &[rows, r],
        &mut rng,
        0.05,
    );
    let config = lora_config(r as u64, 4.0, &["q_proj"]);
    let adapter = write_adapter(&s.path("adapter"), &config, &[a.clone(), b.clone()]);
    let out = s.out("merged");
    extrapolate(&base, &adapter, "0.5", &out)
        .args(&["--as", "model"])
        .assert_ok();
    let got = &read_dir_tensors(&out)[&w0.name];
    let expected = merged(
        &w0.values(),
        &product(&b.values(), &a.values(), rows, r, cols),
        2.0,
        0.5,
    );
    let (got_bits, w0_bits) = (
        elem_bits(&got.data, Dtype::BF16),
        elem_bits(&w0.data, Dtype::BF16),
    );
    for (i, e) in expected.iter().enumerate() {
        let want = if bits_to_f64(w0_bits[i], Dtype::BF16).is_finite() {
            round_bits(*e, Dtype::BF16)
        } else {
            w0_bits[i]
        };
        assert_eq!(got_bits[i], want, "[{i}]");
    }

    // NaN in lora_B: refused, naming lora_B, and nothing is written.
    let mut bad = b.values();
    bad[3] = f64::NAN;
    let b_nan = b.with(Dtype::F32, &bad);
    let adapter = write_adapter(&s.path("adapter-nan"), &config, &[a.clone(), b_nan]);
    let out = s.out("nan");
    extrapolate(&base, &adapter, "0.5", &out)
        .args(&["--as", "model"])
        .assert_fails(
            1,
            &[
                &format!("{Q}.lora_B.weight"),
                "1 infinite or NaN",
                "damaged",
            ],
        );
    assert!(!out.exists());

    // The same for a NaN in lora_B.bias (`lora_bias`).
    let bias0 = t(&format!("{Q}.bias"), Dtype::BF16, &[rows], &mut rng, 1.0);
    let base = single(&s.path("base-bias"), &[w0.clone(), bias0]);
    side_files(&base, "base");
    let mut bias = vec![0.01; rows];
    bias[2] = f64::NAN;
    let lb = Tensor::float(&format!("{P}{Q}.lora_B.bias"), Dtype::F32, &[rows], &bias);
    let mut config = config.clone();
    config["lora_bias"] = json!(true);
    let adapter = write_adapter(
        &s.path("adapter-bias"),
        &config,
        &[a.clone(), b.clone(), lb],
    );
    let out = s.out("nan-bias");
    extrapolate(&base, &adapter, "0.5", &out)
        .args(&["--as", "model"])
        .assert_fails(1, &[&format!("{Q}.lora_B.bias"), "1 infinite or NaN"]);
    assert!(!out.exists());
}

/// Tensors larger than one unit of work (1 Mi elements for computed tensors, 4 MiB for
/// copies) are cut into several tasks; every part lands at its own offset: an adapted
/// weight (two row blocks), a full tensor (two chunks) and an untouched tensor (two
/// copies).
#[test]
fn tensors_larger_than_one_task_are_written_whole() {
    let s = Scratch::new();
    let mut rng = Rng::new(5);
    let (rows, cols, r) = (20_000, 64, 2);
    let up = "model.layers.0.mlp.up_proj";
    let base_tensors = vec![
        t(
            "model.embed_tokens.weight",
            Dtype::BF16,
            &[40_000, cols],
            &mut rng,
            1.0,
        ),
        t(
            &format!("{up}.weight"),
            Dtype::BF16,
            &[rows, cols],
            &mut rng,
            1.0,
        ),
        t("lm_head.weight", Dtype::BF16, &[rows, cols], &mut rng, 1.0),
    ];
    let base = single(&s.path("base"), &base_tensors);
    let a = t(
        &format!("{P}{up}.lora_A.weight"),
        Dtype::F32,
        &[r, cols],
        &mut rng,
        0.5,
    );
    let b = t(
        &format!("{P}{up}.lora_B.weight"),
        Dtype::F32,
        &[rows, r],
        &mut rng,
        0.05,
    );
    let head1: Vec<f64> = base_tensors[2]
        .values()
        .iter()
        .map(|x| x * 1.01 + 0.01)
        .collect();
    let head = Tensor::float(
        &format!("{P}lm_head.weight"),
        Dtype::F32,
        &[rows, cols],
        &head1,
    );
    let mut config = lora_config(r as u64, 4.0, &["up_proj"]);
    config["modules_to_save"] = json!(["lm_head"]);
    let adapter = write_adapter(
        &s.path("adapter"),
        &config,
        &[a.clone(), b.clone(), head.clone()],
    );
    let out = s.out("m");
    extrapolate(&base, &adapter, "0.5", &out)
        .args(&["--as", "model"])
        .assert_ok();
    let got = read_dir_tensors(&out);
    assert_eq!(got["model.embed_tokens.weight"].data, base_tensors[0].data);
    let p = product(&b.values(), &a.values(), rows, r, cols);
    assert_rounded(
        &got[&format!("{up}.weight")],
        &merged(&base_tensors[1].values(), &p, 2.0, 0.5),
    );
    let head2: Vec<f64> = base_tensors[2]
        .values()
        .iter()
        .zip(head.values())
        .map(|(t0, t1)| formula(*t0, t1, 0.5))
        .collect();
    assert_rounded(&got["lm_head.weight"], &head2);
}

/// A sweep writes every α in one pass over the inputs (the rank-r products computed once
/// per row block); each of its outputs equals the single run at that α byte for byte, for
/// `--as model` and `--as adapter`, with a rule, a LoRA bias, a full tensor and a weight
/// larger than one task.
#[test]
fn alpha_sweeps_equal_single_runs_byte_for_byte() {
    let s = Scratch::new();
    let mut rng = Rng::new(11);
    let (rows, cols, r) = (20_000, 64, 2);
    let up = "model.layers.0.mlp.up_proj";
    let q = "model.layers.0.self_attn.q_proj";
    let base_tensors = vec![
        t(
            &format!("{up}.weight"),
            Dtype::BF16,
            &[rows, cols],
            &mut rng,
            1.0,
        ),
        t(&format!("{up}.bias"), Dtype::BF16, &[rows], &mut rng, 1.0),
        t(
            &format!("{q}.weight"),
            Dtype::F16,
            &[6, cols],
            &mut rng,
            1.0,
        ),
        t("lm_head.weight", Dtype::BF16, &[10, cols], &mut rng, 1.0),
    ];
    let base = single(&s.path("base"), &base_tensors);
    let mut tensors = Vec::new();
    for (m, out) in [(up, rows), (q, 6)] {
        tensors.push(t(
            &format!("{P}{m}.lora_A.weight"),
            Dtype::F32,
            &[r, cols],
            &mut rng,
            0.5,
        ));
        tensors.push(t(
            &format!("{P}{m}.lora_B.weight"),
            Dtype::F32,
            &[out, r],
            &mut rng,
            0.05,
        ));
    }
    tensors.push(t(
        &format!("{P}{up}.lora_B.bias"),
        Dtype::F32,
        &[rows],
        &mut rng,
        0.05,
    ));
    let head1: Vec<f64> = base_tensors[3].values().iter().map(|x| x + 0.01).collect();
    tensors.push(Tensor::float(
        &format!("{P}lm_head.weight"),
        Dtype::F32,
        &[10, cols],
        &head1,
    ));
    let mut config = lora_config(r as u64, 4.0, &["up_proj", "q_proj"]);
    config["lora_bias"] = json!(true);
    config["modules_to_save"] = json!(["lm_head"]);
    let adapter = write_adapter(&s.path("adapter"), &config, &tensors);
    let alphas = ["0.3", "0.5", "1.5"];
    for kind in ["model", "adapter"] {
        let sweep = s.out(&format!("{kind}-sweep"));
        let template = format!("{}-{{alpha}}", sweep.display());
        extrapolate(
            &base,
            &adapter,
            &alphas.join(","),
            std::path::Path::new(&template),
        )
        .args(&["--as", kind, "--alpha-for", "q_proj=x0.5"])
        .assert_ok();
        for a in alphas {
            let one = s.out(&format!("{kind}-one-{a}"));
            extrapolate(&base, &adapter, a, &one)
                .args(&["--as", kind, "--alpha-for", "q_proj=x0.5"])
                .assert_ok();
            let many = std::path::PathBuf::from(format!("{}-{a}", sweep.display()));
            let files = list_dir(&one);
            assert_eq!(files, list_dir(&many), "{kind} {a}");
            // expo.json and the card record the command line, which differs.
            for f in files
                .iter()
                .filter(|f| !["expo.json", "README.md"].contains(&f.as_str()))
            {
                assert!(
                    fs::read(one.join(f)).unwrap() == fs::read(many.join(f)).unwrap(),
                    "{kind} alpha {a}: {f} differs"
                );
            }
        }
    }
}

/// An α at which a merged value overflows its dtype fails that output with one message
/// (the count over the whole tensor, the advice to use a smaller α, no --dtype, which an
/// adapter run does not take); in a sweep, the outputs before it are written and the
/// failing one and those after it are not.
#[test]
fn an_alpha_that_overflows_fails_its_output_with_the_count_over_the_tensor() {
    let s = Scratch::new();
    let l = llama(
        &s,
        Dtype::F32,
        lora_config(2, 4.0, &["q_proj", "v_proj", "o_proj"]),
    );
    let out = s.out("huge");
    let outcome = extrapolate(&l.base, &l.adapter, "1e300", &out)
        .args(&["--as", "model"])
        .assert_fails(
            1,
            &[
                "values become infinite or NaN in BF16",
                "alpha = 1e300",
                "use a smaller --alpha",
            ],
        );
    // Whichever adapted tensor a worker reaches first: every one of its values overflows.
    assert!(
        ["16 of 16 values", "24 of 24 values"]
            .iter()
            .any(|n| outcome.stderr.contains(n)),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains("--dtype"), "{}", outcome.stderr);
    assert!(!out.exists());
    let template = format!("{}-{{alpha}}", s.out("sweep").display());
    extrapolate(
        &l.base,
        &l.adapter,
        "0.5,1e60,2",
        std::path::Path::new(&template),
    )
    .args(&["--as", "model"])
    .assert_fails(
        1,
        &[
            "1 of 3 outputs failed",
            "values become infinite or NaN",
            "the other outputs were written completely",
        ],
    );
    // As for checkpoints, the output that fails does not stop the others, before or after it.
    let written = |a: &str| std::path::PathBuf::from(template.replace("{alpha}", a));
    assert!(written("0.5").join("model.safetensors").is_file());
    assert!(!written(&format!("{}", 1e60)).exists());
    assert!(written("2").join("model.safetensors").is_file());
    // --as adapter: a B factor times 1 + 1e300 overflows f32.
    let out = s.out("huge-adapter");
    extrapolate(&l.base, &l.adapter, "1e300", &out)
        .args(&["--as", "adapter"])
        .assert_fails(
            1,
            &[
                "lora_B.weight",
                "values become infinite or NaN in F32",
                "use a smaller --alpha",
            ],
        );
    assert!(!out.exists());
}

/// An adapter sweep is held to the open-files limit like a checkpoint sweep: one that
/// cannot fit is refused before any work, in --dry-run too.
#[test]
fn an_adapter_sweep_that_cannot_fit_the_open_files_limit_fails_before_any_work() {
    let s = Scratch::new();
    let l = llama(&s, Dtype::F32, lora_config(2, 4.0, &["q_proj", "v_proj"]));
    let alphas: Vec<String> = (1..=40).map(|k| format!("0.{k:02}")).collect();
    let template = format!("{}-{{alpha}}", s.out("sweep").display());
    for dry_run in [true, false] {
        let mut run = extrapolate(
            &l.base,
            &l.adapter,
            &alphas.join(","),
            std::path::Path::new(&template),
        )
        .args(&["--as", "model"])
        .ulimit("-n 24");
        if dry_run {
            run = run.arg("--dry-run");
        }
        run.assert_fails(1, &["writing 40 outputs at once", "open-files limit is 24"]);
        assert!(!std::path::Path::new(&template.replace("{alpha}", "0.01")).exists());
    }
}
