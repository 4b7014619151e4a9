//! JSON reports written beside outputs (`sani_report.json`, eval reports).

use anyhow::Result;
use serde::Serialize;
use std::path::Path;

pub const SANITIZE_REPORT_FILE: &str = "sani_report.json";

/// Pretty JSON with a trailing newline, written atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    super::staged::write_file_atomic(path, text.as_bytes())
}
