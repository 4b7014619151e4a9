//! Fused scaled dot-product attention with an additive mask and grouped key/value heads, forward
//! and backward, without materializing the [b, h, t, s] score and probability tensors.
//!
//! One rayon task per (batch row, head) in the forward and per (batch row, key/value head) in the
//! backward. Queries are processed in tiles; a tile only reads the keys up to the last one any of
//! its rows can see (half the work under a causal mask). The backward recomputes the tile's
//! probabilities from q and k instead of keeping them from the forward pass.
//!
//! q/k/v may be strided views (e.g. heads transposed out of [b, t, h, d]); only the last dim
//! must be contiguous. The output is [b, t, h * d], the layout the output projection reads.

use super::{exp_shift_sum, max, with_f32};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Query rows per tile.
const TILE: usize = 64;

/// A rank-4 f32 view [d0, d1, rows, cols] with a contiguous last dim.
#[derive(Clone, Copy)]
struct View4 {
    ptr: *const f32,
    dims: [usize; 4],
    strides: [usize; 4],
}

// SAFETY: a View4 only points into storage that the op borrows for its whole run, and it is read
// concurrently, never written through.
unsafe impl Send for View4 {}
unsafe impl Sync for View4 {}

impl View4 {
    fn new(data: &[f32], l: &Layout, what: &str) -> Result<Self> {
        let dims: [usize; 4] = l
            .dims()
            .try_into()
            .map_err(|_| candle_core::Error::Msg(format!("{what}: expected a rank-4 tensor")))?;
        let st = l.stride();
        if dims[3] > 1 && st[3] != 1 {
            bail!("{what}: the last dim must be contiguous");
        }
        let strides = [st[0], st[1], st[2], 1];
        let last = l.start_offset()
            + dims
                .iter()
                .zip(strides)
                .map(|(&n, s)| n.saturating_sub(1) * s)
                .sum::<usize>();
        if dims.iter().all(|&n| n > 0) && last >= data.len() {
            bail!("{what}: layout out of bounds");
        }
        Ok(View4 {
            // SAFETY: start_offset is within data (checked above when non-empty).
            ptr: unsafe { data.as_ptr().add(l.start_offset().min(data.len())) },
            dims,
            strides,
        })
    }

    /// The [rows, cols] matrix (i, j) and its row stride.
    fn mat(&self, i: usize, j: usize) -> *const f32 {
        // SAFETY: in bounds for i < dims[0], j < dims[1] (checked in `new`).
        unsafe { self.ptr.add(i * self.strides[0] + j * self.strides[1]) }
    }

    fn rs(&self) -> isize {
        self.strides[2] as isize
    }
}

/// A pointer to an output buffer that tasks write disjoint parts of.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of elements (see the call sites).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method, so closures capture the whole (Sync) wrapper rather than the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst[m x n] = scale * lhs[m x k] . rhs[k x n]` (or `+=` with `accumulate`); strides are
/// (row, column) in elements, dst has contiguous rows.
///
/// # Safety
/// All pointers must be valid for the given shapes and strides; dst must not alias lhs or rhs.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const f32, isize, isize),
    (rhs, rhs_rs, rhs_cs): (*const f32, isize, isize),
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.offset(i as isize * dst_rs), n).fill(0.0);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        1.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// Shapes shared by the forward and backward kernels.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kvh: usize,
    t: usize,
    s: usize,
    d: usize,
    mask_b: usize,
}

impl Dims {
    fn check(q: &View4, k: &View4, v: &View4, mask: &Layout) -> Result<Self> {
        let [b, h, t, d] = q.dims;
        let [kb, kvh, s, kd] = k.dims;
        if k.dims != v.dims || kb != b || kd != d || kvh == 0 || h % kvh != 0 {
            bail!(
                "fused attention: q {:?}, k {:?}, v {:?} do not fit (k/v heads must divide q heads)",
                q.dims,
                k.dims,
                v.dims
            );
        }
        let (mb, m1, mt, ms) = mask.shape().dims4()?;
        if m1 != 1 || mt != t || ms != s || !(mb == b || mb == 1) {
            bail!(
                "fused attention: mask {:?} does not fit q {:?} / k {:?}",
                mask.dims(),
                q.dims,
                k.dims
            );
        }
        Ok(Dims {
            b,
            h,
            kvh,
            t,
            s,
            d,
            mask_b: mb,
        })
    }
}

/// For each query row, how many leading keys it must read: one past its last visible key, or
/// all keys when it sees none (a fully masked row softmaxes uniformly over all of them).
fn key_extents(mask: &[f32], dims: &Dims) -> Vec<usize> {
    let s = dims.s;
    mask.chunks_exact(s.max(1))
        .map(|row| {
            row.iter()
                .rposition(|&m| m > f32::MIN / 2.0)
                .map_or(s, |j| j + 1)
        })
        .collect()
}

/// The probabilities of query rows [i0, i1) of head (bi, hi) over their first `ext` keys, into
/// `p` (row stride `ext`).
#[allow(clippy::too_many_arguments)]
fn tile_probs(
    q: &View4,
    k: &View4,
    mask: &[f32],
    dims: &Dims,
    (bi, hi): (usize, usize),
    (i0, i1): (usize, usize),
    ext: usize,
    scale: f32,
    p: &mut [f32],
) {
    let rows = i1 - i0;
    let kv = hi / (dims.h / dims.kvh);
    // SAFETY: q rows i0..i1 and k rows 0..ext exist; p holds rows * ext elements.
    unsafe {
        matmul(
            (rows, ext, dims.d),
            p.as_mut_ptr(),
            ext as isize,
            false,
            (q.mat(bi, hi).offset(i0 as isize * q.rs()), q.rs(), 1),
            (k.mat(bi, kv), 1, k.rs()),
            scale,
        );
    }
    let mrows = &mask[(bi % dims.mask_b) * dims.t * dims.s..];
    for (r, row) in p[..rows * ext].chunks_exact_mut(ext).enumerate() {
        let mrow = &mrows[(i0 + r) * dims.s..][..ext];
        for (x, &m) in row.iter_mut().zip(mrow) {
            *x += m;
        }
        let mx = max(row);
        let inv = 1.0 / exp_shift_sum(row, mx);
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// Query tiles with the number of keys each reads.
fn tiles(extents: &[usize], bi: usize, dims: &Dims) -> Vec<(usize, usize, usize)> {
    let rows = &extents[(bi % dims.mask_b) * dims.t..][..dims.t];
    (0..dims.t)
        .step_by(TILE)
        .map(|i0| {
            let i1 = (i0 + TILE).min(dims.t);
            let ext = rows[i0..i1].iter().copied().max().unwrap_or(dims.s);
            (i0, i1, ext)
        })
        .collect()
}

struct Attention {
    mask: Tensor,
    scale: f32,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let q = View4::new(s1.as_slice::<f32>()?, l1, "fused attention q")?;
        let k = View4::new(s2.as_slice::<f32>()?, l2, "fused attention k")?;
        let v = View4::new(s3.as_slice::<f32>()?, l3, "fused attention v")?;
        let (mask_guard, mask_layout) = self.mask.storage_and_layout();
        let dims = Dims::check(&q, &k, &v, mask_layout)?;
        let Dims { b, h, t, d, .. } = dims;
        drop(mask_guard);
        let mut out = vec![0f32; b * t * h * d];
        with_f32(&self.mask, "fused attention mask", |mask| {
            let extents = key_extents(mask, &dims);
            let dst = OutPtr(out.as_mut_ptr());
            (0..b * h).into_par_iter().for_each(|task| {
                let (bi, hi) = (task / h, task % h);
                let kv = hi / (h / dims.kvh);
                let mut p = vec![0f32; TILE.min(t) * dims.s];
                for (i0, i1, ext) in tiles(&extents, bi, &dims) {
                    tile_probs(
                        &q,
                        &k,
                        mask,
                        &dims,
                        (bi, hi),
                        (i0, i1),
                        ext,
                        self.scale,
                        &mut p,
                    );
                    // SAFETY: this task alone writes columns hi*d..(hi+1)*d of rows (bi, i0..i1).
                    unsafe {
                        let o = dst.get().add((bi * t + i0) * h * d + hi * d);
                        matmul(
                            (i1 - i0, d, ext),
                            o,
                            (h * d) as isize,
                            false,
                            (p.as_ptr(), ext as isize, 1),
                            (v.mat(bi, kv), v.rs(), 1),
                            1.0,
                        );
                    }
                }
            });
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = grad.contiguous()?.apply_op1_no_bwd(&AttentionBwd {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            mask: self.mask.clone(),
            scale: self.scale,
        })?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        Ok((
            Some(packed.narrow(0, 0, nq)?.reshape(q.shape())?),
            Some(packed.narrow(0, nq, nk)?.reshape(k.shape())?),
            Some(packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?),
        ))
    }
}

/// The gradients (dq, dk, dv) packed into one flat tensor, from the output gradient [b, t, h*d].
struct AttentionBwd {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    scale: f32,
}

impl CustomOp1 for AttentionBwd {
    fn name(&self) -> &'static str {
        "fused-attention-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = super::contiguous_f32(s, l, self.name())?;
        let guards = [&self.q, &self.k, &self.v].map(|t| t.storage_and_layout());
        let mut views = Vec::with_capacity(3);
        for ((st, lay), what) in guards.iter().zip(["q", "k", "v"]) {
            let Storage::Cpu(cs) = &**st else {
                bail!("fused attention bwd: CPU tensors only ({what})")
            };
            views.push(View4::new(cs.as_slice::<f32>()?, lay, what)?);
        }
        let (q, k, v) = (views[0], views[1], views[2]);
        let dims = {
            let (_g, ml) = self.mask.storage_and_layout();
            Dims::check(&q, &k, &v, ml)?
        };
        let Dims {
            b, h, kvh, t, s, d, ..
        } = dims;
        if g.len() != b * t * h * d {
            bail!(
                "{}: gradient has {} elements, expected {}",
                self.name(),
                g.len(),
                b * t * h * d
            );
        }
        let rep = h / kvh;
        let (nq, nk) = (b * h * t * d, b * kvh * s * d);
        let mut packed = vec![0f32; nq + 2 * nk];
        let (dq, rest) = packed.split_at_mut(nq);
        let (dk, dv) = rest.split_at_mut(nk);
        let scale = self.scale;
        with_f32(&self.mask, "fused attention mask", |mask| {
            let extents = key_extents(mask, &dims);
            dq.par_chunks_mut(rep * t * d)
                .zip(dk.par_chunks_mut(s * d))
                .zip(dv.par_chunks_mut(s * d))
                .enumerate()
                .for_each(|(task, ((dq, dk), dv))| {
                    let (bi, kv) = (task / kvh, task % kvh);
                    let mut p = vec![0f32; TILE.min(t) * s];
                    let mut dp = vec![0f32; TILE.min(t) * s];
                    let tiles = tiles(&extents, bi, &dims);
                    for r in 0..rep {
                        let hi = kv * rep + r;
                        for &(i0, i1, ext) in &tiles {
                            let rows = i1 - i0;
                            tile_probs(&q, &k, mask, &dims, (bi, hi), (i0, i1), ext, scale, &mut p);
                            // SAFETY: g rows (bi, i0..i1), head hi; v/k/q as in the forward;
                            // dk, dv, dq are this task's own chunks.
                            unsafe {
                                let g_tile = g.as_ptr().add((bi * t + i0) * h * d + hi * d);
                                let g_rs = (h * d) as isize;
                                // dv += p^T g
                                matmul(
                                    (ext, d, rows),
                                    dv.as_mut_ptr(),
                                    d as isize,
                                    true,
                                    (p.as_ptr(), 1, ext as isize),
                                    (g_tile, g_rs, 1),
                                    1.0,
                                );
                                // dp = g v^T
                                matmul(
                                    (rows, ext, d),
                                    dp.as_mut_ptr(),
                                    ext as isize,
                                    false,
                                    (g_tile, g_rs, 1),
                                    (v.mat(bi, kv), 1, v.rs()),
                                    1.0,
                                );
                            }
                            // ds = p * (dp - sum(p * dp)), kept in dp
                            for (pr, dpr) in p[..rows * ext]
                                .chunks_exact(ext)
                                .zip(dp[..rows * ext].chunks_exact_mut(ext))
                            {
                                let c = super::dot(pr, dpr);
                                for (x, &pv) in dpr.iter_mut().zip(pr) {
                                    *x = pv * (*x - c);
                                }
                            }
                            // SAFETY: as above.
                            unsafe {
                                // dq = scale * ds k
                                matmul(
                                    (rows, d, ext),
                                    dq.as_mut_ptr().add((r * t + i0) * d),
                                    d as isize,
                                    false,
                                    (dp.as_ptr(), ext as isize, 1),
                                    (k.mat(bi, kv), k.rs(), 1),
                                    scale,
                                );
                                // dk += scale * ds^T q
                                matmul(
                                    (ext, d, rows),
                                    dk.as_mut_ptr(),
                                    d as isize,
                                    true,
                                    (dp.as_ptr(), 1, ext as isize),
                                    (q.mat(bi, hi).offset(i0 as isize * q.rs()), q.rs(), 1),
                                    scale,
                                );
                            }
                        }
                    }
                });
            Ok(())
        })?;
        drop(guards);
        Ok((CpuStorage::F32(packed), Shape::from(nq + 2 * nk)))
    }
}

/// Fused `softmax(q k^T * scale + mask) v` for f32 CPU tensors: q [b, h, t, d], k/v
/// [b, kvh, s, d] (kvh divides h; query head i reads key/value head i / (h / kvh)), mask
/// [b or 1, 1, t, s] (additive, no gradient). Returns [b, t, h * d].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let mask = mask.contiguous()?;
    q.apply_op3(
        k,
        v,
        Attention {
            mask,
            scale: scale as f32,
        },
    )
}
