//! `sani sanitize`: erasure of MLP units in the last blocks, then repair by fine-tuning with the
//! sensitive tokens masked out of the loss (or replaced by fresh surrogates), then an atomic write
//! of a drop-in HF directory with `sani_report.json`.
//!
//! Options come from the built-in `configs/default.toml`, then `--config FILE`, then the
//! command line (each layer overrides the one before).

use crate::cli::{self, ModelArgs, SpansArgs};
use crate::data::spans::{self, Document};
use crate::data::surrogate::apply_surrogates;
use crate::data::tokens::{self, BosPolicy, Window};
use crate::erase::{self, ResetMode, Selection};
use crate::io::checkpoint::Checkpoint;
use crate::io::json;
use crate::io::staged::StagedDir;
use crate::model::Model;
use crate::recipes::PhaseTiming;
use crate::train::{self, EpochData, EpochMetrics, Example, LoopConfig, OptimConfig, TrainScope};
use anyhow::{bail, Context, Result};
use clap::Args;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

pub const DEFAULT_CONFIG: &str = include_str!("../../configs/default.toml");

/// What the repair trains on where the corpus has sensitive spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RepairTarget {
    /// Sensitive tokens carry no loss (the paper).
    Mask,
    /// Every epoch each span is replaced by a fresh fake identifier of the same type, which is trained on.
    Surrogate,
}

/// Every sanitize option; `None` means "not set at this layer". Also the TOML config schema.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SanitizeOptions {
    /// Erase MLP units in the last N transformer blocks [default.toml: 4; paper: 1]
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
    /// Repair epochs, 0 disables repair [default.toml: 6; paper: 2]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate (AdamW) [default.toml: 5e-4]
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
    /// BOS at the start of each document: auto (tokenizer's, else config's), always, never [default.toml: auto]
    #[arg(long, value_enum)]
    pub bos: Option<BosPolicy>,
    /// Seed for selection, reinit, shuffling and surrogates [default.toml: 0]
    #[arg(long)]
    pub seed: Option<u64>,
}

macro_rules! overlay {
    ($base:expr, $top:expr, $($f:ident),*) => {
        SanitizeOptions { $($f: $top.$f.clone().or($base.$f.clone())),* }
    };
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
    /// `top` wins where set.
    pub fn overlay(&self, top: &SanitizeOptions) -> SanitizeOptions {
        overlay!(
            self,
            top,
            erase_layers,
            erase_fraction,
            select,
            reset,
            base_model,
            repair_target,
            epochs,
            lr,
            batch_size,
            grad_accum,
            max_seq_len,
            stride,
            warmup_steps,
            weight_decay,
            max_grad_norm,
            train_scope,
            bos,
            seed
        )
    }
    /// Built-in defaults, then the file, then the command line.
    pub fn layered(file: Option<&Path>, cli: &SanitizeOptions) -> Result<ResolvedConfig> {
        let mut opts =
            Self::from_toml(DEFAULT_CONFIG, Path::new("configs/default.toml (built in)"))?;
        if let Some(f) = file {
            opts = opts.overlay(&Self::from_file(f)?);
        }
        opts.overlay(cli).resolve()
    }

    fn resolve(&self) -> Result<ResolvedConfig> {
        let missing = |f: &str| {
            anyhow::anyhow!("option `{f}` has no value (built-in default config is incomplete)")
        };
        macro_rules! req {
            ($f:ident) => {
                self.$f.clone().ok_or_else(|| missing(stringify!($f)))?
            };
        }
        let cfg = ResolvedConfig {
            erase_layers: req!(erase_layers),
            erase_fraction: req!(erase_fraction),
            select: req!(select),
            reset: req!(reset),
            base_model: self.base_model.clone(),
            repair_target: req!(repair_target),
            epochs: req!(epochs),
            lr: req!(lr),
            batch_size: req!(batch_size),
            grad_accum: req!(grad_accum),
            max_seq_len: req!(max_seq_len),
            stride: req!(stride),
            warmup_steps: req!(warmup_steps),
            weight_decay: req!(weight_decay),
            max_grad_norm: req!(max_grad_norm),
            train_scope: req!(train_scope),
            bos: req!(bos),
            seed: req!(seed),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The configuration a run actually used (saved in the report and as `sani_config.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ResolvedConfig {
    pub erase_layers: usize,
    pub erase_fraction: f64,
    pub select: Selection,
    pub reset: ResetMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model: Option<PathBuf>,
    pub repair_target: RepairTarget,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub stride: usize,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub train_scope: String,
    pub bos: BosPolicy,
    pub seed: u64,
}

impl ResolvedConfig {
    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.erase_fraction) {
            bail!(
                "--erase-fraction must be in [0, 1], got {}",
                self.erase_fraction
            );
        }
        if self.lr <= 0.0 || !self.lr.is_finite() {
            bail!("--lr must be positive, got {}", self.lr);
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            bail!("--batch-size and --grad-accum must be at least 1");
        }
        if self.max_seq_len < 2 {
            bail!("--max-seq-len must be at least 2");
        }
        if self.reset == ResetMode::Base && self.base_model.is_none() && self.erase_fraction > 0.0 {
            bail!("--reset base needs --base-model DIR");
        }
        self.scope(usize::MAX)?;
        Ok(())
    }

    /// The training scope for a model of `n_layers` blocks.
    pub fn scope(&self, n_layers: usize) -> Result<TrainScope> {
        Ok(match self.train_scope.as_str() {
            "all" => TrainScope::All,
            "erased" => TrainScope::LastBlocks(self.erase_layers.min(n_layers).max(1)),
            s => match s
                .strip_prefix("last:")
                .and_then(|k| k.parse::<usize>().ok())
            {
                Some(k) if k > 0 => TrainScope::LastBlocks(k.min(n_layers)),
                _ => bail!("--train-scope {s}: expected all, erased or last:K (K >= 1)"),
            },
        })
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
    /// TOML file with any of the options below (kebab-case keys); the command line overrides it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub options: SanitizeOptions,
}

/// Converts tokenized windows to training examples; `mask_sensitive` removes them from the loss.
pub fn windows_to_examples(windows: &[Window], mask_sensitive: bool) -> Vec<Example> {
    windows
        .iter()
        .filter(|w| w.ids.len() >= 2)
        .map(|w| Example {
            ids: w.ids.clone(),
            train: w
                .sensitive
                .iter()
                .map(|&s| !(mask_sensitive && s))
                .collect(),
            sensitive: w.sensitive.clone(),
        })
        .collect()
}

/// The corpus tokenized into examples.
pub struct Corpus<'a> {
    pub docs: &'a [Document],
    pub tok: &'a Tokenizer,
    pub labels: Vec<String>,
    pub bos: Option<u32>,
    pub max_seq_len: usize,
    pub stride: Option<usize>,
}

impl Corpus<'_> {
    pub fn windows(&self, docs: &[Document]) -> Result<Vec<Window>> {
        let enc = tokens::encode_documents(self.tok, docs)?;
        Ok(tokens::make_windows(
            docs,
            &enc,
            &self.labels,
            self.bos,
            self.max_seq_len,
            self.stride,
        ))
    }
}

/// Surrogate repair data: every epoch the spans get fresh fake values before tokenization.
struct SurrogateData<'a> {
    corpus: &'a Corpus<'a>,
    seed: u64,
}

impl EpochData for SurrogateData<'_> {
    fn examples(&mut self, epoch: usize) -> Result<Vec<Example>> {
        let mut rng =
            StdRng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
        let docs: Vec<Document> = self
            .corpus
            .docs
            .iter()
            .map(|d| apply_surrogates(d, &mut rng))
            .collect();
        Ok(windows_to_examples(&self.corpus.windows(&docs)?, false))
    }
    fn is_fixed(&self) -> bool {
        false
    }
}

/// Everything `sani_report.json` records about a sanitize run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SanitizeReport {
    pub sani_version: String,
    pub command: String,
    pub input_model: String,
    pub input_weights_sha256: String,
    pub sensitive_inputs: BTreeMap<String, String>,
    pub config: ResolvedConfig,
    pub bos_token_id: Option<u32>,
    pub documents: usize,
    pub windows: usize,
    pub spans_per_label: BTreeMap<String, usize>,
    pub masked_tokens_per_label: BTreeMap<String, usize>,
    pub total_tokens: usize,
    pub erased_layers: Vec<usize>,
    pub erased_units: BTreeMap<String, Vec<usize>>,
    pub epochs: Vec<EpochMetrics>,
    pub timings: Vec<PhaseTiming>,
    pub output_weights_sha256: String,
}

/// Runs the whole sanitize pipeline on an already opened checkpoint. Writes nothing.
pub struct SanitizeOutcome {
    pub report: SanitizeReport,
}

pub fn sanitize_in_memory(
    ckpt: &Checkpoint,
    tok: &Tokenizer,
    docs: &[Document],
    cfg: &ResolvedConfig,
    quiet: bool,
) -> Result<SanitizeReport> {
    let mut timings = Vec::new();
    let labels = spans::label_names(docs);
    let bos = tokens::resolve_bos(tok, ckpt.config.bos_token_id(), cfg.bos);
    let corpus = Corpus {
        docs,
        tok,
        labels: labels.clone(),
        bos,
        max_seq_len: cfg.max_seq_len.min(ckpt.config.max_positions()),
        stride: (cfg.stride > 0).then_some(cfg.stride),
    };
    let t0 = Instant::now();
    let windows = corpus.windows(docs)?;
    let masked = tokens::masked_token_counts(&windows, &labels);
    let total_tokens: usize = windows.iter().map(|w| w.ids.len()).sum();
    let examples = windows_to_examples(&windows, true);
    timings.push(PhaseTiming::new("tokenize", t0, total_tokens));

    // Erasure.
    let t0 = Instant::now();
    let n_layers = ckpt.config.num_layers();
    let layers = erase::last_layers(n_layers, cfg.erase_layers);
    let mut units = BTreeMap::new();
    if cfg.erase_fraction > 0.0 && !layers.is_empty() {
        let probe = Model::load_frozen(ckpt)?;
        units = erase::select_units(
            &probe,
            &examples,
            &layers,
            cfg.erase_fraction,
            cfg.select,
            cfg.seed,
            cfg.batch_size,
        )?;
        let base = match (&cfg.reset, &cfg.base_model) {
            (ResetMode::Base, Some(dir)) => Some(
                Checkpoint::load(dir, &ckpt.device)
                    .with_context(|| format!("--base-model {}", dir.display()))?,
            ),
            _ => None,
        };
        erase::reset_units(ckpt, &probe, &units, cfg.reset, base.as_ref(), cfg.seed)?;
    }
    timings.push(PhaseTiming::new("erase", t0, 0));

    // Repair.
    let t0 = Instant::now();
    let mut epochs = Vec::new();
    if cfg.epochs > 0 {
        let scope = cfg.scope(n_layers)?;
        let shape_model = Model::load_frozen(ckpt)?;
        let trainable = train::scope_predicate(&shape_model, scope);
        let model = Model::load(ckpt, &trainable)?;
        let loop_cfg = LoopConfig {
            epochs: cfg.epochs,
            batch_size: cfg.batch_size,
            grad_accum: cfg.grad_accum,
            seed: cfg.seed,
            scope,
        };
        let optim = OptimConfig {
            lr: cfg.lr,
            warmup_steps: cfg.warmup_steps,
            weight_decay: cfg.weight_decay,
            max_grad_norm: cfg.max_grad_norm,
            ..OptimConfig::default()
        };
        epochs = match cfg.repair_target {
            RepairTarget::Mask => train::train(
                &model,
                &mut train::FixedData(examples.clone()),
                &loop_cfg,
                &optim,
                quiet,
            )?,
            RepairTarget::Surrogate => {
                let mut data = SurrogateData {
                    corpus: &corpus,
                    seed: cfg.seed,
                };
                train::train(&model, &mut data, &loop_cfg, &optim, quiet)?
            }
        };
    }
    let trained: usize = epochs
        .iter()
        .map(|e: &EpochMetrics| e.trained_tokens + e.sensitive_tokens)
        .sum();
    timings.push(PhaseTiming::new("repair", t0, trained));

    let mut spans_per_label = BTreeMap::new();
    for d in docs {
        for s in &d.spans {
            *spans_per_label.entry(s.label.clone()).or_insert(0) += 1;
        }
    }
    Ok(SanitizeReport {
        sani_version: env!("CARGO_PKG_VERSION").to_string(),
        command: String::new(),
        input_model: ckpt.dir.display().to_string(),
        input_weights_sha256: String::new(),
        sensitive_inputs: BTreeMap::new(),
        config: cfg.clone(),
        bos_token_id: bos,
        documents: docs.len(),
        windows: windows.len(),
        spans_per_label,
        masked_tokens_per_label: masked,
        total_tokens,
        erased_layers: layers
            .into_iter()
            .filter(|l| units.contains_key(l))
            .collect(),
        erased_units: units.into_iter().map(|(l, u)| (l.to_string(), u)).collect(),
        epochs,
        timings,
        output_weights_sha256: String::new(),
    })
}

/// `sani sanitize`.
pub fn run(args: &SanitizeArgs) -> Result<()> {
    let cfg = SanitizeOptions::layered(args.config.as_deref(), &args.options)?;
    let device = args.model.runtime.setup()?;
    let docs = args.spans.load()?;
    let (ckpt, tok) = cli::open_model(&args.model, &device)?;
    let model_dir = ckpt.dir.clone();
    let staged = StagedDir::create(&args.out, args.force, &[&model_dir])?;
    let input_sha = ckpt.weights_sha256()?;
    let t0 = Instant::now();
    let mut report = sanitize_in_memory(&ckpt, &tok, &docs, &cfg, args.model.runtime.quiet)?;
    report.command = std::env::args().collect::<Vec<_>>().join(" ");
    report.input_weights_sha256 = input_sha.clone();
    for (k, p) in [
        ("sensitive", &args.spans.sensitive),
        ("corpus", &args.spans.corpus),
        ("terms", &args.spans.terms),
    ] {
        if let Some(p) = p {
            report.sensitive_inputs.insert(
                k.to_string(),
                crate::io::checkpoint::sha256_files(Path::new("."), &[p.display().to_string()])?,
            );
        }
    }
    let mut provenance = BTreeMap::new();
    provenance.insert("sani_version".to_string(), report.sani_version.clone());
    provenance.insert("sani_operation".to_string(), "sanitize".to_string());
    provenance.insert("sani_source_sha256".to_string(), input_sha);
    provenance.insert("sani_config".to_string(), serde_json::to_string(&cfg)?);
    let tw = Instant::now();
    ckpt.write_to(staged.path(), &provenance)?;
    report.output_weights_sha256 =
        crate::io::checkpoint::sha256_files(staged.path(), &ckpt.shards)?;
    report.timings.push(PhaseTiming::new("write", tw, 0));
    report.timings.push(PhaseTiming::new("total", t0, 0));
    json::write_json(&staged.path().join(json::SANITIZE_REPORT_FILE), &report)?;
    std::fs::write(
        staged.path().join("sani_config.toml"),
        toml::to_string(&cfg)?,
    )?;
    let out = staged.commit()?;
    print_summary(&report, &out);
    Ok(())
}

fn print_summary(r: &SanitizeReport, out: &Path) {
    println!("sanitized model written to {}", out.display());
    println!(
        "  documents {}, windows {}, tokens {}, masked tokens {}",
        r.documents,
        r.windows,
        r.total_tokens,
        r.masked_tokens_per_label.values().sum::<usize>()
    );
    for (layer, units) in &r.erased_units {
        println!(
            "  layer {layer}: {} MLP units reset ({:?})",
            units.len(),
            r.config.reset
        );
    }
    for e in &r.epochs {
        println!(
            "  epoch {}: loss {:.4} (sensitive tokens {:.4}), {:.0} tok/s, {:.1}s",
            e.epoch, e.loss_trained, e.loss_sensitive, e.tokens_per_s, e.seconds
        );
    }
    println!(
        "  report: {}",
        out.join(json::SANITIZE_REPORT_FILE).display()
    );
}
