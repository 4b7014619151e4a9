#!/usr/bin/env python3
"""The matrix products of one full-parameter training step on SmolLM2-135M's shape (batch 8 x
256, every tensor training, no recomputation), timed one by one with PyTorch's BLAS, and their
sum: the time a step cannot go below on this machine with that BLAS, however little else it does.

    python3 scripts/bench_gemm_floor.py [--threads 2] [--reps 5] [--step-ms MS] [--peak]

For each projection of a block (q, k, v, o, gate, up, down), the head (tied, 2,040 positions x
49,152), and the attention's batched products (scores and values, forward and backward): the
forward x @ W^T, the input's gradient g @ W and the weight's g^T @ x. `--step-ms`: a measured
step time (e.g. scripts/bench_torch_step.py's step_ms) to print the best speed-up over it that
a step at the floor would reach. `--peak`: also run `cargo bench --bench cpu_peak` (this CPU's
peak multiply-add rate at the same threads) and print the step's FLOPs at that rate and at the
best rate any product reached here: the fastest step the hardware allows, whatever the kernel.
Not run in CI; needs torch.
"""
import argparse
import json
import os
import subprocess
import time

import torch

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 576, 1536, 30, 9, 3, 64, 49152
BATCH, SEQ = 8, 256
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(fn, reps):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def linear_products(m, k, n, reps):
    """ms of the forward, the input's gradient and the weight's gradient of a [m, k] -> [m, n]
    projection."""
    x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    return [timed(f, reps) for f in (lambda: x @ w.t(), lambda: g @ w, lambda: g.t() @ x)]


def attention_products(reps):
    """ms of the attention's batched products (scores, values; their four gradients) of one
    layer, full squares (a causal kernel can skip half)."""
    bh = BATCH * HEADS
    q, k, v = (torch.randn(bh, SEQ, HEAD_DIM) for _ in range(3))
    p, gp = torch.randn(bh, SEQ, SEQ), torch.randn(bh, SEQ, SEQ)
    go = torch.randn(bh, SEQ, HEAD_DIM)
    fns = (
        lambda: q @ k.transpose(1, 2),
        lambda: p @ v,
        lambda: gp @ k,
        lambda: gp.transpose(1, 2) @ q,
        lambda: go @ v.transpose(1, 2),
        lambda: p.transpose(1, 2) @ go,
    )
    return [timed(f, reps) for f in fns]


def cpu_peak_gflops(threads):
    """benches/cpu_peak.rs at `threads` threads: the CPU's peak f32 multiply-add rate."""
    out = subprocess.run(["cargo", "bench", "-q", "--bench", "cpu_peak", "--", "--threads",
                          str(threads), "--json"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gflops"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--step-ms", type=float, default=None)
    ap.add_argument("--peak", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = BATCH * SEQ
    kv = KV_HEADS * HEAD_DIM
    block = {
        "q_proj": (HIDDEN, HIDDEN),
        "k_proj": (HIDDEN, kv),
        "v_proj": (HIDDEN, kv),
        "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (HIDDEN, INTER),
        "up_proj": (HIDDEN, INTER),
        "down_proj": (INTER, HIDDEN),
    }
    rows, total, flops, best_rate = [], 0.0, 0.0, 0.0
    for name, (k, n) in block.items():
        t = linear_products(m, k, n, a.reps)
        rows.append((f"{name} x {LAYERS} layers", [x * LAYERS for x in t]))
        flops += 3 * 2 * m * k * n * LAYERS
        best_rate = max(best_rate, 2 * m * k * n / min(t) / 1e9)
    t = attention_products(a.reps)
    rows.append((f"attention x {LAYERS} layers (full squares)", [sum(t) / 3 * LAYERS] * 3))
    t = linear_products(BATCH * (SEQ - 1), HIDDEN, VOCAB, a.reps)
    rows.append(("head (tied embedding)", t))
    flops += 3 * 2 * BATCH * (SEQ - 1) * HIDDEN * VOCAB
    print(f"threads {a.threads}, batch {BATCH} x {SEQ}, SmolLM2-135M shape, every tensor training")
    print(f"{'products':44} {'forward':>9} {'d input':>9} {'d weight':>9} {'sum ms':>9}")
    for name, t in rows:
        total += sum(t)
        print(f"{name:44} {t[0] * 1e3:9.1f} {t[1] * 1e3:9.1f} {t[2] * 1e3:9.1f} {sum(t) * 1e3:9.1f}")
    print(f"{'floor: every product once':44} {'':>29} {total * 1e3:9.1f}")
    dense = total - sum(rows[len(block)][1])
    print(f"projection and head products: {flops / 1e12:.2f} TFLOP in {dense:.2f} s, "
          f"{flops / 1e9 / dense:.0f} GFLOP/s")
    if a.step_ms:
        print(f"a step at the floor against a {a.step_ms:.0f} ms step: "
              f"{a.step_ms / (total * 1e3):.2f}x")
    if a.peak:
        # The attention's six products per layer, causal: half of each square.
        attention = 6 * 2 * BATCH * HEADS * SEQ * SEQ * HEAD_DIM / 2 * LAYERS
        step_flops = flops + attention
        peak = cpu_peak_gflops(a.threads)
        print(f"step: {step_flops / 1e12:.3f} TFLOP ({attention / 1e9:.0f} GFLOP of it causal "
              f"attention)")
        for what, rate in (("the CPU's peak (benches/cpu_peak.rs)", peak),
                           ("the best product's rate in this run", best_rate)):
            seconds = step_flops / 1e9 / rate
            line = f"at {what}, {rate:.1f} GFLOP/s: {seconds:.2f} s"
            if a.step_ms:
                line += f", {a.step_ms / 1e3 / seconds:.2f}x a {a.step_ms:.0f} ms step"
            print(line)


if __name__ == "__main__":
    main()
