//! Utility: token-level perplexity over held-out documents, overall and split into sensitive and
//! non-sensitive tokens.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::data::spans::Document;
use crate::data::tokens;
use crate::model::{AttnContext, Model};

/// Perplexity over one group of tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PplStat {
    pub tokens: usize,
    pub mean_nll: Option<f64>,
    /// exp(mean NLL); None without tokens.
    pub perplexity: Option<f64>,
}

impl PplStat {
    fn from_sum(sum: f64, n: usize) -> Self {
        if n == 0 {
            return PplStat::default();
        }
        let mean = sum / n as f64;
        PplStat {
            tokens: n,
            mean_nll: Some(mean),
            perplexity: Some(mean.exp()),
        }
    }
}

/// Positions per logits slice in [`perplexity`].
const LOGIT_SLICE: usize = 256;

/// Default perplexity window: the model's context, at most this.
pub const DEFAULT_PPL_SEQ_LEN: usize = 1024;

/// Token-level perplexity of held-out documents.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Perplexity {
    pub documents: usize,
    pub windows: usize,
    pub max_seq_len: usize,
    pub bos: Option<u32>,
    /// The `--doc-separator` framing each document (None: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_separator: Option<String>,
    pub all: PplStat,
    pub non_sensitive: PplStat,
    pub sensitive: PplStat,
}

/// The sums of one perplexity window: what a merge of shards needs to give the figures of one
/// run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PplSums {
    pub nll: f64,
    pub tokens: usize,
    pub sensitive_nll: f64,
    pub sensitive_tokens: usize,
}

/// A perplexity measurement before its figures: the setting and each window's sums, in file
/// order. Shards' parts concatenate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PerplexityParts {
    pub documents: usize,
    pub max_seq_len: usize,
    pub bos: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_separator: Option<String>,
    pub windows: Vec<PplSums>,
}

impl PerplexityParts {
    /// The figures (sums over windows in order, so shards merged in order give one run's).
    pub fn figures(&self) -> Perplexity {
        let (mut sum_all, mut n_all, mut sum_s, mut n_s) = (0f64, 0usize, 0f64, 0usize);
        for w in &self.windows {
            sum_all += w.nll;
            n_all += w.tokens;
            sum_s += w.sensitive_nll;
            n_s += w.sensitive_tokens;
        }
        Perplexity {
            documents: self.documents,
            windows: self.windows.len(),
            max_seq_len: self.max_seq_len,
            bos: self.bos,
            doc_separator: self.doc_separator.clone(),
            all: PplStat::from_sum(sum_all, n_all),
            non_sensitive: PplStat::from_sum(sum_all - sum_s, n_all - n_s),
            sensitive: PplStat::from_sum(sum_s, n_s),
        }
    }
}

/// Perplexity of `docs` in non-overlapping windows of `max_seq_len` tokens, each document framed
/// as in training ([`tokens::Framing`]; the first token of a window is context only). `max_seq_len` is capped at the
/// model's context length.
pub fn perplexity(
    model: &Model,
    tok: &Tokenizer,
    docs: &[Document],
    framing: &tokens::Framing,
    max_seq_len: usize,
    batch: usize,
) -> Result<Perplexity> {
    Ok(perplexity_parts(model, tok, docs, framing, max_seq_len, batch)?.figures())
}

/// [`perplexity`] before its figures.
pub fn perplexity_parts(
    model: &Model,
    tok: &Tokenizer,
    docs: &[Document],
    framing: &tokens::Framing,
    max_seq_len: usize,
    batch: usize,
) -> Result<PerplexityParts> {
    let max_len = max_seq_len.min(model.config.max_positions()).max(2);
    let encoded = tokens::encode_documents(tok, docs)?;
    let windows = tokens::make_windows(docs, &encoded, &[], framing, max_len, None);
    let mut sums = vec![PplSums::default(); windows.len()];
    let dev = &model.device;
    for (chunk, chunk_sums) in windows
        .chunks(batch.max(1))
        .zip(sums.chunks_mut(batch.max(1)))
    {
        let seqs: Vec<&[u32]> = chunk.iter().map(|w| w.ids.as_slice()).collect();
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        // One to a row, never packed: a sequence's figures must not depend on which others
        // share its batch, so that shards merge to exactly the unsharded figures.
        let layout = tokens::RowLayout::one_each(&lens);
        let t = layout.width;
        if lens.iter().all(|&n| n < 2) {
            continue;
        }
        let input = Tensor::from_vec(layout.ids(&seqs), (layout.rows.len(), t), dev)?;
        let ctx = AttnContext::for_segments(&layout.segments, t, model.sliding_window(), dev)?;
        let h = model.hidden_before(model.num_layers(), &input, &ctx)?;
        // Logits in slices of positions, so [t, vocab] never exists for a long window.
        for (r, (w, ws)) in chunk.iter().zip(chunk_sums.iter_mut()).enumerate() {
            let n = w.ids.len();
            let mut p0 = 0;
            while p0 + 1 < n {
                let len = LOGIT_SLICE.min(n - 1 - p0);
                let logits = model.logits(&h.narrow(0, r, 1)?.narrow(1, p0, len)?)?;
                let logits = logits.squeeze(0)?.to_dtype(DType::F32)?;
                let tg = Tensor::from_slice(&w.ids[p0 + 1..p0 + 1 + len], len, dev)?;
                let nll = crate::nn::ops::token_nll(&logits, &tg)?.to_vec1::<f32>()?;
                for (j, &x) in nll.iter().enumerate() {
                    let x = x as f64;
                    ws.nll += x;
                    ws.tokens += 1;
                    if w.sensitive[p0 + 1 + j] {
                        ws.sensitive_nll += x;
                        ws.sensitive_tokens += 1;
                    }
                }
                p0 += len;
            }
        }
    }
    if !sums.iter().all(|w| w.nll.is_finite()) {
        bail!(
            "perplexity: the model's token log-likelihoods are not finite (NaN or Inf logits); \
             the model is broken"
        );
    }
    Ok(PerplexityParts {
        documents: docs.len(),
        max_seq_len: max_len,
        bos: framing.bos,
        doc_separator: framing.separator_text.clone(),
        windows: sums,
    })
}
