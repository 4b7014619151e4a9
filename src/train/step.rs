//! One training step, callable on its own (the loop and the benchmark both call it): forward
//! over right-padded micro-batches, the NLL summed over trained targets (and, detached, over
//! sensitive ones), backward, and gradients summed over the micro-batches of an optimizer step.
//!
//! Blocks before `first_block` are frozen; their output can be given as a precomputed prefix
//! (see [`frozen_prefix`]) so that only the trained blocks run.

use crate::data::tokens::right_pad;
use crate::model::{AttnContext, Model};
use anyhow::Result;
use candle_core::{backprop::GradStore, Device, Tensor};

/// One training sequence: token ids and, per position, whether its token is a training target
/// (`train`) and whether it is sensitive (reported separately, never trained on in mask mode).
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    pub train: Vec<bool>,
    pub sensitive: Vec<bool>,
}

/// A batch on the device: right-padded ids with target weights (shifted: row i predicts i+1).
pub struct Batch {
    pub ids: Tensor,
    pub valid: Vec<Vec<bool>>,
    train_w: Tensor,
    /// `train_w` on the host.
    train_weights: Vec<f32>,
    sens_w: Tensor,
    pub n_train: usize,
    pub n_sens: usize,
    pub n_tokens: usize,
}

impl Batch {
    pub fn new(examples: &[&Example], device: &Device) -> Result<Batch> {
        let rows: Vec<&[u32]> = examples.iter().map(|e| e.ids.as_slice()).collect();
        let (ids, valid, t) = right_pad(&rows);
        let b = examples.len();
        let mut train_w = Vec::with_capacity(b * (t - 1));
        let mut sens_w = Vec::with_capacity(b * (t - 1));
        let (mut n_train, mut n_sens, mut n_tokens) = (0, 0, 0);
        for e in examples {
            let n = e.ids.len();
            n_tokens += n;
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
            train_w: Tensor::from_vec(train_w.clone(), b * (t - 1), device)?,
            train_weights: train_w,
            sens_w: Tensor::from_vec(sens_w, b * (t - 1), device)?,
            n_train,
            n_sens,
            n_tokens,
        })
    }
}

/// What one optimizer step computed.
#[derive(Default)]
pub struct StepOutput {
    /// Gradients of (sum of NLL over trained targets) / (trained targets of the step); None
    /// when the step has no trained target.
    pub grads: Option<GradStore>,
    /// Sum of NLL over trained targets.
    pub train_nll: f64,
    /// Sum of NLL over sensitive targets (no gradient).
    pub sensitive_nll: f64,
    pub trained_tokens: usize,
    pub sensitive_tokens: usize,
    pub tokens: usize,
}

/// Forward, masked loss and backward for a model whose blocks from `first_block` on train.
pub struct TrainStep<'a> {
    model: &'a Model,
    first_block: usize,
}

impl<'a> TrainStep<'a> {
    pub fn new(model: &'a Model, first_block: usize) -> Self {
        TrainStep { model, first_block }
    }

    /// (sum of NLL over trained targets — differentiable, sum over sensitive targets — detached).
    /// `prefix`: the hidden states entering `first_block`, when precomputed.
    /// `grad_scale`: the gradient the caller will send back to the sum (1 / trained targets of
    /// the step), which lets the head compute its gradients in the forward pass.
    pub fn loss(
        &self,
        batch: &Batch,
        prefix: Option<&Tensor>,
        grad_scale: Option<f64>,
    ) -> Result<(Tensor, f64)> {
        let model = self.model;
        let (b, t) = batch.ids.dims2()?;
        let ctx = AttnContext::for_training(&batch.valid, model.sliding_window(), &model.device)?;
        let h = match prefix {
            Some(p) => model.run_blocks(self.first_block, p, &ctx, None, None)?,
            None => {
                let x = model.embed(&batch.ids, &ctx)?;
                model.run_blocks(0, &x, &ctx, None, None)?
            }
        };
        let targets = batch.ids.narrow(1, 1, t - 1)?.flatten_all()?;
        let row_grad = grad_scale.map(|s| {
            let s = s as f32;
            batch.train_weights.iter().map(|w| w * s).collect()
        });
        let nll = model.token_nll(&h.narrow(1, 0, t - 1)?.contiguous()?, &targets, row_grad)?;
        debug_assert_eq!(nll.dims(), [b * (t - 1)]);
        let train_sum = (&nll * &batch.train_w)?.sum_all()?;
        let sens_sum = (nll.detach() * &batch.sens_w)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        Ok((train_sum, sens_sum))
    }

    /// One optimizer step's forward and backward over its micro-batches (each with its
    /// precomputed prefix, if any); gradients are summed over them.
    pub fn run(&self, micro_batches: &[(&Batch, Option<Tensor>)]) -> Result<StepOutput> {
        let vars = self.model.trainable_vars();
        let step_train: usize = micro_batches.iter().map(|(b, _)| b.n_train).sum();
        let mut out = StepOutput::default();
        for (batch, prefix) in micro_batches {
            let scale = (step_train > 0).then(|| 1.0 / step_train as f64);
            let (sum, sens) = self.loss(batch, prefix.as_ref(), scale)?;
            out.train_nll += sum.to_scalar::<f32>()? as f64;
            out.sensitive_nll += sens;
            out.trained_tokens += batch.n_train;
            out.sensitive_tokens += batch.n_sens;
            out.tokens += batch.n_tokens;
            if step_train == 0 {
                continue;
            }
            let g = (sum / step_train as f64)?.backward()?;
            out.grads = Some(match out.grads.take() {
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
        Ok(out)
    }
}

/// Hidden states entering block `first_block`, per example (no gradient), for reuse every epoch.
pub fn frozen_prefix(
    model: &Model,
    examples: &[Example],
    first_block: usize,
) -> Result<Vec<Tensor>> {
    examples
        .iter()
        .map(|e| {
            let ids = Tensor::new(e.ids.as_slice(), &model.device)?.unsqueeze(0)?;
            let valid = vec![vec![true; e.ids.len()]];
            let ctx = AttnContext::for_training(&valid, model.sliding_window(), &model.device)?;
            let h = model.hidden_before(first_block, &ids, &ctx)?;
            Ok(h.squeeze(0)?.detach())
        })
        .collect()
}

/// The prefixes of a micro-batch, right-padded with zeros to `t` positions and stacked.
pub fn stack_prefix(prefix: &[&Tensor], t: usize) -> Result<Tensor> {
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
