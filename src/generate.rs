//! Batched decoding with a KV cache and left padding: greedy, or sampling with temperature and top-k.
//!
//! Positions follow HF `generate` (count of real tokens before each one), so a left-padded row
//! decodes exactly as it would alone.

use crate::model::{AttnContext, KvCache, Model};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use rand::rngs::StdRng;
use rand::Rng;

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

/// Generates continuations of `prompts` (token ids, each non-empty) in one batch.
/// Returns the new tokens of each row.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    rng: &mut StdRng,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    if prompts.iter().any(Vec::is_empty) {
        bail!("generate: every prompt needs at least one token");
    }
    let dev = &model.device;
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut valid: Vec<Vec<bool>> = Vec::with_capacity(b);
    let mut ids = Vec::with_capacity(b * max_len);
    for p in prompts {
        let pad = max_len - p.len();
        ids.extend(std::iter::repeat_n(opts.pad_id, pad));
        ids.extend_from_slice(p);
        let mut v = vec![false; pad];
        v.extend(std::iter::repeat_n(true, p.len()));
        valid.push(v);
    }
    let steps = opts.max_new_tokens.iter().copied().max().unwrap_or(0);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done: Vec<bool> = opts.max_new_tokens.iter().map(|&n| n == 0).collect();
    let mut cache = KvCache::new(model.num_layers());
    let window = model.sliding_window();
    let mut input = Tensor::from_vec(ids, (b, max_len), dev)?;
    for _ in 0..steps {
        if done.iter().all(|&d| d) {
            break;
        }
        let q_len = input.dim(1)?;
        let past = cache.len();
        let ctx = AttnContext::new(&valid, q_len, past, window, true, dev)?;
        let x = model.embed(&input, &ctx)?;
        let h = model.run_blocks(0, &x, &ctx, Some(&mut cache), None)?;
        let last = h.narrow(1, q_len - 1, 1)?;
        let logits = model.logits(&last)?.squeeze(1)?.to_dtype(DType::F32)?;
        let next = match opts.sampling {
            None => logits.argmax(D::Minus1)?.to_vec1::<u32>()?,
            Some(s) => sample(&logits, s, rng)?,
        };
        for (row, &tok) in next.iter().enumerate() {
            if done[row] {
                continue;
            }
            if opts.stop_tokens.contains(&tok) {
                done[row] = true;
                continue;
            }
            out[row].push(tok);
            if out[row].len() >= opts.max_new_tokens[row] {
                done[row] = true;
            }
        }
        // A finished row keeps being fed (the batch moves together) but as padding, so its
        // positions never run past the context.
        for (v, &finished) in valid.iter_mut().zip(&done) {
            v.push(!finished);
        }
        input = Tensor::from_vec(next, (b, 1), dev)?;
    }
    Ok(out)
}

fn sample(logits: &Tensor, s: Sampling, rng: &mut StdRng) -> Result<Vec<u32>> {
    let rows = logits.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|row| {
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
