//! Files on disk: model directories ([`checkpoint`], found through [`hub`], confined by
//! [`model_files`]), atomic output
//! directories and files ([`staged`]), JSON reports ([`json`]) and their hashes ([`hash`]),
//! progress bars ([`progress`]).

pub mod checkpoint;
pub mod hash;
pub mod hub;
pub mod json;
pub mod model_files;
pub mod peft;
pub mod pickle;
pub mod progress;
pub mod staged;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

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

/// A model as the command line names it: a directory or cached hub repo id, and optionally a
/// PEFT LoRA adapter directory to merge into it (`--adapter-dir`).
#[derive(Debug, Clone, Default)]
pub struct ModelSource {
    pub model: String,
    pub adapter: Option<PathBuf>,
}

impl ModelSource {
    pub fn new(model: impl Into<String>) -> Self {
        ModelSource {
            model: model.into(),
            adapter: None,
        }
    }
}

/// Resolves the model (a directory or a cached hub repo id), loads its weights and tokenizer
/// and merges the adapter; fails when weights and tokenizer disagree (see
/// [`token_id_problems`]).
pub fn open_model(
    source: &ModelSource,
    device: &Device,
) -> Result<(checkpoint::Checkpoint, Tokenizer)> {
    open_strict(source, device, Reading::All)
}

/// [`open_model`] with each tensor read only when first used ([`checkpoint::Checkpoint::open`]);
/// an adapter's tensors are read to merge it.
pub fn open_model_on_demand(
    source: &ModelSource,
    device: &Device,
) -> Result<(checkpoint::Checkpoint, Tokenizer)> {
    open_strict(source, device, Reading::OnDemand)
}

/// How much of the weights [`open_checked`] reads.
#[derive(Clone, Copy)]
enum Reading {
    All,
    OnDemand,
    HeadersOnly,
}

fn open_strict(
    source: &ModelSource,
    device: &Device,
    reading: Reading,
) -> Result<(checkpoint::Checkpoint, Tokenizer)> {
    let (ckpt, tok, problems) = open_checked(source, device, reading)?;
    if let Some(first) = problems.first() {
        let more = match problems.len() {
            1 => String::new(),
            n => format!(" (and {} more: run `sani inspect`)", n - 1),
        };
        bail!("{first}{more}");
    }
    Ok((ckpt, tok))
}

/// [`open_model`] that returns the consistency problems instead of failing on them, with only
/// the tensors' headers loaded (for `sani inspect`; with an adapter, the tensors it merges
/// into are read and merged, so that a mismatch shows).
pub fn open_model_lenient(
    source: &ModelSource,
    device: &Device,
) -> Result<(checkpoint::Checkpoint, Tokenizer, Vec<String>)> {
    let reading = match source.adapter {
        Some(_) => Reading::OnDemand,
        None => Reading::HeadersOnly,
    };
    open_checked(source, device, reading)
}

/// The checkpoint (read as `reading` says), its tokenizer and their problems.
fn open_checked(
    source: &ModelSource,
    device: &Device,
    reading: Reading,
) -> Result<(checkpoint::Checkpoint, Tokenizer, Vec<String>)> {
    let dir = hub::resolve_model_dir(&source.model)?;
    let mut ckpt = match reading {
        Reading::All => checkpoint::Checkpoint::load(&dir, device)?,
        Reading::OnDemand => checkpoint::Checkpoint::open(&dir, device)?,
        Reading::HeadersOnly => checkpoint::Checkpoint::load_headers(&dir, device)?,
    };
    if let Some(adapter) = &source.adapter {
        let merged = peft::merge_adapter(&ckpt, adapter)
            .with_context(|| format!("--adapter-dir {}", adapter.display()))?;
        ckpt.adapter = Some(merged);
    }
    let tok = load_tokenizer(&dir)?;
    let problems = token_id_problems(&ckpt, &tok);
    Ok((ckpt, tok, problems))
}

/// Token ids that would index past the embedding matrix: the special token ids of config.json,
/// and the tokenizer's vocabulary (added tokens included). Each problem names file and field.
pub fn token_id_problems(ckpt: &checkpoint::Checkpoint, tok: &Tokenizer) -> Vec<String> {
    let rows = ckpt.config.vocab_size();
    let config = ckpt.dir.join("config.json");
    let mut problems = Vec::new();
    let c = &ckpt.config;
    let special = c
        .bos_token_id()
        .map(|id| ("bos_token_id", id))
        .into_iter()
        .chain(c.eos_token_ids().into_iter().map(|id| ("eos_token_id", id)))
        .chain(c.pad_token_id().map(|id| ("pad_token_id", id)));
    for (field, id) in special {
        if id as usize >= rows {
            problems.push(format!(
                "{}: field `{field}` is {id}, beyond the embedding's {rows} rows (ids 0..{})",
                config.display(),
                rows.saturating_sub(1)
            ));
        }
    }
    let mut beyond: Vec<(u32, String)> = tok
        .get_vocab(true)
        .into_iter()
        .filter(|(_, id)| *id as usize >= rows)
        .map(|(t, id)| (id, t))
        .collect();
    beyond.sort();
    if let Some((id, token)) = beyond.last() {
        problems.push(format!(
            "{}: {} token id{} beyond the embedding's {rows} rows (config.json vocab_size), the \
             largest {id} ({token:?}); the tokenizer does not belong to these weights",
            ckpt.dir.join("tokenizer.json").display(),
            beyond.len(),
            if beyond.len() == 1 { " is" } else { "s are" },
        ));
    }
    problems
}
