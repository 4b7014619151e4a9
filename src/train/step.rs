//! One training step, callable on its own (the loop and the benchmark both call it): forward
//! over right-padded micro-batches, the NLL summed over trained targets (and, detached, over
//! sensitive ones), backward, and gradients summed over the micro-batches of an optimizer step.
//!
//! Blocks before `first_block` are frozen; their output can be given as a precomputed prefix
//! (see [`frozen_prefix`]) so that only the trained blocks run.

use crate::data::tokens::right_pad;
use crate::model::{AttnContext, Model};
use anyhow::Result;
use candle_core::{backprop::GradStore, Device, Tensor, Var};
use std::collections::BTreeMap;

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
    /// Recompute each block in the backward pass instead of keeping its activations.
    checkpoint: bool,
}

/// Adds every gradient of `new` for `vars` into `acc`.
fn merge_grads(acc: &mut GradStore, new: &GradStore, vars: &BTreeMap<String, Var>) -> Result<()> {
    for v in vars.values() {
        if let Some(g) = new.get(v) {
            let sum = match acc.remove(v) {
                Some(old) => (old + g)?,
                None => g.clone(),
            };
            acc.insert(v, sum);
        }
    }
    Ok(())
}

impl<'a> TrainStep<'a> {
    pub fn new(model: &'a Model, first_block: usize) -> Self {
        TrainStep {
            model,
            first_block,
            checkpoint: false,
        }
    }

    /// Activation checkpointing: the forward keeps only each block's input; the backward
    /// recomputes one block at a time (one more forward pass, activation memory of one block).
    pub fn with_checkpointing(mut self, on: bool) -> Self {
        self.checkpoint = on;
        self
    }

    /// The NLL sums of the final hidden states `h` (see [`TrainStep::loss`]).
    fn head_loss(
        &self,
        batch: &Batch,
        h: &Tensor,
        grad_scale: Option<f64>,
    ) -> Result<(Tensor, f64)> {
        let t = batch.ids.dim(1)?;
        let targets = batch.ids.narrow(1, 1, t - 1)?.flatten_all()?;
        let row_grad = grad_scale.map(|s| {
            let s = s as f32;
            batch.train_weights.iter().map(|w| w * s).collect()
        });
        let nll =
            self.model
                .token_nll(&h.narrow(1, 0, t - 1)?.contiguous()?, &targets, row_grad)?;
        let train_sum = (&nll * &batch.train_w)?.sum_all()?;
        let sens_sum = (nll.detach() * &batch.sens_w)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        Ok((train_sum, sens_sum))
    }

    /// Loss sums and the gradients of `sum * scale`, block by block: a forward without a graph
    /// that keeps each block's input, then for each block from the top its forward again with a
    /// graph and the backward of `sum(output * output gradient)`.
    fn checkpointed(
        &self,
        batch: &Batch,
        prefix: Option<&Tensor>,
        scale: f64,
    ) -> Result<(f64, f64, GradStore)> {
        let model = self.model;
        let vars = model.trainable_vars();
        let ctx = AttnContext::for_training(&batch.valid, model.sliding_window(), &model.device)?;
        let first = self.first_block;
        let mut h = match prefix {
            Some(p) => p.detach(),
            None => model.hidden_before(first, &batch.ids, &ctx)?.detach(),
        };
        let mut inputs = Vec::with_capacity(model.num_layers() - first);
        for layer in first..model.num_layers() {
            inputs.push(h.clone());
            h = model.block(layer, &h, &ctx, None, None)?.detach();
        }
        let top = Var::from_tensor(&h)?;
        let (sum, sens) = self.head_loss(batch, top.as_tensor(), Some(scale))?;
        let train_nll = sum.to_scalar::<f32>()? as f64;
        let mut grads = (sum * scale)?.backward()?;
        let mut g = grads
            .remove(&top)
            .ok_or_else(|| anyhow::anyhow!("checkpointing: no gradient reached the top"))?;
        for (k, layer) in (first..model.num_layers()).enumerate().rev() {
            let x = Var::from_tensor(&inputs[k])?;
            let out = model.block(layer, x.as_tensor(), &ctx, None, None)?;
            let gb = (out * &g)?.sum_all()?.backward()?;
            merge_grads(&mut grads, &gb, vars)?;
            g = gb
                .get(&x)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("checkpointing: no gradient below block {layer}"))?;
        }
        if prefix.is_none() && first == 0 {
            let x = model.embed(&batch.ids, &ctx)?;
            let gb = (x * &g)?.sum_all()?.backward()?;
            merge_grads(&mut grads, &gb, vars)?;
        }
        Ok((train_nll, sens, grads))
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
        debug_assert!(b > 0 && t > 1);
        self.head_loss(batch, &h, grad_scale)
    }

    /// One optimizer step's forward and backward over its micro-batches (each with its
    /// precomputed prefix, if any); gradients are summed over them.
    pub fn run(&self, micro_batches: &[(&Batch, Option<Tensor>)]) -> Result<StepOutput> {
        let vars = self.model.trainable_vars();
        let step_train: usize = micro_batches.iter().map(|(b, _)| b.n_train).sum();
        let mut out = StepOutput::default();
        for (batch, prefix) in micro_batches {
            out.trained_tokens += batch.n_train;
            out.sensitive_tokens += batch.n_sens;
            out.tokens += batch.n_tokens;
            let scale = (step_train > 0).then(|| 1.0 / step_train as f64);
            let g = match scale {
                Some(scale) if self.checkpoint => {
                    let (sum, sens, g) = self.checkpointed(batch, prefix.as_ref(), scale)?;
                    out.train_nll += sum;
                    out.sensitive_nll += sens;
                    g
                }
                _ => {
                    let (sum, sens) = self.loss(batch, prefix.as_ref(), scale)?;
                    out.train_nll += sum.to_scalar::<f32>()? as f64;
                    out.sensitive_nll += sens;
                    if step_train == 0 {
                        continue;
                    }
                    (sum / step_train as f64)?.backward()?
                }
            };
            out.grads = Some(match out.grads.take() {
                None => g,
                Some(mut acc) => {
                    merge_grads(&mut acc, &g, vars)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn checkpointing_gives_the_same_loss_and_gradients() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for name in ["gpt2_f32", "llama_gqa", "qwen2_bf16"] {
            let ckpt =
                crate::io::checkpoint::Checkpoint::load(&root.join(name), &Device::Cpu).unwrap();
            let probe = Model::load_frozen(&ckpt).unwrap();
            let vocab = ckpt.config.vocab_size() as u32;
            let examples: Vec<Example> = (0..3)
                .map(|r| {
                    let n = 9 + 4 * r;
                    Example {
                        ids: (0..n)
                            .map(|i| (i as u32 * 7 + r as u32 * 13) % vocab)
                            .collect(),
                        train: (0..n).map(|i| i % 4 != 2).collect(),
                        sensitive: (0..n).map(|i| i % 4 == 2).collect(),
                    }
                })
                .collect();
            let refs: Vec<&Example> = examples.iter().collect();
            let a = Batch::new(&refs[..2], &Device::Cpu).unwrap();
            let b = Batch::new(&refs[2..], &Device::Cpu).unwrap();
            for first in [0, 1] {
                let scope = match first {
                    0 => crate::train::TrainScope::All,
                    _ => crate::train::TrainScope::LastBlocks(probe.num_layers() - first),
                };
                let model =
                    Model::load(&ckpt, &crate::train::scope_predicate(&probe, scope)).unwrap();
                let plain = TrainStep::new(&model, first);
                let ckpt_step = TrainStep::new(&model, first).with_checkpointing(true);
                let batches = [(&a, None), (&b, None)];
                let x = plain.run(&batches).unwrap();
                let y = ckpt_step.run(&batches).unwrap();
                assert!((x.train_nll - y.train_nll).abs() < 1e-4 * x.train_nll.abs());
                assert!((x.sensitive_nll - y.sensitive_nll).abs() < 1e-4 * x.sensitive_nll.abs());
                let (gx, gy) = (x.grads.unwrap(), y.grads.unwrap());
                let mut compared = 0;
                for (var_name, v) in model.trainable_vars() {
                    match (gx.get(v), gy.get(v)) {
                        (Some(p), Some(q)) => {
                            let d = max_diff(p, q);
                            assert!(d < 1e-5, "{name} first {first} {var_name}: {d:e}");
                            compared += 1;
                        }
                        (None, None) => {}
                        _ => panic!("{name} first {first} {var_name}: gradient in one only"),
                    }
                }
                assert!(compared > 4, "{name}: {compared}");
            }
        }
    }
}
