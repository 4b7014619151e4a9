//! `sani prepare`: what only sani does, for a distributed trainer that does the rest. It erases
//! (as `sanitize` does) and writes the erased model as a drop-in HF directory, plus the repair
//! set as Parquet, one file per repair epoch (`repair/epoch-K.parquet`: surrogates are drawn
//! fresh each epoch): the exact token windows `sanitize` would train on with the same options and
//! seed, with `labels` -100 where the loss must not reach (masked sensitive tokens, padding).
//! `scripts/repair_accelerate.py` trains the erased model on it with the hyperparameters of
//! `sani_config.toml` (FSDP or DeepSpeed through the user's accelerate config).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arrow_array::builder::{Int64Builder, Int8Builder, ListBuilder};
use arrow_array::{ArrayRef, Int32Array, RecordBatch, StringArray};
use serde::{Deserialize, Serialize};

use crate::data::spans::Document;
use crate::io::checkpoint::Checkpoint;
use crate::io::json;
use crate::io::staged::StagedDir;
use crate::recipes::sanitize::{
    repair_corpus, repair_data, sanitize_in_memory, ResolvedConfig, SanitizeJob, SanitizeReport,
};
use crate::recipes::PhaseTiming;
use crate::train::{windows_to_examples, Example};

/// The label of a position the loss skips (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One epoch's file of the repair set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairFile {
    /// Relative to the output directory.
    pub file: String,
    pub epoch: usize,
    pub rows: usize,
    /// Every row is padded to this length.
    pub seq_len: usize,
    /// Positions with a label: the targets the loss is taken over (as sanitize counts them).
    pub trained_tokens: usize,
    pub tokens: usize,
}

/// `sani_report.json` of `sani prepare`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepareReport {
    /// The erasure, as `sanitize` reports it (no repair epochs).
    #[serde(flatten)]
    pub erase: SanitizeReport,
    pub pad_token_id: u32,
    pub repair_set: Vec<RepairFile>,
    /// How to train on the set and evaluate the result.
    pub next_steps: Vec<String>,
}

/// The repair set's examples, epoch by epoch, exactly as `sanitize` would train on them.
pub fn repair_epochs(
    ckpt: &Checkpoint,
    tok: &tokenizers::Tokenizer,
    docs: &[Document],
    cfg: &ResolvedConfig,
) -> Result<Vec<Vec<Example>>> {
    let corpus = repair_corpus(ckpt, tok, docs, cfg)?;
    let masked = windows_to_examples(&corpus.windows(docs)?, true);
    let mut data = repair_data(&corpus, &masked, cfg);
    (0..cfg.epochs).map(|e| data.examples(e)).collect()
}

/// Writes one epoch's examples as Parquet: `input_ids`, `attention_mask`, `labels` (right
/// padded to the longest row), `doc_id` and `window` (the window's index within its document).
pub fn write_parquet(
    path: &Path,
    examples: &[Example],
    docs: &[Document],
    pad_id: u32,
) -> Result<RepairFile> {
    let seq_len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = ListBuilder::new(Int64Builder::new());
    let mut mask = ListBuilder::new(Int8Builder::new());
    let mut labels = ListBuilder::new(Int64Builder::new());
    let mut doc_ids = Vec::with_capacity(examples.len());
    let mut window = Vec::with_capacity(examples.len());
    let mut seen: BTreeMap<usize, i32> = BTreeMap::new();
    let (mut trained, mut tokens) = (0usize, 0usize);
    for e in examples {
        let n = e.ids.len();
        for i in 0..seq_len {
            let real = i < n;
            ids.values()
                .append_value(if real { e.ids[i] } else { pad_id } as i64);
            mask.values().append_value(real as i8);
            // The first position is never a target (nothing predicts it).
            let label = if real && i > 0 && e.train[i] {
                trained += 1;
                e.ids[i] as i64
            } else {
                IGNORE_INDEX
            };
            labels.values().append_value(label);
        }
        tokens += n;
        ids.append(true);
        mask.append(true);
        labels.append(true);
        let doc = docs.get(e.origin.doc).with_context(|| {
            format!("an example of document {} of {}", e.origin.doc, docs.len())
        })?;
        doc_ids.push(doc.id.clone());
        let k = seen.entry(e.origin.doc).or_insert(0);
        window.push(*k);
        *k += 1;
    }
    let batch = RecordBatch::try_from_iter([
        ("input_ids", Arc::new(ids.finish()) as ArrayRef),
        ("attention_mask", Arc::new(mask.finish()) as ArrayRef),
        ("labels", Arc::new(labels.finish()) as ArrayRef),
        ("doc_id", Arc::new(StringArray::from(doc_ids)) as ArrayRef),
        ("window", Arc::new(Int32Array::from(window)) as ArrayRef),
    ])?;
    let file = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(RepairFile {
        file: String::new(),
        epoch: 0,
        rows: examples.len(),
        seq_len,
        trained_tokens: trained,
        tokens,
    })
}

/// `sani prepare`.
pub fn run(job: &SanitizeJob) -> Result<()> {
    if job.output_format != crate::recipes::sanitize::OutputFormat::Model {
        bail!("--output-format adapter: `sani prepare` writes the erased model for an external trainer");
    }
    let mut cfg = job.config.clone();
    if !cfg.forget_weight_given {
        // The default's forgetting is sani's own loss: the repair set is for cross-entropy.
        cfg.forget_weight = 0.0;
        cfg.forget_share = 0.0;
    }
    let cfg = &cfg;
    if cfg.forget_weight > 0.0 {
        bail!(
            "--forget-weight {}: the bounded unlikelihood term is sani's own loss; an external \
             trainer's cross-entropy cannot apply it, so `sani prepare` supports repair \
             without it (--forget-weight 0)",
            cfg.forget_weight
        );
    }
    if cfg.adapter != crate::recipes::sanitize::Adapter::None {
        bail!(
            "--adapter lora: `sani prepare` writes a full-parameter repair set; train LoRA on it \
             with your trainer's PEFT instead"
        );
    }
    if cfg.epochs == 0 {
        bail!("--epochs 0: no repair set to write (use `sani sanitize --epochs 0` to erase only)");
    }
    let docs = job.spans.load()?;
    let (ckpt, tok) = crate::io::open_model_on_demand(&job.model, &job.device)?;
    let staged = StagedDir::create(&job.out, job.force, &[&ckpt.dir])?;
    let input_sha = ckpt.weights_sha256()?;
    let t0 = Instant::now();
    // The repair set first: it is cut from the input's tokenizer and config, which erasure
    // does not change.
    let epochs = repair_epochs(&ckpt, &tok, &docs, cfg)?;
    let erase_only = ResolvedConfig {
        epochs: 0,
        ..cfg.clone()
    };
    let mut erase = sanitize_in_memory(&ckpt, &tok, &docs, &erase_only, job.quiet)?;
    // The erasure's config is already resolved for this model; only the epochs differ.
    erase.config.epochs = cfg.epochs;
    let cfg = &erase.config.clone();
    erase.command = std::env::args().collect::<Vec<_>>().join(" ");
    erase.input_weights_sha256 = input_sha.clone();
    let pad_id = ckpt
        .config
        .pad_token_id()
        .or(ckpt.config.eos_token_ids().first().copied())
        .unwrap_or(0);
    let tw = Instant::now();
    std::fs::create_dir(staged.path().join("repair"))?;
    let mut files = Vec::new();
    for (e, examples) in epochs.iter().enumerate() {
        let rel = format!("repair/epoch-{e}.parquet");
        let mut f = write_parquet(&staged.path().join(&rel), examples, &docs, pad_id)?;
        f.file = rel;
        f.epoch = e;
        files.push(f);
    }
    erase
        .timings
        .push(PhaseTiming::new("write repair set", tw, 0));
    let mut provenance = BTreeMap::new();
    provenance.insert("sani_version".to_string(), erase.sani_version.clone());
    provenance.insert("sani_operation".to_string(), "prepare (erased)".to_string());
    provenance.insert("sani_source_sha256".to_string(), input_sha);
    provenance.insert("sani_config".to_string(), serde_json::to_string(cfg)?);
    let tw = Instant::now();
    erase.output_shards = ckpt.write_to(staged.path(), &provenance)?;
    crate::runtime::trace_rss("written");
    erase.output_weights_sha256 = crate::io::hash::sha256_files(staged.path(), &ckpt.shards)?;
    erase.timings.push(PhaseTiming::new("write model", tw, 0));
    erase.timings.push(PhaseTiming::new("total", t0, 0));
    let out_name = job.out.display().to_string();
    let report = PrepareReport {
        erase,
        pad_token_id: pad_id,
        repair_set: files,
        next_steps: vec![
            format!(
                "accelerate launch scripts/repair_accelerate.py --prepared {out_name} --out {out_name}-repaired"
            ),
            format!(
                "sani eval --model {out_name}-repaired --sensitive SENSITIVE --max-rate 0.03"
            ),
        ],
    };
    json::write_json(&staged.path().join(json::SANITIZE_REPORT_FILE), &report)?;
    std::fs::write(
        staged.path().join("sani_config.toml"),
        toml::to_string(cfg)?,
    )?;
    let out = staged.commit()?;
    println!("erased model and repair set written to {}", out.display());
    for (layer, units) in &report.erase.erased_units {
        println!("  layer {layer}: {} MLP units reset", units.len());
    }
    if let Some(line) = crate::recipes::sanitize::shards_line(&report.erase.output_shards) {
        println!("  {line}");
    }
    for f in &report.repair_set {
        println!(
            "  {}: {} rows of {} tokens ({} with a label)",
            f.file, f.rows, f.seq_len, f.trained_tokens
        );
    }
    println!("  next: {}", report.next_steps.join("\n        "));
    Ok(())
}
