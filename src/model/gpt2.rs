//! GPT-2 (`GPT2LMHeadModel`): learned positions, fused `c_attn`, Conv1D weights stored (in, out),
//! pre-LayerNorm blocks, tied `lm_head`. Checkpoints with or without the `transformer.` prefix.

use super::{AttnContext, KvCache, UnitSlice, WeightLoader};
use crate::model::config::Gpt2Config;
use crate::nn::ops;
use anyhow::Result;
use candle_core::Tensor;

struct Block {
    ln1_w: Tensor,
    ln1_b: Tensor,
    attn_w: Tensor,
    attn_b: Tensor,
    attn_proj_w: Tensor,
    attn_proj_b: Tensor,
    ln2_w: Tensor,
    ln2_b: Tensor,
    fc_w: Tensor,
    fc_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
}

pub struct Gpt2 {
    cfg: Gpt2Config,
    prefix: String,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    lnf_w: Tensor,
    lnf_b: Tensor,
    lm_head: Tensor,
}

/// Buffers some GPT-2 checkpoints store; they are carried through unchanged.
pub(super) fn is_known_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name == "lm_head.weight"
}

impl Gpt2 {
    pub(super) fn load(w: &mut WeightLoader, cfg: &Gpt2Config) -> Result<Self> {
        // Original OpenAI checkpoints store names without the `transformer.` prefix.
        let prefix = if w.has("wte.weight") {
            ""
        } else {
            "transformer."
        }
        .to_string();
        let (d, v, inner) = (cfg.n_embd, cfg.vocab_size, cfg.inner_size());
        let p = |s: &str| format!("{prefix}{s}");
        let wte = w.get(&p("wte.weight"), &[v, d])?;
        let wpe = w.get(&p("wpe.weight"), &[cfg.n_positions, d])?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let b = |s: &str| format!("{prefix}h.{i}.{s}");
            blocks.push(Block {
                ln1_w: w.get(&b("ln_1.weight"), &[d])?,
                ln1_b: w.get(&b("ln_1.bias"), &[d])?,
                attn_w: w.get(&b("attn.c_attn.weight"), &[d, 3 * d])?,
                attn_b: w.get(&b("attn.c_attn.bias"), &[3 * d])?,
                attn_proj_w: w.get(&b("attn.c_proj.weight"), &[d, d])?,
                attn_proj_b: w.get(&b("attn.c_proj.bias"), &[d])?,
                ln2_w: w.get(&b("ln_2.weight"), &[d])?,
                ln2_b: w.get(&b("ln_2.bias"), &[d])?,
                fc_w: w.get(&b("mlp.c_fc.weight"), &[d, inner])?,
                fc_b: w.get(&b("mlp.c_fc.bias"), &[inner])?,
                proj_w: w.get(&b("mlp.c_proj.weight"), &[inner, d])?,
                proj_b: w.get(&b("mlp.c_proj.bias"), &[d])?,
            });
        }
        let lnf_w = w.get(&p("ln_f.weight"), &[d])?;
        let lnf_b = w.get(&p("ln_f.bias"), &[d])?;
        let lm_head = if cfg.tie_word_embeddings {
            wte.clone()
        } else {
            w.get("lm_head.weight", &[v, d])?
        };
        Ok(Gpt2 {
            cfg: cfg.clone(),
            prefix,
            wte,
            wpe,
            blocks,
            lnf_w,
            lnf_b,
            lm_head,
        })
    }

    pub(super) fn block_tensor_names(&self, layer: usize) -> Vec<String> {
        [
            "ln_1.weight",
            "ln_1.bias",
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            "attn.c_proj.weight",
            "attn.c_proj.bias",
            "ln_2.weight",
            "ln_2.bias",
            "mlp.c_fc.weight",
            "mlp.c_fc.bias",
            "mlp.c_proj.weight",
            "mlp.c_proj.bias",
        ]
        .iter()
        .map(|s| format!("{}h.{layer}.{s}", self.prefix))
        .collect()
    }

    pub(super) fn mlp_unit_slices(&self, layer: usize) -> Vec<UnitSlice> {
        let n = |s: &str, axis| UnitSlice {
            name: format!("{}h.{layer}.mlp.{s}", self.prefix),
            axis,
        };
        vec![
            n("c_fc.weight", 1),
            n("c_fc.bias", 0),
            n("c_proj.weight", 0),
        ]
    }

    pub(super) fn mlp_down_weight(&self, layer: usize) -> Tensor {
        self.blocks[layer].proj_w.clone()
    }

    pub(super) fn embed(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.cfg.n_embd;
        let tok = self.wte.index_select(&ids.flatten_all()?, 0)?;
        let pos = self.wpe.index_select(&positions.flatten_all()?, 0)?;
        Ok((tok + pos)?.reshape((b, t, d))?)
    }

    fn act(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.cfg.activation_function.as_str() {
            "gelu" => x.gelu_erf(),
            "relu" => x.relu(),
            "silu" => x.silu(),
            _ => crate::nn::ops::gelu_new(x),
        }
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
        let eps = self.cfg.layer_norm_epsilon;
        let d = x.dim(2)?;
        let h = self.cfg.n_head;
        let hd = d / h;
        let a = ops::layer_norm(x, &blk.ln1_w, &blk.ln1_b, eps)?;
        let qkv = ops::conv1d(&a, &blk.attn_w, &blk.attn_b)?;
        let mut scale = if self.cfg.scale_attn_weights {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        };
        if self.cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        let mask = ctx.mask_for(None);
        let attn = match cache {
            None => ops::attention_packed(&qkv, h, mask, scale)?,
            Some(cache) => {
                let (q, k, v) = ops::split_packed_qkv(&qkv, h)?;
                let (k, v) = cache.append(layer, k.contiguous()?, v.contiguous()?)?;
                ops::attention(&q, &k, &v, mask, scale)?
            }
        };
        let x = (x + ops::conv1d(&attn, &blk.attn_proj_w, &blk.attn_proj_b)?)?;
        let m = ops::layer_norm(&x, &blk.ln2_w, &blk.ln2_b, eps)?;
        let hidden = self.act(&ops::conv1d(&m, &blk.fc_w, &blk.fc_b)?)?;
        if let Some(trace) = mlp_trace {
            trace.push(hidden.clone());
        }
        Ok((x + ops::conv1d(&hidden, &blk.proj_w, &blk.proj_b)?)?)
    }

    pub(super) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::layer_norm(
            x,
            &self.lnf_w,
            &self.lnf_b,
            self.cfg.layer_norm_epsilon,
        )?)
    }

    pub(super) fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head
    }
}
