//! Erasure: pick MLP intermediate units in the last transformer blocks and reset them.
//!
//! Unit j of a block is index j of the up/gate/c_fc projection (and bias) and of the
//! down/c_proj projection (see [`crate::model::UnitSlice`]). Selection is random (the paper),
//! by activation contrast on sensitive tokens, or by attribution |activation x gradient| of the
//! loss on sensitive tokens (in the spirit of DEPN).

use crate::io::checkpoint::Checkpoint;
use crate::model::init::{init_std, normal};
use crate::model::{AttnContext, Model};
use crate::nn::ops;
use crate::train::Example;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    Random,
    Activation,
    Attribution,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ResetMode {
    /// Draw from the model's initialization (normal with initializer_range, biases zero).
    Reinit,
    Zero,
    /// Copy the units from --base-model.
    Base,
}

/// The last `n` block indices.
pub fn last_layers(n_layers: usize, n: usize) -> Vec<usize> {
    (n_layers.saturating_sub(n)..n_layers).collect()
}

/// Chooses `fraction` of the MLP units of each layer in `layers`. Returns sorted unit indices per layer.
pub fn select_units(
    model: &Model,
    examples: &[Example],
    layers: &[usize],
    fraction: f64,
    selection: Selection,
    seed: u64,
    batch_size: usize,
) -> Result<BTreeMap<usize, Vec<usize>>> {
    if !(0.0..=1.0).contains(&fraction) {
        bail!("--erase-fraction must be in [0, 1], got {fraction}");
    }
    let width = model.config.mlp_width();
    let k = (fraction * width as f64).round() as usize;
    let mut out = BTreeMap::new();
    if k == 0 || layers.is_empty() {
        return Ok(out);
    }
    let scores = match selection {
        Selection::Random => None,
        Selection::Activation | Selection::Attribution => {
            Some(unit_scores(model, examples, layers, selection, batch_size)?)
        }
    };
    let mut rng = StdRng::seed_from_u64(seed);
    for (i, &layer) in layers.iter().enumerate() {
        let mut units: Vec<usize> = (0..width).collect();
        match &scores {
            None => units.shuffle(&mut rng),
            Some(s) => {
                let s = &s[i];
                units.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
            }
        }
        let mut chosen = units[..k].to_vec();
        chosen.sort_unstable();
        out.insert(layer, chosen);
    }
    Ok(out)
}

/// Per layer, per unit: how much the unit is implicated in producing sensitive tokens.
fn unit_scores(
    model_in: &Model,
    examples: &[Example],
    layers: &[usize],
    selection: Selection,
    batch_size: usize,
) -> Result<Vec<Vec<f64>>> {
    let width = model_in.config.mlp_width();
    let n_layers = model_in.num_layers();
    let first = *layers.iter().min().expect("non-empty");
    let mut sens_sum = vec![vec![0f64; width]; layers.len()];
    let mut other_sum = vec![vec![0f64; width]; layers.len()];
    let (mut n_sens, mut n_other) = (0f64, 0f64);
    for chunk in examples.chunks(batch_size.max(1)) {
        for e in chunk {
            let t = e.ids.len();
            if t < 2 {
                continue;
            }
            // Position i "produces" token i+1: it is sensitive when token i+1 is.
            let produces: Vec<f32> = (0..t)
                .map(|i| (i + 1 < t && e.sensitive[i + 1]) as u8 as f32)
                .collect();
            let n_prod: f32 = produces.iter().sum();
            if selection == Selection::Attribution && n_prod == 0.0 {
                continue;
            }
            let ids = Tensor::new(e.ids.as_slice(), &model_in.device)?.unsqueeze(0)?;
            let valid = vec![vec![true; t]];
            let ctx =
                AttnContext::for_training(&valid, model_in.sliding_window(), &model_in.device)?;
            let mut h = model_in.hidden_before(first, &ids, &ctx)?;
            // candle keeps gradients of variables only: a zero variable added to the output of
            // each scored block receives dL/d(block output); the MLP activation's gradient is
            // that times the down projection.
            let mut wanted: Vec<(usize, Tensor, Option<candle_core::Var>)> = Vec::new();
            for layer in first..n_layers {
                let mut one = Vec::new();
                h = model_in.block(layer, &h, &ctx, None, Some(&mut one))?;
                if layers.contains(&layer) {
                    let act = one.pop().expect("block traces its MLP");
                    let probe = (selection == Selection::Attribution)
                        .then(|| candle_core::Var::zeros(h.dims(), DType::F32, h.device()))
                        .transpose()?;
                    if let Some(p) = &probe {
                        h = (h + p.as_tensor())?;
                    }
                    wanted.push((layer, act, probe));
                }
            }
            let grads = if selection == Selection::Attribution {
                let logits = model_in.logits(&h.narrow(1, 0, t - 1)?)?.squeeze(0)?;
                let targets = ids.squeeze(0)?.narrow(0, 1, t - 1)?;
                let w = Tensor::new(&produces[..t - 1], &model_in.device)?;
                let loss = (ops::token_nll(&logits, &targets)? * w)?.sum_all()?;
                Some(loss.backward()?)
            } else {
                None
            };
            let mask = Tensor::new(produces.as_slice(), &model_in.device)?.unsqueeze(1)?;
            for (i, (layer, act, probe)) in wanted.iter().enumerate() {
                let a = act.detach().squeeze(0)?; // [t, width]
                let score = match (&grads, probe) {
                    (Some(g), Some(p)) => {
                        let Some(g_out) = g.get(p) else {
                            bail!("attribution: no gradient reached layer {layer}'s output");
                        };
                        // d act = d out @ W_down^T, with W_down as [width, d].
                        let ga = g_out
                            .squeeze(0)?
                            .matmul(&model_in.mlp_down_weight(*layer)?.t()?)?;
                        (a * ga)?.abs()?
                    }
                    _ => a.abs()?,
                };
                let s_sum = score
                    .broadcast_mul(&mask)?
                    .sum(0)?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?;
                let total = score.sum(0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                for u in 0..width {
                    sens_sum[i][u] += s_sum[u];
                    other_sum[i][u] += total[u] - s_sum[u];
                }
            }
            n_sens += n_prod as f64;
            n_other += (t as f32 - n_prod) as f64;
        }
    }
    if n_sens == 0.0 {
        bail!("--select {selection:?}: the corpus has no sensitive tokens to score units on");
    }
    Ok(sens_sum
        .iter()
        .zip(&other_sum)
        .map(|(s, o)| match selection {
            Selection::Activation => s
                .iter()
                .zip(o)
                .map(|(s, o)| s / n_sens - o / n_other.max(1.0))
                .collect(),
            _ => s.iter().map(|s| s / n_sens).collect(),
        })
        .collect())
}

/// Resets the chosen units of every layer in place. `base` is required for [`ResetMode::Base`].
pub fn reset_units(
    ckpt: &Checkpoint,
    model: &Model,
    units: &BTreeMap<usize, Vec<usize>>,
    mode: ResetMode,
    base: Option<&Checkpoint>,
    seed: u64,
) -> Result<Vec<ResetTensor>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_e7a5e);
    let mut reset = Vec::new();
    for (&layer, chosen) in units {
        for slice in model.mlp_unit_slices(layer) {
            let entry = ckpt
                .entry(&slice.name)
                .expect("model tensors are in the checkpoint");
            let var = ckpt.var(&slice.name, &entry.shape)?;
            let dims = var.dims().to_vec();
            let mut data = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let base_data = match (mode, base) {
                (ResetMode::Base, Some(b)) => {
                    let bv = b.var(&slice.name, &dims).map_err(|e| {
                        e.context(format!(
                            "--base-model {}: does not match the model",
                            b.dir.display()
                        ))
                    })?;
                    Some(bv.as_tensor().flatten_all()?.to_vec1::<f32>()?)
                }
                (ResetMode::Base, None) => bail!("--reset base needs --base-model DIR"),
                _ => None,
            };
            let std = init_std(&ckpt.config, &slice.name);
            // Row-major: index = outer * (dim * inner) + j * inner + r.
            let dim = dims[slice.axis];
            let inner: usize = dims[slice.axis + 1..].iter().product();
            let outer: usize = dims[..slice.axis].iter().product();
            let rows = slice.indices(chosen);
            if let Some(&last) = rows.last() {
                if last >= dim {
                    bail!(
                        "{}: unit index {last} out of range (axis {} has {dim})",
                        slice.name,
                        slice.axis
                    );
                }
            }
            for o in 0..outer {
                for &j in &rows {
                    for r in 0..inner {
                        let idx = (o * dim + j) * inner + r;
                        data[idx] = match mode {
                            ResetMode::Zero => 0.0,
                            ResetMode::Base => base_data.as_ref().expect("checked")[idx],
                            ResetMode::Reinit => match std {
                                Some(s) => (normal(&mut rng) * s) as f32,
                                None => 0.0,
                            },
                        };
                    }
                }
            }
            var.set(&Tensor::from_vec(data, dims.as_slice(), var.device())?)?;
            reset.push(ResetTensor {
                layer,
                tensor: slice.name.clone(),
                axis: slice.axis,
                indices: rows,
            });
        }
    }
    Ok(reset)
}

/// One tensor erasure changed: the indices along `axis` that were reset (rows of a [out, in]
/// projection when `axis` is 0, columns when 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetTensor {
    pub layer: usize,
    pub tensor: String,
    pub axis: usize,
    pub indices: Vec<usize>,
}
