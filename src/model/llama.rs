//! The Llama family (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`): RMSNorm,
//! rotary positions (default, linear and llama3 scaling), grouped-query attention, SwiGLU MLP,
//! optional qkv bias (Qwen2) and tied embeddings.

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

/// One config for the Llama family: Llama, Mistral and Qwen2 differ only in switches.
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
        p
    }
    /// The sliding window of layer `i`, if that layer uses one.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let window = self.sliding_window?;
        match self.flavor {
            LlamaFlavor::Llama => None,
            LlamaFlavor::Mistral => Some(window),
            LlamaFlavor::Qwen2 => {
                let on = self.use_sliding_window.unwrap_or(false)
                    && layer >= self.max_window_layers.unwrap_or(0);
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
        if let Some(t) = c.rope().rope_type.as_deref() {
            if !matches!(t, "default" | "llama3" | "linear") {
                bail!(
                    "field `rope_scaling.rope_type`: unsupported `{t}` (default, linear, llama3)"
                );
            }
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
            max_positions: self.max_position_embeddings,
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

/// RoPE inverse frequencies as `transformers` computes them for `rope_type` default, linear, llama3.
pub fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let rope = cfg.rope();
    let theta = rope.rope_theta.unwrap_or(10000.0);
    let hd = cfg.head_dim();
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
        _ => base,
    };
    freqs.into_iter().map(|f| f as f32).collect()
}

/// A projection `x @ W^T (+ b)`, weight stored (out, in).
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

impl Linear {
    fn load(w: &mut Weights, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        // Biases first: the order tensors are drawn in when a fresh model is initialized.
        let bias = w.get_if(bias, "bias", &[d_out])?;
        Ok(Linear {
            weight: w.get("weight", &[d_out, d_in])?,
            bias,
            lora: w.lora(d_in, d_out, false)?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
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
        Ok(Attention {
            q_proj: Linear::load(&mut w.pp("q_proj"), d, h * hd, qkv_bias)?,
            k_proj: Linear::load(&mut w.pp("k_proj"), d, kvh * hd, qkv_bias)?,
            v_proj: Linear::load(&mut w.pp("v_proj"), d, kvh * hd, qkv_bias)?,
            o_proj: Linear::load(&mut w.pp("o_proj"), h * hd, d, cfg.attention_bias)?,
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            window: cfg.layer_window(layer),
        })
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
        let q = ops::rope_heads(&self.q_proj.forward(a)?, cos, sin, self.heads)?;
        let mut k = ops::rope_heads(&self.k_proj.forward(a)?, cos, sin, self.kv_heads)?;
        let mut v = self
            .v_proj
            .forward(a)?
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

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    units: Vec<UnitSlice>,
}

impl Mlp {
    fn load(w: &mut Weights, cfg: &LlamaConfig) -> Result<Self> {
        let (d, inter, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
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
            gate_proj: Linear::load(&mut w.pp("gate_proj"), d, inter, bias)?,
            up_proj: Linear::load(&mut w.pp("up_proj"), d, inter, bias)?,
            down_proj: Linear::load(&mut w.pp("down_proj"), inter, d, bias)?,
            units,
        })
    }

    fn forward(&self, m: &Tensor, trace: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let gate = ops::silu(&self.gate_proj.forward(m)?)?;
        let hidden = (gate * self.up_proj.forward(m)?)?;
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
    /// [head_dim / 2] rotary inverse frequencies, after scaling.
    inv_freq: Tensor,
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
        let (b, t) = positions.dims2()?;
        let half = self.inv_freq.dim(0)?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b, t, 1))?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, half))?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        Ok((emb.cos()?, emb.sin()?))
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
