//! Where `--model` points: a local directory, or a hub repo id found in the local Hugging Face
//! cache (`HF_HOME` / `HF_HUB_CACHE`). `sani` never downloads.

use super::checkpoint::weight_files;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// Resolves `--model`: a local directory, or a hub repo id found in the local Hugging Face cache
/// (`HF_HOME` / `HF_HUB_CACHE`). `sani` never downloads.
pub fn resolve_model_dir(model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        if !path.is_dir() {
            bail!("{model}: --model must be a model directory, not a file");
        }
        return Ok(path.to_path_buf());
    }
    let looks_like_repo =
        model.split('/').count() == 2 && !model.starts_with('.') && !model.ends_with('/');
    if !looks_like_repo {
        bail!("{model}: no such model directory");
    }
    let cache = hub_cache();
    let not_cached = || {
        anyhow!(
            "{model}: not a local directory and not in the Hugging Face cache at {} \
             (sani never downloads: fetch it with `hf download {model}` where there is network, \
             or pass a local directory)",
            cache.path().display()
        )
    };
    // The layout huggingface_hub writes: models--org--name/refs/main holds the commit hash of
    // models--org--name/snapshots/<hash>/. Read it ourselves so that a trailing newline is fine.
    let repo_dir = cache
        .path()
        .join(format!("models--{}", model.replace('/', "--")));
    let hash =
        std::fs::read_to_string(repo_dir.join("refs").join("main")).map_err(|_| not_cached())?;
    let dir = repo_dir.join("snapshots").join(hash.trim());
    if !dir.is_dir() {
        return Err(not_cached());
    }
    if !dir.join("config.json").is_file() {
        bail!(
            "{model}: cached snapshot {} lacks config.json",
            dir.display()
        );
    }
    let (shards, _) = weight_files(&dir)
        .with_context(|| format!("{model}: cached snapshot {} is incomplete", dir.display()))?;
    for shard in shards {
        if !dir.join(&shard).is_file() {
            bail!("{model}: cached snapshot {} lacks {shard}", dir.display());
        }
    }
    Ok(dir)
}

fn hub_cache() -> hf_hub::Cache {
    if let Ok(dir) = std::env::var("HF_HUB_CACHE") {
        return hf_hub::Cache::new(PathBuf::from(dir));
    }
    hf_hub::Cache::from_env()
}
