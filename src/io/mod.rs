//! Files on disk: model directories ([`checkpoint`], found through [`hub`]), atomic output
//! directories and files ([`staged`]), JSON reports ([`json`]) and their hashes ([`hash`]),
//! progress bars ([`progress`]).

pub mod checkpoint;
pub mod hash;
pub mod hub;
pub mod json;
pub mod progress;
pub mod staged;

use anyhow::{bail, Result};
use candle_core::Device;
use std::path::Path;
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

/// Resolves `model` (a directory or a cached hub repo id) and loads its weights and tokenizer.
pub fn open_model(model: &str, device: &Device) -> Result<(checkpoint::Checkpoint, Tokenizer)> {
    let dir = hub::resolve_model_dir(model)?;
    let ckpt = checkpoint::Checkpoint::load(&dir, device)?;
    let tok = load_tokenizer(&dir)?;
    Ok((ckpt, tok))
}
