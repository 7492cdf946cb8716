//! Generates the bundled example pair `examples/tiny-sft` and `examples/tiny-dpo`.
//!
//! ```text
//! cargo run --example make_tiny              # writes examples/tiny-sft and examples/tiny-dpo
//! cargo run --example make_tiny -- OUT_DIR   # writes OUT_DIR/tiny-sft and OUT_DIR/tiny-dpo
//! cargo run --release -- extrapolate --sft examples/tiny-sft --aligned examples/tiny-dpo \
//!     --alpha 0.3 --output /tmp/expo-demo
//! ```
//!
//! Both directories hold a tiny, randomly initialised LLaMA-shaped model in bf16 with Hugging
//! Face tensor names, a `config.json` for `LlamaForCausalLM`, a byte-level tokenizer and the
//! usual side files, so that `transformers` loads them. `tiny-sft` (θ0) is one
//! `model.safetensors`; `tiny-dpo` (θ1) is θ0 plus a small, sparse perturbation (1 in 64 elements),
//! sharded into two files with a `model.safetensors.index.json`, and has its own
//! `generation_config.json`, a chat template and a model card. The weights are synthetic: the
//! models produce noise, they only exercise the tooling.
//!
//! The output is deterministic: a seeded PRNG written below (splitmix64) and only basic f64
//! arithmetic (no `ln`/`cos`, whose last bit may differ between platforms), so re-running
//! gives byte-identical files. `tests/examples.rs` checks that the committed files match.

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

/// Vocabulary: 3 special tokens and the 253 bytes 0x03..=0xFF (byte `b` has id `b`).
pub const VOCAB_SIZE: usize = 256;
pub const HIDDEN_SIZE: usize = 32;
pub const INTERMEDIATE_SIZE: usize = 128;
pub const NUM_LAYERS: usize = 2;
pub const NUM_HEADS: usize = 4;
pub const NUM_KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = HIDDEN_SIZE / NUM_HEADS;
pub const MAX_POSITIONS: usize = 512;

/// Standard deviation of the random matrices (transformers' `initializer_range`).
const INIT_STD: f64 = 0.02;
/// Standard deviation of the norm weights around 1.
const NORM_STD: f64 = 0.05;
/// Size of a change θ1 − θ0 relative to the scale of each tensor.
const DELTA_REL: f64 = 1e-2;
/// One element in this many is changed. Like a real DPO step, the whole-model relative
/// change ‖θ1 − θ0‖/‖θ0‖ then stays small (about 1e-3), below the threshold at which expo
/// warns that the premise of extrapolation is doubtful; dense changes of 1e-2 would not be
/// representable in bf16 at a realistic size.
const CHANGE_ONE_IN: u64 = 64;
const SEED: u64 = 0x5eed_0e4b_0000_0001;

const UNK: &str = "<unk>";
const BOS: &str = "<s>";
const EOS: &str = "</s>";
const SPECIAL_TOKENS: [&str; 3] = [UNK, BOS, EOS];

pub const SFT_DIR: &str = "tiny-sft";
pub const DPO_DIR: &str = "tiny-dpo";

type Result<T> = std::result::Result<T, Box<dyn Error>>;

#[allow(dead_code)] // unused when tests/examples.rs includes this file as a module
fn main() -> Result<()> {
    let out = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"),
    };
    generate(&out)?;
    println!(
        "wrote {} and {}",
        out.join(SFT_DIR).display(),
        out.join(DPO_DIR).display()
    );
    Ok(())
}

/// Writes `dir/tiny-sft` and `dir/tiny-dpo` (creating them, overwriting their files).
pub fn generate(dir: &Path) -> Result<()> {
    let sft_dir = dir.join(SFT_DIR);
    let dpo_dir = dir.join(DPO_DIR);
    fs::create_dir_all(&sft_dir)?;
    fs::create_dir_all(&dpo_dir)?;

    let specs = tensor_specs();
    let sft: Vec<Vec<bf16>> = specs.iter().map(sft_values).collect();
    let dpo: Vec<Vec<bf16>> = specs
        .iter()
        .zip(&sft)
        .map(|(spec, theta0)| dpo_values(spec, theta0))
        .collect();

    // θ0: one file.
    let all: Vec<usize> = (0..specs.len()).collect();
    fs::write(
        sft_dir.join("model.safetensors"),
        safetensors_file(&specs, &sft, &all)?,
    )?;

    // θ1: two shards (embeddings and layer 0 | the rest) and the index.
    let first: Vec<usize> = (0..specs.len()).filter(|&i| specs[i].shard == 0).collect();
    let second: Vec<usize> = (0..specs.len()).filter(|&i| specs[i].shard == 1).collect();
    let shard_names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    for (ids, name) in [&first, &second].into_iter().zip(shard_names) {
        fs::write(dpo_dir.join(name), safetensors_file(&specs, &dpo, ids)?)?;
        for &i in ids {
            weight_map.insert(specs[i].name.clone(), json!(name));
        }
    }
    let total_size: usize = specs.iter().map(|s| s.numel() * 2).sum();
    write_json(
        &dpo_dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
    )?;

    // Side files.
    for d in [&sft_dir, &dpo_dir] {
        write_json(&d.join("config.json"), &config())?;
        write_json(&d.join("tokenizer.json"), &tokenizer())?;
        write_json(&d.join("tokenizer_config.json"), &tokenizer_config())?;
        write_json(
            &d.join("special_tokens_map.json"),
            &json!({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": UNK}),
        )?;
    }
    write_json(
        &sft_dir.join("generation_config.json"),
        &json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}),
    )?;
    write_json(
        &dpo_dir.join("generation_config.json"),
        &json!({
            "bos_token_id": 1,
            "do_sample": true,
            "eos_token_id": 2,
            "max_new_tokens": 64,
            "pad_token_id": 2,
            "temperature": 0.7,
            "top_p": 0.9
        }),
    )?;
    fs::write(dpo_dir.join("chat_template.jinja"), CHAT_TEMPLATE)?;
    fs::write(dpo_dir.join("README.md"), DPO_README)?;
    Ok(())
}

/// One weight tensor: name, shape, how to initialise it and which θ1 shard holds it.
struct Spec {
    name: String,
    shape: Vec<usize>,
    is_norm: bool,
    shard: usize,
}

impl Spec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The tensors of a `LlamaForCausalLM`, in its state-dict order.
fn tensor_specs() -> Vec<Spec> {
    let (h, i, v) = (HIDDEN_SIZE, INTERMEDIATE_SIZE, VOCAB_SIZE);
    let (q, kv) = (NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM);
    let spec = |name: String, shape: &[usize], is_norm: bool, shard: usize| Spec {
        name,
        shape: shape.to_vec(),
        is_norm,
        shard,
    };
    let mut specs = vec![spec("model.embed_tokens.weight".into(), &[v, h], false, 0)];
    for layer in 0..NUM_LAYERS {
        let p = format!("model.layers.{layer}");
        let shard = usize::from(layer > 0);
        for (name, shape) in [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, q]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            specs.push(spec(format!("{p}.{name}.weight"), &shape, false, shard));
        }
        for name in ["input_layernorm", "post_attention_layernorm"] {
            specs.push(spec(format!("{p}.{name}.weight"), &[h], true, shard));
        }
    }
    specs.push(spec("model.norm.weight".into(), &[h], true, 1));
    specs.push(spec("lm_head.weight".into(), &[v, h], false, 1));
    specs
}

/// splitmix64 (Steele, Lea & Flood 2014).
struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for one tensor and purpose, independent of the order tensors are made in.
    fn for_tensor(name: &str, salt: u64) -> Self {
        // FNV-1a of the name.
        let mut hash = 0xcbf2_9ce4_8422_2325_u64;
        for b in name.bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut rng = SplitMix64(SEED ^ salt ^ hash);
        rng.next_u64();
        rng
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Approximately standard normal: the sum of four uniforms (Irwin–Hall), centred and
    /// scaled to unit variance. Only + and × so every platform gets the same bits.
    fn normal(&mut self) -> f64 {
        let sum = self.uniform() + self.uniform() + self.uniform() + self.uniform();
        (sum - 2.0) * 1.732_050_807_568_877_2 // sqrt(3) = 1 / sqrt(4/12)
    }
}

/// θ0: random matrices with std [`INIT_STD`], norm weights around 1.
fn sft_values(spec: &Spec) -> Vec<bf16> {
    let mut rng = SplitMix64::for_tensor(&spec.name, 0);
    (0..spec.numel())
        .map(|_| {
            let x = if spec.is_norm {
                1.0 + NORM_STD * rng.normal()
            } else {
                INIT_STD * rng.normal()
            };
            bf16::from_f64(x)
        })
        .collect()
}

/// θ1 = θ0 + δ on one element in [`CHANGE_ONE_IN`], with δ about [`DELTA_REL`] of the
/// tensor's scale, rounded to bf16.
fn dpo_values(spec: &Spec, theta0: &[bf16]) -> Vec<bf16> {
    let mut rng = SplitMix64::for_tensor(&spec.name, 1);
    let scale = if spec.is_norm { 1.0 } else { INIT_STD };
    theta0
        .iter()
        .map(|&x| {
            let delta = DELTA_REL * scale * rng.normal();
            if rng.next_u64().is_multiple_of(CHANGE_ONE_IN) {
                bf16::from_f64(x.to_f64() + delta)
            } else {
                x
            }
        })
        .collect()
}

/// A safetensors file holding the tensors `ids` (the crate orders them by name).
fn safetensors_file(specs: &[Spec], values: &[Vec<bf16>], ids: &[usize]) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = ids
        .iter()
        .map(|&i| values[i].iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = ids
        .iter()
        .zip(&bytes)
        .map(|(&i, b)| {
            let view = TensorView::new(Dtype::BF16, specs[i].shape.clone(), b)?;
            Ok((specs[i].name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(views, Some(metadata))?)
}

/// Writes `value` pretty-printed (2-space indent) with sorted keys and a final newline.
fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(&sorted(value))?;
    text.push('\n');
    fs::write(path, text)?;
    Ok(())
}

/// `value` with every object's keys in sorted order, whatever map type serde_json uses.
fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let entries: BTreeMap<&String, Value> =
                map.iter().map(|(k, v)| (k, sorted(v))).collect();
            Value::Object(entries.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

fn config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITIONS,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "pad_token_id": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": null,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "vocab_size": VOCAB_SIZE
    })
}

/// GPT-2's byte-to-character map used by byte-level tokenizers.
fn byte_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        char::from(byte)
    } else {
        let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
        char::from_u32(256 + rank).expect("valid code point")
    }
}

/// A byte-level BPE tokenizer without merges: ids 0–2 are the special tokens and byte `b` is
/// id `b` for b ≥ 3 (bytes 0x00–0x02 become `<unk>`).
fn tokenizer() -> Value {
    let mut vocab = serde_json::Map::new();
    for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert(token.to_string(), json!(id));
    }
    for byte in SPECIAL_TOKENS.len()..VOCAB_SIZE {
        let byte = u8::try_from(byte).expect("a byte");
        vocab.insert(byte_char(byte).to_string(), json!(byte));
    }
    let added_tokens: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, token)| {
            json!({
                "id": id,
                "content": token,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": true
            })
        })
        .collect();
    let byte_level = json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": true,
        "use_regex": true
    });
    let special = |type_id: u32| json!({"SpecialToken": {"id": BOS, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special(0), sequence("A", 0)],
            "pair": [special(0), sequence("A", 0), special(1), sequence("B", 1)],
            "special_tokens": {BOS: {"id": BOS, "ids": [1], "tokens": [BOS]}}
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": UNK,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": []
        }
    })
}

fn tokenizer_config() -> Value {
    let mut decoder = serde_json::Map::new();
    for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
        decoder.insert(
            id.to_string(),
            json!({
                "content": token,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": true
            }),
        );
    }
    json!({
        "added_tokens_decoder": decoder,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": false,
        "eos_token": EOS,
        "model_max_length": MAX_POSITIONS,
        "pad_token": EOS,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK
    })
}

/// Zephyr's chat template.
const CHAT_TEMPLATE: &str = "{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n' + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}
";

const DPO_README: &str = "---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags:
- synthetic
- expo-example
---

# tiny-dpo (synthetic example)

A synthetic, untrained checkpoint bundled with expo to try `expo extrapolate` in seconds.
It is **not** a real model: its weights are random and it generates noise.

- `../tiny-sft` plays θ0, the SFT model: a tiny LLaMA (vocabulary 256, hidden size 32,
  2 layers, intermediate size 128, 4 attention heads, 2 key/value heads) in bf16, in one
  `model.safetensors`.
- This directory plays θ1, the aligned model: θ0 plus a small random perturbation (1 in 64
  elements changed by about 1e-2 of the tensor's scale), sharded into two files with a `model.safetensors.index.json`, with its own
  `generation_config.json` and chat template.

```sh
cargo run --release -- extrapolate --sft examples/tiny-sft --aligned examples/tiny-dpo \\
    --alpha 0.3 --output /tmp/expo-demo
```

Both directories are generated by `cargo run --example make_tiny` (deterministic: re-running
it gives byte-identical files).
";
