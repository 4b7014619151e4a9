//! `sani demo`: the whole story on bundled synthetic clinical notes, with every artifact left in
//! the output directory and every command printed so it can be rerun by hand.
//!
//! 1. writes synthetic notes (train and held-out) in the sensitive-file format;
//! 2. trains a byte-level BPE tokenizer and a small GPT-2 from scratch until it memorizes them;
//! 3. measures regurgitation before; 4. sanitizes with the default and the paper configuration;
//! 5. measures after (the default's output also under the attack suite, `--attacks`) and
//!    compares.
//!
//! The evaluation prompts with the whole document text before each span (`--prefix-tokens 256`,
//! the notes are shorter than that): the model was trained on whole notes, so this is the
//! strongest prompt an attacker holding the rest of a note could use.

use crate::data::synth::{generate_notes, notes_to_jsonl, SynthConfig};
use crate::data::tokens::train_byte_level_bpe;
use crate::io::staged::StagedDir;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const PAPER_CONFIG: &str = include_str!("../../configs/paper.toml");

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Directory for every artifact
    #[arg(long, default_value = "sani-demo")]
    pub out: PathBuf,
    /// Replace --out if it exists
    #[arg(long)]
    pub force: bool,
    /// A shortened run (fewer notes, smaller model) for tests and a first look
    #[arg(long)]
    pub quick: bool,
    /// Training notes
    #[arg(long)]
    pub notes: Option<usize>,
    /// Held-out notes (other patients, never trained on)
    #[arg(long)]
    pub heldout: Option<usize>,
    /// Fine-tuning epochs used to make the model memorize its notes
    #[arg(long)]
    pub finetune_epochs: Option<usize>,
    /// Write the synthetic notes (notes.jsonl, heldout.jsonl) and stop: data for your own model
    #[arg(long)]
    pub notes_only: bool,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[command(flatten)]
    pub runtime: crate::cli::RuntimeArgs,
}

struct Plan {
    notes: usize,
    heldout: usize,
    vocab: usize,
    n_embd: usize,
    n_layer: usize,
    finetune_epochs: usize,
    finetune_lr: f64,
}

fn plan(args: &DemoArgs) -> Plan {
    let mut p = if args.quick {
        Plan {
            notes: 40,
            heldout: 16,
            vocab: 600,
            n_embd: 96,
            n_layer: 4,
            finetune_epochs: 40,
            finetune_lr: 3e-3,
        }
    } else {
        Plan {
            notes: 64,
            heldout: 24,
            vocab: 800,
            n_embd: 96,
            n_layer: 4,
            finetune_epochs: 40,
            finetune_lr: 3e-3,
        }
    };
    if let Some(n) = args.notes {
        p.notes = n;
    }
    if let Some(n) = args.heldout {
        p.heldout = n;
    }
    if let Some(e) = args.finetune_epochs {
        p.finetune_epochs = e;
    }
    p
}

/// Runs this same binary with `args`, echoing the command first.
fn sani(dir: &Path, args: &[String], quiet: bool, allow_gate_fail: bool) -> Result<()> {
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect();
    println!("\n$ sani {}", shown.join(" "));
    let exe = std::env::current_exe().context("cannot locate the sani executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(args).current_dir(dir);
    if quiet {
        cmd.arg("--quiet");
    }
    let status = cmd.status().context("cannot run sani")?;
    match status.code() {
        Some(0) => Ok(()),
        Some(1) if allow_gate_fail => Ok(()),
        code => bail!("`sani {}` failed with exit code {code:?}", shown.join(" ")),
    }
}

fn s(x: &str) -> String {
    x.to_string()
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let start = Instant::now();
    let p = plan(args);
    let staged = StagedDir::create(&args.out, args.force, &[])?;
    let dir = staged.path().to_path_buf();
    let quiet = args.runtime.quiet;
    let mut common: Vec<String> = vec![];
    if let Some(t) = args.runtime.threads {
        common.extend([s("--threads"), t.to_string()]);
    }

    // 1. Notes.
    let train = generate_notes(&SynthConfig {
        n_notes: p.notes,
        seed: args.seed,
        id_prefix: "note-".into(),
    });
    let heldout = generate_notes(&SynthConfig {
        n_notes: p.heldout,
        seed: args.seed + 1_000,
        id_prefix: "heldout-".into(),
    });
    std::fs::write(dir.join("notes.jsonl"), notes_to_jsonl(&train))?;
    std::fs::write(dir.join("heldout.jsonl"), notes_to_jsonl(&heldout))?;
    std::fs::write(dir.join("paper.toml"), PAPER_CONFIG)?;
    let n_spans: usize = train.iter().map(|d| d.spans.len()).sum();
    println!(
        "wrote {} training notes ({n_spans} sensitive spans) and {} held-out notes to {}",
        train.len(),
        heldout.len(),
        args.out.display()
    );
    if args.notes_only {
        staged.commit()?;
        return Ok(());
    }

    // 2. Tokenizer and a fresh GPT-2 config.
    std::fs::create_dir_all(dir.join("init"))?;
    let texts: Vec<&str> = train
        .iter()
        .chain(&heldout)
        .map(|d| d.text.as_str())
        .collect();
    let tok = train_byte_level_bpe(texts, p.vocab, &["<|endoftext|>"])?;
    tok.save(dir.join("init/tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot save tokenizer: {e}"))?;
    let vocab = tok.get_vocab_size(true);
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": vocab, "n_positions": 256, "n_embd": p.n_embd, "n_layer": p.n_layer, "n_head": 4,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": true,
    });
    crate::io::json::write_json(&dir.join("init/config.json"), &config)?;
    println!(
        "trained a byte-level BPE tokenizer ({vocab} tokens); GPT-2 config: {} layers, d={}",
        p.n_layer, p.n_embd
    );

    let mut finetune = vec![
        s("finetune"),
        s("--init"),
        s("init/config.json"),
        s("--tokenizer"),
        s("init/tokenizer.json"),
        s("--data"),
        s("notes.jsonl"),
        s("--out"),
        s("med-gpt"),
        s("--epochs"),
        p.finetune_epochs.to_string(),
        s("--lr"),
        p.finetune_lr.to_string(),
        s("--warmup-steps"),
        s("20"),
        s("--seed"),
        args.seed.to_string(),
    ];
    finetune.extend(common.clone());
    sani(&dir, &finetune, quiet, false)?;

    let eval = |model: &str, json: &str, attacks: bool| -> Vec<String> {
        let mut v = vec![
            s("eval"),
            s("--model"),
            s(model),
            s("--sensitive"),
            s("notes.jsonl"),
            s("--control"),
            s("heldout.jsonl"),
            s("--perplexity"),
            s("heldout.jsonl"),
            s("--prefix-tokens"),
            s("256"),
            s("--json"),
            s(json),
        ];
        if attacks {
            v.push(s("--attacks"));
        }
        v.extend(common.clone());
        v
    };
    sani(
        &dir,
        &eval("med-gpt", "eval_before.json", false),
        quiet,
        true,
    )?;

    let mut sanitize_default = vec![
        s("sanitize"),
        s("--model"),
        s("med-gpt"),
        s("--sensitive"),
        s("notes.jsonl"),
        s("--out"),
        s("med-gpt-sanitized"),
    ];
    sanitize_default.extend(common.clone());
    sani(&dir, &sanitize_default, quiet, false)?;
    sani(
        &dir,
        &eval("med-gpt-sanitized", "eval_after.json", true),
        quiet,
        true,
    )?;

    let mut sanitize_paper = vec![
        s("sanitize"),
        s("--model"),
        s("med-gpt"),
        s("--sensitive"),
        s("notes.jsonl"),
        s("--config"),
        s("paper.toml"),
        s("--out"),
        s("med-gpt-paper"),
    ];
    sanitize_paper.extend(common.clone());
    sani(&dir, &sanitize_paper, quiet, false)?;
    sani(
        &dir,
        &eval("med-gpt-paper", "eval_paper.json", false),
        quiet,
        true,
    )?;

    sani(
        &dir,
        &[
            s("eval"),
            s("--compare"),
            s("eval_before.json"),
            s("eval_paper.json"),
        ],
        quiet,
        false,
    )?;
    sani(
        &dir,
        &[
            s("eval"),
            s("--compare"),
            s("eval_before.json"),
            s("eval_after.json"),
        ],
        quiet,
        false,
    )?;

    let out = staged.commit()?;
    println!(
        "\ndemo finished in {:.0}s; artifacts in {}. Rerun any command above from that directory\n(cd {}) with your own model and sensitive file.",
        start.elapsed().as_secs_f64(),
        out.display(),
        out.display()
    );
    Ok(())
}
