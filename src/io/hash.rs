//! Hashes as lowercase hex: SHA-256 of files (weights and input files in reports), and the keyed
//! hash (HMAC-SHA-256, [`SpanKey`]) that stands for span text in per-span reports.
//!
//! A plain hash of a span is no protection: dates, ages, MRNs and names from a name list are
//! few enough to hash them all and look the hashes up. Keyed with a secret the reader does not
//! have, the hash only tells equal spans apart from different ones, within one key.

use anyhow::{bail, Context, Result};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Fewest key bytes accepted from a key file.
pub const MIN_SPAN_KEY_BYTES: usize = 16;

/// The secret key of the per-span hashes.
#[derive(Clone)]
pub struct SpanKey {
    key: Vec<u8>,
    /// Where the key came from, for the report: "random per run" or the key file.
    pub source: String,
}

impl std::fmt::Debug for SpanKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpanKey({}, id {})", self.source, self.key_id())
    }
}

impl SpanKey {
    /// 32 random bytes from the OS: hashes of one run can be compared with each other only.
    pub fn random() -> Self {
        let mut key = vec![0u8; 32];
        // ThreadRng: a CSPRNG (ChaCha) seeded from the OS.
        rand::rng().fill_bytes(&mut key);
        SpanKey {
            key,
            source: "random per run".to_string(),
        }
    }

    /// The bytes of `path` (a trailing newline dropped) as the key, so that runs sharing the
    /// file can join their per-span lines.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut key = std::fs::read(path)
            .with_context(|| format!("{}: cannot read the span key file", path.display()))?;
        while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            key.pop();
        }
        if key.len() < MIN_SPAN_KEY_BYTES {
            bail!(
                "{}: a span key needs at least {MIN_SPAN_KEY_BYTES} bytes, got {} (make one with \
                 `head -c 32 /dev/urandom | base64 > key`)",
                path.display(),
                key.len()
            );
        }
        Ok(SpanKey {
            key,
            source: format!("file {}", path.display()),
        })
    }

    /// HMAC-SHA-256 of `data` under the key.
    pub fn hmac_hex(&self, data: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key size");
        mac.update(data);
        hex(mac.finalize().into_bytes())
    }

    /// A short public name of the key (the first 16 hex of its HMAC over a fixed label): equal
    /// ids mean hashes can be joined; it reveals nothing about the spans.
    pub fn key_id(&self) -> String {
        self.hmac_hex(b"sani span key id")[..16].to_string()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let k = SpanKey {
            key: b"Jefe".to_vec(),
            source: String::new(),
        };
        assert_eq!(
            k.hmac_hex(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn keys_differ_and_short_key_files_are_refused() {
        let (a, b) = (SpanKey::random(), SpanKey::random());
        assert_ne!(a.hmac_hex(b"42"), b.hmac_hex(b"42"));
        assert_ne!(a.hmac_hex(b"42"), sha256_hex(b"42"));
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let msg = format!("{:#}", SpanKey::from_file(&short).unwrap_err());
        assert!(msg.contains("short") && msg.contains("16 bytes"), "{msg}");
        let good = dir.path().join("good");
        std::fs::write(&good, "0123456789abcdef0123\n").unwrap();
        let (k1, k2) = (
            SpanKey::from_file(&good).unwrap(),
            SpanKey::from_file(&good).unwrap(),
        );
        assert_eq!(k1.hmac_hex(b"x"), k2.hmac_hex(b"x"));
        assert_eq!(k1.key_id(), k2.key_id());
    }
}
