#!/usr/bin/env python3
"""sani vs PyTorch / Hugging Face transformers, side by side on this machine: prints every ratio
of the performance issue as a markdown table (needs torch and transformers; CI does not run it).

    cargo run --release -- demo            # once: the demo model and notes in sani-demo/
    python3 scripts/compare.py [--demo sani-demo] [--threads 1,2] [--skip train,sanitize,scaling,eval]

1. Training step (forward + backward + AdamW), tokens/s from the fastest of the timed steps
   (best of two runs each, interleaved; noise on a shared machine only adds time):
   `cargo bench --bench train_step` vs scripts/bench_torch_step.py, same configs and threads.
2. `sani sanitize --config configs/paper.toml` on the demo model and notes vs
   scripts/sanitize_torch.py (same erasure and masked repair, same hyperparameters): wall time
   and peak RSS of each process (os.wait4), then `sani eval` on both outputs (exact
   regurgitation rate, held-out non-sensitive perplexity) to show the quality matches.
3. Scaling: the same sanitize on the demo notes repeated 1x, 2x, 4x.
4. Regurgitation eval on the demo model: `cargo bench --bench eval_throughput -- --model ...`
   (sani's `regurgitation`, batch 16, prompts of up to 256 tokens as in the demo) vs
   scripts/bench_hf_generate.py (HF `generate`, batched with KV cache, identical prompts and
   lengths; --check confirms both produce the same greedy tokens).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANI = os.path.join(ROOT, "target", "release", "sani")


def run(cmd, **kw):
    """Runs cmd; returns (stdout, wall seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return out, wall


def run_measured(cmd):
    """Runs cmd and returns (stdout, wall seconds, peak RSS MB) using os.wait4."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err.read()[-3000:]}")
        return out.read(), wall, ru.ru_maxrss / 1024


def json_lines(text):
    return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    import transformers
    return f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}, transformers {transformers.__version__}"


def train(threads, steps, rows):
    for t in threads:
        for cfg in ("gpt2-8k", "gpt2-50k", "llama-32k"):
            s_best, t_best = None, None
            for _ in range(2):  # interleaved, best median of two runs each
                out, _ = run(["cargo", "bench", "-q", "--bench", "train_step", "--", cfg,
                              "--threads", str(t), "--steps", str(steps), "--json"])
                s = json_lines(out)[0]
                out, _ = run([sys.executable, "scripts/bench_torch_step.py", "--config", cfg,
                              "--threads", str(t), "--steps", str(steps), "--json"])
                p = json_lines(out)[0]
                # The fastest step: timing noise on a shared machine only ever adds time.
                for r in (s, p):
                    r["tokens_per_s"] = 8 * 128 * 1e3 / r["min_step_ms"]
                s_best = s if s_best is None or s["tokens_per_s"] > s_best["tokens_per_s"] else s_best
                t_best = p if t_best is None or p["tokens_per_s"] > t_best["tokens_per_s"] else t_best
            rows.append((f"training step {cfg}, {t} thread(s)",
                         f"{s_best['tokens_per_s']:.0f} tok/s, {s_best['peak_rss_mb']:.0f} MB",
                         f"{t_best['tokens_per_s']:.0f} tok/s, {t_best['peak_rss_mb']:.0f} MB",
                         f"{s_best['tokens_per_s'] / t_best['tokens_per_s']:.2f}x speed (target >= 1.0)"))
            print(rows[-1], flush=True)


def eval_quality(model_dir, demo, tag):
    path = os.path.join(tempfile.gettempdir(), f"sani-compare-eval-{tag}.json")
    cmd = [SANI, "eval", "--model", model_dir, "--sensitive", os.path.join(demo, "notes.jsonl"),
           "--regurgitation", "--perplexity", os.path.join(demo, "heldout.jsonl"), "--prefix-tokens", "256",
           "--json", path, "--quiet"]
    run_measured(cmd)
    with open(path) as f:
        r = json.load(f)
    return r["regurgitation"]["total"]["exact_rate"], r["perplexity"]["non_sensitive"]["perplexity"]


def sanitize(threads, demo, rows):
    model = os.path.join(demo, "med-gpt")
    notes = os.path.join(demo, "notes.jsonl")
    cfg = os.path.join(ROOT, "configs", "paper.toml")
    tmp = tempfile.mkdtemp(prefix="sani-compare-")
    before = eval_quality(model, demo, "before")
    for t in threads:
        s_out, t_out = os.path.join(tmp, f"sani-{t}"), os.path.join(tmp, f"torch-{t}")
        s_runs, t_runs = [], []
        for _ in range(2):
            s_runs.append(run_measured([SANI, "sanitize", "--model", model, "--sensitive", notes, "--config", cfg,
                                        "--out", s_out, "--force", "--quiet", "--threads", str(t)])[1:])
            t_runs.append(run_measured([sys.executable, "scripts/sanitize_torch.py", "--model", model,
                                        "--sensitive", notes, "--config", cfg, "--out", t_out, "--force",
                                        "--quiet", "--threads", str(t)])[1:])
        (sw, sm), (tw, tm) = min(s_runs), min(t_runs)
        sq, tq = eval_quality(s_out, demo, f"sani-{t}"), eval_quality(t_out, demo, f"torch-{t}")
        rows.append((f"sanitize, paper config, demo model, {t} thread(s)",
                     f"{sw:.1f} s, {sm:.0f} MB; exact {sq[0]:.1%}, ppl {sq[1]:.2f}",
                     f"{tw:.1f} s, {tm:.0f} MB; exact {tq[0]:.1%}, ppl {tq[1]:.2f}",
                     f"{sw / tw:.2f}x time (target <= 0.5), {sm / tm:.2f}x memory (target <= 0.5)"))
        print(rows[-1], flush=True)
    rows.append(("(before sanitizing)", f"exact {before[0]:.1%}, ppl {before[1]:.2f}", "", ""))
    shutil.rmtree(tmp, ignore_errors=True)


def scaling(demo, rows):
    model = os.path.join(demo, "med-gpt")
    cfg = os.path.join(ROOT, "configs", "paper.toml")
    tmp = tempfile.mkdtemp(prefix="sani-scaling-")
    with open(os.path.join(demo, "notes.jsonl")) as f:
        docs = [json.loads(l) for l in f if l.strip()]
    base = None
    for k in (1, 2, 4):
        path = os.path.join(tmp, f"notes-{k}x.jsonl")
        with open(path, "w") as f:
            for rep in range(k):
                for d in docs:
                    f.write(json.dumps({**d, "id": f"{d['id']}-{rep}"}) + "\n")
        out = os.path.join(tmp, f"out-{k}")
        _, wall, rss = run_measured([SANI, "sanitize", "--model", model, "--sensitive", path, "--config", cfg,
                                     "--out", out, "--force", "--quiet", "--threads", "1"])
        with open(os.path.join(out, "sani_report.json")) as f:
            tokens = json.load(f)["total_tokens"]
        base = base or wall / tokens
        rows.append((f"sanitize, notes x{k}, 1 thread", f"{tokens} tokens: {wall:.1f} s, {rss:.0f} MB",
                     "", f"{wall / tokens / base:.2f}x time per token of x1"))
        print(rows[-1], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


def evaluation(threads, demo, rows):
    work = os.path.join(ROOT, "target", "bench-eval-demo")
    model = os.path.join(demo, "med-gpt")
    for t in threads:
        out, _ = run(["cargo", "bench", "-q", "--bench", "eval_throughput", "--", "--model", model,
                      "--notes", os.path.join(demo, "notes.jsonl"), "--prefix-tokens", "256", "--out", work,
                      "--threads", str(t), "--json"])
        s = next(r for r in json_lines(out) if r["batch"] == 16)
        out, _ = run([sys.executable, "scripts/bench_hf_generate.py", work, "--model", model,
                      "--threads", str(t), "--check", "--json"])
        h = json_lines(out)[0]
        check = next((l for l in out.splitlines() if l.startswith("check:")), "")
        rows.append((f"regurgitation eval, demo model, {s['spans']} spans, batch 16, {t} thread(s)",
                     f"{s['spans_per_s']:.0f} spans/s", f"{h['spans_per_s']:.0f} spans/s ({check[7:]})",
                     f"{s['spans_per_s'] / h['spans_per_s']:.2f}x (target >= 2)"))
        print(rows[-1], flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default=os.path.join(ROOT, "sani-demo"), help="output of `sani demo`")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per run")
    ap.add_argument("--skip", default="", help="comma-separated: train,sanitize,scaling,eval")
    a = ap.parse_args()
    threads = sorted({int(t) for t in a.threads.split(",")})
    skip = set(filter(None, a.skip.split(",")))
    if not os.path.isdir(os.path.join(a.demo, "med-gpt")):
        sys.exit(f"{a.demo}/med-gpt not found: run `cargo run --release -- demo` first (or pass --demo DIR)")
    run(["cargo", "build", "--release", "-q", "--benches", "--bins"])
    rows = []
    if "train" not in skip:
        train(threads, a.steps, rows)
    if "sanitize" not in skip:
        sanitize(threads, a.demo, rows)
    if "scaling" not in skip:
        scaling(a.demo, rows)
    if "eval" not in skip:
        evaluation(threads, a.demo, rows)
    print(f"\nmachine: {machine()}\n")
    print("| what | sani | PyTorch / HF transformers | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
