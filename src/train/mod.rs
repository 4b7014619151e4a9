//! Causal-LM training: the step ([`step`]: forward, masked loss, backward) and the optimizer
//! ([`optim`]: clipping, AdamW, schedule) apart from the loop ([`fit`]: epochs, shuffling,
//! accumulation, progress, metrics).
//!
//! Used by `sani finetune` (every token counts) and by the repair phase of `sani sanitize`
//! (sensitive tokens carry no loss, or are replaced by surrogates before tokenization).

pub mod data;
pub mod optim;
pub mod step;

use crate::io::checkpoint::Checkpoint;
use crate::model::Model;
use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

pub use data::{
    windows_to_examples, windows_to_forget_examples, Corpus, EpochData, FixedData, Forgetting,
    SurrogateData,
};
pub use optim::{clip_grad_norm, clip_scale, grad_norm, lr_at, AdamW, OptimConfig};
pub use step::{Batch, Example, TrainStep};

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

/// Tensor-name predicate for a scope: every tensor, or those of the last blocks and the final norm
/// (names as the model loaded them).
pub fn scope_predicate(model: &Model, scope: TrainScope) -> impl Fn(&str) -> bool {
    let all = scope == TrainScope::All;
    let n = model.num_layers();
    let mut names: Vec<String> = model.final_norm_tensor_names().to_vec();
    for layer in scope.first_trained_block(n)..n {
        names.extend_from_slice(model.block_tensor_names(layer));
    }
    move |name: &str| all || names.iter().any(|n| n == name)
}

#[derive(Debug, Clone, Serialize)]
pub struct LoopConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seed: u64,
    pub scope: TrainScope,
    /// Recompute blocks in the backward pass (activation memory of one block).
    pub checkpoint_activations: bool,
    /// Under checkpointing, MiB of block activations kept from the forward instead of recomputed.
    pub activation_memory_mib: usize,
    /// See [`TrainConfig::forget_weight`].
    pub forget_weight: f64,
    /// See [`TrainConfig::forget_per_token`].
    pub forget_per_token: bool,
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
    /// Tokens the epoch ran through the model (every position once, trained or not).
    #[serde(default)]
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// The hyperparameters of a training run (the repair of `sani sanitize`, `sani finetune`).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Activation checkpointing (see [`TrainStep::with_checkpointing`]).
    pub checkpoint_activations: bool,
    /// See [`TrainStep::keeping_activations`] (in MiB).
    pub activation_memory_mib: usize,
    /// Train LoRA adapters on a frozen model instead of the tensors of the scope; they are
    /// merged into the weights at the end.
    pub lora: Option<crate::nn::lora::LoraConfig>,
    /// Only tensors with one of these path components train (`mlp`, `self_attn`, `q_proj`,
    /// ...); empty: every tensor of the scope.
    pub modules: Vec<String>,
    /// Weight of the bounded unlikelihood term on the true sensitive tokens (0: none; see
    /// [`TrainStep::with_forgetting`]).
    pub forget_weight: f64,
    /// The unlikelihood term per forget target rather than as a batch mean (see
    /// [`TrainStep::forget_per_token`]).
    pub forget_per_token: bool,
}

/// Whether tensor `name` belongs to one of `modules` (a dot-separated component of its name);
/// an empty list takes every tensor.
pub fn in_modules(name: &str, modules: &[String]) -> bool {
    modules.is_empty() || name.split('.').any(|c| modules.iter().any(|m| m == c))
}

impl TrainConfig {
    /// Checks the bounds of every hyperparameter (each flag's name in the message).
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "--weight-decay must be zero or positive, got {}",
                self.weight_decay
            );
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bail!(
                "--max-grad-norm must be zero (no clipping) or positive, got {}",
                self.max_grad_norm
            );
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            bail!("--batch-size and --grad-accum must be at least 1");
        }
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        if self.activation_memory_mib > 0 && !self.checkpoint_activations {
            bail!(
                "--activation-memory {} needs --checkpoint-activations: without it every \
                 activation is kept anyway",
                self.activation_memory_mib
            );
        }
        if !(self.forget_weight.is_finite() && self.forget_weight >= 0.0) {
            bail!(
                "--forget-weight must be zero (off) or positive, got {}",
                self.forget_weight
            );
        }
        Ok(())
    }
}

/// The error of a run that diverged: nothing is written, and the usual causes are named.
fn diverged(what: &str, step: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "training diverged: {what} at step {step}; stopped, nothing written (try a lower --lr, \
         a --max-grad-norm such as 1.0, or --warmup-steps)"
    )
}

/// A trained tensor whose norm grew by more than this factor has diverged, even when every
/// value is finite (behind the norms, a model can blow up its weights and keep a finite loss).
pub const MAX_NORM_GROWTH: f64 = 100.0;

/// The L2 norm of every var (f64, on the host).
fn var_norms(vars: &BTreeMap<String, Var>) -> Result<BTreeMap<String, f64>> {
    vars.iter()
        .map(|(name, v)| {
            let sq = v
                .as_tensor()
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            Ok((name.clone(), sq.sqrt()))
        })
        .collect()
}

/// The first tensor whose norm grew more than [`MAX_NORM_GROWTH`]-fold from `start`, as a
/// divergence message. A tensor that starts near zero (a bias, a LoRA `B`) is measured against
/// an RMS of 0.01.
fn norm_blow_up(
    start: &BTreeMap<String, f64>,
    vars: &BTreeMap<String, Var>,
) -> Result<Option<String>> {
    let now = var_norms(vars)?;
    for (name, &after) in &now {
        let before = start.get(name).copied().unwrap_or(0.0);
        let floor = 1e-2 * (vars[name].elem_count() as f64).sqrt();
        if !after.is_finite() || after > MAX_NORM_GROWTH * before.max(floor) {
            return Ok(Some(format!(
                "tensor `{name}` grew from norm {before:.3e} to {after:.3e} (more than \
                 {MAX_NORM_GROWTH}x)"
            )));
        }
    }
    Ok(None)
}

/// Loads `ckpt` with the tensors in `scope` trainable and trains them on `data` (the
/// checkpoint's vars are updated in place). With `cfg.lora`, the checkpoint's tensors are
/// frozen, adapters on the scope's blocks train, and are merged into the checkpoint at the end.
/// Returns per-epoch metrics.
pub fn fit(
    ckpt: &Checkpoint,
    scope: TrainScope,
    data: &mut dyn EpochData,
    cfg: &TrainConfig,
    quiet: bool,
) -> Result<Vec<EpochMetrics>> {
    Ok(fit_keeping_adapters(ckpt, scope, data, cfg, quiet)?.0)
}

/// [`fit`], also returning a copy of the LoRA adapters as trained (empty without LoRA).
pub fn fit_keeping_adapters(
    ckpt: &Checkpoint,
    scope: TrainScope,
    data: &mut dyn EpochData,
    cfg: &TrainConfig,
    quiet: bool,
) -> Result<(Vec<EpochMetrics>, Vec<crate::nn::lora::TrainedLora>)> {
    // Block and norm names come from loading, so the scope needs the structure first. Shapes
    // only: a frozen load would make every tensor resident in f32 before LoRA's base weights
    // could be read in their stored 16-bit dtype.
    let probe = Model::load_shapes(ckpt)?;
    let scoped = scope_predicate(&probe, scope);
    let in_scope = |name: &str| scoped(name) && in_modules(name, &cfg.modules);
    if !cfg.modules.is_empty() && !probe.loaded_names().iter().any(|n| in_scope(n)) {
        bail!(
            "--train-modules {}: no tensor of this model matches",
            cfg.modules.join(",")
        );
    }
    drop(probe);
    let model = match &cfg.lora {
        None => Model::load_to_train(ckpt, &in_scope, None)?,
        Some(_) if scope != TrainScope::All => {
            bail!("LoRA adapters train in every block: use --train-scope all with --adapter lora")
        }
        Some(lora) => Model::load_to_train(ckpt, &|_| false, Some(lora))?,
    };
    crate::runtime::trace_rss("model loaded to train");
    let loop_cfg = LoopConfig {
        epochs: cfg.epochs,
        batch_size: cfg.batch_size,
        grad_accum: cfg.grad_accum,
        seed: cfg.seed,
        scope,
        checkpoint_activations: cfg.checkpoint_activations,
        activation_memory_mib: cfg.activation_memory_mib,
        forget_weight: cfg.forget_weight,
        forget_per_token: cfg.forget_per_token,
    };
    let optim = OptimConfig {
        lr: cfg.lr,
        warmup_steps: cfg.warmup_steps,
        weight_decay: cfg.weight_decay,
        max_grad_norm: cfg.max_grad_norm,
        ..OptimConfig::default()
    };
    let metrics = train(&model, data, &loop_cfg, &optim, quiet)?;
    let adapters = model
        .lora_adapters()
        .iter()
        .map(|a| a.snapshot())
        .collect::<Result<Vec<_>>>()?;
    model.merge_lora()?;
    Ok((metrics, adapters))
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
    crate::runtime::trace_rss("optimizer state allocated");
    let start_norms = var_norms(&vars)?;
    let first_block = loop_cfg.scope.first_trained_block(model.num_layers());
    let train_step = TrainStep::new(model, first_block)
        .with_checkpointing(loop_cfg.checkpoint_activations)
        .keeping_activations(loop_cfg.activation_memory_mib.saturating_mul(1 << 20))
        .with_forgetting(loop_cfg.forget_weight)
        .forget_per_token(loop_cfg.forget_per_token);
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
            prefix_cache = Some(step::frozen_prefix(model, &examples, first_block)?);
        }
        // Batches stay random: grouping windows by length (less padding) measured worse
        // repair (demo: held-out perplexity +23% instead of -7%) and weaker memorization.
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.shuffle(&mut rng);
        let pb = crate::io::progress::bar(
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
            let batches = step_idx
                .chunks(micro)
                .map(|idx| {
                    let batch = Batch::for_device(
                        &idx.iter().map(|&i| &examples[i]).collect::<Vec<_>>(),
                        &model.device,
                    )?;
                    let prefix = match &prefix_cache {
                        Some(cache) => {
                            let parts: Vec<&Tensor> = idx.iter().map(|&i| &cache[i]).collect();
                            Some(step::stack_prefix(&parts, &batch)?)
                        }
                        None => None,
                    };
                    Ok((batch, prefix))
                })
                .collect::<Result<Vec<_>>>()?;
            let micro_batches: Vec<(&Batch, Option<Tensor>)> =
                batches.iter().map(|(b, p)| (b, p.clone())).collect();
            let out = train_step.run(&micro_batches)?;
            crate::runtime::trace_rss("forward and backward done");
            if !(out.train_nll.is_finite() && out.sensitive_nll.is_finite()) {
                return Err(diverged("the loss is not finite", global_step + 1));
            }
            train_sum += out.train_nll;
            sens_sum += out.sensitive_nll;
            m.trained_tokens += out.trained_tokens;
            m.sensitive_tokens += out.sensitive_tokens;
            tokens += out.tokens;
            if let Some(g) = out.grads {
                let norm = grad_norm(&g, &vars)?;
                if !norm.is_finite() {
                    return Err(diverged("the gradient norm is not finite", global_step + 1));
                }
                let lr = lr_at(optim, global_step, total);
                adam.step_scaled(&g, lr, clip_scale(norm, optim.max_grad_norm))?;
                drop(g);
                crate::runtime::trace_rss("optimizer step done");
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
        m.tokens = tokens;
        m.tokens_per_s = tokens as f64 / m.seconds.max(1e-9);
        metrics.push(m);
        if let Some(what) = norm_blow_up(&start_norms, &vars)? {
            return Err(diverged(&what, global_step));
        }
    }
    for (name, var) in &vars {
        if !crate::nn::ops::all_finite(var.as_tensor())? {
            return Err(diverged(
                &format!("tensor `{name}` is not finite after the last update"),
                global_step,
            ));
        }
    }
    Ok(metrics)
}
