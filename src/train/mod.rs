//! Causal-LM training: the step (forward, masked loss, backward, clipping, AdamW) separated from
//! the loop (epochs, shuffling, accumulation, schedule, progress, metrics).
//!
//! Used by `sani finetune` (every token counts) and by the repair phase of `sani sanitize`
//! (sensitive tokens carry no loss, or are replaced by surrogates before tokenization).

use crate::model::{AttnContext, Model};
use crate::nn::ops;
use anyhow::{bail, Result};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// One training sequence: token ids and, per position, whether its token is a training target
/// (`train`) and whether it is sensitive (reported separately, never trained on in mask mode).
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    pub train: Vec<bool>,
    pub sensitive: Vec<bool>,
}

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
    state: Vec<(Var, Tensor, Tensor, bool)>,
    /// Host copies of the moments (m, v) for vars updated by the fused f32 CPU path.
    host: Vec<Option<(Vec<f32>, Vec<f32>)>>,
    step: usize,
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
        for (((pi, mi), vi), &gi) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            *mi = *mi * self.b1 + gi * ib1;
            *vi = *vi * self.b2 + gi * gi * ib2;
            let update = (*mi * self.rbc1) / ((*vi * self.rbc2).sqrt() + self.eps);
            *pi = *pi * self.keep - update * self.lr;
        }
        Ok(())
    }
}

impl AdamW {
    pub fn new(vars: &BTreeMap<String, Var>, cfg: OptimConfig) -> Result<Self> {
        let state = vars
            .values()
            .map(|v| {
                let z = v.zeros_like()?;
                Ok((v.clone(), z.clone(), z, v.rank() >= 2))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            host: vec![None; state.len()],
            state,
            step: 0,
        })
    }

    /// One update with learning rate `lr` from gradients in `grads` (vars without one are skipped).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (var, m, v, decay)) in self.state.iter_mut().enumerate() {
            // Gradients carry the op graph of the step that made them: detach so the moments
            // do not keep every step's graph alive.
            let Some(g) = grads.get(var).map(Tensor::detach) else {
                continue;
            };
            let mut p = var.as_tensor().detach();
            let host = &mut self.host[i];
            if g.dtype() == DType::F32
                && p.dtype() == DType::F32
                && g.device().is_cpu()
                && p.device().is_cpu()
                && p.is_contiguous()
            {
                // One fused pass, in place on the host: no per-op temporaries. The moments
                // live in host vectors from the first such step on.
                if host.is_none() {
                    *host = Some((
                        m.flatten_all()?.to_vec1::<f32>()?,
                        v.flatten_all()?.to_vec1::<f32>()?,
                    ));
                }
                let (mv, vv) = host.as_mut().expect("set above");
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
                };
                var.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
                continue;
            }
            let g = &g;
            *m = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&*m / bc1)? / ((&*v / bc2)?.sqrt()? + c.eps)?)?;
            if *decay && c.weight_decay > 0.0 {
                p = (&p * (1.0 - lr * c.weight_decay))?;
            }
            var.set(&(p - (update * lr)?)?)?;
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

/// Scales gradients so that their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    vars: &BTreeMap<String, Var>,
    max_norm: f64,
) -> Result<f64> {
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
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in vars.values() {
            if let Some(g) = grads.remove(v) {
                grads.insert(v, (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Which blocks are trained; the others are frozen (no gradient computed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainScope {
    All,
    /// The last K blocks and the final norm.
    LastBlocks(usize),
}

impl TrainScope {
    /// Index of the first trained block (blocks before it are frozen, and so are the embeddings).
    pub fn first_trained_block(&self, n_layers: usize) -> usize {
        match self {
            TrainScope::All => 0,
            TrainScope::LastBlocks(k) => n_layers.saturating_sub(*k),
        }
    }
}

/// Tensor-name predicate for a scope, given the model's per-block tensor names.
pub fn scope_predicate(model: &Model, scope: TrainScope) -> impl Fn(&str) -> bool {
    let all = scope == TrainScope::All;
    let n = model.num_layers();
    let mut names: Vec<String> = Vec::new();
    for layer in scope.first_trained_block(n)..n {
        names.extend(model.block_tensor_names(layer));
    }
    move |name: &str| {
        if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
            return false;
        }
        all || names.iter().any(|n| n == name) || is_final_norm(name)
    }
}

fn is_final_norm(name: &str) -> bool {
    matches!(
        name,
        "model.norm.weight"
            | "transformer.ln_f.weight"
            | "transformer.ln_f.bias"
            | "ln_f.weight"
            | "ln_f.bias"
    )
}

#[derive(Debug, Clone, Serialize)]
pub struct LoopConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seed: u64,
    pub scope: TrainScope,
}

/// Metrics of one epoch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub steps: usize,
    /// Mean NLL over trained tokens.
    pub loss_trained: f64,
    /// Mean NLL over sensitive tokens (not trained on in mask mode).
    pub loss_sensitive: f64,
    pub trained_tokens: usize,
    pub sensitive_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// A batch on the device: right-padded ids with target weights (shifted: row i predicts i+1).
struct Batch {
    ids: Tensor,
    valid: Vec<Vec<bool>>,
    train_w: Tensor,
    sens_w: Tensor,
    n_train: usize,
    n_sens: usize,
    n_tokens: usize,
}

fn make_batch(examples: &[&Example], device: &Device) -> Result<Batch> {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let b = examples.len();
    let mut ids = Vec::with_capacity(b * t);
    let mut valid = Vec::with_capacity(b);
    let mut train_w = Vec::with_capacity(b * (t - 1));
    let mut sens_w = Vec::with_capacity(b * (t - 1));
    let (mut n_train, mut n_sens, mut n_tokens) = (0, 0, 0);
    for e in examples {
        let n = e.ids.len();
        n_tokens += n;
        ids.extend_from_slice(&e.ids);
        ids.extend(std::iter::repeat_n(0u32, t - n));
        let mut v = vec![true; n];
        v.resize(t, false);
        valid.push(v);
        for i in 1..t {
            let tr = i < n && e.train[i];
            let se = i < n && e.sensitive[i];
            n_train += tr as usize;
            n_sens += se as usize;
            train_w.push(tr as u8 as f32);
            sens_w.push(se as u8 as f32);
        }
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        valid,
        train_w: Tensor::from_vec(train_w, b * (t - 1), device)?,
        sens_w: Tensor::from_vec(sens_w, b * (t - 1), device)?,
        n_train,
        n_sens,
        n_tokens,
    })
}

/// Per-batch losses: (sum of NLL over trained targets — differentiable, sum over sensitive — detached).
fn batch_nll(
    model: &Model,
    batch: &Batch,
    first_block: usize,
    prefix: Option<&Tensor>,
) -> Result<(Tensor, f64)> {
    let (b, t) = batch.ids.dims2()?;
    let ctx = AttnContext::for_training(&batch.valid, model.sliding_window(), &model.device)?;
    let h = match prefix {
        Some(p) => model.run_blocks(first_block, p, &ctx, None, None)?,
        None => {
            let x = model.embed(&batch.ids, &ctx)?;
            model.run_blocks(0, &x, &ctx, None, None)?
        }
    };
    let logits = model.logits(&h.narrow(1, 0, t - 1)?)?;
    let v = logits.dim(2)?;
    let targets = batch.ids.narrow(1, 1, t - 1)?.flatten_all()?;
    let nll = ops::token_nll(&logits.reshape((b * (t - 1), v))?, &targets)?;
    let train_sum = (&nll * &batch.train_w)?.sum_all()?;
    let sens_sum = (nll.detach() * &batch.sens_w)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    Ok((train_sum, sens_sum))
}

/// Hidden states entering block `first_block`, per example (no gradient), for reuse every epoch.
fn frozen_prefix(
    model: &Model,
    examples: &[Example],
    first_block: usize,
    batch_size: usize,
) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        for e in chunk {
            let ids = Tensor::new(e.ids.as_slice(), &model.device)?.unsqueeze(0)?;
            let valid = vec![vec![true; e.ids.len()]];
            let ctx = AttnContext::for_training(&valid, model.sliding_window(), &model.device)?;
            let x = model.embed(&ids, &ctx)?;
            let mut h = x;
            for layer in 0..first_block {
                h = model.block(layer, &h, &ctx, None, None)?;
            }
            out.push(h.squeeze(0)?.detach());
        }
    }
    Ok(out)
}

fn stack_prefix(prefix: &[&Tensor], t: usize) -> Result<Tensor> {
    let padded = prefix
        .iter()
        .map(|p| {
            let n = p.dim(0)?;
            if n == t {
                Ok((*p).clone())
            } else {
                p.pad_with_zeros(0, 0, t - n)
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&padded, 0)?)
}

/// Learning rate at `step` (0-based): linear warmup, then linear decay to zero at `total`.
pub fn lr_at(cfg: &OptimConfig, step: usize, total: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let rest = total.saturating_sub(cfg.warmup_steps).max(1);
    cfg.lr * (1.0 - (step - cfg.warmup_steps) as f64 / rest as f64).max(0.0)
}

/// Makes the examples of one epoch (called each epoch, so surrogates can be redrawn).
pub trait EpochData {
    fn examples(&mut self, epoch: usize) -> Result<Vec<Example>>;
    /// True when every epoch yields the same examples (frozen blocks can then be computed once).
    fn is_fixed(&self) -> bool;
}

/// Fixed examples, the same every epoch.
pub struct FixedData(pub Vec<Example>);

impl EpochData for FixedData {
    fn examples(&mut self, _epoch: usize) -> Result<Vec<Example>> {
        Ok(self.0.clone())
    }
    fn is_fixed(&self) -> bool {
        true
    }
}

pub fn progress_bar(len: u64, quiet: bool, prefix: &str) -> ProgressBar {
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
    };
    pb.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix.to_string());
    pb
}

/// Trains `model`'s trainable vars for `cfg.epochs` epochs. Returns per-epoch metrics.
pub fn train(
    model: &Model,
    data: &mut dyn EpochData,
    loop_cfg: &LoopConfig,
    optim: &OptimConfig,
    quiet: bool,
) -> Result<Vec<EpochMetrics>> {
    let vars = model.trainable_vars().clone();
    if vars.is_empty() {
        bail!("nothing to train: the training scope selects no tensors");
    }
    let mut adam = AdamW::new(&vars, optim.clone())?;
    let first_block = loop_cfg.scope.first_trained_block(model.num_layers());
    let mut rng = StdRng::seed_from_u64(loop_cfg.seed);
    let mut metrics = Vec::new();
    let micro = loop_cfg.batch_size.max(1);
    let accum = loop_cfg.grad_accum.max(1);
    let mut prefix_cache: Option<Vec<Tensor>> = None;
    let mut global_step = 0usize;
    let mut total_steps = None;
    for epoch in 0..loop_cfg.epochs {
        let examples = data.examples(epoch)?;
        if examples.is_empty() {
            bail!("no training examples");
        }
        let steps_per_epoch = examples.len().div_ceil(micro * accum);
        let total = *total_steps.get_or_insert(steps_per_epoch * loop_cfg.epochs);
        if first_block > 0 && data.is_fixed() && prefix_cache.is_none() {
            prefix_cache = Some(frozen_prefix(model, &examples, first_block, micro)?);
        }
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.shuffle(&mut rng);
        let pb = progress_bar(
            steps_per_epoch as u64,
            quiet,
            &format!("epoch {}", epoch + 1),
        );
        let start = Instant::now();
        let mut m = EpochMetrics {
            epoch: epoch + 1,
            ..Default::default()
        };
        let (mut train_sum, mut sens_sum, mut tokens) = (0f64, 0f64, 0usize);
        for step_idx in order.chunks(micro * accum) {
            let micro_batches: Vec<Vec<usize>> =
                step_idx.chunks(micro).map(<[usize]>::to_vec).collect();
            let batches = micro_batches
                .iter()
                .map(|idx| {
                    make_batch(
                        &idx.iter().map(|&i| &examples[i]).collect::<Vec<_>>(),
                        &model.device,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let step_train: usize = batches.iter().map(|b| b.n_train).sum();
            let mut grads: Option<GradStore> = None;
            for (idx, batch) in micro_batches.iter().zip(&batches) {
                let prefix = match &prefix_cache {
                    Some(cache) => {
                        let parts: Vec<&Tensor> = idx.iter().map(|&i| &cache[i]).collect();
                        Some(stack_prefix(&parts, batch.ids.dim(1)?)?)
                    }
                    None => None,
                };
                let (sum, sens) = batch_nll(model, batch, first_block, prefix.as_ref())?;
                let sum_v = sum.to_scalar::<f32>()? as f64;
                train_sum += sum_v;
                sens_sum += sens;
                m.trained_tokens += batch.n_train;
                m.sensitive_tokens += batch.n_sens;
                tokens += batch.n_tokens;
                if step_train == 0 {
                    continue;
                }
                let g = (sum / step_train as f64)?.backward()?;
                grads = Some(match grads {
                    None => g,
                    Some(mut acc) => {
                        for v in vars.values() {
                            if let Some(new) = g.get(v) {
                                let sum = match acc.remove(v) {
                                    Some(old) => (old + new)?,
                                    None => new.clone(),
                                };
                                acc.insert(v, sum);
                            }
                        }
                        acc
                    }
                });
            }
            if let Some(mut g) = grads {
                clip_grad_norm(&mut g, &vars, optim.max_grad_norm)?;
                adam.step(&g, lr_at(optim, global_step, total))?;
            }
            global_step += 1;
            m.steps += 1;
            let running = train_sum / m.trained_tokens.max(1) as f64;
            let tps = tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!("loss {running:.3} {tps:.0} tok/s"));
            pb.inc(1);
        }
        pb.finish_and_clear();
        m.seconds = start.elapsed().as_secs_f64();
        m.loss_trained = train_sum / m.trained_tokens.max(1) as f64;
        m.loss_sensitive = sens_sum / m.sensitive_tokens.max(1) as f64;
        m.tokens_per_s = tokens as f64 / m.seconds.max(1e-9);
        metrics.push(m);
    }
    Ok(metrics)
}
