//! The command line, the only place that knows clap: the subcommands, option groups shared by
//! them, the device/thread setup they imply, and one module per subcommand whose flags need
//! resolving into a job.
//!
//! Exit codes: 0 success (gate passed), 1 the eval gate failed, 2 error (bad input, unreadable
//! model), 130 interrupted by Ctrl-C (no output left behind).

pub mod eval;
pub mod sanitize;

use crate::io::checkpoint::Checkpoint;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokenizers::Tokenizer;

/// Which model to read and where to run it.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model directory (HF layout: config.json, *.safetensors, tokenizer.json) or a hub repo id
    /// already in the local Hugging Face cache (sani never downloads).
    #[arg(long, value_name = "DIR|REPO")]
    pub model: String,
    /// A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) for
    /// --model: merged into the base in f32 and used as the model; outputs are the merged model
    #[arg(long, value_name = "DIR")]
    pub adapter_dir: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

impl ModelArgs {
    pub fn source(&self) -> crate::io::ModelSource {
        crate::io::ModelSource {
            model: self.model.clone(),
            adapter: self.adapter_dir.clone(),
        }
    }
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
    /// Quote document and span text in error messages and (eval) in --per-span output; off by
    /// default because that text is the secret.
    #[arg(long)]
    pub show_text: bool,
}

impl SpansArgs {
    pub fn sources(&self) -> crate::data::spans::SpanSources {
        crate::data::spans::SpanSources {
            sensitive: self.sensitive.clone(),
            corpus: self.corpus.clone(),
            terms: self.terms.clone(),
            show_text: self.show_text,
        }
    }
    pub fn load(&self) -> Result<Vec<crate::data::spans::Document>> {
        self.sources().load()
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
            let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
            if n == 0 || n > cpus {
                bail!(
                    "--threads {n}: must be between 1 and the {cpus} CPUs available (more threads \
                     than CPUs only slow the kernels down)"
                );
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

/// Resolves and loads a model and its tokenizer.
pub fn open_model(args: &ModelArgs, device: &Device) -> Result<(Checkpoint, Tokenizer)> {
    crate::io::open_model(&args.source(), device)
}

#[derive(Parser)]
#[command(
    name = "sani",
    version,
    about = "Sanitize fine-tuned causal LMs so they stop regurgitating sensitive data (SANI, arXiv 2510.21322)",
    after_help = "Exit codes: 0 success (eval gate passed or no gate), 1 eval gate failed, 2 error, 130 interrupted."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Erase and repair a fine-tuned model so it stops reproducing sensitive spans
    #[command(allow_negative_numbers = true)]
    Sanitize(Box<sanitize::SanitizeArgs>),
    /// Erase as sanitize does, and write the repair set (Parquet, one file per epoch) for an
    /// external trainer (accelerate, FSDP, DeepSpeed) instead of repairing
    #[command(allow_negative_numbers = true)]
    Prepare(Box<sanitize::SanitizeArgs>),
    /// Measure regurgitation of sensitive spans and perplexity; gate a pipeline by exit code
    #[command(allow_negative_numbers = true, args_conflicts_with_subcommands = true)]
    Eval(Box<eval::EvalArgs>),
    /// Plain causal-LM fine-tuning (or training from a fresh config)
    #[command(allow_negative_numbers = true)]
    Finetune(Box<crate::recipes::finetune::FinetuneArgs>),
    /// Print a model directory's architecture, sizes, dtypes and sharding
    Inspect(crate::recipes::inspect::InspectArgs),
    /// Run the whole story on bundled synthetic clinical notes
    Demo(crate::recipes::demo::DemoArgs),
}

/// Parses the command line, runs the command, and maps the outcome to the exit code.
pub fn main() -> ExitCode {
    crate::runtime::keep_freed_memory();
    let cli = Cli::parse();
    crate::io::staged::install_interrupt_handler();
    let runtime = match &cli.command {
        Command::Sanitize(a) | Command::Prepare(a) => &a.model.runtime,
        Command::Eval(a) => &a.runtime,
        Command::Finetune(a) => &a.runtime,
        Command::Inspect(a) => &a.model.runtime,
        Command::Demo(a) => &a.runtime,
    };
    let result = runtime
        .set_threads()
        .and_then(|()| crate::runtime::on_worker_pool(|| run(&cli.command)));
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: &Command) -> anyhow::Result<ExitCode> {
    Ok(match command {
        Command::Sanitize(a) => sanitize::run(a).map(|_| ExitCode::SUCCESS)?,
        Command::Prepare(a) => {
            crate::recipes::prepare::run(&a.resolve()?).map(|_| ExitCode::SUCCESS)?
        }
        Command::Eval(a) => match eval::run(a)? {
            crate::eval::Verdict::Pass => ExitCode::SUCCESS,
            crate::eval::Verdict::Fail => ExitCode::from(1),
        },
        Command::Finetune(a) => crate::recipes::finetune::run(a).map(|_| ExitCode::SUCCESS)?,
        Command::Inspect(a) => crate::recipes::inspect::run(a).map(|_| ExitCode::SUCCESS)?,
        Command::Demo(a) => crate::recipes::demo::run(a).map(|_| ExitCode::SUCCESS)?,
    })
}
