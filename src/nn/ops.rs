//! Differentiable building blocks shared by the models and the training loop.
//!
//! Everything here carries gradients. candle's own fused softmax, norm and RoPE kernels have no
//! backward pass, so on the CPU with f32 the hot ops (attention softmax, norms, token NLL) use
//! our fused kernels in `crate::nn::fused`, which do; elsewhere (other dtypes, CUDA) they fall back
//! to the composed `*_composed` versions written with gradient-carrying candle ops.

use crate::nn::fused;
use candle_core::{DType, Device, Result, Tensor, D};

/// Whether the fused CPU kernels apply: every tensor f32 on the CPU, and not disabled with
/// `SANI_FUSED=0` (for A/B measurements).
pub fn fusable(ts: &[&Tensor]) -> bool {
    use_fused(ts)
}

fn use_fused(ts: &[&Tensor]) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("SANI_FUSED").map_or(true, |v| v != "0"))
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Whether every value of `t` is finite: `t - t` is exactly zero where a value is finite and NaN
/// where it is NaN or Inf, so its sum tells.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let s = t
        .broadcast_sub(t)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(s == 0.0)
}

/// `x @ w^T + b` for a PyTorch `Linear` weight stored (out, in), over any leading dims. A
/// frozen weight may be held in bf16 or f16 (see `Model::load_to_train`): it is widened per pass.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if is_narrow(w) {
        if frozen_linear_fits(x, w, b) {
            return fused::frozen_linear(x, w, b, true);
        }
        return linear_composed(x, &w.to_dtype(x.dtype())?, b);
    }
    if fused_linear_fits(x, w, b) {
        return fused::linear(x, w, b);
    }
    linear_composed(x, w, b)
}

/// A weight held in 16 bits (bf16 or f16): frozen, read by widening it.
fn is_narrow(w: &Tensor) -> bool {
    matches!(w.dtype(), DType::BF16 | DType::F16)
}

/// Whether the fused frozen-weight op applies to a 16-bit `w`: f32 CPU input, and a bias that
/// is f32 and frozen too (the op gives no gradient but the input's).
fn frozen_linear_fits(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    x.rank() >= 1
        && w.rank() == 2
        && w.device().is_cpu()
        && b.is_none_or(|b| b.rank() == 1 && !b.track_op() && use_fused(&[b]))
        && use_fused(&[x])
}

/// Whether the fused linear / conv1d op applies: f32 CPU, 2-d weight, 1-d bias, rank >= 1 input.
fn fused_linear_fits(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    x.rank() >= 1
        && w.rank() == 2
        && match b {
            Some(b) => b.rank() == 1 && use_fused(&[x, w, b]),
            None => use_fused(&[x, w]),
        }
}

/// `linear` written with composed candle ops (any dtype or device).
pub fn linear_composed(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
    let n: usize = lead.iter().product();
    let y = x.reshape((n, in_dim))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut shape = lead;
    shape.push(out_dim);
    y.reshape(shape)
}

/// A frozen projection plus a LoRA adapter: `x w^T + bias + scale (x a^T) b^T` for `w` stored
/// (out, in) (`transposed`, PyTorch `Linear`) or `x w + ...` for (in, out) (GPT-2 `Conv1D`).
/// The fused op keeps no [n, out] intermediates for the backward pass.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    (a, b, scale): (&Tensor, &Tensor, f64),
    transposed: bool,
) -> Result<Tensor> {
    // The frozen weight may be held in its stored 16-bit dtype: the ops widen it as they go.
    let w_fits = w.rank() == 2
        && w.device().is_cpu()
        && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16);
    let bias_fits = bias.is_none_or(|b| b.rank() == 1 && use_fused(&[b]));
    if x.rank() >= 1 && w_fits && bias_fits && use_fused(&[x, a, b]) {
        return fused::lora_linear(x, w, bias, a, b, scale, transposed);
    }
    let w = w.to_dtype(x.dtype())?;
    let w_out_in = if transposed { w } else { w.t()? };
    let y = linear_composed(x, &w_out_in, bias)?;
    let up = linear_composed(&linear_composed(x, a, None)?, b, None)?;
    y + (up * scale)?
}

/// `x @ w + b` for a GPT-2 `Conv1D` weight stored (in, out); a frozen `w` may be 16-bit, as in
/// [`linear`].
pub fn conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if is_narrow(w) {
        if frozen_linear_fits(x, w, Some(b)) {
            return fused::frozen_linear(x, w, Some(b), false);
        }
        return conv1d_composed(x, &w.to_dtype(x.dtype())?, b);
    }
    if fused_linear_fits(x, w, Some(b)) {
        return fused::conv1d(x, w, Some(b));
    }
    conv1d_composed(x, w, b)
}

/// `conv1d` written with composed candle ops (any dtype or device).
pub fn conv1d_composed(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (in_dim, out_dim) = w.dims2()?;
    let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
    let n: usize = lead.iter().product();
    let y = x.reshape((n, in_dim))?.matmul(w)?.broadcast_add(b)?;
    let mut shape = lead;
    shape.push(out_dim);
    y.reshape(shape)
}

/// Layer norm over the last dim with weight and bias [d].
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fused(&[x, w, b]) && w.rank() == 1 && b.rank() == 1 {
        return fused::layer_norm(x, w, b, eps);
    }
    layer_norm_composed(x, w, b, eps)
}

/// `layer_norm` written with composed candle ops (any dtype or device).
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(w)?.broadcast_add(b)
}

/// RMS norm over the last dim with weight [d].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if use_fused(&[x, w]) && w.rank() == 1 {
        return fused::rms_norm(x, w, eps);
    }
    rms_norm_composed(x, w, eps)
}

/// `rms_norm` written with composed candle ops (any dtype or device).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// gelu_new, the tanh approximation of GELU (HF `gelu_new`, candle `Tensor::gelu`), with a
/// fused one-pass forward and backward on f32 CPU tensors.
pub fn gelu_new(x: &Tensor) -> Result<Tensor> {
    if use_fused(&[x]) {
        return fused::gelu_new(x);
    }
    x.gelu()
}

/// silu (x * sigmoid(x)), with a fused one-pass forward and backward on f32 CPU tensors.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if use_fused(&[x]) {
        return fused::silu(x);
    }
    x.silu()
}

/// `silu(gate) * up` (SwiGLU), one fused node on f32 CPU tensors.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if use_fused(&[gate, up]) && gate.dims() == up.dims() {
        return fused::swiglu(gate, up);
    }
    silu(gate)? * up
}

pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Scaled dot-product attention with an additive mask; `k`/`v` may have fewer (grouped) heads.
/// q: [b, h, t, d], k/v: [b, kvh, s, d], mask: [b, 1, t, s]. Returns [b, t, h*d].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if use_fused(&[q, k, v, mask]) {
        let last_dim_contiguous = |t: &Tensor| -> Result<Tensor> {
            match t.stride().last() {
                Some(1) => Ok(t.clone()),
                _ => t.contiguous(),
            }
        };
        return fused::attention(
            &last_dim_contiguous(q)?,
            &last_dim_contiguous(k)?,
            &last_dim_contiguous(v)?,
            mask,
            scale,
        );
    }
    attention_composed(q, k, v, mask, scale)
}

/// [`attention`] over a packed q|k|v tensor [b, t, 3 * heads * d] (GPT-2's `c_attn` output),
/// full self-attention (no cache); mask [b or 1, 1, t, t]. Returns [b, t, heads * d].
pub fn attention_packed(qkv: &Tensor, heads: usize, mask: &Tensor, scale: f64) -> Result<Tensor> {
    if use_fused(&[qkv, mask]) && qkv.stride().last() == Some(&1) {
        return fused::attention_packed(qkv, heads, mask, scale);
    }
    let (q, k, v) = split_packed_qkv(qkv, heads)?;
    attention_composed(&q, &k, &v, mask, scale)
}

/// q, k, v [b, heads, t, d] views of a packed [b, t, 3 * heads * d] tensor.
pub fn split_packed_qkv(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, w) = qkv.dims3()?;
    let d = w / 3;
    let part = |i: usize| -> Result<Tensor> {
        qkv.narrow(D::Minus1, i * d, d)?
            .reshape((b, t, heads, d / heads))?
            .transpose(1, 2)
    };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// Rotary position embedding (HF's non-interleaved layout) of a projection's output
/// [b, t, heads * d], returned as heads [b, heads, t, d]; cos/sin [b, 1, t, d].
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    if use_fused(&[x, cos, sin]) {
        return fused::rope_heads(x, cos, sin, heads);
    }
    rope_heads_composed(x, cos, sin, heads)
}

/// `rope_heads` written with composed candle ops (any dtype or device).
pub fn rope_heads_composed(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, w) = x.dims3()?;
    let d = w / heads;
    let x = x.reshape((b, t, heads, d))?.transpose(1, 2)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// `attention` written with composed candle ops (any dtype or device).
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    attention_with_probs(q, k, v, |scores| scaled_masked_softmax(scores, mask, scale))
}

/// Grouped-query attention with `probs` turning the raw scores [b, h, t, s] into weights.
fn attention_with_probs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    let (k, v) = if kvh != h {
        (repeat_kv(k, h / kvh)?, repeat_kv(v, h / kvh)?)
    } else {
        (k.clone(), v.clone())
    };
    // candle's matmul takes the transposed view of a contiguous k as is: no copy of k^T.
    let scores = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
    let out = probs(&scores)?.matmul(&v.contiguous()?)?;
    out.transpose(1, 2)?.reshape((b, t, h * d))
}

/// `cap * tanh(x / cap)`: Gemma 2's soft-capping of attention scores and logits (composed
/// ops, so any dtype or device, with candle's backward).
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// [`attention`] with the scaled scores soft-capped before the mask (Gemma 2), composed.
pub fn attention_softcapped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    cap: f64,
) -> Result<Tensor> {
    attention_with_probs(q, k, v, |scores| {
        softmax_last(&softcap(&(scores * scale)?, cap)?.broadcast_add(mask)?)
    })
}

/// `softmax(scores * scale + mask)` over the last dim; scores [b, h, t, s], mask [b or 1, 1, t, s]
/// (broadcast over heads). The mask gets no gradient.
pub fn scaled_masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let fits = match (scores.dims4(), mask.dims4()) {
        (Ok((b, _, t, s)), Ok((mb, 1, mt, ms))) => (mb == b || mb == 1) && mt == t && ms == s,
        _ => false,
    };
    if fits && use_fused(&[scores, mask]) {
        return fused::scaled_masked_softmax(scores, mask, scale);
    }
    scaled_masked_softmax_composed(scores, mask, scale)
}

/// `scaled_masked_softmax` written with composed candle ops (any dtype or device).
pub fn scaled_masked_softmax_composed(
    scores: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    softmax_last(&(scores * scale)?.broadcast_add(mask)?)
}

fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    let (b, kvh, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kvh, n_rep, s, d))?
        .reshape((b, kvh * n_rep, s, d))
}

/// Additive attention mask [b, 1, t, s] for `t` new queries after `past` cached positions.
/// Key j is visible from query i when it is not padding, j <= past + i, and (with a sliding
/// window w) past + i - j < w.
pub fn attention_mask(
    key_valid: &[Vec<bool>],
    q_len: usize,
    past: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let b = key_valid.len();
    let s = past + q_len;
    let mut data = vec![0f32; b * q_len * s];
    for (bi, valid) in key_valid.iter().enumerate() {
        assert_eq!(valid.len(), s, "key mask length");
        for i in 0..q_len {
            let qpos = past + i;
            for j in 0..s {
                let visible = valid[j] && j <= qpos && window.is_none_or(|w| qpos - j < w);
                if !visible {
                    data[(bi * q_len + i) * s + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(data, (b, 1, q_len, s), device)
}

/// For rows that each hold several sequences back to back (`segments[b]`: their lengths, in
/// order; the rest of the row is padding), where each position's sequence starts: a padding
/// position is a sequence of its own.
fn segment_starts(segments: &[usize], t: usize) -> Vec<usize> {
    let mut starts = Vec::with_capacity(t);
    for &n in segments {
        let s0 = starts.len();
        starts.extend(std::iter::repeat_n(s0, n));
    }
    assert!(starts.len() <= t, "segments longer than the row");
    starts.extend(starts.len()..t);
    starts
}

/// Additive mask [b, 1, t, t] for rows of sequences packed back to back (see
/// [`segment_starts`]): a position sees the positions of its own sequence up to itself (the
/// last `window` of them with a sliding window), never another sequence's.
pub fn segment_mask(
    segments: &[Vec<usize>],
    t: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let b = segments.len();
    let mut data = vec![f32::MIN; b * t * t];
    for (bi, row) in segments.iter().enumerate() {
        let starts = segment_starts(row, t);
        for (i, &s0) in starts.iter().enumerate() {
            let from = window.map_or(s0, |w| s0.max((i + 1).saturating_sub(w)));
            data[(bi * t + i) * t..][from..=i].fill(0.0);
        }
    }
    Tensor::from_vec(data, (b, 1, t, t), device)
}

/// Positions [b, t] for rows of packed sequences: each sequence counts from 0 (padding: 0).
pub fn segment_positions(segments: &[Vec<usize>], t: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<u32> = segments
        .iter()
        .flat_map(|row| {
            segment_starts(row, t)
                .into_iter()
                .enumerate()
                .map(|(i, s0)| (i - s0) as u32)
        })
        .collect();
    Tensor::from_vec(data, (segments.len(), t), device)
}

/// Positions the way HF `generate` computes them: count of real tokens before, pads get 1.
pub fn positions_from_mask(
    key_valid: &[Vec<bool>],
    q_len: usize,
    device: &Device,
) -> Result<Tensor> {
    let b = key_valid.len();
    let mut data = Vec::with_capacity(b * q_len);
    for valid in key_valid {
        let s = valid.len();
        let mut count = 0u32;
        let mut pos = Vec::with_capacity(s);
        for &v in valid {
            pos.push(if v { count } else { 1 });
            if v {
                count += 1;
            }
        }
        data.extend_from_slice(&pos[s - q_len..]);
    }
    Tensor::from_vec(data, (b, q_len), device)
}

/// Mean cross-entropy of `logits` [n, v] against `targets` [n] (u32) over rows with weight 1
/// (`weights` [n] f32 of 0/1). Returns (loss, number of counted rows).
pub fn masked_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<(Tensor, f32)> {
    let nll = token_nll(logits, targets)?;
    let count = weights
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    let total = (nll * weights)?.sum_all()?;
    Ok(((total / count.max(1.0) as f64)?, count))
}

/// `masked_cross_entropy` written with composed candle ops (any dtype or device).
pub fn masked_cross_entropy_composed(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<(Tensor, f32)> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let count = weights
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    let total = (picked * weights)?.sum_all()?.neg()?;
    Ok(((total / count.max(1.0) as f64)?, count))
}

/// Negative log-likelihood of each target: logits [n, v], targets [n] u32 -> [n].
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if use_fused(&[logits])
        && targets.dtype() == DType::U32
        && logits.rank() == 2
        && targets.rank() == 1
    {
        return fused::token_nll(logits, targets);
    }
    token_nll_composed(logits, targets)
}

/// `token_nll(h @ w^T, targets)` for hidden states h [n, d] and a head weight w [v, d], without
/// the [n, v] logits when the fused kernel applies (f32 CPU); gradients flow to h and w.
/// `row_grad`: the gradient the loss will send back to each row, when known (see
/// [`fused::lm_head_nll`]); any gradient stays correct.
pub fn lm_head_nll(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    row_grad: Option<Vec<f32>>,
) -> Result<Tensor> {
    static CHUNKED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SANI_CHUNKED_HEAD=0 computes the full logits instead (the path before; for benchmarks).
    let chunked =
        *CHUNKED.get_or_init(|| std::env::var("SANI_CHUNKED_HEAD").map_or(true, |v| v != "0"));
    if !chunked {
        return token_nll(&linear(h, w, None)?, targets);
    }
    if use_fused(&[h, w]) && targets.dtype() == DType::U32 && h.rank() == 2 && w.rank() == 2 {
        return fused::lm_head_nll(h, w, targets, row_grad);
    }
    token_nll_composed(&linear_composed(h, w, None)?, targets)
}

/// `token_nll` written with composed candle ops (any dtype or device).
pub fn token_nll_composed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    log_probs
        .gather(&targets.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_sequences_see_only_themselves_and_count_positions_from_zero() {
        let dev = Device::Cpu;
        // A row of two sequences (3 and 2 tokens) and a padding position.
        let segments = vec![vec![3, 2]];
        let visible = |window| -> Vec<Vec<u8>> {
            let m = segment_mask(&segments, 6, window, &dev).unwrap();
            m.squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .iter()
                .map(|r| r.iter().map(|&x| (x == 0.0) as u8).collect())
                .collect()
        };
        let full = vec![
            vec![1, 0, 0, 0, 0, 0],
            vec![1, 1, 0, 0, 0, 0],
            vec![1, 1, 1, 0, 0, 0],
            vec![0, 0, 0, 1, 0, 0],
            vec![0, 0, 0, 1, 1, 0],
            vec![0, 0, 0, 0, 0, 1],
        ];
        assert_eq!(visible(None), full);
        let mut windowed = full.clone();
        windowed[2][0] = 0;
        assert_eq!(visible(Some(2)), windowed);
        let positions = segment_positions(&segments, 6, &dev).unwrap();
        assert_eq!(
            positions.to_vec2::<u32>().unwrap(),
            vec![vec![0, 1, 2, 0, 1, 0]]
        );
    }
}
