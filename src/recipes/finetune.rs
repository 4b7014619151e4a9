//! `sani finetune`: plain causal-LM fine-tuning on a corpus (every token is a target), from an
//! existing model or from a fresh config and tokenizer. The demo uses it to make a model that
//! memorizes its notes; researchers use it to reproduce the paper's setting on their data.

use crate::cli::RuntimeArgs;
use crate::data::spans;
use crate::data::tokens::{self, BosPolicy};
use crate::io::checkpoint::Checkpoint;
use crate::io::json;
use crate::io::staged::StagedDir;
use crate::model::config::ModelConfig;
use crate::recipes::PhaseTiming;
use crate::train::{
    self, windows_to_examples, Corpus, EpochMetrics, FixedData, TrainConfig, TrainScope,
};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct FinetuneArgs {
    /// Model directory to continue from
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "init",
        required_unless_present = "init"
    )]
    pub model: Option<String>,
    /// A PEFT LoRA adapter directory for --model, merged into it before fine-tuning
    #[arg(long, value_name = "DIR", requires = "model")]
    pub adapter_dir: Option<PathBuf>,
    /// Start from a fresh model: a config.json (any supported architecture), randomly initialized
    #[arg(long, value_name = "CONFIG", requires = "tokenizer")]
    pub init: Option<PathBuf>,
    /// tokenizer.json for --init
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Training documents: JSONL with a "text" field (spans, if any, are ignored: every token is trained)
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Output model directory
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace --out if it exists
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Train the last K blocks only (default: all)
    #[arg(long, value_name = "K")]
    pub last_blocks: Option<usize>,
    /// BOS at the start of each document: auto (what the tokenizer adds), always, never
    #[arg(long, value_enum, default_value = "auto")]
    pub bos: BosPolicy,
    /// Text put before and after each document, e.g. '<|im_end|>'
    #[arg(long, value_name = "TEXT")]
    pub doc_separator: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recompute each block in the backward pass instead of storing its activations (much less
    /// memory on deep models, one more forward pass)
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// With --checkpoint-activations: keep up to this many MiB of the blocks' activations from
    /// the forward pass instead of recomputing them (Llama-family blocks)
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    pub activation_memory: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FinetuneReport {
    pub sani_version: String,
    pub operation: String,
    pub source: String,
    pub data: String,
    pub documents: usize,
    pub tokens: usize,
    pub seed: u64,
    pub epochs: Vec<EpochMetrics>,
    pub timings: Vec<PhaseTiming>,
}

pub fn run(args: &FinetuneArgs) -> Result<()> {
    train_config(args).validate()?;
    let device = args.runtime.setup()?;
    let docs = spans::load_documents(Some(&args.data), None, None)?;
    let (ckpt, tok, source, model_dir) = match (&args.model, &args.init) {
        (Some(m), _) => {
            let source = crate::io::ModelSource {
                model: m.clone(),
                adapter: args.adapter_dir.clone(),
            };
            let (ckpt, tok) = crate::io::open_model(&source, &device)?;
            let dir = ckpt.dir.clone();
            (ckpt, tok, dir.display().to_string(), Some(dir))
        }
        (None, Some(cfg_path)) => {
            let text = std::fs::read_to_string(cfg_path)
                .with_context(|| format!("{}: cannot read", cfg_path.display()))?;
            let config = ModelConfig::from_json(&text)
                .with_context(|| format!("{}: invalid model config", cfg_path.display()))?;
            let tok_path = args
                .tokenizer
                .as_ref()
                .expect("clap requires --tokenizer with --init");
            let tok = tokenizers::Tokenizer::from_file(tok_path).map_err(|e| {
                anyhow::anyhow!("{}: cannot load tokenizer: {e}", tok_path.display())
            })?;
            if tok.get_vocab_size(true) > config.vocab_size() {
                bail!(
                    "{}: vocab_size {} is smaller than the tokenizer's {}",
                    cfg_path.display(),
                    config.vocab_size(),
                    tok.get_vocab_size(true)
                );
            }
            let ckpt = Checkpoint::fresh(config, &device, args.seed)?;
            (ckpt, tok, format!("init:{}", cfg_path.display()), None)
        }
        (None, None) => bail!("give --model DIR or --init CONFIG"),
    };
    let inputs: Vec<&Path> = model_dir.iter().map(PathBuf::as_path).collect();
    let staged = StagedDir::create(&args.out, args.force, &inputs)?;
    let t0 = Instant::now();
    let metrics = finetune_in_memory(&ckpt, &tok, &docs, args)?;
    let tokens: usize = metrics.first().map_or(0, |m| m.trained_tokens);
    let mut provenance = BTreeMap::new();
    provenance.insert(
        "sani_version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    );
    provenance.insert("sani_operation".to_string(), "finetune".to_string());
    ckpt.write_to(staged.path(), &provenance)?;
    if let (None, Some(cfg_path), Some(tok_path)) = (&model_dir, &args.init, &args.tokenizer) {
        std::fs::copy(cfg_path, staged.path().join("config.json"))?;
        std::fs::copy(tok_path, staged.path().join("tokenizer.json"))?;
        let gen = serde_json::json!({
            "bos_token_id": ckpt.config.bos_token_id(),
            "eos_token_id": ckpt.config.eos_token_ids().first(),
        });
        json::write_json(&staged.path().join("generation_config.json"), &gen)?;
    }
    let rep = FinetuneReport {
        sani_version: env!("CARGO_PKG_VERSION").to_string(),
        operation: "finetune".into(),
        source,
        data: args.data.display().to_string(),
        documents: docs.len(),
        tokens,
        seed: args.seed,
        epochs: metrics.clone(),
        timings: vec![PhaseTiming::new("total", t0, tokens * metrics.len())],
    };
    json::write_json(&staged.path().join("sani_finetune_report.json"), &rep)?;
    let out = staged.commit()?;
    for m in &metrics {
        println!(
            "epoch {:>3}: loss {:.4}, {:.0} tok/s, {:.1}s",
            m.epoch, m.loss_trained, m.tokens_per_s, m.seconds
        );
    }
    println!("model written to {}", out.display());
    Ok(())
}

/// Trains every token of `docs` into `ckpt`'s weights (in place).
pub fn finetune_in_memory(
    ckpt: &Checkpoint,
    tok: &tokenizers::Tokenizer,
    docs: &[spans::Document],
    args: &FinetuneArgs,
) -> Result<Vec<EpochMetrics>> {
    let framing = tokens::resolve_framing(
        tok,
        ckpt.config.bos_token_id(),
        args.bos,
        args.doc_separator.as_deref(),
    )?;
    let corpus = Corpus {
        docs,
        tok,
        labels: spans::label_names(docs),
        framing,
        max_seq_len: args.max_seq_len.min(ckpt.config.max_positions()),
        stride: None,
    };
    let examples = windows_to_examples(&corpus.windows(docs)?, false);
    let n_layers = ckpt.config.num_layers();
    let scope = match args.last_blocks {
        Some(k) if k == 0 || k > n_layers => {
            bail!("--last-blocks {k}: must be between 1 and the model's {n_layers} layers")
        }
        Some(k) => TrainScope::LastBlocks(k),
        None => TrainScope::All,
    };
    train::fit(
        ckpt,
        scope,
        &mut FixedData(examples),
        &train_config(args),
        args.runtime.quiet,
    )
}

fn train_config(args: &FinetuneArgs) -> TrainConfig {
    TrainConfig {
        forget_weight: 0.0,
        forget_per_token: false,
        epochs: args.epochs,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        lr: args.lr,
        warmup_steps: args.warmup_steps,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        seed: args.seed,
        checkpoint_activations: args.checkpoint_activations,
        activation_memory_mib: args.activation_memory,
        lora: None,
        modules: Vec::new(),
    }
}
