//! Adapters in PEFT's on-disk layout (tests/fixtures/peft, written by
//! scripts/make_peft_fixtures.py): Llama q_proj/v_proj (f32 factors on a bf16 base), Qwen
//! q/k/v/o (bf16), GPT-2 Conv1D including the square c_proj (f16) and GPT-NeoX's fused
//! query_key_value (f32). Checked against θ0 + (1+α)·s·B·A computed here in f64.

use std::fs;
use std::path::{Path, PathBuf};

use crate::common::adapter::{self, expected_merge, PEFT_PREFIX};
use crate::common::*;
use serde_json::Value;

fn fixture(name: &str) -> (PathBuf, PathBuf) {
    let dir = adapter::fixture("peft", name);
    (dir.join("base"), dir.join("adapter"))
}

/// (base weight name, A, B) per adapted module; `wrapper` is the model prefix that the
/// base files do not carry (GPT-2's `transformer.`).
fn modules(adapter: &Path, wrapper: &str) -> Vec<(String, Tensor, Tensor)> {
    let t = read_tensors(&adapter.join("adapter_model.safetensors"));
    t.keys()
        .filter_map(|k| k.strip_suffix(".lora_A.weight"))
        .map(|m| {
            let a = t[&format!("{m}.lora_A.weight")].clone();
            let b = t[&format!("{m}.lora_B.weight")].clone();
            let path = m.strip_prefix(PEFT_PREFIX).unwrap();
            let path = path.strip_prefix(wrapper).unwrap_or(path);
            (format!("{path}.weight"), a, b)
        })
        .collect()
}

fn check(name: &str, wrapper: &str, conv1d: bool) {
    let (base, adapter) = fixture(name);
    let config: Value =
        serde_json::from_slice(&fs::read(adapter.join("adapter_config.json")).unwrap()).unwrap();
    let s = config["lora_alpha"].as_f64().unwrap() / config["r"].as_f64().unwrap();
    let alpha = 0.5;
    let scratch = Scratch::new();

    let out = scratch.out("model");
    extrapolate(&base, &adapter, "0.5", &out)
        .args(&["--as", "model"])
        .assert_ok();
    let t0 = read_tensors(&base.join("model.safetensors"));
    let got = read_tensors(&out.join("model.safetensors"));
    assert_eq!(got.len(), t0.len());
    let mods = modules(&adapter, wrapper);
    assert!(!mods.is_empty());
    for (weight, a, b) in &mods {
        let w0 = &t0[weight];
        let expected = expected_merge(w0, a, b, s, alpha, conv1d);
        let g = &got[weight];
        assert_eq!(g.dtype, w0.dtype, "{name}: {weight}");
        let bits = elem_bits(&g.data, g.dtype);
        for (e, (&bit, &x)) in bits.iter().zip(&expected).enumerate() {
            assert_eq!(bit, round_bits(x, g.dtype), "{name}: {weight}[{e}]");
        }
    }
    for (n, t) in &t0 {
        if !mods.iter().any(|(w, _, _)| w == n) {
            assert_eq!(got[n].data, t.data, "{name}: {n} must be θ0's bytes");
        }
    }
    assert!(!out.join("adapter_config.json").exists());

    let out = scratch.out("adapter");
    extrapolate(&base, &adapter, "0.5", &out).assert_ok();
    assert_eq!(
        fs::read(out.join("adapter_config.json")).unwrap(),
        fs::read(adapter.join("adapter_config.json")).unwrap()
    );
    let t1 = read_tensors(&adapter.join("adapter_model.safetensors"));
    let got = read_tensors(&out.join("adapter_model.safetensors"));
    for (n, t) in &t1 {
        if n.ends_with("lora_B.weight") {
            let bits = elem_bits(&got[n].data, t.dtype);
            for (e, (&bit, v)) in bits.iter().zip(t.values()).enumerate() {
                assert_eq!(bit, round_bits(1.5 * v, t.dtype), "{name}: {n}[{e}]");
            }
        } else {
            assert_eq!(got[n].data, t.data, "{name}: {n}");
        }
    }
}

#[test]
fn llama_q_and_v_f32_factors_on_a_bf16_base() {
    check("llama_f32", "", false);
}

#[test]
fn qwen_qkvo_bf16() {
    check("qwen_bf16", "", false);
}

#[test]
fn gpt2_conv1d_f16_including_the_square_c_proj() {
    check("gpt2_f16", "transformer.", true);
}

#[test]
fn gpt_neox_fused_query_key_value_f32() {
    check("neox_f32", "", false);
}
