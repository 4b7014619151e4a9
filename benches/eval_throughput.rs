//! Benchmark (not a test): throughput of `sani::eval::regurgitation` (greedy, default settings)
//! on a fixed, deterministic workload, the same as scripts/bench_hf_generate.py.
//!
//! cargo bench --bench eval_throughput -- [--out DIR] [--threads N] [--repeats N]
//!     [--model MODEL_DIR --notes NOTES.jsonl] [--prefix-tokens N] [--json]
//!
//! The default workload: 40 synthetic notes (seed 1), a byte-level BPE tokenizer trained on them
//! (vocab 1024), a randomly initialized GPT-2 (n_embd 128, 4 layers, 4 heads, n_positions 256,
//! seed 0), written to DIR/model with DIR/notes.jsonl (DIR defaults to target/bench-eval).
//! With --model and --notes, an existing model (e.g. the demo's med-gpt) and its notes instead.
//! Either way DIR/prompts.jsonl gets, for every span, the prompt token ids, max_new_tokens and
//! the generated ids sani used, so scripts/bench_hf_generate.py runs (and with --check
//! verifies) the identical workload.
//!
//! sani's timing covers everything `regurgitation` does (greedy decoding plus the
//! teacher-forced extraction strength); HF's covers `generate` only.

use candle_core::Device;
use sani::data::spans::Document;
use sani::data::synth::{generate_notes, notes_to_jsonl, SynthConfig};
use sani::data::tokens::train_byte_level_bpe;
use sani::eval::{regurgitation, RegurgitationResult, RegurgitationSettings};
use sani::io::checkpoint::Checkpoint;
use sani::model::config::ModelConfig;
use sani::model::Model;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

fn main() -> anyhow::Result<()> {
    sani::runtime::keep_freed_memory();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut opts = Options {
        out: PathBuf::from("target/bench-eval"),
        repeats: 2,
        model: None,
        notes: None,
        prefix_tokens: None,
        json: false,
    };
    let mut i = 0;
    while i < args.len() {
        let value = || {
            args.get(i + 1)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{} needs a value", args[i]))
        };
        match args[i].as_str() {
            "--out" => opts.out = PathBuf::from(value()?),
            // Must be set before the first candle op (candle reads it once).
            "--threads" => std::env::set_var("RAYON_NUM_THREADS", value()?),
            "--repeats" => opts.repeats = value()?.parse::<usize>()?.max(1),
            "--model" => opts.model = Some(PathBuf::from(value()?)),
            "--notes" => opts.notes = Some(PathBuf::from(value()?)),
            "--prefix-tokens" => opts.prefix_tokens = Some(value()?.parse()?),
            "--json" => {
                opts.json = true;
                i += 1;
                continue;
            }
            s => anyhow::bail!(
                "unknown argument {s}; usage: [--out DIR] [--threads N] [--repeats N] \
                 [--model DIR --notes FILE] [--prefix-tokens N] [--json]"
            ),
        }
        i += 2;
    }
    sani::runtime::on_worker_pool(move || workload(opts))
}

struct Options {
    out: PathBuf,
    repeats: usize,
    model: Option<PathBuf>,
    notes: Option<PathBuf>,
    prefix_tokens: Option<usize>,
    /// Also print one JSON line per batch size (what scripts/compare.py reads).
    json: bool,
}

/// The synthetic default workload: notes, tokenizer and a random GPT-2 written to out/model.
fn synthetic_workload(out: &Path) -> anyhow::Result<(Vec<Document>, Tokenizer, Model, PathBuf)> {
    // Workload.
    let docs = generate_notes(&SynthConfig {
        n_notes: 40,
        seed: 1,
        id_prefix: "note-".into(),
    });
    let tok = train_byte_level_bpe(
        docs.iter().map(|d| d.text.as_str()),
        1024,
        &["<|endoftext|>"],
    )?;
    let vocab = tok.get_vocab_size(true);
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": vocab, "n_positions": 256, "n_embd": 128, "n_layer": 4, "n_head": 4,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": true,
    });
    let cfg = ModelConfig::from_json(&config.to_string())?;
    let ckpt = sani::io::checkpoint::Checkpoint::fresh(cfg, &Device::Cpu, 0)?;
    let model = Model::load_frozen(&ckpt)?;

    let model_dir = out.join("model");
    if model_dir.exists() {
        std::fs::remove_dir_all(&model_dir)?;
    }
    std::fs::create_dir_all(&model_dir)?;
    let mut provenance = BTreeMap::new();
    provenance.insert(
        "sani_operation".to_string(),
        "bench_eval_throughput".to_string(),
    );
    ckpt.write_to(&model_dir, &provenance)?;
    std::fs::write(
        model_dir.join("config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    tok.save(model_dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot save tokenizer: {e}"))?;
    std::fs::write(
        model_dir.join("generation_config.json"),
        serde_json::json!({"bos_token_id": 0, "eos_token_id": 0}).to_string() + "\n",
    )?;
    std::fs::write(out.join("notes.jsonl"), notes_to_jsonl(&docs))?;
    Ok((docs, tok, model, model_dir))
}

fn workload(opts: Options) -> anyhow::Result<()> {
    let out = &opts.out;
    std::fs::create_dir_all(out)?;
    let (docs, tok, model, model_dir) = match (&opts.model, &opts.notes) {
        (Some(dir), Some(notes)) => {
            let ckpt = Checkpoint::load(dir, &Device::Cpu)?;
            let tok = Tokenizer::from_file(dir.join("tokenizer.json"))
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
            let docs = sani::data::spans::load_documents(Some(notes), None, None)?;
            (docs, tok, Model::load_frozen(&ckpt)?, dir.clone())
        }
        (None, None) => synthetic_workload(out)?,
        _ => anyhow::bail!("--model and --notes go together"),
    };
    let repeats = opts.repeats;

    println!("threads {}", candle_core::utils::get_num_threads());
    println!(
        "workload: {} notes, {} spans, {} layers, vocab {}; model {}",
        docs.len(),
        docs.iter().map(|d| d.spans.len()).sum::<usize>(),
        model.num_layers(),
        model.config.vocab_size(),
        model_dir.display()
    );
    println!(
        "{:<6} {:>4} {:>8} {:>8} {:>10} {:>12} {:>8}",
        "batch", "run", "spans", "seconds", "spans/s", "gen_tok/s", "exact"
    );
    let mut kept: Option<RegurgitationResult> = None;
    for batch in [16usize, 1] {
        let mut settings = RegurgitationSettings {
            batch_size: batch,
            ..Default::default()
        };
        if let Some(n) = opts.prefix_tokens {
            settings.prefix_tokens = n;
        }
        // One untimed warm-up on a few docs, then `repeats` timed runs on all.
        regurgitation(&model, &tok, &docs[..2], &settings, true)?;
        let mut best = f64::INFINITY;
        for run in 0..repeats {
            let t0 = Instant::now();
            let res = regurgitation(&model, &tok, &docs, &settings, true)?;
            let secs = t0.elapsed().as_secs_f64();
            best = best.min(secs);
            let n = res.spans.len();
            let gen: usize = res.spans.iter().map(|s| s.generated_ids.len()).sum();
            println!(
                "{:<6} {:>4} {:>8} {:>8.2} {:>10.1} {:>12.1} {:>8}",
                batch,
                run,
                n,
                secs,
                n as f64 / secs,
                gen as f64 / secs,
                res.summary.total.exact
            );
            if batch == 16 && kept.is_none() {
                kept = Some(res);
            }
        }
        println!("{:<6} best {:.2}s", batch, best);
        if opts.json {
            let n: usize = docs.iter().map(|d| d.spans.len()).sum();
            println!(
                "{}",
                serde_json::json!({"batch": batch, "spans": n, "best_seconds": best,
                                   "spans_per_s": n as f64 / best})
            );
        }
    }

    // prompts.jsonl: the batch-16 run's exact per-span workload and sani's greedy output.
    let res = kept.expect("batch 16 ran");
    let path = out.join("prompts.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for s in &res.spans {
        writeln!(
            f,
            "{}",
            serde_json::json!({
                "doc_id": s.doc_id, "span_index": s.span_index, "label": s.label,
                "prompt_ids": s.prompt_ids, "max_new_tokens": s.max_new_tokens,
                "generated_ids": s.generated_ids,
            })
        )?;
    }
    f.flush()?;
    println!(
        "wrote {} ({} spans; bos {:?}, stop/pad token 0)",
        path.display(),
        res.spans.len(),
        res.bos.id
    );
    Ok(())
}
