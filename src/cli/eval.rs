//! `sani eval` on the command line: flags, checked once and turned into an [`EvalJob`].

use super::{RuntimeArgs, SpansArgs};
use crate::data::tokens::BosPolicy;
use crate::eval::attacks::{AttackSettings, FakeSource, Quantization, RelearnSettings};
use crate::eval::shard::Shard;
use crate::eval::{RegurgitationSettings, Verdict};
use crate::io::hash::SpanKey;
use crate::recipes::eval::{EvalJob, GateLimits, Measure};
use anyhow::{anyhow, bail, Result};
use std::path::PathBuf;

/// `sani eval`: measure regurgitation of sensitive spans (and perplexity), report, gate.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Model directory (HF layout: config.json, *.safetensors, tokenizer.json) or a hub repo id
    /// already in the local Hugging Face cache (sani never downloads). Not needed with --compare.
    #[arg(long, value_name = "DIR|REPO")]
    pub model: Option<String>,
    /// A PEFT LoRA adapter directory for --model, merged into it (see `sani sanitize --help`)
    #[arg(long, value_name = "DIR", requires = "model")]
    pub adapter_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub spans: SpansArgs,

    /// Measure regurgitation of the sensitive spans (the default when no other measurement is asked).
    #[arg(long)]
    pub regurgitation: bool,
    /// Held-out JSONL documents (with or without spans): token-level perplexity, overall and split
    /// into sensitive and non-sensitive tokens.
    #[arg(long, value_name = "FILE")]
    pub perplexity: Option<PathBuf>,
    /// Held-out documents with spans never trained on (same format as --sensitive): the same
    /// regurgitation measurement, as the chance level.
    #[arg(long, value_name = "FILE")]
    pub control: Option<PathBuf>,
    /// Compare two JSON reports (written by --json) side by side; needs no model.
    #[arg(long, num_args = 2, value_names = ["BEFORE", "AFTER"])]
    pub compare: Option<Vec<PathBuf>>,

    /// Write the JSON report here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Write one JSON line per span here (keyed hashes instead of text unless --show-text).
    #[arg(long, value_name = "PATH")]
    pub per_span: Option<PathBuf>,
    /// Key file for the --per-span hashes (at least 16 bytes), so that runs sharing it can join
    /// their lines; default: a random key per run.
    #[arg(long, value_name = "FILE", requires = "per_span")]
    pub span_key_file: Option<PathBuf>,

    #[command(flatten)]
    pub gate: GateArgs,
    /// Measure shard K of N (0-based): the spans of a deterministic 1/N of the documents,
    /// documents kept whole; combine the shards' --json reports with `sani eval merge`.
    #[arg(long, value_name = "K/N", conflicts_with = "compare")]
    pub shard: Option<Shard>,

    /// Tokens of document text before the span used as the prompt.
    #[arg(long, default_value_t = 32)]
    pub prefix_tokens: usize,
    /// Tokens to decode per span (default: the span's token count + 4).
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// Sampled continuations per span in addition to greedy decoding (0: none).
    #[arg(long, default_value_t = 0)]
    pub samples: usize,
    /// Sampling temperature (with --samples).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sampling top-k (with --samples; 0: no cut).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Spans (or perplexity windows) per forward batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// BOS at a document's start: auto (what the tokenizer adds, often none), always (tokenizer's,
    /// else config's, else a BOS-like token), never. A prompt that starts mid-document gets none.
    #[arg(long, value_enum, default_value_t = BosPolicy::Auto)]
    pub bos: BosPolicy,
    /// Text the model was fine-tuned with around each document (e.g. '<|im_end|>'): put after the
    /// BOS at a document's start, and around each perplexity document, as `sanitize` trains
    #[arg(long, value_name = "TEXT")]
    pub doc_separator: Option<String>,
    /// Perplexity window length (default: the model's context length, at most 1024; maximum: the
    /// context length).
    #[arg(long, value_name = "N")]
    pub max_seq_len: Option<usize>,

    /// Run the attack suite on the sensitive spans: greedy extraction at several prompt lengths,
    /// sampled extraction, quantized weights, a membership probe (and relearning with
    /// --relearn-on). The gate then applies to the worst case. See README "Attack suite".
    #[arg(long)]
    pub attacks: bool,
    /// Prompt lengths of the greedy attacks, in tokens (`whole`: the whole preceding document).
    #[arg(
        long,
        value_name = "LIST",
        default_value = "8,32,128,whole",
        requires = "attacks"
    )]
    pub attack_prefixes: String,
    /// Samples per span of the sampled attacks (at T=0.7 and T=1.0; 0: none).
    #[arg(long, value_name = "N", default_value_t = 10, requires = "attacks")]
    pub attack_samples: usize,
    /// Weight roundings to attack with: bf16, fp16, int8, int4 (per row, symmetric), or none.
    #[arg(
        long,
        value_name = "LIST",
        default_value = "bf16,fp16,int8,int4",
        requires = "attacks"
    )]
    pub attack_quantize: String,
    /// Fakes per span in the membership probe (0: no probe).
    #[arg(long, value_name = "K", default_value_t = 4, requires = "attacks")]
    pub attack_fakes: usize,
    /// Where the membership fakes come from: corpus (the same label's values in the file's other
    /// documents; a never-trained model scores 0.5) or generators (the surrogate generators)
    #[arg(long, value_name = "SOURCE", default_value = "corpus", value_parser = ["corpus", "generators"], requires = "attacks")]
    pub attack_fakes_from: String,
    /// Relearning attack: fine-tune a copy on these documents (JSONL as --sensitive, e.g. other
    /// patients' notes), then extract again. It trains: minutes on a real model.
    #[arg(long, value_name = "FILE", requires = "attacks")]
    pub relearn_on: Option<PathBuf>,
    /// Learning rate of the relearning attack.
    #[arg(long, value_name = "LR", default_value_t = crate::eval::attacks::RELEARN_LR, requires = "relearn_on")]
    pub relearn_lr: f64,
    /// Epochs of the relearning attack.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "relearn_on")]
    pub relearn_epochs: usize,

    #[command(subcommand)]
    pub command: Option<EvalCommand>,
}

/// The gate's limits (on `sani eval` and `sani eval merge`).
#[derive(Debug, Clone, clap::Args)]
pub struct GateArgs {
    /// Gate: fail when the total exact rate is above R (0..=1); with --attacks, the worst case
    /// over the attacks.
    #[arg(long, value_name = "R", conflicts_with = "max_count")]
    pub max_rate: Option<f64>,
    /// Gate: fail when more than N spans are reproduced exactly.
    #[arg(long, value_name = "N")]
    pub max_count: Option<usize>,
    /// Gate: fail when the perplexity on --perplexity FILE is above P (or not finite), so a
    /// model broken by sanitizing cannot pass.
    #[arg(long, value_name = "P")]
    pub max_perplexity: Option<f64>,
    /// Gate: fail when the membership AUC of the attack suite is above A (0.5 is chance).
    #[arg(long, value_name = "A")]
    pub max_auc: Option<f64>,
}

impl GateArgs {
    /// The limits, each checked once.
    pub fn limits(&self) -> Result<GateLimits> {
        if let Some(r) = self.max_rate {
            if !(0.0..=1.0).contains(&r) {
                bail!("--max-rate must be between 0 and 1 (got {r})");
            }
        }
        if self.max_rate.is_some() && self.max_count.is_some() {
            bail!("--max-rate and --max-count cannot be used together");
        }
        if let Some(p) = self.max_perplexity {
            if !(p.is_finite() && p >= 1.0) {
                bail!("--max-perplexity must be a number of at least 1 (got {p})");
            }
        }
        if let Some(a) = self.max_auc {
            if !(0.0..=1.0).contains(&a) {
                bail!("--max-auc must be between 0 and 1 (got {a})");
            }
        }
        Ok(GateLimits {
            max_rate: self.max_rate,
            max_count: self.max_count,
            max_perplexity: self.max_perplexity,
            max_auc: self.max_auc,
        })
    }
}

/// `sani eval`'s own subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum EvalCommand {
    /// Combine the --json reports of `sani eval --shard K/N` runs (every K of 0..N once) into
    /// the report, figures and gate verdict of one unsharded run
    #[command(allow_negative_numbers = true)]
    Merge(MergeArgs),
}

/// `sani eval merge`.
#[derive(Debug, Clone, clap::Args)]
pub struct MergeArgs {
    /// The shards' JSON reports, in any order.
    #[arg(required = true, value_name = "SHARD.json")]
    pub reports: Vec<PathBuf>,
    #[command(flatten)]
    pub gate: GateArgs,
    /// Write the merged JSON report here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

/// Parses `--attack-prefixes` (token counts, `whole` for the whole preceding document: 0).
fn parse_prefixes(list: &str) -> Result<Vec<usize>> {
    list.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| match x {
            "whole" => Ok(0),
            n => match n.parse::<usize>() {
                Ok(k) if k > 0 => Ok(k),
                _ => bail!("--attack-prefixes: {n:?} is not a token count >= 1 or `whole`"),
            },
        })
        .collect()
}

/// Parses `--attack-quantize`.
fn parse_quantizations(list: &str) -> Result<Vec<Quantization>> {
    if list.trim() == "none" {
        return Ok(Vec::new());
    }
    list.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            Quantization::ALL
                .into_iter()
                .find(|q| q.name() == x)
                .ok_or_else(|| {
                    anyhow!("--attack-quantize: {x:?} is not one of bf16, fp16, int8, int4, none")
                })
        })
        .collect()
}

impl EvalArgs {
    /// Validates the flags (each once) and resolves them into a job.
    pub fn resolve(&self) -> Result<EvalJob> {
        if let Some(EvalCommand::Merge(m)) = &self.command {
            return Ok(EvalJob::Merge {
                reports: m.reports.clone(),
                gate: m.gate.limits()?,
                json: m.json.clone(),
            });
        }
        let gate = self.gate.limits()?;
        if gate.max_perplexity.is_some() && self.perplexity.is_none() && self.compare.is_none() {
            bail!("--max-perplexity needs --perplexity FILE (held-out text to measure)");
        }
        if gate.max_auc.is_some() && !self.attacks && self.compare.is_none() {
            bail!("--max-auc needs --attacks (the membership AUC comes from the attack suite)");
        }
        if self.shard.is_some() && gate.is_set() {
            bail!(
                "--shard: a shard's figures are a part of the run's, so the gate (--max-rate, \
                 --max-count, --max-perplexity, --max-auc) belongs to `sani eval merge`"
            );
        }
        if let Some(paths) = &self.compare {
            let [before, after] = paths.as_slice() else {
                bail!("--compare needs two reports: BEFORE AFTER");
            };
            return Ok(EvalJob::Compare {
                before: before.clone(),
                after: after.clone(),
                gate,
            });
        }
        let model = self
            .model
            .clone()
            .ok_or_else(|| anyhow!("--model is required (except with --compare)"))?;
        let settings = RegurgitationSettings {
            prefix_tokens: self.prefix_tokens,
            max_new_tokens: self.max_new_tokens,
            samples: self.samples,
            temperature: self.temperature,
            top_k: self.top_k,
            seed: self.seed,
            batch_size: self.batch_size,
            bos: self.bos,
            doc_separator: self.doc_separator.clone(),
            shard: self.shard,
        };
        settings.validate()?;
        if self.max_seq_len == Some(0) {
            bail!("--max-seq-len must be at least 1");
        }
        let attacks = match self.attacks {
            false => None,
            true => {
                if !(self.relearn_lr.is_finite() && self.relearn_lr > 0.0) {
                    bail!(
                        "--relearn-lr must be a positive number, got {}",
                        self.relearn_lr
                    );
                }
                if self.relearn_epochs == 0 {
                    bail!("--relearn-epochs must be at least 1");
                }
                Some(AttackSettings {
                    prefix_lengths: parse_prefixes(&self.attack_prefixes)?,
                    samples: self.attack_samples,
                    temperatures: vec![0.7, 1.0],
                    quantizations: parse_quantizations(&self.attack_quantize)?,
                    fakes: self.attack_fakes,
                    fakes_from: match self.attack_fakes_from.as_str() {
                        "generators" => FakeSource::Generators,
                        _ => FakeSource::Corpus,
                    },
                    relearn: self.relearn_on.as_ref().map(|file| RelearnSettings {
                        file: file.clone(),
                        epochs: self.relearn_epochs,
                        lr: self.relearn_lr,
                        batch_size: 8,
                        max_seq_len: 256,
                    }),
                })
            }
        };
        // A regurgitation gate implies the measurement it gates.
        let regurgitation = self.regurgitation
            || attacks.is_some()
            || self.perplexity.is_none()
            || self.control.is_some()
            || gate.max_rate.is_some()
            || gate.max_count.is_some();
        let span_key = match &self.span_key_file {
            Some(path) => SpanKey::from_file(path)?,
            None => SpanKey::random(),
        };
        let device = self.runtime.setup()?;
        Ok(EvalJob::Measure(Box::new(Measure {
            model: crate::io::ModelSource {
                model,
                adapter: self.adapter_dir.clone(),
            },
            device,
            quiet: self.runtime.quiet,
            spans: self.spans.sources(),
            regurgitation,
            control: self.control.clone(),
            perplexity: self.perplexity.clone(),
            settings,
            max_seq_len: self.max_seq_len,
            gate,
            json: self.json.clone(),
            per_span: self.per_span.clone(),
            span_key,
            show_text: self.spans.show_text,
            attacks,
        })))
    }
}

/// Runs `sani eval`.
pub fn run(args: &EvalArgs) -> Result<Verdict> {
    crate::recipes::eval::run(&args.resolve()?)
}
