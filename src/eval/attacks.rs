//! The attack suite (`sani eval --attacks`): what anybody who holds the model can try to get a
//! sensitive span out of it, each attack's figures per label, and the worst case per label, which
//! the gate applies to.
//!
//! 1. **Greedy extraction at several prompt lengths** (8, 32, 128 tokens and the whole preceding
//!    document by default), as in [`super::regurgitation`].
//! 2. **Sampled extraction**: a span counts when any of N samples (top-k as for `--samples`)
//!    reproduces it exactly, at each temperature.
//! 3. **Quantized weights**: greedy extraction from the weights rounded to bf16 or fp16, or
//!    quantized to int8 / int4 per row, symmetric (every matrix; vectors such as norms kept):
//!    the model an attacker gets from a quantized release. Computed in memory.
//! 4. **Membership**: for each span, the log-probability of its true text after the prompt
//!    against K fakes of its label: by default the same label's values in the file's other
//!    documents ([`FakeSource::Corpus`]), else the surrogate generators. The AUC is the share
//!    of (true, fake) pairs where the true text is the likelier, ties half. 0.5 means no signal;
//!    the same score on the control set (spans the model never saw) is the chance level.
//! 5. **Relearning** (opt-in, it trains): a copy is fine-tuned for one epoch on a text file the
//!    user gives (every token trained, lr [`RELEARN_LR`]), then greedy extraction again.
//!
//! Extraction figures count spans not already in the prompt, as the plain measurement does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::regurgitation::{
    prepare, regurgitation, resolve_bos_info, span_rng, RegurgitationResult, RegurgitationSettings,
    RegurgitationSummary, SpanResult,
};
use crate::data::spans::{Document, Span};
use crate::data::surrogate::surrogate_for;
use crate::data::tokens;
use crate::io::checkpoint::Checkpoint;
use crate::model::{AttnContext, Model};

/// Learning rate of the relearning attack (a common fine-tuning rate for small models).
pub const RELEARN_LR: f64 = 5e-4;

/// How an attacker may round the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    Bf16,
    Fp16,
    Int8,
    Int4,
}

impl Quantization {
    pub const ALL: [Quantization; 4] = [
        Quantization::Bf16,
        Quantization::Fp16,
        Quantization::Int8,
        Quantization::Int4,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Quantization::Bf16 => "bf16",
            Quantization::Fp16 => "fp16",
            Quantization::Int8 => "int8",
            Quantization::Int4 => "int4",
        }
    }

    /// The tensor as an attacker would load it after rounding (f32 again).
    pub fn apply(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        Ok(match self {
            Quantization::Bf16 => t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
            Quantization::Fp16 => t.to_dtype(DType::F16)?.to_dtype(DType::F32)?,
            Quantization::Int8 if t.rank() == 2 => per_row_symmetric(&t, 127.0)?,
            Quantization::Int4 if t.rank() == 2 => per_row_symmetric(&t, 7.0)?,
            _ => t.copy()?,
        })
    }
}

/// Each row scaled so its largest magnitude is `qmax`, rounded to integers, scaled back.
fn per_row_symmetric(t: &Tensor, qmax: f64) -> Result<Tensor> {
    let scale = (t.abs()?.max_keepdim(1)? / qmax)?.maximum(1e-30)?;
    let q = t.broadcast_div(&scale)?.round()?.clamp(-qmax, qmax)?;
    Ok(q.broadcast_mul(&scale)?)
}

/// The relearning attack's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelearnSettings {
    /// Documents (JSONL, as `--sensitive`; spans are ignored) the copy is fine-tuned on.
    pub file: PathBuf,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub max_seq_len: usize,
}

/// Which attacks run, and how hard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackSettings {
    /// Prompt lengths of greedy extraction in tokens; 0 is the whole preceding document.
    pub prefix_lengths: Vec<usize>,
    /// Samples per span and temperature.
    pub samples: usize,
    pub temperatures: Vec<f64>,
    pub quantizations: Vec<Quantization>,
    /// Fakes per span in the membership probe.
    pub fakes: usize,
    /// Where the membership probe's fakes come from.
    #[serde(default)]
    pub fakes_from: FakeSource,
    pub relearn: Option<RelearnSettings>,
}

/// Where the membership probe draws its fakes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FakeSource {
    /// The values of the same label in the other documents of the probed file (spans of the
    /// same text excluded): the true value and its fakes then come from one distribution, so a
    /// model that never saw the file scores 0.5. A label with fewer than two such distinct
    /// values takes the generators.
    #[default]
    Corpus,
    /// The surrogate generators (format kept): a model that learned what real values look like
    /// tells them from generated ones, so the chance level is the control set's score.
    Generators,
}

impl Default for AttackSettings {
    fn default() -> Self {
        AttackSettings {
            prefix_lengths: vec![8, 32, 128, 0],
            samples: 10,
            temperatures: vec![0.7, 1.0],
            quantizations: Quantization::ALL.to_vec(),
            fakes: 4,
            fakes_from: FakeSource::Corpus,
            relearn: None,
        }
    }
}

/// Spans an attack got out, of those it measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hits {
    pub measured: usize,
    pub hits: usize,
    /// hits / measured (0 when nothing was measured).
    pub rate: f64,
}

impl Hits {
    fn add(&mut self, hit: bool) {
        self.measured += 1;
        self.hits += hit as usize;
        self.rate = self.hits as f64 / self.measured as f64;
    }
}

/// One attack's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackRow {
    /// e.g. "greedy, prompt 8 tokens", "sampled, 10 at T=0.7", "int4 weights".
    pub attack: String,
    pub per_label: BTreeMap<String, Hits>,
    pub total: Hits,
    pub seconds: f64,
}

/// The worst case of a label (or of all spans) over the attacks that ran (`attack` is empty
/// when none got a span out).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Worst {
    pub rate: f64,
    pub hits: usize,
    pub measured: usize,
    pub attack: String,
}

/// Membership AUC of a set of spans.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Auc {
    pub spans: usize,
    /// Mean over spans of the share of fakes the true text beats (ties half); None without spans.
    pub auc: Option<f64>,
}

/// The membership probe's result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Membership {
    pub fakes: usize,
    #[serde(default)]
    pub fakes_from: FakeSource,
    pub per_label: BTreeMap<String, Auc>,
    pub total: Auc,
    /// Each span's score, which the figures come from (kept for a shard's report, not printed).
    #[serde(skip)]
    pub outcomes: Vec<AucOutcome>,
}

/// One span's membership score: the share of its fakes the true text beats (ties half).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AucOutcome {
    pub doc_index: usize,
    pub span_index: usize,
    pub label: String,
    pub auc: f64,
}

impl Membership {
    /// The figures of span scores (in file order; shards merged in order give one run's).
    pub fn of(fakes: usize, fakes_from: FakeSource, outcomes: &[AucOutcome]) -> Membership {
        let mut sums: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        let (mut n, mut total) = (0usize, 0f64);
        for o in outcomes {
            let e = sums.entry(o.label.clone()).or_default();
            e.0 += 1;
            e.1 += o.auc;
            n += 1;
            total += o.auc;
        }
        let mean = |n: usize, s: f64| Auc {
            spans: n,
            auc: (n > 0).then(|| s / n as f64),
        };
        Membership {
            fakes,
            fakes_from,
            per_label: sums
                .into_iter()
                .map(|(l, (n, s))| (l, mean(n, s)))
                .collect(),
            total: mean(n, total),
            outcomes: Vec::new(),
        }
    }

    fn with_outcomes(mut self, outcomes: Vec<AucOutcome>) -> Membership {
        self.outcomes = outcomes;
        self
    }
}

/// Everything the suite measured (the report's `attacks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttackReport {
    pub settings: AttackSettings,
    pub attacks: Vec<AttackRow>,
    /// Per label, the attack that got the most out.
    pub worst: BTreeMap<String, Worst>,
    /// The attack with the highest overall rate.
    pub worst_total: Worst,
    pub membership: Option<Membership>,
    /// The same probe on the control set: its chance level.
    pub control_membership: Option<Membership>,
    pub seconds: f64,
}

/// An attack's figures from span results; `sampled`: a hit is any sample's, else greedy's.
fn row_of(attack: String, spans: &[SpanResult], sampled: bool, seconds: f64) -> AttackRow {
    let mut per_label: BTreeMap<String, Hits> = BTreeMap::new();
    let mut total = Hits::default();
    for s in spans.iter().filter(|s| s.measured()) {
        let hit = match sampled {
            true => s.sampled_exact.unwrap_or(false),
            false => s.exact,
        };
        per_label.entry(s.label.clone()).or_default().add(hit);
        total.add(hit);
    }
    AttackRow {
        attack,
        per_label,
        total,
        seconds,
    }
}

/// The attack with the highest rate; when none got a span, the largest count measured and no
/// attack named.
fn worst_of<'a>(rows: impl Iterator<Item = (&'a str, &'a Hits)>) -> Worst {
    let mut w = Worst::default();
    for (attack, h) in rows {
        if h.hits == 0 {
            w.measured = w.measured.max(h.measured);
            continue;
        }
        if w.attack.is_empty() || h.rate > w.rate {
            w = Worst {
                rate: h.rate,
                hits: h.hits,
                measured: h.measured,
                attack: attack.to_string(),
            };
        }
    }
    w
}

/// Runs the suite on the model of `ckpt` (`model` is it, loaded frozen) and the spans of
/// `docs`; `control` (never-seen spans) gives the membership chance level. `plain`: the plain
/// measurement with `base` already made, reused by the greedy attack with the same prompt
/// length.
#[allow(clippy::too_many_arguments)]
pub fn run_attacks(
    ckpt: &Checkpoint,
    model: &Model,
    tok: &Tokenizer,
    docs: &[Document],
    control: Option<&[Document]>,
    base: &RegurgitationSettings,
    plain: Option<&RegurgitationResult>,
    settings: &AttackSettings,
    quiet: bool,
) -> Result<AttackReport> {
    let started = Instant::now();
    let mut rows = Vec::new();
    let greedy = RegurgitationSettings {
        samples: 0,
        ..base.clone()
    };
    let say = |what: &str| {
        if !quiet {
            eprintln!("attack: {what}");
        }
    };
    for &k in &settings.prefix_lengths {
        let name = match k {
            0 => "greedy, whole preceding document".to_string(),
            k => format!("greedy, prompt {k} tokens"),
        };
        say(&name);
        // The whole document, as far as the context reaches (so tokenizing the text before a
        // span stays bounded, however long the document).
        let s = RegurgitationSettings {
            prefix_tokens: if k == 0 {
                model.config.max_positions()
            } else {
                k
            },
            ..greedy.clone()
        };
        let t = Instant::now();
        let spans = match plain {
            // Greedy figures do not depend on the sampling settings.
            Some(p) if s.prefix_tokens == base.prefix_tokens => p.spans.clone(),
            _ => regurgitation(model, tok, docs, &s, quiet)?.spans,
        };
        rows.push(row_of(name, &spans, false, t.elapsed().as_secs_f64()));
    }
    if settings.samples > 0 {
        for &temperature in &settings.temperatures {
            let name = format!("sampled, any of {} at T={temperature}", settings.samples);
            say(&name);
            let s = RegurgitationSettings {
                samples: settings.samples,
                temperature,
                ..base.clone()
            };
            s.validate()?;
            let t = Instant::now();
            let r = regurgitation(model, tok, docs, &s, quiet)?;
            rows.push(row_of(name, &r.spans, true, t.elapsed().as_secs_f64()));
        }
    }
    for q in &settings.quantizations {
        let name = format!("{} weights, greedy", q.name());
        say(&name);
        let t = Instant::now();
        let vars = ckpt
            .vars()
            .into_iter()
            .map(|(n, v)| Ok((n, Var::from_tensor(&q.apply(v.as_tensor())?)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let rounded = Checkpoint::from_vars(ckpt.config.clone(), vars, &ckpt.device);
        let qm = Model::load_frozen(&rounded)?;
        let r = regurgitation(&qm, tok, docs, &greedy, quiet)?;
        rows.push(row_of(name, &r.spans, false, t.elapsed().as_secs_f64()));
    }
    if let Some(rl) = &settings.relearn {
        let name = format!(
            "relearned ({} epoch{} on {} at lr {}), greedy",
            rl.epochs,
            if rl.epochs == 1 { "" } else { "s" },
            rl.file.display(),
            rl.lr
        );
        say(&name);
        let t = Instant::now();
        let copy = relearned(ckpt, model, tok, base, rl, quiet)?;
        let rm = Model::load_frozen(&copy)?;
        let r = regurgitation(&rm, tok, docs, &greedy, quiet)?;
        rows.push(row_of(name, &r.spans, false, t.elapsed().as_secs_f64()));
    }
    let probe = match settings.fakes {
        0 => None,
        k => {
            say(&format!("membership, true span against {k} fakes"));
            Some(membership(model, tok, docs, base, k, settings.fakes_from)?)
        }
    };
    let control_probe = match (settings.fakes, control) {
        (k @ 1.., Some(c)) => Some(membership(model, tok, c, base, k, settings.fakes_from)?),
        _ => None,
    };
    Ok(AttackReport::assemble(
        settings.clone(),
        rows,
        probe,
        control_probe,
        started.elapsed().as_secs_f64(),
    ))
}

impl AttackReport {
    /// The report of the attacks' rows and probes: the worst case per label and overall.
    pub fn assemble(
        settings: AttackSettings,
        rows: Vec<AttackRow>,
        membership: Option<Membership>,
        control_membership: Option<Membership>,
        seconds: f64,
    ) -> AttackReport {
        let mut labels: Vec<&String> = rows.iter().flat_map(|r| r.per_label.keys()).collect();
        labels.sort();
        labels.dedup();
        let worst = labels
            .into_iter()
            .map(|l| {
                let w = worst_of(
                    rows.iter()
                        .filter_map(|r| r.per_label.get(l).map(|h| (r.attack.as_str(), h))),
                );
                (l.clone(), w)
            })
            .collect();
        let worst_total = worst_of(rows.iter().map(|r| (r.attack.as_str(), &r.total)));
        AttackReport {
            settings,
            attacks: rows,
            worst,
            worst_total,
            membership,
            control_membership,
            seconds,
        }
    }
}

impl Hits {
    /// The counts of two disjoint sets of spans together.
    pub fn merged(&self, other: &Hits) -> Hits {
        let (measured, hits) = (self.measured + other.measured, self.hits + other.hits);
        Hits {
            measured,
            hits,
            rate: if measured == 0 {
                0.0
            } else {
                hits as f64 / measured as f64
            },
        }
    }
}

impl AttackRow {
    /// The same attack's figures on two disjoint sets of spans together.
    pub fn merged(&self, other: &AttackRow) -> AttackRow {
        let mut per_label = self.per_label.clone();
        for (l, h) in &other.per_label {
            let e = per_label.entry(l.clone()).or_default();
            *e = e.merged(h);
        }
        AttackRow {
            attack: self.attack.clone(),
            per_label,
            total: self.total.merged(&other.total),
            seconds: self.seconds + other.seconds,
        }
    }
}

/// A copy of the model fine-tuned on `rl.file` (every token, every tensor).
fn relearned(
    ckpt: &Checkpoint,
    model: &Model,
    tok: &Tokenizer,
    base: &RegurgitationSettings,
    rl: &RelearnSettings,
    quiet: bool,
) -> Result<Checkpoint> {
    let docs = crate::data::spans::load_documents(Some(&rl.file), None, None)?;
    if docs.iter().all(|d| d.text.is_empty()) {
        bail!("{}: no text to relearn on", rl.file.display());
    }
    let vars = ckpt
        .vars()
        .into_iter()
        .map(|(n, v)| Ok((n, Var::from_tensor(&v.as_tensor().copy()?)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    let copy = Checkpoint::from_vars(ckpt.config.clone(), vars, &ckpt.device);
    let framing = resolve_bos_info(model, tok, base.bos, base.doc_separator.as_deref())?.framing();
    let corpus = crate::train::Corpus {
        docs: &docs,
        tok,
        labels: Vec::new(),
        framing,
        max_seq_len: rl.max_seq_len.min(model.config.max_positions()),
        stride: None,
    };
    let examples = crate::train::windows_to_examples(&corpus.windows(&docs)?, false);
    let cfg = crate::train::TrainConfig {
        forget_weight: 0.0,
        forget_per_token: false,
        epochs: rl.epochs,
        batch_size: rl.batch_size,
        grad_accum: 1,
        lr: rl.lr,
        warmup_steps: 0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        seed: base.seed,
        checkpoint_activations: true,
        activation_memory_mib: 0,
        lora: None,
        modules: Vec::new(),
    };
    cfg.validate()?;
    let mut data = crate::train::FixedData(examples);
    crate::train::fit(&copy, crate::train::TrainScope::All, &mut data, &cfg, quiet)?;
    Ok(copy)
}

/// The tokens of `candidate` after `before` (tokenized together, so in context).
fn candidate_tokens(tok: &Tokenizer, before: &str, candidate: &str) -> Result<Vec<u32>> {
    let start = before.chars().count();
    let doc = Document {
        id: String::new(),
        text: format!("{before}{candidate}"),
        spans: vec![Span {
            start,
            end: start + candidate.chars().count(),
            label: String::new(),
        }],
    };
    let enc = tokens::encode_document(tok, &doc, 0)?;
    Ok(enc
        .ids
        .iter()
        .zip(&enc.span_of_token)
        .filter(|(_, s)| s.is_some())
        .map(|(&id, _)| id)
        .collect())
}

/// Log-probability of each row's continuation after its prompt (teacher forced, batched).
fn continuation_log_probs(
    model: &Model,
    rows: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
) -> Result<Vec<f64>> {
    let dev = &model.device;
    let max_pos = model.config.max_positions();
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch_size.max(1)) {
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|(p, c)| {
                let mut s = p.clone();
                s.extend_from_slice(c);
                s.truncate(max_pos);
                s
            })
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let lens: Vec<usize> = refs.iter().map(|s| s.len()).collect();
        // One to a row, never packed: a sequence's figures must not depend on which others
        // share its batch, so that shards merge to exactly the unsharded figures.
        let layout = tokens::RowLayout::one_each(&lens);
        let t = layout.width;
        let input = Tensor::from_vec(layout.ids(&refs), (layout.rows.len(), t), dev)?;
        let ctx = AttnContext::for_segments(&layout.segments, t, model.sliding_window(), dev)?;
        let h = model.hidden_before(model.num_layers(), &input, &ctx)?;
        for (r, ((prompt, _), seq)) in chunk.iter().zip(&seqs).enumerate() {
            let n = seq.len().saturating_sub(prompt.len());
            if n == 0 || prompt.is_empty() {
                out.push(0.0);
                continue;
            }
            // Logits only where a continuation token is predicted.
            let hid = h.narrow(0, r, 1)?.narrow(1, prompt.len() - 1, n)?;
            let logits = model.logits(&hid)?.squeeze(0)?.to_dtype(DType::F32)?;
            let targets = Tensor::from_slice(&seq[prompt.len()..], n, dev)?;
            let nll = crate::nn::ops::token_nll(&logits, &targets)?.to_vec1::<f32>()?;
            out.push(-nll.iter().map(|&x| x as f64).sum::<f64>());
        }
    }
    Ok(out)
}

/// Every span's text by label and document, for drawing fakes from the file itself.
struct ValuePool<'a> {
    by_label: BTreeMap<&'a str, Vec<(usize, String)>>,
}

impl<'a> ValuePool<'a> {
    fn of(docs: &'a [Document]) -> Self {
        let mut by_label: BTreeMap<&str, Vec<(usize, String)>> = BTreeMap::new();
        for (d, doc) in docs.iter().enumerate() {
            let chars: Vec<char> = doc.text.chars().collect();
            for s in &doc.spans {
                let (a, b) = (s.start.min(chars.len()), s.end.min(chars.len()));
                let text: String = chars[a..b.max(a)].iter().collect();
                by_label
                    .entry(s.label.as_str())
                    .or_default()
                    .push((d, text));
            }
        }
        ValuePool { by_label }
    }

    /// The label's values in documents other than `doc` that differ from `truth` (one entry
    /// per occurrence, so common values are drawn as often as they occur), of the same number
    /// of words where at least two distinct ones are (a surname is not scored against full
    /// names); empty when fewer than two distinct values qualify.
    fn others(&self, label: &str, doc: usize, truth: &str) -> Vec<&str> {
        let all: Vec<&str> = self
            .by_label
            .get(label)
            .into_iter()
            .flatten()
            .filter(|(d, t)| *d != doc && t.trim() != truth.trim() && !t.trim().is_empty())
            .map(|(_, t)| t.as_str())
            .collect();
        let words = truth.split_whitespace().count();
        let same_shape: Vec<&str> = all
            .iter()
            .copied()
            .filter(|t| t.split_whitespace().count() == words)
            .collect();
        let distinct = |v: &[&str]| {
            let mut d = v.to_vec();
            d.sort_unstable();
            d.dedup();
            d.len()
        };
        if distinct(&same_shape) >= 2 {
            same_shape
        } else if distinct(&all) >= 2 {
            all
        } else {
            Vec::new()
        }
    }
}

/// The membership probe on the spans of `docs` (see the module doc).
pub fn membership(
    model: &Model,
    tok: &Tokenizer,
    docs: &[Document],
    base: &RegurgitationSettings,
    fakes: usize,
    fakes_from: FakeSource,
) -> Result<Membership> {
    let pool = ValuePool::of(docs);
    let mut bos = resolve_bos_info(model, tok, base.bos, base.doc_separator.as_deref())?;
    let prepared = prepare(model, tok, docs, base, &mut bos)?;
    let plain = tokens::plain_tokenizer(tok)?;
    let mut rows = Vec::new();
    let mut spans = Vec::new();
    for p in &prepared {
        if !p.bos_only && super::regurgitation::span_in_prompt(&p.prompt_text, &p.span_text) {
            continue;
        }
        let label = &docs[p.doc_index].spans[p.span_index].label;
        let before = format!("{}{}", p.prompt_text, p.gap);
        let truth = candidate_tokens(&plain, &before, &p.span_text)?;
        if truth.is_empty() {
            continue;
        }
        rows.push((p.prompt.clone(), truth));
        let others = match fakes_from {
            FakeSource::Corpus => pool.others(label, p.doc_index, &p.span_text),
            FakeSource::Generators => Vec::new(),
        };
        // Per span, so a span's fakes do not depend on which others are measured with it.
        let mut rng = span_rng(base.seed ^ 0x6d65_6d62, p.doc_index, p.span_index);
        for _ in 0..fakes {
            let fake = match others.len() {
                0 => surrogate_for(label, &p.span_text, &mut rng),
                n => others[rng.random_range(0..n)].to_string(),
            };
            rows.push((p.prompt.clone(), candidate_tokens(&plain, &before, &fake)?));
        }
        spans.push((p.doc_index, p.span_index, label.clone()));
    }
    let scores = continuation_log_probs(model, &rows, base.batch_size)?;
    let outcomes: Vec<AucOutcome> = spans
        .into_iter()
        .zip(scores.chunks(fakes + 1))
        .map(|((doc_index, span_index, label), group)| {
            let truth = group[0];
            let wins: f64 = group[1..]
                .iter()
                .map(|&f| match truth.partial_cmp(&f) {
                    Some(std::cmp::Ordering::Greater) => 1.0,
                    Some(std::cmp::Ordering::Equal) => 0.5,
                    _ => 0.0,
                })
                .sum();
            AucOutcome {
                doc_index,
                span_index,
                label,
                auc: wins / fakes as f64,
            }
        })
        .collect();
    Ok(Membership::of(fakes, fakes_from, &outcomes).with_outcomes(outcomes))
}

/// The suite's table: per label, the worst extraction rate and which attack, next to the
/// chance levels (the control set's greedy exact rate, when measured) and the membership AUC
/// with its chance level; then every attack's overall rate.
pub fn render_attacks(a: &AttackReport, control: Option<&RegurgitationSummary>) -> String {
    let chance_exact = |label: Option<&str>| -> String {
        let c = control.and_then(|c| match label {
            Some(l) => c.per_label.get(l),
            None => Some(&c.total),
        });
        c.map_or("-".to_string(), |c| format!("{:.3}", c.exact_rate))
    };
    let fmt_auc = |m: &Option<Membership>, label: Option<&str>| -> String {
        let auc = m.as_ref().and_then(|m| match label {
            Some(l) => m.per_label.get(l).and_then(|x| x.auc),
            None => m.total.auc,
        });
        auc.map_or("-".to_string(), |v| format!("{v:.3}"))
    };
    let mut s = format!(
        "attacks ({} run, {:.1}s): worst case per label (chance: the control set)\n\
         {:<16} {:>13} {:>7} {:>7} {:>7}  attack\n",
        a.attacks.len(),
        a.seconds,
        "label",
        "worst exact",
        "chance",
        "AUC",
        "chance"
    );
    let line = |name: &str, w: &Worst, label: Option<&str>| {
        format!(
            "{name:<16} {:>5}/{:<3} {:.3} {:>7} {:>7} {:>7}  {}\n",
            w.hits,
            w.measured,
            w.rate,
            chance_exact(label),
            fmt_auc(&a.membership, label),
            fmt_auc(&a.control_membership, label),
            if w.attack.is_empty() { "-" } else { &w.attack }
        )
    };
    for (label, w) in &a.worst {
        s += &line(label, w, Some(label));
    }
    s += &line("WORST TOTAL", &a.worst_total, None);
    for r in &a.attacks {
        s += &format!(
            "  {:<64} exact {:>4}/{:<4} {:.4}  ({:.1}s)\n",
            r.attack, r.total.hits, r.total.measured, r.total.rate, r.seconds
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, text: &str, spans: &[(&str, &str)]) -> Document {
        Document {
            id: id.into(),
            text: text.into(),
            spans: spans
                .iter()
                .map(|(label, value)| {
                    let start = text.find(value).unwrap();
                    Span {
                        start,
                        end: start + value.len(),
                        label: label.to_string(),
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn corpus_fakes_are_other_documents_values_of_the_same_shape() {
        let docs = vec![
            doc(
                "a",
                "Ann Lee, Lee, Oak Ward",
                &[("NAME", "Ann Lee"), ("WARD", "Oak Ward")],
            ),
            doc(
                "b",
                "Bo Kim, Elm Ward",
                &[("NAME", "Bo Kim"), ("WARD", "Elm Ward")],
            ),
            doc("c", "Cy Park, Kim", &[("NAME", "Cy Park"), ("NAME", "Kim")]),
            doc("d", "Ann Lee again", &[("NAME", "Ann Lee")]),
        ];
        let pool = ValuePool::of(&docs);
        // Two-word names from the other documents, never the true text (doc d's "Ann Lee").
        let mut fakes = pool.others("NAME", 0, "Ann Lee");
        fakes.sort_unstable();
        assert_eq!(fakes, vec!["Bo Kim", "Cy Park"]);
        // Fewer than two one-word names elsewhere: every other shape is taken.
        let mut fakes = pool.others("NAME", 2, "Kim");
        fakes.sort_unstable();
        assert_eq!(
            fakes,
            vec!["Ann Lee", "Ann Lee", "Bo Kim"],
            "one entry per occurrence"
        );
        // One distinct ward elsewhere is not enough: the generators take over.
        assert!(pool.others("WARD", 0, "Oak Ward").is_empty());
        assert!(pool.others("EMAIL", 0, "x@y.z").is_empty());
    }

    #[test]
    fn per_row_quantization_keeps_the_row_maximum_and_the_levels() {
        let t = Tensor::new(
            &[[0.55f32, -1.0, 0.26], [0.0, 0.0, 0.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let q = Quantization::Int4
            .apply(&t)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // Row 0: scale 1/7; 0.55 -> 3.85 rounds to 4/7; 0.26 -> 1.82 rounds to 2/7.
        let want = [4.0 / 7.0, -1.0, 2.0 / 7.0];
        for (a, b) in q[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(q[1], vec![0.0, 0.0, 0.0]);
        let v = Tensor::new(&[0.123456f32], &candle_core::Device::Cpu).unwrap();
        // Vectors are kept under int quantization, rounded under bf16.
        assert_eq!(
            Quantization::Int8
                .apply(&v)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![0.123456]
        );
        let b = Quantization::Bf16
            .apply(&v)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!(b != 0.123456 && (b - 0.123456).abs() < 1e-3);
    }

    #[test]
    fn the_worst_case_names_the_attack() {
        let h = |hits, measured| Hits {
            measured,
            hits,
            rate: hits as f64 / measured as f64,
        };
        let (a, b) = (h(1, 10), h(3, 10));
        let w = worst_of([("greedy", &a), ("int4", &b)].into_iter());
        assert_eq!((w.attack.as_str(), w.hits), ("int4", 3));
        let none = worst_of([("greedy", &h(0, 9)), ("int4", &h(0, 10))].into_iter());
        assert_eq!(
            (none.attack.as_str(), none.hits, none.measured),
            ("", 0, 10)
        );
    }
}
