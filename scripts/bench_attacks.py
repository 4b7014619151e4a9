#!/usr/bin/env python3
"""The attack suite's table before and after sanitizing, on the demo's memorizing models: the
demo's GPT-2 and a Llama of the same size trained the same way.  Not part of CI.

    cargo build --release
    python3 scripts/bench_attacks.py --work /tmp/attacks [--variants default,hardened]
        [--samples 10] [--threads 2] [--variant NAME='--forget-weight 0.5 ...']

Steps (each skipped when its output exists, so a rerun resumes):
1. `sani demo --out WORK/demo`: the notes, the held-out notes, the tokenizer and the memorizing
   GPT-2 (`med-gpt`).
2. `sani finetune --init` a Llama config (4 layers, hidden 96, 4 heads / 2 KV heads, tied head)
   on the same notes with the demo's fine-tuning settings: `med-llama`.
3. For each model, the input and each sanitize variant (`default`; `hardened` is
   configs/hardened.toml; `--variant NAME=ARGS` adds one with those sanitize flags, and
   `--models med-gpt` restricts the models): `sani eval --attacks --relearn-on heldout.jsonl` with whole-note
   prompts, the held-out notes as control and perplexity set.  The relearning attack is the
   issue's: one epoch on the held-out notes of other patients at lr 5e-4.

Prints one row per model and variant: sanitize time, the worst exact rate over the extraction
attacks (and which), the worst label against its chance level (the control set's exact rate),
the relearned rate, the membership AUC with its chance level, held-out perplexity.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANI = os.path.join(ROOT, "target", "release", "sani")
VARIANTS = {
    "default": [],
    "hardened": ["--config", os.path.join(ROOT, "configs", "hardened.toml")],
}


def run(args, cwd, ok=(0,)):
    print("$ sani " + " ".join(args), file=sys.stderr)
    p = subprocess.run([SANI] + args, cwd=cwd, stdout=subprocess.DEVNULL)
    if p.returncode not in ok:
        sys.exit(f"sani {' '.join(args)}: exit {p.returncode}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/attacks")
    ap.add_argument("--variants", default="default,hardened")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="an extra variant: NAME and the sanitize flags it adds (repeatable)")
    ap.add_argument("--models", default="med-gpt,med-llama")
    a = ap.parse_args()
    for v in a.variant:
        name, _, flags = v.partition("=")
        VARIANTS[name] = shlex.split(flags)
    common = ["--threads", str(a.threads), "--quiet"]
    demo = os.path.join(a.work, "demo")
    if not os.path.isdir(demo):
        os.makedirs(a.work, exist_ok=True)
        run(["demo", "--out", demo] + common, a.work)
    if not os.path.isdir(os.path.join(demo, "med-llama")):
        vocab = json.load(open(os.path.join(demo, "init", "config.json")))["vocab_size"]
        cfg = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
            "initializer_range": 0.02,
        }
        with open(os.path.join(demo, "init", "llama_config.json"), "w") as f:
            json.dump(cfg, f)
        run(["finetune", "--init", "init/llama_config.json", "--tokenizer", "init/tokenizer.json",
             "--data", "notes.jsonl", "--out", "med-llama", "--epochs", "40", "--lr", "3e-3",
             "--warmup-steps", "20", "--seed", "7"] + common, demo)
    rows = []
    extra = [v.partition("=")[0] for v in a.variant]
    for model in a.models.split(","):
        for variant in ["input"] + [v for v in a.variants.split(",") if v] + extra:
            target, seconds = model, None
            if variant != "input":
                target = f"{model}-{variant}"
                if not os.path.isdir(os.path.join(demo, target)):
                    t = time.time()
                    run(["sanitize", "--model", model, "--sensitive", "notes.jsonl", "--out",
                         target] + VARIANTS[variant] + common, demo)
                    seconds = time.time() - t
            report = os.path.join(demo, f"attacks_{target}.json")
            if not os.path.exists(report):
                run(["eval", "--model", target, "--sensitive", "notes.jsonl", "--control",
                     "heldout.jsonl", "--perplexity", "heldout.jsonl", "--prefix-tokens", "256",
                     "--attacks", "--attack-samples", str(a.samples), "--relearn-on",
                     "heldout.jsonl", "--json", report] + common, demo, ok=(0, 1))
            r = json.load(open(report))
            att = r["attacks"]
            extraction = [x for x in att["attacks"] if not x["attack"].startswith("relearned")]
            worst = max(extraction, key=lambda x: x["total"]["rate"])
            relearned = [x for x in att["attacks"] if x["attack"].startswith("relearned")]
            control = r["control"]["per_label"] if r.get("control") else {}
            # The label furthest above its chance level, over the extraction attacks.
            gaps = []
            for label in att["worst"]:
                rate = max(x["per_label"].get(label, {"rate": 0})["rate"] for x in extraction)
                gaps.append((rate - control.get(label, {}).get("exact_rate", 0.0), label, rate))
            gap, label, rate = max(gaps)
            worst_label = (f"{label} {rate:.1%} (+{gap * 100:.1f} pts over chance)" if rate > 0
                           else "every label 0%")
            rows.append({
                "model": model, "variant": variant,
                "sanitize_s": seconds,
                "worst": worst["total"]["rate"],
                "worst_attack": worst["attack"] if worst["total"]["hits"] else "none got one",
                "worst_label": worst_label,
                "relearned": relearned[0]["total"]["rate"] if relearned else None,
                "auc": att["membership"]["total"]["auc"],
                "auc_chance": (att.get("control_membership") or {}).get("total", {}).get("auc"),
                "ppl": r["perplexity"]["non_sensitive"]["perplexity"],
            })
    print("| model | variant | sanitize | worst exact (attack) | worst label vs chance | relearned "
          "| membership AUC (chance) | held-out ppl |")
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        s = "-" if x["sanitize_s"] is None else f"{x['sanitize_s']:.1f} s"
        rl = "-" if x["relearned"] is None else f"{x['relearned']:.2%}"
        ch = "-" if x["auc_chance"] is None else f"{x['auc_chance']:.3f}"
        print(f"| {x['model']} | {x['variant']} | {s} | {x['worst']:.2%} ({x['worst_attack']}) "
              f"| {x['worst_label']} | {rl} | {x['auc']:.3f} ({ch}) | {x['ppl']:.3f} |")


if __name__ == "__main__":
    main()
