#!/usr/bin/env python3
"""Writes a randomly initialized, sharded Llama-shaped model directory (bf16 by default) for
memory measurements of sani's streaming erasure: weights are random, so nothing but sizes is
meaningful. Never for CI; do not commit the output.

    python3 scripts/make_sharded_model.py --tokenizer-from /tmp/real/base --out /tmp/big \
        --hidden 2048 --intermediate 5632 --layers 24 --shard-size 500MB
    # SmolLM2-360M's shape, for the README's scaling table:
    python3 scripts/make_sharded_model.py --tokenizer-from /tmp/real/base --out /tmp/m360 \
        --hidden 960 --intermediate 2560 --layers 32 --heads 15 --kv-heads 5 --tie

The tokenizer (tokenizer.json, tokenizer_config.json) is copied from --tokenizer-from, whose
config.json also gives vocab size and special token ids.
"""
import argparse, json, shutil, time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--tokenizer-from", required=True, type=Path)
ap.add_argument("--out", required=True, type=Path)
ap.add_argument("--hidden", type=int, default=2048)
ap.add_argument("--intermediate", type=int, default=5632)
ap.add_argument("--layers", type=int, default=24)
ap.add_argument("--heads", type=int, default=32)
ap.add_argument("--kv-heads", type=int, default=4)
ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
ap.add_argument("--shard-size", default="500MB")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--tie", action="store_true", help="tie the head to the embedding (SmolLM2 shapes)")
a = ap.parse_args()

src = json.loads((a.tokenizer_from / "config.json").read_text())
cfg = LlamaConfig(
    vocab_size=src["vocab_size"],
    hidden_size=a.hidden,
    intermediate_size=a.intermediate,
    num_hidden_layers=a.layers,
    num_attention_heads=a.heads,
    num_key_value_heads=a.kv_heads,
    max_position_embeddings=2048,
    bos_token_id=src.get("bos_token_id"),
    eos_token_id=src.get("eos_token_id"),
    pad_token_id=src.get("pad_token_id"),
    tie_word_embeddings=a.tie,
)
torch.manual_seed(a.seed)
t0 = time.time()
dtype = getattr(torch, a.dtype)
torch.set_default_dtype(dtype)
model = LlamaForCausalLM(cfg)
n = sum(p.numel() for p in model.parameters())
model.save_pretrained(a.out, max_shard_size=a.shard_size)
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(a.tokenizer_from / f, a.out / f)
files = sorted(p for p in a.out.iterdir() if p.suffix == ".safetensors")
print(f"{a.out}: {n / 1e9:.2f}B parameters in {a.dtype}, {len(files)} shards, "
      f"{sum(p.stat().st_size for p in files) / 2**30:.2f} GiB, largest "
      f"{max(p.stat().st_size for p in files) / 2**20:.0f} MiB ({time.time() - t0:.0f} s)")
