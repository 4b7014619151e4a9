//! Reports written beside outputs (`sani_report.json`) and shared report helpers.

pub const SANITIZE_REPORT_FILE: &str = "sani_report.json";
