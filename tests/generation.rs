//! Greedy generation equals Hugging Face `generate`, batched (left padding) and unbatched.

mod common;

use candle_core::Device;
use common::*;
use rand::SeedableRng;
use sani::io::checkpoint::Checkpoint;
use sani::model::generate::{generate, generate_greedy_with_drafts, GenerateOptions};
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
        "qwen3_f32",
        "phi3_f32",
        "gemma3_f32",
        "gemma2_f32",
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
            check_drafts(
                &model,
                &prompts,
                &batched,
                &opts,
                &format!("{name} {prefix}"),
            );
        }
    }
}

/// Greedy decoding with drafts gives the same tokens as plain greedy decoding whatever the
/// drafts (the true continuation, a prefix of it, one with a wrong token, a wrong one, none),
/// and its teacher-forced flags say which draft tokens are the argmax after the ones before.
fn check_drafts(
    model: &Model,
    prompts: &[Vec<u32>],
    greedy: &[Vec<u32>],
    opts: &GenerateOptions,
    what: &str,
) {
    let n = greedy[0].len();
    let vocab = model.config.vocab_size() as u32;
    type MakeDraft = Box<dyn Fn(usize, &[u32]) -> Vec<u32>>;
    let variants: Vec<(&str, MakeDraft)> = vec![
        ("exact", Box::new(|_, g: &[u32]| g.to_vec())),
        (
            "prefix",
            Box::new(|i, g: &[u32]| g[..(i + 1).min(g.len())].to_vec()),
        ),
        (
            "wrong token",
            Box::new(move |i, g: &[u32]| {
                let mut d = g.to_vec();
                let j = i % d.len();
                d[j] = (d[j] + 1) % vocab;
                d
            }),
        ),
        (
            "wrong",
            Box::new(move |_, g: &[u32]| g.iter().map(|t| (t + 7) % vocab).collect()),
        ),
        ("empty", Box::new(|_, _: &[u32]| vec![])),
        (
            "longer",
            Box::new(|_, g: &[u32]| g.iter().chain(g).copied().collect()),
        ),
    ];
    for (kind, make) in &variants {
        let drafts: Vec<Vec<u32>> = greedy.iter().enumerate().map(|(i, g)| make(i, g)).collect();
        let decoded = generate_greedy_with_drafts(model, prompts, &drafts, opts).unwrap();
        let (got, teacher) = (decoded.tokens, decoded.teacher_forced);
        assert_eq!(got, greedy, "{what}: drafts {kind}");
        for (i, (flags, draft)) in teacher.iter().zip(&drafts).enumerate() {
            assert_eq!(flags.len(), draft.len());
            // Where the draft so far equals the greedy output, the flag says whether it goes on.
            let agree = draft
                .iter()
                .zip(&greedy[i])
                .take_while(|(a, b)| a == b)
                .count();
            for k in 0..draft.len().min(n) {
                if k <= agree {
                    assert_eq!(
                        flags[k],
                        draft[k] == greedy[i][k],
                        "{what}: {kind} row {i} token {k}"
                    );
                }
            }
        }
    }
    assert_eq!(n, opts.max_new_tokens[0]);
}
