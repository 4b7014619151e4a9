//! Greedy generation equals Hugging Face `generate`, batched (left padding) and unbatched.

mod common;

use candle_core::Device;
use common::*;
use rand::SeedableRng;
use sani::checkpoint::Checkpoint;
use sani::generate::{generate, GenerateOptions};
use sani::model::Model;

#[test]
fn greedy_generation_matches_transformers() {
    for name in [
        "gpt2_f32",
        "gpt2_legacy",
        "llama_gqa",
        "llama3_sharded",
        "qwen2_bf16",
        "mistral_f32",
    ] {
        let ckpt = Checkpoint::load(&fixture(name), &Device::Cpu).unwrap();
        let model = Model::load_frozen(&ckpt).unwrap();
        let r = reference(name);
        for (prefix, mask_key) in [("gen", Some("gen.attention_mask")), ("gen1", None)] {
            let ids = rows_i64(&r[&format!("{prefix}.input_ids")]);
            let want = rows_i64(&r[&format!("{prefix}.output_ids")]);
            let masks = mask_key.map(|k| rows_i64(&r[k]));
            let prompts: Vec<Vec<u32>> = ids
                .iter()
                .enumerate()
                .map(|(i, row)| {
                    row.iter()
                        .enumerate()
                        .filter(|(j, _)| masks.as_ref().is_none_or(|m| m[i][*j] == 1))
                        .map(|(_, &t)| t as u32)
                        .collect()
                })
                .collect();
            let new_tokens = want[0].len() - ids[0].len();
            let opts = GenerateOptions {
                max_new_tokens: vec![new_tokens; prompts.len()],
                stop_tokens: vec![],
                pad_id: 0,
                sampling: None,
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
            let batched = generate(&model, &prompts, &opts, &mut rng).unwrap();
            for (i, got) in batched.iter().enumerate() {
                let expected: Vec<u32> =
                    want[i][ids[i].len()..].iter().map(|&t| t as u32).collect();
                assert_eq!(got, &expected, "{name} {prefix} row {i} (batched)");
                let single_opts = GenerateOptions {
                    max_new_tokens: vec![new_tokens],
                    ..opts.clone()
                };
                let alone = generate(&model, &prompts[i..=i], &single_opts, &mut rng).unwrap();
                assert_eq!(alone[0], expected, "{name} {prefix} row {i} (alone)");
            }
        }
    }
}
