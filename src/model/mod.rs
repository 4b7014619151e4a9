//! Causal language models written on gradient-carrying candle ops, one implementation for
//! training (full sequence, logits at every position, padding mask) and generation (KV cache,
//! left padding).
//!
//! Each architecture is one file that implements [`CausalLm`] (the forward pieces the rest of
//! `sani` calls) and [`config::ArchConfig`] (its `config.json` and naming rules), registered by
//! one line in [`ARCHITECTURES`]. [`Model`] wraps a loaded architecture with its config and
//! the vars that train.
//!
//! Weights come from a [`WeightSource`] by their HF names (a checkpoint: `Model::load` in
//! [`crate::io::checkpoint`]; or a fresh initialization, [`init`]). Each tensor is either trainable (the
//! var itself, so gradients reach it) or frozen (a detached view: no gradient is computed).

pub mod config;
mod gemma3;
pub mod generate;
mod gpt2;
pub mod init;
mod llama;
pub mod weights;

use crate::model::config::{ArchConfig, ModelConfig};
use crate::nn::ops;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use std::collections::BTreeMap;
use std::sync::Arc;
pub use weights::{LoadedNames, Loader, WeightSource, Weights};

/// An architecture `sani` can load: its names in `config.json` and its config parser.
pub struct Architecture {
    /// `architectures[0]`, e.g. `LlamaForCausalLM`.
    pub name: &'static str,
    /// `model_type`, used when `architectures` is missing.
    pub model_type: &'static str,
    pub parse: fn(&str) -> Result<Arc<dyn ArchConfig>>,
}

/// Every supported architecture; adding one is a file plus a line here.
pub const ARCHITECTURES: &[Architecture] = &[
    gpt2::REGISTRATION,
    llama::LLAMA,
    llama::MISTRAL,
    llama::QWEN2,
    llama::QWEN3,
    llama::PHI3,
    gemma3::GEMMA3,
    gemma3::GEMMA2,
];

/// The forward pieces of a causal LM, as training, erasure and decoding use them.
pub trait CausalLm: Send + Sync {
    /// Token (+ position) embeddings: ids [b, t] u32 -> [b, t, d].
    fn embed(&self, ids: &Tensor, ctx: &AttnContext) -> Result<Tensor>;
    /// Transformer block `layer`. `mlp_trace` receives the MLP intermediate activation [b, t, width].
    fn block(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &AttnContext,
        cache: Option<&mut KvCache>,
        mlp_trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor>;
    /// Block `layer`'s output without a graph, with the activations its hand-written backward
    /// reads kept for [`CausalLm::block_grads`] (so that the backward need not run the forward
    /// again). None where the block has no hand-written backward.
    fn block_keeping(
        &self,
        _layer: usize,
        _x: &Tensor,
        _ctx: &AttnContext,
    ) -> Result<Option<(Tensor, KeptActivations)>> {
        Ok(None)
    }
    /// The gradients of `sum(block(x) * g)` computed by hand, without a graph: the input's when
    /// `want_input`, and each trainable weight's. It reads `kept` (from
    /// [`CausalLm::block_keeping`] on the same `x`) or, without it, runs the block's forward
    /// again keeping what it reads. None where the architecture or block has no hand-written
    /// backward; the caller then differentiates the block's graph.
    fn block_grads(
        &self,
        _layer: usize,
        _x: &Tensor,
        _kept: Option<KeptActivations>,
        _g: &Tensor,
        _ctx: &AttnContext,
        _want_input: bool,
    ) -> Result<Option<BlockGrads>> {
        Ok(None)
    }
    /// Final norm: [b, t, d] -> [b, t, d].
    fn final_norm(&self, x: &Tensor) -> Result<Tensor>;
    /// The output projection weight [vocab, d] (the embedding when tied).
    fn lm_head_weight(&self) -> &Tensor;
    /// Gemma 2's `final_logit_softcapping`: logits become `cap * tanh(logits / cap)`.
    fn final_logit_softcap(&self) -> Option<f64> {
        None
    }
    /// The smallest sliding window any layer uses (None when all attend fully).
    fn sliding_window(&self) -> Option<usize>;
    /// The tensors of `layer` indexed by MLP unit, and along which axis.
    fn mlp_unit_slices(&self, layer: usize) -> Vec<UnitSlice>;
    /// The MLP output projection of `layer` as a [width, hidden] matrix (`act @ W` is the MLP output).
    fn mlp_down_weight(&self, layer: usize) -> Result<Tensor>;
}

/// One block's activations kept from its forward pass for its hand-written backward
/// ([`CausalLm::block_keeping`]); what they are is the architecture's business.
pub struct KeptActivations {
    inner: Box<dyn std::any::Any + Send + Sync>,
    bytes: usize,
}

impl KeptActivations {
    /// `bytes`: the memory of the tensors `inner` holds ([`KeptActivations::bytes_of`]).
    pub fn new<T: std::any::Any + Send + Sync>(inner: T, bytes: usize) -> Self {
        KeptActivations {
            inner: Box::new(inner),
            bytes,
        }
    }

    /// The memory of `tensors`' elements.
    pub fn bytes_of(tensors: &[&Tensor]) -> usize {
        tensors
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The memory the kept tensors hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The architecture's own type back (None for another architecture's).
    pub fn downcast<T: std::any::Any>(self) -> Option<T> {
        self.inner.downcast::<T>().ok().map(|b| *b)
    }
}

/// One block's gradients from [`CausalLm::block_grads`].
pub struct BlockGrads {
    /// The input's gradient, when asked for.
    pub input: Option<Tensor>,
    /// Each trainable weight (the tensor of its `Var`) with its gradient.
    pub weights: Vec<(Tensor, Tensor)>,
}

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

    /// Training context for rows that each hold whole sequences back to back (`segments[b]`:
    /// their lengths; the rest of the row is padding): every sequence counts its positions from
    /// 0 and attends only within itself, as if it had a row of its own.
    pub fn for_segments(
        segments: &[Vec<usize>],
        t: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        Ok(AttnContext {
            positions: ops::segment_positions(segments, t, device)?,
            mask: ops::segment_mask(segments, t, None, device)?,
            window_mask: match window {
                Some(w) => Some(ops::segment_mask(segments, t, Some(w), device)?),
                None => None,
            },
        })
    }

    pub(crate) fn mask_for(&self, window: Option<usize>) -> &Tensor {
        match (window, &self.window_mask) {
            (Some(_), Some(m)) => m,
            _ => &self.mask,
        }
    }
}

/// The tensors that hold one MLP intermediate unit: unit j is index `offset + j` along `axis`
/// of each, for each of its offsets (one, 0, for a plain projection; a fused gate/up matrix
/// holds unit j at j and at width + j).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSlice {
    pub name: String,
    pub axis: usize,
    pub offsets: Vec<usize>,
}

impl UnitSlice {
    pub fn new(name: String, axis: usize) -> Self {
        Self::fused(name, axis, vec![0])
    }
    /// A tensor that holds several units' blocks along `axis`, at these offsets.
    pub fn fused(name: String, axis: usize, offsets: Vec<usize>) -> Self {
        UnitSlice {
            name,
            axis,
            offsets,
        }
    }
    /// The indices along `axis` that hold `units`, ascending.
    pub fn indices(&self, units: &[usize]) -> Vec<usize> {
        let mut idx: Vec<usize> = self
            .offsets
            .iter()
            .flat_map(|o| units.iter().map(move |j| o + j))
            .collect();
        idx.sort_unstable();
        idx
    }
}

/// A loaded causal LM.
pub struct Model {
    pub config: ModelConfig,
    lm: Box<dyn CausalLm>,
    pub device: Device,
    trainable: BTreeMap<String, Var>,
    names: LoadedNames,
    adapters: Vec<crate::nn::lora::LoraVars>,
}

impl Model {
    /// Builds the model from a weight source (no check for unused tensors).
    pub fn from_source(
        source: &dyn WeightSource,
        config: &ModelConfig,
        device: &Device,
        trainable: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        Self::from_source_with_lora(source, config, device, trainable, None, false)
    }

    /// Like [`Model::from_source`], with LoRA adapters on the projections `lora` targets (their
    /// vars are trainable, in addition to what `trainable` selects). `frozen_stored`: frozen
    /// projections held in their stored 16-bit dtype (for training; see
    /// [`Loader::holding_frozen_projections_stored`]).
    pub fn from_source_with_lora(
        source: &dyn WeightSource,
        config: &ModelConfig,
        device: &Device,
        trainable: &dyn Fn(&str) -> bool,
        lora: Option<&crate::nn::lora::LoraConfig>,
        frozen_stored: bool,
    ) -> Result<Self> {
        let mut loader = Loader::new(source, trainable)
            .with_lora(lora.cloned())
            .holding_frozen_projections_stored(frozen_stored);
        let lm = config.spec().load(&mut loader.root())?;
        if lora.is_some() && loader.adapters.is_empty() {
            anyhow::bail!(
                "--lora-targets {}: no projection of this model matches",
                lora.map(|l| l.targets.join(",")).unwrap_or_default()
            );
        }
        Ok(Model {
            config: config.clone(),
            lm,
            device: device.clone(),
            trainable: loader.vars,
            names: loader.names,
            adapters: loader.adapters,
        })
    }

    /// The LoRA adapters (empty without LoRA).
    pub fn lora_adapters(&self) -> &[crate::nn::lora::LoraVars] {
        &self.adapters
    }

    /// Folds every adapter into its base weight (in place, in the weight source's tensors).
    pub fn merge_lora(&self) -> Result<()> {
        self.adapters.iter().try_for_each(|a| a.merge())
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
        self.lm.sliding_window()
    }

    /// Names of the tensors of `layer` indexed by MLP unit, and along which axis.
    pub fn mlp_unit_slices(&self, layer: usize) -> Vec<UnitSlice> {
        self.lm.mlp_unit_slices(layer)
    }

    /// The MLP output projection of `layer` as a [width, hidden] matrix (`act @ W` is the MLP output).
    pub fn mlp_down_weight(&self, layer: usize) -> Result<Tensor> {
        // f32 even where a frozen projection is held in its stored 16-bit dtype.
        Ok(self
            .lm
            .mlp_down_weight(layer)?
            .to_dtype(candle_core::DType::F32)?)
    }

    /// Every tensor name the model loaded.
    pub fn loaded_names(&self) -> &std::collections::HashSet<String> {
        &self.names.all
    }

    /// Names of all tensors of transformer block `layer`, as loaded.
    pub fn block_tensor_names(&self, layer: usize) -> &[String] {
        self.names.blocks.get(&layer).map_or(&[], Vec::as_slice)
    }

    /// Names of the final norm's tensors, as loaded.
    pub fn final_norm_tensor_names(&self) -> &[String] {
        &self.names.final_norm
    }

    /// Token (+ position) embeddings: ids [b, t] u32 -> [b, t, d].
    pub fn embed(&self, ids: &Tensor, ctx: &AttnContext) -> Result<Tensor> {
        self.lm.embed(ids, ctx)
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
        self.lm.block(layer, x, ctx, cache, mlp_trace)
    }

    /// See [`CausalLm::block_keeping`].
    pub fn block_keeping(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &AttnContext,
    ) -> Result<Option<(Tensor, KeptActivations)>> {
        self.lm.block_keeping(layer, x, ctx)
    }

    /// See [`CausalLm::block_grads`].
    pub fn block_grads(
        &self,
        layer: usize,
        x: &Tensor,
        kept: Option<KeptActivations>,
        g: &Tensor,
        ctx: &AttnContext,
        want_input: bool,
    ) -> Result<Option<BlockGrads>> {
        self.lm.block_grads(layer, x, kept, g, ctx, want_input)
    }

    /// Final norm: [b, t, d] -> [b, t, d].
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.lm.final_norm(x)
    }

    /// The output projection weight [vocab, d] (the embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm.lm_head_weight()
    }

    /// Logits from final hidden states: [b, t, d] -> [b, t, vocab].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let normed = self.final_norm(hidden)?;
        let logits = ops::linear(&normed, self.lm_head_weight(), None)?;
        Ok(match self.lm.final_logit_softcap() {
            Some(cap) => ops::softcap(&logits, cap)?,
            None => logits,
        })
    }

    /// Per-position NLL of `targets` ([b * t] u32) after final hidden states [b, t, d], through
    /// the final norm and the head without materializing the [b * t, vocab] logits (CPU f32).
    /// `row_grad`: the gradient the loss will send to each position, when known (faster).
    pub fn token_nll(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        row_grad: Option<Vec<f32>>,
    ) -> Result<Tensor> {
        let normed = self.final_norm(hidden)?;
        let d = normed.dim(candle_core::D::Minus1)?;
        let rows = normed.elem_count() / d.max(1);
        if let Some(cap) = self.lm.final_logit_softcap() {
            // Soft-capped logits are materialized (composed ops; the fused head has no cap).
            let logits = ops::linear(&normed.reshape((rows, d))?, self.lm_head_weight(), None)?;
            return Ok(ops::token_nll_composed(
                &ops::softcap(&logits, cap)?,
                targets,
            )?);
        }
        Ok(ops::lm_head_nll(
            &normed.reshape((rows, d))?,
            self.lm_head_weight(),
            targets,
            row_grad,
        )?)
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

    /// Hidden states entering block `layer` (the embeddings for layer 0): ids [b, t] -> [b, t, d].
    pub fn hidden_before(&self, layer: usize, ids: &Tensor, ctx: &AttnContext) -> Result<Tensor> {
        let mut h = self.embed(ids, ctx)?;
        for l in 0..layer {
            h = self.block(l, &h, ctx, None, None)?;
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
