#!/usr/bin/env python3
"""Optional check (not run by CI; needs torch, transformers and peft): loads an adapter
that `expo extrapolate --as adapter` wrote, merges it into its base with PEFT, and compares
the merged weights with the checkpoint that `expo extrapolate --as model` wrote for the
same α. PEFT merges in the base dtype after upcasting the factors to f32, expo in f64
with one rounding, so the two may differ by one rounding (1 ULP of the base dtype).

Usage:
  expo extrapolate --sft BASE --aligned ADAPTER --alpha 0.3 --output /tmp/expo-adapter
  expo extrapolate --sft BASE --aligned ADAPTER --alpha 0.3 --as model --output /tmp/expo-model
  python3 scripts/check_adapter_with_peft.py BASE /tmp/expo-adapter /tmp/expo-model
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def ulp(x):
    """One unit in the last place of each element of x, in x's dtype."""
    return (torch.nextafter(x.abs(), torch.full_like(x, float("inf"))) - x.abs()).to(torch.float64)


def main():
    base, adapter, model = sys.argv[1:4]
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, torch_dtype="auto"), adapter)
    merged = merged.merge_and_unload().state_dict()
    import glob
    import os

    expo = {}
    for f in sorted(glob.glob(os.path.join(model, "*.safetensors"))):
        expo.update(load_file(f))
    worst, exact, total = 0.0, 0, 0
    for name, theirs in merged.items():
        ours = expo.get(name)
        if ours is None:
            continue  # tied weights are stored once
        diff = (ours.to(torch.float64) - theirs.to(torch.float64)).abs()
        in_ulps = (diff / ulp(ours).clamp_min(1e-300)).max().item()
        worst = max(worst, in_ulps)
        exact += int((diff == 0).sum())
        total += diff.numel()
    print(f"{exact}/{total} elements identical; largest difference {worst:.2f} ULP")
    sys.exit(0 if worst <= 1.0 else 1)


if __name__ == "__main__":
    main()
