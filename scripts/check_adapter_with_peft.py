#!/usr/bin/env python3
"""Optional check (not run by CI; needs torch, transformers and peft): loads an adapter
that `expo extrapolate --as adapter` wrote, merges it into its base with PEFT, and compares
the merged weights with the checkpoint that `expo extrapolate --as model` wrote for the
same α.

PEFT computes ΔW = s·B·A in f32 (the factors' dtype), rounds it to the base dtype and adds
it there; expo evaluates θ0 + (1+α)·s·B·A in f64 and rounds once. Where θ0 and ΔW nearly
cancel (θ0 ≈ −ΔW, or the r terms of B·A cancelling each other), the result is much smaller
than its operands and PEFT's intermediate roundings show as many ULPs *of the result*; the
bound that holds is at the operands' magnitude. Two comparisons, per adapted weight:

- the adapter merged exactly (θ0 + s·B·A in f64 with PEFT's per-module scaling and
  orientation, rounded once) against `--as model`: they differ only by the rounding of
  (1+α)·B in the adapter, so at most 1 ULP (base dtype) of max(|θ0|, |expo|, s·|B|·|A|);
- PEFT's own `merge_and_unload()` against `--as model`, in the same ULPs: at most 2 — one for the rounding of (1+α)·B, one for PEFT's
  f32 evaluation (rank-r sum, scaling, add; bf16/f16 bases hide most of it).

Exit status 0 when both hold and the adapter moved some weight.

Checked with torch 2.15.0, transformers 5.24.0, peft 0.21.2 on the fixtures of
scripts/make_real_peft_fixtures.py.

Usage:
  expo extrapolate --sft BASE --aligned ADAPTER --alpha 0.3 --output /tmp/expo-adapter
  expo extrapolate --sft BASE --aligned ADAPTER --alpha 0.3 --as model --output /tmp/expo-model
  python3 scripts/check_adapter_with_peft.py BASE /tmp/expo-adapter /tmp/expo-model
"""
import glob
import os
import sys

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

# Significand bits (with the implicit one) and frexp exponent of the smallest normal.
FORMATS = {torch.float32: (24, -125), torch.bfloat16: (8, -125), torch.float16: (11, -13),
           torch.float64: (53, -1021)}


def ulp(magnitude, dtype):
    """One unit in the last place, in `dtype`, of numbers of the given f64 magnitudes."""
    bits, min_exp = FORMATS[dtype]
    _, exp = torch.frexp(magnitude)
    return torch.ldexp(torch.ones_like(magnitude), exp.clamp_min(min_exp) - bits)


def main():
    base, adapter, model = sys.argv[1:4]
    loaded = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    theta0 = {n: t.detach().clone() for n, t in loaded.state_dict().items()}
    peft_model = PeftModel.from_pretrained(loaded, adapter)
    # Per adapted base weight, from PEFT's own per-module scaling and orientation (after
    # rank_pattern/alpha_pattern/rsLoRA and Conv1D's fan_in_fan_out): ΔW in f64, and
    # s·|B|·|A|, the magnitude of the rank-r sum.
    delta64, rank_terms = {}, {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            a = module.lora_A["default"].weight.detach().to(torch.float64)
            b = module.lora_B["default"].weight.detach().to(torch.float64)
            s = module.scaling["default"]
            t = (lambda w: w.T) if module.fan_in_fan_out else (lambda w: w)
            key = name[len("base_model.model."):] + ".weight"
            delta64[key] = t(b @ a) * s
            rank_terms[key] = t(b.abs() @ a.abs()) * s
    merged = peft_model.merge_and_unload().state_dict()

    expo = {}
    for f in sorted(glob.glob(os.path.join(model, "*.safetensors"))):
        expo.update(load_file(f))
    worst, worst_result, exact, total, moved, where = 0.0, 0.0, 0, 0, 0, ""
    for name, theirs in merged.items():
        ours = expo.get(name)
        if ours is None:
            continue  # tied weights are stored once
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        t0, o = theta0[name].to(torch.float64), ours.to(torch.float64)
        diff = (o - theirs.to(torch.float64)).abs()
        magnitude = torch.maximum(t0.abs(), o.abs())
        if name in rank_terms:
            magnitude = torch.maximum(magnitude, rank_terms[name])
        in_ulps = diff / ulp(magnitude, ours.dtype)
        if in_ulps.max().item() > worst:
            i = int(in_ulps.argmax())
            worst, where = in_ulps.max().item(), (
                f"{name}[{i}]: θ0 {t0.flatten()[i].item():.9g}, expo {o.flatten()[i].item():.9g}, "
                f"PEFT {theirs.flatten()[i].item():.9g}")
        worst_result = max(worst_result, (diff / ulp(o.abs(), ours.dtype)).max().item())
        exact += int((diff == 0).sum())
        total += diff.numel()
        moved += int(not torch.equal(ours, theta0[name]))
    # expo's adapter merged exactly (f64, one rounding) must be --as model to within one
    # rounding: they differ only by the rounding of (1+α)·B in the adapter.
    worst64 = 0.0
    for name, d in delta64.items():
        ours = expo[name]
        exact_merge = (theta0[name].to(torch.float64) + d).to(ours.dtype).to(torch.float64)
        diff = (ours.to(torch.float64) - exact_merge).abs()
        magnitude = torch.maximum(torch.maximum(theta0[name].to(torch.float64).abs(),
                                                ours.to(torch.float64).abs()), rank_terms[name])
        worst64 = max(worst64, (diff / ulp(magnitude, ours.dtype)).max().item())
    print(f"adapter merged in f64 vs --as model: largest difference {worst64:.2f} ULP of the operands")
    print(f"PEFT merge_and_unload vs --as model: {exact}/{total} elements identical; {moved} tensors moved by the adapter; largest "
          f"difference {worst:.2f} ULP of the operands ({worst_result:.2f} ULP of the result)")
    if worst > 0:
        print(f"largest at {where}")
    sys.exit(0 if worst64 <= 1.0 and worst <= 2.0 and moved > 0 else 1)


if __name__ == "__main__":
    main()
