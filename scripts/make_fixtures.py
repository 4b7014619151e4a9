#!/usr/bin/env python3
"""Generate the parity fixtures under tests/fixtures/ (run from the repo root).

    python3 scripts/make_fixtures.py            # every fixture
    python3 scripts/make_fixtures.py qwen3_f32  # only the named ones, the others kept

Deterministic (fixed seeds and fixed text) and idempotent: tests/fixtures/ is
deleted and rewritten on a full run.  Everything is built from configs; nothing
is downloaded.  Requires torch, transformers (>=5), tokenizers, safetensors.

For every model <name> this writes
  tests/fixtures/<name>/                     config.json, generation_config.json,
                                             weights (safetensors), tokenizer.json,
                                             tokenizer_config.json
  tests/fixtures/<name>.reference.safetensors
      input_ids [2,12] i64 (row 1 right-padded with 0), attention_mask [2,12] i64,
      logits [2,12,V] f32, loss [] f32, grad.<hf param name> f32 (one per
      model.named_parameters() entry), gen.input_ids / gen.attention_mask [3,L]
      (left-padded with 0), gen.output_ids [3,L+10], gen1.input_ids [1,6],
      gen1.output_ids [1,16].
All references are computed in float32 from the saved checkpoint reloaded with
from_pretrained(dtype=float32, attn_implementation="eager"), eval mode.
"""
import json
import os
import shutil
import sys

import torch
import safetensors
import safetensors.torch
import tokenizers
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Gemma3TextConfig,
    Gemma3ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    PreTrainedTokenizerFast,
)

transformers.logging.set_verbosity_error()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
SPECIAL = "<|endoftext|>"
PAD = 0
NOISE = 0.05  # std of the noise added to every parameter after HF init (init std 0.02)
# Greedy-generation references are only useful if the argmax is not a near-tie: per model
# the first seed (base, base+1, ...) whose smallest top1-top2 logit gap along all greedy
# steps is >= MIN_MARGIN is kept.
MIN_MARGIN = 2e-3
SEED = {}
MAX_NEW = 10

TRAIN_TEXT = """The patient is a 67-year-old man admitted on 12 March 2021 with chest pain.
He reports shortness of breath, fatigue and a mild fever of 38.2 degrees.
Blood pressure was 145/92 mmHg and heart rate 104 beats per minute.
An electrocardiogram showed sinus tachycardia without ST elevation.
Troponin I was 0.04 ng/mL at admission and 0.03 ng/mL six hours later.
The chest X-ray revealed a small right pleural effusion.
She was started on amoxicillin 500 mg three times daily for 7 days.
Allergies: penicillin (rash), no known food allergies.
Past medical history includes type 2 diabetes, hypertension and asthma.
Current medications: metformin 1000 mg twice daily, lisinopril 10 mg daily.
The café near the hospital serves crème brûlée and a decent piña colada.
Naïve Bayes models are sometimes used for triage of clinical notes.
The résumé of Dr. Zoë Müller lists 15 years of experience in cardiology.
Señor García was seen in the clínica on 3 April at 09:45.
Follow-up in 2 weeks with repeat blood tests (CBC, BMP, HbA1c).
Hemoglobin 11.8 g/dL, white cell count 13.4 x10^9/L, platelets 250.
The quick brown fox jumps over the lazy dog.
A journey of a thousand miles begins with a single step.
All that glitters is not gold, and not all those who wander are lost.
It was the best of times, it was the worst of times.
The weather today is sunny with a high of 24 degrees and light winds.
Please take one tablet by mouth every 8 hours as needed for pain.
No acute distress; alert and oriented to person, place and time.
Lungs clear to auscultation bilaterally; no wheezes, rales or rhonchi.
Abdomen soft, non-tender, non-distended, with normal bowel sounds.
Extremities: no edema, cyanosis or clubbing; pulses 2+ and symmetric.
Assessment: community-acquired pneumonia, likely bacterial.
Plan: continue antibiotics, encourage oral fluids, recheck in 48 hours.
The MRI of the lumbar spine showed mild degenerative disc disease at L4-L5.
Her BMI is 31.5 kg/m2 and she is a former smoker (20 pack-years).
Vaccinations are up to date, including influenza in October 2023.
The nurse recorded an oxygen saturation of 94% on room air.
Discharge summary: the patient improved and was discharged home on day 5.
Language models predict the next token given all the previous tokens.
Gradient descent updates each parameter in the direction of the negative gradient.
Attention lets every position look at earlier positions in the sequence.
The tokenizer splits text into bytes and merges frequent pairs.
Numbers such as 3.14159, 2.71828 and 1.41421 appear in many textbooks.
Zürich, München, Genève and Kraków are European cities.
The committee meets on Tuesdays at 10:30 in room 204.
He denies nausea, vomiting, diarrhea or constipation.
Family history is notable for coronary artery disease in his father at 55.
Social history: lives with his wife, drinks alcohol occasionally.
Review of systems is otherwise negative except as noted above.
Labs were drawn at 06:00 and the results were reviewed with the team.
The dose was reduced to 250 mg because of an eGFR of 42 mL/min.
Temperature 36.9 C, respiratory rate 18, oxygen saturation 97%.
We will monitor renal function and electrolytes closely.
The sun sets in the west and rises in the east every day.
Thank you for allowing us to participate in the care of this patient.
"""

# Fixed evaluation / prompt sentences (first N tokens of each are used).
SENT_FULL = "The patient was admitted with chest pain and shortness of breath on 12 March."
SENT_PAD = "Señor García takes metformin 500 mg twice daily."
GEN_PROMPTS = [
    ("The patient", 3),
    ("Blood pressure was 145/92 mmHg today.", 6),
    ("The quick brown fox jumps over the lazy dog while the nurse watches.", 9),
]
GEN1_PROMPT = ("Discharge summary: the patient improved quickly.", 6)


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=2,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [l for l in TRAIN_TEXT.strip().split("\n") if l.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.token_to_id(SPECIAL) == 0, "special token must have id 0"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL
    )
    return fast


def encode(tok, text, n):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n, f"{text!r} has only {len(ids)} tokens, need {n}"
    ids = ids[:n]
    assert PAD not in ids
    return ids


def make_inputs(tok):
    row0 = encode(tok, SENT_FULL, 12)
    row1 = encode(tok, SENT_PAD, 8) + [PAD] * 4
    input_ids = torch.tensor([row0, row1], dtype=torch.int64)
    attention_mask = torch.tensor([[1] * 12, [1] * 8 + [0] * 4], dtype=torch.int64)
    prompts = [encode(tok, t, n) for t, n in GEN_PROMPTS]
    L = max(len(p) for p in prompts)
    gen_ids = torch.tensor([[PAD] * (L - len(p)) + p for p in prompts], dtype=torch.int64)
    gen_mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], dtype=torch.int64)
    gen1 = torch.tensor([encode(tok, *GEN1_PROMPT)], dtype=torch.int64)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        gen_ids=gen_ids,
        gen_mask=gen_mask,
        gen1=gen1,
        prompts=prompts,
    )


# --------------------------------------------------------------------------- helpers
def perturb(model):
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(NOISE * torch.randn_like(p))


def set_eager(model):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = "eager"


def set_gen_config(model):
    gc = model.generation_config
    gc.bos_token_id = 0
    gc.eos_token_id = 0
    gc.pad_token_id = 0


def save_model_dir(model, tok, name, **save_kw):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, **save_kw)
    tok.save_pretrained(d)
    return d


def greedy_manual(model, ids, mask, n_new):
    """No-cache greedy loop (positions = cumsum(mask)-1) to cross-check generate()."""
    ids = ids.clone()
    mask = mask.clone()
    for _ in range(n_new):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # pad positions get position id 1 in HF's generate; irrelevant (masked)
        pos = pos.masked_fill(mask == 0, 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, :]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)
    return ids


def min_margin(model, ids, mask):
    """Smallest top1-top2 logit gap seen along a greedy continuation (robustness info)."""
    worst = float("inf")
    ids = ids.clone()
    mask = mask.clone()
    with torch.no_grad():
        for _ in range(MAX_NEW):
            pos = (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 1)
            lg = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, :]
            top = lg.topk(2, dim=-1).values
            worst = min(worst, (top[:, 0] - top[:, 1]).min().item())
            nxt = lg.argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], -1)
            mask = torch.cat([mask, torch.ones_like(nxt)], -1)
    return worst


def compute_reference(model, inp):
    """model must already be f32, eval, eager."""
    model = model.float().eval()
    set_eager(model)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    out = {"input_ids": ids.clone(), "attention_mask": mask.clone()}

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    out["logits"] = logits.contiguous()

    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad(set_to_none=True)
    res = model(input_ids=ids, attention_mask=mask, labels=labels)
    res.loss.backward()
    out["loss"] = res.loss.detach().float().reshape(())
    # cross-check the loss definition (mean CE over shifted, non-ignored positions)
    sl = res.logits[:, :-1, :].reshape(-1, res.logits.shape[-1]).float()
    tl = labels[:, 1:].reshape(-1)
    manual = torch.nn.functional.cross_entropy(sl, tl, ignore_index=-100)
    assert torch.allclose(manual, res.loss, atol=1e-5), (manual, res.loss)
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no grad for {n}"
        out[f"grad.{n}"] = p.grad.detach().float().contiguous().clone()
    model.zero_grad(set_to_none=True)

    # generation: make sure EOS can't stop it early (eos would be 0 = pad, which can be sampled)
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    gids, gmask = inp["gen_ids"], inp["gen_mask"]
    with torch.no_grad():
        g = model.generate(
            input_ids=gids, attention_mask=gmask, do_sample=False, max_new_tokens=MAX_NEW,
            min_new_tokens=None, pad_token_id=PAD, eos_token_id=None,
        )
        assert g.shape == (3, gids.shape[1] + MAX_NEW), g.shape
        man = greedy_manual(model, gids, gmask, MAX_NEW)
        assert torch.equal(g, man), ("generate != manual greedy", g, man)
        g1 = model.generate(
            input_ids=inp["gen1"], attention_mask=torch.ones_like(inp["gen1"]), do_sample=False,
            max_new_tokens=MAX_NEW, pad_token_id=PAD, eos_token_id=None,
        )
        assert g1.shape == (1, inp["gen1"].shape[1] + MAX_NEW)
        # left padding must not change the greedy continuation of each prompt
        for i, p in enumerate(inp["prompts"]):
            pi = torch.tensor([p])
            gi = model.generate(input_ids=pi, attention_mask=torch.ones_like(pi), do_sample=False,
                                max_new_tokens=MAX_NEW, pad_token_id=PAD, eos_token_id=None)
            if not torch.equal(gi[0, len(p):], g[i, gids.shape[1]:]):
                print(f"  WARNING: row {i}: padded vs unpadded greedy continuation differ")
        margin = min(min_margin(model, gids, gmask), min_margin(model, inp["gen1"], torch.ones_like(inp["gen1"])))
    model.generation_config.eos_token_id = saved_eos
    out["gen.input_ids"] = gids.clone()
    out["gen.attention_mask"] = gmask.clone()
    out["gen.output_ids"] = g.contiguous()
    out["gen1.input_ids"] = inp["gen1"].clone()
    out["gen1.output_ids"] = g1.contiguous()
    return out, margin


REF_META = {}


def canonicalize_header(path):
    """safetensors writes __metadata__ entries in hash order; rewrite the JSON header with
    sorted keys so the file is byte-for-byte reproducible (tensor data untouched)."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__", None)
    out = {}
    if meta is not None:
        out["__metadata__"] = dict(sorted(meta.items()))
    for k in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        out[k] = header[k]
    hb = json.dumps(out, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb + data)


def write_reference(name, ref, margin, seed):
    path = os.path.join(OUT, f"{name}.reference.safetensors")
    meta = {
        "format": "pt",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model_dir": name,
        "loss_def": "mean CE over shifted positions, labels=-100 where attention_mask==0",
        "gen_min_top2_margin": f"{margin:.6f}",
        "seed": str(seed),
        "noise": str(NOISE),
    }
    safetensors.torch.save_file({k: v.contiguous() for k, v in ref.items()}, path, metadata=meta)
    canonicalize_header(path)
    REF_META[name] = margin
    SEED[name] = seed
    return path


def reload_f32(cls, d, model, inp, tol):
    """Reload the saved dir with HF in float32 (eager) - this is what the reference is
    computed from, so that f16/bf16 checkpoints are upcast exactly and non-persistent
    buffers (rotary inv_freq) are recomputed in f32 rather than rounded by .half().
    Cross-checks logits against the in-memory model (tol: 0 diff expected for f32)."""
    m = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    set_eager(m)
    mem = model.float().eval()
    with torch.no_grad():
        a = m(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
        b = mem(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
    err = (a - b).abs().max().item()
    assert err <= tol, f"{d}: reload mismatch {err}"
    rot = getattr(getattr(m, "model", None), "rotary_emb", None)
    if rot is not None:
        fresh = cls(m.config).model.rotary_emb
        # one inv_freq, or one per layer kind (Gemma 3: full_attention_inv_freq, ...)
        names = [n for n, _ in rot.named_buffers() if n.endswith("inv_freq") and "original" not in n]
        for n in names:
            ours, theirs = getattr(rot, n), getattr(fresh, n)
            assert ours.dtype == torch.float32 and torch.equal(ours, theirs), n
    return m


def common_ids():
    return dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


# --------------------------------------------------------------------------- models
def make_gpt2(tok, inp, seed):
    torch.manual_seed(seed)
    V = len(tok)
    cfg = GPT2Config(
        vocab_size=V, n_layer=2, n_embd=32, n_head=4, n_positions=64,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, initializer_range=0.02,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common_ids(),
    )
    model = GPT2LMHeadModel(cfg)
    perturb(model)
    model.eval()
    set_eager(model)
    set_gen_config(model)
    d = save_model_dir(model, tok, "gpt2_f32")
    ref, margin = compute_reference(reload_f32(GPT2LMHeadModel, d, model, inp, 0.0), inp)
    write_reference("gpt2_f32", ref, margin, seed)

    # ---- legacy OpenAI-style layout of the same weights
    ld = os.path.join(OUT, "gpt2_legacy")
    os.makedirs(ld, exist_ok=True)
    sd = model.state_dict()
    legacy = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue  # tied to wte
        assert k.startswith("transformer."), k
        legacy[k[len("transformer."):]] = v.detach().float().contiguous().clone()
    npos = cfg.n_positions
    for i in range(cfg.n_layer):
        legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(npos, npos, dtype=torch.float32)).view(1, 1, npos, npos).contiguous()
        legacy[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4, dtype=torch.float32)
    safetensors.torch.save_file(legacy, os.path.join(ld, "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json"):
        shutil.copy(os.path.join(d, f), os.path.join(ld, f))
    tok.save_pretrained(ld)
    shutil.copy(os.path.join(OUT, "gpt2_f32.reference.safetensors"),
                os.path.join(OUT, "gpt2_legacy.reference.safetensors"))
    REF_META["gpt2_legacy"] = margin
    SEED["gpt2_legacy"] = seed
    reload_f32(GPT2LMHeadModel, ld, model, inp, 0.0)  # HF itself reads the legacy layout identically
    return margin


def make_llama_gqa(tok, inp, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False, max_position_embeddings=64, initializer_range=0.02,
        **common_ids(),
    )
    model = LlamaForCausalLM(cfg)
    perturb(model)
    model.eval()
    set_eager(model)
    set_gen_config(model)
    d = save_model_dir(model, tok, "llama_gqa")
    ref, margin = compute_reference(reload_f32(LlamaForCausalLM, d, model, inp, 0.0), inp)
    write_reference("llama_gqa", ref, margin, seed)
    return margin


def make_llama3_sharded(tok, inp, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        tie_word_embeddings=False, max_position_embeddings=64, initializer_range=0.02,
        **common_ids(),
    )
    model = LlamaForCausalLM(cfg)
    perturb(model)
    model = model.half().eval()
    set_eager(model)
    set_gen_config(model)
    d = save_model_dir(model, tok, "llama3_sharded", max_shard_size="40KB")
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json")), "not sharded"
    shards = [f for f in os.listdir(d) if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) >= 2, shards
    # f16 weights upcast to f32 (in-memory model.float() would also carry an f16-rounded
    # inv_freq buffer, hence the loose tolerance of the cross-check)
    ref, margin = compute_reference(reload_f32(LlamaForCausalLM, d, model, inp, 5e-3), inp)
    write_reference("llama3_sharded", ref, margin, seed)
    return margin


def make_qwen2_bf16(tok, inp, seed):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
        max_position_embeddings=64, initializer_range=0.02, **common_ids(),
    )
    model = Qwen2ForCausalLM(cfg)
    perturb(model)
    model = model.to(torch.bfloat16).eval()
    set_eager(model)
    set_gen_config(model)
    d = save_model_dir(model, tok, "qwen2_bf16")
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    if c.get("sliding_window", "missing") is not None:
        c["sliding_window"] = None
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
            f.write("\n")
    ref, margin = compute_reference(reload_f32(Qwen2ForCausalLM, d, model, inp, 5e-2), inp)
    write_reference("qwen2_bf16", ref, margin, seed)
    return margin


def make_mistral(tok, inp, seed):
    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=64, initializer_range=0.02,
        **common_ids(),
    )
    model = MistralForCausalLM(cfg)
    perturb(model)
    model.eval()
    set_eager(model)
    set_gen_config(model)
    d = save_model_dir(model, tok, "mistral_f32")
    ref, margin = compute_reference(reload_f32(MistralForCausalLM, d, model, inp, 0.0), inp)
    write_reference("mistral_f32", ref, margin, seed)
    return margin


def make_qwen3(tok, inp, seed):
    # head_dim given and unequal to hidden / heads; the second layer slides a 6-token window
    # (shorter than the inputs), the first attends fully.
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        tie_word_embeddings=False, use_sliding_window=True, sliding_window=6,
        max_window_layers=1, max_position_embeddings=64, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common_ids(),
    )
    assert cfg.layer_types == ["full_attention", "sliding_attention"], cfg.layer_types
    model = Qwen3ForCausalLM(cfg)
    perturb(model)
    model.eval()
    set_eager(model)
    set_gen_config(model)
    d = save_model_dir(model, tok, "qwen3_f32")
    ref, margin = compute_reference(reload_f32(Qwen3ForCausalLM, d, model, inp, 0.0), inp)
    write_reference("qwen3_f32", ref, margin, seed)
    return margin


def make_phi3(tok, inp, seed):
    # Fused qkv_proj and gate_up_proj; half of each head rotates; LongRoPE with an original
    # context of 32 under 64 positions (attention factor > 1; every input stays within the
    # original context, where the short factors hold); an 8-token sliding window.
    torch.manual_seed(seed)
    cfg = Phi3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=64,
        original_max_position_embeddings=32, sliding_window=8, initializer_range=0.02,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5, "short_factor": [1.0, 1.7],
                         "long_factor": [1.3, 3.1], "original_max_position_embeddings": 32},
        **common_ids(),
    )
    model = Phi3ForCausalLM(cfg)
    perturb(model)
    model.eval()
    set_eager(model)
    set_gen_config(model)
    d = save_model_dir(model, tok, "phi3_f32")
    ref, margin = compute_reference(reload_f32(Phi3ForCausalLM, d, model, inp, 0.0), inp)
    write_reference("phi3_f32", ref, margin, seed)
    return margin


def make_gemma3(tok, inp, seed):
    # Text-only Gemma 3: a sliding layer (window 6) then a global one, head_dim 16 unequal to
    # hidden / heads and to query_pre_attn_scalar (24), linear rope scaling on the global layers
    # and a separate local base; tied head.
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        query_pre_attn_scalar=24, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        tie_word_embeddings=True, max_position_embeddings=64, initializer_range=0.02,
        **common_ids(),
    )
    model = Gemma3ForCausalLM(cfg)
    perturb(model)
    model.eval()
    set_eager(model)
    set_gen_config(model)
    d = save_model_dir(model, tok, "gemma3_f32")
    ref, margin = compute_reference(reload_f32(Gemma3ForCausalLM, d, model, inp, 0.0), inp)
    write_reference("gemma3_f32", ref, margin, seed)
    return margin


def make_gemma2(tok, inp, seed):
    # Gemma 2: soft caps small enough to bite on a tiny model (attention 0.5, logits 2.0), a
    # sliding layer (window 6) then a global one, query_pre_attn_scalar 24, head_dim 16.
    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=0.5,
        final_logit_softcapping=2.0, tie_word_embeddings=True, max_position_embeddings=64,
        initializer_range=0.02, **common_ids(),
    )
    assert cfg.layer_types == ["sliding_attention", "full_attention"], cfg.layer_types
    model = Gemma2ForCausalLM(cfg)
    perturb(model)
    model.eval()
    set_eager(model)
    set_gen_config(model)
    d = save_model_dir(model, tok, "gemma2_f32")
    ref, margin = compute_reference(reload_f32(Gemma2ForCausalLM, d, model, inp, 0.0), inp)
    write_reference("gemma2_f32", ref, margin, seed)
    return margin


def make_adapters(tok, inp):
    """PEFT LoRA adapters on two fixtures, with the weights PEFT's merge_and_unload() gives
    and the merged model's logits on the inputs (tests/fixtures/adapters/<name>/ and
    <name>.merged.safetensors). Needs peft."""
    import peft
    from peft import LoraConfig, get_peft_model

    root = os.path.join(OUT, "adapters")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    cases = {
        # q/v/gate/down and the embedding adapted, the untied head saved whole.
        "lora_llama": ("llama_gqa", LlamaForCausalLM, dict(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj", "embed_tokens"],
            modules_to_save=["lm_head"])),
        # Conv1D weights (fan_in_fan_out; attn.c_proj is square), rsLoRA, per-module rank
        # and alpha.
        "lora_gpt2_rslora": ("gpt2_f32", GPT2LMHeadModel, dict(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
            use_rslora=True, rank_pattern={"c_attn": 2}, alpha_pattern={"c_fc": 16})),
    }
    for i, (name, (base, cls, kw)) in enumerate(cases.items()):
        torch.manual_seed(700 + i)
        model = cls.from_pretrained(os.path.join(OUT, base), dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.add_(0.1 * torch.randn_like(p))
        d = os.path.join(root, name)
        pm.save_pretrained(d)
        cfg_path = os.path.join(d, "adapter_config.json")
        with open(cfg_path) as f:
            c = json.load(f)
        c["base_model_name_or_path"] = f"tests/fixtures/{base}"  # not this machine's path
        with open(cfg_path, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
            f.write("\n")
        for f in ("README.md",):
            if os.path.exists(os.path.join(d, f)):
                os.remove(os.path.join(d, f))
        merged = pm.merge_and_unload().eval()
        set_eager(merged)
        with torch.no_grad():
            logits = merged(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
        ref = {f"merged.{k}": v.detach().clone() for k, v in merged.state_dict().items()}
        ref["logits"] = logits.float()
        path = os.path.join(root, f"{name}.merged.safetensors")
        safetensors.torch.save_file({k: v.contiguous() for k, v in ref.items()}, path,
                                    metadata={"peft": peft.__version__, "base": base})
        canonicalize_header(path)
        print(f"  adapter {name} on {base}: {len(ref) - 1} merged tensors")


def make_bin(tok, inp):
    """PyTorch pickle checkpoints (torch.save) of two existing fixtures' weights: llama_gqa as
    one pytorch_model.bin, qwen2_bf16 (bf16) as two shards with pytorch_model.bin.index.json;
    and bin_hostile, whose pickle holds a Python object beside its tensors."""
    import collections

    def side_files(src, dst):
        os.makedirs(dst)
        for f in os.listdir(src):
            if not f.endswith(".safetensors") and not f.endswith(".index.json"):
                shutil.copy(os.path.join(src, f), dst)

    def state_dict(name):
        sd = collections.OrderedDict()
        for f in sorted(os.listdir(os.path.join(OUT, name))):
            if f.endswith(".safetensors"):
                sd.update(safetensors.torch.load_file(os.path.join(OUT, name, f)))
        sd._metadata = collections.OrderedDict({"": {"version": 1}})  # as module.state_dict()
        return sd

    d = os.path.join(OUT, "llama_bin")
    shutil.rmtree(d, ignore_errors=True)
    side_files(os.path.join(OUT, "llama_gqa"), d)
    torch.save(state_dict("llama_gqa"), os.path.join(d, "pytorch_model.bin"))

    d = os.path.join(OUT, "qwen2_bin_sharded")
    shutil.rmtree(d, ignore_errors=True)
    side_files(os.path.join(OUT, "qwen2_bf16"), d)
    sd = state_dict("qwen2_bf16")
    names = sorted(sd)
    weight_map, total = {}, 0
    for i, part in enumerate([names[: len(names) // 2], names[len(names) // 2:]]):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save(collections.OrderedDict((n, sd[n]) for n in part), os.path.join(d, file))
        for n in part:
            weight_map[n] = file
            total += sd[n].numel() * sd[n].element_size()
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                  sort_keys=True)
        f.write("\n")

    d = os.path.join(OUT, "bin_hostile")
    shutil.rmtree(d, ignore_errors=True)
    side_files(os.path.join(OUT, "llama_gqa"), d)
    sd = state_dict("llama_gqa")
    sd["optimizer_hint"] = collections.Counter({"step": 3})  # not a tensor: must be refused
    torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    print("  llama_bin, qwen2_bin_sharded, bin_hostile written with torch.save")


# name -> (builder, first seed, the fixtures it writes)
BUILDERS = {
    "gpt2": (make_gpt2, 0, ["gpt2_f32", "gpt2_legacy"]),
    "llama_gqa": (make_llama_gqa, 100, ["llama_gqa"]),
    "llama3_sharded": (make_llama3_sharded, 200, ["llama3_sharded"]),
    "qwen2_bf16": (make_qwen2_bf16, 300, ["qwen2_bf16"]),
    "mistral_f32": (make_mistral, 400, ["mistral_f32"]),
    "qwen3_f32": (make_qwen3, 500, ["qwen3_f32"]),
    "phi3_f32": (make_phi3, 600, ["phi3_f32"]),
    "gemma3_f32": (make_gemma3, 800, ["gemma3_f32"]),
    "gemma2_f32": (make_gemma2, 900, ["gemma2_f32"]),
    "adapters": (None, None, []),
    "bin": (None, None, []),
}


def build(fn, tok, inp, base_seed, names, tries=50):
    for seed in range(base_seed, base_seed + tries):
        for n in names:
            shutil.rmtree(os.path.join(OUT, n), ignore_errors=True)
            ref = os.path.join(OUT, f"{n}.reference.safetensors")
            if os.path.exists(ref):
                os.remove(ref)
        margin = fn(tok, inp, seed)
        if margin >= MIN_MARGIN:
            return
        print(f"  {names[0]}: seed {seed} has greedy top2 margin {margin:.2e} < {MIN_MARGIN}, retrying")
    raise RuntimeError(f"no seed with margin >= {MIN_MARGIN} for {names}")


README = """# Test fixtures (generated: do not edit by hand)

Made by `python3 scripts/make_fixtures.py` (deterministic; deletes and rewrites this directory) with torch {torch},
transformers {tf}, tokenizers {tk}, safetensors {st}. Tiny models are built from configs (no hub downloads): HF init,
then every param += {noise}*randn, seed chosen so every greedy top1-top2 logit gap is >= {mm} (seed in file metadata).
All share one byte-level BPE tokenizer (vocab {V}; `<|endoftext|>` = 0 = bos/eos/pad). Each `<name>.reference.safetensors`
holds inputs, f32 eager logits, loss, `grad.<hf param name>` and greedy `generate` outputs (10 new tokens, no EOS stop).
"""


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # reproducible reductions
    wanted = sys.argv[1:] or list(BUILDERS)
    unknown = [w for w in wanted if w not in BUILDERS]
    if unknown:
        sys.exit(f"unknown fixture(s) {unknown}; known: {list(BUILDERS)}")
    if not sys.argv[1:] and os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT, exist_ok=True)

    tok = build_tokenizer()
    inp = make_inputs(tok)
    print(f"tokenizer vocab = {len(tok)}")
    print("row0:", inp["input_ids"][0].tolist(), repr(tok.decode(inp["input_ids"][0])))
    print("row1:", inp["input_ids"][1].tolist(), repr(tok.decode(inp["input_ids"][1][:8])))

    built = []
    for w in wanted:
        fn, base_seed, names = BUILDERS[w]
        if w == "adapters":
            make_adapters(tok, inp)
            continue
        if w == "bin":
            make_bin(tok, inp)
            continue
        build(fn, tok, inp, base_seed, names)
        built += names

    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(README.format(torch=torch.__version__, tf=transformers.__version__,
                              tk=tokenizers.__version__, st=safetensors.__version__, V=len(tok),
                              noise=NOISE, mm=MIN_MARGIN))

    # ---- summary
    print("\nfiles:")
    total = 0
    for dp, _, fs in sorted(os.walk(OUT)):
        for fn in sorted(fs):
            p = os.path.join(dp, fn)
            sz = os.path.getsize(p)
            total += sz
            print(f"  {os.path.relpath(p, ROOT):70s} {sz:>9d}")
    print(f"  total {total} bytes ({total / 1e6:.2f} MB)")
    print("\nreferences:")
    for name in built:
        r = safetensors.torch.load_file(os.path.join(OUT, f"{name}.reference.safetensors"))
        ngrad = sum(1 for k in r if k.startswith("grad."))
        print(f"  {name:15s} logits absmax {r['logits'].abs().max().item():.4f}  std {r['logits'].std().item():.4f}"
              f"  loss {r['loss'].item():.5f}  grads {ngrad}  seed {SEED[name]}  gen min top2 margin {REF_META[name]:.4f}")
        print(f"  {'':15s} gen.output_ids {r['gen.output_ids'].tolist()}  gen1 {r['gen1.output_ids'].tolist()}")


if __name__ == "__main__":
    main()
