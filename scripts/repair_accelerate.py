#!/usr/bin/env python3
"""The repair step of `sani sanitize`, on the trainer you already run: transformers + accelerate
(so FSDP or DeepSpeed ZeRO-3, as your accelerate config says) train the model that
`sani prepare` erased on the repair set it wrote, with the hyperparameters of its
sani_config.toml.  Not part of sani's CI.

    sani prepare --model MODEL --sensitive notes.jsonl --out PREP
    accelerate launch [--config_file fsdp.yaml] scripts/repair_accelerate.py --prepared PREP --out OUT
    sani eval --model OUT --sensitive notes.jsonl --max-rate 0.03

What it does, matching sani's repair:
- PREP/repair/epoch-K.parquet is epoch K's data (surrogates are drawn fresh each epoch, so each
  epoch has its own file): `input_ids`, `attention_mask`, `labels` (-100 where the loss must not
  reach), rows right-padded to the file's longest.  Rows are shuffled each epoch (torch's RNG
  seeded with `seed`, so the order differs from sani's; the data does not).
- Only the tensors of `train-modules` train (a dot-separated component of the parameter's name,
  e.g. `mlp`; `all`: every tensor).  With FSDP, set `fsdp_use_orig_params: true` in the
  accelerate config so that frozen and trained tensors can share a wrapped module.
- AdamW (betas 0.9/0.999, eps 1e-8, weight decay on >= 2-D tensors only), `lr` with `warmup-steps`
  of linear warmup then linear decay to 0 over `epochs` x the first epoch's optimizer steps,
  gradient clipping at `max-grad-norm`, `batch-size` rows per micro-batch per process and
  `grad-accum` micro-batches per step.  Loss: transformers' mean NLL over the labelled targets.
- Dropout off (sani has none); `checkpoint-activations` turns on transformers' gradient
  checkpointing.
- The result is saved in the input's dtype (config.json's torch_dtype) with the tokenizer files
  of PREP, written to OUT.tmp and renamed to OUT, so OUT is a drop-in HF directory or absent.
"""
import argparse
import glob
import json
import math
import os
import shutil
import sys
import time
import tomllib


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", required=True, help="the --out directory of `sani prepare`")
    ap.add_argument("--out", required=True, help="where the repaired model goes")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    prep = args.prepared
    cfg_path = os.path.join(prep, "sani_config.toml")
    if not os.path.isfile(cfg_path):
        sys.exit(f"{cfg_path}: missing; --prepared must be a `sani prepare` output")
    with open(cfg_path, "rb") as f:
        cfg = tomllib.load(f)
    files = sorted(
        glob.glob(os.path.join(prep, "repair", "epoch-*.parquet")),
        key=lambda p: int(os.path.basename(p)[len("epoch-") : -len(".parquet")]),
    )
    if len(files) != cfg["epochs"]:
        sys.exit(f"{prep}/repair: {len(files)} epoch files for epochs = {cfg['epochs']}")
    if os.path.exists(args.out) and not args.force:
        sys.exit(f"{args.out}: exists (use --force to replace it)")

    accelerator = Accelerator(gradient_accumulation_steps=cfg["grad-accum"])
    torch.manual_seed(cfg["seed"])
    with open(os.path.join(prep, "config.json")) as f:
        conf = json.load(f)
    stored_dtype = conf.get("torch_dtype") or conf.get("dtype") or "float32"
    model = AutoModelForCausalLM.from_pretrained(prep, torch_dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if cfg.get("checkpoint-activations"):
        model.gradient_checkpointing_enable()
    model.train()

    modules = [m.strip() for m in cfg.get("train-modules", "all").split(",")]
    trained = 0
    for name, p in model.named_parameters():
        keep = modules == ["all"] or any(c in modules for c in name.split("."))
        p.requires_grad_(keep)
        trained += p.numel() if keep else 0
    if trained == 0:
        sys.exit(f"train-modules = {cfg['train-modules']!r}: no parameter of this model matches")
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg["weight-decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg["lr"],
        betas=(0.9, 0.999),
        eps=1e-8,
    )

    def epoch_loader(path, epoch):
        t = pq.read_table(path, columns=["input_ids", "attention_mask", "labels"])
        cols = {c: torch.tensor(t.column(c).to_pylist(), dtype=torch.long) for c in t.column_names}
        ds = torch.utils.data.TensorDataset(cols["input_ids"], cols["attention_mask"], cols["labels"])
        g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch)
        return torch.utils.data.DataLoader(ds, batch_size=cfg["batch-size"], shuffle=True, generator=g)

    first = epoch_loader(files[0], 0)
    steps_per_epoch = math.ceil(
        len(first.dataset) / (cfg["batch-size"] * cfg["grad-accum"] * accelerator.num_processes)
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, cfg["warmup-steps"], steps_per_epoch * cfg["epochs"]
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    params = [p for p in model.parameters() if p.requires_grad]
    accelerator.print(
        f"repairing {prep}: {trained:,} trained parameters, {cfg['epochs']} epochs, "
        f"{steps_per_epoch} steps each, {accelerator.num_processes} process(es)"
    )
    t_all = time.time()
    for epoch, path in enumerate(files):
        loader = accelerator.prepare(first if epoch == 0 else epoch_loader(path, epoch))
        t0, total, n = time.time(), 0.0, 0
        for ids, mask, labels in loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg["max-grad-norm"] > 0:
                    accelerator.clip_grad_norm_(params, cfg["max-grad-norm"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            total += loss.item()
            n += 1
        accelerator.print(f"epoch {epoch}: loss {total / max(n, 1):.4f}, {time.time() - t0:.1f} s")

    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        dtype = getattr(torch, stored_dtype)
        tmp = args.out.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.to(dtype)
        unwrapped.save_pretrained(
            tmp, state_dict={k: v.to(dtype) for k, v in state.items()}, safe_serialization=True
        )
        for name in os.listdir(prep):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
                shutil.copy2(os.path.join(prep, name), tmp)
        if os.path.exists(args.out):
            shutil.rmtree(args.out)
        os.rename(tmp, args.out)
        print(f"repaired model written to {args.out} ({time.time() - t_all:.1f} s of training)")


if __name__ == "__main__":
    main()
