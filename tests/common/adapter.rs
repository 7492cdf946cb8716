//! Builders of PEFT LoRA adapters and their base checkpoints, and the f64 reference of a
//! merge, for the adapter tests (`adapter`, `adapter_fixtures`, `adapter_peft`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::*;

/// The prefix PEFT gives every tensor name of an adapter (its `PeftModel` wrapper).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// `tests/fixtures/<set>/<name>`: the adapters of `scripts/make_peft_fixtures.py` (`peft`)
/// and of `scripts/make_real_peft_fixtures.py` (`peft-real`).
pub fn fixture(set: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(set)
        .join(name)
}

/// Deterministic values of moderate size, not exactly representable in bf16.
fn vals(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| (rng.unit() * 2.0 - 1.0) * scale).collect()
}

/// A tensor of `vals`, rounded to `dtype` (so that its f64 values are
/// exactly what expo reads).
pub fn random_tensor(
    name: &str,
    dtype: Dtype,
    shape: &[usize],
    rng: &mut Rng,
    scale: f64,
) -> Tensor {
    let v = vals(rng, numel(shape), scale);
    Tensor::float(name, dtype, shape, &v)
}

pub fn write_adapter(dir: &Path, config: &Value, tensors: &[Tensor]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    write_st(
        &dir.join("adapter_model.safetensors"),
        tensors,
        Some(pt_metadata()),
    );
    dir.to_path_buf()
}

pub fn lora_config(r: u64, alpha: f64, targets: &[&str]) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "org/base",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "fan_in_fan_out": false,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": null,
        "layer_replication": null,
    })
}

/// Σₖ B[i,k]·A[k,j] for k in order, as a [out, in] row-major matrix.
pub fn product(b: &[f64], a: &[f64], out: usize, r: usize, inp: usize) -> Vec<f64> {
    let mut p = vec![0.0; out * inp];
    for i in 0..out {
        for j in 0..inp {
            let mut acc = 0.0;
            for k in 0..r {
                acc += b[i * r + k] * a[k * inp + j];
            }
            p[i * inp + j] = acc;
        }
    }
    p
}

/// θ0 + (1+α)·(s·P) for a [rows, cols] base whose ΔW in storage orientation is `p`.
pub fn merged(w0: &[f64], p: &[f64], s: f64, alpha: f64) -> Vec<f64> {
    w0.iter()
        .zip(p)
        .map(|(w, d)| w + (1.0 + alpha) * (s * d))
        .collect()
}

/// θ0 + (1+α)·s·B·A in f64, in the storage order of the base tensor `w0`: [out, in], or
/// [in, out] for transformers' Conv1D (GPT-2).
pub fn expected_merge(
    w0: &Tensor,
    a: &Tensor,
    b: &Tensor,
    s: f64,
    alpha: f64,
    conv1d: bool,
) -> Vec<f64> {
    let (rows, cols) = (w0.shape[0], w0.shape[1]);
    let (av, bv, r) = (a.values(), b.values(), a.shape[0]);
    let (out_f, in_f) = (b.shape[0], a.shape[1]);
    let w = w0.values();
    (0..rows * cols)
        .map(|e| {
            let (i, j) = (e / cols, e % cols);
            // Storage [out, in], or [in, out] for Conv1D.
            let (o, n) = if conv1d { (j, i) } else { (i, j) };
            assert!(o < out_f && n < in_f);
            let mut acc = 0.0;
            for k in 0..r {
                acc += bv[o * r + k] * av[k * in_f + n];
            }
            w[e] + (1.0 + alpha) * (s * acc)
        })
        .collect()
}

/// A small Llama-like base (bf16) with side files, and a LoRA (f32 factors) on q_proj
/// [6, 4], the square o_proj [4, 4] and v_proj.
pub struct Llama {
    pub base: PathBuf,
    pub adapter: PathBuf,
    pub base_tensors: BTreeMap<String, Tensor>,
    pub adapter_tensors: BTreeMap<String, Tensor>,
}

pub fn llama(s: &Scratch, factor_dtype: Dtype, config: Value) -> Llama {
    let mut rng = Rng::new(7);
    let base_tensors = vec![
        random_tensor(
            "model.embed_tokens.weight",
            Dtype::BF16,
            &[10, 4],
            &mut rng,
            1.0,
        ),
        random_tensor(
            "model.layers.0.self_attn.q_proj.weight",
            Dtype::BF16,
            &[6, 4],
            &mut rng,
            1.0,
        ),
        random_tensor(
            "model.layers.0.self_attn.v_proj.weight",
            Dtype::BF16,
            &[6, 4],
            &mut rng,
            1.0,
        ),
        random_tensor(
            "model.layers.0.self_attn.o_proj.weight",
            Dtype::BF16,
            &[4, 4],
            &mut rng,
            1.0,
        ),
        random_tensor("model.norm.weight", Dtype::BF16, &[4], &mut rng, 1.0),
        random_tensor("lm_head.weight", Dtype::BF16, &[10, 4], &mut rng, 1.0),
    ];
    let base = single(&s.path("base"), &base_tensors);
    side_files(&base, "base");
    let r = config["r"].as_u64().unwrap() as usize;
    let mut adapter_tensors = Vec::new();
    for (m, out, inp) in [("q_proj", 6, 4), ("v_proj", 6, 4), ("o_proj", 4, 4)] {
        let r = match m {
            "v_proj" => config["rank_pattern"]["v_proj"]
                .as_u64()
                .map_or(r, |x| x as usize),
            _ => r,
        };
        adapter_tensors.push(random_tensor(
            &format!("{PEFT_PREFIX}model.layers.0.self_attn.{m}.lora_A.weight"),
            factor_dtype,
            &[r, inp],
            &mut rng,
            0.5,
        ));
        adapter_tensors.push(random_tensor(
            &format!("{PEFT_PREFIX}model.layers.0.self_attn.{m}.lora_B.weight"),
            factor_dtype,
            &[out, r],
            &mut rng,
            0.05,
        ));
    }
    let adapter = write_adapter(&s.path("adapter"), &config, &adapter_tensors);
    fs::write(
        adapter.join("tokenizer_config.json"),
        "{\"chat_template\": \"dpo\"}\n",
    )
    .unwrap();
    fs::write(adapter.join("README.md"), "# my DPO adapter\n").unwrap();
    Llama {
        base,
        adapter,
        base_tensors: base_tensors
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect(),
        adapter_tensors: adapter_tensors
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect(),
    }
}

impl Llama {
    pub fn factors(&self, module: &str) -> (Vec<f64>, Vec<f64>, usize) {
        let a = &self.adapter_tensors[&format!("{PEFT_PREFIX}{module}.lora_A.weight")];
        let b = &self.adapter_tensors[&format!("{PEFT_PREFIX}{module}.lora_B.weight")];
        (a.values(), b.values(), a.shape[0])
    }

    /// The expected merged weight of a Linear module.
    pub fn expected_linear(&self, module: &str, s: f64, alpha: f64) -> Vec<f64> {
        let w0 = self.base_tensors[&format!("{module}.weight")].values();
        let shape = &self.base_tensors[&format!("{module}.weight")].shape;
        let (a, b, r) = self.factors(module);
        merged(&w0, &product(&b, &a, shape[0], r, shape[1]), s, alpha)
    }
}
