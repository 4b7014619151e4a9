//! From character spans to tokens: encoding documents with char offsets, marking the tokens that
//! overlap sensitive spans, choosing the BOS token, cutting training windows, laying windows out
//! in the rows of a batch, and a small byte-level BPE trainer (used by tests and the demo).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::data::spans::Document;

/// One document tokenized without special tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedDoc {
    /// Index of the document in the document list.
    pub doc_index: usize,
    /// Token ids (no special tokens added).
    pub ids: Vec<u32>,
    /// Char (Unicode scalar) offsets of each token in the document text, as given by the tokenizer.
    pub char_offsets: Vec<(usize, usize)>,
    /// Index into `doc.spans` of the span the token overlaps (the one it overlaps most, ties: first),
    /// or `None` if the token is not sensitive.
    pub span_of_token: Vec<Option<usize>>,
}

impl EncodedDoc {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True if the document has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Per token: does it overlap a sensitive span.
    pub fn sensitive(&self) -> Vec<bool> {
        self.span_of_token.iter().map(Option::is_some).collect()
    }
}

/// The tokenizer itself if it has neither truncation nor padding configured, else a copy without
/// them (documents must be encoded whole and unpadded).
pub fn plain_tokenizer(tok: &Tokenizer) -> Result<Cow<'_, Tokenizer>> {
    if tok.get_truncation().is_none() && tok.get_padding().is_none() {
        return Ok(Cow::Borrowed(tok));
    }
    let mut t = tok.clone();
    t.with_truncation(None)
        .map_err(|e| anyhow!("cannot disable truncation: {e}"))?;
    t.with_padding(None);
    Ok(Cow::Owned(t))
}

/// Tokenize one document (no special tokens) and mark the tokens overlapping its spans.
///
/// A token with char range `[s, e)` is sensitive if it overlaps a span `[start, end)`
/// (`s < end && start < e`). Characters the tokenizer left out of every token's offsets (e.g. the
/// leading space of a byte-level token when `trim_offsets` is on) are attributed to the next
/// token, which is the one that encodes them (a zero-width token right after such a gap covers
/// the gap). Other zero-width tokens (`s == e`, e.g. byte-fallback pieces of one char) are
/// sensitive when `s` lies inside a span.
///
/// If the tokenizer has truncation or padding configured, a copy without them is used (slow per
/// call: prefer [`encode_documents`] or pass [`plain_tokenizer`]'s result).
pub fn encode_document(tok: &Tokenizer, doc: &Document, doc_index: usize) -> Result<EncodedDoc> {
    let tok = plain_tokenizer(tok)?;
    let (ids, char_offsets) = encode_long_text(&tok, &doc.text, &PieceSizes::DEFAULT)
        .map_err(|e| anyhow!("cannot tokenize document {:?}: {e}", doc.id))?;
    let n_chars = doc.text.chars().count();
    let span_of_token = mark_tokens(&char_offsets, doc, n_chars);
    Ok(EncodedDoc {
        doc_index,
        ids,
        char_offsets,
        span_of_token,
    })
}

/// How [`encode_long_text`] cuts a long text (in chars).
#[derive(Debug, Clone, Copy)]
pub struct PieceSizes {
    /// Length of each piece encoded on its own.
    pub piece: usize,
    /// Chars each piece shares with the next one.
    pub overlap: usize,
    /// Chars at each end of the overlap not trusted (cut context).
    pub margin: usize,
    /// Consecutive tokens both encodings must agree on at the splice.
    pub agree: usize,
}

impl PieceSizes {
    pub const DEFAULT: PieceSizes = PieceSizes {
        piece: 1 << 16,
        overlap: 2048,
        margin: 256,
        agree: 16,
    };
}

/// Token ids and their char offsets.
pub type Encoded = (Vec<u32>, Vec<(usize, usize)>);

/// Token ids and char offsets of `text`, as the tokenizer gives them for the whole text.
fn encode_text(tok: &Tokenizer, text: &str) -> tokenizers::Result<Encoded> {
    let enc = tok.encode_char_offsets(text, false)?;
    Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
}

/// [`encode_text`] in memory bounded by a piece rather than the text: a long text is encoded in
/// overlapping pieces, spliced where both encodings of the overlap start a token at the same
/// char and agree on the tokens after it (the tokenizer's pre-tokenization makes tokens away
/// from a cut independent of it). Where no such point exists the whole text is encoded at once,
/// so the result is always the whole text's tokenization wherever the two agree.
pub fn encode_long_text(
    tok: &Tokenizer,
    text: &str,
    sizes: &PieceSizes,
) -> tokenizers::Result<Encoded> {
    match encode_in_pieces(tok, text, sizes)? {
        Some(encoded) => Ok(encoded),
        None => encode_text(tok, text),
    }
}

/// The piecewise encoding of [`encode_long_text`]; None for a short text or where no splice
/// point was found.
fn encode_in_pieces(
    tok: &Tokenizer,
    text: &str,
    sizes: &PieceSizes,
) -> tokenizers::Result<Option<Encoded>> {
    let index = crate::data::spans::CharIndex::new(text);
    let n = index.char_len();
    if n <= 2 * sizes.piece {
        return Ok(None);
    }
    let encode_at = |start: usize, end: usize| -> tokenizers::Result<Encoded> {
        let (ids, offs) = encode_text(tok, index.slice(start, end))?;
        Ok((
            ids,
            offs.into_iter()
                .map(|(s, e)| (s + start, e + start))
                .collect(),
        ))
    };
    let (mut ids, mut offs) = (Vec::new(), Vec::new());
    let mut start = 0;
    let (mut cur_ids, mut cur_offs) = encode_at(0, sizes.piece)?;
    let mut cur_end = sizes.piece;
    while cur_end < n {
        // The next piece starts at a token of this one, inside the overlap.
        let lo = cur_end - sizes.overlap;
        let Some(k0) = cur_offs.iter().position(|&(s, _)| s >= lo) else {
            return Ok(None);
        };
        let next_start = cur_offs[k0].0;
        let next_end = (next_start + sizes.piece).min(n);
        let (nxt_ids, nxt_offs) = encode_at(next_start, next_end)?;
        // Splice at the first token both encodings start at, past the margin, that is followed
        // by `agree` equal tokens ending before this piece's untrusted end.
        let trusted_end = cur_end - sizes.margin;
        let splice = (0..nxt_offs.len()).find_map(|j| {
            let p = nxt_offs[j].0;
            if p < next_start + sizes.margin || p >= trusted_end {
                return None;
            }
            let i = cur_offs.binary_search_by_key(&p, |&(s, _)| s).ok()?;
            let same = (0..sizes.agree).all(|d| {
                matches!((cur_offs.get(i + d), nxt_offs.get(j + d)), (Some(a), Some(b)) if a == b && a.1 <= trusted_end)
                    && cur_ids[i + d] == nxt_ids[j + d]
            });
            same.then_some((i, j))
        });
        let Some((i, j)) = splice else {
            return Ok(None);
        };
        ids.extend_from_slice(&cur_ids[start..i]);
        offs.extend_from_slice(&cur_offs[start..i]);
        (cur_ids, cur_offs, cur_end, start) = (nxt_ids, nxt_offs, next_end, j);
    }
    ids.extend_from_slice(&cur_ids[start..]);
    offs.extend_from_slice(&cur_offs[start..]);
    Ok(Some((ids, offs)))
}

/// Encode all documents (`doc_index` = position in `docs`).
pub fn encode_documents(tok: &Tokenizer, docs: &[Document]) -> Result<Vec<EncodedDoc>> {
    let tok = plain_tokenizer(tok)?;
    docs.iter()
        .enumerate()
        .map(|(i, d)| encode_document(&tok, d, i))
        .collect()
}

/// Per token, the index of the span it overlaps most (ties: lowest index), if any.
fn mark_tokens(offsets: &[(usize, usize)], doc: &Document, n_chars: usize) -> Vec<Option<usize>> {
    // Which span covers each char (first span in list order when spans overlap); 4 bytes a
    // char, NO_SPAN where none does.
    let mut char_span: Vec<u32> = vec![NO_SPAN; n_chars];
    for (k, sp) in doc.spans.iter().enumerate() {
        let end = sp.end.min(n_chars);
        for slot in char_span.iter_mut().take(end).skip(sp.start) {
            if *slot == NO_SPAN {
                *slot = k as u32;
            }
        }
    }
    let mut covered_until = 0usize; // max end of the non-empty tokens so far
    let mut out = Vec::with_capacity(offsets.len());
    for &(s, e) in offsets {
        if s >= e {
            if covered_until < s {
                // Zero-width token after uncovered chars (e.g. whitespace trimmed off its
                // offsets): it encodes those chars.
                let gap = covered_until..s;
                covered_until = s;
                out.push(best_span(&char_span, gap.start, gap.end.min(n_chars)));
            } else {
                // e.g. byte-fallback pieces of one char: sensitive if inside a span.
                out.push(
                    char_span
                        .get(s)
                        .filter(|&&k| k != NO_SPAN)
                        .map(|&k| k as usize),
                );
            }
            continue;
        }
        // Uncovered chars before this token belong to it.
        let eff_s = if covered_until < s { covered_until } else { s };
        covered_until = covered_until.max(e);
        out.push(best_span(&char_span, eff_s, e.min(n_chars)));
    }
    out
}

/// The span covering most chars of [s, e) (ties: lowest index), if any.
/// Marks a char that no span covers in `mark_tokens`.
const NO_SPAN: u32 = u32::MAX;

fn best_span(char_span: &[u32], s: usize, e: usize) -> Option<usize> {
    let mut counts: Vec<(usize, usize)> = Vec::new(); // (span, chars)
    for &c in char_span.iter().take(e).skip(s).filter(|&&k| k != NO_SPAN) {
        let c = c as usize;
        match counts.iter_mut().find(|(k, _)| *k == c) {
            Some(entry) => entry.1 += 1,
            None => counts.push((c, 1)),
        }
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(k, _)| k)
}

/// Which BOS token to put at the start of each document.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BosPolicy {
    /// What the tokenizer does: its own BOS if its post-processor prepends one when
    /// `add_special_tokens` is true, else none (as transformers fine-tuning scripts frame text).
    #[default]
    Auto,
    /// The tokenizer's BOS, else the config's `bos_token_id`, else a BOS-like token found in the
    /// vocabulary (`<|begin_of_text|>`, `<s>`, `<bos>`, `<|startoftext|>`, `<|endoftext|>`).
    Always,
    /// Never put a BOS.
    Never,
}

impl BosPolicy {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            BosPolicy::Auto => "auto",
            BosPolicy::Always => "always",
            BosPolicy::Never => "never",
        }
    }
}

/// Token names tried by [`BosPolicy::Always`] when neither the tokenizer nor the config gives a BOS.
pub const BOS_CANDIDATES: &[&str] = &[
    "<|begin_of_text|>",
    "<s>",
    "<bos>",
    "<|startoftext|>",
    "<|endoftext|>",
];

/// The BOS token the tokenizer's post-processor prepends when `add_special_tokens` is true, if any
/// (found by encoding a probe text with and without special tokens).
pub fn tokenizer_bos(tok: &Tokenizer) -> Option<u32> {
    let tok = plain_tokenizer(tok).ok()?;
    let probe = "a";
    let with = tok.encode_char_offsets(probe, true).ok()?;
    let without = tok.encode_char_offsets(probe, false).ok()?;
    if with.get_ids().len() <= without.get_ids().len() {
        return None;
    }
    match with.get_special_tokens_mask().first() {
        Some(1) => with.get_ids().first().copied(),
        _ => None,
    }
}

/// Resolve the BOS token id according to the policy.
pub fn resolve_bos(tok: &Tokenizer, config_bos: Option<u32>, policy: BosPolicy) -> Option<u32> {
    match policy {
        BosPolicy::Never => None,
        BosPolicy::Auto => tokenizer_bos(tok),
        BosPolicy::Always => tokenizer_bos(tok)
            .or(config_bos)
            .or_else(|| BOS_CANDIDATES.iter().find_map(|t| tok.token_to_id(t))),
    }
}

/// How a document becomes a token sequence: `[bos?] + separator + text + separator`, the
/// framing the model was fine-tuned with. Training windows are cut from that sequence; an eval
/// prompt that starts at a document's start begins with [`Framing::prefix`], one that starts
/// mid-document with nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Framing {
    pub bos: Option<u32>,
    /// `--doc-separator` as given (None: no separator).
    pub separator_text: Option<String>,
    /// Its token ids (empty without a separator).
    pub separator: Vec<u32>,
}

impl Framing {
    /// Only a BOS (or nothing), no separator.
    pub fn bos_only(bos: Option<u32>) -> Framing {
        Framing {
            bos,
            ..Framing::default()
        }
    }

    /// Tokens before a document's first text token.
    pub fn prefix(&self) -> Vec<u32> {
        self.bos.iter().chain(&self.separator).copied().collect()
    }

    /// Tokens after a document's last text token.
    pub fn suffix(&self) -> &[u32] {
        &self.separator
    }
}

/// Resolves the BOS policy and the document separator (encoded without special tokens added,
/// so a special token like `<|im_end|>` is its one id). An empty or untokenizable separator is
/// an error.
pub fn resolve_framing(
    tok: &Tokenizer,
    config_bos: Option<u32>,
    policy: BosPolicy,
    separator: Option<&str>,
) -> Result<Framing> {
    let bos = resolve_bos(tok, config_bos, policy);
    let Some(text) = separator else {
        return Ok(Framing::bos_only(bos));
    };
    let plain = plain_tokenizer(tok)?;
    let ids = plain
        .encode(text, false)
        .map_err(|e| anyhow!("--doc-separator {text:?}: cannot tokenize it: {e}"))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        bail!("--doc-separator {text:?} has no tokens; give the text the model was fine-tuned with between documents, e.g. '<|im_end|>'");
    }
    Ok(Framing {
        bos,
        separator_text: Some(text.to_string()),
        separator: ids,
    })
}

/// A training window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub doc_index: usize,
    /// Position of the window's first token in the document's framed sequence.
    pub start: usize,
    pub ids: Vec<u32>,
    /// Per position: does the token overlap a sensitive span (framing tokens never do).
    pub sensitive: Vec<bool>,
    /// Per position: index into the label list of the span's label (`None` when not sensitive,
    /// or when the label is not in the list).
    pub label: Vec<Option<u16>>,
}

/// Cut each document's sequence `prefix + ids + suffix` ([`Framing`]) into windows of at most
/// `max_seq_len` tokens.
///
/// With `stride = Some(s)` and `0 < s < max_seq_len`, consecutive windows start `s` tokens apart
/// (overlapping); the last window ends at the end of the document. Otherwise windows don't
/// overlap. A document shorter than `max_seq_len` gives one window; a document with no tokens
/// gives none. `max_seq_len` 0 is treated as 1. `encoded[i].doc_index` indexes `docs`.
pub fn make_windows(
    docs: &[Document],
    encoded: &[EncodedDoc],
    labels: &[String],
    framing: &Framing,
    max_seq_len: usize,
    stride: Option<usize>,
) -> Vec<Window> {
    let max_len = max_seq_len.max(1);
    let step = match stride {
        Some(s) if s > 0 && s < max_len => s,
        _ => max_len,
    };
    let label_index: HashMap<&str, u16> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i as u16))
        .collect();
    let mut windows = Vec::new();
    for enc in encoded {
        if enc.ids.is_empty() {
            continue;
        }
        let doc = &docs[enc.doc_index];
        let prefix = framing.prefix();
        let n = prefix.len() + enc.ids.len() + framing.suffix().len();
        let mut ids = Vec::with_capacity(n);
        let mut sensitive = Vec::with_capacity(n);
        let mut label = Vec::with_capacity(n);
        for &f in &prefix {
            ids.push(f);
            sensitive.push(false);
            label.push(None);
        }
        for (&id, span) in enc.ids.iter().zip(&enc.span_of_token) {
            ids.push(id);
            sensitive.push(span.is_some());
            label.push(span.and_then(|k| {
                doc.spans
                    .get(k)
                    .and_then(|sp| label_index.get(sp.label.as_str()).copied())
            }));
        }
        for &f in framing.suffix() {
            ids.push(f);
            sensitive.push(false);
            label.push(None);
        }
        let n = ids.len();
        let mut start = 0;
        loop {
            let end = (start + max_len).min(n);
            windows.push(Window {
                doc_index: enc.doc_index,
                start,
                ids: ids[start..end].to_vec(),
                sensitive: sensitive[start..end].to_vec(),
                label: label[start..end].to_vec(),
            });
            if end >= n {
                break;
            }
            start += step;
        }
    }
    windows
}

/// Which sequences each row of a batch holds, back to back, and the rows' common width (the
/// longest row; the others are right-padded to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLayout {
    /// Per row, the indices of its sequences, in order.
    pub rows: Vec<Vec<usize>>,
    /// Per row, the lengths of those sequences.
    pub segments: Vec<Vec<usize>>,
    pub width: usize,
}

impl RowLayout {
    fn new(rows: Vec<Vec<usize>>, lens: &[usize]) -> Self {
        let segments: Vec<Vec<usize>> = rows
            .iter()
            .map(|r| r.iter().map(|&i| lens[i]).collect())
            .collect();
        let width = segments
            .iter()
            .map(|s| s.iter().sum::<usize>())
            .max()
            .unwrap_or(0);
        RowLayout {
            rows,
            segments,
            width,
        }
    }

    /// One sequence to a row.
    pub fn one_each(lens: &[usize]) -> Self {
        Self::new((0..lens.len()).map(|i| vec![i]).collect(), lens)
    }

    /// Two sequences to a row, the longest with the shortest, the next longest with the next
    /// shortest, and so on, when that leaves less padding than one to a row (it does unless
    /// they are all about as long): rows of similar length whatever sequences were drawn.
    pub fn in_pairs(lens: &[usize]) -> Self {
        let mut by_len: Vec<usize> = (0..lens.len()).collect();
        by_len.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
        let n = by_len.len();
        let pairs = Self::new(
            (0..n.div_ceil(2))
                .map(|k| match n - 1 - k {
                    j if j > k => vec![by_len[k], by_len[j]],
                    _ => vec![by_len[k]],
                })
                .collect(),
            lens,
        );
        let one_each = Self::one_each(lens);
        match pairs.padded_len() < one_each.padded_len() {
            true => pairs,
            false => one_each,
        }
    }

    /// [`RowLayout::in_pairs`] where attention reads only the keys a query can see (the fused
    /// CPU kernel), so a row of two costs what two rows do; one to a row elsewhere, where
    /// attention computes every score of a row.
    pub fn cheapest_on(lens: &[usize], cpu: bool) -> Self {
        match cpu {
            true => Self::in_pairs(lens),
            false => Self::one_each(lens),
        }
    }

    /// Positions the rows take, padding included.
    pub fn padded_len(&self) -> usize {
        self.rows.len() * self.width
    }

    /// The ids of `seqs` laid out in rows, each row right-padded with 0 to the width.
    pub fn ids(&self, seqs: &[&[u32]]) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.padded_len());
        for row in &self.rows {
            let start = ids.len();
            for &i in row {
                ids.extend_from_slice(seqs[i]);
            }
            ids.resize(start + self.width, 0);
        }
        ids
    }
}

/// Name used by [`masked_token_counts`] for sensitive positions whose label is not in the list.
pub const UNLABELLED: &str = "(unlabelled)";

/// Number of sensitive token positions per label (every label of `labels` is present, possibly
/// with 0). A position of a document covered by several overlapping windows is counted once.
pub fn masked_token_counts(windows: &[Window], labels: &[String]) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = labels.iter().map(|l| (l.clone(), 0)).collect();
    let mut seen: BTreeSet<(usize, usize)> = BTreeSet::new();
    for w in windows {
        for (i, (&sens, lab)) in w.sensitive.iter().zip(&w.label).enumerate() {
            if !sens || !seen.insert((w.doc_index, w.start + i)) {
                continue;
            }
            let name = lab
                .and_then(|k| labels.get(k as usize))
                .map(String::as_str)
                .unwrap_or(UNLABELLED);
            *counts.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Train a GPT-2 style byte-level BPE tokenizer on `texts` (no downloads). `special_tokens` get the
/// first ids in order (e.g. `"<|endoftext|>"` = 0) and are recognized in text. The ByteLevel
/// pre-tokenizer uses no prefix space and untrimmed offsets; the full byte alphabet is in the
/// vocabulary, so any text can be encoded. The post-processor adds no special tokens.
pub fn train_byte_level_bpe<I, S>(
    texts: I,
    vocab_size: usize,
    special_tokens: &[&str],
) -> Result<Tokenizer>
where
    I: IntoIterator<Item = S>,
    I::IntoIter: Send,
    S: AsRef<str> + Send,
{
    let mut tok = Tokenizer::new(BPE::default());
    let byte_level = ByteLevel::default()
        .add_prefix_space(false)
        .trim_offsets(false)
        .use_regex(true);
    tok.with_pre_tokenizer(Some(byte_level));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.with_post_processor(Some(byte_level));
    let alphabet = ByteLevel::alphabet().into_iter().collect();
    let specials: Vec<AddedToken> = special_tokens
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(0)
            .initial_alphabet(alphabet)
            .special_tokens(specials)
            .build(),
    );
    tok.train(&mut trainer, texts.into_iter())
        .map_err(|e| anyhow!("BPE training failed: {e}"))?;
    Ok(tok)
}

/// Test helper: [`train_byte_level_bpe`] with the special token `"<|endoftext|>"` (id 0); panics on
/// failure.
pub fn train_test_tokenizer(texts: &[&str], vocab: usize) -> Tokenizer {
    train_byte_level_bpe(texts.iter().copied(), vocab, &["<|endoftext|>"])
        .context("training the test tokenizer")
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::spans::{merge_spans, Span};

    #[test]
    fn pairs_are_the_longest_with_the_shortest_unless_that_saves_no_padding() {
        let rows = |lens: &[usize]| RowLayout::in_pairs(lens).rows;
        assert_eq!(
            rows(&[5, 30, 10, 20, 25]),
            vec![vec![1, 0], vec![4, 2], vec![3]]
        );
        assert_eq!(rows(&[8, 9, 2, 3]), vec![vec![1, 2], vec![0, 3]]);
        // Equal lengths: pairs would pad nothing less, so one to a row.
        assert_eq!(rows(&[6, 6, 6]), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(rows(&[4]), vec![vec![0]]);
        assert!(rows(&[]).is_empty());
        let layout = RowLayout::in_pairs(&[2, 3, 1]);
        assert_eq!(layout.segments, vec![vec![3, 1], vec![2]]);
        assert_eq!(layout.width, 4);
        let seqs: [&[u32]; 3] = [&[7, 8], &[1, 2, 3], &[9]];
        assert_eq!(layout.ids(&seqs), vec![1, 2, 3, 9, 7, 8, 0, 0]);
        assert_eq!(RowLayout::cheapest_on(&[2, 3, 1], false).rows.len(), 3);
    }

    #[test]
    fn long_texts_encode_in_pieces_exactly_like_whole() {
        let notes = crate::data::synth::generate_notes(&crate::data::synth::SynthConfig {
            n_notes: 40,
            seed: 1,
            id_prefix: "p".into(),
        });
        let mut text: String = notes.iter().map(|d| d.text.clone() + "\n\n").collect();
        text += "  double  spaces,\ttabs\r\n unicode: café 日本語 🙂  and \n\n\n trailing   ";
        let text = text.repeat(3);
        let sizes = PieceSizes {
            piece: 3000,
            overlap: 800,
            margin: 100,
            agree: 8,
        };
        assert!(text.chars().count() > 5 * sizes.piece);
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for name in [
            "gpt2_f32",
            "gpt2_legacy",
            "llama_gqa",
            "llama3_sharded",
            "mistral_f32",
            "qwen2_bf16",
        ] {
            let tok = crate::io::load_tokenizer(&root.join(name)).unwrap();
            let whole = encode_text(&tok, &text).unwrap();
            let pieces = encode_in_pieces(&tok, &text, &sizes)
                .unwrap()
                .unwrap_or_else(|| panic!("{name}: no splice point found"));
            assert_eq!(pieces.0.len(), whole.0.len(), "{name}");
            assert!(pieces == whole, "{name}: pieces differ from the whole text");
        }
    }

    const TRAIN: &[&str] = &[
        "Patient John Smith visited the clinic on Monday.",
        "Zoë Müller called about her appointment.",
        "The patient 😀 Ana was happy with the result.",
        "Ana Lima lives in São Paulo and works at ACME Corp.",
        "Please contact the clinic at 555-0199 for more details.",
        "The account number is ABC123XYZ and must stay private.",
        "Dr. Müller reviewed the chart twice before the meeting.",
        "Our records show that the visit was on the 3rd of May.",
        "Multiple   spaces\n\nand newlines\tand tabs appear here.",
        "The weather was nice and the patient went for a walk.",
        "He said: «bonjour» and smiled; she answered in Português.",
        "Numbers like 42, 1999 and 3.14 show up in notes.",
        "The meeting with Smith was moved to Tuesday afternoon.",
        "Names such as Zoë, Chloë and Noël contain diaereses.",
        "Emoji are rare in notes 🎉 but they do appear 👍 sometimes.",
        "The quick brown fox jumps over the lazy dog.",
        "Sensitive data must never be regurgitated by the model.",
        "A fine-tuned model can memorize rare strings verbatim.",
        "She wrote the report, then filed it with the others.",
        "Chinese text 北京 and Japanese 東京 also exist.",
        "The patient John visited again on Friday morning.",
        "Contact Ana at ana@example.com or by phone.",
        "Some words are longer: internationalization, anonymization.",
        "The end of the story was surprising to everyone.",
    ];

    fn tokenizer() -> Tokenizer {
        train_test_tokenizer(TRAIN, 400)
    }

    /// GPT-2 byte-to-unicode table, inverted: unicode char -> byte.
    fn unicode_to_byte() -> HashMap<char, u8> {
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut cs: Vec<u32> = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        bs.into_iter()
            .zip(cs)
            .map(|(b, c)| (char::from_u32(c).unwrap(), b as u8))
            .collect()
    }

    /// Ground truth: each token's char range in `text`, from the bytes the token decodes to.
    fn decoded_char_ranges(tok: &Tokenizer, ids: &[u32], text: &str) -> Vec<(usize, usize)> {
        let table = unicode_to_byte();
        // byte index -> index of the char containing it
        let mut char_of_byte = Vec::with_capacity(text.len());
        for (ci, c) in text.chars().enumerate() {
            for _ in 0..c.len_utf8() {
                char_of_byte.push(ci);
            }
        }
        let mut pos = 0usize;
        let mut all = Vec::new();
        let mut out = Vec::new();
        for &id in ids {
            let piece = tok.id_to_token(id).unwrap();
            let bytes: Vec<u8> = piece.chars().map(|c| table[&c]).collect();
            assert!(!bytes.is_empty());
            let (b0, b1) = (pos, pos + bytes.len());
            out.push((char_of_byte[b0], char_of_byte[b1 - 1] + 1));
            all.extend(bytes);
            pos = b1;
        }
        assert_eq!(all, text.as_bytes(), "tokens must decode to the text");
        out
    }

    fn doc(text: &str, spans: &[(usize, usize, &str)]) -> Document {
        Document {
            id: "d".into(),
            text: text.into(),
            spans: merge_spans(
                spans
                    .iter()
                    .map(|&(start, end, label)| Span {
                        start,
                        end,
                        label: label.into(),
                    })
                    .collect(),
            ),
        }
    }

    /// Span given by its text (first occurrence), in chars.
    fn span_of(text: &str, needle: &str) -> (usize, usize) {
        let b = text.find(needle).unwrap();
        let s = text[..b].chars().count();
        (s, s + needle.chars().count())
    }

    fn check_alignment(tok: &Tokenizer, d: &Document) -> EncodedDoc {
        let enc = encode_document(tok, d, 3).unwrap();
        assert_eq!(enc.doc_index, 3);
        assert_eq!(enc.ids.len(), enc.char_offsets.len());
        assert_eq!(enc.ids.len(), enc.span_of_token.len());
        let ranges = decoded_char_ranges(tok, &enc.ids, &d.text);
        for (i, &(s, e)) in ranges.iter().enumerate() {
            let expected = d.spans.iter().position(|sp| s < sp.end && sp.start < e);
            assert_eq!(
                enc.span_of_token[i].is_some(),
                expected.is_some(),
                "token {i} {:?} chars [{s},{e}) in {:?} spans {:?}",
                tok.id_to_token(enc.ids[i]),
                d.text,
                d.spans
            );
            if let Some(k) = enc.span_of_token[i] {
                let sp = &d.spans[k];
                assert!(s < sp.end && sp.start < e);
            }
        }
        for sp in &d.spans {
            for c in sp.start..sp.end {
                assert!(
                    ranges
                        .iter()
                        .zip(&enc.span_of_token)
                        .any(|(&(s, e), m)| m.is_some() && s <= c && c < e),
                    "char {c} of span {sp:?} not covered in {:?}",
                    d.text
                );
            }
        }
        enc
    }

    fn tricky_docs() -> Vec<Document> {
        let mut v = Vec::new();
        let t = "Call Zoë Müller today.";
        let (s, e) = span_of(t, "Zoë Müller");
        v.push(doc(t, &[(s, e, "NAME")]));
        let t = "the patient 😀 Ana arrived";
        let (s, e) = span_of(t, "Ana");
        v.push(doc(t, &[(s, e, "NAME")]));
        let (s, e) = span_of(t, "😀");
        v.push(doc(t, &[(s, e, "EMOJI")]));
        let (s, e) = span_of(t, "😀 Ana");
        v.push(doc(t, &[(s, e, "NAME")]));
        let t = "code ABC123XYZ end";
        let (s, e) = span_of(t, "123");
        v.push(doc(t, &[(s, e, "ID")]));
        let t = "Ana   Lima\n\n\tlives   in  São  Paulo \n";
        let (s1, e1) = span_of(t, "Ana");
        let (s2, e2) = span_of(t, "São  Paulo");
        v.push(doc(t, &[(s1, e1, "NAME"), (s2, e2, "CITY")]));
        let (s, e) = span_of(t, "Lima\n\n\tlives");
        v.push(doc(t, &[(s, e, "X")]));
        let t = "John Smith";
        v.push(doc(t, &[(0, 10, "NAME")]));
        v.push(doc(t, &[(0, 1, "A"), (9, 10, "B")]));
        let t = "北京 and 東京 🎉👍";
        let (s, e) = span_of(t, "京 and 東");
        v.push(doc(t, &[(s, e, "CITY")]));
        let n = t.chars().count();
        v.push(doc(t, &[(n - 1, n, "E")]));
        v.push(doc("", &[]));
        v.push(doc("nothing sensitive here", &[]));
        v
    }

    #[test]
    fn alignment_on_tricky_text() {
        let tok = tokenizer();
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
        for d in tricky_docs() {
            let enc = check_alignment(&tok, &d);
            if d.spans.is_empty() {
                assert!(enc.span_of_token.iter().all(Option::is_none));
            } else {
                assert!(enc.span_of_token.iter().any(Option::is_some));
            }
        }
    }

    #[test]
    fn alignment_inside_word_is_partial_token() {
        let tok = tokenizer();
        let t = "code ABC123XYZ end";
        let (s, e) = span_of(t, "123");
        let enc = check_alignment(&tok, &doc(t, &[(s, e, "ID")]));
        // "code" and "end" are never sensitive
        assert!(enc.span_of_token[0].is_none());
        assert!(enc.span_of_token.last().unwrap().is_none());
    }

    #[test]
    fn alignment_with_trimmed_offsets() {
        // Same tokenizer, but offsets trimmed of the leading space (like many GPT-2 tokenizer.json):
        // the space is attributed to the token that encodes it.
        let mut tok = tokenizer();
        tok.with_post_processor(Some(ByteLevel::default().trim_offsets(true)));
        let t = "the patient 😀 Ana arrived";
        let enc = encode_document(&tok, &doc(t, &[]), 0).unwrap();
        let has_gap = enc.char_offsets.windows(2).any(|p| p[0].1 < p[1].0);
        assert!(has_gap, "offsets should be trimmed: {:?}", enc.char_offsets);
        for d in tricky_docs() {
            check_alignment(&tok, &d);
        }
    }

    #[test]
    fn zero_width_tokens_inside_span() {
        let d = doc("ab😀cd", &[(2, 3, "E")]);
        // e.g. byte-fallback pieces of one char reported with empty offsets
        let offsets = vec![(0, 2), (2, 2), (2, 2), (2, 3), (3, 5), (5, 5)];
        let marks = mark_tokens(&offsets, &d, 5);
        assert_eq!(
            marks,
            vec![None, Some(0), Some(0), Some(0), None, None],
            "{marks:?}"
        );
    }

    #[test]
    fn span_index_is_most_overlapped() {
        let d = doc("abcdefgh", &[(0, 1, "A"), (2, 5, "B"), (7, 8, "C")]);
        let marks = mark_tokens(&[(0, 4), (4, 8)], &d, 8);
        assert_eq!(marks, vec![Some(1), Some(1)]);
    }

    #[test]
    fn truncation_and_padding_are_ignored() {
        use tokenizers::{PaddingParams, TruncationParams};
        let mut tok = tokenizer();
        let t = "Patient John Smith visited the clinic on Monday and Tuesday.";
        let full = encode_document(&tok, &doc(t, &[]), 0).unwrap();
        tok.with_truncation(Some(TruncationParams {
            max_length: 3,
            ..Default::default()
        }))
        .unwrap();
        tok.with_padding(Some(PaddingParams::default()));
        let d = doc(t, &[]);
        assert_eq!(encode_document(&tok, &d, 0).unwrap(), full);
        assert_eq!(encode_documents(&tok, &[d]).unwrap()[0], full);
    }

    #[test]
    fn bos_resolution() {
        let tok = tokenizer();
        assert_eq!(tokenizer_bos(&tok), None);
        assert_eq!(resolve_bos(&tok, None, BosPolicy::Auto), None);
        assert_eq!(resolve_bos(&tok, Some(5), BosPolicy::Auto), None); // the tokenizer adds none
        assert_eq!(resolve_bos(&tok, Some(5), BosPolicy::Never), None);
        assert_eq!(resolve_bos(&tok, Some(5), BosPolicy::Always), Some(5));
        assert_eq!(resolve_bos(&tok, None, BosPolicy::Always), Some(0)); // <|endoftext|>

        let mut tok = train_byte_level_bpe(TRAIN.iter(), 400, &["<|endoftext|>", "<s>"]).unwrap();
        let s_id = tok.token_to_id("<s>").unwrap();
        assert_eq!(s_id, 1);
        let template = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single("<s> $A")
            .unwrap()
            .special_tokens(vec![("<s>", s_id)])
            .build()
            .unwrap();
        tok.with_post_processor(Some(template));
        assert_eq!(tokenizer_bos(&tok), Some(s_id));
        assert_eq!(resolve_bos(&tok, Some(0), BosPolicy::Auto), Some(s_id));
        assert_eq!(resolve_bos(&tok, Some(0), BosPolicy::Never), None);
        // encode_document never adds it
        let enc = encode_document(&tok, &doc("Ana Lima", &[]), 0).unwrap();
        assert!(!enc.ids.contains(&s_id));
    }

    fn synthetic(n: usize, sensitive: &[usize], doc_index: usize) -> EncodedDoc {
        EncodedDoc {
            doc_index,
            ids: (0..n as u32).map(|i| 100 + i).collect(),
            char_offsets: (0..n).map(|i| (i, i + 1)).collect(),
            span_of_token: (0..n)
                .map(|i| sensitive.contains(&i).then_some(if i < 5 { 0 } else { 1 }))
                .collect(),
        }
    }

    fn labels() -> Vec<String> {
        vec!["ID".into(), "NAME".into(), "ZIP".into()]
    }

    fn two_span_doc() -> Document {
        doc("0123456789", &[(1, 3, "NAME"), (6, 7, "ID")])
    }

    #[test]
    fn windows_without_stride() {
        let docs = vec![two_span_doc()];
        let enc = vec![synthetic(10, &[1, 2, 6], 0)];
        let w = make_windows(&docs, &enc, &labels(), &Framing::bos_only(Some(7)), 4, None);
        let ids: Vec<Vec<u32>> = w.iter().map(|w| w.ids.clone()).collect();
        assert_eq!(
            ids,
            vec![
                vec![7, 100, 101, 102],
                vec![103, 104, 105, 106],
                vec![107, 108, 109]
            ]
        );
        assert_eq!(w.iter().map(|w| w.start).collect::<Vec<_>>(), vec![0, 4, 8]);
        assert_eq!(w[0].sensitive, vec![false, false, true, true]);
        assert_eq!(w[0].label, vec![None, None, Some(1), Some(1)]);
        assert_eq!(w[1].sensitive, vec![false, false, false, true]);
        assert_eq!(w[1].label, vec![None, None, None, Some(0)]);
        assert!(w.iter().all(|w| w.ids.len() == w.sensitive.len()
            && w.ids.len() == w.label.len()
            && w.ids.len() <= 4));
        let counts = masked_token_counts(&w, &labels());
        assert_eq!(counts["NAME"], 2);
        assert_eq!(counts["ID"], 1);
        assert_eq!(counts["ZIP"], 0);
        // stride >= max_seq_len behaves like no stride
        let bos7 = Framing::bos_only(Some(7));
        for stride in [Some(4), Some(0)] {
            assert_eq!(make_windows(&docs, &enc, &labels(), &bos7, 4, stride), w);
        }
    }

    #[test]
    fn windows_with_stride_and_short_docs() {
        let docs = vec![two_span_doc(), doc("ab", &[]), doc("", &[])];
        let enc = vec![
            synthetic(10, &[1, 2, 6], 0),
            synthetic(2, &[], 1),
            synthetic(0, &[], 2),
        ];
        let w = make_windows(
            &docs,
            &enc,
            &labels(),
            &Framing::bos_only(Some(7)),
            4,
            Some(2),
        );
        let starts: Vec<(usize, usize)> = w.iter().map(|w| (w.doc_index, w.start)).collect();
        assert_eq!(starts, vec![(0, 0), (0, 2), (0, 4), (0, 6), (0, 8), (1, 0)]);
        assert_eq!(w[4].ids, vec![107, 108, 109]);
        assert_eq!(w[5].ids, vec![7, 100, 101]);
        assert!(!w[5].sensitive[0]);
        // every position of doc 0 is in some window, in order
        for p in 0..11 {
            assert!(w
                .iter()
                .any(|w| w.doc_index == 0 && w.start <= p && p < w.start + w.ids.len()));
        }
        // overlapping windows: each position counted once
        let counts = masked_token_counts(&w, &labels());
        assert_eq!(counts["NAME"], 2);
        assert_eq!(counts["ID"], 1);
        // no BOS
        let w = make_windows(&docs, &enc, &labels(), &Framing::default(), 20, None);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].ids.len(), 10);
        assert!(w[0].sensitive[1]);
        // label missing from the list
        let only_name = vec!["NAME".to_string()];
        let w = make_windows(&docs, &enc, &only_name, &Framing::default(), 20, None);
        assert_eq!(w[0].label[6], None);
        assert!(w[0].sensitive[6]);
        let counts = masked_token_counts(&w, &only_name);
        assert_eq!(counts["NAME"], 2);
        assert_eq!(counts[UNLABELLED], 1);
    }

    #[test]
    fn separator_frames_each_document_and_is_never_sensitive() {
        let tok =
            train_byte_level_bpe(TRAIN.iter(), 400, &["<|endoftext|>", "<|im_end|>"]).unwrap();
        let sep = tok.token_to_id("<|im_end|>").unwrap();
        let f = resolve_framing(&tok, Some(0), BosPolicy::Auto, Some("<|im_end|>")).unwrap();
        assert_eq!((f.bos, f.separator.clone()), (None, vec![sep]));
        let docs = vec![doc("Ana Lima came", &[(0, 8, "NAME")])];
        let enc = encode_documents(&tok, &docs).unwrap();
        let n = enc[0].ids.len();
        let w = make_windows(&docs, &enc, &["NAME".to_string()], &f, 1000, None);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].ids.len(), n + 2);
        assert_eq!((w[0].ids[0], w[0].ids[n + 1]), (sep, sep));
        assert_eq!(&w[0].ids[1..=n], &enc[0].ids[..]);
        assert!(!w[0].sensitive[0] && w[0].sensitive[1] && !w[0].sensitive[n + 1]);
        // with a BOS: bos, separator, text, separator
        let f = resolve_framing(&tok, Some(0), BosPolicy::Always, Some("<|im_end|>")).unwrap();
        assert_eq!(f.prefix(), vec![0, sep]);
        assert!(resolve_framing(&tok, None, BosPolicy::Auto, Some("")).is_err());
    }

    #[test]
    fn end_to_end_with_real_tokenizer() {
        let tok = tokenizer();
        let docs = tricky_docs();
        let enc = encode_documents(&tok, &docs).unwrap();
        let labels = crate::data::spans::label_names(&docs);
        let bos = resolve_bos(&tok, None, BosPolicy::Always);
        let w = make_windows(&docs, &enc, &labels, &Framing::bos_only(bos), 8, Some(4));
        let total: usize = enc
            .iter()
            .map(|e| e.span_of_token.iter().flatten().count())
            .sum();
        let counts = masked_token_counts(&w, &labels);
        assert_eq!(counts.values().sum::<usize>(), total);
        assert!(w.iter().all(|w| w.ids.len() <= 8));
        for win in &w {
            if win.start == 0 {
                assert_eq!(win.ids[0], 0);
                assert!(!win.sensitive[0]);
            }
        }
    }
}
