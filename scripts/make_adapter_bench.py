#!/usr/bin/env python3
"""Writes the inputs of the LoRA benchmark in the README: a Qwen2-0.5B-shaped bf16 base
(~1 GB, random values), a full "aligned" checkpoint of the same shape, and an r=16 LoRA
adapter (f32 factors) on every q/k/v/o/gate/up/down projection.

Needs only numpy (safetensors files are written by hand: 8-byte header length, JSON
header, data). Usage: python3 scripts/make_adapter_bench.py DIR [LAYERS]
"""
import json
import os
import struct
import sys

import numpy as np

HIDDEN, INTER, KV, VOCAB = 896, 4864, 128, 151936


def bf16(x):
    """float32 → bf16 bits (round to nearest even)."""
    b = x.astype(np.float32).view(np.uint32)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).astype(np.uint16)


def write_st(path, tensors):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, dtype, shape, data in tensors:
        raw = data.tobytes()
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def main():
    out = sys.argv[1]
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    rng = np.random.default_rng(0)
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    projs = {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (KV, HIDDEN),
        "self_attn.v_proj": (KV, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTER, HIDDEN),
        "mlp.up_proj": (INTER, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTER),
    }
    for i in range(layers):
        shapes.append((f"model.layers.{i}.input_layernorm.weight", (HIDDEN,)))
        for p, s in projs.items():
            shapes.append((f"model.layers.{i}.{p}.weight", s))
        shapes.append((f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,)))
    shapes.append(("model.norm.weight", (HIDDEN,)))
    for kind, noise in (("base", 0.0), ("aligned", 1e-3)):
        d = os.path.join(out, kind)
        os.makedirs(d, exist_ok=True)
        tensors = []
        for name, s in shapes:
            x = rng.standard_normal(s, dtype=np.float32) * 0.02
            tensors.append((name, "BF16", s, bf16(x)))
        write_st(os.path.join(d, "model.safetensors"), tensors)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "qwen2", "tie_word_embeddings": True}, f)
    d = os.path.join(out, "adapter")
    os.makedirs(d, exist_ok=True)
    r = 16
    tensors = []
    for i in range(layers):
        for p, (o, n) in projs.items():
            key = f"base_model.model.model.layers.{i}.{p}"
            tensors.append((key + ".lora_A.weight", "F32", (r, n), rng.standard_normal((r, n), dtype=np.float32) * 0.01))
            tensors.append((key + ".lora_B.weight", "F32", (o, r), rng.standard_normal((o, r), dtype=np.float32) * 0.01))
    write_st(os.path.join(d, "adapter_model.safetensors"), tensors)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 32,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}, f)


if __name__ == "__main__":
    main()
