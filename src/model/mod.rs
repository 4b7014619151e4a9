//! Causal language models written on gradient-carrying candle ops, one implementation for
//! training (full sequence, logits at every position, padding mask) and generation (KV cache,
//! left padding).
//!
//! Weights come from a [`Checkpoint`] by their HF names. Each tensor is either trainable (the
//! var itself, so gradients reach it) or frozen (a detached view: no gradient is computed).

pub mod config;
pub mod generate;
mod gpt2;
mod llama;

use crate::io::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::nn::ops;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use std::collections::{BTreeMap, HashSet};

pub use gpt2::Gpt2;
pub use llama::Llama;

/// Per-layer cached keys and values ([b, kv_heads, s, head_dim]) for incremental decoding.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
        }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keeps only the batch rows `rows` (in that order), e.g. to drop finished sequences.
    pub fn select_rows(&mut self, rows: &Tensor) -> candle_core::Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }

    /// Appends new keys/values of `layer` and returns the full ones.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// What the attention of one forward call needs besides the hidden states.
pub struct AttnContext {
    /// [b, t] u32 absolute positions of the new tokens.
    pub positions: Tensor,
    /// [b, 1, t, s] additive mask, full attention.
    pub mask: Tensor,
    /// The same with the sliding window, for layers that use one.
    pub window_mask: Option<Tensor>,
}

impl AttnContext {
    /// Context for `q_len` new tokens after `past` cached ones; `key_valid[b]` has past+q_len flags.
    pub fn new(
        key_valid: &[Vec<bool>],
        q_len: usize,
        past: usize,
        window: Option<usize>,
        from_mask_positions: bool,
        device: &Device,
    ) -> Result<Self> {
        let positions = if from_mask_positions {
            ops::positions_from_mask(key_valid, q_len, device)?
        } else {
            let b = key_valid.len();
            Tensor::arange(past as u32, (past + q_len) as u32, device)?
                .unsqueeze(0)?
                .repeat((b, 1))?
        };
        let mask = ops::attention_mask(key_valid, q_len, past, None, device)?;
        let window_mask = match window {
            Some(w) => Some(ops::attention_mask(
                key_valid,
                q_len,
                past,
                Some(w),
                device,
            )?),
            None => None,
        };
        Ok(AttnContext {
            positions,
            mask,
            window_mask,
        })
    }

    /// Full-sequence training context: right-padded rows, positions 0..t.
    pub fn for_training(
        key_valid: &[Vec<bool>],
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let t = key_valid.first().map_or(0, Vec::len);
        Self::new(key_valid, t, 0, window, false, device)
    }

    pub(crate) fn mask_for(&self, window: Option<usize>) -> &Tensor {
        match (window, &self.window_mask) {
            (Some(_), Some(m)) => m,
            _ => &self.mask,
        }
    }
}

/// The tensors that hold one MLP intermediate unit: unit j is index j along `axis` of each.
#[derive(Debug, Clone)]
pub struct UnitSlice {
    pub name: String,
    pub axis: usize,
}

#[allow(clippy::large_enum_variant)] // one per loaded model
enum Arch {
    Gpt2(Gpt2),
    Llama(Llama),
}

/// A loaded causal LM.
pub struct Model {
    pub config: ModelConfig,
    arch: Arch,
    pub device: Device,
    trainable: BTreeMap<String, Var>,
}

/// Looks tensors up in the checkpoint, recording which names were used and which are trainable.
pub(crate) struct WeightLoader<'a> {
    ckpt: &'a Checkpoint,
    trainable: &'a dyn Fn(&str) -> bool,
    pub used: HashSet<String>,
    pub vars: BTreeMap<String, Var>,
}

impl WeightLoader<'_> {
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let var = self.ckpt.var(name, shape)?;
        self.used.insert(name.to_string());
        if (self.trainable)(name) {
            self.vars.insert(name.to_string(), var.clone());
            Ok(var.as_tensor().clone())
        } else {
            Ok(var.as_tensor().detach())
        }
    }
    pub fn has(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }
}

impl Model {
    /// Builds the model from a checkpoint; `trainable(name)` decides which tensors get gradients.
    /// Fails on a missing tensor, a shape mismatch, or a tensor the model does not use.
    pub fn load(ckpt: &Checkpoint, trainable: &dyn Fn(&str) -> bool) -> Result<Self> {
        let mut loader = WeightLoader {
            ckpt,
            trainable,
            used: HashSet::new(),
            vars: BTreeMap::new(),
        };
        let arch = match &ckpt.config {
            ModelConfig::Gpt2(c) => {
                let m = Gpt2::load(&mut loader, c)?;
                ckpt.check_no_extra(&loader.used, gpt2::is_known_buffer)?;
                Arch::Gpt2(m)
            }
            ModelConfig::Llama(c, flavor) => {
                let m = Llama::load(&mut loader, c, *flavor)?;
                ckpt.check_no_extra(&loader.used, llama::is_known_buffer)?;
                Arch::Llama(m)
            }
        };
        Ok(Model {
            config: ckpt.config.clone(),
            arch,
            device: ckpt.device.clone(),
            trainable: loader.vars,
        })
    }

    /// Loads with every tensor frozen (inference).
    pub fn load_frozen(ckpt: &Checkpoint) -> Result<Self> {
        Self::load(ckpt, &|_| false)
    }

    /// The vars that receive gradients, by HF name.
    pub fn trainable_vars(&self) -> &BTreeMap<String, Var> {
        &self.trainable
    }

    pub fn num_layers(&self) -> usize {
        self.config.num_layers()
    }

    /// The smallest sliding window any layer uses (None when all attend fully).
    pub fn sliding_window(&self) -> Option<usize> {
        match &self.arch {
            Arch::Gpt2(_) => None,
            Arch::Llama(m) => m.sliding_window(),
        }
    }

    /// Names of the tensors of `layer` indexed by MLP unit, and along which axis.
    pub fn mlp_unit_slices(&self, layer: usize) -> Vec<UnitSlice> {
        match &self.arch {
            Arch::Gpt2(m) => m.mlp_unit_slices(layer),
            Arch::Llama(m) => m.mlp_unit_slices(layer),
        }
    }

    /// The MLP output projection of `layer` as a [width, hidden] matrix (`act @ W` is the MLP output).
    pub fn mlp_down_weight(&self, layer: usize) -> Result<Tensor> {
        Ok(match &self.arch {
            Arch::Gpt2(m) => m.mlp_down_weight(layer),
            Arch::Llama(m) => m.mlp_down_weight(layer).t()?.contiguous()?,
        })
    }

    /// Names of all tensors of transformer block `layer`.
    pub fn block_tensor_names(&self, layer: usize) -> Vec<String> {
        match &self.arch {
            Arch::Gpt2(m) => m.block_tensor_names(layer),
            Arch::Llama(m) => m.block_tensor_names(layer),
        }
    }

    /// Token (+ position) embeddings: ids [b, t] u32 -> [b, t, d].
    pub fn embed(&self, ids: &Tensor, ctx: &AttnContext) -> Result<Tensor> {
        Ok(match &self.arch {
            Arch::Gpt2(m) => m.embed(ids, &ctx.positions)?,
            Arch::Llama(m) => m.embed(ids)?,
        })
    }

    /// One transformer block. `mlp_trace` receives the MLP intermediate activation [b, t, width].
    pub fn block(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &AttnContext,
        cache: Option<&mut KvCache>,
        mlp_trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        Ok(match &self.arch {
            Arch::Gpt2(m) => m.block(layer, x, ctx, cache, mlp_trace)?,
            Arch::Llama(m) => m.block(layer, x, ctx, cache, mlp_trace)?,
        })
    }

    /// Final norm: [b, t, d] -> [b, t, d].
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.arch {
            Arch::Gpt2(m) => m.final_norm(x)?,
            Arch::Llama(m) => m.final_norm(x)?,
        })
    }

    /// The output projection weight [vocab, d] (the embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        match &self.arch {
            Arch::Gpt2(m) => m.lm_head_weight(),
            Arch::Llama(m) => m.lm_head_weight(),
        }
    }

    /// Logits from final hidden states: [b, t, d] -> [b, t, vocab].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = self.final_norm(hidden)?;
        Ok(ops::linear(&normed, self.lm_head_weight(), None)?)
    }

    /// Hidden states after blocks `from..` starting from `x` (output of block `from - 1` or embeddings).
    pub fn run_blocks(
        &self,
        from: usize,
        x: &Tensor,
        ctx: &AttnContext,
        mut cache: Option<&mut KvCache>,
        mut mlp_trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in from..self.num_layers() {
            h = self.block(
                layer,
                &h,
                ctx,
                cache.as_deref_mut(),
                mlp_trace.as_deref_mut(),
            )?;
        }
        Ok(h)
    }

    /// Logits at every position: ids [b, t] -> [b, t, vocab].
    pub fn forward(
        &self,
        ids: &Tensor,
        ctx: &AttnContext,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let x = self.embed(ids, ctx)?;
        let h = self.run_blocks(0, &x, ctx, cache, None)?;
        self.logits(&h)
    }
}
