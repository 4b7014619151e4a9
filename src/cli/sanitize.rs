//! `sani sanitize` on the command line: every option as a flag and as a key of the TOML config
//! file ([`SanitizeOptions`], one definition for both), layered over the built-in defaults into
//! the [`ResolvedConfig`] the recipe takes.

use super::{ModelArgs, SpansArgs};
use crate::data::tokens::BosPolicy;
use crate::erase::{ResetMode, Selection};
use crate::recipes::sanitize::{Adapter, RepairTarget, ResolvedConfig, SanitizeJob};
use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = include_str!("../../configs/default.toml");

/// Every sanitize option; `None` means "not set at this layer". Also the TOML config schema.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SanitizeOptions {
    /// Erase MLP units in the last N transformer blocks; the built-in default erases at most a
    /// quarter of the model's blocks (at least 1) [default.toml: 4; paper: 1]
    #[arg(long)]
    pub erase_layers: Option<usize>,
    /// Share of the MLP units of each erased block to reset, 0 disables erasure [default.toml: 0.5; paper: 0.5]
    #[arg(long)]
    pub erase_fraction: Option<f64>,
    /// How units are chosen [default.toml: random]
    #[arg(long, value_enum)]
    pub select: Option<Selection>,
    /// What an erased unit becomes [default.toml: reinit]
    #[arg(long, value_enum)]
    pub reset: Option<ResetMode>,
    /// Pre-trained model the fine-tune started from (for --reset base)
    #[arg(long, value_name = "DIR")]
    pub base_model: Option<PathBuf>,
    /// Repair target on sensitive spans [default.toml: surrogate; paper: mask]
    #[arg(long, value_enum)]
    pub repair_target: Option<RepairTarget>,
    /// Repair epochs, 0 disables repair [default.toml: 2; paper: 2]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate (AdamW) [default.toml: 4e-3]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Sequences per micro-batch [default.toml: 8]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default.toml: 1]
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Tokens per training window [default.toml: 256]
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Overlap long documents: windows start this many tokens apart (0: no overlap) [default.toml: 0]
    #[arg(long)]
    pub stride: Option<usize>,
    /// Linear warmup steps, then linear decay [default.toml: 0]
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// AdamW decoupled weight decay on matrices [default.toml: 0.0]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm, 0 disables [default.toml: 1.0]
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Which blocks the repair trains: all, erased, or last:K [default.toml: all]
    #[arg(long)]
    pub train_scope: Option<String>,
    /// BOS at the start of each document: auto (what the tokenizer adds, often none), always
    /// (tokenizer's, else config's, else a BOS-like token), never [default.toml: auto]
    #[arg(long, value_enum)]
    pub bos: Option<BosPolicy>,
    /// Text the model was fine-tuned with around each document, e.g. '<|im_end|>': repair trains
    /// on `[bos] + SEP + note + SEP`; give `sani eval` the same [default: none]
    #[arg(long, value_name = "TEXT")]
    pub doc_separator: Option<String>,
    /// Seed for selection, reinit, shuffling and surrogates [default.toml: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Recompute each block in the backward pass instead of storing its activations: much less
    /// memory on deep models, one more forward pass [default.toml: true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub checkpoint_activations: Option<bool>,
    /// With checkpointing: keep up to this many MiB of the blocks' activations from the forward
    /// pass instead of recomputing them in the backward (Llama-family blocks; about 42 MiB per
    /// block of SmolLM2-135M at 8 x 256 tokens): faster by up to a quarter of the blocks' GEMM
    /// work [default.toml: 0]
    #[arg(long, value_name = "MIB")]
    pub activation_memory: Option<usize>,
    /// Which tensors full-parameter repair trains: `all`, or module names (a component of the
    /// tensor name), comma-separated, e.g. `mlp` or `mlp,self_attn`; LoRA uses --lora-targets
    /// instead; `auto`: all on a model of up to 50M parameters, else mlp [default.toml: auto;
    /// paper: all]
    #[arg(long, value_name = "LIST")]
    pub train_modules: Option<String>,
    /// Bounded unlikelihood on the true sensitive tokens: repair also pushes each one's NLL up,
    /// with this weight, until it is no likelier than the surrogates' (0: off). Surrogate repair
    /// only: the default is dropped with --repair-target mask and in `sani prepare`
    /// [default.toml: 0.85]
    #[arg(long, value_name = "W")]
    pub forget_weight: Option<f64>,
    /// With --forget-weight above 0: each epoch, this share of the documents trains in its true
    /// form (sensitive tokens pushed, the rest trained as usual) instead of with surrogates, so
    /// forgetting costs no extra work; 0: the true windows are added to each epoch instead
    /// (about twice the work) [default.toml: 0.75]
    #[arg(long, value_name = "S")]
    pub forget_share: Option<f64>,
    /// What the repair trains: none (every weight) or lora (low-rank adapters on the frozen
    /// model, merged into the weights at the end) [default.toml: none]
    #[arg(long, value_enum)]
    pub adapter: Option<Adapter>,
    /// LoRA rank r [default.toml: 16]
    #[arg(long, value_name = "R")]
    pub lora_rank: Option<usize>,
    /// LoRA alpha (the adapter's output is scaled by alpha / r) [default.toml: 32]
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Projections that get adapters: module names, comma-separated (q_proj,v_proj; GPT-2:
    /// c_attn,c_proj,c_fc), or all-linear [default.toml: all-linear]
    #[arg(long, value_name = "LIST")]
    pub lora_targets: Option<String>,
}

impl SanitizeOptions {
    pub fn from_toml(text: &str, path: &Path) -> Result<Self> {
        toml::from_str(text).with_context(|| format!("{}: invalid sanitize config", path.display()))
    }
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read config", path.display()))?;
        Self::from_toml(&text, path)
    }
    /// The options that are set, as TOML keys (unset ones are left out).
    fn to_table(&self) -> Result<toml::Table> {
        toml::Table::try_from(self).context("cannot represent the sanitize options as TOML")
    }
    /// Built-in defaults, then the file, then the command line: each layer's keys replace the
    /// ones before; the result is checked once.
    pub fn layered(file: Option<&Path>, cli: &SanitizeOptions) -> Result<ResolvedConfig> {
        let mut table =
            Self::from_toml(DEFAULT_CONFIG, Path::new("configs/default.toml (built in)"))?
                .to_table()?;
        let file = file.map(Self::from_file).transpose()?;
        let erase_layers_given =
            cli.erase_layers.is_some() || file.as_ref().is_some_and(|f| f.erase_layers.is_some());
        if let Some(f) = &file {
            table.extend(f.to_table()?);
        }
        table.extend(cli.to_table()?);
        let mut cfg: ResolvedConfig = toml::Value::Table(table)
            .try_into()
            .context("sanitize options: the built-in default config is incomplete")?;
        cfg.erase_layers_given = erase_layers_given;
        cfg.forget_weight_given =
            cli.forget_weight.is_some() || file.as_ref().is_some_and(|f| f.forget_weight.is_some());
        if !cfg.forget_weight_given && cfg.repair_target != RepairTarget::Surrogate {
            cfg.forget_weight = 0.0;
        }
        if cfg.forget_weight == 0.0 {
            cfg.forget_share = 0.0;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Debug, Clone, Args)]
pub struct SanitizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub spans: SpansArgs,
    /// Output directory (a complete HF model directory plus sani_report.json)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace --out if it exists
    #[arg(long)]
    pub force: bool,
    /// What --out holds: the sanitized model, or, for LoRA repair (--adapter lora) without
    /// erasure (--erase-fraction 0) of a full model, a PEFT adapter for the unchanged input
    #[arg(long, value_enum, default_value = "model")]
    pub output_format: crate::recipes::sanitize::OutputFormat,
    /// TOML file with any of the options below (kebab-case keys); the command line overrides it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub options: SanitizeOptions,
}

impl SanitizeArgs {
    /// Layers the options and checks them (once), opens the device.
    pub fn resolve(&self) -> Result<SanitizeJob> {
        let config = SanitizeOptions::layered(self.config.as_deref(), &self.options)?;
        if self.output_format == crate::recipes::sanitize::OutputFormat::Adapter {
            let why = if config.adapter != crate::recipes::sanitize::Adapter::Lora {
                Some("the repair must train LoRA adapters (--adapter lora)".to_string())
            } else if config.epochs == 0 {
                Some("with --epochs 0 nothing trains".to_string())
            } else if config.erase_fraction > 0.0 && config.erase_layers > 0 {
                Some(format!(
                    "erasure (--erase-fraction {} on {} layers) changes base weights, which an \
                     adapter for the unchanged base cannot carry: add --erase-fraction 0, or \
                     write the model",
                    config.erase_fraction, config.erase_layers
                ))
            } else if self.model.adapter_dir.is_some() {
                Some(
                    "the input is already an adapter merged into its base (--adapter-dir): \
                     write the merged model"
                        .to_string(),
                )
            } else {
                None
            };
            if let Some(why) = why {
                anyhow::bail!("--output-format adapter: {why}");
            }
        }
        let device = self.model.runtime.setup()?;
        Ok(SanitizeJob {
            model: self.model.source(),
            device,
            quiet: self.model.runtime.quiet,
            spans: self.spans.sources(),
            out: self.out.clone(),
            force: self.force,
            output_format: self.output_format,
            config,
        })
    }
}

/// Runs `sani sanitize`.
pub fn run(args: &SanitizeArgs) -> Result<()> {
    crate::recipes::sanitize::run(&args.resolve()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        options: SanitizeOptions,
    }

    /// Every `[default.toml: X]` in the help says what configs/default.toml says.
    #[test]
    fn help_defaults_match_default_toml() {
        let table: toml::Table = toml::from_str(DEFAULT_CONFIG).unwrap();
        let mut checked = 0;
        for arg in Cli::command().get_arguments() {
            let (Some(long), Some(help)) = (arg.get_long(), arg.get_help()) else {
                continue;
            };
            let help = help.to_string();
            let Some(at) = help.find("[default.toml: ") else {
                continue;
            };
            let said = help[at + 15..].split([';', ']']).next().unwrap().trim();
            let value = table
                .get(long)
                .unwrap_or_else(|| panic!("--{long}: not in default.toml"));
            let actual = match value {
                toml::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            let same = said == actual
                || said.parse::<f64>().ok() == actual.parse::<f64>().ok()
                    && said.parse::<f64>().is_ok();
            assert!(
                same,
                "--{long}: help says {said}, default.toml says {actual}"
            );
            checked += 1;
        }
        assert!(checked > 15, "{checked}");
    }
}
