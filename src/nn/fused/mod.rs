//! Fused CPU kernels with backward passes, applied as candle `CustomOp`s.
//!
//! Every kernel here works on f32, contiguous CPU tensors and walks rows of the last dimension
//! in parallel with rayon. `crate::nn::ops` decides when to use them and falls back to the composed
//! candle versions otherwise (other dtypes, other devices).
//!
//! Each forward op carries a `bwd`, so gradients flow through `Tensor::backward`; the backward
//! kernels themselves are applied without a backward (no second derivatives).

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape,
    Storage, Tensor,
};
use rayon::prelude::*;
use std::sync::Mutex;

mod attention;
mod rope;
pub use attention::{attention, attention_grads, attention_packed};
pub use rope::{rope_heads, rope_heads_grad};

/// Below this, `exp(x - max)` is zero (or a denormal) in f32: skip the call.
const EXP_CUTOFF: f32 = -88.0;

/// Defines `fn $name` to run its body compiled for AVX2 where the CPU has it. The crate is built
/// for baseline x86-64 (it must run on any of a cluster's nodes), where LLVM vectorizes these
/// loops 4 lanes wide; with AVX2 they run 8 wide. The operations are the same, so the results
/// are bit for bit the same either way.
macro_rules! avx2_where_available {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

fn contiguous_u32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u32]> {
    let data = s.as_slice::<u32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}

/// Runs `f` on the f32 data of a contiguous CPU tensor.
fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => f(contiguous_f32(s, l, what)?),
        _ => bail!("{what}: CPU tensors only"),
    }
}

/// Rows handed to one rayon task, so that each task touches about 16K elements.
fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

fn last_dim(l: &Layout) -> Result<(usize, usize)> {
    let dims = l.dims();
    let Some(&d) = dims.last() else {
        bail!("fused op: scalar input")
    };
    let n = l.shape().elem_count().checked_div(d).unwrap_or(0);
    Ok((n, d))
}

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rem.iter().sum::<f32>()
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter()
        .chain(rem)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `exp(x)` in f32 from a polynomial (Cephes' expf), within 2 ulp of the correctly rounded
/// value for x in [-87, 88]; below that it returns about 1.2e-38 instead of a denormal or 0, above
/// it about 1.7e38 instead of infinity. Unlike libm's `expf` it has no branches or calls, so
/// loops over it vectorize, and it never takes libm's slow underflow path.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    y * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// Writes `exp(row - m)` into `row` in place and returns the sum.
#[inline(always)]
fn exp_shift_sum(row: &mut [f32], m: f32) -> f32 {
    for v in row.iter_mut() {
        let z = *v - m;
        *v = if z < EXP_CUTOFF { 0.0 } else { fast_exp(z) };
    }
    sum(row)
}

// ------------------------------------------------------------------------------------------
// softmax(scores * scale + mask) over the last dim

/// `softmax(scores * scale + mask)` over the last dim; scores [b, h, t, s], mask [b or 1, 1, t, s].
struct ScaledMaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let m = contiguous_f32(s2, l2, self.name())?;
        let (b, h, t, s) = l1.shape().dims4()?;
        let (mb, mh, mt, ms) = l2.shape().dims4()?;
        if mh != 1 || mt != t || ms != s || !(mb == b || mb == 1) {
            bail!(
                "{}: mask {:?} does not broadcast to scores {:?}",
                self.name(),
                l2.dims(),
                l1.dims()
            );
        }
        let mut out = vec![0f32; x.len()];
        if s == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        let scale = self.scale;
        let rpt = rows_per_task(s);
        out.par_chunks_mut(rpt * s)
            .enumerate()
            .for_each(|(ci, chunk)| {
                for (k, o) in chunk.chunks_exact_mut(s).enumerate() {
                    let r = ci * rpt + k;
                    let (bi, ti) = (r / (h * t), r % t);
                    let mrow = &m[((bi % mb) * t + ti) * s..][..s];
                    let xrow = &x[r * s..][..s];
                    for ((o, &xv), &mv) in o.iter_mut().zip(xrow).zip(mrow) {
                        *o = xv * scale + mv;
                    }
                    let mx = max(o);
                    let z = exp_shift_sum(o, mx);
                    let inv = 1.0 / z;
                    for v in o.iter_mut() {
                        *v *= inv;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let p = res.contiguous()?;
        let ds = p.apply_op2_no_bwd(&g, &SoftmaxBwd { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

/// `scale * p * (g - sum(g * p))` over the last dim, for (p, g).
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        if l1.dims() != l2.dims() {
            bail!(
                "{}: shape mismatch {:?} vs {:?}",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let (_, d) = last_dim(l1)?;
        let mut out = vec![0f32; p.len()];
        if d == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        let scale = self.scale;
        let rpt = rows_per_task(d);
        out.par_chunks_mut(rpt * d)
            .enumerate()
            .for_each(|(ci, chunk)| {
                for (k, o) in chunk.chunks_exact_mut(d).enumerate() {
                    let r = ci * rpt + k;
                    let pr = &p[r * d..][..d];
                    let gr = &g[r * d..][..d];
                    let dp = dot(pr, gr);
                    for ((o, &pv), &gv) in o.iter_mut().zip(pr).zip(gr) {
                        *o = scale * pv * (gv - dp);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Fused `softmax(scores * scale + mask)` over the last dim. scores [b, h, t, s] and mask
/// [b or 1, 1, t, s], both f32 on the CPU. The mask gets no gradient.
pub fn scaled_masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = scores.contiguous()?;
    let mask = mask.contiguous()?;
    scores.apply_op2(
        &mask,
        ScaledMaskedSoftmax {
            scale: scale as f32,
        },
    )
}

// ------------------------------------------------------------------------------------------
// layer norm / rms norm over the last dim

struct LayerNorm {
    eps: f32,
}

fn check_param(what: &str, l: &Layout, d: usize) -> Result<()> {
    if l.shape().elem_count() != d || l.dims().len() != 1 {
        bail!("{what}: parameter of shape {:?}, expected [{d}]", l.dims());
    }
    Ok(())
}

/// (mean, 1/sqrt(var + eps)) of a row.
#[inline]
fn ln_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = sum(x) / d;
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            let v = c[i] - mean;
            acc[i] += v * v;
        }
    }
    let var =
        (acc.iter().sum::<f32>() + rem.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>()) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline]
fn rms_rstd(x: &[f32], eps: f32) -> f32 {
    let ms = dot(x, x) / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let b = contiguous_f32(s3, l3, self.name())?;
        let (_, d) = last_dim(l1)?;
        check_param(self.name(), l2, d)?;
        check_param(self.name(), l3, d)?;
        let mut out = vec![0f32; x.len()];
        if d == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        let eps = self.eps;
        let rpt = rows_per_task(d);
        out.par_chunks_mut(rpt * d)
            .zip(x.par_chunks(rpt * d))
            .for_each(|(oc, xc)| {
                for (o, xr) in oc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
                    let (mean, rstd) = ln_stats(xr, eps);
                    for (((o, &xv), &wv), &bv) in o.iter_mut().zip(xr).zip(w).zip(b) {
                        *o = (xv - mean) * rstd * wv + bv;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (dx, dw, db) = norm_bwd(x, w, &g, self.eps, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let (_, d) = last_dim(l1)?;
        check_param(self.name(), l2, d)?;
        let mut out = vec![0f32; x.len()];
        if d == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        let eps = self.eps;
        let rpt = rows_per_task(d);
        out.par_chunks_mut(rpt * d)
            .zip(x.par_chunks(rpt * d))
            .for_each(|(oc, xc)| {
                for (o, xr) in oc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
                    let rstd = rms_rstd(xr, eps);
                    for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                        *o = xv * rstd * wv;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (dx, dw, _) = norm_bwd(x, w, &g, self.eps, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Gradients of layer norm (`centered`) or rms norm: (dx, dw, db if centered).
/// With xhat the normalized row and dxhat = g * w:
/// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) (no mean(dxhat) term for rms),
/// dw = sum_rows g * xhat, db = sum_rows g.
fn norm_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f32,
    centered: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let what = if centered {
        "fused-layer-norm-bwd"
    } else {
        "fused-rms-norm-bwd"
    };
    let d = x.dims().last().copied().unwrap_or(0);
    if g.dims() != x.dims() {
        bail!("{what}: grad {:?} vs input {:?}", g.dims(), x.dims());
    }
    let mut dx = vec![0f32; x.elem_count()];
    let mut dw = vec![0f32; d];
    let mut db = vec![0f32; d];
    if d > 0 {
        with_f32(&x, what, |xs| {
            with_f32(&w, what, |ws| {
                with_f32(g, what, |gs| {
                    let rpt = rows_per_task(d);
                    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
                        .par_chunks_mut(rpt * d)
                        .zip(xs.par_chunks(rpt * d))
                        .zip(gs.par_chunks(rpt * d))
                        .map(|((dxc, xc), gc)| {
                            let mut pw = vec![0f32; d];
                            let mut pb = vec![0f32; if centered { d } else { 0 }];
                            let mut xhat = vec![0f32; d];
                            let mut dxhat = vec![0f32; d];
                            for ((dxr, xr), gr) in dxc
                                .chunks_exact_mut(d)
                                .zip(xc.chunks_exact(d))
                                .zip(gc.chunks_exact(d))
                            {
                                let (mean, rstd) = if centered {
                                    ln_stats(xr, eps)
                                } else {
                                    (0.0, rms_rstd(xr, eps))
                                };
                                for ((xh, dxh), ((&xv, &gv), &wv)) in xhat
                                    .iter_mut()
                                    .zip(dxhat.iter_mut())
                                    .zip(xr.iter().zip(gr).zip(ws))
                                {
                                    *xh = (xv - mean) * rstd;
                                    *dxh = gv * wv;
                                }
                                let inv_d = 1.0 / d as f32;
                                let m1 = if centered { sum(&dxhat) * inv_d } else { 0.0 };
                                let m2 = dot(&dxhat, &xhat) * inv_d;
                                for ((o, &xh), &dxh) in dxr.iter_mut().zip(&xhat).zip(&dxhat) {
                                    *o = rstd * (dxh - m1 - xh * m2);
                                }
                                for ((p, &gv), &xh) in pw.iter_mut().zip(gr).zip(&xhat) {
                                    *p += gv * xh;
                                }
                                if centered {
                                    for (p, &gv) in pb.iter_mut().zip(gr) {
                                        *p += gv;
                                    }
                                }
                            }
                            (pw, pb)
                        })
                        .collect();
                    // Sum the per-task partials in a fixed order: deterministic results.
                    for (pw, pb) in &partials {
                        for (a, v) in dw.iter_mut().zip(pw) {
                            *a += v;
                        }
                        for (a, v) in db.iter_mut().zip(pb) {
                            *a += v;
                        }
                    }
                    Ok(())
                })
            })
        })?;
    }
    let dev = Device::Cpu;
    let dx = Tensor::from_vec(dx, x.shape(), &dev)?;
    let dw = Tensor::from_vec(dw, w.shape(), &dev)?;
    let db = if centered {
        Some(Tensor::from_vec(db, w.shape(), &dev)?)
    } else {
        None
    };
    Ok((dx, dw, db))
}

/// The gradients (dx, dw) of [`rms_norm`] for the output gradient `g` (f32, CPU).
pub fn rms_norm_grads(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (dx, dw, _) = norm_bwd(x, w, &g.contiguous()?, eps as f32, false)?;
    Ok((dx, dw))
}

/// Fused layer norm over the last dim (f32, CPU); w and b are [d].
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let b = b.contiguous()?;
    x.apply_op3(&w, &b, LayerNorm { eps: eps as f32 })
}

/// Fused RMS norm over the last dim (f32, CPU); w is [d].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2(&w, RmsNorm { eps: eps as f32 })
}

// ------------------------------------------------------------------------------------------
// token negative log-likelihood: -log_softmax(logits)[target]

/// logits [n, v] f32, targets [n] u32 -> [n]. Keeps the per-row logsumexp (n floats) for the
/// backward pass.
struct TokenNll {
    lse: Mutex<Vec<f32>>,
}

avx2_where_available! {
    /// The logsumexp of a row.
    fn row_lse(row: &[f32]) -> f32 {
        let m = max(row);
        if m == f32::NEG_INFINITY || m.is_nan() {
            return m;
        }
        let mut acc = [0f32; 8];
        let chunks = row.chunks_exact(8);
        let rem = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                let z = c[i] - m;
                acc[i] += if z < EXP_CUTOFF { 0.0 } else { fast_exp(z) };
            }
        }
        let s = acc.iter().sum::<f32>() + rem.iter().map(|&v| fast_exp(v - m)).sum::<f32>();
        m + s.ln()
    }
}

avx2_where_available! {
    /// A row of logits turned in place into its gradient, (softmax - onehot(target)) * g, from
    /// its logsumexp `l`.
    fn row_to_grad(row: &mut [f32], l: f32, g: f32, target: usize) {
        if g == 0.0 {
            row.fill(0.0);
            return;
        }
        for o in row.iter_mut() {
            let z = *o - l;
            *o = if z < EXP_CUTOFF { 0.0 } else { fast_exp(z) * g };
        }
        row[target] -= g;
    }
}

avx2_where_available! {
    /// A row's logsumexp and NLL, with the row of logits turned in place into its gradient for
    /// the row gradient `g` (as `row_to_grad`): one pass of exponentials serves both.
    fn row_nll_to_grad(row: &mut [f32], g: f32, target: usize) -> (f32, f32) {
        let m = max(row);
        let logit = row[target];
        if !m.is_finite() {
            let l = row_lse(row);
            row_to_grad(row, l, g, target);
            return (l, l - logit);
        }
        let s = exp_shift_sum(row, m);
        let l = m + s.ln();
        if g == 0.0 {
            row.fill(0.0);
        } else {
            let scale = g / s;
            for o in row.iter_mut() {
                *o *= scale;
            }
            row[target] -= g;
        }
        (l, l - logit)
    }
}

impl CustomOp2 for TokenNll {
    fn name(&self) -> &'static str {
        "fused-token-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let tg = contiguous_u32(s2, l2, self.name())?;
        let (n, v) = l1.shape().dims2()?;
        if l2.dims() != [n] {
            bail!(
                "{}: targets {:?} for logits {:?}",
                self.name(),
                l2.dims(),
                l1.dims()
            );
        }
        if let Some(&bad) = tg.iter().find(|&&t| t as usize >= v) {
            bail!("{}: target {bad} out of range for vocab {v}", self.name());
        }
        let mut lse = vec![0f32; n];
        let mut out = vec![0f32; n];
        if v > 0 {
            chunk_nll(x, v, tg, &mut lse, &mut out);
        }
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let logits = logits.contiguous()?;
        let targets = targets.contiguous()?.to_vec1::<u32>()?;
        let g = grad.contiguous()?.to_vec1::<f32>()?;
        let (n, v) = logits.dims2()?;
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut d = vec![0f32; n * v];
        if v > 0 {
            with_f32(&logits, self.name(), |x| {
                d.copy_from_slice(&x[..n * v]);
                let lse: &[f32] = if lse.len() == n { &lse } else { &[] };
                logits_to_grad(&mut d, v, 0, &g, lse, &targets);
                Ok(())
            })?;
        }
        Ok((Some(Tensor::from_vec(d, (n, v), &Device::Cpu)?), None))
    }
}

/// Fused `-log_softmax(logits)[i, targets[i]]`: logits [n, v] f32 and targets [n] u32 on the
/// CPU -> [n]. Gradient flows to the logits only.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.contiguous()?;
    let targets = targets.contiguous()?;
    logits.apply_op2(
        &targets,
        TokenNll {
            lse: Mutex::new(Vec::new()),
        },
    )
}

// ----------------------------------------------------------------------------------------------
// language-model head + token NLL, in chunks of rows: the [n, vocab] logits never exist whole

/// Rows of logits computed at once by [`lm_head_nll`]: about 8M floats (32 MB) per chunk.
fn head_chunk_rows(n: usize, v: usize) -> usize {
    ((8 << 20) / v.max(1)).clamp(16, n.max(16))
}

/// h [n, d] f32, w [v, d] f32 (a Linear weight, stored (out, in)), targets [n] u32 -> [n]:
/// `-log_softmax(h @ w^T)[i, targets[i]]`. Keeps the per-row logsumexp for the backward pass,
/// which recomputes each chunk's logits instead of storing them.
struct LmHeadNll {
    lse: Mutex<Vec<f32>>,
    /// The gradient the caller will send back for each row (its loss weight), when known: the
    /// forward then also computes the input gradients from the logits it has at hand, so the
    /// backward does not recompute them.
    row_grad: Option<Vec<f32>>,
    /// Whether the head weight takes a gradient (false when it is frozen: half the work).
    weight_grad: bool,
    /// (dh, dw) computed in the forward for `row_grad`.
    grads: Mutex<Option<HeadGrads>>,
}

/// The head's input gradients: dh, and dw when the weight takes one.
type HeadGrads = (Vec<f32>, Option<Vec<f32>>);

/// `logits` [c, v] of rows `r0..` turned in place into their gradient for upstream row
/// gradients `g`: (softmax - onehot(target)) * g. `lse` holds every row's logsumexp, or is
/// empty (then it is computed here).
fn logits_to_grad(
    logits: &mut [f32],
    v: usize,
    r0: usize,
    g: &[f32],
    lse: &[f32],
    targets: &[u32],
) {
    logits.par_chunks_mut(v).enumerate().for_each(|(k, row)| {
        let gr = g[r0 + k];
        if gr == 0.0 {
            row.fill(0.0);
            return;
        }
        let l = lse.get(r0 + k).copied().unwrap_or_else(|| row_lse(row));
        row_to_grad(row, l, gr, targets[r0 + k] as usize);
    });
}

/// Adds the chunk's contribution to the input gradients: dh[chunk] = dl . w, dw (+)= dl^T . h
/// (when dw is wanted).
#[allow(clippy::too_many_arguments)]
fn head_grads_chunk(
    dh: &mut [f32],
    dw: Option<&mut [f32]>,
    dl: &[f32],
    h: &[f32],
    w: &[f32],
    (r0, c): (usize, usize),
    (d, v): (usize, usize),
    first: bool,
) {
    gemm_into(
        &mut dh[r0 * d..(r0 + c) * d],
        (c, d, v),
        (dl, v, 1),
        (w, d, 1),
        false,
    );
    if let Some(dw) = dw {
        gemm_into(
            dw,
            (v, d, c),
            (dl, 1, v),
            (&h[r0 * d..(r0 + c) * d], d, 1),
            !first,
        );
    }
}

/// The input gradients for upstream row gradients `g`, chunk by chunk, recomputing the logits.
fn head_grads(
    h: &[f32],
    w: &[f32],
    targets: &[u32],
    g: &[f32],
    lse: &[f32],
    (n, d, v): (usize, usize, usize),
    weight_grad: bool,
) -> HeadGrads {
    let rows = head_chunk_rows(n, v);
    let mut dh = vec![0f32; n * d];
    let mut dw = weight_grad.then(|| vec![0f32; v * d]);
    let mut dl = vec![0f32; rows.min(n) * v];
    let mut first = true;
    for r0 in (0..n).step_by(rows) {
        let c = rows.min(n - r0);
        if g[r0..r0 + c].iter().all(|&x| x == 0.0) {
            continue;
        }
        head_logits(&mut dl, h, w, (r0, c), d, v);
        logits_to_grad(&mut dl[..c * v], v, r0, g, lse, targets);
        let dw = dw.as_deref_mut();
        head_grads_chunk(&mut dh, dw, &dl[..c * v], h, w, (r0, c), (d, v), first);
        first = false;
    }
    (dh, dw)
}

/// Row logsumexp and NLL of one chunk of logits [c, v] (rows `r0..`), the logits turned in place
/// into their gradient for row gradients `g`.
fn chunk_nll_to_grad(
    logits: &mut [f32],
    v: usize,
    r0: usize,
    g: &[f32],
    targets: &[u32],
    (lse, nll): (&mut [f32], &mut [f32]),
) {
    let rpt = rows_per_task(v);
    logits
        .par_chunks_mut(rpt * v)
        .zip(lse.par_chunks_mut(rpt).zip(nll.par_chunks_mut(rpt)))
        .enumerate()
        .for_each(|(ci, (rows, (lc, oc)))| {
            let rows = rows.chunks_mut(v);
            for (k, (row, (l, o))) in rows.zip(lc.iter_mut().zip(oc.iter_mut())).enumerate() {
                let r = ci * rpt + k;
                (*l, *o) = row_nll_to_grad(row, g[r0 + r], targets[r] as usize);
            }
        });
}

/// Row logsumexp and NLL of one chunk of logits [c, v].
fn chunk_nll(logits: &[f32], v: usize, targets: &[u32], lse: &mut [f32], nll: &mut [f32]) {
    let rpt = rows_per_task(v);
    lse.par_chunks_mut(rpt)
        .zip(nll.par_chunks_mut(rpt))
        .enumerate()
        .for_each(|(ci, (lc, oc))| {
            for (k, (l, o)) in lc.iter_mut().zip(oc.iter_mut()).enumerate() {
                let r = ci * rpt + k;
                let row = &logits[r * v..][..v];
                *l = row_lse(row);
                *o = *l - row[targets[r] as usize];
            }
        });
}

/// A row-major or transposed view of an f32 matrix: (data, row stride, column stride).
type MatView<'a> = (&'a [f32], usize, usize);

/// `dst[m x n] (+)= lhs[m x k] . rhs[k x n]` with gemm on rayon's threads; `dst` row-major.
fn gemm_into(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    lhs: MatView,
    rhs: MatView,
    accumulate: bool,
) {
    let span = |(data, rs, cs): MatView, rows: usize, cols: usize| {
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < data.len()
    };
    assert!(
        dst.len() >= m * n && span(lhs, m, k) && span(rhs, k, n),
        "gemm_into: bounds"
    );
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the assertion above keeps every access of the three views in bounds, and `dst`
    // is a unique borrow, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// Logits of rows `r0..r0 + c` of `h` [n, d] against the head `w` [v, d], into `out` [c, v].
fn head_logits(out: &mut [f32], h: &[f32], w: &[f32], (r0, c): (usize, usize), d: usize, v: usize) {
    gemm_into(
        out,
        (c, v, d),
        (&h[r0 * d..(r0 + c) * d], d, 1),
        (w, 1, d),
        false,
    );
}

impl CustomOp3 for LmHeadNll {
    fn name(&self) -> &'static str {
        "sani-lm-head-nll"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d) = hl.shape().dims2()?;
        let (v, wd) = wl.shape().dims2()?;
        let h = contiguous_f32(hs, hl, self.name())?;
        let w = contiguous_f32(ws, wl, self.name())?;
        let tg = contiguous_u32(ts, tl, self.name())?;
        if wd != d || tl.dims() != [n] {
            bail!(
                "{}: hidden {:?}, weight {:?}, targets {:?}",
                self.name(),
                hl.dims(),
                wl.dims(),
                tl.dims()
            );
        }
        if let Some(&bad) = tg.iter().find(|&&t| t as usize >= v) {
            bail!("{}: target {bad} out of range for vocab {v}", self.name());
        }
        let mut lse = vec![0f32; n];
        let mut out = vec![0f32; n];
        let rows = head_chunk_rows(n, v);
        let mut logits = vec![0f32; rows.min(n) * v];
        let g = self.row_grad.as_deref().filter(|g| g.len() == n);
        let weight_grad = self.weight_grad;
        let mut grads = g.map(|_| (vec![0f32; n * d], weight_grad.then(|| vec![0f32; v * d])));
        let mut first = true;
        for r0 in (0..n).step_by(rows) {
            let c = rows.min(n - r0);
            head_logits(&mut logits, h, w, (r0, c), d, v);
            let (lse, out) = (&mut lse[r0..r0 + c], &mut out[r0..r0 + c]);
            match (g, grads.as_mut()) {
                (Some(g), Some((dh, dw))) if g[r0..r0 + c].iter().any(|&x| x != 0.0) => {
                    let chunk = &mut logits[..c * v];
                    chunk_nll_to_grad(chunk, v, r0, g, &tg[r0..r0 + c], (lse, out));
                    let dw = dw.as_deref_mut();
                    head_grads_chunk(dh, dw, chunk, h, w, (r0, c), (d, v), first);
                    first = false;
                }
                _ => chunk_nll(&logits[..c * v], v, &tg[r0..r0 + c], lse, out),
            }
        }
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        *self.grads.lock().unwrap_or_else(|e| e.into_inner()) = grads;
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (h, w) = (h.detach().contiguous()?, w.detach().contiguous()?);
        let targets = targets.contiguous()?.to_vec1::<u32>()?;
        let g = grad.contiguous()?.to_vec1::<f32>()?;
        let (n, d) = h.dims2()?;
        let v = w.dim(0)?;
        // The forward's gradients hold when the gradient that came back is the one announced.
        let announced = self.row_grad.as_deref().is_some_and(|a| {
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            a.len() == g.len()
                && a.iter()
                    .zip(&g)
                    .all(|(a, b)| (a - b).abs() <= 1e-6 * scale + f32::MIN_POSITIVE)
        });
        let stored = self.grads.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (dh, dw) = match stored {
            Some(grads) if announced => grads,
            _ => {
                let mut lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if lse.len() != n {
                    lse.clear();
                }
                with_f32(&h, self.name(), |hv| {
                    with_f32(&w, self.name(), |wv| {
                        let wg = self.weight_grad;
                        Ok(head_grads(hv, wv, &targets, &g, &lse, (n, d, v), wg))
                    })
                })?
            }
        };
        let dw = dw
            .map(|dw| Tensor::from_vec(dw, (v, d), &Device::Cpu))
            .transpose()?;
        Ok((Some(Tensor::from_vec(dh, (n, d), &Device::Cpu)?), dw, None))
    }
}

/// Fused `-log_softmax(h @ w^T)[i, targets[i]]` for h [n, d] and a head weight w [v, d], f32 on
/// the CPU -> [n]; gradients flow to h and w. Peak memory is one chunk of logits, not [n, v].
///
/// `row_grad`: the gradient the caller's loss will send back to each row (e.g. its weight in a
/// weighted mean), when known. The forward then computes the input gradients while it holds
/// each chunk's logits, and the backward returns them (or recomputes, if another gradient
/// comes back): three matrix products instead of four.
pub fn lm_head_nll(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    row_grad: Option<Vec<f32>>,
) -> Result<Tensor> {
    let h = h.contiguous()?;
    let w = w.contiguous()?;
    let targets = targets.contiguous()?;
    h.apply_op3(
        &w,
        &targets,
        LmHeadNll {
            lse: Mutex::new(Vec::new()),
            row_grad,
            weight_grad: w.track_op(),
            grads: Mutex::new(None),
        },
    )
}

/// Elementwise `f(x)` over an f32 CPU tensor, in parallel chunks.
fn map_unary(
    s: &CpuStorage,
    l: &Layout,
    name: &str,
    f: impl Fn(f32) -> f32 + Sync,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_f32(s, l, name)?;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(16384)
        .zip(x.par_chunks(16384))
        .for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = f(v);
            }
        });
    Ok((CpuStorage::F32(out), l.shape().clone()))
}

/// Elementwise `f(x, g)` over two f32 CPU tensors of one shape, in parallel chunks.
fn map_binary(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    name: &str,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_f32(s1, l1, name)?;
    let g = contiguous_f32(s2, l2, name)?;
    if l1.dims() != l2.dims() {
        bail!("{name}: shape mismatch {:?} vs {:?}", l1.dims(), l2.dims());
    }
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(16384)
        .zip(x.par_chunks(16384))
        .zip(g.par_chunks(16384))
        .for_each(|((o, x), g)| {
            for ((o, &v), &gv) in o.iter_mut().zip(x).zip(g) {
                *o = f(v, gv);
            }
        });
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

// ------------------------------------------------------------------------------------------
// gelu_new (the tanh approximation): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044715;

/// tanh through one `exp`: 1 - 2 / (exp(2u) + 1). |u| >= 10 gives +-1 (as f32 tanh does).
#[inline]
fn tanh_via_exp(u: f32) -> f32 {
    1.0 - 2.0 / (fast_exp(2.0 * u.clamp(-10.0, 10.0)) + 1.0)
}

struct GeluNew;

impl CustomOp1 for GeluNew {
    fn name(&self) -> &'static str {
        "fused-gelu-new"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_unary(s, l, self.name(), |v| {
            0.5 * v * (1.0 + tanh_via_exp(SQRT_2_OVER_PI * v * (1.0 + GELU_A * v * v)))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = arg.contiguous()?;
        let g = grad.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&g, &GeluNewBwd)?))
    }
}

/// d gelu_new(x) / dx * g, for (x, g).
struct GeluNewBwd;

impl CustomOp2 for GeluNewBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-new-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_binary(s1, l1, s2, l2, self.name(), |v, gv| {
            let v2 = v * v;
            let t = tanh_via_exp(SQRT_2_OVER_PI * v * (1.0 + GELU_A * v2));
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_A * v2);
            gv * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du)
        })
    }
}

/// Fused gelu_new (tanh approximation, as `Tensor::gelu`) on an f32 CPU tensor.
pub fn gelu_new(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluNew)
}

// ------------------------------------------------------------------------------------------
// silu: x * sigmoid(x)

struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "fused-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        map_unary(s, l, self.name(), |v| v / (1.0 + fast_exp(-v)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let x = arg.contiguous()?;
        let g = grad.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&g, &SiluBwd)?))
    }
}

/// d silu(x) / dx * g = g * s * (1 + x * (1 - s)) with s = sigmoid(x), for (x, g).
struct SiluBwd;

impl CustomOp2 for SiluBwd {
    fn name(&self) -> &'static str {
        "fused-silu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_binary(s1, l1, s2, l2, self.name(), |v, gv| {
            let s = 1.0 / (1.0 + fast_exp(-v));
            gv * s * (1.0 + v * (1.0 - s))
        })
    }
}

/// Fused silu on an f32 CPU tensor.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Silu)
}

// ------------------------------------------------------------------------------------------
// SwiGLU: silu(gate) * up

/// `silu(gate) * up` as one node: the backward reads gate and up once and writes both
/// gradients in the same pass, where silu then a product were two nodes, four gradient
/// tensors and two products.
struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        map_binary(s1, l1, s2, l2, self.name(), |g, u| {
            g / (1.0 + fast_exp(-g)) * u
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = swiglu_grads(gate, up, grad)?;
        Ok((Some(dg), Some(du)))
    }
}

/// `silu(gate) * up` for f32 CPU tensors of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// The gradients (d gate, d up) of [`swiglu`] for the output gradient `grad`, in one pass:
/// with s = sigmoid(gate), d up = grad * gate * s and d gate = grad * up * s * (1 + gate (1 - s)).
pub fn swiglu_grads(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let (gate, up, grad) = (gate.contiguous()?, up.contiguous()?, grad.contiguous()?);
    if gate.dims() != up.dims() || gate.dims() != grad.dims() {
        bail!(
            "fused-swiglu-bwd: gate {:?}, up {:?}, grad {:?}",
            gate.dims(),
            up.dims(),
            grad.dims()
        );
    }
    let n = gate.elem_count();
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
    with_f32(&gate, "fused-swiglu-bwd", |gs| {
        with_f32(&up, "fused-swiglu-bwd", |us| {
            with_f32(&grad, "fused-swiglu-bwd", |hs| {
                const CHUNK: usize = 16384;
                dg.par_chunks_mut(CHUNK)
                    .zip(du.par_chunks_mut(CHUNK))
                    .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK)))
                    .zip(hs.par_chunks(CHUNK))
                    .for_each(|(((dg, du), (gs, us)), hs)| {
                        for i in 0..dg.len() {
                            let (g, u, h) = (gs[i], us[i], hs[i]);
                            let s = 1.0 / (1.0 + fast_exp(-g));
                            du[i] = h * g * s;
                            dg[i] = h * u * s * (1.0 + g * (1.0 - s));
                        }
                    });
                Ok(())
            })
        })
    })?;
    let dev = Device::Cpu;
    Ok((
        Tensor::from_vec(dg, gate.shape(), &dev)?,
        Tensor::from_vec(du, gate.shape(), &dev)?,
    ))
}

// ------------------------------------------------------------------------------------------
// x @ W (+ b) over any leading dims, as one graph node

/// `x @ w + b` with `w` stored (in, out) (GPT-2 `Conv1D`), or `x @ w^T + b` with `w` stored
/// (out, in) (`transposed`, PyTorch `Linear`). One node instead of reshape / matmul /
/// broadcast_add / reshape, so the backward pass accumulates three gradients instead of eight.
struct FusedLinear {
    transposed: bool,
}

impl FusedLinear {
    fn dims(&self, x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
        let (n, k) = last_dim(x)?;
        let &[w0, w1] = w.dims() else {
            bail!("fused linear: weight must be 2-d")
        };
        let (wk, out) = if self.transposed { (w1, w0) } else { (w0, w1) };
        if wk != k {
            bail!("fused linear: input dim {k} vs weight {:?}", w.dims())
        }
        Ok((n, k, out))
    }

    fn fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (n, k, out) = self.dims(xl, wl)?;
        if !xl.is_contiguous() {
            bail!("fused linear: expected a contiguous input")
        }
        let x2 = Layout::contiguous_with_offset((n, k), xl.start_offset());
        let w2 = if self.transposed {
            wl.transpose(0, 1)?
        } else {
            wl.clone()
        };
        let y = xs.matmul(ws, (1, n, out, k), &x2, &w2)?;
        let mut y = match y {
            CpuStorage::F32(v) => v,
            _ => bail!("fused linear: f32 only"),
        };
        if let Some(b) = bias {
            if b.len() != out {
                bail!("fused linear: bias length {} vs {out}", b.len())
            }
            y.par_chunks_mut(out * rows_per_task(out)).for_each(|rows| {
                for row in rows.chunks_exact_mut(out) {
                    for (v, &bv) in row.iter_mut().zip(b) {
                        *v += bv;
                    }
                }
            });
        }
        let mut dims = xl.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    /// (dx, dw, grad as [n, out]) for `grad` of the output; dx or dw is None when its input
    /// takes no gradient (a frozen weight, a detached input), and then is not computed.
    fn grads(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<LinearGrads> {
        let (want_dx, want_dw) = (x.track_op(), w.track_op());
        let (x, w) = (x.detach(), w.detach());
        let k = x.dim(candle_core::D::Minus1)?;
        let out = grad.dim(candle_core::D::Minus1)?;
        let n = x.elem_count() / k.max(1);
        let g2 = grad.reshape((n, out))?;
        let x2 = x.reshape((n, k))?;
        let dx = match (want_dx, self.transposed) {
            (false, _) => None,
            (true, true) => Some(g2.matmul(&w)?.reshape(x.shape())?),
            (true, false) => Some(g2.matmul(&w.t()?)?.reshape(x.shape())?),
        };
        let dw = match (want_dw, self.transposed) {
            (false, _) => None,
            (true, true) => Some(x2.t()?.matmul(&g2)?.t()?),
            (true, false) => Some(x2.t()?.matmul(&g2)?),
        };
        Ok((dx, dw, g2))
    }
}

type LinearGrads = (Option<Tensor>, Option<Tensor>, Tensor);

/// Column sums of a [n, out] tensor (the bias gradient), f32 CPU.
fn col_sum(g2: &Tensor) -> Result<Tensor> {
    let g2 = g2.contiguous()?;
    let (n, out) = g2.dims2()?;
    let acc = with_f32(&g2, "bias grad", |g| {
        let mut acc = vec![0f32; out];
        for row in g.chunks_exact(out).take(n) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        Ok(acc)
    })?;
    Tensor::from_vec(acc, out, g2.device())
}

impl CustomOp2 for FusedLinear {
    fn name(&self) -> &'static str {
        "sani-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(s1, l1, s2, l2, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        "sani-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let b = contiguous_f32(s3, l3, "fused linear bias")?;
        self.fwd(s1, l1, s2, l2, Some(b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, g2) = self.grads(x, w, grad)?;
        let db = b.track_op().then(|| col_sum(&g2)).transpose()?;
        Ok((dx, dw, db))
    }
}

/// `x @ w (+ b)`, w stored (in, out); x f32 CPU with any leading dims.
pub fn conv1d(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, w, b, false)
}

/// `x @ w^T (+ b)`, w stored (out, in); x f32 CPU with any leading dims.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, w, b, true)
}

fn linear_impl(x: &Tensor, w: &Tensor, b: Option<&Tensor>, transposed: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = FusedLinear { transposed };
    match b {
        Some(b) => x.apply_op3(w, b, op),
        None => x.apply_op2(w, op),
    }
}

// ------------------------------------------------------------------------------------------
// a frozen projection held in 16 bits

/// `x W^T + b` (`x W + b` for a weight stored (in, out)) for a frozen W in f32, bf16 or f16
/// and a frozen b, both held by the op: the only input is x, and the backward returns dx,
/// widening W again instead of keeping an f32 copy alive between the passes.
struct FrozenLinear {
    base: FusedLinear,
    w: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// `x W^T + b` as [`FusedLinear`] computes it, W widened for this pass.
    fn forward(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = widened(&self.w)?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            bail!("sani: frozen weights on the CPU only")
        };
        let bias = match &self.bias {
            Some(t) => Some(t.contiguous()?.to_vec1::<f32>()?),
            None => None,
        };
        self.base.fwd(xs, xl, ws, wl, bias.as_deref())
    }

    /// The input's gradient `g W` (`g W^T` for a weight stored (in, out)) for `g2` [n, out].
    fn input_grad(&self, g2: &Tensor) -> Result<Tensor> {
        let w = widened(&self.w)?;
        match self.base.transposed {
            true => g2.matmul(&w),
            false => g2.matmul(&w.t()?),
        }
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "sani-frozen-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.forward(xs, xl)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let k = x.dim(candle_core::D::Minus1)?;
        let out = grad.dim(candle_core::D::Minus1)?;
        let n = x.elem_count() / k.max(1);
        let dx = self.input_grad(&grad.reshape((n, out))?)?;
        Ok(Some(dx.reshape(x.shape())?))
    }
}

/// `x @ w^T (+ b)` (`transposed`, w stored (out, in)) or `x @ w (+ b)` for a frozen `w` in f32,
/// bf16 or f16 and a frozen f32 `b`; x f32 CPU with any leading dims. Gradients flow to x only.
pub fn frozen_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    transposed: bool,
) -> Result<Tensor> {
    let op = FrozenLinear {
        base: FusedLinear { transposed },
        w: w.detach().contiguous()?,
        bias: bias.map(|b| b.detach()),
    };
    x.contiguous()?.apply_op1(op)
}

// ------------------------------------------------------------------------------------------
// a frozen projection with a LoRA adapter, as one graph node

/// `x W^T + b + s (x A^T) B^T` (`x W + ...` for a weight stored (in, out)), where W and b are
/// frozen and held by the op instead of being graph inputs: the inputs are x, A [r, in] and
/// B [out, r], and the backward returns dx, dA and dB. Composed, the adapter's path keeps three
/// [n, out] tensors per projection alive for the backward pass; here only x is needed.
struct LoraLinear {
    frozen: FrozenLinear,
    scale: f32,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "sani-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, shape) = self.frozen.forward(xs, xl)?;
        let adapter = FusedLinear { transposed: true };
        let (low, low_shape) = adapter.fwd(xs, xl, a, al, None)?;
        let (up, _) = adapter.fwd(&low, &Layout::contiguous(low_shape), b, bl, None)?;
        let (CpuStorage::F32(mut y), CpuStorage::F32(up)) = (y, up) else {
            bail!("{}: f32 only", self.name())
        };
        let scale = self.scale;
        y.par_chunks_mut(16384)
            .zip(up.par_chunks(16384))
            .for_each(|(y, u)| {
                for (y, &u) in y.iter_mut().zip(u) {
                    *y += scale * u;
                }
            });
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let k = x.dim(candle_core::D::Minus1)?;
        let out = grad.dim(candle_core::D::Minus1)?;
        let n = x.elem_count() / k.max(1);
        let g2 = grad.reshape((n, out))?;
        let x2 = x.reshape((n, k))?;
        let s = self.scale as f64;
        // gradient at the adapter's rank-r bottleneck
        let g_low = (g2.matmul(&b)? * s)?;
        let dx = (self.frozen.input_grad(&g2)? + g_low.matmul(&a)?)?.reshape(x.shape())?;
        let da = g_low.t()?.matmul(&x2)?;
        let low = x2.matmul(&a.t()?)?;
        let db = (g2.t()?.matmul(&low)? * s)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `w` in f32: itself when it is f32, else a widened copy of a bf16 or f16 weight, converted
/// in parallel (a frozen weight held in its stored dtype costs one such copy per projection
/// at a time, and a conversion per pass that is small beside the matmul: n = batch x seq
/// multiply-adds per element).
fn widened(w: &Tensor) -> Result<Tensor> {
    let w = w.detach().contiguous()?;
    if w.dtype() == DType::F32 {
        return Ok(w);
    }
    let (st, l) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*st else {
        bail!("sani: frozen weights on the CPU only")
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
    let mut out = vec![0f32; b - a];
    match cpu {
        CpuStorage::BF16(v) => out
            .par_chunks_mut(16384)
            .zip(v[a..b].par_chunks(16384))
            .for_each(|(o, v)| o.iter_mut().zip(v).for_each(|(o, v)| *o = v.to_f32())),
        CpuStorage::F16(v) => out
            .par_chunks_mut(16384)
            .zip(v[a..b].par_chunks(16384))
            .for_each(|(o, v)| o.iter_mut().zip(v).for_each(|(o, v)| *o = v.to_f32())),
        _ => bail!("sani: a frozen weight of dtype {:?}", w.dtype()),
    }
    drop(st);
    Tensor::from_vec(out, w.shape(), w.device())
}

/// `x W^T + b + scale (x A^T) B^T` for a frozen W stored (out, in) (`transposed`) or (in, out),
/// A [r, in] and B [out, r] trainable; x f32 CPU with any leading dims; W in f32, bf16 or f16.
/// Gradients flow to x, A and B.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    transposed: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = LoraLinear {
        frozen: FrozenLinear {
            base: FusedLinear { transposed },
            w: w.contiguous()?,
            bias: bias.cloned(),
        },
        scale: scale as f32,
    };
    x.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = fast_exp(x) as f64;
            let ulp = (want as f32).to_bits() as f64;
            let ulps = ((got as f32).to_bits() as f64 - ulp).abs();
            worst = worst.max(ulps);
            x += 0.000_37;
        }
        assert!(worst <= 2.0, "fast_exp off by {worst} ulp");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!((0.0..1.3e-38).contains(&fast_exp(-1000.0)));
        assert!(fast_exp(1000.0).is_finite() && fast_exp(1000.0) > 1e38);
    }
}
