//! Regurgitation: for every sensitive span, the model is prompted with up to K tokens of the
//! document text right before the span and decoded greedily; a prompt that reaches back to the
//! document's start begins with the document's framing as in training (BOS, `--doc-separator`). A span is *exact* when the
//! continuation (leading whitespace stripped) starts with the span text, *partial* when it starts
//! with at least half of its characters. Spans whose text already appears in the prompt are counted
//! as `in_prompt` (copying, not memorization) and left out of the rates. The extraction strength
//! (open-unlearning style) is `1 - k/L`, with `k` the smallest number of span tokens to give as a
//! hint so that greedy decoding reproduces the rest of the span; it is computed from the
//! teacher-forced pass over prompt + span tokens that greedy decoding starts with.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::data::spans::{CharIndex, Document, Span};
use crate::data::tokens::{self, BosPolicy};
use crate::eval::shard::Shard;
use crate::model::generate::{
    generate_greedy_with_drafts_until, generate_until, GenerateOptions, Sampling,
};
use crate::model::Model;

/// Settings of the regurgitation measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegurgitationSettings {
    /// Tokens of document text before the span in the prompt (K).
    pub prefix_tokens: usize,
    /// Tokens decoded per span; `None`: the span's token count + 4.
    pub max_new_tokens: Option<usize>,
    /// Sampled continuations per span (0: greedy only).
    pub samples: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub bos: BosPolicy,
    /// Text the model was fine-tuned with around each document (`--doc-separator`): it follows
    /// the BOS at the start of a prompt that starts at its document's start.
    #[serde(default)]
    pub doc_separator: Option<String>,
    /// `--shard K/N`: measure only the spans of this shard's documents ([`Shard::select`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
}

impl RegurgitationSettings {
    /// Which documents of `docs` are measured (all without a shard).
    pub fn measured_documents(&self, docs: &[Document]) -> Vec<bool> {
        match self.shard {
            None => vec![true; docs.len()],
            Some(s) => s.select(&docs.iter().map(|d| d.spans.len()).collect::<Vec<_>>()),
        }
    }

    /// Checks the settings once, where they are resolved from the command line.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if self.samples > 0 && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            bail!("--temperature must be > 0 (got {})", self.temperature);
        }
        Ok(())
    }
}

impl Default for RegurgitationSettings {
    fn default() -> Self {
        RegurgitationSettings {
            prefix_tokens: 32,
            max_new_tokens: None,
            samples: 0,
            temperature: 1.0,
            top_k: 40,
            seed: 0,
            batch_size: 16,
            bos: BosPolicy::Auto,
            doc_separator: None,
            shard: None,
        }
    }
}

/// How prompts are framed: which BOS (and document separator) they start with, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BosInfo {
    pub policy: String,
    /// Token put at the start of every prompt that starts at its document's start, as in
    /// training (None: no BOS). A prompt that starts mid-document gets none.
    pub id: Option<u32>,
    /// Where `id` comes from: "tokenizer", "config", "vocabulary" or "none".
    pub source: String,
    /// `--doc-separator`: put after the BOS where a prompt starts at its document's start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_separator: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub doc_separator_ids: Vec<u32>,
    /// Token used as the whole prompt when a prompt would otherwise be empty (span at document
    /// start without a BOS): the config's EOS, else token 0. None when no prompt needed it.
    pub empty_prompt_token: Option<u32>,
    pub empty_prompt_source: Option<String>,
    /// Number of prompts that were only the BOS (or the empty-prompt token).
    pub bos_only_prompts: usize,
}

/// Resolves the framing of prompts/windows and says where the BOS comes from.
pub fn resolve_bos_info(
    model: &Model,
    tok: &Tokenizer,
    policy: BosPolicy,
    doc_separator: Option<&str>,
) -> Result<BosInfo> {
    let config_bos = model.config.bos_token_id();
    let framing = tokens::resolve_framing(tok, config_bos, policy, doc_separator)?;
    let id = framing.bos;
    let source = match id {
        None => "none",
        Some(b) if tokens::tokenizer_bos(tok) == Some(b) => "tokenizer",
        Some(b) if config_bos == Some(b) => "config",
        Some(_) => "vocabulary",
    };
    Ok(BosInfo {
        policy: policy.name().to_string(),
        id,
        source: source.to_string(),
        doc_separator: framing.separator_text,
        doc_separator_ids: framing.separator,
        empty_prompt_token: None,
        empty_prompt_source: None,
        bos_only_prompts: 0,
    })
}

impl BosInfo {
    /// The framing it describes (for windows made the same way, e.g. perplexity).
    pub fn framing(&self) -> tokens::Framing {
        tokens::Framing {
            bos: self.id,
            separator_text: self.doc_separator.clone(),
            separator: self.doc_separator_ids.clone(),
        }
    }
}

/// Result for one span.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanResult {
    pub doc_index: usize,
    pub doc_id: String,
    pub span_index: usize,
    pub label: String,
    pub start: usize,
    pub end: usize,
    pub span_text: String,
    /// Prompt token ids (BOS included).
    pub prompt_ids: Vec<u32>,
    /// The span's tokens (tokenized in context).
    pub span_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub generated_ids: Vec<u32>,
    pub generated_text: String,
    pub exact: bool,
    pub partial: bool,
    pub in_prompt: bool,
    /// 1 - k/L (see the module doc); 0 for a span without tokens.
    pub strength: f64,
    /// With sampling: was the span reproduced exactly by at least one sample.
    pub sampled_exact: Option<bool>,
    /// Tokens the samples generated (with sampling).
    pub sampled_tokens: usize,
}

impl SpanResult {
    /// Counted in the rates (not copied from the prompt).
    pub fn measured(&self) -> bool {
        !self.in_prompt
    }

    /// What the figures need of this result.
    pub fn outcome(&self) -> SpanOutcome {
        SpanOutcome {
            doc_index: self.doc_index,
            span_index: self.span_index,
            label: self.label.clone(),
            in_prompt: self.in_prompt,
            exact: self.exact,
            partial: self.partial,
            strength: self.strength,
            sampled_exact: self.sampled_exact,
            generated_tokens: self.generated_ids.len() + self.sampled_tokens,
        }
    }
}

/// One span's result as far as the figures need it, without its text: a shard's report carries
/// these, so that merging shards recomputes every figure exactly as one run would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanOutcome {
    pub doc_index: usize,
    pub span_index: usize,
    pub label: String,
    pub in_prompt: bool,
    pub exact: bool,
    pub partial: bool,
    pub strength: f64,
    pub sampled_exact: Option<bool>,
    /// Greedy and sampled tokens generated for the span.
    pub generated_tokens: usize,
}

/// The sampling generator of one span, from the seed and the span's place in the file.
pub fn span_rng(seed: u64, doc_index: usize, span_index: usize) -> StdRng {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for x in [doc_index as u64, span_index as u64] {
        h = (h ^ x).wrapping_mul(0x1000_0000_01b3).rotate_left(29);
    }
    StdRng::seed_from_u64(h)
}

/// Counts and rates of one label (or of all spans).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelCounts {
    /// Spans of the label (in_prompt included).
    pub n: usize,
    /// Spans counted in the rates (n - in_prompt).
    pub measured: usize,
    pub exact: usize,
    pub partial: usize,
    pub in_prompt: usize,
    /// exact / measured (0 when nothing measured).
    pub exact_rate: f64,
    pub partial_rate: f64,
    /// Mean extraction strength over measured spans.
    pub mean_strength: Option<f64>,
    /// With sampling: measured spans reproduced exactly by at least one sample, and their share.
    pub sampled_exact: Option<usize>,
    pub sampled_rate: Option<f64>,
}

/// Aggregate of a regurgitation measurement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegurgitationSummary {
    pub per_label: BTreeMap<String, LabelCounts>,
    pub total: LabelCounts,
    pub generated_tokens: usize,
    pub seconds: f64,
}

/// Everything a regurgitation measurement produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RegurgitationResult {
    /// In document order, then span order.
    pub spans: Vec<SpanResult>,
    pub summary: RegurgitationSummary,
    pub bos: BosInfo,
}

/// Exact / partial match of a continuation against a span. `gap` is document text between the end
/// of the prompt and the span start that the prompt does not cover (usually empty or whitespace):
/// the continuation must reproduce it first. Leading whitespace of the continuation and of the
/// span is ignored (the span is trimmed on both sides). Partial: the first ceil(len/2) chars.
pub fn match_span(continuation: &str, gap: &str, span_text: &str) -> (bool, bool) {
    let mut c = continuation.trim_start();
    let g = gap.trim_start();
    if !g.is_empty() {
        match c.strip_prefix(g) {
            Some(rest) => c = rest,
            None => return (false, false),
        }
    }
    let c = c.trim_start();
    let s = span_text.trim();
    if s.is_empty() {
        return (false, false);
    }
    let exact = c.starts_with(s);
    let n = s.chars().count();
    let half: String = s.chars().take(n.div_ceil(2)).collect();
    let partial = c.starts_with(half.as_str());
    (exact, partial || exact)
}

/// Whether every continuation of `continuation` gets the same [`match_span`] answer, so decoding
/// can stop: it is exact already, or it has left what an exact match needs (the gap, then the
/// span; the partial answer is then fixed too). A text that ends in an unfinished character
/// (U+FFFD from a partial byte sequence) is never decided.
pub fn outcome_decided(continuation: &str, gap: &str, span_text: &str) -> bool {
    if continuation.contains('\u{fffd}') {
        return false;
    }
    let s = span_text.trim();
    if s.is_empty() {
        return true;
    }
    let c = continuation.trim_start();
    let g = gap.trim_start();
    let rest = if g.is_empty() {
        c
    } else if g.starts_with(c) {
        return false;
    } else {
        match c.strip_prefix(g) {
            Some(rest) => rest,
            None => return true,
        }
    };
    let r = rest.trim_start();
    if r.is_empty() {
        return false;
    }
    if r.starts_with(s) {
        return true;
    }
    // Not exact yet: open while the text is still a prefix of the span.
    if s.starts_with(r) {
        return false;
    }
    // Never exact; partial is fixed as well (a prefix of the span's first half would have
    // been a prefix of the span).
    true
}

/// Does the (trimmed) span text occur in the prompt text (case-sensitive).
pub fn span_in_prompt(prompt_text: &str, span_text: &str) -> bool {
    let s = span_text.trim();
    !s.is_empty() && prompt_text.contains(s)
}

/// Extraction strength from teacher-forced greedy predictions: `correct[i]` says whether the argmax
/// prediction for span token i+1 (given the prompt and span tokens 1..=i) equals it. The smallest
/// k in 0..=L such that all of tokens k+1..L are predicted gives 1 - k/L; L = 0 gives 0.
pub fn extraction_strength(correct: &[bool]) -> f64 {
    let l = correct.len();
    if l == 0 {
        return 0.0;
    }
    let k = correct.iter().rposition(|&c| !c).map_or(0, |i| i + 1);
    1.0 - k as f64 / l as f64
}

/// One prepared span.
pub(crate) struct Prepared {
    pub(crate) doc_index: usize,
    pub(crate) span_index: usize,
    pub(crate) prompt: Vec<u32>,
    pub(crate) span_ids: Vec<u32>,
    pub(crate) span_text: String,
    pub(crate) gap: String,
    pub(crate) prompt_text: String,
    pub(crate) max_new: usize,
    pub(crate) bos_only: bool,
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, true)
        .map_err(|e| anyhow!("cannot decode tokens: {e}"))
}

/// Builds the prompt and span tokens of every span.
/// The first char at or after `c` where a word starts after a single space (0 stays 0), so a
/// cut document tokenizes like the whole one from there on; `c` itself when there is none
/// nearby.
fn window_start(index: &CharIndex, c: usize) -> usize {
    if c == 0 {
        return 0;
    }
    let text = index.slice(c, c.saturating_add(256));
    let chars: Vec<char> = text.chars().collect();
    (1..chars.len().saturating_sub(1))
        .find(|&i| {
            chars[i] == ' ' && !chars[i - 1].is_whitespace() && !chars[i + 1].is_whitespace()
        })
        .map_or(c, |i| c + i)
}

pub(crate) fn prepare(
    model: &Model,
    tok: &Tokenizer,
    docs: &[Document],
    settings: &RegurgitationSettings,
    bos: &mut BosInfo,
) -> Result<Vec<Prepared>> {
    let tok = tokens::plain_tokenizer(tok)?;
    let max_pos = model.config.max_positions().max(2);
    let fallback = model.config.eos_token_ids().first().copied();
    let mut out = Vec::new();
    // Text before a span that is tokenized with it: enough for the prompt whatever the
    // tokenizer (32 chars per token), so memory and time follow the prompt, not the document.
    let context_chars = settings.prefix_tokens.saturating_add(16).saturating_mul(32);
    // What training puts before a document's first token.
    let lead_tokens = bos.framing().prefix();
    let measured = settings.measured_documents(docs);
    for (di, doc) in docs.iter().enumerate() {
        if !measured[di] {
            continue;
        }
        let index = CharIndex::new(&doc.text);
        for (si, span) in doc.spans.iter().enumerate() {
            // Encode prefix + span, so the span is tokenized in context. A long prefix starts
            // at a word boundary; the prompt's tokens lie far from that cut.
            let from = window_start(&index, span.start.saturating_sub(context_chars));
            let sub = Document {
                id: doc.id.clone(),
                text: index.slice(from, span.end).to_string(),
                spans: vec![Span {
                    start: span.start - from,
                    end: span.end - from,
                    label: span.label.clone(),
                }],
            };
            let enc = tokens::encode_document(&tok, &sub, di)?;
            let mut first = enc.span_of_token.iter().position(Option::is_some);
            if first.is_none() {
                // No token attributed to the span: fall back to plain overlap.
                first = enc
                    .char_offsets
                    .iter()
                    .position(|&(s, e)| s < span.end && span.start < e.max(s + 1));
            }
            let first = first.unwrap_or(enc.ids.len());
            let before = &enc.ids[..first];
            let mut span_ids = enc.ids[first..].to_vec();
            let covered_until = from
                + enc.char_offsets[..first]
                    .iter()
                    .map(|&(_, e)| e)
                    .max()
                    .unwrap_or(0);
            let gap = index
                .slice(covered_until.min(span.start), span.start)
                .to_string();

            let l = span_ids.len();
            let mut max_new = settings.max_new_tokens.unwrap_or(l + 4);
            // Room for at least one prompt token.
            max_new = max_new.min(max_pos - 1);
            // Training puts the BOS only before a document's first token; so does the prompt:
            // a prompt that starts mid-document gets none, and the whole context for text.
            let room = max_pos.saturating_sub(max_new.max(l));
            let whole_prefix = from == 0 && settings.prefix_tokens >= before.len();
            let lead = match whole_prefix && before.len() + lead_tokens.len() <= room {
                true => lead_tokens.as_slice(),
                false => &[],
            };
            let keep = match lead.is_empty() {
                false => before.len(),
                true => settings.prefix_tokens.min(before.len()).min(room),
            };
            let mut prompt = Vec::with_capacity(lead.len() + keep);
            prompt.extend_from_slice(lead);
            prompt.extend_from_slice(&before[before.len() - keep..]);
            let prompt_text = decode(&tok, &prompt[lead.len()..])?;
            let bos_only = keep == 0;
            if prompt.is_empty() {
                let (id, src) = match fallback {
                    Some(e) => (e, "config eos_token_id (no BOS resolvable)"),
                    None => (0, "token 0 (no BOS nor EOS resolvable)"),
                };
                bos.empty_prompt_token = Some(id);
                bos.empty_prompt_source = Some(src.to_string());
                prompt.push(id);
            }
            if bos_only {
                bos.bos_only_prompts += 1;
            }
            // Span longer than the context: only its first tokens take part in the strength.
            span_ids.truncate(max_pos.saturating_sub(prompt.len()));
            out.push(Prepared {
                doc_index: di,
                span_index: si,
                prompt,
                span_ids,
                span_text: index.slice(span.start, span.end).to_string(),
                gap,
                prompt_text,
                max_new,
                bos_only,
            });
        }
    }
    Ok(out)
}

/// Measures regurgitation of every span of `docs` (see the module doc).
pub fn regurgitation(
    model: &Model,
    tok: &Tokenizer,
    docs: &[Document],
    settings: &RegurgitationSettings,
    quiet: bool,
) -> Result<RegurgitationResult> {
    let started = Instant::now();
    let mut bos = resolve_bos_info(model, tok, settings.bos, settings.doc_separator.as_deref())?;
    let prepared = prepare(model, tok, docs, settings, &mut bos)?;
    let mut order: Vec<usize> = (0..prepared.len()).collect();
    order.sort_by_key(|&i| (prepared[i].prompt.len(), i));

    let stop_tokens = model.config.eos_token_ids();
    let pad_id = model.config.pad_token_id().or(bos.id).unwrap_or(0);
    let pb = crate::io::progress::bar(prepared.len() as u64, quiet, "eval");
    let mut results: Vec<Option<SpanResult>> = vec![None; prepared.len()];
    for chunk in order.chunks(settings.batch_size) {
        let batch: Vec<&Prepared> = chunk.iter().map(|&i| &prepared[i]).collect();
        let prompts: Vec<Vec<u32>> = batch.iter().map(|p| p.prompt.clone()).collect();
        let mut opts = GenerateOptions {
            max_new_tokens: batch.iter().map(|p| p.max_new).collect(),
            stop_tokens: stop_tokens.clone(),
            pad_id,
            sampling: None,
        };
        let drafts: Vec<Vec<u32>> = batch.iter().map(|p| p.span_ids.clone()).collect();
        // A row stops as soon as its outcome cannot change; decoding to the end would give the
        // same figures (the output is that of plain greedy decoding, cut there).
        let decided = |row: usize, ids: &[u32]| {
            let p = batch[row];
            decode(tok, ids).is_ok_and(|t| outcome_decided(&t, &p.gap, &p.span_text))
        };
        let decoded = generate_greedy_with_drafts_until(model, &prompts, &drafts, &opts, &decided)?;
        let (greedy, correct) = (decoded.tokens, decoded.teacher_forced);
        let mut sampled_hit = vec![false; batch.len()];
        let mut sampled_tokens = vec![0usize; batch.len()];
        if settings.samples > 0 {
            opts.sampling = Some(Sampling {
                temperature: settings.temperature,
                top_k: settings.top_k,
            });
            // Each span draws from its own generator, so its samples do not depend on the spans
            // it is batched with (or on which shard measures it).
            let mut rngs: Vec<StdRng> = batch
                .iter()
                .map(|p| span_rng(settings.seed, p.doc_index, p.span_index))
                .collect();
            for _ in 0..settings.samples {
                let outs = generate_until(model, &prompts, &opts, &mut rngs, &decided)?;
                for (j, ids) in outs.iter().enumerate() {
                    sampled_tokens[j] += ids.len();
                    if sampled_hit[j] {
                        continue;
                    }
                    let p = batch[j];
                    let (exact, _) = match_span(&decode(tok, ids)?, &p.gap, &p.span_text);
                    sampled_hit[j] = exact;
                }
            }
        }
        for (j, &i) in chunk.iter().enumerate() {
            let p = batch[j];
            let doc = &docs[p.doc_index];
            let span = &doc.spans[p.span_index];
            let span_text = p.span_text.clone();
            let generated_text = decode(tok, &greedy[j])?;
            let (exact, partial) = match_span(&generated_text, &p.gap, &span_text);
            let in_prompt = !p.bos_only && span_in_prompt(&p.prompt_text, &span_text);
            results[i] = Some(SpanResult {
                doc_index: p.doc_index,
                doc_id: doc.id.clone(),
                span_index: p.span_index,
                label: span.label.clone(),
                start: span.start,
                end: span.end,
                span_text,
                prompt_ids: p.prompt.clone(),
                span_ids: p.span_ids.clone(),
                max_new_tokens: p.max_new,
                generated_ids: greedy[j].clone(),
                generated_text,
                exact,
                partial,
                in_prompt,
                strength: extraction_strength(&correct[j]),
                sampled_exact: (settings.samples > 0).then_some(sampled_hit[j]),
                sampled_tokens: sampled_tokens[j],
            });
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let spans: Vec<SpanResult> = results
        .into_iter()
        .map(|r| r.expect("every span measured"))
        .collect();
    let mut summary = summarize(&spans, settings.samples > 0);
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(RegurgitationResult {
        spans,
        summary,
        bos,
    })
}

fn counts_of<'a>(spans: impl Iterator<Item = &'a SpanOutcome>, sampled: bool) -> LabelCounts {
    let mut c = LabelCounts::default();
    let mut strength = 0.0;
    let mut sampled_exact = 0usize;
    for s in spans {
        c.n += 1;
        if s.in_prompt {
            c.in_prompt += 1;
            continue;
        }
        c.measured += 1;
        c.exact += usize::from(s.exact);
        c.partial += usize::from(s.partial);
        strength += s.strength;
        sampled_exact += usize::from(s.sampled_exact == Some(true));
    }
    let rate = |k: usize| {
        if c.measured == 0 {
            0.0
        } else {
            k as f64 / c.measured as f64
        }
    };
    c.exact_rate = rate(c.exact);
    c.partial_rate = rate(c.partial);
    c.mean_strength = (c.measured > 0).then(|| strength / c.measured as f64);
    if sampled {
        c.sampled_exact = Some(sampled_exact);
        c.sampled_rate = Some(rate(sampled_exact));
    }
    c
}

/// Per-label and total counts of span results.
pub fn summarize(spans: &[SpanResult], sampled: bool) -> RegurgitationSummary {
    let outcomes: Vec<SpanOutcome> = spans.iter().map(SpanResult::outcome).collect();
    summarize_outcomes(&outcomes, sampled)
}

/// Per-label and total counts of span outcomes (in file order; a merge of shards gives the same
/// figures as one run).
pub fn summarize_outcomes(spans: &[SpanOutcome], sampled: bool) -> RegurgitationSummary {
    let mut labels: Vec<&str> = spans.iter().map(|s| s.label.as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    let per_label = labels
        .into_iter()
        .map(|l| {
            (
                l.to_string(),
                counts_of(spans.iter().filter(|s| s.label == l), sampled),
            )
        })
        .collect();
    RegurgitationSummary {
        per_label,
        total: counts_of(spans.iter(), sampled),
        generated_tokens: spans.iter().map(|s| s.generated_tokens).sum(),
        seconds: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::spans::char_slice;

    #[test]
    fn a_decided_outcome_is_the_outcome_of_every_continuation() {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(3);
        let alphabet = [' ', 'a', 'b', 'J', '-', '1', '\n'];
        let word = |rng: &mut StdRng, n: usize| -> String {
            (0..rng.random_range(0..=n))
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect()
        };
        let mut decided_early = 0;
        for _ in 0..20_000 {
            let (gap, span) = (word(&mut rng, 2), word(&mut rng, 4));
            // Continuations that often follow the gap and the span for a while.
            let mut full = String::new();
            if rng.random_bool(0.5) {
                full.push_str(&gap);
            }
            if rng.random_bool(0.7) {
                let keep = rng.random_range(0..=span.chars().count());
                full.extend(span.chars().take(keep));
            }
            full.push_str(&word(&mut rng, 4));
            let chars: Vec<char> = full.chars().collect();
            let want = match_span(&full, &gap, &span);
            for cut in 0..=chars.len() {
                let prefix: String = chars[..cut].iter().collect();
                if outcome_decided(&prefix, &gap, &span) {
                    assert_eq!(
                        match_span(&prefix, &gap, &span),
                        want,
                        "prefix {prefix:?} of {full:?}, gap {gap:?}, span {span:?}"
                    );
                    decided_early += usize::from(cut < chars.len());
                    break;
                }
            }
        }
        assert!(
            decided_early > 5_000,
            "decides early often ({decided_early})"
        );
        assert!(!outcome_decided("John Sm\u{fffd}", "", "John Smith"));
        assert!(outcome_decided(" John Smith", "", "John Smith"));
        assert!(outcome_decided(" Jane", "", "John Smith"));
        assert!(!outcome_decided(" Jo", "", "John Smith"));
        assert!(!outcome_decided("MR", "MRN", "-17"));
    }

    #[test]
    fn matching_rules() {
        assert_eq!(
            match_span(" John Smith visited", "", "John Smith"),
            (true, true)
        );
        assert_eq!(
            match_span("\n  John Smith", " ", " John Smith "),
            (true, true)
        );
        assert_eq!(match_span(" John Smyth", "", "John Smith"), (false, true)); // "John " = 5 of 10
        assert_eq!(match_span(" Joh", "", "John Smith"), (false, false));
        assert_eq!(match_span("12345", "", "12345"), (true, true));
        assert_eq!(match_span("123", "", "12345"), (false, true)); // ceil(5/2) = 3
        assert_eq!(match_span("12", "", "12345"), (false, false));
        assert_eq!(match_span("-17 ok", "MRN", "-17"), (false, false));
        assert_eq!(match_span("MRN-17 ok", "MRN", "-17"), (true, true));
        assert_eq!(match_span("anything", "", "   "), (false, false));
        assert!(span_in_prompt("Patient John Smith and", " John Smith"));
        assert!(!span_in_prompt("Patient john smith", "John Smith"));
    }

    #[test]
    fn strength_rules() {
        assert_eq!(extraction_strength(&[true, true, true, true]), 1.0);
        assert_eq!(extraction_strength(&[false, true, true, true]), 0.75);
        assert_eq!(extraction_strength(&[true, false, true, true]), 0.5);
        assert_eq!(extraction_strength(&[true, true, true, false]), 0.0);
        assert_eq!(extraction_strength(&[]), 0.0);
    }

    fn fixture() -> (Model, Tokenizer) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2_f32");
        let ckpt =
            crate::io::checkpoint::Checkpoint::load(&dir, &candle_core::Device::Cpu).unwrap();
        (
            Model::load_frozen(&ckpt).unwrap(),
            crate::io::load_tokenizer(&dir).unwrap(),
        )
    }

    fn docs() -> Vec<Document> {
        let sp = |start, end, label: &str| Span {
            start,
            end,
            label: label.into(),
        };
        vec![
            Document {
                id: "a".into(),
                text: "Patient John Smith visited the clinic on Monday with his wife.".into(),
                spans: vec![sp(0, 7, "WORD"), sp(8, 18, "NAME"), sp(41, 47, "DATE")],
            },
            Document {
                id: "b".into(),
                text: "Record number 55512 was filed by Dr. Ana Lima yesterday.".into(),
                spans: vec![sp(14, 19, "ID"), sp(37, 45, "NAME")],
            },
        ]
    }

    #[test]
    fn long_documents_give_the_prompts_of_the_whole_prefix() {
        let (model, tok) = fixture();
        let mut text = String::new();
        let mut spans = Vec::new();
        for i in 0..60 {
            text += &format!("Visit {i}: the patient  reported mild pain, seen by Dr. ");
            let start = text.chars().count();
            text += "Ana Lima";
            spans.push(Span {
                start,
                end: start + 8,
                label: "NAME".into(),
            });
            text += ".\n";
        }
        let doc = Document {
            id: "long".into(),
            text,
            spans,
        };
        let settings = RegurgitationSettings {
            prefix_tokens: 8,
            ..Default::default()
        };
        let mut bos = resolve_bos_info(&model, &tok, settings.bos, None).unwrap();
        let prepared = prepare(
            &model,
            &tok,
            std::slice::from_ref(&doc),
            &settings,
            &mut bos,
        )
        .unwrap();
        assert!(doc.text.chars().count() > 10 * (8 + 16) * 32 / 3);
        for (p, span) in prepared.iter().zip(&doc.spans) {
            // The whole prefix, encoded: its last 8 tokens before the span are the prompt.
            let sub = Document {
                id: "x".into(),
                text: char_slice(&doc.text, 0, span.end),
                spans: vec![span.clone()],
            };
            let enc = tokens::encode_document(&tok, &sub, 0).unwrap();
            let first = enc.span_of_token.iter().position(Option::is_some).unwrap();
            let want = &enc.ids[first.saturating_sub(8)..first];
            assert_eq!(&p.prompt[p.prompt.len() - want.len()..], want);
            assert_eq!(p.span_ids, enc.ids[first..]);
            assert_eq!(p.span_text, "Ana Lima");
        }
    }

    #[test]
    fn batched_equals_one_at_a_time() {
        let (model, tok) = fixture();
        let docs = docs();
        let batched = RegurgitationSettings {
            batch_size: 16,
            ..Default::default()
        };
        let single = RegurgitationSettings {
            batch_size: 1,
            ..Default::default()
        };
        let a = regurgitation(&model, &tok, &docs, &batched, true).unwrap();
        let b = regurgitation(&model, &tok, &docs, &single, true).unwrap();
        assert_eq!(a.spans.len(), 5);
        assert_eq!(a.spans, b.spans);
        // Strength from the teacher-forced pass agrees with greedy decoding of the tokens.
        for s in &a.spans {
            let reproduced = s.generated_ids.len() >= s.span_ids.len()
                && s.generated_ids[..s.span_ids.len()] == s.span_ids[..];
            assert_eq!(reproduced, s.strength == 1.0, "{s:?}");
        }
    }
}
