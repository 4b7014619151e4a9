//! The Llama family (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
//! `Qwen3ForCausalLM`, `Phi3ForCausalLM`): RMSNorm, rotary positions (default, linear, llama3
//! and LongRoPE's short factors; partial rotation), grouped-query attention, SwiGLU MLP,
//! optional qkv bias (Qwen2), RMSNorm of each query and key head before rotation (Qwen3), fused
//! `qkv_proj` and `gate_up_proj` (Phi-3), per-layer sliding windows and tied embeddings.

use super::config::{
    default_init_range, ArchConfig, ConfigSummary, RopeParameters, SpecialTokenIds,
};
use super::{AttnContext, CausalLm, KvCache, UnitSlice, Weights};
use crate::nn::lora::LoraAdapter;
use crate::nn::ops;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

mod grad;

pub(super) const LLAMA: super::Architecture = super::Architecture {
    name: "LlamaForCausalLM",
    model_type: "llama",
    parse: |text| LlamaConfig::parse(text, LlamaFlavor::Llama),
};
pub(super) const MISTRAL: super::Architecture = super::Architecture {
    name: "MistralForCausalLM",
    model_type: "mistral",
    parse: |text| LlamaConfig::parse(text, LlamaFlavor::Mistral),
};
pub(super) const QWEN2: super::Architecture = super::Architecture {
    name: "Qwen2ForCausalLM",
    model_type: "qwen2",
    parse: |text| LlamaConfig::parse(text, LlamaFlavor::Qwen2),
};
pub(super) const QWEN3: super::Architecture = super::Architecture {
    name: "Qwen3ForCausalLM",
    model_type: "qwen3",
    parse: |text| LlamaConfig::parse(text, LlamaFlavor::Qwen3),
};
pub(super) const PHI3: super::Architecture = super::Architecture {
    name: "Phi3ForCausalLM",
    model_type: "phi3",
    parse: |text| LlamaConfig::parse(text, LlamaFlavor::Phi3),
};

/// One config for the Llama family: its members differ only in switches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "llama_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "llama_max_pos")]
    pub max_position_embeddings: usize,
    /// Phi-3: the pretraining context (LongRoPE's short factors hold up to it).
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// Phi-3 in transformers 4 (transformers 5 moves it into `rope_parameters`).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "llama_act")]
    pub hidden_act: String,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// Per layer, `full_attention` or `sliding_attention` (Qwen2/Qwen3 in transformers 5).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(flatten)]
    pub tokens: SpecialTokenIds,
    /// Which member of the family (from `architectures`, not a config field).
    #[serde(skip)]
    pub flavor: LlamaFlavor,
}

fn llama_eps() -> f64 {
    1e-6
}
fn llama_max_pos() -> usize {
    2048
}
fn llama_act() -> String {
    "silu".into()
}

/// Which member of the Llama family; decides biases and sliding-window rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum LlamaFlavor {
    #[default]
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// The RoPE parameters wherever the config put them (`rope_parameters` wins over `rope_scaling`).
    pub fn rope(&self) -> RopeParameters {
        let mut p = self
            .rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default();
        if p.rope_theta.is_none() {
            p.rope_theta = self.rope_theta.or(Some(10000.0));
        }
        p.partial_rotary_factor = p.partial_rotary_factor.or(self.partial_rotary_factor);
        p.original_max_position_embeddings = p
            .original_max_position_embeddings
            .or(self.original_max_position_embeddings);
        if self.flavor == LlamaFlavor::Phi3 && matches!(p.rope_type.as_deref(), Some("su" | "yarn"))
        {
            // transformers reads Phi-3's old names as LongRoPE.
            p.rope_type = Some("longrope".into());
        }
        p
    }
    /// The leading dimensions of each head that rotate (all but with `partial_rotary_factor`).
    pub fn rotary_dim(&self) -> usize {
        let f = self.rope().partial_rotary_factor.unwrap_or(1.0);
        (self.head_dim() as f64 * f) as usize
    }
    /// The scale of cos and sin: LongRoPE's attention factor, else 1.
    pub fn rope_attention_scale(&self) -> f64 {
        let rope = self.rope();
        if rope.rope_type.as_deref() != Some("longrope") {
            return 1.0;
        }
        if let Some(a) = rope.attention_factor {
            return a;
        }
        let original = rope
            .original_max_position_embeddings
            .unwrap_or(self.max_position_embeddings) as f64;
        let factor = rope
            .factor
            .unwrap_or(self.max_position_embeddings as f64 / original);
        if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / original.ln()).sqrt()
        }
    }
    /// The longest sequence the model is run on: LongRoPE's long factors (beyond the original
    /// context) are not implemented, so its models stop at the original context.
    pub fn usable_positions(&self) -> usize {
        let rope = self.rope();
        match (
            rope.rope_type.as_deref(),
            rope.original_max_position_embeddings,
        ) {
            (Some("longrope"), Some(o)) => o.min(self.max_position_embeddings),
            _ => self.max_position_embeddings,
        }
    }
    /// The sliding window of layer `i`, if that layer uses one.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let window = self.sliding_window?;
        match self.flavor {
            LlamaFlavor::Llama => None,
            LlamaFlavor::Mistral | LlamaFlavor::Phi3 => Some(window),
            // transformers: the window only with `use_sliding_window`, then on the layers
            // `layer_types` names, or else from `max_window_layers` (default 28) on.
            LlamaFlavor::Qwen2 | LlamaFlavor::Qwen3 => {
                if !self.use_sliding_window.unwrap_or(false) {
                    return None;
                }
                let on = match &self.layer_types {
                    Some(types) => types.get(layer).is_some_and(|t| t == "sliding_attention"),
                    None => layer >= self.max_window_layers.unwrap_or(28),
                };
                on.then_some(window)
            }
        }
    }
}

impl LlamaConfig {
    fn parse(text: &str, flavor: LlamaFlavor) -> Result<Arc<dyn ArchConfig>> {
        let mut c: LlamaConfig = serde_json::from_str(text)?;
        c.flavor = flavor;
        if c.num_attention_heads == 0 || !c.num_attention_heads.is_multiple_of(c.kv_heads()) {
            bail!(
                "field `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                c.kv_heads(),
                c.num_attention_heads
            );
        }
        if c.hidden_act != "silu" {
            bail!(
                "field `hidden_act`: unsupported `{}` (only silu)",
                c.hidden_act
            );
        }
        if let Some(types) = &c.layer_types {
            if types.len() != c.num_hidden_layers {
                bail!(
                    "field `layer_types`: {} entries for {} layers",
                    types.len(),
                    c.num_hidden_layers
                );
            }
            if let Some(t) = types
                .iter()
                .find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
            {
                bail!("field `layer_types`: unsupported `{t}` (full_attention, sliding_attention)");
            }
        }
        let rope = c.rope();
        match (rope.rope_type.as_deref(), c.flavor) {
            (None | Some("default" | "llama3" | "linear"), _) => {}
            (Some("longrope"), LlamaFlavor::Phi3) => {
                let half = c.rotary_dim() / 2;
                for (field, factors) in [
                    ("short_factor", &rope.short_factor),
                    ("long_factor", &rope.long_factor),
                ] {
                    match factors {
                        Some(f) if f.len() == half => {}
                        Some(f) => bail!(
                            "field `rope_scaling.{field}`: {} values, the rotary dimension needs {half}",
                            f.len()
                        ),
                        None => bail!("field `rope_scaling.{field}`: missing (LongRoPE needs it)"),
                    }
                }
                if rope.original_max_position_embeddings.is_none() {
                    bail!("field `original_max_position_embeddings`: missing (LongRoPE needs it)");
                }
            }
            (Some(t), LlamaFlavor::Phi3) => {
                bail!("field `rope_scaling.rope_type`: unsupported `{t}` (default, longrope)")
            }
            (Some(t), _) => {
                bail!("field `rope_scaling.rope_type`: unsupported `{t}` (default, linear, llama3)")
            }
        }
        let f = rope.partial_rotary_factor.unwrap_or(1.0);
        let rd = c.rotary_dim();
        if !(f > 0.0 && f <= 1.0) || rd == 0 || !rd.is_multiple_of(2) {
            bail!(
                "field `partial_rotary_factor`: {f} gives {rd} rotary dimensions of a {}-dimensional head (must be even and above 0)",
                c.head_dim()
            );
        }
        Ok(Arc::new(c))
    }
}

impl ArchConfig for LlamaConfig {
    fn summary(&self) -> ConfigSummary {
        ConfigSummary {
            num_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            mlp_width: self.intermediate_size,
            heads: self.num_attention_heads,
            kv_heads: self.kv_heads(),
            vocab_size: self.vocab_size,
            tied_embeddings: self.tie_word_embeddings,
            max_positions: self.usable_positions(),
            initializer_range: self.initializer_range,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
        }
        .with_tokens(&self.tokens)
    }

    fn is_known_buffer(&self, name: &str) -> bool {
        name.ends_with("rotary_emb.inv_freq") || name == "lm_head.weight"
    }

    fn load(&self, w: &mut Weights) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Llama::load(w, self)?))
    }
}

/// RoPE inverse frequencies as `transformers` computes them for `rope_type` default, linear,
/// llama3 and longrope (its short factors), over the rotary dimensions.
pub fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let rope = cfg.rope();
    let theta = rope.rope_theta.unwrap_or(10000.0);
    let hd = cfg.rotary_dim();
    let base: Vec<f64> = (0..hd / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / hd as f64))
        .collect();
    let factor = rope.factor.unwrap_or(1.0);
    let freqs: Vec<f64> = match rope.rope_type.as_deref() {
        Some("linear") => base.iter().map(|f| f / factor).collect(),
        Some("llama3") => {
            let low = rope.low_freq_factor.unwrap_or(1.0);
            let high = rope.high_freq_factor.unwrap_or(4.0);
            let old_ctx = rope.original_max_position_embeddings.unwrap_or(8192) as f64;
            let low_wavelen = old_ctx / low;
            let high_wavelen = old_ctx / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        Some("longrope") => {
            let short = rope.short_factor.as_deref().unwrap_or(&[]);
            base.iter().zip(short).map(|(f, s)| f / s).collect()
        }
        _ => base,
    };
    freqs.into_iter().map(|f| f as f32).collect()
}

/// cos and sin [b, 1, t, 2 * inv_freq.len()] for the given positions [b, t], times `scale`.
pub(super) fn rope_tables(
    positions: &Tensor,
    inv_freq: &Tensor,
    scale: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, t) = positions.dims2()?;
    let half = inv_freq.dim(0)?;
    let pos = positions.to_dtype(DType::F32)?.reshape((b, t, 1))?;
    let freqs = pos.broadcast_mul(&inv_freq.reshape((1, 1, half))?)?;
    let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
    if scale != 1.0 {
        return Ok(((emb.cos()? * scale)?, (emb.sin()? * scale)?));
    }
    Ok((emb.cos()?, emb.sin()?))
}

/// A projection `x @ W^T (+ b)`, weight stored (out, in).
pub(super) struct Linear {
    pub(super) weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

impl Linear {
    pub(super) fn load(w: &mut Weights, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        // Biases first: the order tensors are drawn in when a fresh model is initialized.
        let bias = w.get_if(bias, "bias", &[d_out])?;
        let (weight, lora) = w.projection(d_in, d_out, false)?;
        Ok(Linear { weight, bias, lora })
    }
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.lora {
            Some(lora) => lora.forward(x, &self.weight, self.bias.as_ref(), true),
            None => ops::linear(x, &self.weight, self.bias.as_ref()),
        }
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(w: &mut Weights, d: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get("weight", &[d])?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// The query, key and value projections: three matrices, or one (Phi-3's `qkv_proj`, rows
/// in that order).
enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

struct Attention {
    qkv: Qkv,
    o_proj: Linear,
    /// Qwen3: RMSNorm over each query / key head (weight [head_dim]) before rotation.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    rotary_dim: usize,
}

impl Attention {
    fn load(w: &mut Weights, cfg: &LlamaConfig, layer: usize) -> Result<Self> {
        let (d, h, kvh, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.kv_heads(),
            cfg.head_dim(),
        );
        let qkv_bias = cfg.attention_bias || cfg.flavor == LlamaFlavor::Qwen2;
        let head_norms = cfg.flavor == LlamaFlavor::Qwen3;
        let qkv = if cfg.flavor == LlamaFlavor::Phi3 {
            Qkv::Fused(Linear::load(
                &mut w.pp("qkv_proj"),
                d,
                (h + 2 * kvh) * hd,
                false,
            )?)
        } else {
            Qkv::Separate {
                q: Linear::load(&mut w.pp("q_proj"), d, h * hd, qkv_bias)?,
                k: Linear::load(&mut w.pp("k_proj"), d, kvh * hd, qkv_bias)?,
                v: Linear::load(&mut w.pp("v_proj"), d, kvh * hd, qkv_bias)?,
            }
        };
        let o_proj = Linear::load(&mut w.pp("o_proj"), h * hd, d, cfg.attention_bias)?;
        let mut head_norm = |name: &str| -> Result<Option<RmsNorm>> {
            head_norms
                .then(|| RmsNorm::load(&mut w.pp(name), hd, cfg.rms_norm_eps))
                .transpose()
        };
        Ok(Attention {
            q_norm: head_norm("q_norm")?,
            k_norm: head_norm("k_norm")?,
            qkv,
            o_proj,
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            window: cfg.layer_window(layer),
            rotary_dim: cfg.rotary_dim(),
        })
    }

    /// Rotates the leading `rotary_dim` dimensions of each head of x [b, t, heads * head_dim]
    /// (all of them but with a partial rotary factor) -> [b, heads, t, head_dim].
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
        let (hd, rd) = (self.head_dim, self.rotary_dim);
        if rd == hd {
            return Ok(ops::rope_heads(x, cos, sin, heads)?);
        }
        let (b, t, _) = x.dims3()?;
        let x = x.reshape((b, t, heads, hd))?;
        let rot = x
            .narrow(D::Minus1, 0, rd)?
            .contiguous()?
            .reshape((b, t, heads * rd))?;
        let rot = ops::rope_heads(&rot, cos, sin, heads)?;
        let pass = x.narrow(D::Minus1, rd, hd - rd)?.transpose(1, 2)?;
        Ok(Tensor::cat(&[&rot, &pass], D::Minus1)?)
    }

    fn forward(
        &self,
        a: &Tensor,
        layer: usize,
        rope: &(Tensor, Tensor),
        ctx: &AttnContext,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = a.dims3()?;
        let (cos, sin) = rope;
        let per_head = |x: Tensor, norm: &Option<RmsNorm>, heads: usize| -> Result<Tensor> {
            Ok(match norm {
                Some(norm) => norm
                    .forward(&x.reshape((b, t, heads, self.head_dim))?)?
                    .reshape((b, t, heads * self.head_dim))?,
                None => x,
            })
        };
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => (q.forward(a)?, k.forward(a)?, v.forward(a)?),
            Qkv::Fused(qkv) => {
                let all = qkv.forward(a)?;
                let (nq, nkv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                (
                    all.narrow(D::Minus1, 0, nq)?.contiguous()?,
                    all.narrow(D::Minus1, nq, nkv)?.contiguous()?,
                    all.narrow(D::Minus1, nq + nkv, nkv)?.contiguous()?,
                )
            }
        };
        let q = per_head(q, &self.q_norm, self.heads)?;
        let k = per_head(k, &self.k_norm, self.kv_heads)?;
        let q = self.rope(&q, cos, sin, self.heads)?;
        let mut k = self.rope(&k, cos, sin, self.kv_heads)?;
        let mut v = v
            .reshape((b, t, self.kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        if let Some(cache) = cache {
            (k, v) = cache.append(layer, k.contiguous()?, v.contiguous()?)?;
        }
        let attn = ops::attention(
            &q,
            &k,
            &v,
            ctx.mask_for(self.window),
            1.0 / (self.head_dim as f64).sqrt(),
        )?;
        Ok(self.o_proj.forward(&attn)?)
    }
}

/// The gate and up projections: two matrices, or one (Phi-3's `gate_up_proj`: gate rows
/// first, then up).
enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

struct Mlp {
    gate_up: GateUp,
    down_proj: Linear,
    width: usize,
    units: Vec<UnitSlice>,
}

impl Mlp {
    fn load(w: &mut Weights, cfg: &LlamaConfig) -> Result<Self> {
        let (d, inter, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        if cfg.flavor == LlamaFlavor::Phi3 {
            return Ok(Mlp {
                units: vec![
                    UnitSlice::fused(w.name("gate_up_proj.weight"), 0, vec![0, inter]),
                    UnitSlice::new(w.name("down_proj.weight"), 1),
                ],
                gate_up: GateUp::Fused(Linear::load(
                    &mut w.pp("gate_up_proj"),
                    d,
                    2 * inter,
                    false,
                )?),
                down_proj: Linear::load(&mut w.pp("down_proj"), inter, d, false)?,
                width: inter,
            });
        }
        let mut units = vec![
            UnitSlice::new(w.name("gate_proj.weight"), 0),
            UnitSlice::new(w.name("up_proj.weight"), 0),
            UnitSlice::new(w.name("down_proj.weight"), 1),
        ];
        if bias {
            units.push(UnitSlice::new(w.name("gate_proj.bias"), 0));
            units.push(UnitSlice::new(w.name("up_proj.bias"), 0));
        }
        Ok(Mlp {
            gate_up: GateUp::Separate {
                gate: Linear::load(&mut w.pp("gate_proj"), d, inter, bias)?,
                up: Linear::load(&mut w.pp("up_proj"), d, inter, bias)?,
            },
            down_proj: Linear::load(&mut w.pp("down_proj"), inter, d, bias)?,
            width: inter,
            units,
        })
    }

    fn forward(&self, m: &Tensor, trace: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate, up } => (gate.forward(m)?, up.forward(m)?),
            GateUp::Fused(gate_up) => {
                let both = gate_up.forward(m)?;
                (
                    both.narrow(D::Minus1, 0, self.width)?.contiguous()?,
                    both.narrow(D::Minus1, self.width, self.width)?
                        .contiguous()?,
                )
            }
        };
        let hidden = ops::swiglu(&gate, &up)?;
        if let Some(trace) = trace {
            trace.push(hidden.clone());
        }
        Ok(self.down_proj.forward(&hidden)?)
    }
}

struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(w: &mut Weights, cfg: &LlamaConfig, layer: usize) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Block {
            input_layernorm: RmsNorm::load(&mut w.pp("input_layernorm"), d, eps)?,
            self_attn: Attention::load(&mut w.pp("self_attn"), cfg, layer)?,
            post_attention_layernorm: RmsNorm::load(&mut w.pp("post_attention_layernorm"), d, eps)?,
            mlp: Mlp::load(&mut w.pp("mlp"), cfg)?,
        })
    }
}

pub struct Llama {
    hidden_size: usize,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    /// [rotary_dim / 2] rotary inverse frequencies, after scaling.
    inv_freq: Tensor,
    /// Scale of cos and sin (LongRoPE's attention factor; 1 otherwise).
    rope_scale: f64,
}

impl Llama {
    fn load(root: &mut Weights, cfg: &LlamaConfig) -> Result<Self> {
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let mut w = root.pp("model");
        let embed_tokens = w.get("embed_tokens.weight", &[v, d])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            blocks.push(w.block(i, |w| Block::load(&mut w.pp(format!("layers.{i}")), cfg, i))?);
        }
        let norm = w.final_norm(|w| RmsNorm::load(&mut w.pp("norm"), d, cfg.rms_norm_eps))?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            root.get("lm_head.weight", &[v, d])?
        };
        let inv_freq = Tensor::new(rope_inv_freq(cfg), embed_tokens.device())?;
        Ok(Llama {
            rope_scale: cfg.rope_attention_scale(),
            hidden_size: d,
            embed_tokens,
            blocks,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// cos and sin [b, 1, t, head_dim] for the given positions.
    fn rope_tables(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        rope_tables(positions, &self.inv_freq, self.rope_scale)
    }
}

impl CausalLm for Llama {
    fn embed(&self, ids: &Tensor, _ctx: &AttnContext) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        Ok(e.reshape((b, t, self.hidden_size))?)
    }

    fn block(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &AttnContext,
        cache: Option<&mut KvCache>,
        mlp_trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let blk = &self.blocks[layer];
        let a = blk.input_layernorm.forward(x)?;
        let rope = self.rope_tables(&ctx.positions)?;
        let x = (x + blk.self_attn.forward(&a, layer, &rope, ctx, cache)?)?;
        let m = blk.post_attention_layernorm.forward(&x)?;
        Ok((&x + blk.mlp.forward(&m, mlp_trace)?)?)
    }

    fn block_keeping(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &AttnContext,
    ) -> Result<Option<(Tensor, super::KeptActivations)>> {
        self.plain_block_keeping(layer, x, ctx)
    }

    fn block_grads(
        &self,
        layer: usize,
        x: &Tensor,
        kept: Option<super::KeptActivations>,
        g: &Tensor,
        ctx: &AttnContext,
        want_input: bool,
    ) -> Result<Option<super::BlockGrads>> {
        self.plain_block_grads(layer, x, kept, g, ctx, want_input)
    }

    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(x)?)
    }

    fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    fn sliding_window(&self) -> Option<usize> {
        self.blocks.iter().filter_map(|b| b.self_attn.window).min()
    }

    fn mlp_unit_slices(&self, layer: usize) -> Vec<UnitSlice> {
        self.blocks[layer].mlp.units.clone()
    }

    fn mlp_down_weight(&self, layer: usize) -> Result<Tensor> {
        Ok(self.blocks[layer].mlp.down_proj.weight.t()?.contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use crate::model::config::ModelConfig;

    #[test]
    fn rope_theta_under_rope_parameters_and_null_fields() {
        let cfg = ModelConfig::from_json(
            r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "sliding_window": null, "head_dim": null,
                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}"#,
        )
        .unwrap();
        let text = r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "sliding_window": null, "head_dim": null,
                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}"#;
        let mut c: super::LlamaConfig = serde_json::from_str(text).unwrap();
        c.flavor = super::LlamaFlavor::Qwen2;
        assert_eq!(cfg.architecture(), "Qwen2ForCausalLM");
        assert_eq!(c.rope().rope_theta, Some(500000.0));
        assert_eq!(c.head_dim(), 4);
        assert_eq!(c.layer_window(0), None);
    }
}
