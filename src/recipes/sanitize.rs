//! `sani sanitize`: erasure of MLP units in the last blocks, then repair by fine-tuning with the
//! sensitive tokens masked out of the loss (or replaced by fresh surrogates), then an atomic write
//! of a drop-in HF directory with `sani_report.json`.
//!
//! The options arrive resolved ([`ResolvedConfig`]: built-in `configs/default.toml`, then
//! `--config FILE`, then the command line, layered by [`crate::cli::sanitize`]).

use crate::data::spans::{self, Document, SpanSources};
use crate::data::tokens::Framing;
use crate::data::tokens::{self, BosPolicy};
use crate::erase::{self, ResetMode, Selection};
use crate::io::checkpoint::{Checkpoint, ShardWrite};
use crate::io::json;
use crate::io::staged::StagedDir;
use crate::model::Model;
use crate::recipes::PhaseTiming;
use crate::train::{
    self, windows_to_examples, Corpus, EpochData, EpochMetrics, Example, FixedData, Forgetting,
    SurrogateData, TrainConfig, TrainScope,
};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// What the repair trains on where the corpus has sensitive spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RepairTarget {
    /// Sensitive tokens carry no loss (the paper).
    Mask,
    /// Every epoch each span is replaced by a fresh fake identifier of the same type, which is trained on.
    Surrogate,
}

/// What the repair trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Adapter {
    /// Every tensor of the training scope (full-parameter fine-tuning).
    #[default]
    None,
    /// Low-rank adapters on the frozen model's projections, merged into the weights at the end.
    Lora,
}

fn default_lora_rank() -> usize {
    16
}
fn default_lora_alpha() -> f64 {
    32.0
}
fn default_train_modules() -> String {
    "all".to_string()
}
fn default_lora_targets() -> String {
    crate::nn::lora::ALL_LINEAR.to_string()
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc_separator: Option<String>,
    pub seed: u64,
    /// Recompute each block in the backward pass instead of storing its activations.
    #[serde(default)]
    pub checkpoint_activations: bool,
    /// With checkpointing: MiB of block activations kept from the forward pass.
    #[serde(default)]
    pub activation_memory: usize,
    #[serde(default)]
    pub adapter: Adapter,
    #[serde(default = "default_lora_rank")]
    pub lora_rank: usize,
    #[serde(default = "default_lora_alpha")]
    pub lora_alpha: f64,
    /// Comma-separated module names, or `all-linear`.
    #[serde(default = "default_lora_targets")]
    pub lora_targets: String,
    /// Comma-separated module names whose tensors train (`mlp`, `self_attn`, ...), or `all`.
    #[serde(default = "default_train_modules")]
    pub train_modules: String,
    /// Weight of the bounded unlikelihood term on the true sensitive tokens (0: off).
    #[serde(default)]
    pub forget_weight: f64,
    /// With `forget_weight`: the share of documents trained in their true form each epoch
    /// instead of with surrogates (0, or absent in a config of an older sani: the true windows
    /// are added to every epoch).
    #[serde(default)]
    pub forget_share: f64,
    /// Whether `erase_layers` was given (flag or config file): then more layers than the model
    /// has is an error; the built-in default means "at most all of them".
    #[serde(skip)]
    pub erase_layers_given: bool,
    /// Whether `forget_weight` was given (flag or config file): the built-in default's
    /// forgetting applies to surrogate repair only and is dropped where it cannot apply (mask
    /// repair, `sani prepare`); one that was asked for is an error there.
    #[serde(skip)]
    pub forget_weight_given: bool,
}

/// `--train-modules auto` trains every tensor of a model up to this many parameters (its
/// weights, gradients and AdamW moments in f32 are then at most 0.8 GB) and the MLPs of a
/// larger one.
pub const AUTO_ALL_MODULES_MAX_PARAMS: usize = 50_000_000;

impl ResolvedConfig {
    /// The settings that depend on the model, resolved for one with `n_layers` blocks and
    /// `n_params` parameters: the built-in `erase-layers` erases at most a quarter of the
    /// blocks (at least one; a given value is kept as it is), and `train-modules auto` becomes
    /// `all` or `mlp` (see [`AUTO_ALL_MODULES_MAX_PARAMS`]). On a shallow model, erasing every
    /// block and repairing only the MLPs cost the most fluency (README "Attack suite").
    pub fn for_model(&self, n_layers: usize, n_params: usize) -> ResolvedConfig {
        let mut cfg = self.clone();
        if !cfg.erase_layers_given {
            cfg.erase_layers = cfg.erase_layers.min((n_layers / 4).max(1));
        }
        if cfg.train_modules.trim() == "auto" {
            cfg.train_modules = match n_params <= AUTO_ALL_MODULES_MAX_PARAMS {
                true => "all",
                false => "mlp",
            }
            .to_string();
        }
        cfg
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.erase_fraction) {
            bail!(
                "--erase-fraction must be in [0, 1], got {}",
                self.erase_fraction
            );
        }
        self.train_config().validate()?;
        if self.max_seq_len < 2 {
            bail!("--max-seq-len must be at least 2");
        }
        if self.reset == ResetMode::Base && self.base_model.is_none() && self.erase_fraction > 0.0 {
            bail!("--reset base needs --base-model DIR");
        }
        if self.train_modules.split(',').any(|m| m.trim().is_empty()) {
            bail!("--train-modules needs module names (e.g. mlp) or all");
        }
        if self.forget_weight > 0.0 && self.repair_target != RepairTarget::Surrogate {
            bail!(
                "--forget-weight needs --repair-target surrogate: the true tokens are pushed up to \
                 the surrogates' NLL, which mask repair does not have"
            );
        }
        if !(0.0..=1.0).contains(&self.forget_share) {
            bail!(
                "--forget-share must be in [0, 1] (0: add the true windows instead), got {}",
                self.forget_share
            );
        }
        if self.adapter == Adapter::Lora && self.train_scope != "all" {
            bail!(
                "--adapter lora trains adapters in every block; --train-scope {} is not supported with it",
                self.train_scope
            );
        }
        self.scope(usize::MAX)?;
        Ok(())
    }

    /// How surrogate repair forgets the true values.
    pub fn forgetting(&self) -> Forgetting {
        match (self.forget_weight > 0.0, self.forget_share) {
            (false, _) => Forgetting::Off,
            (true, 0.0) => Forgetting::Added,
            (true, q) => Forgetting::Share(q),
        }
    }

    /// The repair's training hyperparameters.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            forget_weight: self.forget_weight,
            forget_per_token: self.forget_share > 0.0,
            epochs: self.epochs,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            checkpoint_activations: self.checkpoint_activations,
            activation_memory_mib: self.activation_memory,
            lora: self.lora(),
            modules: match self.train_modules.trim() {
                "all" => Vec::new(),
                list => list.split(',').map(|m| m.trim().to_string()).collect(),
            },
        }
    }

    /// The LoRA settings, when the repair trains adapters.
    pub fn lora(&self) -> Option<crate::nn::lora::LoraConfig> {
        (self.adapter == Adapter::Lora).then(|| crate::nn::lora::LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha,
            targets: self
                .lora_targets
                .split(',')
                .map(|t| t.trim().to_string())
                .collect(),
            seed: self.seed,
        })
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

/// Everything `sani_report.json` records about a sanitize run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SanitizeReport {
    pub sani_version: String,
    pub command: String,
    pub input_model: String,
    pub input_weights_sha256: String,
    /// The PEFT adapter merged into the input (`--adapter-dir`): the output is the merged model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_adapter: Option<crate::io::peft::MergedAdapter>,
    /// The input's weight files when they are PyTorch pickles (`pytorch_model.bin`): the output
    /// holds the same tensors as safetensors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_pickle_files: Vec<String>,
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
    /// Every tensor erasure reset, with the indices along its unit axis.
    #[serde(default)]
    pub erased_tensors: Vec<erase::ResetTensor>,
    pub epochs: Vec<EpochMetrics>,
    pub timings: Vec<PhaseTiming>,
    pub output_weights_sha256: String,
    /// The LoRA adapters the repair trained (`--adapter lora`), before they were merged.
    #[serde(skip)]
    pub trained_adapters: Vec<crate::nn::lora::TrainedLora>,
    /// With `--output-format adapter`: the PEFT adapter written instead of the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_adapter: Option<String>,
    /// Each weight file of the output: rewritten, or copied byte for byte from the input where
    /// none of its tensors changed.
    #[serde(default)]
    pub output_shards: Vec<ShardWrite>,
}

/// How the repair frames each document (BOS, `--doc-separator`).
fn repair_framing(ckpt: &Checkpoint, tok: &Tokenizer, cfg: &ResolvedConfig) -> Result<Framing> {
    tokens::resolve_framing(
        tok,
        ckpt.config.bos_token_id(),
        cfg.bos,
        cfg.doc_separator.as_deref(),
    )
}

/// The corpus the repair cuts into windows (the same for `sanitize` and `prepare`).
pub fn repair_corpus<'a>(
    ckpt: &Checkpoint,
    tok: &'a Tokenizer,
    docs: &'a [Document],
    cfg: &ResolvedConfig,
) -> Result<Corpus<'a>> {
    Ok(Corpus {
        docs,
        tok,
        labels: spans::label_names(docs),
        framing: repair_framing(ckpt, tok, cfg)?,
        max_seq_len: cfg.max_seq_len.min(ckpt.config.max_positions()),
        stride: (cfg.stride > 0).then_some(cfg.stride),
    })
}

/// What each repair epoch trains on: the true windows with the sensitive tokens masked
/// (`masked`, the same every epoch), or fresh surrogates each epoch.
pub fn repair_data<'a>(
    corpus: &'a Corpus<'a>,
    masked: &[Example],
    cfg: &ResolvedConfig,
) -> Box<dyn EpochData + 'a> {
    match cfg.repair_target {
        RepairTarget::Mask => Box::new(FixedData(masked.to_vec())),
        RepairTarget::Surrogate => Box::new(SurrogateData {
            corpus,
            seed: cfg.seed,
            forgetting: cfg.forgetting(),
        }),
    }
}

/// Runs the whole sanitize pipeline on an already opened checkpoint (its tensors are updated in
/// place). Writes nothing.
pub fn sanitize_in_memory(
    ckpt: &Checkpoint,
    tok: &Tokenizer,
    docs: &[Document],
    cfg: &ResolvedConfig,
    quiet: bool,
) -> Result<SanitizeReport> {
    let n_layers = ckpt.config.num_layers();
    let cfg = &cfg.for_model(n_layers, ckpt.num_params());
    if cfg.erase_layers_given && cfg.erase_layers > n_layers {
        bail!(
            "--erase-layers {}: the model has only {n_layers} layers",
            cfg.erase_layers
        );
    }
    if let TrainScope::LastBlocks(k) = cfg.scope(usize::MAX)? {
        if k > n_layers && cfg.train_scope != "erased" {
            bail!(
                "--train-scope {}: the model has only {n_layers} layers",
                cfg.train_scope
            );
        }
    }
    let mut timings = Vec::new();
    let labels = spans::label_names(docs);
    let framing = repair_framing(ckpt, tok, cfg)?;
    let bos = framing.bos;
    let corpus = repair_corpus(ckpt, tok, docs, cfg)?;
    let t0 = Instant::now();
    let windows = corpus.windows(docs)?;
    let masked = tokens::masked_token_counts(&windows, &labels);
    let total_tokens: usize = windows.iter().map(|w| w.ids.len()).sum();
    let examples = windows_to_examples(&windows, true);
    timings.push(PhaseTiming::new("tokenize", t0, total_tokens));

    // Erasure.
    let t0 = Instant::now();
    let layers = erase::last_layers(n_layers, cfg.erase_layers);
    let mut units = BTreeMap::new();
    let mut erased_tensors = Vec::new();
    if cfg.erase_fraction > 0.0 && !layers.is_empty() {
        // Random selection needs only the structure: no tensor is read but those reset.
        let probe = match cfg.select {
            Selection::Random => Model::load_shapes(ckpt)?,
            _ => Model::load_frozen(ckpt)?,
        };
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
                Checkpoint::open(dir, &ckpt.device)
                    .with_context(|| format!("--base-model {}", dir.display()))?,
            ),
            _ => None,
        };
        erased_tensors =
            erase::reset_units(ckpt, &probe, &units, cfg.reset, base.as_ref(), cfg.seed)?;
    }
    crate::runtime::trace_rss("erased");
    timings.push(PhaseTiming::new("erase", t0, 0));

    // Repair.
    let t0 = Instant::now();
    let mut epochs = Vec::new();
    let mut trained_adapters = Vec::new();
    if cfg.epochs > 0 {
        let scope = cfg.scope(n_layers)?;
        let train_cfg = cfg.train_config();
        let mut data = repair_data(&corpus, &examples, cfg);
        (epochs, trained_adapters) =
            train::fit_keeping_adapters(ckpt, scope, data.as_mut(), &train_cfg, quiet)?;
    }
    // Tokens through the model: in surrogate repair the sensitive tokens are trained too, so
    // trained + sensitive would count them twice.
    let trained: usize = epochs.iter().map(|e: &EpochMetrics| e.tokens).sum();
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
        input_adapter: ckpt.adapter.clone(),
        input_pickle_files: match ckpt.from_pickle {
            true => ckpt.input_files.clone(),
            false => Vec::new(),
        },
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
        erased_tensors,
        trained_adapters,
        epochs,
        timings,
        output_weights_sha256: String::new(),
        output_shards: Vec::new(),
        output_adapter: None,
    })
}

/// A sanitize run, resolved from the command line.
#[derive(Debug, Clone)]
pub struct SanitizeJob {
    /// Model directory or cached hub repo id, and the adapter merged into it.
    pub model: crate::io::ModelSource,
    pub device: Device,
    pub quiet: bool,
    pub spans: SpanSources,
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
    /// What `out` holds: the sanitized model, or (LoRA repair without erasure) a PEFT adapter.
    pub output_format: OutputFormat,
    pub config: ResolvedConfig,
}

/// `sani sanitize`.
pub fn run(job: &SanitizeJob) -> Result<()> {
    let cfg = &job.config;
    let docs = job.spans.load()?;
    crate::runtime::trace_rss("start");
    let (ckpt, tok) = crate::io::open_model_on_demand(&job.model, &job.device)?;
    crate::runtime::trace_rss("model open");
    let model_dir = ckpt.dir.clone();
    let staged = StagedDir::create(&job.out, job.force, &[&model_dir])?;
    let input_sha = ckpt.weights_sha256()?;
    let t0 = Instant::now();
    let mut report = sanitize_in_memory(&ckpt, &tok, &docs, cfg, job.quiet)?;
    report.command = std::env::args().collect::<Vec<_>>().join(" ");
    report.input_weights_sha256 = input_sha.clone();
    for (k, p) in [
        ("sensitive", &job.spans.sensitive),
        ("corpus", &job.spans.corpus),
        ("terms", &job.spans.terms),
    ] {
        if let Some(p) = p {
            report.sensitive_inputs.insert(
                k.to_string(),
                crate::io::hash::sha256_files(Path::new("."), &[p.display().to_string()])?,
            );
        }
    }
    let mut provenance = BTreeMap::new();
    provenance.insert("sani_version".to_string(), report.sani_version.clone());
    provenance.insert("sani_operation".to_string(), "sanitize".to_string());
    provenance.insert("sani_source_sha256".to_string(), input_sha);
    // The configuration as resolved for this model (what `--config` reproduces).
    let cfg = &report.config.clone();
    provenance.insert("sani_config".to_string(), serde_json::to_string(cfg)?);
    let tw = Instant::now();
    match job.output_format {
        OutputFormat::Model => {
            report.output_shards = ckpt.write_to(staged.path(), &provenance)?;
            report.output_weights_sha256 =
                crate::io::hash::sha256_files(staged.path(), &ckpt.shards)?;
        }
        OutputFormat::Adapter => {
            if !report.erased_tensors.is_empty() {
                bail!(
                    "--output-format adapter: erasure reset {} base tensors, which an adapter for the unchanged base cannot carry (write the model, or use --erase-fraction 0)",
                    report.erased_tensors.len()
                );
            }
            let lora = cfg
                .lora()
                .context("--output-format adapter needs --adapter lora")?;
            write_peft_adapter(
                staged.path(),
                &report.trained_adapters,
                &lora,
                &model_dir,
                &provenance,
            )?;
            report.output_adapter = Some(crate::io::peft::ADAPTER_WEIGHTS.to_string());
            report.output_weights_sha256 = crate::io::hash::sha256_files(
                staged.path(),
                &[crate::io::peft::ADAPTER_WEIGHTS.to_string()],
            )?;
        }
    }
    crate::runtime::trace_rss("written");
    report.timings.push(PhaseTiming::new("write", tw, 0));
    report.timings.push(PhaseTiming::new("total", t0, 0));
    json::write_json(&staged.path().join(json::SANITIZE_REPORT_FILE), &report)?;
    std::fs::write(
        staged.path().join("sani_config.toml"),
        toml::to_string(cfg)?,
    )?;
    let out = staged.commit()?;
    print_summary(&report, &out);
    Ok(())
}

/// What `sani sanitize` writes to `--out`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// The sanitized model: a drop-in HF directory in the input's layout.
    #[default]
    Model,
    /// The repair's LoRA adapters as a PEFT adapter for the unchanged input model.
    Adapter,
}

/// Writes the trained adapters as PEFT does: `adapter_config.json` and
/// `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight` [r, in], `lora_B`
/// [out, r]) for the base model `base`.
fn write_peft_adapter(
    dir: &Path,
    adapters: &[crate::nn::lora::TrainedLora],
    lora: &crate::nn::lora::LoraConfig,
    base: &Path,
    provenance: &BTreeMap<String, String>,
) -> Result<()> {
    if adapters.is_empty() {
        bail!("--output-format adapter: the repair trained no adapters (is --epochs 0?)");
    }
    let mut tensors = Vec::new();
    let mut targets = std::collections::BTreeSet::new();
    for a in adapters {
        tensors.push((
            format!("base_model.model.{}.lora_A.weight", a.module),
            a.a.clone(),
        ));
        tensors.push((
            format!("base_model.model.{}.lora_B.weight", a.module),
            a.b.clone(),
        ));
        targets.insert(a.module.rsplit('.').next().unwrap_or(&a.module).to_string());
    }
    let mut metadata: std::collections::HashMap<String, String> =
        provenance.clone().into_iter().collect();
    metadata.insert("format".into(), "pt".into());
    let path = dir.join(crate::io::peft::ADAPTER_WEIGHTS);
    safetensors::tensor::serialize_to_file(tensors, Some(metadata), &path)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.display().to_string(),
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "target_modules": targets.into_iter().collect::<Vec<_>>(),
        "fan_in_fan_out": adapters.iter().any(|a| a.stored_in_out),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "init_lora_weights": true,
        "inference_mode": true,
    });
    let path = dir.join(crate::io::peft::ADAPTER_CONFIG);
    std::fs::write(&path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

fn print_summary(r: &SanitizeReport, out: &Path) {
    match &r.output_adapter {
        Some(_) => println!(
            "PEFT adapter for the unchanged input model written to {} (load it with PEFT, or `--model INPUT --adapter-dir` in sani)",
            out.display()
        ),
        None => println!("sanitized model written to {}", out.display()),
    }
    if !r.input_pickle_files.is_empty() {
        println!(
            "  weights read from PyTorch pickle ({}), written as safetensors with the same names and dtypes",
            r.input_pickle_files.join(", ")
        );
    }
    if let Some(a) = &r.input_adapter {
        println!("  {}; the output is the merged model", a.summary());
    }
    println!(
        "  documents {}, windows {}, tokens {}, masked tokens {}",
        r.documents,
        r.windows,
        r.total_tokens,
        r.masked_tokens_per_label.values().sum::<usize>()
    );
    for (layer, units) in &r.erased_units {
        let tensors: Vec<String> = r
            .erased_tensors
            .iter()
            .filter(|t| t.layer.to_string() == *layer)
            .map(|t| {
                let short = t.tensor.rsplit_once(".mlp.").map_or(&*t.tensor, |(_, n)| n);
                let what = match (t.tensor.ends_with(".bias"), t.axis) {
                    (true, _) => "entries",
                    (false, 0) => "rows",
                    _ => "columns",
                };
                format!("{short} {what}")
            })
            .collect();
        println!(
            "  layer {layer}: {} MLP units reset ({:?}): {}",
            units.len(),
            r.config.reset,
            tensors.join(", ")
        );
    }
    for e in &r.epochs {
        println!(
            "  epoch {}: loss {:.4} (sensitive tokens {:.4}), {:.0} tok/s, {:.1}s",
            e.epoch, e.loss_trained, e.loss_sensitive, e.tokens_per_s, e.seconds
        );
    }
    if let Some(line) = shards_line(&r.output_shards) {
        println!("  {line}");
    }
    println!(
        "  report: {}",
        out.join(json::SANITIZE_REPORT_FILE).display()
    );
}

/// "weights: 1 of 6 files rewritten, 5 copied unchanged", for a sharded output.
pub fn shards_line(shards: &[ShardWrite]) -> Option<String> {
    if shards.len() < 2 {
        return None;
    }
    let rewritten = shards.iter().filter(|s| s.changed_tensors > 0).count();
    Some(format!(
        "weights: {rewritten} of {} files rewritten, {} copied unchanged",
        shards.len(),
        shards.len() - rewritten
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built_in() -> ResolvedConfig {
        toml::from_str(crate::cli::sanitize::DEFAULT_CONFIG).unwrap()
    }

    #[test]
    fn the_default_is_resolved_by_model_depth_and_size() {
        let cfg = built_in();
        assert_eq!(cfg.train_modules, "auto");
        // SmolLM2-135M: the last 4 of 30 blocks, MLPs only.
        let real = cfg.for_model(30, 134_515_008);
        assert_eq!((real.erase_layers, real.train_modules.as_str()), (4, "mlp"));
        // The demo's 4-block toys: one block, every tensor.
        let toy = cfg.for_model(4, 400_000);
        assert_eq!((toy.erase_layers, toy.train_modules.as_str()), (1, "all"));
        assert_eq!(cfg.for_model(12, 50_000_000).erase_layers, 3);
        assert_eq!(cfg.for_model(12, 50_000_001).train_modules, "mlp");
        // What the user gave is kept.
        let given = ResolvedConfig {
            erase_layers: 4,
            erase_layers_given: true,
            train_modules: "mlp,self_attn".into(),
            ..cfg
        };
        let kept = given.for_model(4, 400_000);
        assert_eq!(
            (kept.erase_layers, kept.train_modules.as_str()),
            (4, "mlp,self_attn")
        );
    }
}
