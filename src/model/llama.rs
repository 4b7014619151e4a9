//! The Llama family (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`): RMSNorm,
//! rotary positions (default, linear and llama3 scaling), grouped-query attention, SwiGLU MLP,
//! optional qkv bias (Qwen2) and tied embeddings.

use super::{AttnContext, KvCache, UnitSlice, WeightLoader};
use crate::model::config::{LlamaConfig, LlamaFlavor};
use crate::nn::ops;
use anyhow::Result;
use candle_core::{DType, Tensor, D};

struct Block {
    in_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_b: Option<Tensor>,
    k_b: Option<Tensor>,
    v_b: Option<Tensor>,
    o: Tensor,
    o_b: Option<Tensor>,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    gate_b: Option<Tensor>,
    up_b: Option<Tensor>,
    down_b: Option<Tensor>,
    window: Option<usize>,
}

pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    /// [head_dim / 2] rotary inverse frequencies, after scaling.
    inv_freq: Tensor,
}

pub(super) fn is_known_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq") || name == "lm_head.weight"
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

impl Llama {
    pub(super) fn load(
        w: &mut WeightLoader,
        cfg: &LlamaConfig,
        flavor: LlamaFlavor,
    ) -> Result<Self> {
        let (d, v, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (h, kvh, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let qkv_bias = cfg.attention_bias || flavor == LlamaFlavor::Qwen2;
        let embed = w.get("model.embed_tokens.weight", &[v, d])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let n = |s: &str| format!("model.layers.{i}.{s}");
            let mut opt = |s: &str, shape: &[usize], on: bool| -> Result<Option<Tensor>> {
                if on {
                    w.get(&n(s), shape).map(Some)
                } else {
                    Ok(None)
                }
            };
            let q_b = opt("self_attn.q_proj.bias", &[h * hd], qkv_bias)?;
            let k_b = opt("self_attn.k_proj.bias", &[kvh * hd], qkv_bias)?;
            let v_b = opt("self_attn.v_proj.bias", &[kvh * hd], qkv_bias)?;
            let o_b = opt("self_attn.o_proj.bias", &[d], cfg.attention_bias)?;
            let gate_b = opt("mlp.gate_proj.bias", &[inter], cfg.mlp_bias)?;
            let up_b = opt("mlp.up_proj.bias", &[inter], cfg.mlp_bias)?;
            let down_b = opt("mlp.down_proj.bias", &[d], cfg.mlp_bias)?;
            blocks.push(Block {
                in_norm: w.get(&n("input_layernorm.weight"), &[d])?,
                q: w.get(&n("self_attn.q_proj.weight"), &[h * hd, d])?,
                k: w.get(&n("self_attn.k_proj.weight"), &[kvh * hd, d])?,
                v: w.get(&n("self_attn.v_proj.weight"), &[kvh * hd, d])?,
                o: w.get(&n("self_attn.o_proj.weight"), &[d, h * hd])?,
                post_norm: w.get(&n("post_attention_layernorm.weight"), &[d])?,
                gate: w.get(&n("mlp.gate_proj.weight"), &[inter, d])?,
                up: w.get(&n("mlp.up_proj.weight"), &[inter, d])?,
                down: w.get(&n("mlp.down_proj.weight"), &[d, inter])?,
                q_b,
                k_b,
                v_b,
                o_b,
                gate_b,
                up_b,
                down_b,
                window: cfg.layer_window(flavor, i),
            });
        }
        let norm = w.get("model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            w.get("lm_head.weight", &[v, d])?
        };
        let inv_freq = Tensor::new(rope_inv_freq(cfg), embed.device())?;
        Ok(Llama {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
        })
    }

    pub(super) fn sliding_window(&self) -> Option<usize> {
        self.blocks.iter().filter_map(|b| b.window).min()
    }

    pub(super) fn block_tensor_names(&self, layer: usize) -> Vec<String> {
        let blk = &self.blocks[layer];
        let mut names = vec![
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ];
        if blk.q_b.is_some() {
            names.extend([
                "self_attn.q_proj.bias",
                "self_attn.k_proj.bias",
                "self_attn.v_proj.bias",
            ]);
        }
        if blk.o_b.is_some() {
            names.push("self_attn.o_proj.bias");
        }
        if blk.gate_b.is_some() {
            names.extend([
                "mlp.gate_proj.bias",
                "mlp.up_proj.bias",
                "mlp.down_proj.bias",
            ]);
        }
        names
            .iter()
            .map(|s| format!("model.layers.{layer}.{s}"))
            .collect()
    }

    pub(super) fn mlp_unit_slices(&self, layer: usize) -> Vec<UnitSlice> {
        let n = |s: &str, axis| UnitSlice {
            name: format!("model.layers.{layer}.mlp.{s}"),
            axis,
        };
        let mut v = vec![
            n("gate_proj.weight", 0),
            n("up_proj.weight", 0),
            n("down_proj.weight", 1),
        ];
        if self.blocks[layer].gate_b.is_some() {
            v.extend([n("gate_proj.bias", 0), n("up_proj.bias", 0)]);
        }
        v
    }

    pub(super) fn mlp_down_weight(&self, layer: usize) -> Tensor {
        self.blocks[layer].down.clone()
    }

    pub(super) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self.embed.index_select(&ids.flatten_all()?, 0)?;
        Ok(e.reshape((b, t, self.cfg.hidden_size))?)
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

    pub(super) fn block(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &AttnContext,
        cache: Option<&mut KvCache>,
        mlp_trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let blk = &self.blocks[layer];
        let eps = self.cfg.rms_norm_eps;
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.kv_heads(),
            self.cfg.head_dim(),
        );
        let a = ops::rms_norm(x, &blk.in_norm, eps)?;
        let heads = |w: &Tensor, bias: &Option<Tensor>, n: usize| -> candle_core::Result<Tensor> {
            ops::linear(&a, w, bias.as_ref())?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)
        };
        let (cos, sin) = self.rope_tables(&ctx.positions)?;
        let proj = |w: &Tensor, bias: &Option<Tensor>| ops::linear(&a, w, bias.as_ref());
        let q = ops::rope_heads(&proj(&blk.q, &blk.q_b)?, &cos, &sin, h)?;
        let mut k = ops::rope_heads(&proj(&blk.k, &blk.k_b)?, &cos, &sin, kvh)?;
        let mut v = heads(&blk.v, &blk.v_b, kvh)?;
        if let Some(cache) = cache {
            (k, v) = cache.append(layer, k.contiguous()?, v.contiguous()?)?;
        }
        let attn = ops::attention(
            &q,
            &k,
            &v,
            ctx.mask_for(blk.window),
            1.0 / (hd as f64).sqrt(),
        )?;
        let x = (x + ops::linear(&attn, &blk.o, blk.o_b.as_ref())?)?;
        let m = ops::rms_norm(&x, &blk.post_norm, eps)?;
        let gate = ops::silu(&ops::linear(&m, &blk.gate, blk.gate_b.as_ref())?)?;
        let hidden = (gate * ops::linear(&m, &blk.up, blk.up_b.as_ref())?)?;
        if let Some(trace) = mlp_trace {
            trace.push(hidden.clone());
        }
        Ok((x + ops::linear(&hidden, &blk.down, blk.down_b.as_ref())?)?)
    }

    pub(super) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::rms_norm(x, &self.norm, self.cfg.rms_norm_eps)?)
    }

    pub(super) fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }
}
