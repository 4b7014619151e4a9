#!/usr/bin/env python3
"""The training step on SmolLM2-135M's shape (batch 8 x 256, every tensor training), sani and
PyTorch eager alternately, printed as a table: issue 14's step target, measured side by side.

    python3 scripts/bench_real_step.py --model /tmp/real/memorized [--threads 2,1] [--rounds 2]
        [--steps 3] [--keep-mb 100000]

Each round runs, one after another: scripts/bench_torch_step.py (eager, every tensor training,
the real model's weights), `cargo bench --bench train_step -- smollm2-135m --checkpoint
--keep-mb K` (sani with activation checkpointing keeping up to K MiB of block activations; the
same shape, randomly initialized: the same work), and the same recomputing every block
(`--keep-mb 0`). tokens/s from each side's median step; peak RSS of each process; the last
column also compares each side's fastest step, which this VM's noise (a shared host: one side's
median can move 20% between runs) can only slow. One heavy job at a time: nothing else should
run. Not run in CI; needs torch and transformers.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_json(cmd):
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def torch_step(model, threads, steps):
    r = last_json([sys.executable, os.path.join(ROOT, "scripts", "bench_torch_step.py"),
                   "--config", "smollm2-135m", "--model", model, "--threads", str(threads),
                   "--json", "--steps", str(steps)])
    return r["tokens_per_s"], r["peak_rss_mb"], r["min_step_ms"]


def sani_step(threads, steps, keep_mb):
    r = last_json(["cargo", "bench", "-q", "--bench", "train_step", "--", "smollm2-135m",
                   "--threads", str(threads), "--checkpoint", "--keep-mb", str(keep_mb),
                   "--json", "--steps", str(steps)])
    return r["tokens_per_s"], r["peak_rss_mb"], r["min_step_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the real model's HF directory")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--keep-mb", type=int, default=100000)
    a = ap.parse_args()
    subprocess.run(["cargo", "bench", "--bench", "train_step", "--no-run"], cwd=ROOT, check=True)
    rows = []
    for threads in [int(t) for t in a.threads.split(",")]:
        for _ in range(a.rounds):
            torch = torch_step(a.model, threads, a.steps)
            kept = sani_step(threads, a.steps, a.keep_mb)
            recomputed = sani_step(threads, a.steps, 0)
            rows.append((threads, torch, kept, recomputed))
            print(f"threads {threads}: torch {torch}, kept {kept}, recomputed {recomputed}",
                  file=sys.stderr, flush=True)
    print(f"| threads | PyTorch eager | sani, --keep-mb {a.keep_mb} | sani, recomputing "
          "| kept against PyTorch | fastest step against fastest |")
    print("|---|---|---|---|---|---|")
    fmt = lambda r: f"{r[0]:.1f} tok/s, {r[1] / 1000:.2f} GB"
    for threads, torch, kept, recomputed in rows:
        print(f"| {threads} | {fmt(torch)} | {fmt(kept)} | {fmt(recomputed)} | "
              f"{kept[0] / torch[0]:.2f}x speed, {kept[1] / torch[1]:.2f}x memory | "
              f"{torch[2] / 1e3:.1f} s vs {kept[2] / 1e3:.1f} s: {torch[2] / kept[2]:.2f}x |")


if __name__ == "__main__":
    main()
