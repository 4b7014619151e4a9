//! Parity with Hugging Face `transformers` on the committed fixtures (see scripts/make_fixtures.py):
//! logits, loss and gradients of every parameter.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use sani::io::checkpoint::Checkpoint;
use sani::model::{AttnContext, Model};
use sani::nn::ops;

const FIXTURES: &[&str] = &[
    "gpt2_f32",
    "gpt2_legacy",
    "llama_gqa",
    "llama3_sharded",
    "qwen2_bf16",
    "mistral_f32",
    "qwen3_f32",
    "phi3_f32",
    "gemma3_f32",
    "gemma2_f32",
];

fn check(name: &str) {
    let dev = Device::Cpu;
    let ckpt = Checkpoint::load(&fixture(name), &dev).unwrap();
    let model = Model::load(&ckpt, &|n: &str| {
        !n.contains(".attn.bias") && !n.contains("masked_bias")
    })
    .unwrap();
    let r = reference(name);
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = rows_i64(&r["attention_mask"]);
    let valid: Vec<Vec<bool>> = mask
        .iter()
        .map(|row| row.iter().map(|&m| m == 1).collect())
        .collect();
    let ctx = AttnContext::for_training(&valid, model.sliding_window(), &dev).unwrap();
    let logits = model.forward(&ids, &ctx, None).unwrap();
    let want = &r["logits"];
    // Compare real positions only: pad rows depend on how the reference masks them.
    let (b, t, v) = logits.dims3().unwrap();
    let mut worst = 0f32;
    for (bi, row) in valid.iter().enumerate() {
        let n = row.iter().filter(|&&x| x).count();
        let ours = logits.get(bi).unwrap().narrow(0, 0, n).unwrap();
        let theirs = want.get(bi).unwrap().narrow(0, 0, n).unwrap();
        worst = worst.max(max_abs_diff(&ours, &theirs));
    }
    eprintln!("{name}: max logit diff {worst:.2e}");
    assert!(worst < 1e-4, "{name}: logits differ by {worst}");

    // Loss: shifted CE over non-pad targets, as HF computes with labels=-100 on pads.
    let inputs = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape((b * (t - 1), v))
        .unwrap();
    let targets = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
    let weights: Vec<f32> = valid
        .iter()
        .flat_map(|row| row[1..].iter().map(|&x| x as u8 as f32))
        .collect();
    let weights = Tensor::new(weights, &dev).unwrap();
    let (loss, _) = ops::masked_cross_entropy(&inputs, &targets, &weights).unwrap();
    let loss_v = loss.to_scalar::<f32>().unwrap();
    let want_loss = r["loss"].to_scalar::<f32>().unwrap();
    assert!(
        (loss_v - want_loss).abs() < 1e-4,
        "{name}: loss {loss_v} vs {want_loss}"
    );

    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (key, want) in r.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let hf_name = &key["grad.".len()..];
        // The legacy checkpoint stores GPT-2 names without the `transformer.` prefix.
        let our_name = if name == "gpt2_legacy" {
            hf_name.trim_start_matches("transformer.")
        } else {
            hf_name
        };
        let var = model
            .trainable_vars()
            .get(our_name)
            .unwrap_or_else(|| panic!("{name}: no var {our_name}"));
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient for {our_name}"));
        let rel = max_abs_diff(g, want) / max_abs(want).max(1e-6);
        assert!(
            rel < 1e-4,
            "{name}: gradient of {our_name} differs, relative {rel}"
        );
        checked += 1;
    }
    eprintln!("{name}: {checked} gradients within 1e-4 relative");
    assert_eq!(
        checked,
        model.trainable_vars().len(),
        "{name}: every trainable var has a reference gradient"
    );
}

#[test]
fn logits_loss_and_gradients_match_transformers() {
    for name in FIXTURES {
        check(name);
    }
}
