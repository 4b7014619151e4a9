#!/usr/bin/env python3
"""PyTorch side of the side-by-side training-step benchmark (CPU, eager mode).

tokens/s from the median step time.  One step = forward + backward (HF loss with labels = input_ids) + AdamW step
(lr 1e-4, weight_decay 0.01) + zero_grad.  Batch 8 x seq 128, random ids (seq 256 for the real-size
shapes smollm2-135m, smollm2-360m, llama-1b, as in benches/train_step.rs; `--model DIR` loads
real weights of such a model instead of a random init).

    python3 scripts/bench_torch_step.py --config all --threads 1 --steps 5 [--json] [--checkpoint]

`--checkpoint` turns on transformers' gradient checkpointing (each block recomputed in the
backward pass), the counterpart of the Rust bench's `--checkpoint`.

With --config all each config runs in its own subprocess so peak_rss_mb is per config.
peak_rss_mb is the process's ru_maxrss (includes the Python/torch runtime; the table also
shows import_rss_mb, the ru_maxrss right after importing torch+transformers).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

BATCH = 8
SEQ = 128
CONFIGS = ["gpt2-8k", "gpt2-50k", "llama-32k"]
REAL = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, rope_theta=100000.0),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}


def build(name):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if name in ("gpt2-8k", "gpt2-50k"):
        vocab = 8192 if name == "gpt2-8k" else 50257
        cfg = GPT2Config(vocab_size=vocab, n_layer=4, n_embd=256, n_head=4, n_positions=128,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif name == "llama-32k":
        vocab = 32000
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=688,
                          max_position_embeddings=128, tie_word_embeddings=False,
                          bos_token_id=0, eos_token_id=0)
        model = LlamaForCausalLM(cfg)
    elif name in REAL:
        c = REAL[name]
        vocab = c["vocab_size"]
        cfg = LlamaConfig(**c, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
                          bos_token_id=0, eos_token_id=0)
        model = LlamaForCausalLM(cfg)
    else:
        raise SystemExit(f"unknown config {name!r}; choose from {CONFIGS + list(REAL)} or all")
    model.set_attn_implementation("eager")
    return model, vocab


def run_one(name, threads, steps, warmup, model_dir=None, checkpoint=False):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: F401  (import cost in baseline)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model_dir:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.set_attn_implementation("eager")
        vocab = model.config.vocab_size
    else:
        model, vocab = build(name)
    seq = 256 if name in REAL else SEQ
    if checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    ids = torch.randint(0, vocab, (BATCH, seq), dtype=torch.int64)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]  # median: this machine's timings are noisy
    nparams = sum(p.numel() for p in model.parameters())
    return {
        "config": name,
        "threads": threads,
        "tokens_per_s": round(BATCH * seq / step_s, 1),
        "step_ms": round(step_s * 1e3, 2),
        "median_step_ms": round(step_s * 1e3, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params": nparams,
        "min_step_ms": round(min(times) * 1e3, 2),
        "import_rss_mb": round(base_rss, 1),
        "checkpoint": checkpoint,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="all", help=f"one of {CONFIGS} or 'all'")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="one JSON line per config")
    ap.add_argument("--model", help="real weights for a real-size config (an HF Llama directory)")
    ap.add_argument("--checkpoint", action="store_true", help="gradient checkpointing")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a._child:
        print(json.dumps(run_one(a.config, a.threads, a.steps, a.warmup, a.model, a.checkpoint)))
        return

    names = CONFIGS if a.config == "all" else [a.config]
    if a.config != "all" and a.config not in CONFIGS + list(REAL):
        raise SystemExit(f"unknown config {a.config!r}; choose from {CONFIGS + list(REAL)} or all")
    results = []
    for n in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--config", n,
               "--threads", str(a.threads), "--steps", str(a.steps), "--warmup", str(a.warmup)]
        if a.model:
            cmd += ["--model", a.model]
        if a.checkpoint:
            cmd += ["--checkpoint"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            raise SystemExit(f"{n} failed (rc {p.returncode})")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results.append(r)
        if a.json:
            keys = ("config", "threads", "tokens_per_s", "step_ms", "min_step_ms", "peak_rss_mb", "checkpoint")
            print(json.dumps({k: r[k] for k in keys}), flush=True)

    if not a.json:
        import torch
        print(f"torch {torch.__version__}, eager, CPU, batch {BATCH} x seq {SEQ}, "
              f"AdamW(lr=1e-4, wd=0.01), {a.warmup} warmup + {a.steps} timed steps")
        print(f"{'config':<10} {'params':>11} {'threads':>7} {'step_ms':>10} {'min_ms':>10} "
              f"{'tokens/s':>10} {'peak_rss_mb':>11} {'import_rss_mb':>13}")
        for r in results:
            print(f"{r['config']:<10} {r['params']:>11,} {r['threads']:>7} {r['step_ms']:>10.1f} "
                  f"{r['min_step_ms']:>10.1f} {r['tokens_per_s']:>10.1f} {r['peak_rss_mb']:>11.1f} "
                  f"{r['import_rss_mb']:>13.1f}")
        print("peak_rss_mb = ru_maxrss of the whole process; import_rss_mb = the same right after "
              "importing torch+transformers (before building the model)")


if __name__ == "__main__":
    main()
