//! Fused rotary position embedding (HF's non-interleaved layout) with a backward pass, reading a
//! projection's output [b, t, n * d] and writing the heads out as [b, n, t, d]: one graph node
//! instead of the reshape, transpose, two narrows, neg, cat, two multiplies and an add.

use super::contiguous_f32;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// `y = x * cos + rotate_half(x) * sin` per head, with (for j < d/2):
/// `y[j] = x[j] cos[j] - x[j + d/2] sin[j]`, `y[j + d/2] = x[j + d/2] cos[j + d/2] + x[j] sin[j + d/2]`.
struct Rope(Arc<RopeTables>);

/// The head count and the [b, t, d] cos/sin values (contiguous, no gradient), shared by the
/// forward op and its backward.
struct RopeTables {
    heads: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl std::ops::Deref for Rope {
    type Target = RopeTables;
    fn deref(&self) -> &RopeTables {
        &self.0
    }
}

impl Rope {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize)> {
        let (b, t, w) = l.shape().dims3()?;
        let d = w / self.heads.max(1);
        if d * self.heads != w || !d.is_multiple_of(2) || self.cos.len() != b * t * d {
            bail!(
                "fused rope: input {:?} with {} heads does not fit cos/sin of {} values",
                l.dims(),
                self.heads,
                self.cos.len()
            );
        }
        Ok((b, t, d))
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (b, t, d) = self.dims(l)?;
        let n = self.heads;
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        // One task per (batch row, head): out[bi, hi] is t x d contiguous.
        out.par_chunks_mut(t * d).enumerate().for_each(|(task, o)| {
            let (bi, hi) = (task / n, task % n);
            for ti in 0..t {
                let xr = &x[((bi * t + ti) * n + hi) * d..][..d];
                let c = &self.cos[(bi * t + ti) * d..][..d];
                let s = &self.sin[(bi * t + ti) * d..][..d];
                let y = &mut o[ti * d..][..d];
                for j in 0..half {
                    y[j] = xr[j] * c[j] - xr[j + half] * s[j];
                    y[j + half] = xr[j + half] * c[j + half] + xr[j] * s[j + half];
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n, t, d))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = RopeBwd(self.0.clone());
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The gradient [b, t, n * d] of the input from the output gradient [b, n, t, d].
struct RopeBwd(Arc<RopeTables>);

impl std::ops::Deref for RopeBwd {
    type Target = RopeTables;
    fn deref(&self) -> &RopeTables {
        &self.0
    }
}

impl CustomOp1 for RopeBwd {
    fn name(&self) -> &'static str {
        "fused-rope-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s, l, self.name())?;
        let (b, n, t, d) = l.shape().dims4()?;
        if n != self.heads || !d.is_multiple_of(2) || self.cos.len() != b * t * d {
            bail!("{}: gradient {:?} does not fit", self.name(), l.dims());
        }
        let half = d / 2;
        let mut dx = vec![0f32; g.len()];
        // One task per (batch row, position): dx[bi, ti] is n * d contiguous.
        dx.par_chunks_mut(n * d)
            .enumerate()
            .for_each(|(task, row)| {
                let (bi, ti) = (task / t, task % t);
                let c = &self.cos[(bi * t + ti) * d..][..d];
                let s = &self.sin[(bi * t + ti) * d..][..d];
                for hi in 0..n {
                    let gr = &g[((bi * n + hi) * t + ti) * d..][..d];
                    let o = &mut row[hi * d..][..d];
                    for j in 0..half {
                        o[j] = gr[j] * c[j] + gr[j + half] * s[j + half];
                        o[j + half] = gr[j + half] * c[j + half] - gr[j] * s[j];
                    }
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((b, t, n * d))))
    }
}

/// Rotary embedding of a projection's output `x` [b, t, heads * d] (f32, CPU), returned as
/// heads [b, heads, t, d]; `cos`/`sin` hold [b, t, d] values (any shape with that many, e.g.
/// [b, 1, t, d]) and get no gradient.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let cos = cos.flatten_all()?.to_vec1::<f32>()?;
    let sin = sin.flatten_all()?.to_vec1::<f32>()?;
    x.contiguous()?
        .apply_op1(Rope(Arc::new(RopeTables { heads, cos, sin })))
}

/// The gradient [b, t, heads * d] of [`rope_heads`]' input from its output gradient `grad`
/// [b, heads, t, d], for the same `cos` / `sin`.
pub fn rope_heads_grad(grad: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let cos = cos.flatten_all()?.to_vec1::<f32>()?;
    let sin = sin.flatten_all()?.to_vec1::<f32>()?;
    grad.contiguous()?
        .apply_op1_no_bwd(&RopeBwd(Arc::new(RopeTables { heads, cos, sin })))
}
