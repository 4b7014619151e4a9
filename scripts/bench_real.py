#!/usr/bin/env python3
"""Sanitize variants on the real-model benchmark, side by side: wall time, peak RSS, efficacy.
Not part of CI.  Needs the model from scripts/real_model.py (and torch for --torch).

    python3 scripts/real_model.py --work /tmp/real          # once
    cargo build --release
    python3 scripts/bench_real.py --work /tmp/real [--threads 2] [--variants old,default,...]
        [--torch] [--eval-bench]

For each variant: `sani sanitize` on WORK/memorized with WORK/notes/notes.jsonl (framing
`--doc-separator '<|im_end|>'`, as the model was fine-tuned), timed with its peak RSS (wait4),
then `sani eval` of the output on the same notes (exact regurgitation with the whole preceding
note as the prompt, `--prefix-tokens 256`; worst label) and on
WORK/notes/heldout.jsonl (perplexity of non-sensitive tokens, against the input model's).
--torch adds scripts/sanitize_torch.py with the paper config next to sani's paper config.
--eval-bench times `sani eval --regurgitation` against HF generate (load + generation) on the
memorized model: `cargo bench --bench eval_throughput` writes the prompts, bench_hf_generate.py
decodes the same ones.

--baseline BIN [--rounds N] times another build's default sanitize against this build's, one
after the other, N rounds (wall and peak of each run, and the ratio of the summed walls): the
issue-time default is the build of c43e7f3 (`git worktree add /tmp/issue14-base c43e7f3`, then
`cargo build --release` there; it has no --doc-separator, so it runs with its own framing).

Variants run one at a time (the numbers mean nothing if two heavy jobs share the 2 cores).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANI = os.path.join(ROOT, "target", "release", "sani")
SEP = ["--doc-separator", "<|im_end|>"]

# name -> extra sanitize flags.  "old" is the default before the real-size work.
VARIANTS = {
    "old": ["--adapter", "none", "--epochs", "6", "--lr", "5e-4", "--train-modules", "all",
            "--checkpoint-activations", "false", "--batch-size", "8", "--grad-accum", "1",
            "--forget-weight", "0", "--erase-layers", "4"],
    "default": [],
    "paper": ["--config", os.path.join(ROOT, "configs", "paper.toml")],
}


def measured(cmd, env=None):
    """(stdout, stderr, wall s, peak RSS MB, exit code) of cmd."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), wall, ru.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def check(res, cmd):
    if res[4] not in (0, 1):
        sys.exit(f"failed ({res[4]}): {' '.join(cmd)}\n{res[1][-3000:]}")
    return res


def evaluate(model, notes, threads):
    js = tempfile.mktemp(suffix=".json")
    cmd = [SANI, "eval", "--model", model, "--sensitive", f"{notes}/notes.jsonl", "--regurgitation", "--perplexity",
           f"{notes}/heldout.jsonl", "--prefix-tokens", "256", "--json", js, "--threads", str(threads), "--quiet", *SEP]
    _, _, wall, rss, _ = check(measured(cmd), cmd)
    with open(js) as f:
        r = json.load(f)
    os.unlink(js)
    reg = r["regurgitation"]
    rates = {k: v["exact"] / max(v["measured"], 1) for k, v in reg["per_label"].items()}
    worst = max(rates, key=rates.get)
    return {
        "exact": reg["total"]["exact"] / max(reg["total"]["measured"], 1),
        "worst": f"{worst} {rates[worst]:.1%}",
        "ppl": r["perplexity"]["non_sensitive"]["perplexity"],
        "eval_s": wall,
        "eval_mb": rss,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="old,default")
    ap.add_argument("--extra", action="append", default=[],
                    help="NAME=FLAGS: one more variant, e.g. 'lora3=--adapter lora --epochs 3'")
    ap.add_argument("--torch", action="store_true")
    ap.add_argument("--eval-bench", action="store_true")
    ap.add_argument("--baseline", help="another build's sani binary: its default against this one's")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if a.baseline:
        return against_baseline(a)
    model = os.path.join(a.work, "memorized")
    notes = os.path.join(a.work, "notes")
    outs = os.path.join(a.work, "out")
    os.makedirs(outs, exist_ok=True)
    variants = {k: VARIANTS[k] for k in a.variants.split(",") if k}
    for e in a.extra:
        name, flags = e.split("=", 1)
        variants[name] = flags.split()

    before = evaluate(model, notes, a.threads)
    rows = [("input (memorized)", None, None, before)]
    print(f"input: exact {before['exact']:.1%} (worst {before['worst']}), ppl {before['ppl']:.3f}", flush=True)
    for name, flags in variants.items():
        out = os.path.join(outs, name)
        cmd = [SANI, "sanitize", "--model", model, "--sensitive", f"{notes}/notes.jsonl", "--out", out,
               "--force", "--quiet", "--threads", str(a.threads), *SEP, *flags]
        _, _, wall, rss, _ = check(measured(cmd), cmd)
        ev = evaluate(out, notes, a.threads)
        rows.append((f"sani {name}: {' '.join(flags) or '(defaults)'}", wall, rss, ev))
        print(f"{name}: {wall:.1f} s, {rss:.0f} MB, exact {ev['exact']:.1%} (worst {ev['worst']}), "
              f"ppl {ev['ppl']:.3f}", flush=True)
    if a.torch:
        out = os.path.join(outs, "torch-paper")
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "sanitize_torch.py"), "--model", model,
               "--sensitive", f"{notes}/notes.jsonl", "--out", out, "--config",
               os.path.join(ROOT, "configs", "paper.toml"), "--threads", str(a.threads), "--force"]
        _, _, wall, rss, _ = check(measured(cmd), cmd)
        ev = evaluate(out, notes, a.threads)
        rows.append(("PyTorch paper (scripts/sanitize_torch.py)", wall, rss, ev))

    print("\n| run | wall s | peak RSS MB | exact | worst label | held-out ppl (non-sensitive) |")
    print("|---|---|---|---|---|---|")
    for name, wall, rss, ev in rows:
        w = f"{wall:.1f}" if wall else "-"
        m = f"{rss:.0f}" if rss else "-"
        d = (ev["ppl"] / before["ppl"] - 1) * 100
        print(f"| {name} | {w} | {m} | {ev['exact']:.1%} | {ev['worst']} | {ev['ppl']:.3f} ({d:+.1f}%) |")
    base = {r[0].split(":")[0]: r for r in rows}
    if "sani old" in base and "sani default" in base:
        o, n = base["sani old"], base["sani default"]
        print(f"\ndefault vs old default: {n[1] / o[1]:.2f}x time, {n[2] / o[2]:.2f}x peak memory")

    if a.eval_bench:
        bench_dir = os.path.join(a.work, "bench-eval")
        cmd = ["cargo", "bench", "--bench", "eval_throughput", "--", "--model", model, "--notes",
               f"{notes}/notes.jsonl", "--out", bench_dir, "--threads", str(a.threads), "--repeats", "1"]
        res = check(measured(cmd), cmd)
        print(res[0][-1500:])
        cmd = [SANI, "eval", "--model", model, "--sensitive", f"{notes}/notes.jsonl", "--regurgitation",
               "--threads", str(a.threads), "--quiet"]
        _, _, sani_wall, sani_rss, _ = check(measured(cmd), cmd)
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_hf_generate.py"), bench_dir, "--model", model,
               "--threads", str(a.threads), "--repeats", "1", "--check", "--json"]
        out, _, hf_wall, hf_rss, _ = check(measured(cmd), cmd)
        print(out[-1500:])
        print(f"\neval (load + generation, {a.threads} threads): sani {sani_wall:.1f} s / {sani_rss:.0f} MB, "
              f"HF generate {hf_wall:.1f} s / {hf_rss:.0f} MB: {hf_wall / sani_wall:.2f}x")


def against_baseline(a):
    """The default sanitize of `a.baseline` and of this build, alternately, `a.rounds` rounds."""
    model = os.path.join(a.work, "memorized")
    notes = os.path.join(a.work, "notes", "notes.jsonl")
    runs = {"baseline": [], "this build": []}
    for r in range(a.rounds):
        for name, binary, framing in [("baseline", a.baseline, []), ("this build", SANI, SEP)]:
            out = os.path.join(a.work, "out", f"vs-{name.replace(' ', '-')}")
            cmd = [binary, "sanitize", "--model", model, "--sensitive", notes, "--out", out, "--force",
                   "--quiet", "--threads", str(a.threads), *framing]
            _, _, wall, rss, _ = check(measured(cmd), cmd)
            runs[name].append((wall, rss))
            print(f"round {r + 1}, {name}: {wall:.1f} s, {rss:.0f} MB", flush=True)
    print("\n| build | walls s | peak RSS MB |")
    print("|---|---|---|")
    for name, rs in runs.items():
        print(f"| {name} | {', '.join(f'{w:.1f}' for w, _ in rs)} | {max(m for _, m in rs):.0f} |")
    (bw, bm), (nw, nm) = [(sum(w for w, _ in rs), max(m for _, m in rs)) for rs in runs.values()]
    ratios = [n[0] / b[0] for b, n in zip(runs["baseline"], runs["this build"])]
    print(f"\nthis build vs baseline: {nw / bw:.2f}x time (summed walls; per round "
          f"{', '.join(f'{x:.2f}' for x in ratios)}), {nm / bm:.2f}x peak memory")


if __name__ == "__main__":
    main()
