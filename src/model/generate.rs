//! Batched decoding with a KV cache and left padding: greedy, or sampling with temperature and top-k.
//!
//! Positions follow HF `generate` (count of real tokens before each one), so a left-padded row
//! decodes exactly as it would alone.

use crate::model::{AttnContext, KvCache, Model};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings; `None` in [`GenerateOptions`] means greedy decoding.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: usize,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens to generate per row (rows stop early only on a stop token).
    pub max_new_tokens: Vec<usize>,
    /// Tokens that end a row (not included in the output).
    pub stop_tokens: Vec<u32>,
    /// Id used for left padding (masked out, so any valid id works).
    pub pad_id: u32,
    pub sampling: Option<Sampling>,
}

/// Says, from a row's index and its tokens so far, that the row needs no more tokens.
pub type Decided<'a> = &'a (dyn Fn(usize, &[u32]) -> bool + Sync);

/// Never decided early: rows run to `max_new_tokens` or a stop token.
pub fn never_decided(_: usize, _: &[u32]) -> bool {
    false
}

/// Generates continuations of `prompts` (token ids, each non-empty) in one batch.
/// Returns the new tokens of each row. With sampling, each row draws from its own generator,
/// seeded from `rng`.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    rng: &mut StdRng,
) -> Result<Vec<Vec<u32>>> {
    let mut rngs: Vec<StdRng> = (0..prompts.len())
        .map(|_| StdRng::seed_from_u64(rng.random()))
        .collect();
    generate_until(model, prompts, opts, &mut rngs, &never_decided)
}

/// [`generate`], where a row also stops as soon as `decided` says so after one of its tokens
/// (the caller needs no more of it), and row i samples from `rngs[i]`, so what a row draws does
/// not depend on the rows it is batched with (greedy decoding needs no generators).
pub fn generate_until(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    rngs: &mut [StdRng],
    decided: Decided,
) -> Result<Vec<Vec<u32>>> {
    check_prompts(prompts)?;
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    if opts.sampling.is_some() && rngs.len() != prompts.len() {
        bail!(
            "generate: {} random generators for {} prompts",
            rngs.len(),
            prompts.len()
        );
    }
    let (ids, valid, max_len) = left_pad(prompts, opts.pad_id);
    let mut state = Decoder::new(model, valid, opts);
    let first = Tensor::from_vec(ids, (prompts.len(), max_len), &model.device)?;
    state.run(model, first, opts, rngs, decided)?;
    Ok(state.out)
}

/// The result of [`generate_greedy_with_drafts`].
#[derive(Debug, Default)]
pub struct DraftedGreedy {
    /// The greedy output of each row, as [`generate`] gives it.
    pub tokens: Vec<Vec<u32>>,
    /// For each draft token: is it the argmax after the prompt and the draft tokens before it?
    pub teacher_forced: Vec<Vec<bool>>,
}

/// Greedy decoding that checks a guess of each row's continuation (`drafts`, e.g. the true
/// secret) in the prompt's forward pass, like speculative decoding with the guess as the draft.
/// The output is the same as [`generate`]'s greedy output; where a row's greedy tokens follow
/// its draft, no decoding step is spent on them. Also returns, for every draft token, whether it
/// is the argmax given the prompt and the draft tokens before it (teacher forcing).
pub fn generate_greedy_with_drafts(
    model: &Model,
    prompts: &[Vec<u32>],
    drafts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<DraftedGreedy> {
    generate_greedy_with_drafts_until(model, prompts, drafts, opts, &never_decided)
}

/// [`generate_greedy_with_drafts`], where a row stops as soon as `decided` says so (see
/// [`generate_until`]); rows decided by the prompt's pass cost no decoding step at all.
pub fn generate_greedy_with_drafts_until(
    model: &Model,
    prompts: &[Vec<u32>],
    drafts: &[Vec<u32>],
    opts: &GenerateOptions,
    decided: Decided,
) -> Result<DraftedGreedy> {
    check_prompts(prompts)?;
    if prompts.len() != drafts.len() || opts.sampling.is_some() {
        bail!("generate_greedy_with_drafts: one draft per prompt, greedy decoding only");
    }
    if prompts.is_empty() {
        return Ok(DraftedGreedy::default());
    }
    let b = prompts.len();
    let full: Vec<Vec<u32>> = prompts
        .iter()
        .zip(drafts)
        .map(|(p, d)| p.iter().chain(d).copied().collect())
        .collect();
    let (ids, valid, max_len) = left_pad(&full, opts.pad_id);
    let dev = &model.device;
    let mut state = Decoder::new(model, valid, opts);
    // Predictions for the positions from the last prompt token of each row to the end.
    let from = drafts
        .iter()
        .map(|d| max_len - d.len() - 1)
        .min()
        .unwrap_or(0);
    let input = Tensor::from_vec(ids, (b, max_len), dev)?;
    let ctx = AttnContext::new(&state.valid, max_len, 0, state.window, true, dev)?;
    let x = model.embed(&input, &ctx)?;
    let h = model.run_blocks(0, &x, &ctx, Some(&mut state.cache), None)?;
    let logits = model.logits(&h.narrow(1, from, max_len - from)?)?;
    ensure_finite(&logits)?;
    let preds = logits
        .argmax(D::Minus1)?
        .to_dtype(DType::U32)?
        .to_vec2::<u32>()?;
    // preds_after[row][k]: the argmax after the prompt and draft[..k], for k in 0..=draft.len().
    let preds_after: Vec<&[u32]> = preds
        .iter()
        .zip(drafts)
        .map(|(p, d)| &p[max_len - d.len() - 1 - from..])
        .collect();
    let teacher: Vec<Vec<bool>> = drafts
        .iter()
        .zip(&preds_after)
        .map(|(d, p)| d.iter().zip(*p).map(|(d, p)| d == p).collect())
        .collect();
    // Dropping rejected draft tokens leaves holes in the cache; a sliding window counts cache
    // slots, not tokens, so windowed models that could reach the window decode the plain way.
    let longest = max_len + opts.max_new_tokens.iter().copied().max().unwrap_or(0);
    if state.window.is_some_and(|w| w < longest) {
        let greedy = generate_until(model, prompts, opts, &mut [], decided)?;
        return Ok(DraftedGreedy {
            tokens: greedy,
            teacher_forced: teacher,
        });
    }
    let mut next = vec![opts.pad_id; b];
    for (row, draft) in drafts.iter().enumerate() {
        let pred = preds_after[row];
        let mut k = 0;
        while !state.done[row] {
            let tok = pred[k];
            state.push(row, tok, opts, decided);
            if state.done[row] || k == draft.len() || tok != draft[k] {
                next[row] = tok;
                break;
            }
            k += 1;
        }
        // The context keeps the prompt and the draft tokens the output agrees with.
        let keep = max_len - draft.len() + k;
        for v in &mut state.valid[row][keep..] {
            *v = false;
        }
    }
    state.feed_finished_as_padding();
    let input = Tensor::from_vec(next, (b, 1), dev)?;
    state.run(model, input, opts, &mut [], decided)?;
    Ok(DraftedGreedy {
        tokens: state.out,
        teacher_forced: teacher,
    })
}

/// Refuses to decode from NaN or Inf logits: argmax over them picks an arbitrary token, and a
/// broken model would look like one that reproduces nothing.
pub fn ensure_finite(logits: &Tensor) -> Result<()> {
    if !crate::nn::ops::all_finite(logits)? {
        bail!(
            "the model's logits are not finite (NaN or Inf), so its outputs mean nothing and no \
             rate is reported (weights too large, e.g. from a diverged training run?)"
        );
    }
    Ok(())
}

fn check_prompts(prompts: &[Vec<u32>]) -> Result<()> {
    if prompts.iter().any(Vec::is_empty) {
        bail!("generate: every prompt needs at least one token");
    }
    Ok(())
}

/// Left-padded ids [b * max_len], the per-row validity flags and max_len.
fn left_pad(rows: &[Vec<u32>], pad_id: u32) -> (Vec<u32>, Vec<Vec<bool>>, usize) {
    let max_len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut valid = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len() * max_len);
    for p in rows {
        let pad = max_len - p.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(p);
        let mut v = vec![false; pad];
        v.extend(std::iter::repeat_n(true, p.len()));
        valid.push(v);
    }
    (ids, valid, max_len)
}

/// The state of a batched decode: cache, key validity, outputs. Finished rows leave the batch.
struct Decoder {
    cache: KvCache,
    /// The original row of each row still in the batch.
    active: Vec<usize>,
    /// Key validity of each row still in the batch.
    valid: Vec<Vec<bool>>,
    window: Option<usize>,
    out: Vec<Vec<u32>>,
    done: Vec<bool>,
}

impl Decoder {
    fn new(model: &Model, valid: Vec<Vec<bool>>, opts: &GenerateOptions) -> Self {
        Decoder {
            cache: KvCache::new(model.num_layers()),
            active: (0..valid.len()).collect(),
            window: model.sliding_window(),
            out: vec![Vec::new(); valid.len()],
            done: opts.max_new_tokens.iter().map(|&n| n == 0).collect(),
            valid,
        }
    }

    /// Appends a generated token to `row` unless it is a stop token; marks the row done.
    fn push(&mut self, row: usize, tok: u32, opts: &GenerateOptions, decided: Decided) {
        if opts.stop_tokens.contains(&tok) {
            self.done[row] = true;
            return;
        }
        self.out[row].push(tok);
        if self.out[row].len() >= opts.max_new_tokens[row] || decided(row, &self.out[row]) {
            self.done[row] = true;
        }
    }

    /// Records the validity of the token each row is fed next: padding for a row that just
    /// finished (it leaves the batch before the next step, or, in the draft check, its token
    /// is fed once and never read).
    fn feed_finished_as_padding(&mut self) {
        for (v, &row) in self.valid.iter_mut().zip(&self.active) {
            v.push(!self.done[row]);
        }
    }

    /// Feeds `input` [b, q_len] (its flags already in `valid`) and decodes until every row is done.
    fn run(
        &mut self,
        model: &Model,
        mut input: Tensor,
        opts: &GenerateOptions,
        rngs: &mut [StdRng],
        decided: Decided,
    ) -> Result<()> {
        let dev = &model.device;
        loop {
            if self.active.iter().any(|&row| self.done[row]) {
                let keep: Vec<u32> = (0..self.active.len() as u32)
                    .filter(|&i| !self.done[self.active[i as usize]])
                    .collect();
                if keep.is_empty() {
                    break;
                }
                let idx = Tensor::new(keep.as_slice(), dev)?;
                self.cache.select_rows(&idx)?;
                input = input.index_select(&idx, 0)?;
                let keep: Vec<usize> = keep.iter().map(|&i| i as usize).collect();
                self.active = keep.iter().map(|&i| self.active[i]).collect();
                self.valid = keep
                    .iter()
                    .map(|&i| std::mem::take(&mut self.valid[i]))
                    .collect();
            }
            let q_len = input.dim(1)?;
            let past = self.cache.len();
            let ctx = AttnContext::new(&self.valid, q_len, past, self.window, true, dev)?;
            let x = model.embed(&input, &ctx)?;
            let h = model.run_blocks(0, &x, &ctx, Some(&mut self.cache), None)?;
            let last = h.narrow(1, q_len - 1, 1)?;
            let logits = model.logits(&last)?.squeeze(1)?.to_dtype(DType::F32)?;
            ensure_finite(&logits)?;
            let next = match opts.sampling {
                None => logits.argmax(D::Minus1)?.to_vec1::<u32>()?,
                Some(s) => sample(&logits, s, &self.active, rngs)?,
            };
            for (i, &tok) in next.iter().enumerate() {
                self.push(self.active[i], tok, opts, decided);
            }
            self.feed_finished_as_padding();
            let b = next.len();
            input = Tensor::from_vec(next, (b, 1), dev)?;
        }
        Ok(())
    }
}

/// One token per row of `logits`; row i belongs to prompt `rows_of[i]` and draws from its
/// generator.
fn sample(
    logits: &Tensor,
    s: Sampling,
    rows_of: &[usize],
    rngs: &mut [StdRng],
) -> Result<Vec<u32>> {
    let rows = logits.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(rows_of)
        .map(|(row, &prompt)| {
            let rng = &mut rngs[prompt];
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_unstable_by(|&a, &b| row[b].total_cmp(&row[a]));
            let k = if s.top_k == 0 {
                row.len()
            } else {
                s.top_k.min(row.len())
            };
            let top = &idx[..k];
            let t = s.temperature.max(1e-6) as f32;
            let m = row[top[0]];
            let weights: Vec<f32> = top.iter().map(|&i| ((row[i] - m) / t).exp()).collect();
            let total: f32 = weights.iter().sum();
            let mut x = rng.random::<f32>() * total;
            for (j, w) in weights.iter().enumerate() {
                if x < *w {
                    return top[j] as u32;
                }
                x -= w;
            }
            top[k - 1] as u32
        })
        .collect())
}
