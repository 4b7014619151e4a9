//! GPT-2 (`GPT2LMHeadModel`): learned positions, fused `c_attn`, Conv1D weights stored (in, out),
//! pre-LayerNorm blocks, tied `lm_head`. Checkpoints with or without the `transformer.` prefix.

use super::config::{default_init_range, default_true, ArchConfig, ConfigSummary, SpecialTokenIds};
use super::{AttnContext, CausalLm, KvCache, UnitSlice, Weights};
use crate::nn::lora::LoraAdapter;
use crate::nn::ops;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub(super) const REGISTRATION: super::Architecture = super::Architecture {
    name: "GPT2LMHeadModel",
    model_type: "gpt2",
    parse: Gpt2Config::parse,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "gpt2_act")]
    pub activation_function: String,
    #[serde(default = "gpt2_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(flatten)]
    pub tokens: SpecialTokenIds,
}

fn gpt2_act() -> String {
    "gelu_new".into()
}
fn gpt2_eps() -> f64 {
    1e-5
}

impl Gpt2Config {
    fn parse(text: &str) -> Result<Arc<dyn ArchConfig>> {
        let c: Gpt2Config = serde_json::from_str(text)?;
        if c.n_head == 0 || !c.n_embd.is_multiple_of(c.n_head) {
            bail!(
                "field `n_embd` ({}) must be a multiple of `n_head` ({})",
                c.n_embd,
                c.n_head
            );
        }
        match c.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu" | "relu" | "silu" => {}
            other => bail!("field `activation_function`: unsupported `{other}`"),
        }
        Ok(Arc::new(c))
    }

    pub fn inner_size(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

impl ArchConfig for Gpt2Config {
    fn summary(&self) -> ConfigSummary {
        ConfigSummary {
            num_layers: self.n_layer,
            hidden_size: self.n_embd,
            mlp_width: self.inner_size(),
            heads: self.n_head,
            kv_heads: self.n_head,
            vocab_size: self.vocab_size,
            tied_embeddings: self.tie_word_embeddings,
            max_positions: self.n_positions,
            initializer_range: self.initializer_range,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
        }
        .with_tokens(&self.tokens)
    }

    fn stores_in_out(&self, name: &str) -> bool {
        [
            "attn.c_attn.weight",
            "attn.c_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        ]
        .iter()
        .any(|s| name.ends_with(s))
    }

    fn init_std(&self, name: &str) -> Option<f64> {
        let base = super::init::default_init_std(self.initializer_range, name)?;
        // GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        Some(if name.ends_with("c_proj.weight") {
            base / (2.0 * self.n_layer as f64).sqrt()
        } else {
            base
        })
    }

    fn is_known_buffer(&self, name: &str) -> bool {
        name.ends_with(".attn.bias")
            || name.ends_with(".attn.masked_bias")
            || name == "lm_head.weight"
    }

    fn load(&self, w: &mut Weights) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Gpt2::load(w, self)?))
    }
}

/// A Conv1D layer: `x @ weight + bias`, weight stored (in, out).
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
    lora: Option<LoraAdapter>,
}

impl Conv1D {
    fn load(w: &mut Weights, d_in: usize, d_out: usize) -> Result<Self> {
        let (weight, lora) = w.projection(d_in, d_out, true)?;
        Ok(Conv1D {
            weight,
            bias: w.get("bias", &[d_out])?,
            lora,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.lora {
            Some(lora) => lora.forward(x, &self.weight, Some(&self.bias), false),
            None => ops::conv1d(x, &self.weight, &self.bias),
        }
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(w: &mut Weights, d: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get("weight", &[d])?,
            bias: w.get("bias", &[d])?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn load(w: &mut Weights, cfg: &Gpt2Config, layer: usize) -> Result<Self> {
        let d = cfg.n_embd;
        let mut scale = if cfg.scale_attn_weights {
            1.0 / ((d / cfg.n_head) as f64).sqrt()
        } else {
            1.0
        };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Ok(Attention {
            c_attn: Conv1D::load(&mut w.pp("c_attn"), d, 3 * d)?,
            c_proj: Conv1D::load(&mut w.pp("c_proj"), d, d)?,
            heads: cfg.n_head,
            scale,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        ctx: &AttnContext,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let qkv = self.c_attn.forward(x)?;
        let mask = ctx.mask_for(None);
        let attn = match cache {
            None => ops::attention_packed(&qkv, self.heads, mask, self.scale)?,
            Some(cache) => {
                let (q, k, v) = ops::split_packed_qkv(&qkv, self.heads)?;
                let (k, v) = cache.append(layer, k.contiguous()?, v.contiguous()?)?;
                ops::attention(&q, &k, &v, mask, self.scale)?
            }
        };
        Ok(self.c_proj.forward(&attn)?)
    }
}

struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
    activation: String,
    units: Vec<UnitSlice>,
}

impl Mlp {
    fn load(w: &mut Weights, cfg: &Gpt2Config) -> Result<Self> {
        let (d, inner) = (cfg.n_embd, cfg.inner_size());
        let units = vec![
            UnitSlice::new(w.name("c_fc.weight"), 1),
            UnitSlice::new(w.name("c_fc.bias"), 0),
            UnitSlice::new(w.name("c_proj.weight"), 0),
        ];
        Ok(Mlp {
            c_fc: Conv1D::load(&mut w.pp("c_fc"), d, inner)?,
            c_proj: Conv1D::load(&mut w.pp("c_proj"), inner, d)?,
            activation: cfg.activation_function.clone(),
            units,
        })
    }

    fn act(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.activation.as_str() {
            "gelu" => x.gelu_erf(),
            "relu" => x.relu(),
            "silu" => x.silu(),
            _ => ops::gelu_new(x),
        }
    }

    fn forward(&self, x: &Tensor, trace: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let hidden = self.act(&self.c_fc.forward(x)?)?;
        if let Some(trace) = trace {
            trace.push(hidden.clone());
        }
        Ok(self.c_proj.forward(&hidden)?)
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn load(w: &mut Weights, cfg: &Gpt2Config, layer: usize) -> Result<Self> {
        let (d, eps) = (cfg.n_embd, cfg.layer_norm_epsilon);
        Ok(Block {
            ln_1: LayerNorm::load(&mut w.pp("ln_1"), d, eps)?,
            attn: Attention::load(&mut w.pp("attn"), cfg, layer)?,
            ln_2: LayerNorm::load(&mut w.pp("ln_2"), d, eps)?,
            mlp: Mlp::load(&mut w.pp("mlp"), cfg)?,
        })
    }
}

pub struct Gpt2 {
    n_embd: usize,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Tensor,
}

impl Gpt2 {
    fn load(root: &mut Weights, cfg: &Gpt2Config) -> Result<Self> {
        // Original OpenAI checkpoints store names without the `transformer.` prefix.
        let prefix = if root.contains("wte.weight") {
            ""
        } else {
            "transformer"
        };
        let (d, v) = (cfg.n_embd, cfg.vocab_size);
        let mut w = root.pp(prefix);
        let wte = w.get("wte.weight", &[v, d])?;
        let wpe = w.get("wpe.weight", &[cfg.n_positions, d])?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            blocks.push(w.block(i, |w| Block::load(&mut w.pp(format!("h.{i}")), cfg, i))?);
        }
        let ln_f =
            w.final_norm(|w| LayerNorm::load(&mut w.pp("ln_f"), d, cfg.layer_norm_epsilon))?;
        let lm_head = if cfg.tie_word_embeddings {
            wte.clone()
        } else {
            root.get("lm_head.weight", &[v, d])?
        };
        Ok(Gpt2 {
            n_embd: d,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }
}

impl CausalLm for Gpt2 {
    fn embed(&self, ids: &Tensor, ctx: &AttnContext) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let tok = self.wte.index_select(&ids.flatten_all()?, 0)?;
        let pos = self.wpe.index_select(&ctx.positions.flatten_all()?, 0)?;
        Ok((tok + pos)?.reshape((b, t, self.n_embd))?)
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
        let x = (x + blk.attn.forward(&blk.ln_1.forward(x)?, layer, ctx, cache)?)?;
        Ok((&x + blk.mlp.forward(&blk.ln_2.forward(&x)?, mlp_trace)?)?)
    }

    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.ln_f.forward(x)?)
    }

    fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }

    fn sliding_window(&self) -> Option<usize> {
        None
    }

    fn mlp_unit_slices(&self, layer: usize) -> Vec<UnitSlice> {
        self.blocks[layer].mlp.units.clone()
    }

    fn mlp_down_weight(&self, layer: usize) -> Result<Tensor> {
        Ok(self.blocks[layer].mlp.c_proj.weight.clone())
    }
}
