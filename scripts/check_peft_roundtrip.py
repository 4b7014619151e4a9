#!/usr/bin/env python3
"""Checks that transformers and PEFT load what `sani` writes for adapters (run from the repo
root after `cargo build --release`; needs torch, transformers, peft; never in CI):

    python3 scripts/check_peft_roundtrip.py

1. `sani sanitize --adapter-dir` (merge only: --epochs 0 --erase-fraction 0) on each adapter
   fixture: transformers loads the output; logits against PEFT's merge_and_unload().
2. `sani sanitize --adapter lora --erase-fraction 0 --output-format adapter`: PEFT loads the
   adapter on the base; merged logits against `--output-format model` with the same seed.
Prints one line per check and exits 1 if any difference is above 1e-4.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANI = os.path.join(ROOT, "target", "release", "sani")
FIX = os.path.join(ROOT, "tests", "fixtures")
IDS = torch.tensor([[5, 17, 33, 90, 120, 7, 8, 200, 31, 44]])


def sani(*args):
    subprocess.run([SANI, *args, "-q"], check=True, stdout=subprocess.DEVNULL)


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def main():
    work = tempfile.mkdtemp(prefix="sani-peft-")
    notes = os.path.join(work, "notes.jsonl")
    sani("demo", "--notes-only", "--out", os.path.join(work, "demo"))
    with open(os.path.join(work, "demo", "notes.jsonl")) as f, open(notes, "w") as g:
        g.writelines(f.readlines()[:3])
    worst = 0.0
    for adapter, base in [("lora_llama", "llama_gqa"), ("lora_gpt2_rslora", "gpt2_f32")]:
        out = os.path.join(work, f"merged-{adapter}")
        sani("sanitize", "--model", os.path.join(FIX, base), "--adapter-dir",
             os.path.join(FIX, "adapters", adapter), "--sensitive", notes, "--out", out,
             "--epochs", "0", "--erase-fraction", "0")
        peft = PeftModel.from_pretrained(load(os.path.join(FIX, base)),
                                         os.path.join(FIX, "adapters", adapter)).merge_and_unload()
        d = (logits(peft) - logits(load(out))).abs().max().item()
        worst = max(worst, d)
        print(f"--adapter-dir {adapter}: transformers loads sani's merged model; "
              f"logits vs PEFT merge_and_unload max diff {d:.2e}")
    for base in ["llama_gqa", "gpt2_f32"]:
        outs = {}
        for fmt in ["model", "adapter"]:
            outs[fmt] = os.path.join(work, f"{base}-{fmt}")
            sani("sanitize", "--model", os.path.join(FIX, base), "--sensitive", notes, "--out",
                 outs[fmt], "--adapter", "lora", "--erase-fraction", "0", "--epochs", "1",
                 "--max-seq-len", "48", "--output-format", fmt)
        peft = PeftModel.from_pretrained(load(os.path.join(FIX, base)), outs["adapter"])
        cfg = json.load(open(os.path.join(outs["adapter"], "adapter_config.json")))
        d = (logits(peft.merge_and_unload()) - logits(load(outs["model"]))).abs().max().item()
        worst = max(worst, d)
        print(f"--output-format adapter on {base} (targets {cfg['target_modules']}): PEFT loads "
              f"it; merged logits vs --output-format model max diff {d:.2e}")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
