#!/usr/bin/env python3
"""HF transformers side of the side-by-side eval-throughput benchmark (CPU, eager, float32).

Runs the exact workload that `cargo bench --bench eval_throughput -- --out DIR` wrote:
DIR/model (the model directory) and DIR/prompts.jsonl (per span: prompt_ids, max_new_tokens and
sani's greedy generated_ids).  Prompts are sorted by length (stable, like sani), cut into batches
of --batch-size, left padded with an attention mask (pad id 0), and decoded greedily with
`generate(do_sample=False, max_new_tokens=<max of the batch>)`.

    python3 scripts/bench_hf_generate.py target/bench-eval --threads 1 [--batch-size 16] [--check]

--check compares HF's tokens with sani's: a span agrees when the first len(sani) tokens of HF's
continuation equal sani's generated ids (sani stops each row at its own max_new_tokens or at the
stop token; HF decodes the batch maximum, so only that prefix is comparable).

Timing covers generate() only (sani's timing also covers its teacher-forced extraction strength).
generate() decodes every row of a batch to the batch's largest max_new_tokens; rows whose
prompt would then run past the model's positions are decoded in a batch of their own.
"""
import argparse
import json
import os
import resource
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="output dir of the Rust bench (holds model/ and prompts.jsonl)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs (after one warm-up batch)")
    ap.add_argument("--check", action="store_true", help="compare generated ids with sani's")
    ap.add_argument("--model", help="model directory (default: DIR/model, else DIR)")
    ap.add_argument("--json", action="store_true", help="also print a JSON summary line")
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.set_num_threads(a.threads)

    model_dir = a.model or (os.path.join(a.dir, "model") if os.path.isdir(os.path.join(a.dir, "model")) else a.dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    rows = [json.loads(l) for l in open(os.path.join(a.dir, "prompts.jsonl"))]
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]["prompt_ids"]), i))
    batches = [order[i:i + a.batch_size] for i in range(0, len(order), a.batch_size)]
    PAD = 0
    eos = model.config.eos_token_id

    n_pos = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings

    def run_batch(idx):
        # generate() decodes every row to the batch's largest max_new_tokens; where that would
        # run a long prompt past the model's positions (sani stops each row at its own limit),
        # the rows that would overflow go to a batch of their own.
        m = max(rows[i]["max_new_tokens"] for i in idx)
        fits = [i for i in idx if len(rows[i]["prompt_ids"]) + m <= n_pos]
        if len(fits) < len(idx):
            rest = [i for i in idx if i not in set(fits)]
            out = dict(zip(fits, generate_batch(fits))) if fits else {}
            out.update(zip(rest, run_batch(rest)))
            return [out[i] for i in idx]
        return generate_batch(idx)

    def generate_batch(idx):
        prompts = [rows[i]["prompt_ids"] for i in idx]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        max_new = max(rows[i]["max_new_tokens"] for i in idx)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=0, pad_token_id=PAD, eos_token_id=eos, num_beams=1,
                                 top_k=None, top_p=None, temperature=None)
        return out[:, width:].tolist()

    run_batch(batches[0])  # warm-up
    times, generated = [], {}
    for _ in range(max(1, a.repeats)):
        t0 = time.perf_counter()
        for idx in batches:
            for i, row in zip(idx, run_batch(idx)):
                generated[i] = row
        times.append(time.perf_counter() - t0)

    # Tokens HF decoded per span, counted like sani: up to the span's own max_new_tokens, stopping
    # after a stop token (HF keeps decoding finished rows as padding, which is not counted).
    def effective(i):
        g = generated[i][: rows[i]["max_new_tokens"]]
        if eos is not None and eos in g:
            g = g[: g.index(eos) + 1]
        return g

    n = len(rows)
    gen_tokens = sum(len(effective(i)) for i in range(n))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, eager, float32, CPU, "
          f"threads {a.threads}, batch {a.batch_size}, {n} spans, {len(batches)} batches")
    print(f"{'run':>4} {'seconds':>8} {'spans/s':>10} {'gen_tok/s':>12}")
    for r, t in enumerate(times):
        print(f"{r:>4} {t:>8.2f} {n / t:>10.1f} {gen_tokens / t:>12.1f}")
    if a.json:
        print(json.dumps({"spans": n, "batch": a.batch_size, "best_seconds": min(times),
                          "spans_per_s": n / min(times), "threads": a.threads}))
    print(f"best {min(times):.2f}s; peak_rss_mb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
          f"(after imports {import_rss:.0f})")

    if a.check:
        if not all("generated_ids" in r for r in rows):
            sys.exit("prompts.jsonl has no generated_ids; rerun the Rust bench")
        agree, first_diff = 0, []
        for i, r in enumerate(rows):
            s = r["generated_ids"]
            if generated[i][: len(s)] == s:
                agree += 1
            elif len(first_diff) < 5:
                k = next((j for j, (x, y) in enumerate(zip(generated[i], s)) if x != y), len(s))
                first_diff.append((r["doc_id"], r["span_index"], k, s, generated[i][: len(s)]))
        print(f"check: {agree}/{n} spans agree with sani ({100 * agree / n:.1f}%)")
        for d in first_diff:
            print(f"  differs: {d[0]} span {d[1]} at token {d[2]}: sani {d[3]} hf {d[4]}")


if __name__ == "__main__":
    main()
