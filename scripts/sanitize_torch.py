#!/usr/bin/env python3
"""PyTorch + transformers equivalent of `sani sanitize --config configs/paper.toml`, for
side-by-side timing and memory comparisons (CPU, eager, float32).  Not part of sani.

    python3 scripts/sanitize_torch.py --model DIR --sensitive notes.jsonl --out OUT \
        [--config configs/paper.toml] [--threads N] [--force]

The configuration is resolved like sani's: configs/default.toml, then --config on top.  The
supported subset is sani's paper setting: select = "random", reset = "reinit" (or "zero"),
repair-target = "mask", train-scope = "all", stride = 0.  Steps:

1. Erase: in each of the last `erase-layers` blocks, `erase-fraction` of the MLP units (rounded)
   are chosen at random; unit j = column j of GPT-2's c_fc weight (Conv1D, [d, 4d]) and its bias,
   row j of c_proj's weight; for Llama-family models row j of gate_proj/up_proj and column j of
   down_proj.  reinit draws normal(0, initializer_range), GPT-2 c_proj with
   initializer_range / sqrt(2 * n_layer); biases are zeroed.
2. Repair: each note is tokenized with tokenizer.json (no special tokens), the BOS (the
   tokenizer's own if its post-processor adds one, else none, as sani's bos = "auto") and the
   `doc-separator` of the config (before and after the note) frame each note, the sequence is cut into windows of max-seq-len (capped at the
   model's positions), windows shorter than 2 tokens are dropped; every token overlapping a
   sensitive span (char offsets, sani's rule) gets label -100.  AdamW (lr, betas 0.9/0.999,
   eps 1e-8, weight decay only on >=2-D tensors), linear decay to 0 over all steps (after
   `warmup-steps` linear warmup), grad-norm clipping, `batch-size` windows per step (right padded,
   attention mask), shuffled every epoch, `epochs` epochs.  Loss: mean NLL over the unmasked
   targets of the step.  Dropout is off (the model stays in eval mode), as in sani.
3. save_pretrained (in the input's dtype) + every other file of the input directory.

Random draws use torch's RNG, so the erased units and the shuffling differ from sani's (same
distribution, different sample); compare quality within run-to-run noise, not bit for bit.

Prints wall time per phase, total wall time, ru_maxrss right after imports and at the end.
"""
import argparse
import json
import os
import resource
import shutil
import sys
import time

T_START = time.perf_counter()


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_config(path):
    import tomllib

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "configs", "default.toml"), "rb") as f:
        cfg = tomllib.load(f)
    if path:
        with open(path, "rb") as f:
            cfg.update(tomllib.load(f))
    unsupported = {
        "select": ("random",), "reset": ("reinit", "zero"), "repair-target": ("mask",),
        "train-scope": ("all",), "stride": (0,), "grad-accum": (1,), "bos": ("auto",),
    }
    for k, ok in unsupported.items():
        if cfg.get(k, ok[0]) not in ok:
            sys.exit(f"{path}: {k} = {cfg[k]!r} is not supported by this script (only {ok})")
    return cfg


def read_docs(path):
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                d = json.loads(line)
                if "text" not in d:
                    sys.exit(f"{path}:{n}: only the inline format (text + spans) is supported")
                docs.append(d)
    return docs


def mark_sensitive(offsets, spans, n_chars):
    """sani's rule (src/data/tokens.rs mark_tokens): a token is sensitive when one of the chars it
    encodes is inside a span; chars left out of every token's offsets belong to the next token."""
    covered = [False] * n_chars
    for sp in spans:
        for c in range(sp["start"], min(sp["end"], n_chars)):
            covered[c] = True
    out, until = [], 0
    for s, e in offsets:
        if s >= e:
            if until < s:
                out.append(any(covered[until:min(s, n_chars)]))
                until = s
            else:
                out.append(s < n_chars and covered[s])
            continue
        eff = until if until < s else s
        until = max(until, e)
        out.append(any(covered[eff:min(e, n_chars)]))
    return out


def mlp_slices(model, layer):
    """(parameter, axis) pairs whose index j along axis is MLP unit j of block `layer`."""
    mt = model.config.model_type
    if mt == "gpt2":
        mlp = model.transformer.h[layer].mlp
        d = model.config.n_embd
        # Conv1D stores [in, out]: c_fc [d, inner] (unit = column), c_proj [inner, d] (unit = row).
        # A Linear would be [out, in]: detect by shape.
        fc_axis = 1 if mlp.c_fc.weight.shape[0] == d else 0
        proj_axis = 0 if mlp.c_proj.weight.shape[1] == d else 1
        out = [(f"transformer.h.{layer}.mlp.c_fc.weight", mlp.c_fc.weight, fc_axis),
               (f"transformer.h.{layer}.mlp.c_fc.bias", mlp.c_fc.bias, 0),
               (f"transformer.h.{layer}.mlp.c_proj.weight", mlp.c_proj.weight, proj_axis)]
        return out
    layers = model.model.layers
    mlp = layers[layer].mlp
    out = []
    for name in ("gate_proj", "up_proj"):
        lin = getattr(mlp, name)
        out.append((f"model.layers.{layer}.mlp.{name}.weight", lin.weight, 0))
        if lin.bias is not None:
            out.append((f"model.layers.{layer}.mlp.{name}.bias", lin.bias, 0))
    out.append((f"model.layers.{layer}.mlp.down_proj.weight", mlp.down_proj.weight, 1))
    return out


def init_std(model, name):
    std = model.config.initializer_range
    if name.endswith(".bias"):
        return None
    if model.config.model_type == "gpt2" and name.endswith("c_proj.weight"):
        return std / (2 * model.config.n_layer) ** 0.5
    return std


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sensitive", required=True, help="JSONL: {id, text, spans: [{start, end, label}]}")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "paper.toml"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    a = ap.parse_args()

    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import_rss = rss_mb()
    t_imports = time.perf_counter() - T_START
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    if os.path.exists(a.out) and not a.force:
        sys.exit(f"{a.out} exists (use --force)")
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    timings = [("imports", t_imports)]

    # Load.
    t0 = time.perf_counter()
    with open(os.path.join(a.model, "config.json")) as f:
        raw_cfg = json.load(f)
    src_dtype = raw_cfg.get("dtype") or raw_cfg.get("torch_dtype") or "float32"
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager")
    model.eval()  # dropout off for the whole run, as in sani (gradients still flow)
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    docs = read_docs(a.sensitive)
    timings.append(("load", time.perf_counter() - t0))

    # Tokenize into windows.
    t0 = time.perf_counter()
    probe_with, probe_without = tok.encode("a", add_special_tokens=True), tok.encode("a", add_special_tokens=False)
    if len(probe_with.ids) > len(probe_without.ids) and probe_with.special_tokens_mask[0] == 1:
        bos = probe_with.ids[0]
    else:
        bos = None  # sani's bos = "auto": only what the tokenizer adds
    sep = [] if not cfg.get("doc-separator") else tok.encode(cfg["doc-separator"], add_special_tokens=False).ids
    n_pos = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    max_len = max(1, min(int(cfg["max-seq-len"]), n_pos))
    windows = []  # (ids, labels)
    total_tokens = masked = 0
    for d in docs:
        enc = tok.encode(d["text"], add_special_tokens=False)
        if not enc.ids:
            continue
        sens = mark_sensitive(enc.offsets, d.get("spans", []), len(d["text"]))
        ids, lab = list(enc.ids), [(-100 if s else i) for i, s in zip(enc.ids, sens)]
        masked += sum(sens)
        ids, lab = sep + ids + sep, sep + lab + sep
        if bos is not None:
            ids, lab = [bos] + ids, [bos] + lab
        for start in range(0, len(ids), max_len):
            w, l = ids[start:start + max_len], lab[start:start + max_len]
            total_tokens += len(w)
            if len(w) >= 2:
                windows.append((w, l))
    timings.append(("tokenize", time.perf_counter() - t0))

    # Erase.
    t0 = time.perf_counter()
    n_layer = model.config.num_hidden_layers
    erase_layers = list(range(max(0, n_layer - int(cfg["erase-layers"])), n_layer))
    frac = float(cfg["erase-fraction"])
    erased = {}
    if frac > 0:
        with torch.no_grad():
            for layer in erase_layers:
                slices = mlp_slices(model, layer)
                width = slices[0][1].shape[slices[0][2]]
                k = round(frac * width)
                if k == 0:
                    continue
                units = torch.randperm(width)[:k].sort().values
                erased[layer] = units.tolist()
                for name, p, axis in slices:
                    std = init_std(model, name)
                    shape = list(p.shape)
                    shape[axis] = k
                    if cfg["reset"] == "zero" or std is None:
                        new = torch.zeros(shape, dtype=p.dtype)
                    else:
                        new = torch.randn(shape, dtype=p.dtype) * std
                    p.index_copy_(axis, units, new)
    timings.append(("erase", time.perf_counter() - t0))

    # Repair.
    t0 = time.perf_counter()
    epochs = int(cfg["epochs"])
    bs = max(1, int(cfg["batch-size"]))
    params = [p for p in model.parameters() if p.requires_grad]
    wd = float(cfg["weight-decay"])
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=float(cfg["lr"]), betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = -(-len(windows) // bs)
    total = steps_per_epoch * epochs
    warm = int(cfg["warmup-steps"])

    def lr_lambda(step):  # sani's lr_at / lr
        if step < warm:
            return (step + 1) / warm
        return max(0.0, 1.0 - (step - warm) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    gen = torch.Generator().manual_seed(seed)
    max_norm = float(cfg["max-grad-norm"])
    for epoch in range(epochs):
        te = time.perf_counter()
        order = torch.randperm(len(windows), generator=gen).tolist()
        loss_sum, n_trained, n_tok = 0.0, 0, 0
        for b in range(0, len(order), bs):
            batch = [windows[i] for i in order[b:b + bs]]
            t = max(len(w) for w, _ in batch)
            ids = torch.tensor([w + [0] * (t - len(w)) for w, _ in batch])
            labels = torch.tensor([l + [-100] * (t - len(l)) for _, l in batch])
            mask = torch.tensor([[1] * len(w) + [0] * (t - len(w)) for w, _ in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            tgt = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            n = int((tgt != -100).sum())
            loss_sum += float(nll.detach())
            n_trained += n
            n_tok += int(mask.sum())
            if n > 0:
                (nll / n).backward()
                if max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_norm)
                opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        dt = time.perf_counter() - te
        if not a.quiet:
            print(f"  epoch {epoch + 1}: loss {loss_sum / max(1, n_trained):.4f}, {n_tok / dt:.0f} tok/s, {dt:.1f}s")
    timings.append(("repair", time.perf_counter() - t0))

    # Write.
    t0 = time.perf_counter()
    tmp = a.out.rstrip("/") + ".tmp-torch"
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = getattr(torch, src_dtype) if isinstance(src_dtype, str) and hasattr(torch, src_dtype) else torch.float32
    model.to(dtype).save_pretrained(tmp)
    for f in os.listdir(a.model):
        src = os.path.join(a.model, f)
        if os.path.isfile(src) and not os.path.exists(os.path.join(tmp, f)) and not f.endswith((".safetensors", ".bin")) \
                and f != "model.safetensors.index.json" and not f.startswith("sani_"):
            shutil.copy2(src, os.path.join(tmp, f))
    report = {"config": cfg, "bos_token_id": bos, "documents": len(docs), "windows": len(windows),
              "total_tokens": total_tokens, "masked_tokens": masked,
              "erased_units": {str(k): v for k, v in erased.items()}}
    with open(os.path.join(tmp, "torch_sanitize_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.rename(tmp, a.out)
    timings.append(("write", time.perf_counter() - t0))

    total_s = time.perf_counter() - T_START
    print(f"sanitized model written to {a.out} (torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()})")
    print(f"  documents {len(docs)}, windows {len(windows)}, tokens {total_tokens}, masked tokens {masked}, "
          f"erased {sum(len(v) for v in erased.values())} units in layers {sorted(erased)}, {total} steps")
    for name, s in timings:
        print(f"  {name:<9} {s:8.2f}s")
    print(f"  total     {total_s:8.2f}s (wall, including interpreter start-up and imports)")
    print(f"  peak_rss_mb {rss_mb():.0f} (after imports {import_rss:.0f})")


if __name__ == "__main__":
    main()
