//! Central finite differences against the analytic (backward) gradient of the training loss, on
//! single weights of each architecture. Independent of the transformers reference: it checks the
//! backward pass against our own forward pass.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use sani::io::checkpoint::Checkpoint;
use sani::model::{AttnContext, Model};
use sani::nn::ops;

const EPS: f32 = 1e-2;
const MAX_REL_ERR: f64 = 2e-2;

struct Batch {
    ids: Tensor,
    ctx: AttnContext,
    targets: Tensor,
    weights: Tensor,
}

/// Shifted cross-entropy over non-pad targets, as in tests/parity.rs.
fn loss(model: &Model, batch: &Batch) -> Tensor {
    let logits = model.forward(&batch.ids, &batch.ctx, None).unwrap();
    let (b, t, v) = logits.dims3().unwrap();
    let inputs = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape((b * (t - 1), v))
        .unwrap();
    ops::masked_cross_entropy(&inputs, &batch.targets, &batch.weights)
        .unwrap()
        .0
}

fn loss_value(model: &Model, batch: &Batch) -> f64 {
    loss(model, batch).to_scalar::<f32>().unwrap() as f64
}

/// Sets element `i` (flat index) of `var` to `value`.
fn set_element(var: &Var, i: usize, value: f32) {
    let shape = var.shape().clone();
    let mut data = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    data[i] = value;
    var.set(&Tensor::from_vec(data, shape, var.device()).unwrap())
        .unwrap();
}

fn check(name: &str, tensors: &[&str]) {
    let dev = Device::Cpu;
    let ckpt = Checkpoint::load(&fixture(name), &dev).unwrap();
    let model = Model::load(&ckpt, &|n: &str| {
        !n.contains(".attn.bias") && !n.contains("masked_bias")
    })
    .unwrap();
    let r = reference(name);
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let valid: Vec<Vec<bool>> = rows_i64(&r["attention_mask"])
        .iter()
        .map(|row| row.iter().map(|&m| m == 1).collect())
        .collect();
    let t = ids.dim(1).unwrap();
    let ctx = AttnContext::for_training(&valid, model.sliding_window(), &dev).unwrap();
    let targets = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let weights: Vec<f32> = valid
        .iter()
        .flat_map(|row| row[1..].iter().map(|&x| x as u8 as f32))
        .collect();
    let weights = Tensor::new(weights, &dev).unwrap();
    let batch = Batch {
        ids,
        ctx,
        targets,
        weights,
    };

    let base = loss(&model, &batch);
    let base_v = base.to_scalar::<f32>().unwrap();
    let grads = base.backward().unwrap();
    let mut worst = 0f64;
    for tensor in tensors {
        let var = model
            .trainable_vars()
            .get(*tensor)
            .unwrap_or_else(|| panic!("{name}: no trainable var {tensor}"));
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient for {tensor}"));
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The largest-gradient element of this tensor.
        let (i, &analytic) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        assert!(
            analytic.abs() > 1e-3,
            "{name}: {tensor}: largest |grad| is only {analytic:e}"
        );
        let w = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[i];
        let (plus, minus) = (w + EPS, w - EPS);
        set_element(var, i, plus);
        let l_plus = loss_value(&model, &batch);
        set_element(var, i, minus);
        let l_minus = loss_value(&model, &batch);
        set_element(var, i, w);
        let fd = (l_plus - l_minus) / (plus as f64 - minus as f64);
        let analytic = analytic as f64;
        let rel = (fd - analytic).abs() / analytic.abs().max(fd.abs());
        eprintln!("{name}: {tensor}[{i}]: analytic {analytic:+.6e} fd {fd:+.6e} rel err {rel:.2e}");
        assert!(
            rel < MAX_REL_ERR,
            "{name}: {tensor}[{i}]: analytic {analytic} vs finite difference {fd}"
        );
        worst = worst.max(rel);
    }
    // The weights are restored exactly.
    assert_eq!(
        loss(&model, &batch).to_scalar::<f32>().unwrap(),
        base_v,
        "{name}: weights restored"
    );
    eprintln!(
        "{name}: worst relative error {worst:.2e} over {} weights",
        tensors.len()
    );
}

#[test]
fn gpt2_gradients_match_finite_differences() {
    check(
        "gpt2_f32",
        &[
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.attn.c_proj.weight",
            "transformer.h.0.mlp.c_fc.bias",
            "transformer.h.1.ln_2.weight",
            "transformer.ln_f.bias",
        ],
    );
}

#[test]
fn llama_gradients_match_finite_differences() {
    check(
        "llama_gqa",
        &[
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.self_attn.v_proj.weight",
            "model.layers.1.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.norm.weight",
            "lm_head.weight",
        ],
    );
}

#[test]
fn qwen2_gradients_match_finite_differences() {
    check(
        "qwen2_bf16",
        &[
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.self_attn.v_proj.bias",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.post_attention_layernorm.weight",
        ],
    );
}
