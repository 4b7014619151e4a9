//! Fused scaled dot-product attention with an additive mask and grouped key/value heads, forward
//! and backward, without materializing the [b, h, t, s] score and probability tensors.
//!
//! One rayon task per (batch row, head) in the forward and per (batch row, key/value head) in the
//! backward. Queries are processed in tiles; a tile only reads the keys from the first to the last
//! one any of its rows can see (half the work under a causal mask; under the block-diagonal mask
//! of windows packed into one row, about the work of each window on its own). The backward
//! recomputes the tile's probabilities from q and k instead of keeping them from the forward pass.
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
        Self::checked(data, l.start_offset(), dims, [st[0], st[1], st[2], 1], what)
    }

    /// A [b, t, w] tensor seen as rank 4 ([b, t, w, 1]), to split into heads with `packed_part`.
    fn packed_base(data: &[f32], l: &Layout, what: &str) -> Result<Self> {
        let (b, t, w) = l.shape().dims3()?;
        let st = l.stride();
        if w > 1 && st[2] != 1 {
            bail!("{what}: the last dim must be contiguous");
        }
        Self::checked(
            data,
            l.start_offset(),
            [b, t, w, 1],
            [st[0], st[1], 1, 1],
            what,
        )
    }

    /// The view at `start` of `data`, after checking that its last element is inside `data`.
    fn checked(
        data: &[f32],
        start: usize,
        dims: [usize; 4],
        strides: [usize; 4],
        what: &str,
    ) -> Result<Self> {
        let last = start
            + dims
                .iter()
                .zip(strides)
                .map(|(&n, s)| n.saturating_sub(1) * s)
                .sum::<usize>();
        if dims.iter().all(|&n| n > 0) && last >= data.len() {
            bail!("{what}: layout out of bounds");
        }
        Ok(View4 {
            // SAFETY: start is within data (checked above when non-empty).
            ptr: unsafe { data.as_ptr().add(start.min(data.len())) },
            dims,
            strides,
        })
    }

    /// Head `part` of a packed [b, t, parts * h * d] tensor (GPT-2's fused q|k|v) as [b, h, t, d].
    fn packed_part(base: &View4, part: usize, h: usize) -> Result<Self> {
        let [b, t, w, _] = base.dims;
        let d = w / (3 * h);
        if w != 3 * h * d {
            bail!("fused attention: packed width {w} is not 3 x {h} heads");
        }
        Ok(View4 {
            // SAFETY: part * h * d < w, inside every row.
            ptr: unsafe { base.ptr.add(part * h * d) },
            dims: [b, h, t, d],
            strides: [base.strides[0], d, base.strides[1], 1],
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

/// Where a gradient goes: a [b, n, rows, d] strided view of an output buffer.
#[derive(Clone, Copy)]
struct Dest {
    ptr: OutPtr,
    strides: [usize; 3],
}

impl Dest {
    fn contiguous(buf: &mut [f32], n: usize, rows: usize, d: usize) -> Self {
        Dest {
            ptr: OutPtr(buf.as_mut_ptr()),
            strides: [n * rows * d, rows * d, d],
        }
    }

    /// Like `View4::packed_part`, for a packed [b, t, 3 * h * d] buffer.
    fn packed_part(buf: &mut [f32], part: usize, (t, h, d): (usize, usize, usize)) -> Self {
        Dest {
            // SAFETY: part * h * d is inside the first row.
            ptr: OutPtr(unsafe { buf.as_mut_ptr().add(part * h * d) }),
            strides: [t * 3 * h * d, d, 3 * h * d],
        }
    }

    /// Row `row` of matrix (i, j).
    ///
    /// # Safety
    /// The indices must be inside the view.
    unsafe fn row(&self, i: usize, j: usize, row: usize) -> *mut f32 {
        self.ptr
            .get()
            .add(i * self.strides[0] + j * self.strides[1] + row * self.strides[2])
    }

    fn rs(&self) -> isize {
        self.strides[2] as isize
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

/// For each query row, the keys it must read: from its first visible key to one past its last,
/// or all keys when it sees none (a fully masked row softmaxes uniformly over all of them).
fn key_ranges(mask: &[f32], dims: &Dims) -> Vec<(usize, usize)> {
    let s = dims.s;
    let visible = |m: &f32| *m > f32::MIN / 2.0;
    mask.chunks_exact(s.max(1))
        .map(|row| match row.iter().position(visible) {
            Some(lo) => (lo, row.iter().rposition(visible).map_or(s, |j| j + 1)),
            None => (0, s),
        })
        .collect()
}

/// The probabilities of the tile's query rows [i0, i1) of head (bi, hi) over its keys
/// [lo, lo + ext), into `p` (row stride `ext`).
#[allow(clippy::too_many_arguments)]
fn tile_probs(
    q: &View4,
    k: &View4,
    mask: &[f32],
    dims: &Dims,
    (bi, hi): (usize, usize),
    Tile { i0, i1, lo, ext }: Tile,
    scale: f32,
    p: &mut [f32],
) {
    let rows = i1 - i0;
    let kv = hi / (dims.h / dims.kvh);
    // SAFETY: q rows i0..i1 and k rows lo..lo+ext exist; p holds rows * ext elements.
    unsafe {
        matmul(
            (rows, ext, dims.d),
            p.as_mut_ptr(),
            ext as isize,
            false,
            (q.mat(bi, hi).offset(i0 as isize * q.rs()), q.rs(), 1),
            (k.mat(bi, kv).offset(lo as isize * k.rs()), 1, k.rs()),
            scale,
        );
    }
    let mrows = &mask[(bi % dims.mask_b) * dims.t * dims.s..];
    for (r, row) in p[..rows * ext].chunks_exact_mut(ext).enumerate() {
        let mrow = &mrows[(i0 + r) * dims.s + lo..][..ext];
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

/// A tile of query rows [i0, i1) and the keys [lo, lo + ext) that it reads.
#[derive(Clone, Copy)]
struct Tile {
    i0: usize,
    i1: usize,
    lo: usize,
    ext: usize,
}

/// Query tiles with the keys each reads.
fn tiles(ranges: &[(usize, usize)], bi: usize, dims: &Dims) -> Vec<Tile> {
    let rows = &ranges[(bi % dims.mask_b) * dims.t..][..dims.t];
    (0..dims.t)
        .step_by(TILE)
        .map(|i0| {
            let i1 = (i0 + TILE).min(dims.t);
            let lo = rows[i0..i1].iter().map(|r| r.0).min().unwrap_or(0);
            let hi = rows[i0..i1].iter().map(|r| r.1).max().unwrap_or(dims.s);
            Tile {
                i0,
                i1,
                lo,
                ext: hi - lo,
            }
        })
        .collect()
}

/// Attention over the views (see [`attention`]): the output [b, t, h * d].
fn forward(
    (q, k, v): (&View4, &View4, &View4),
    mask: &Tensor,
    dims: &Dims,
    scale: f32,
) -> Result<(CpuStorage, Shape)> {
    let mut out = vec![0f32; dims.b * dims.t * dims.h * dims.d];
    with_f32(mask, "fused attention mask", |mask| {
        forward_into(q, k, v, mask, dims, scale, &mut out);
        Ok(())
    })?;
    Ok((
        CpuStorage::F32(out),
        Shape::from((dims.b, dims.t, dims.h * dims.d)),
    ))
}

fn forward_into(
    q: &View4,
    k: &View4,
    v: &View4,
    mask: &[f32],
    dims: &Dims,
    scale: f32,
    out: &mut [f32],
) {
    let Dims { b, h, t, d, .. } = *dims;
    let ranges = key_ranges(mask, dims);
    let dst = OutPtr(out.as_mut_ptr());
    (0..b * h).into_par_iter().for_each(|task| {
        let (bi, hi) = (task / h, task % h);
        let kv = hi / (h / dims.kvh);
        let mut p = vec![0f32; TILE.min(t) * dims.s];
        for tile in tiles(&ranges, bi, dims) {
            let Tile { i0, i1, lo, ext } = tile;
            tile_probs(q, k, mask, dims, (bi, hi), tile, scale, &mut p);
            // SAFETY: this task alone writes columns hi*d..(hi+1)*d of rows (bi, i0..i1).
            unsafe {
                let o = dst.get().add((bi * t + i0) * h * d + hi * d);
                matmul(
                    (i1 - i0, d, ext),
                    o,
                    (h * d) as isize,
                    false,
                    (p.as_ptr(), ext as isize, 1),
                    (v.mat(bi, kv).offset(lo as isize * v.rs()), v.rs(), 1),
                    1.0,
                );
            }
        }
    });
}

/// Checks the output gradient `g` [b, t, h * d] and runs [`backward_into`] with the mask's data.
fn backward(
    views: (&View4, &View4, &View4),
    g: &[f32],
    mask: &Tensor,
    dims: &Dims,
    scale: f32,
    dests: (Dest, Dest, Dest),
) -> Result<()> {
    let expected = dims.b * dims.t * dims.h * dims.d;
    if g.len() != expected {
        bail!(
            "fused attention bwd: gradient of {} elements, expected {expected}",
            g.len()
        );
    }
    with_f32(mask, "fused attention mask", |mask| {
        backward_into(views, g, mask, dims, scale, dests);
        Ok(())
    })
}

/// Gradients of q, k and v from the output gradient `g` [b, t, h * d] (contiguous), written
/// through `dq`, `dk`, `dv`; dk and dv must start zeroed (they are accumulated over heads).
#[allow(clippy::too_many_arguments)]
fn backward_into(
    (q, k, v): (&View4, &View4, &View4),
    g: &[f32],
    mask: &[f32],
    dims: &Dims,
    scale: f32,
    (dq, dk, dv): (Dest, Dest, Dest),
) {
    let Dims {
        b, h, kvh, t, s, d, ..
    } = *dims;
    let rep = h / kvh;
    let ranges = key_ranges(mask, dims);
    (0..b * kvh).into_par_iter().for_each(|task| {
        let (bi, kv) = (task / kvh, task % kvh);
        let mut p = vec![0f32; TILE.min(t) * s];
        let mut dp = vec![0f32; TILE.min(t) * s];
        let tiles = tiles(&ranges, bi, dims);
        for hi in kv * rep..(kv + 1) * rep {
            for &tile in &tiles {
                let Tile { i0, i1, lo, ext } = tile;
                let rows = i1 - i0;
                tile_probs(q, k, mask, dims, (bi, hi), tile, scale, &mut p);
                // SAFETY: g rows (bi, i0..i1) of head hi exist; this task alone writes dq of
                // heads kv*rep.. (kv+1)*rep and dk, dv of head kv, for batch row bi.
                unsafe {
                    let g_tile = g.as_ptr().add((bi * t + i0) * h * d + hi * d);
                    let g_rs = (h * d) as isize;
                    // dv += p^T g
                    matmul(
                        (ext, d, rows),
                        dv.row(bi, kv, lo),
                        dv.rs(),
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
                        (v.mat(bi, kv).offset(lo as isize * v.rs()), 1, v.rs()),
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
                        dq.row(bi, hi, i0),
                        dq.rs(),
                        false,
                        (dp.as_ptr(), ext as isize, 1),
                        (k.mat(bi, kv).offset(lo as isize * k.rs()), k.rs(), 1),
                        scale,
                    );
                    // dk += scale * ds^T q
                    matmul(
                        (ext, d, rows),
                        dk.row(bi, kv, lo),
                        dk.rs(),
                        true,
                        (dp.as_ptr(), 1, ext as isize),
                        (q.mat(bi, hi).offset(i0 as isize * q.rs()), q.rs(), 1),
                        scale,
                    );
                }
            }
        }
    });
}

/// Borrows the f32 CPU storage of `t` and runs `f` on its strided 4-D view.
fn with_view4<R>(t: &Tensor, what: &str, f: impl FnOnce(View4) -> Result<R>) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*st else {
        bail!("{what}: CPU tensors only")
    };
    f(View4::new(cs.as_slice::<f32>()?, l, what)?)
}

/// q, k and v views of a packed [b, t, 3 * h * d] tensor (from `View4::packed_base`), checked
/// against the mask.
fn packed_qkv(qkv: &View4, h: usize, mask: &Tensor) -> Result<(View4, View4, View4, Dims)> {
    let (q, k, v) = (
        View4::packed_part(qkv, 0, h)?,
        View4::packed_part(qkv, 1, h)?,
        View4::packed_part(qkv, 2, h)?,
    );
    let dims = Dims::check(&q, &k, &v, mask.layout())?;
    Ok((q, k, v, dims))
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
        let dims = Dims::check(&q, &k, &v, self.mask.layout())?;
        forward((&q, &k, &v), &self.mask, &dims, self.scale)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = attention_grads(q, k, v, &self.mask, self.scale as f64, grad)?;
        Ok((Some(dq), Some(dk), Some(dv)))
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
        with_view4(&self.q, "q", |q| {
            with_view4(&self.k, "k", |k| {
                with_view4(&self.v, "v", |v| {
                    let dims = Dims::check(&q, &k, &v, self.mask.layout())?;
                    let Dims {
                        b, h, kvh, t, s, d, ..
                    } = dims;
                    let (nq, nk) = (b * h * t * d, b * kvh * s * d);
                    let mut packed = vec![0f32; nq + 2 * nk];
                    let (dq, rest) = packed.split_at_mut(nq);
                    let (dk, dv) = rest.split_at_mut(nk);
                    let dests = (
                        Dest::contiguous(dq, h, t, d),
                        Dest::contiguous(dk, kvh, s, d),
                        Dest::contiguous(dv, kvh, s, d),
                    );
                    backward((&q, &k, &v), g, &self.mask, &dims, self.scale, dests)?;
                    Ok((CpuStorage::F32(packed), Shape::from(nq + 2 * nk)))
                })
            })
        })
    }
}

/// Attention over GPT-2's packed q|k|v projection [b, t, 3 * h * d], without splitting it
/// into three tensors (and without the three gradient copies that splitting costs).
struct PackedAttention {
    heads: usize,
    mask: Tensor,
    scale: f32,
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "fused-packed-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let base = View4::packed_base(s.as_slice::<f32>()?, l, self.name())?;
        let (q, k, v, dims) = packed_qkv(&base, self.heads, &self.mask)?;
        forward((&q, &k, &v), &self.mask, &dims, self.scale)
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dqkv = grad.contiguous()?.apply_op1_no_bwd(&PackedAttentionBwd {
            qkv: qkv.clone(),
            heads: self.heads,
            mask: self.mask.clone(),
            scale: self.scale,
        })?;
        Ok(Some(dqkv))
    }
}

/// The gradient of the packed q|k|v tensor [b, t, 3 * h * d] from the output gradient.
struct PackedAttentionBwd {
    qkv: Tensor,
    heads: usize,
    mask: Tensor,
    scale: f32,
}

impl CustomOp1 for PackedAttentionBwd {
    fn name(&self) -> &'static str {
        "fused-packed-attention-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = super::contiguous_f32(s, l, self.name())?;
        let (st, ql) = self.qkv.storage_and_layout();
        let Storage::Cpu(cs) = &*st else {
            bail!("{}: CPU tensors only", self.name())
        };
        let base = View4::packed_base(cs.as_slice::<f32>()?, ql, self.name())?;
        let (q, k, v, dims) = packed_qkv(&base, self.heads, &self.mask)?;
        let Dims { b, h, t, d, .. } = dims;
        let mut dqkv = vec![0f32; b * t * 3 * h * d];
        let dests = (
            Dest::packed_part(&mut dqkv, 0, (t, h, d)),
            Dest::packed_part(&mut dqkv, 1, (t, h, d)),
            Dest::packed_part(&mut dqkv, 2, (t, h, d)),
        );
        backward((&q, &k, &v), g, &self.mask, &dims, self.scale, dests)?;
        Ok((CpuStorage::F32(dqkv), Shape::from((b, t, 3 * h * d))))
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

/// The gradients (dq, dk, dv) of [`attention`] for the output gradient `grad` [b, t, h * d].
pub fn attention_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let packed = grad.contiguous()?.apply_op1_no_bwd(&AttentionBwd {
        q: q.detach(),
        k: k.detach(),
        v: v.detach(),
        mask: mask.contiguous()?,
        scale: scale as f32,
    })?;
    let (nq, nk) = (q.elem_count(), k.elem_count());
    Ok((
        packed.narrow(0, 0, nq)?.reshape(q.shape())?,
        packed.narrow(0, nq, nk)?.reshape(k.shape())?,
        packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?,
    ))
}

/// [`attention`] over a packed q|k|v tensor [b, t, 3 * heads * d] (q, then k, then v, each
/// heads x d), as GPT-2's `c_attn` produces it; the mask is [b or 1, 1, t, t].
pub fn attention_packed(qkv: &Tensor, heads: usize, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let mask = mask.contiguous()?;
    qkv.apply_op1(PackedAttention {
        heads,
        mask,
        scale: scale as f32,
    })
}
