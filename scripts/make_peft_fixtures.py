#!/usr/bin/env python3
"""Writes tests/fixtures/peft/: small base checkpoints and LoRA adapters in PEFT's exact
on-disk layout, for tests/adapter_fixtures.rs.

PEFT itself needs torch, whose PyPI wheel (with its CUDA dependencies) is several GB, so
this script writes what `PeftModel.save_pretrained` writes without it (numpy only):

- `adapter_model.safetensors` with `{"format": "pt"}` metadata, keys
  `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (adapter name removed),
  tensors ordered as the safetensors library orders them (dtype alignment, then name);
- `adapter_config.json` with the fields PEFT 0.15 writes for a LoraConfig;
- bases named as transformers saves them: Llama/Qwen `model.layers.N…`, GPT-2 `h.N…`
  (no `transformer.` prefix, Conv1D weights [in, out], `fan_in_fan_out: true` as PEFT sets
  it for Conv1D), GPT-NeoX `gpt_neox.layers.N.attention.query_key_value` (fused, [3h, h]).

Values are random with a fixed seed; lora_B is non-zero (a trained adapter, not a fresh
one). Usage: python3 scripts/make_peft_fixtures.py [OUT_DIR]
"""
import json
import os
import struct
import sys

import numpy as np

ALIGN = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}
PREFIX = "base_model.model."


def to_bytes(x, dtype):
    x = np.asarray(x, dtype=np.float64)
    if dtype == "F64":
        return x.astype("<f8").tobytes()
    if dtype == "F32":
        return x.astype("<f4").tobytes()
    if dtype == "F16":
        return x.astype("<f2").tobytes()
    # bf16: f32 bits, rounded to nearest even
    b = x.astype("<f4").view("<u4").astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return b.astype("<u2").tobytes()


def write_st(path, tensors):
    """tensors: {name: (dtype, shape, values)}; ordered like the safetensors library."""
    order = sorted(tensors, key=lambda n: (-ALIGN[tensors[n][0]], n))
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in order:
        dtype, shape, values = tensors[name]
        raw = to_bytes(values, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def lora_config(base, r, alpha, targets, fan_in_fan_out=False, task="CAUSAL_LM"):
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base,
        "bias": "none", "corda_config": None, "eva_config": None, "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": alpha, "lora_bias": False, "lora_dropout": 0.0,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "peft_type": "LORA", "r": r, "rank_pattern": {}, "revision": None,
        "target_modules": sorted(targets), "task_type": task, "trainable_token_indices": None,
        "use_dora": False, "use_rslora": False,
    }


def fixture(out, name, base, base_dtype, config_json, adapter_dtype, modules, r, alpha, conv1d=False, model_prefix=""):
    """modules: {base weight name: (out_features, in_features)}."""
    rng = np.random.default_rng(sum(name.encode()))
    d = os.path.join(out, name)
    write_st(os.path.join(d, "base", "model.safetensors"),
             {n: (base_dtype, s, rng.standard_normal(s) * 0.5) for n, s in base.items()})
    with open(os.path.join(d, "base", "config.json"), "w") as f:
        json.dump(config_json, f, indent=2)
    tensors = {}
    for weight, (o, i) in modules.items():
        key = PREFIX + model_prefix + weight[: -len(".weight")]
        tensors[key + ".lora_A.weight"] = (adapter_dtype, (r, i), rng.standard_normal((r, i)) * 0.3)
        tensors[key + ".lora_B.weight"] = (adapter_dtype, (o, r), rng.standard_normal((o, r)) * 0.05)
    write_st(os.path.join(d, "adapter", "adapter_model.safetensors"), tensors)
    leaves = sorted({w.split(".")[-2] for w in modules})
    with open(os.path.join(d, "adapter", "adapter_config.json"), "w") as f:
        json.dump(lora_config(f"fixtures/{name}", r, alpha, leaves, conv1d), f, indent=2)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/peft"
    h, kv, vocab = 16, 8, 32
    llama_base = {
        "model.embed_tokens.weight": (vocab, h),
        "model.layers.0.self_attn.q_proj.weight": (h, h),
        "model.layers.0.self_attn.k_proj.weight": (kv, h),
        "model.layers.0.self_attn.v_proj.weight": (kv, h),
        "model.layers.0.self_attn.o_proj.weight": (h, h),
        "model.layers.0.input_layernorm.weight": (h,),
        "model.norm.weight": (h,),
        "lm_head.weight": (vocab, h),
    }
    qv = {"model.layers.0.self_attn.q_proj.weight": (h, h), "model.layers.0.self_attn.v_proj.weight": (kv, h)}
    fixture(out, "llama_f32", llama_base, "BF16",
            {"model_type": "llama", "tie_word_embeddings": False}, "F32", qv, 4, 8)
    qwen_base = dict(llama_base)
    qwen_base.update({
        "model.layers.0.self_attn.q_proj.bias": (h,),
        "model.layers.0.self_attn.k_proj.bias": (kv,),
        "model.layers.0.self_attn.v_proj.bias": (kv,),
    })
    del qwen_base["lm_head.weight"]
    qkvo = dict(qv)
    qkvo["model.layers.0.self_attn.k_proj.weight"] = (kv, h)
    qkvo["model.layers.0.self_attn.o_proj.weight"] = (h, h)
    fixture(out, "qwen_bf16", qwen_base, "BF16",
            {"model_type": "qwen2", "tie_word_embeddings": True}, "BF16", qkvo, 8, 16)
    gpt2_base = {
        "wte.weight": (vocab, h), "wpe.weight": (8, h),
        "h.0.ln_1.weight": (h,), "h.0.ln_1.bias": (h,),
        "h.0.attn.c_attn.weight": (h, 3 * h), "h.0.attn.c_attn.bias": (3 * h,),
        "h.0.attn.c_proj.weight": (h, h), "h.0.attn.c_proj.bias": (h,),
        "h.0.mlp.c_fc.weight": (h, 4 * h), "h.0.mlp.c_proj.weight": (4 * h, h),
        "ln_f.weight": (h,), "ln_f.bias": (h,),
    }
    # Conv1D: (out, in) of the LoRA; the base stores [in, out].
    gpt2_mods = {"h.0.attn.c_attn.weight": (3 * h, h), "h.0.attn.c_proj.weight": (h, h), "h.0.mlp.c_proj.weight": (h, 4 * h)}
    fixture(out, "gpt2_f16", gpt2_base, "F16", {"model_type": "gpt2", "n_embd": h}, "F16",
            gpt2_mods, 4, 8, conv1d=True, model_prefix="transformer.")
    neox_base = {
        "gpt_neox.embed_in.weight": (vocab, h),
        "gpt_neox.layers.0.attention.query_key_value.weight": (3 * h, h),
        "gpt_neox.layers.0.attention.query_key_value.bias": (3 * h,),
        "gpt_neox.layers.0.attention.dense.weight": (h, h),
        "gpt_neox.final_layer_norm.weight": (h,),
        "embed_out.weight": (vocab, h),
    }
    fixture(out, "neox_f32", neox_base, "F32", {"model_type": "gpt_neox", "tie_word_embeddings": False}, "F32",
            {"gpt_neox.layers.0.attention.query_key_value.weight": (3 * h, h)}, 2, 4)


if __name__ == "__main__":
    main()
