//! The optimizer: AdamW with decoupled weight decay on matrices only (as the HF Trainer does),
//! global gradient-norm clipping, and the learning-rate schedule (linear warmup, linear decay).

use anyhow::Result;
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize)]
pub struct OptimConfig {
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 5e-4,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// AdamW with decoupled weight decay on matrices only (not on biases and norm weights), as the
/// HF Trainer does.
pub struct AdamW {
    cfg: OptimConfig,
    /// Per var: the var, its moments, and whether weight decay applies.
    state: Vec<(Var, Moments, bool)>,
    step: usize,
}

/// The first and second moments of one var.
enum Moments {
    /// An f32 CPU var, updated in place by one fused pass: host vectors, allocated (zeroed) at
    /// the first update, after the first backward pass, so that they can take memory the
    /// activations of that pass freed instead of new pages.
    Host(Vec<f32>, Vec<f32>),
    /// Any other var: tensors on its device, updated by composed ops.
    Device(Tensor, Tensor),
}

/// Whether `v` takes the fused in-place update.
fn fused_update_fits(v: &Var) -> bool {
    v.dtype() == DType::F32 && v.device().is_cpu() && v.as_tensor().is_contiguous()
}

/// The AdamW update of one f32 CPU parameter, in place, with its gradient as the second input.
struct AdamWUpdate<'a> {
    moments: std::sync::Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    b1: f32,
    b2: f32,
    rbc1: f32,
    rbc2: f32,
    eps: f32,
    lr: f32,
    keep: f32,
    /// Multiplies the gradient (clipping), so clipping needs no scaled copy.
    grad_scale: f32,
}

impl candle_core::InplaceOp2 for AdamWUpdate<'_> {
    fn name(&self) -> &'static str {
        "sani-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("adamw: contiguous tensors only")
        };
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("adamw: f32 only")
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let mut guard = self.moments.lock().expect("adamw moments");
        let (m, v) = &mut *guard;
        if p.len() != g.len() || m.len() != p.len() || v.len() != p.len() {
            candle_core::bail!("adamw: size mismatch")
        }
        let (ib1, ib2) = (1.0 - self.b1, 1.0 - self.b2);
        let (b1, b2, rbc1, rbc2) = (self.b1, self.b2, self.rbc1, self.rbc2);
        let (eps, lr, keep, grad_scale) = (self.eps, self.lr, self.keep, self.grad_scale);
        // In parallel chunks: the first update also touches the moments' fresh pages, which
        // costs as much as the arithmetic on a VM and splits over threads the same way.
        const CHUNK: usize = 1 << 16;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for (((pi, mi), vi), &gi) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g)
                {
                    let gi = gi * grad_scale;
                    *mi = *mi * b1 + gi * ib1;
                    *vi = *vi * b2 + gi * gi * ib2;
                    let update = (*mi * rbc1) / ((*vi * rbc2).sqrt() + eps);
                    *pi = *pi * keep - update * lr;
                }
            });
        Ok(())
    }
}

impl AdamW {
    pub fn new(vars: &BTreeMap<String, Var>, cfg: OptimConfig) -> Result<Self> {
        let state = vars
            .values()
            .map(|v| {
                let moments = if fused_update_fits(v) {
                    Moments::Host(Vec::new(), Vec::new())
                } else {
                    let z = v.zeros_like()?;
                    Moments::Device(z.clone(), z)
                };
                Ok((v.clone(), moments, v.rank() >= 2))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            state,
            step: 0,
        })
    }

    /// One update with learning rate `lr` from gradients in `grads` (vars without one are skipped).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` first (see [`clip_scale`]).
    pub fn step_scaled(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (var, moments, decay) in self.state.iter_mut() {
            // Gradients carry the op graph of the step that made them: detach so the moments
            // do not keep every step's graph alive.
            let Some(g) = grads.get(var).map(Tensor::detach) else {
                continue;
            };
            let mut p = var.as_tensor().detach();
            match moments {
                Moments::Host(mv, vv) => {
                    if mv.is_empty() {
                        *mv = vec![0f32; var.elem_count()];
                        *vv = vec![0f32; var.elem_count()];
                    }
                    // One fused pass, in place on the host: no per-op temporaries.
                    let g = g.to_dtype(DType::F32)?.contiguous()?;
                    let op = AdamWUpdate {
                        moments: std::sync::Mutex::new((mv, vv)),
                        b1: c.beta1 as f32,
                        b2: c.beta2 as f32,
                        rbc1: (1.0 / bc1) as f32,
                        rbc2: (1.0 / bc2) as f32,
                        eps: c.eps as f32,
                        lr: lr as f32,
                        keep: if *decay && c.weight_decay > 0.0 {
                            (1.0 - lr * c.weight_decay) as f32
                        } else {
                            1.0
                        },
                        grad_scale: grad_scale as f32,
                    };
                    var.as_tensor().inplace_op2(&g, &op)?;
                }
                Moments::Device(m, v) => {
                    let g = &(g * grad_scale)?;
                    *m = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let update = ((&*m / bc1)? / ((&*v / bc2)?.sqrt()? + c.eps)?)?;
                    if *decay && c.weight_decay > 0.0 {
                        p = (&p * (1.0 - lr * c.weight_decay))?;
                    }
                    var.set(&(p - (update * lr)?)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Sum of squares of an f32 CPU tensor in one pass without temporaries (f64 accumulation);
/// None for other dtypes or devices.
fn sum_sq_f32_cpu(g: &Tensor) -> Result<Option<f64>> {
    if g.dtype() != DType::F32 || !g.device().is_cpu() {
        return Ok(None);
    }
    let g = g.contiguous()?;
    let (st, l) = g.storage_and_layout();
    let (candle_core::Storage::Cpu(s), Some((a, b))) = (&*st, l.contiguous_offsets()) else {
        return Ok(None);
    };
    let data = &s.as_slice::<f32>()?[a..b];
    let mut total = 0f64;
    for chunk in data.chunks(1024) {
        let mut acc = [0f32; 8];
        let it = chunk.chunks_exact(8);
        let rem = it.remainder();
        for c in it {
            for i in 0..8 {
                acc[i] += c[i] * c[i];
            }
        }
        total += acc.iter().map(|&x| x as f64).sum::<f64>()
            + rem.iter().map(|&x| (x * x) as f64).sum::<f64>();
    }
    Ok(Some(total))
}

/// The factor that brings gradients of global norm `norm` to at most `max_norm` (1 when they
/// are within it, or when `max_norm` is 0: no clipping).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    vars: &BTreeMap<String, Var>,
    max_norm: f64,
) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    let scale = clip_scale(norm, max_norm);
    if scale != 1.0 {
        for v in vars.values() {
            if let Some(g) = grads.remove(v) {
                grads.insert(v, (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// The global L2 norm of the gradients of `vars`.
pub fn grad_norm(grads: &GradStore, vars: &BTreeMap<String, Var>) -> Result<f64> {
    let mut total = 0f64;
    for v in vars.values() {
        if let Some(g) = grads.get(v) {
            if let Some(sq) = sum_sq_f32_cpu(g)? {
                total += sq;
                continue;
            }
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(total.sqrt())
}

/// Learning rate at `step` (0-based): linear warmup, then linear decay to zero at `total`.
pub fn lr_at(cfg: &OptimConfig, step: usize, total: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let rest = total.saturating_sub(cfg.warmup_steps).max(1);
    cfg.lr * (1.0 - (step - cfg.warmup_steps) as f64 / rest as f64).max(0.0)
}
