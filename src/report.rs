//! Reports written beside outputs (`sani_report.json`) and small shared report types.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

pub const SANITIZE_REPORT_FILE: &str = "sani_report.json";

/// Duration and throughput of one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseTiming {
    pub phase: String,
    pub seconds: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
}

impl PhaseTiming {
    pub fn new(phase: &str, start: Instant, tokens: usize) -> Self {
        let seconds = start.elapsed().as_secs_f64();
        PhaseTiming {
            phase: phase.to_string(),
            seconds,
            tokens,
            tokens_per_s: if seconds > 0.0 {
                tokens as f64 / seconds
            } else {
                0.0
            },
        }
    }
}

/// Pretty JSON with a trailing newline.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    std::fs::write(path, text).with_context(|| format!("{}: cannot write", path.display()))
}
