//! Benchmark (not a test): tokens/s of one training step (`sani::train::TrainStep`: forward +
//! backward, then clipping + AdamW) for fixed GPT-2-like and Llama-like configs, the same as
//! scripts/bench_torch_step.py.
//!
//! cargo bench --bench train_step -- [gpt2-8k|gpt2-50k|llama-32k|smollm2-135m|all|head-MODE]
//!     [--steps N] [--threads N] [--json] [--checkpoint [--keep-mb N]] [--lora R] [--micro M]
//!     [--modules LIST]
//!
//! `--checkpoint` recomputes each block in the backward pass (activation checkpointing);
//! `--keep-mb N` with it keeps up to N MiB of the blocks' activations from the forward instead
//! (`--activation-memory`).
//! `--lora R` trains rank-R adapters on every projection of the frozen model (alpha 2R) instead
//! of every weight. `--micro M` runs the 8 sequences as micro-batches of M (one optimizer step,
//! gradients summed), as `--batch-size M --grad-accum 8/M` does. `--modules mlp` trains only
//! the tensors sanitize's `--train-modules mlp` (its default) trains; the rest stay frozen.
//!
//! `smollm2-135m` is SmolLM2-135M's shape (30 layers, hidden 576, vocab 49,152, tied), randomly
//! initialized, at batch 8 x seq 256; `smollm2-360m` (32 layers, hidden 960) and `llama-1b`
//! (Llama 3.2 1B: 16 layers, hidden 2048, vocab 128,256, tied) the same way, for the scaling
//! table. `head-chunked`, `head-announced` and `head-full` time the
//! language-model head + NLL at that shape (2,040 positions x 49,152), forward and backward, with
//! the peak-RSS increase: the chunked fused op recomputing logits in the backward, the same op
//! told the gradient in advance (what training does), and full logits + the fused NLL (before).
//! Run each in its own process: freed memory is kept for reuse, so a second mode would reuse
//! the first one's pages.
//!
//! tokens/s comes from the median step time (this machine's timings are noisy); with --json one
//! line per config (what scripts/compare.py reads).

use candle_core::Device;
use rand::{Rng, SeedableRng};
use sani::model::config::ModelConfig;
use sani::model::Model;
use sani::train::{clip_grad_norm, AdamW, Batch, Example, OptimConfig, TrainStep};
use std::time::Instant;

fn config(name: &str) -> serde_json::Value {
    match name {
        "gpt2-8k" | "gpt2-50k" => serde_json::json!({
            "architectures": ["GPT2LMHeadModel"], "vocab_size": if name == "gpt2-8k" { 8192 } else { 50257 },
            "n_positions": 128, "n_embd": 256, "n_layer": 4, "n_head": 4}),
        "llama-32k" => serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "tie_word_embeddings": false}),
        "smollm2-135m" => serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
            "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true}),
        "smollm2-360m" => serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 960, "intermediate_size": 2560,
            "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5, "max_position_embeddings": 2048,
            "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true}),
        "llama-1b" => serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 2048,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true}),
        "demo" => serde_json::json!({
            "architectures": ["GPT2LMHeadModel"], "vocab_size": 600, "n_positions": 256, "n_embd": 96, "n_layer": 4, "n_head": 4}),
        other => panic!("unknown config {other}"),
    }
}

fn main() -> anyhow::Result<()> {
    sani::runtime::keep_freed_memory();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut which = "all".to_string();
    let mut steps = 5usize;
    let mut json = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--steps" => {
                steps = args[i + 1].parse()?;
                i += 1;
            }
            "--threads" => {
                std::env::set_var("RAYON_NUM_THREADS", &args[i + 1]);
                i += 1;
            }
            "--json" => json = true,
            "--checkpoint" => std::env::set_var("SANI_BENCH_CHECKPOINT", "1"),
            "--keep-mb" => {
                std::env::set_var("SANI_BENCH_KEEP_MB", &args[i + 1]);
                i += 1;
            }
            "--lora" => {
                std::env::set_var("SANI_BENCH_LORA", &args[i + 1]);
                i += 1;
            }
            "--micro" => {
                std::env::set_var("SANI_BENCH_MICRO", &args[i + 1]);
                i += 1;
            }
            "--modules" => {
                std::env::set_var("SANI_BENCH_MODULES", &args[i + 1]);
                i += 1;
            }
            s => which = s.to_string(),
        }
        i += 1;
    }
    if let Some(mode) = which.strip_prefix("head-") {
        let mode = mode.to_string();
        return sani::runtime::on_worker_pool(move || bench_head(&mode, steps.max(1)));
    }
    sani::runtime::on_worker_pool(move || bench(&which, steps.max(1), json))
}

/// Resets this process's peak RSS (VmHWM) to its current RSS.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Current resident memory, in MB.
fn rss_mb() -> f64 {
    proc_status_mb("VmRSS:")
}

/// The head + NLL of one smollm2-135m batch in one `mode` (see the module docs).
fn bench_head(mode: &str, steps: usize) -> anyhow::Result<()> {
    use candle_core::{Tensor, Var};
    let (n, d, v) = (8 * 255usize, 576usize, 49152usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (v, d), &Device::Cpu)?)?;
    let tg: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    let tg = Tensor::from_vec(tg, n, &Device::Cpu)?;
    if !["chunked", "announced", "full"].contains(&mode) {
        anyhow::bail!("head-{mode}: expected head-chunked, head-announced or head-full");
    }
    {
        let mut times = Vec::new();
        let mut loss = 0f32;
        reset_peak_rss();
        let base = rss_mb();
        for _ in 0..steps + 1 {
            let t0 = Instant::now();
            let nll = if mode != "full" {
                let announced = (mode == "announced").then(|| vec![1.0 / n as f32; n]);
                sani::nn::ops::lm_head_nll(&h, &w, &tg, announced)?
            } else {
                let logits = sani::nn::ops::linear(&h, &w, None)?;
                sani::nn::ops::token_nll(&logits, &tg)?
            };
            let l = (nll.sum_all()? / n as f64)?;
            let g = l.backward()?;
            loss = l.to_scalar::<f32>()?;
            drop(g);
            times.push(t0.elapsed().as_secs_f64());
        }
        times.remove(0);
        times.sort_by(f64::total_cmp);
        println!(
            "head-{:<10} threads {} fwd_bwd_ms {:>6.0} peak_rss_up_mb {:>6.0} loss {:.5}",
            mode,
            candle_core::utils::get_num_threads(),
            times[times.len() / 2] * 1e3,
            peak_rss_mb() - base,
            loss
        );
    }
    Ok(())
}

/// A memory figure of /proc/self/status (`VmHWM:` peak, `VmRSS:` current), in MB.
fn proc_status_mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Peak resident memory of this process, in MB.
fn peak_rss_mb() -> f64 {
    proc_status_mb("VmHWM:")
}

fn bench(which: &str, steps: usize, json: bool) -> anyhow::Result<()> {
    let names: Vec<&str> = if which == "all" {
        vec!["gpt2-8k", "gpt2-50k", "llama-32k"]
    } else {
        vec![which]
    };
    let (b, t) = (
        8usize,
        if matches!(which, "demo" | "smollm2-135m" | "smollm2-360m" | "llama-1b") {
            256
        } else {
            128
        },
    );
    if !json {
        println!("threads {}", candle_core::utils::get_num_threads());
        println!(
            "{:<10} {:>10} {:>10} {:>12} {:>10}",
            "config", "step_ms", "tokens/s", "fwd_bwd_ms", "opt_ms"
        );
    }
    for name in names {
        let cfg = ModelConfig::from_json(&config(name).to_string())?;
        let vocab = cfg.vocab_size();
        let ckpt = sani::io::checkpoint::Checkpoint::fresh(cfg, &Device::Cpu, 0)?;
        let lora = std::env::var("SANI_BENCH_LORA")
            .ok()
            .map(|r| -> anyhow::Result<_> {
                let rank: usize = r.parse()?;
                Ok(sani::nn::lora::LoraConfig {
                    rank,
                    alpha: 2.0 * rank as f64,
                    targets: vec![sani::nn::lora::ALL_LINEAR.into()],
                    seed: 0,
                })
            })
            .transpose()?;
        let modules: Vec<String> = std::env::var("SANI_BENCH_MODULES")
            .map(|m| m.split(',').map(|m| m.trim().to_string()).collect())
            .unwrap_or_default();
        let model = match &lora {
            None => Model::load(&ckpt, &|n| sani::train::in_modules(n, &modules))?,
            Some(l) => Model::load_with_lora(&ckpt, &|_| false, Some(l))?,
        };
        let mut opt = AdamW::new(
            model.trainable_vars(),
            OptimConfig {
                lr: 1e-4,
                weight_decay: 0.01,
                max_grad_norm: 0.0,
                ..Default::default()
            },
        )?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let examples: Vec<Example> = (0..b)
            .map(|_| Example {
                forget: Vec::new(),
                ids: (0..t).map(|_| rng.random_range(0..vocab as u32)).collect(),
                train: vec![true; t],
                sensitive: vec![false; t],
                ..Default::default()
            })
            .collect();
        let micro: usize = std::env::var("SANI_BENCH_MICRO")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(b)
            .clamp(1, b);
        let batches = examples
            .chunks(micro)
            .map(|c| Batch::new(&c.iter().collect::<Vec<_>>(), &Device::Cpu))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let micro_batches: Vec<(&Batch, Option<candle_core::Tensor>)> =
            batches.iter().map(|b| (b, None)).collect();
        let keep_mb: usize = std::env::var("SANI_BENCH_KEEP_MB")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        let step_fn = TrainStep::new(&model, 0)
            .with_checkpointing(std::env::var("SANI_BENCH_CHECKPOINT").is_ok_and(|v| v == "1"))
            .keeping_activations(keep_mb.saturating_mul(1 << 20));
        let (mut fwd_bwd, mut optm) = (0f64, 0f64);
        let mut totals = Vec::with_capacity(steps);
        for step in 0..steps + 2 {
            let t0 = Instant::now();
            let out = step_fn.run(&micro_batches)?;
            let t1 = Instant::now();
            let mut grads = out.grads.expect("every target trains");
            clip_grad_norm(&mut grads, model.trainable_vars(), 0.0)?;
            opt.step(&grads, 1e-4)?;
            let t2 = Instant::now();
            if step >= 2 {
                fwd_bwd += (t1 - t0).as_secs_f64();
                optm += (t2 - t1).as_secs_f64();
                totals.push((t2 - t0).as_secs_f64());
            }
        }
        let n = steps as f64;
        totals.sort_by(f64::total_cmp);
        let median = totals[totals.len() / 2];
        let tokens_per_s = (b * t) as f64 / median;
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "config": name, "threads": candle_core::utils::get_num_threads(),
                    "median_step_ms": median * 1e3, "tokens_per_s": tokens_per_s,
                    "min_step_ms": totals[0] * 1e3,
                    "peak_rss_mb": peak_rss_mb(),
                })
            );
            continue;
        }
        println!(
            "{:<10} {:>10.0} {:>10.0} {:>12.0} {:>10.0}",
            name,
            median * 1e3,
            tokens_per_s,
            fwd_bwd / n * 1e3,
            optm / n * 1e3
        );
    }
    Ok(())
}
