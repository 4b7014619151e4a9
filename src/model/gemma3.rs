//! Gemma 3, text only (`Gemma3ForCausalLM`, model type `gemma3_text`; MedGemma's text models),
//! and Gemma 2 (`Gemma2ForCausalLM`), which differs in switches:
//! embeddings scaled by sqrt(hidden), RMSNorm with the (1 + weight) convention (also over each
//! query and key head), pre- and post-norms around both attention and the feed-forward,
//! gelu-tanh GeGLU, attention scaled by `query_pre_attn_scalar`, sliding-window and global
//! layers as `layer_types` says, each kind with its own rotary base (`rope_local_base_freq` for
//! the sliding ones), tied head.
//!
//! Gemma 2 has no query/key norms and one rotary base, and soft-caps attention scores and final
//! logits (`cap * tanh(x / cap)`, by default 50 and 30): its attention and head then run on
//! composed ops (the fused kernels have no cap), so it trains slower and with more memory. Gemma
//! 3 configs that set a cap are refused.

use super::config::{default_init_range, ArchConfig, ConfigSummary, SpecialTokenIds};
use super::llama::Linear;
use super::{AttnContext, CausalLm, KvCache, UnitSlice, Weights};
use crate::nn::ops;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub(super) const GEMMA3: super::Architecture = super::Architecture {
    name: "Gemma3ForCausalLM",
    model_type: "gemma3_text",
    parse: |text| Gemma3Config::parse(text, false),
};
pub(super) const GEMMA2: super::Architecture = super::Architecture {
    name: "Gemma2ForCausalLM",
    model_type: "gemma2",
    parse: |text| Gemma3Config::parse(text, true),
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gemma3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "gemma_head_dim")]
    pub head_dim: usize,
    #[serde(default, alias = "hidden_act")]
    pub hidden_activation: Option<String>,
    #[serde(default = "gemma_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "gemma_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "super::config::default_true")]
    pub tie_word_embeddings: bool,
    /// transformers 5: `{"full_attention": {...}, "sliding_attention": {...}}`; older: flat.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "gemma_query_scalar")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "gemma_window")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(flatten)]
    pub tokens: SpecialTokenIds,
    /// Gemma 2 (from `architectures`, not a config field).
    #[serde(skip)]
    pub gemma2: bool,
}

fn gemma_head_dim() -> usize {
    256
}
fn gemma_max_pos() -> usize {
    131_072
}
fn gemma_eps() -> f64 {
    1e-6
}
fn gemma_query_scalar() -> f64 {
    256.0
}
fn gemma_window() -> Option<usize> {
    Some(4096)
}

/// One kind of layer's rotary parameters.
#[derive(Debug, Clone, PartialEq)]
struct Rope {
    theta: f64,
    /// `linear` scaling's factor (1 for `default`).
    linear_factor: f64,
}

impl Gemma3Config {
    fn parse(text: &str, gemma2: bool) -> Result<Arc<dyn ArchConfig>> {
        let mut c: Gemma3Config = serde_json::from_str(text)?;
        c.gemma2 = gemma2;
        if gemma2 {
            // transformers' defaults where the key is absent (an explicit null turns a cap off).
            let raw: serde_json::Value = serde_json::from_str(text)?;
            for (key, default, cap) in [
                (
                    "final_logit_softcapping",
                    30.0,
                    &mut c.final_logit_softcapping,
                ),
                (
                    "attn_logit_softcapping",
                    50.0,
                    &mut c.attn_logit_softcapping,
                ),
            ] {
                if raw.get(key).is_none() {
                    *cap = Some(default);
                }
            }
            if c.sliding_window_pattern.is_none() {
                c.sliding_window_pattern = Some(2);
            }
        }
        if c.num_attention_heads == 0 || !c.num_attention_heads.is_multiple_of(c.kv_heads()) {
            bail!(
                "field `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                c.kv_heads(),
                c.num_attention_heads
            );
        }
        if let Some(act) = c.hidden_activation.as_deref() {
            if act != "gelu_pytorch_tanh" {
                bail!("field `hidden_activation`: unsupported `{act}` (only gelu_pytorch_tanh)");
            }
        }
        for (field, cap) in [
            ("final_logit_softcapping", c.final_logit_softcapping),
            ("attn_logit_softcapping", c.attn_logit_softcapping),
        ] {
            match cap {
                Some(cap) if !gemma2 => {
                    bail!("field `{field}`: soft-capping ({cap}) is supported for Gemma 2 only")
                }
                Some(cap) if cap.is_nan() || cap <= 0.0 => {
                    bail!("field `{field}`: must be above 0, got {cap}")
                }
                _ => {}
            }
        }
        if c.use_bidirectional_attention == Some(true) {
            bail!("field `use_bidirectional_attention`: only causal attention is supported");
        }
        let types = c.layer_types();
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
        c.rope("full_attention")?;
        c.rope("sliding_attention")?;
        Ok(Arc::new(c))
    }

    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per layer, `full_attention` or `sliding_attention` (from `sliding_window_pattern`, default
    /// 6, where the config does not list them: every sixth layer is global).
    fn layer_types(&self) -> Vec<String> {
        match &self.layer_types {
            Some(t) => t.clone(),
            None => {
                let pattern = self.sliding_window_pattern.unwrap_or(6).max(1);
                (0..self.num_hidden_layers)
                    .map(|i| match (i + 1) % pattern {
                        0 => "full_attention".to_string(),
                        _ => "sliding_attention".to_string(),
                    })
                    .collect()
            }
        }
    }

    /// The rotary parameters of one layer kind, wherever the config put them.
    fn rope(&self, kind: &str) -> Result<Rope> {
        // Gemma 2: one rotary base for every layer (10,000 by default).
        let global = kind == "full_attention" || self.gemma2;
        let nested = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get(kind))
            .filter(|v| v.is_object());
        let flat = match (&self.rope_parameters, nested) {
            (Some(p), None) if p.get("full_attention").is_none() && global => Some(p),
            _ => None,
        };
        let params = nested
            .or(flat)
            .or(if global {
                self.rope_scaling.as_ref()
            } else {
                None
            })
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let theta = params
            .get("rope_theta")
            .and_then(|v| v.as_f64())
            .or(if global {
                self.rope_theta
            } else {
                self.rope_local_base_freq
            })
            .unwrap_or(if global && !self.gemma2 {
                1_000_000.0
            } else {
                10_000.0
            });
        let rope_type = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let linear_factor = match rope_type {
            "default" => 1.0,
            "linear" => params.get("factor").and_then(|v| v.as_f64()).unwrap_or(1.0),
            other => bail!(
                "field `rope_parameters.{kind}.rope_type`: unsupported `{other}` (default, linear)"
            ),
        };
        Ok(Rope {
            theta,
            linear_factor,
        })
    }

    fn inv_freq(&self, kind: &str) -> Result<Vec<f32>> {
        let rope = self.rope(kind)?;
        let hd = self.head_dim;
        Ok((0..hd / 2)
            .map(|i| {
                let f = 1.0 / rope.theta.powf((2 * i) as f64 / hd as f64);
                (f / rope.linear_factor) as f32
            })
            .collect())
    }
}

impl ArchConfig for Gemma3Config {
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

    fn init_std(&self, name: &str) -> Option<f64> {
        // Gemma's norms start at zero (they scale by 1 + weight): a zero spread draws zeros.
        if name.ends_with("norm.weight") {
            return Some(0.0);
        }
        super::init::default_init_std(self.initializer_range, name)
    }

    fn is_known_buffer(&self, name: &str) -> bool {
        name.ends_with("rotary_emb.inv_freq") || name == "lm_head.weight"
    }

    fn load(&self, w: &mut Weights) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Gemma3::load(w, self)?))
    }
}

/// RMSNorm that scales by (1 + weight), as Gemma stores its norms.
struct GemmaNorm {
    weight: Tensor,
    eps: f64,
}

impl GemmaNorm {
    fn load(w: &mut Weights, d: usize, eps: f64) -> Result<Self> {
        Ok(GemmaNorm {
            weight: w.get("weight", &[d])?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::rms_norm(x, &self.weight.affine(1.0, 1.0)?, self.eps)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Gemma 3 only.
    q_norm: Option<GemmaNorm>,
    k_norm: Option<GemmaNorm>,
    /// Gemma 2's `attn_logit_softcapping`.
    softcap: Option<f64>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    window: Option<usize>,
    global: bool,
}

impl Attention {
    fn load(w: &mut Weights, cfg: &Gemma3Config, global: bool) -> Result<Self> {
        let (d, h, kvh, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.kv_heads(),
            cfg.head_dim,
        );
        let bias = cfg.attention_bias;
        Ok(Attention {
            q_proj: Linear::load(&mut w.pp("q_proj"), d, h * hd, bias)?,
            k_proj: Linear::load(&mut w.pp("k_proj"), d, kvh * hd, bias)?,
            v_proj: Linear::load(&mut w.pp("v_proj"), d, kvh * hd, bias)?,
            o_proj: Linear::load(&mut w.pp("o_proj"), h * hd, d, bias)?,
            q_norm: (!cfg.gemma2)
                .then(|| GemmaNorm::load(&mut w.pp("q_norm"), hd, cfg.rms_norm_eps))
                .transpose()?,
            k_norm: (!cfg.gemma2)
                .then(|| GemmaNorm::load(&mut w.pp("k_norm"), hd, cfg.rms_norm_eps))
                .transpose()?,
            softcap: cfg.attn_logit_softcapping,
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            scale: 1.0 / cfg.query_pre_attn_scalar.sqrt(),
            window: if global { None } else { cfg.sliding_window },
            global,
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
        let hd = self.head_dim;
        let normed = |x: Tensor, norm: &Option<GemmaNorm>, heads: usize| -> Result<Tensor> {
            Ok(match norm {
                Some(norm) => {
                    norm.forward(&x.reshape((b, t, heads, hd))?)?
                        .reshape((b, t, heads * hd))?
                }
                None => x,
            })
        };
        let q = normed(self.q_proj.forward(a)?, &self.q_norm, self.heads)?;
        let k = normed(self.k_proj.forward(a)?, &self.k_norm, self.kv_heads)?;
        let q = ops::rope_heads(&q, cos, sin, self.heads)?;
        let mut k = ops::rope_heads(&k, cos, sin, self.kv_heads)?;
        let mut v = self
            .v_proj
            .forward(a)?
            .reshape((b, t, self.kv_heads, hd))?
            .transpose(1, 2)?;
        if let Some(cache) = cache {
            (k, v) = cache.append(layer, k.contiguous()?, v.contiguous()?)?;
        }
        let mask = ctx.mask_for(self.window);
        let attn = match self.softcap {
            Some(cap) => ops::attention_softcapped(&q, &k, &v, mask, self.scale, cap)?,
            None => ops::attention(&q, &k, &v, mask, self.scale)?,
        };
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
    fn load(w: &mut Weights, cfg: &Gemma3Config) -> Result<Self> {
        let (d, inter) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            units: vec![
                UnitSlice::new(w.name("gate_proj.weight"), 0),
                UnitSlice::new(w.name("up_proj.weight"), 0),
                UnitSlice::new(w.name("down_proj.weight"), 1),
            ],
            gate_proj: Linear::load(&mut w.pp("gate_proj"), d, inter, false)?,
            up_proj: Linear::load(&mut w.pp("up_proj"), d, inter, false)?,
            down_proj: Linear::load(&mut w.pp("down_proj"), inter, d, false)?,
        })
    }

    fn forward(&self, m: &Tensor, trace: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let gate = ops::gelu_new(&self.gate_proj.forward(m)?)?;
        let hidden = (gate * self.up_proj.forward(m)?)?;
        if let Some(trace) = trace {
            trace.push(hidden.clone());
        }
        Ok(self.down_proj.forward(&hidden)?)
    }
}

struct Block {
    input_layernorm: GemmaNorm,
    self_attn: Attention,
    post_attention_layernorm: GemmaNorm,
    pre_feedforward_layernorm: GemmaNorm,
    mlp: Mlp,
    post_feedforward_layernorm: GemmaNorm,
}

impl Block {
    fn load(w: &mut Weights, cfg: &Gemma3Config, global: bool) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Block {
            input_layernorm: GemmaNorm::load(&mut w.pp("input_layernorm"), d, eps)?,
            self_attn: Attention::load(&mut w.pp("self_attn"), cfg, global)?,
            post_attention_layernorm: GemmaNorm::load(
                &mut w.pp("post_attention_layernorm"),
                d,
                eps,
            )?,
            pre_feedforward_layernorm: GemmaNorm::load(
                &mut w.pp("pre_feedforward_layernorm"),
                d,
                eps,
            )?,
            mlp: Mlp::load(&mut w.pp("mlp"), cfg)?,
            post_feedforward_layernorm: GemmaNorm::load(
                &mut w.pp("post_feedforward_layernorm"),
                d,
                eps,
            )?,
        })
    }
}

pub struct Gemma3 {
    hidden_size: usize,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: GemmaNorm,
    lm_head: Tensor,
    /// [head_dim / 2] rotary inverse frequencies of the global and of the sliding layers.
    inv_freq_global: Tensor,
    inv_freq_local: Tensor,
    /// Gemma 2's `final_logit_softcapping`.
    final_softcap: Option<f64>,
}

impl Gemma3 {
    fn load(root: &mut Weights, cfg: &Gemma3Config) -> Result<Self> {
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let types = cfg.layer_types();
        let mut w = root.pp("model");
        let embed_tokens = w.get("embed_tokens.weight", &[v, d])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for (i, kind) in types.iter().enumerate() {
            let global = kind == "full_attention";
            blocks.push(w.block(i, |w| {
                Block::load(&mut w.pp(format!("layers.{i}")), cfg, global)
            })?);
        }
        let norm = w.final_norm(|w| GemmaNorm::load(&mut w.pp("norm"), d, cfg.rms_norm_eps))?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            root.get("lm_head.weight", &[v, d])?
        };
        let dev = embed_tokens.device().clone();
        Ok(Gemma3 {
            hidden_size: d,
            inv_freq_global: Tensor::new(cfg.inv_freq("full_attention")?, &dev)?,
            inv_freq_local: Tensor::new(cfg.inv_freq("sliding_attention")?, &dev)?,
            final_softcap: cfg.final_logit_softcapping,
            embed_tokens,
            blocks,
            norm,
            lm_head,
        })
    }

    fn rope_tables(
        &self,
        positions: &Tensor,
        global: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let inv_freq = if global {
            &self.inv_freq_global
        } else {
            &self.inv_freq_local
        };
        super::llama::rope_tables(positions, inv_freq, 1.0)
    }
}

impl CausalLm for Gemma3 {
    fn embed(&self, ids: &Tensor, _ctx: &AttnContext) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        // transformers scales by sqrt(hidden) cast to the weights' dtype.
        let scale = (self.hidden_size as f32).sqrt() as f64;
        Ok((e.reshape((b, t, self.hidden_size))? * scale)?)
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
        let rope = self.rope_tables(&ctx.positions, blk.self_attn.global)?;
        let a = blk.input_layernorm.forward(x)?;
        let attn = blk.self_attn.forward(&a, layer, &rope, ctx, cache)?;
        let x = (x + blk.post_attention_layernorm.forward(&attn)?)?;
        let m = blk.pre_feedforward_layernorm.forward(&x)?;
        let m = blk.mlp.forward(&m, mlp_trace)?;
        Ok((&x + blk.post_feedforward_layernorm.forward(&m)?)?)
    }

    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(x)?)
    }

    fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    fn final_logit_softcap(&self) -> Option<f64> {
        self.final_softcap
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

    const BASE: &str = r#""architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 6, "num_attention_heads": 2, "head_dim": 4"#;

    #[test]
    fn layer_kinds_rope_bases_and_refusals() {
        let cfg = ModelConfig::from_json(&format!(
            "{{{BASE}, \"rope_theta\": 500000.0, \"rope_local_base_freq\": 20000.0}}"
        ))
        .unwrap();
        assert_eq!(cfg.architecture(), "Gemma3ForCausalLM");
        assert!(cfg.tied_embeddings(), "Gemma ties its head by default");
        let text = format!("{{{BASE}}}");
        let c: super::Gemma3Config = serde_json::from_str(&text).unwrap();
        // Every sixth layer is global where the config does not list them.
        assert_eq!(c.layer_types()[5], "full_attention");
        assert!(c.layer_types()[..5]
            .iter()
            .all(|t| t == "sliding_attention"));
        let c: super::Gemma3Config = serde_json::from_str(&format!(
            "{{{BASE}, \"rope_theta\": 500000.0, \"rope_local_base_freq\": 20000.0}}"
        ))
        .unwrap();
        assert_eq!(c.rope("full_attention").unwrap().theta, 500000.0);
        assert_eq!(c.rope("sliding_attention").unwrap().theta, 20000.0);
        assert_eq!(
            super::super::init::init_std(&cfg, "model.norm.weight"),
            Some(0.0)
        );
        for (extra, field) in [
            (r#""final_logit_softcapping": 30.0"#, "Gemma 2 only"),
            (
                r#""attn_logit_softcapping": 50.0"#,
                "attn_logit_softcapping",
            ),
            (r#""hidden_activation": "relu""#, "hidden_activation"),
            (r#""layer_types": ["full_attention"]"#, "layer_types"),
        ] {
            let err = ModelConfig::from_json(&format!("{{{BASE}, {extra}}}")).unwrap_err();
            assert!(format!("{err:#}").contains(field), "{extra}: {err:#}");
        }
    }
}
