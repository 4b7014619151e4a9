//! Option groups shared by the subcommands, and the device/thread setup they imply.

use crate::io::checkpoint::{resolve_model_dir, Checkpoint};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Which model to read and where to run it.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model directory (HF layout: config.json, *.safetensors, tokenizer.json) or a hub repo id
    /// already in the local Hugging Face cache (sani never downloads).
    #[arg(long, value_name = "DIR|REPO")]
    pub model: String,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Device and threads.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Compute device: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Worker threads for CPU kernels (default: RAYON_NUM_THREADS, else all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Where the sensitive spans and the corpus come from.
#[derive(Debug, Clone, Args)]
pub struct SpansArgs {
    /// Sensitive file: JSONL documents with spans, or span lines referencing --corpus ids.
    #[arg(long, value_name = "FILE")]
    pub sensitive: Option<PathBuf>,
    /// Corpus JSONL ({"id","text"} per line) when --sensitive holds only span references.
    #[arg(long, value_name = "FILE")]
    pub corpus: Option<PathBuf>,
    /// Confidential terms, one per line: every occurrence in the corpus becomes a TERM span.
    #[arg(long, value_name = "FILE")]
    pub terms: Option<PathBuf>,
}

impl SpansArgs {
    pub fn load(&self) -> Result<Vec<crate::data::spans::Document>> {
        crate::data::spans::load_documents(
            self.sensitive.as_deref(),
            self.corpus.as_deref(),
            self.terms.as_deref(),
        )
    }
}

impl RuntimeArgs {
    /// Sets the thread count (before any kernel runs) and opens the device.
    pub fn setup(&self) -> Result<Device> {
        self.set_threads()?;
        parse_device(&self.device)
    }

    /// Applies `--threads`; it only takes effect before the first kernel runs.
    pub fn set_threads(&self) -> Result<()> {
        if let Some(n) = self.threads {
            if n == 0 {
                bail!("--threads must be at least 1");
            }
            // candle's CPU kernels and rayon's pool read this before their first use.
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
        Ok(())
    }
}

pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(str::parse::<usize>)
                .transpose()
                .with_context(|| format!("--device {s}: bad ordinal"))?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {s}: this build has no CUDA support (rebuild with `--features cuda`)"
                );
            }
            Device::new_cuda(ordinal).with_context(|| format!("--device {s}: cannot open the GPU"))
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

/// The model directory's tokenizer.json.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        bail!(
            "{}: missing tokenizer.json (sani needs the fast tokenizer file)",
            path.display()
        );
    }
    Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))
}

/// Resolves and loads a model and its tokenizer.
pub fn open_model(args: &ModelArgs, device: &Device) -> Result<(Checkpoint, Tokenizer)> {
    let dir = resolve_model_dir(&args.model)?;
    let ckpt = Checkpoint::load(&dir, device)?;
    let tok = load_tokenizer(&dir)?;
    Ok((ckpt, tok))
}
