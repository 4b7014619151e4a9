//! One training step, callable on its own (the loop and the benchmark both call it): forward
//! over micro-batches of examples packed into right-padded rows, the NLL summed over trained
//! targets (and, detached, over sensitive ones), backward, and gradients summed over the
//! micro-batches of an optimizer step.
//!
//! Blocks before `first_block` are frozen; their output can be given as a precomputed prefix
//! (see [`frozen_prefix`]) so that only the trained blocks run.

use crate::data::tokens::RowLayout;
use crate::model::{AttnContext, Model};
use anyhow::Result;
use candle_core::{backprop::GradStore, Device, Tensor, Var};
use std::collections::BTreeMap;

/// One training sequence: token ids and, per position, whether its token is a training target
/// (`train`), whether it is sensitive (reported separately, never trained on in mask mode), and
/// whether it is a true sensitive token to make less likely (`forget`; empty: none).
#[derive(Debug, Clone, Default)]
pub struct Example {
    pub ids: Vec<u32>,
    pub train: Vec<bool>,
    pub sensitive: Vec<bool>,
    pub forget: Vec<bool>,
    /// Where it comes from (`sani prepare` writes it beside the tokens).
    pub origin: Origin,
}

/// The document (index into the corpus) and the position of the window's first token in that
/// document's framed sequence that an example was cut from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin {
    pub doc: usize,
    pub start: usize,
}

/// A batch on the device: rows of whole examples back to back, right-padded, with target
/// weights (shifted: position i predicts i+1; the last position of an example predicts
/// nothing, even where another example follows it in the row).
pub struct Batch {
    pub ids: Tensor,
    /// Which examples (indices into those the batch was made of) each row holds.
    pub layout: RowLayout,
    train_w: Tensor,
    /// `train_w` on the host.
    train_weights: Vec<f32>,
    sens_w: Tensor,
    /// 1 where the target is a token to forget (shifted like `train_w`).
    forget: Vec<bool>,
    pub n_forget: usize,
    pub n_train: usize,
    pub n_sens: usize,
    pub n_tokens: usize,
}

impl Batch {
    /// One example to a row.
    pub fn new(examples: &[&Example], device: &Device) -> Result<Batch> {
        let lens: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
        Self::with_layout(examples, RowLayout::one_each(&lens), device)
    }

    /// The layout that costs least on `device` ([`RowLayout::cheapest_on`]).
    pub fn for_device(examples: &[&Example], device: &Device) -> Result<Batch> {
        let lens: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
        Self::with_layout(
            examples,
            RowLayout::cheapest_on(&lens, device.is_cpu()),
            device,
        )
    }

    /// The examples laid out as `layout` says (each index exactly once).
    pub fn with_layout(examples: &[&Example], layout: RowLayout, device: &Device) -> Result<Batch> {
        let (b, t) = (layout.rows.len(), layout.width);
        let seqs: Vec<&[u32]> = examples.iter().map(|e| e.ids.as_slice()).collect();
        let ids = layout.ids(&seqs);
        let mut train_w = Vec::with_capacity(b * (t - 1));
        let mut sens_w = Vec::with_capacity(b * (t - 1));
        let mut forget = Vec::with_capacity(b * (t - 1));
        let (mut n_train, mut n_sens, mut n_forget) = (0, 0, 0);
        let n_tokens = seqs.iter().map(|s| s.len()).sum();
        for row in &layout.rows {
            // Per position of the row: the example and the index in it (None: padding).
            let mut at: Vec<Option<(&Example, usize)>> = Vec::with_capacity(t);
            for &i in row {
                let e = examples[i];
                at.extend((0..e.ids.len()).map(|j| Some((e, j))));
            }
            at.resize(t, None);
            // Target i is token j of an example whose token j - 1 is at position i - 1.
            for slot in &at[1..] {
                let (tr, se, fo) = match *slot {
                    Some((e, j)) if j > 0 => (
                        e.train[j],
                        e.sensitive[j],
                        e.forget.get(j).copied().unwrap_or(false),
                    ),
                    _ => (false, false, false),
                };
                n_train += tr as usize;
                n_sens += se as usize;
                n_forget += fo as usize;
                forget.push(fo);
                train_w.push(tr as u8 as f32);
                sens_w.push(se as u8 as f32);
            }
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            layout,
            train_w: Tensor::from_vec(train_w.clone(), b * (t - 1), device)?,
            train_weights: train_w,
            sens_w: Tensor::from_vec(sens_w, b * (t - 1), device)?,
            forget,
            n_forget,
            n_train,
            n_sens,
            n_tokens,
        })
    }

    /// The attention context of this layout (see [`AttnContext::for_segments`]).
    pub fn attention_context(&self, model: &Model) -> Result<AttnContext> {
        AttnContext::for_segments(
            &self.layout.segments,
            self.layout.width,
            model.sliding_window(),
            &model.device,
        )
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
    /// Under checkpointing: the memory of block activations the forward may keep for the
    /// backward instead of recomputing them.
    keep_bytes: usize,
    /// Weight of the bounded unlikelihood term on `forget` targets (0: none).
    forget_weight: f64,
    /// Whether the unlikelihood term weighs each forget target like a trained token (times
    /// the weight) instead of being the mean over the batch's forget targets.
    forget_per_token: bool,
    /// The mean NLL of the surrogate (sensitive) targets last seen: the level up to which a
    /// forget target's NLL is pushed.
    forget_level: std::cell::Cell<Option<f64>>,
}

/// Whether checkpointing uses the blocks' hand-written backward where they have one
/// ([`Model::block_grads`]); `SANI_HAND_BACKWARD=0` differentiates every block's graph instead
/// (for A/B measurements).
fn hand_written_backward() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SANI_HAND_BACKWARD").map_or(true, |v| v != "0"))
}

/// Adds `g` to the gradient `acc` holds for `t` (or stores it, when there is none yet).
fn accumulate(acc: &mut GradStore, t: &Tensor, g: Tensor) -> Result<()> {
    let sum = match acc.remove(t) {
        Some(old) => (old + g)?,
        None => g,
    };
    acc.insert(t, sum);
    Ok(())
}

/// Adds every gradient of `new` for `vars` into `acc`.
fn merge_grads(acc: &mut GradStore, new: &GradStore, vars: &BTreeMap<String, Var>) -> Result<()> {
    for v in vars.values() {
        if let Some(g) = new.get(v) {
            accumulate(acc, v, g.clone())?;
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
            keep_bytes: 0,
            forget_weight: 0.0,
            forget_per_token: false,
            forget_level: std::cell::Cell::new(None),
        }
    }

    /// Bounded unlikelihood on the true sensitive tokens (`Example::forget`): the objective
    /// gains `-weight * mean(NLL)` over the forget targets whose NLL is still below the mean NLL
    /// of the surrogate tokens (fresh fakes): the true value is pushed until it is no likelier
    /// than a fake, not beyond, so fluency holds and the true value does not stand out as
    /// unlikely either.
    pub fn with_forgetting(mut self, weight: f64) -> Self {
        self.forget_weight = weight;
        self
    }

    /// The unlikelihood term as `-weight * NLL` per forget target, normalized like the trained
    /// tokens (by their count), instead of a mean over the batch's forget targets: a batch
    /// with few forget targets then pushes each of them no harder than one with many (used
    /// when true documents are mixed into the epoch, see [`crate::train::Forgetting::Share`]).
    pub fn forget_per_token(mut self, on: bool) -> Self {
        self.forget_per_token = on;
        self
    }

    /// Activation checkpointing: the forward keeps only each block's input; the backward
    /// recomputes one block at a time (one more forward pass, activation memory of one block).
    pub fn with_checkpointing(mut self, on: bool) -> Self {
        self.checkpoint = on;
        self
    }

    /// Under checkpointing, keep up to `bytes` of the lowest blocks' activations from the
    /// forward for their hand-written backward ([`Model::block_keeping`]), which then does not
    /// run their forward again: memory traded for about a quarter of the blocks' GEMM work.
    /// Blocks without a hand-written backward are recomputed regardless.
    pub fn keeping_activations(mut self, bytes: usize) -> Self {
        self.keep_bytes = bytes;
        self
    }

    /// The NLL sums of the final hidden states `h` (see [`TrainStep::loss`]); with forget
    /// targets, the differentiable sum also holds the unlikelihood term, divided by
    /// `grad_scale` so that the caller's scaling leaves it as its own mean (the third value is
    /// then the plain trained sum).
    fn head_loss(
        &self,
        batch: &Batch,
        h: &Tensor,
        grad_scale: Option<f64>,
    ) -> Result<(Tensor, f64, f64)> {
        let t = batch.ids.dim(1)?;
        let targets = batch.ids.narrow(1, 1, t - 1)?.flatten_all()?;
        let forgetting = self.forget_weight > 0.0 && batch.n_forget > 0;
        // The head computes its gradient in the forward when it is known beforehand: the
        // trained tokens' weights. Forget targets take no part in it (their train weight is 0);
        // their unlikelihood weights depend on the NLL, so they get a second, small head pass.
        let row_grad = grad_scale.map(|s| {
            let s = s as f32;
            batch.train_weights.iter().map(|w| w * s).collect()
        });
        let hidden = h.narrow(1, 0, t - 1)?.contiguous()?;
        let nll = self.model.token_nll(&hidden, &targets, row_grad)?;
        let train_sum = (&nll * &batch.train_w)?.sum_all()?;
        let sens_sum = (nll.detach() * &batch.sens_w)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        let train_value = train_sum.to_scalar::<f32>()? as f64;
        if batch.n_sens > 0 {
            self.forget_level.set(Some(sens_sum / batch.n_sens as f64));
        }
        let (Some(scale), true, Some(level)) = (grad_scale, forgetting, self.forget_level.get())
        else {
            return Ok((train_sum, train_value, sens_sum));
        };
        let values = nll.detach().to_vec1::<f32>()?;
        let push = match self.forget_per_token {
            true => -self.forget_weight as f32,
            false => -(self.forget_weight / batch.n_forget as f64 / scale) as f32,
        };
        let rows: Vec<u32> = values
            .iter()
            .zip(&batch.forget)
            .enumerate()
            .filter(|(_, (&v, &f))| f && (v as f64) < level)
            .map(|(i, _)| i as u32)
            .collect();
        if rows.is_empty() {
            return Ok((train_sum, train_value, sens_sum));
        }
        let n = rows.len();
        let index = Tensor::from_vec(rows, n, nll.device())?;
        let d = hidden.dim(2)?;
        let picked = hidden.reshape(((), d))?.index_select(&index, 0)?;
        let picked_targets = targets.index_select(&index, 0)?;
        let announced = vec![push * scale as f32; n];
        let forget_nll = self
            .model
            .token_nll(&picked, &picked_targets, Some(announced))?;
        Ok((
            (train_sum + (forget_nll.sum_all()? * push as f64)?)?,
            train_value,
            sens_sum,
        ))
    }

    /// Loss sums and the gradients of `sum * scale`, block by block: a forward without a graph
    /// that keeps each block's input (and, within `keep_bytes`, what its hand-written backward
    /// reads), then for each block from the top its hand-written backward, or else its forward
    /// again with a graph and the backward of `sum(output * output gradient)`.
    fn checkpointed(
        &self,
        batch: &Batch,
        prefix: Option<&Tensor>,
        scale: f64,
    ) -> Result<(f64, f64, GradStore)> {
        let model = self.model;
        let vars = model.trainable_vars();
        let ctx = batch.attention_context(model)?;
        let first = self.first_block;
        let mut h = match prefix {
            Some(p) => p.detach(),
            None => model.hidden_before(first, &batch.ids, &ctx)?.detach(),
        };
        let mut inputs = Vec::with_capacity(model.num_layers() - first);
        let mut kept = Vec::with_capacity(model.num_layers() - first);
        let mut budget = match hand_written_backward() {
            true => self.keep_bytes,
            false => 0,
        };
        for layer in first..model.num_layers() {
            inputs.push(Some(h.clone()));
            let keeping = match budget > 0 {
                true => model.block_keeping(layer, &h, &ctx)?,
                false => None,
            };
            h = match keeping {
                Some((out, k)) => {
                    // A block over what is left is dropped, and keeping stops there.
                    let fits = k.bytes() <= budget;
                    budget = match fits {
                        true => budget - k.bytes(),
                        false => 0,
                    };
                    kept.push(fits.then_some(k));
                    out
                }
                None => {
                    kept.push(None);
                    model.block(layer, &h, &ctx, None, None)?.detach()
                }
            };
        }
        let top = Var::from_tensor(&h)?;
        let (sum, train_nll, sens) = self.head_loss(batch, top.as_tensor(), Some(scale))?;
        let mut grads = (sum * scale)?.backward()?;
        let mut g = grads
            .remove(&top)
            .ok_or_else(|| anyhow::anyhow!("checkpointing: no gradient reached the top"))?;
        // The embedding, when the lowest block's input gradient has somewhere to go.
        let embedded = match prefix.is_none() && first == 0 {
            true => Some(model.embed(&batch.ids, &ctx)?).filter(|x| x.track_op()),
            false => None,
        };
        for (k, layer) in (first..model.num_layers()).enumerate().rev() {
            // Taken, not borrowed: each block input is freed once its block is done, and its
            // memory serves the gradients of the blocks below.
            let input = inputs[k].take().expect("each block input is taken once");
            let want_input = k > 0 || embedded.is_some();
            let by_hand = match hand_written_backward() {
                true => model.block_grads(layer, &input, kept[k].take(), &g, &ctx, want_input)?,
                false => None,
            };
            if let Some(bg) = by_hand {
                drop(input);
                for (w, dw) in bg.weights {
                    accumulate(&mut grads, &w, dw)?;
                }
                match bg.input {
                    Some(dx) => g = dx,
                    None => break,
                }
                continue;
            }
            let x = Var::from_tensor(&input)?;
            drop(input);
            let out = model.block(layer, x.as_tensor(), &ctx, None, None)?;
            let gb = (out * &g)?.sum_all()?.backward()?;
            merge_grads(&mut grads, &gb, vars)?;
            g = gb
                .get(&x)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("checkpointing: no gradient below block {layer}"))?;
        }
        if let Some(x) = embedded {
            let gb = (x * &g)?.sum_all()?.backward()?;
            merge_grads(&mut grads, &gb, vars)?;
        }
        Ok((train_nll, sens, grads))
    }

    /// (the objective: sum of NLL over trained targets plus the unlikelihood term, see
    /// [`TrainStep::with_forgetting`] — differentiable; that NLL sum; the sum over sensitive
    /// targets). `prefix`: the hidden states entering `first_block`, when precomputed.
    /// `grad_scale`: the gradient the caller will send back to the objective (1 / trained
    /// targets of the step), which lets the head compute its gradients in the forward pass.
    pub fn loss(
        &self,
        batch: &Batch,
        prefix: Option<&Tensor>,
        grad_scale: Option<f64>,
    ) -> Result<(Tensor, f64, f64)> {
        let model = self.model;
        let (b, t) = batch.ids.dims2()?;
        let ctx = batch.attention_context(model)?;
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
                    let (sum, train_nll, sens) = self.loss(batch, prefix.as_ref(), scale)?;
                    out.train_nll += train_nll;
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

/// The prefixes of a micro-batch laid out like `batch` (each row's examples back to back),
/// right-padded with zeros to its width, and stacked; `prefix[i]` belongs to the batch's
/// example i.
pub fn stack_prefix(prefix: &[&Tensor], batch: &Batch) -> Result<Tensor> {
    let t = batch.layout.width;
    let rows = batch
        .layout
        .rows
        .iter()
        .map(|row| {
            let parts: Vec<&Tensor> = row.iter().map(|&i| prefix[i]).collect();
            let joined = Tensor::cat(&parts, 0)?;
            let n = joined.dim(0)?;
            match n == t {
                true => Ok(joined),
                false => joined.pad_with_zeros(0, 0, t - n),
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
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

    /// Asserts that two runs of a step give the same losses (to 1e-4) and gradients (to 1e-5).
    fn assert_same_step(what: &str, model: &Model, x: StepOutput, y: StepOutput) {
        assert!(
            (x.train_nll - y.train_nll).abs() < 1e-4 * x.train_nll.abs(),
            "{what}: {} vs {}",
            x.train_nll,
            y.train_nll
        );
        assert!((x.sensitive_nll - y.sensitive_nll).abs() < 1e-4 * x.sensitive_nll.abs());
        let (gx, gy) = (x.grads.unwrap(), y.grads.unwrap());
        let mut compared = 0;
        for (var_name, v) in model.trainable_vars() {
            match (gx.get(v), gy.get(v)) {
                (Some(p), Some(q)) => {
                    let d = max_diff(p, q);
                    assert!(d < 1e-5, "{what} {var_name}: {d:e}");
                    compared += 1;
                }
                (None, None) => {}
                _ => panic!("{what} {var_name}: gradient in one only"),
            }
        }
        assert!(compared > 4, "{what}: {compared}");
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
                        forget: Vec::new(),
                        ids: (0..n)
                            .map(|i| (i as u32 * 7 + r as u32 * 13) % vocab)
                            .collect(),
                        train: (0..n).map(|i| i % 4 != 2).collect(),
                        sensitive: (0..n).map(|i| i % 4 == 2).collect(),
                        origin: Origin::default(),
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
                assert_same_step(&format!("{name} first {first}"), &model, x, y);
            }
        }
    }

    /// The hand-written block backward (Llama family, checkpointing) against autograd over the
    /// whole graph, for each choice of trained modules: every weight, the MLPs only (the
    /// default: frozen embedding, so the lowest block's input gradient is skipped), the
    /// attention only, and the norms only.
    #[test]
    fn hand_written_block_backward_matches_autograd_for_each_trained_part() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for name in ["llama_gqa", "qwen2_bf16"] {
            let ckpt =
                crate::io::checkpoint::Checkpoint::load(&root.join(name), &Device::Cpu).unwrap();
            let vocab = ckpt.config.vocab_size() as u32;
            let examples: Vec<Example> = (0..3)
                .map(|r| {
                    let n = 8 + 5 * r;
                    Example {
                        forget: Vec::new(),
                        ids: (0..n)
                            .map(|i| (i as u32 * 5 + r as u32 * 3 + 1) % vocab)
                            .collect(),
                        train: (0..n).map(|i| i % 3 != 1).collect(),
                        sensitive: (0..n).map(|i| i % 3 == 1).collect(),
                        origin: Origin::default(),
                    }
                })
                .collect();
            let refs: Vec<&Example> = examples.iter().collect();
            let batch = Batch::for_device(&refs, &Device::Cpu).unwrap();
            for modules in [
                vec![],
                vec!["mlp"],
                vec!["self_attn"],
                vec!["input_layernorm", "post_attention_layernorm", "norm"],
            ] {
                let modules: Vec<String> = modules.into_iter().map(String::from).collect();
                let model =
                    Model::load(&ckpt, &|n: &str| crate::train::in_modules(n, &modules)).unwrap();
                let ctx = batch.attention_context(&model).unwrap();
                let x0 = model.embed(&batch.ids, &ctx).unwrap();
                let top = model.num_layers() - 1;
                let g = Tensor::ones_like(&x0).unwrap();
                assert!(
                    model
                        .block_grads(top, &x0, None, &g, &ctx, true)
                        .unwrap()
                        .is_some(),
                    "{name}: the hand-written backward applies"
                );
                let (_, kept) = model.block_keeping(0, &x0, &ctx).unwrap().unwrap();
                let run = |checkpointing, keep_bytes| {
                    TrainStep::new(&model, 0)
                        .with_checkpointing(checkpointing)
                        .keeping_activations(keep_bytes)
                        .run(&[(&batch, None)])
                        .unwrap()
                };
                // Every block kept, one kept (the next is over the budget), none.
                for keep in [usize::MAX, kept.bytes() + 1, 0] {
                    assert_same_step(
                        &format!("{name} {modules:?} keeping {keep}"),
                        &model,
                        run(false, 0),
                        run(true, keep),
                    );
                }
            }
        }
    }

    #[test]
    fn frozen_projections_held_in_16_bits_give_the_same_loss_and_gradients() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_bf16");
        let load = || crate::io::checkpoint::Checkpoint::load(&dir, &Device::Cpu).unwrap();
        let vocab = load().config.vocab_size() as u32;
        let examples: Vec<Example> = (0..2)
            .map(|r| {
                let n = 10 + 3 * r;
                Example {
                    forget: Vec::new(),
                    ids: (0..n)
                        .map(|i| (i as u32 * 5 + r as u32 * 17) % vocab)
                        .collect(),
                    train: vec![true; n],
                    sensitive: (0..n).map(|i| i % 5 == 3).collect(),
                    origin: Origin::default(),
                }
            })
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let batch = Batch::new(&refs, &Device::Cpu).unwrap();
        let mlp = |n: &str| crate::train::in_modules(n, &["mlp".to_string()]);
        for checkpointing in [false, true] {
            let (wide, narrow) = (load(), load());
            let reference = Model::load(&wide, &mlp).unwrap();
            let model = Model::load_to_train(&narrow, &mlp, None).unwrap();
            let held: Vec<(String, candle_core::DType)> = narrow
                .vars()
                .into_iter()
                .map(|(n, v)| (n, v.dtype()))
                .collect();
            let is_frozen_projection = |n: &str| n.ends_with("_proj.weight") && !mlp(n);
            assert!(held.iter().any(|(n, _)| is_frozen_projection(n)));
            for (name, dtype) in &held {
                let want = match is_frozen_projection(name) {
                    true => candle_core::DType::BF16,
                    false => candle_core::DType::F32,
                };
                assert_eq!(*dtype, want, "{name}");
            }
            let run = |m: &Model| {
                TrainStep::new(m, 0)
                    .with_checkpointing(checkpointing)
                    .run(&[(&batch, None)])
                    .unwrap()
            };
            let (x, y) = (run(&reference), run(&model));
            assert_eq!(x.train_nll, y.train_nll);
            let (gx, gy) = (x.grads.unwrap(), y.grads.unwrap());
            let pairs: Vec<_> = reference
                .trainable_vars()
                .iter()
                .zip(model.trainable_vars())
                .collect();
            assert!(pairs.len() >= 3);
            for ((name, p), (_, q)) in pairs {
                let (p, q) = (gx.get(p).unwrap(), gy.get(q).unwrap());
                assert_eq!(max_diff(p, q), 0.0, "{name} checkpointing {checkpointing}");
            }
        }
    }

    #[test]
    fn forgetting_pushes_true_tokens_only_up_to_the_surrogate_level() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let ckpt =
            crate::io::checkpoint::Checkpoint::load(&root.join("llama_gqa"), &Device::Cpu).unwrap();
        let model = Model::load(&ckpt, &|_| true).unwrap();
        let vocab = ckpt.config.vocab_size() as u32;
        let n = 12;
        let ids: Vec<u32> = (0..n).map(|i| (i as u32 * 11 + 3) % vocab).collect();
        // A surrogate window (every token trained, positions 4..7 sensitive) and the true window
        // (nothing trained, the same positions to forget).
        let surrogate = |sensitive: bool| Example {
            ids: ids.clone(),
            train: vec![true; n],
            sensitive: (0..n).map(|i| sensitive && (4..7).contains(&i)).collect(),
            forget: Vec::new(),
            origin: Origin::default(),
        };
        // The same ids: the forget targets' NLLs are the sensitive ones, so those below their
        // mean are pushed.
        let truth = Example {
            ids: ids.clone(),
            train: vec![false; n],
            sensitive: vec![false; n],
            forget: (0..n).map(|i| (4..7).contains(&i)).collect(),
            origin: Origin::default(),
        };
        let grads_of = |step: &TrainStep, examples: &[&Example]| {
            let batch = Batch::new(examples, &Device::Cpu).unwrap();
            assert_eq!(batch.n_forget, 3);
            step.run(&[(&batch, None)]).unwrap()
        };
        let (s, plain_s) = (surrogate(true), surrogate(false));
        for checkpoint in [false, true] {
            let plain = TrainStep::new(&model, 0).with_checkpointing(checkpoint);
            let forgetting = TrainStep::new(&model, 0)
                .with_checkpointing(checkpoint)
                .with_forgetting(0.5);
            let base = grads_of(&plain, &[&s, &truth]);
            let pushed = grads_of(&forgetting, &[&s, &truth]);
            // The trained NLL is reported the same; the gradients differ by the push.
            assert!((base.train_nll - pushed.train_nll).abs() < 1e-4 * base.train_nll);
            let (gb, gp) = (base.grads.unwrap(), pushed.grads.unwrap());
            let moved = model
                .trainable_vars()
                .values()
                .map(|v| max_diff(gb.get(v).unwrap(), gp.get(v).unwrap()))
                .fold(0f32, f32::max);
            assert!(
                moved > 1e-6,
                "checkpoint {checkpoint}: the push changed nothing"
            );
            // Without surrogate tokens there is no level, so no push: the plain gradients.
            let none = grads_of(
                &TrainStep::new(&model, 0)
                    .with_checkpointing(checkpoint)
                    .with_forgetting(0.5),
                &[&plain_s, &truth],
            );
            let reference = grads_of(&plain, &[&plain_s, &truth]);
            let (gn, gr) = (none.grads.unwrap(), reference.grads.unwrap());
            for v in model.trainable_vars().values() {
                assert!(max_diff(gn.get(v).unwrap(), gr.get(v).unwrap()) < 1e-6);
            }
        }
    }

    #[test]
    fn examples_packed_in_pairs_give_the_loss_and_gradients_of_a_row_each() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        // gemma3, qwen3 and phi3 have sliding windows shorter than the examples.
        for name in [
            "gpt2_f32",
            "llama_gqa",
            "qwen2_bf16",
            "gemma3_f32",
            "qwen3_f32",
            "phi3_f32",
        ] {
            let ckpt =
                crate::io::checkpoint::Checkpoint::load(&root.join(name), &Device::Cpu).unwrap();
            let vocab = ckpt.config.vocab_size() as u32;
            let examples: Vec<Example> = [7usize, 15, 9, 12, 20]
                .iter()
                .enumerate()
                .map(|(r, &n)| Example {
                    ids: (0..n)
                        .map(|i| (i as u32 * 7 + r as u32 * 13 + 1) % vocab)
                        .collect(),
                    train: (0..n).map(|i| r != 2 && i % 4 != 2).collect(),
                    sensitive: (0..n).map(|i| r != 2 && i % 4 == 2).collect(),
                    forget: (0..n).map(|i| r == 2 && i % 3 == 1).collect(),
                    origin: Origin::default(),
                })
                .collect();
            let refs: Vec<&Example> = examples.iter().collect();
            let one_each = Batch::new(&refs, &Device::Cpu).unwrap();
            let packed = Batch::for_device(&refs, &Device::Cpu).unwrap();
            assert_eq!(packed.layout.rows, vec![vec![4, 0], vec![1, 2], vec![3]]);
            assert_eq!(packed.ids.dims2().unwrap(), (3, 27));
            assert_eq!(
                (
                    packed.n_train,
                    packed.n_sens,
                    packed.n_forget,
                    packed.n_tokens
                ),
                (
                    one_each.n_train,
                    one_each.n_sens,
                    one_each.n_forget,
                    one_each.n_tokens
                )
            );
            for first in [0, 1] {
                let model = Model::load(&ckpt, &|_: &str| true).unwrap();
                let prefix = |batch: &Batch| {
                    (first > 0).then(|| {
                        let p = frozen_prefix(&model, &examples, first).unwrap();
                        stack_prefix(&p.iter().collect::<Vec<_>>(), batch).unwrap()
                    })
                };
                for checkpoint in [false, true] {
                    let step = TrainStep::new(&model, first)
                        .with_checkpointing(checkpoint)
                        .with_forgetting(0.5);
                    let x = step.run(&[(&one_each, prefix(&one_each))]).unwrap();
                    let y = step.run(&[(&packed, prefix(&packed))]).unwrap();
                    let what = format!("{name} first {first} checkpoint {checkpoint}");
                    assert_same_step(&what, &model, x, y);
                }
            }
        }
    }
}
