//! SHA-256 as lowercase hex: of bytes (span texts in per-span reports) and of files (weights and
//! input files in reports).

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::path::Path;

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(Sha256::digest(data))
}

/// One SHA-256 over the concatenation of `files` (relative to `dir`), in order.
pub fn sha256_files(dir: &Path, files: &[String]) -> Result<String> {
    let mut hasher = Sha256::new();
    for f in files {
        let path = dir.join(f);
        let mut file = std::fs::File::open(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        std::io::copy(&mut file, &mut hasher)?;
    }
    Ok(hex(hasher.finalize()))
}
