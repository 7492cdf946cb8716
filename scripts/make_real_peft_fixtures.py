#!/usr/bin/env python3
"""Writes tests/fixtures/peft-real/: tiny random models saved by transformers and LoRA
adapters saved by PEFT itself, for tests/adapter_peft.rs. Not run by CI (CI needs no
Python); the generated files are committed.

Written with: torch 2.15.0 (CPU), transformers 5.24.0, peft 0.21.2, safetensors 0.8.0.

Per case, tests/fixtures/peft-real/<case>/ holds
  base/     `model.save_pretrained(...)` of a tiny random model (config.json,
            model.safetensors, generation_config.json when transformers writes one);
  adapter/  `get_peft_model(model, LoraConfig(...)).save_pretrained(...)` after lora_A and
            lora_B were set to random non-zero values (as after DPO training; a fresh
            adapter has B = 0);
  merged.safetensors  PEFT's own `merge_and_unload()` of that adapter (θ1 = θ0 + ΔW, α = 0),
            only the adapted weights, under the base checkpoint's names: an independent
            check of ΔW's orientation and scaling.

Cases: Llama q_proj/v_proj on an f32 base and on a bf16 base; Qwen2 bf16 with rsLoRA,
rank_pattern and alpha_pattern, bf16 factors; GPT-2 Conv1D (c_attn, the square attn.c_proj,
mlp.c_proj, c_fc) on an f16 base; GPT-NeoX fused query_key_value (f32).

Usage (from the repository root, in a venv with torch, transformers, peft, safetensors):
  python scripts/make_real_peft_fixtures.py [OUT_DIR]
Re-running it writes every tensor bit for bit again (fixed seeds, CPU); only the order of
`target_modules` in adapter_config.json may change (PEFT saves a Python set; PYTHONHASHSEED).
"""
import os
import shutil
import sys

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Qwen2Config,
)

H, VOCAB = 16, 32


def llama(**kw):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, **kw)


def qwen2(**kw):
    return Qwen2Config(vocab_size=VOCAB, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, **kw)


def gpt2(**kw):
    return GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=H, n_layer=1, n_head=2,
                      bos_token_id=0, eos_token_id=0, **kw)


def neox(**kw):
    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, **kw)


CASES = {
    "llama_f32": (llama, torch.float32, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), True),
    "llama_bf16": (llama, torch.bfloat16, dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]), True),
    "qwen2_bf16": (qwen2, torch.bfloat16, dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}), False),
    "gpt2_f16": (gpt2, torch.float16, dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), True),
    "neox_f32": (neox, torch.float32, dict(r=2, lora_alpha=4, target_modules=["query_key_value"]), True),
}


def make(out, name, make_config, dtype, lora, autocast):
    torch.manual_seed(sum(name.encode()))
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    model = AutoModelForCausalLM.from_config(make_config()).to(dtype).eval()
    model.save_pretrained(os.path.join(d, "base"))
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **lora),
                                autocast_adapter_dtype=autocast)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_A" in pname:
                p.copy_(torch.randn_like(p, dtype=torch.float32) * 0.3)
            elif "lora_B" in pname:
                p.copy_(torch.randn_like(p, dtype=torch.float32) * 0.002)
    peft_model.save_pretrained(os.path.join(d, "adapter"))
    # The base checkpoint's names of the adapted weights ("base_model.model." stripped).
    adapted = [n[len("base_model.model."):] + ".weight"
               for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    merged = peft_model.merge_and_unload().state_dict()
    save_file({n: merged[n].contiguous() for n in adapted}, os.path.join(d, "merged.safetensors"),
              metadata={"format": "pt"})


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/peft-real"
    for name, (make_config, dtype, lora, autocast) in CASES.items():
        make(out, name, make_config, dtype, lora, autocast)
        print(f"wrote {os.path.join(out, name)}")


if __name__ == "__main__":
    main()
