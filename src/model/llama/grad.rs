//! A Llama block's backward pass written by hand, for activation checkpointing (where each
//! block's forward runs again in the backward anyway): the forward is recomputed without a
//! graph, keeping what the backward reads, or that was kept by the forward pass itself within
//! the step's activation budget ([`Llama::plain_block_keeping`]), and the gradients of the
//! input and of the trainable weights follow directly. Through candle's autograd every node's gradient starts as a tensor
//! of zeros that the contribution is then added to, and the checkpointing wrapper adds
//! `sum(out * g)` and its backward: about 1 s of memory traffic per step on SmolLM2-135M.
//! Here each gradient is written once, and the work whose result nobody reads (the input's
//! gradient of the lowest block under a frozen embedding, the attention's backward when
//! nothing in or below it trains) is skipped.
//!
//! It covers the plain block (separate projections, full rotation, no per-head norms, no
//! adapters) on f32 CPU tensors; other blocks return None and go through autograd.

use super::{Block, GateUp, Linear, Llama, Qkv, RmsNorm};
use crate::model::{AttnContext, BlockGrads, KeptActivations};
use crate::nn::{fused, ops};
use anyhow::Result;
use candle_core::{DType, Tensor};

/// What the backward reads of one block's forward.
struct Saved {
    /// The normalized input of the attention [b, t, d], and of the MLP.
    a: Tensor,
    m: Tensor,
    /// silu(gate) * up, the input of `down_proj`.
    hidden: Tensor,
    kept: Kept,
}

/// The part of [`Saved`] kept between the passes ([`Llama::plain_block_keeping`]): the
/// normalized inputs and SwiGLU's output are recomputed from it and the block input
/// (element-wise, cheap), so a kept block holds 5,184 floats per token on SmolLM2-135M
/// instead of 7,872.
struct Kept {
    /// The block input after attention (x + attention) [b, t, d].
    x1: Tensor,
    /// Rotated queries [b, h, t, hd] and keys, values [b, kvh, t, hd].
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The attention's output before `o_proj` [b, t, h * hd].
    attn: Tensor,
    gate: Tensor,
    up: Tensor,
}

impl Kept {
    fn into_activations(self) -> KeptActivations {
        let bytes = KeptActivations::bytes_of(&[
            &self.x1, &self.q, &self.k, &self.v, &self.attn, &self.gate, &self.up,
        ]);
        KeptActivations::new(self, bytes)
    }
}

/// Collects `(weight, gradient)` pairs for the weights that train.
#[derive(Default)]
struct WeightGrads(Vec<(Tensor, Tensor)>);

/// Whether a weight trains: the tensor of a `Var` (frozen weights are plain tensors).
fn trains(t: &Tensor) -> bool {
    t.track_op()
}

impl Linear {
    /// `x W^T + b` with no graph recorded.
    fn forward_detached(&self, x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(|b| b.detach());
        Ok(ops::linear(x, &self.weight.detach(), bias.as_ref())?)
    }

    fn trains(&self) -> bool {
        trains(&self.weight) || self.bias.as_ref().is_some_and(trains)
    }

    /// For the output gradient `g` of `forward(x)`: the weight's and bias's gradients into
    /// `out` when they train, and the input's gradient when `want_input`.
    fn backward(
        &self,
        x: &Tensor,
        g: &Tensor,
        want_input: bool,
        out: &mut WeightGrads,
    ) -> Result<Option<Tensor>> {
        let (d_out, d_in) = (
            g.dim(candle_core::D::Minus1)?,
            x.dim(candle_core::D::Minus1)?,
        );
        let g2 = g.reshape(((), d_out))?;
        if trains(&self.weight) {
            let x2 = x.reshape(((), d_in))?;
            out.0.push((self.weight.clone(), g2.t()?.matmul(&x2)?));
        }
        if let Some(b) = self.bias.as_ref().filter(|b| trains(b)) {
            out.0.push((b.clone(), g2.sum(0)?));
        }
        if !want_input {
            return Ok(None);
        }
        let w = match self.weight.dtype() {
            DType::F32 => self.weight.detach(),
            _ => self.weight.to_dtype(DType::F32)?,
        };
        Ok(Some(g2.matmul(&w)?.reshape(x.shape())?))
    }
}

impl RmsNorm {
    /// The input's gradient; the weight's into `out` when it trains.
    fn backward(&self, x: &Tensor, g: &Tensor, out: &mut WeightGrads) -> Result<Tensor> {
        let (dx, dw) = fused::rms_norm_grads(x, &self.weight.detach(), g, self.eps)?;
        if trains(&self.weight) {
            out.0.push((self.weight.clone(), dw));
        }
        Ok(dx)
    }
}

/// Sums the gradients that reached one tensor from several consumers.
fn sum_grads(parts: Vec<Option<Tensor>>) -> Result<Option<Tensor>> {
    let mut acc: Option<Tensor> = None;
    for p in parts.into_iter().flatten() {
        acc = Some(match acc {
            None => p,
            Some(a) => (a + p)?,
        });
    }
    Ok(acc)
}

impl Block {
    /// The projections this hand-written backward covers, or None (fused q|k|v or gate|up,
    /// per-head norms, partial rotation, adapters: autograd handles those).
    fn plain_parts(&self) -> Option<([&Linear; 3], [&Linear; 2])> {
        let att = &self.self_attn;
        let Qkv::Separate { q, k, v } = &att.qkv else {
            return None;
        };
        let GateUp::Separate { gate, up } = &self.mlp.gate_up else {
            return None;
        };
        let plain = att.q_norm.is_none()
            && att.k_norm.is_none()
            && att.rotary_dim == att.head_dim
            && [q, k, v, &att.o_proj, gate, up, &self.mlp.down_proj]
                .iter()
                .all(|l| l.lora.is_none());
        plain.then_some(([q, k, v], [gate, up]))
    }

    /// The block's forward up to the MLP's hidden activation, keeping what the backward reads
    /// (the output itself is not needed).
    fn forward_saved(
        &self,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        mask: &Tensor,
    ) -> Result<Saved> {
        let ([q, k, v], [gate, up]) = self.plain_parts().expect("checked by the caller");
        let att = &self.self_attn;
        let (b, t, _) = x.dims3()?;
        let a = ops::rms_norm(
            x,
            &self.input_layernorm.weight.detach(),
            self.input_layernorm.eps,
        )?;
        let q = fused::rope_heads(&q.forward_detached(&a)?, cos, sin, att.heads)?;
        let k = fused::rope_heads(&k.forward_detached(&a)?, cos, sin, att.kv_heads)?;
        let v = v
            .forward_detached(&a)?
            .reshape((b, t, att.kv_heads, att.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let scale = 1.0 / (att.head_dim as f64).sqrt();
        let attn = fused::attention(&q, &k, &v, mask, scale)?;
        let x1 = (x + att.o_proj.forward_detached(&attn)?)?;
        let norm2 = &self.post_attention_layernorm;
        let m = ops::rms_norm(&x1, &norm2.weight.detach(), norm2.eps)?;
        let (gate, up) = (gate.forward_detached(&m)?, up.forward_detached(&m)?);
        let hidden = fused::swiglu(&gate, &up)?;
        Ok(Saved {
            a,
            m,
            hidden,
            kept: Kept {
                x1,
                q,
                k,
                v,
                attn,
                gate,
                up,
            },
        })
    }

    /// [`Saved`] from what was kept and the block input `x`.
    fn restore(&self, x: &Tensor, kept: Kept) -> Result<Saved> {
        let norm = |n: &RmsNorm, x: &Tensor| ops::rms_norm(x, &n.weight.detach(), n.eps);
        Ok(Saved {
            a: norm(&self.input_layernorm, x)?,
            m: norm(&self.post_attention_layernorm, &kept.x1)?,
            hidden: fused::swiglu(&kept.gate, &kept.up)?,
            kept,
        })
    }

    fn backward(
        &self,
        x: &Tensor,
        s: Saved,
        g: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        mask: &Tensor,
        want_input: bool,
    ) -> Result<BlockGrads> {
        let ([q, k, v], [gate, up]) = self.plain_parts().expect("checked by the caller");
        let att = &self.self_attn;
        let Saved {
            a,
            m,
            hidden,
            kept:
                Kept {
                    x1,
                    q: q_rot,
                    k: k_rot,
                    v: v_heads,
                    attn,
                    gate: gate_out,
                    up: up_out,
                },
        } = s;
        let mut w = WeightGrads::default();
        // MLP: out = x1 + down(swiglu(gate(m), up(m))), m = norm2(x1).
        let mlp = &self.mlp;
        let d_hidden = mlp
            .down_proj
            .backward(&hidden, g, true, &mut w)?
            .expect("asked for");
        drop(hidden);
        let (d_gate, d_up) = fused::swiglu_grads(&gate_out, &up_out, &d_hidden)?;
        drop((d_hidden, gate_out, up_out));
        let d_m = sum_grads(vec![
            gate.backward(&m, &d_gate, true, &mut w)?,
            up.backward(&m, &d_up, true, &mut w)?,
        ])?
        .expect("asked for");
        drop((d_gate, d_up, m));
        let d_x1 = (g + self.post_attention_layernorm.backward(&x1, &d_m, &mut w)?)?;
        drop((d_m, x1));
        // Attention: x1 = x + o_proj(attention(rope(q(a)), rope(k(a)), v(a))), a = norm1(x).
        let norm1_trains = trains(&self.input_layernorm.weight);
        let need_a = want_input || norm1_trains;
        let below_o = need_a || [q, k, v].iter().any(|l| l.trains());
        if below_o || att.o_proj.trains() {
            let d_attn = att.o_proj.backward(&attn, &d_x1, below_o, &mut w)?;
            if let Some(d_attn) = d_attn {
                let scale = 1.0 / (att.head_dim as f64).sqrt();
                let (dq, dk, dv) =
                    fused::attention_grads(&q_rot, &k_rot, &v_heads, mask, scale, &d_attn)?;
                drop((d_attn, q_rot, k_rot, v_heads));
                let (b, t, _) = x.dims3()?;
                let dq = fused::rope_heads_grad(&dq, cos, sin, att.heads)?;
                let dk = fused::rope_heads_grad(&dk, cos, sin, att.kv_heads)?;
                let dv = dv.transpose(1, 2)?.contiguous()?.reshape((
                    b,
                    t,
                    att.kv_heads * att.head_dim,
                ))?;
                let d_a = sum_grads(vec![
                    q.backward(&a, &dq, need_a, &mut w)?,
                    k.backward(&a, &dk, need_a, &mut w)?,
                    v.backward(&a, &dv, need_a, &mut w)?,
                ])?;
                if let Some(d_a) = d_a {
                    let d_x = self.input_layernorm.backward(x, &d_a, &mut w)?;
                    return Ok(BlockGrads {
                        input: want_input.then(|| d_x1 + d_x).transpose()?,
                        weights: w.0,
                    });
                }
            }
        }
        Ok(BlockGrads {
            input: want_input.then_some(d_x1),
            weights: w.0,
        })
    }
}

impl Llama {
    /// See [`crate::model::CausalLm::block_keeping`].
    pub(super) fn plain_block_keeping(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &AttnContext,
    ) -> Result<Option<(Tensor, KeptActivations)>> {
        let blk = &self.blocks[layer];
        if blk.plain_parts().is_none() || !ops::fusable(&[x]) {
            return Ok(None);
        }
        let rope = self.rope_tables(&ctx.positions)?;
        let x = x.detach();
        let saved = blk.forward_saved(&x, &rope, ctx.mask_for(blk.self_attn.window))?;
        let out = (&saved.kept.x1 + blk.mlp.down_proj.forward_detached(&saved.hidden)?)?;
        Ok(Some((out, saved.kept.into_activations())))
    }

    /// See [`crate::model::CausalLm::block_grads`].
    pub(super) fn plain_block_grads(
        &self,
        layer: usize,
        x: &Tensor,
        kept: Option<KeptActivations>,
        g: &Tensor,
        ctx: &AttnContext,
        want_input: bool,
    ) -> Result<Option<BlockGrads>> {
        let blk = &self.blocks[layer];
        if blk.plain_parts().is_none() || !ops::fusable(&[x, g]) {
            return Ok(None);
        }
        let rope = self.rope_tables(&ctx.positions)?;
        let mask = ctx.mask_for(blk.self_attn.window);
        let x = x.detach();
        let saved = match kept {
            Some(kept) => {
                let kept = kept.downcast::<Kept>().ok_or_else(|| {
                    anyhow::anyhow!("block {layer}: kept activations of another architecture")
                })?;
                blk.restore(&x, kept)?
            }
            None => blk.forward_saved(&x, &rope, mask)?,
        };
        Ok(Some(blk.backward(&x, saved, g, &rope, mask, want_input)?))
    }
}
