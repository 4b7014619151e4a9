//! The eval report: its JSON form (`--json`, read back by `--compare`), the gate, the table and
//! the side-by-side comparison, and the `--per-span` lines.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::perplexity::Perplexity;
use super::regurgitation::{BosInfo, LabelCounts, RegurgitationSummary, SpanResult};
use crate::io::hash::sha256_hex;

/// Outcome of `sani eval` for the exit code (Pass: 0, Fail: 1; errors: 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
}

/// The model a report was measured on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub path: String,
    pub architecture: String,
    pub weights_sha256: String,
}

/// Every setting of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportSettings {
    pub sensitive: Option<String>,
    pub corpus: Option<String>,
    pub terms: Option<String>,
    pub control: Option<String>,
    pub perplexity_file: Option<String>,
    pub prefix_tokens: usize,
    /// null: per span, its token count + 4.
    pub max_new_tokens: Option<usize>,
    pub decoding: String,
    pub samples: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub max_seq_len: Option<usize>,
    pub bos: Option<BosInfo>,
    pub max_rate: Option<f64>,
    pub max_count: Option<usize>,
}

/// Timing of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub seconds: f64,
    pub regurgitation_seconds: f64,
    pub perplexity_seconds: f64,
    pub spans_per_second: Option<f64>,
    pub generated_tokens_per_second: Option<f64>,
}

/// Gate outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    pub passed: bool,
    pub message: String,
}

/// The `--json` report (also read back by `--compare`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub sani_version: String,
    pub model: Option<ModelInfo>,
    pub settings: ReportSettings,
    pub regurgitation: Option<RegurgitationSummary>,
    pub control: Option<RegurgitationSummary>,
    pub perplexity: Option<Perplexity>,
    pub gate: Option<GateReport>,
    pub timing: Timing,
}

/// Applies `--max-rate` / `--max-count` to a total; None when no gate is set.
pub fn gate(
    total: &LabelCounts,
    max_rate: Option<f64>,
    max_count: Option<usize>,
) -> Option<GateReport> {
    if let Some(r) = max_rate {
        let passed = total.exact_rate <= r;
        let op = if passed { "<=" } else { ">" };
        return Some(GateReport {
            passed,
            message: format!("exact rate {:.4} {op} max {r}", total.exact_rate),
        });
    }
    if let Some(n) = max_count {
        let passed = total.exact <= n;
        let op = if passed { "<=" } else { ">" };
        return Some(GateReport {
            passed,
            message: format!("exact count {} {op} max {n}", total.exact),
        });
    }
    None
}

fn fmt_opt(x: Option<f64>, prec: usize) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.prec$}"))
}

fn counts_row(name: &str, c: &LabelCounts) -> String {
    format!(
        "{name:<16} {:>6} {:>6} {:>7} {:>10.4} {:>12.4} {:>9} {:>9} {:>8}",
        c.n,
        c.exact,
        c.partial,
        c.exact_rate,
        c.partial_rate,
        c.in_prompt,
        fmt_opt(c.mean_strength, 3),
        fmt_opt(c.sampled_rate, 4),
    )
}

/// The stdout table of a report.
pub fn render_report(r: &EvalReport) -> String {
    let mut s = String::new();
    if let Some(m) = &r.model {
        s += &format!(
            "model: {} ({}, weights sha256 {})\n",
            m.path, m.architecture, &m.weights_sha256
        );
    }
    if let Some(reg) = &r.regurgitation {
        s += &format!(
            "{:<16} {:>6} {:>6} {:>7} {:>10} {:>12} {:>9} {:>9} {:>8}\n",
            "label",
            "n",
            "exact",
            "partial",
            "exact rate",
            "partial rate",
            "in-prompt",
            "strength",
            "sampled"
        );
        for (label, c) in &reg.per_label {
            s += &counts_row(label, c);
            s.push('\n');
        }
        s += &counts_row("TOTAL", &reg.total);
        s.push('\n');
        if let Some(ctl) = &r.control {
            s += &counts_row("CONTROL", &ctl.total);
            s.push('\n');
        }
        s += &format!(
            "mean extraction strength: {}\n",
            fmt_opt(reg.total.mean_strength, 4)
        );
        if let Some(rate) = reg.total.sampled_rate {
            s += &format!(
                "sampled exact rate ({} samples, T={}, top-k {}): {rate:.4}\n",
                r.settings.samples, r.settings.temperature, r.settings.top_k
            );
        }
        if let Some(b) = &r.settings.bos {
            s += &format!(
                "bos: {} ({}, policy {})",
                b.id.map_or("none".to_string(), |i| i.to_string()),
                b.source,
                b.policy
            );
            if let (Some(t), Some(src)) = (b.empty_prompt_token, &b.empty_prompt_source) {
                s += &format!("; empty prompts use token {t} ({src})");
            }
            s.push('\n');
        }
    }
    if let Some(p) = &r.perplexity {
        s += &format!(
            "perplexity: all {} ({} tokens), non-sensitive {} ({}), sensitive {} ({})\n",
            fmt_opt(p.all.perplexity, 3),
            p.all.tokens,
            fmt_opt(p.non_sensitive.perplexity, 3),
            p.non_sensitive.tokens,
            fmt_opt(p.sensitive.perplexity, 3),
            p.sensitive.tokens
        );
    }
    let t = &r.timing;
    s += &format!(
        "time: {:.2}s ({} spans/s, {} generated tokens/s)\n",
        t.seconds,
        fmt_opt(t.spans_per_second, 1),
        fmt_opt(t.generated_tokens_per_second, 1)
    );
    match &r.gate {
        Some(g) => {
            s += &format!(
                "gate: {} ({})\n",
                if g.passed { "PASS" } else { "FAIL" },
                g.message
            )
        }
        None => s += "gate: none (no --max-rate or --max-count)\n",
    }
    s
}

fn rate_change(b: Option<&LabelCounts>, a: Option<&LabelCounts>) -> String {
    let cell = |c: Option<&LabelCounts>| {
        c.map_or("-".to_string(), |c| {
            format!("{}/{} {:.4}", c.exact, c.measured, c.exact_rate)
        })
    };
    let delta = match (b, a) {
        (Some(b), Some(a)) => format!("{:+.4}", a.exact_rate - b.exact_rate),
        _ => "-".to_string(),
    };
    format!("{:>18} -> {:>18} {:>9}", cell(b), cell(a), delta)
}

/// Side-by-side comparison of two reports.
pub fn render_compare(before: &EvalReport, after: &EvalReport) -> String {
    let mut s = String::new();
    let model = |r: &EvalReport| r.model.as_ref().map_or("-".to_string(), |m| m.path.clone());
    s += &format!("before: {}\nafter:  {}\n", model(before), model(after));
    s += &format!(
        "{:<16} {:>18}    {:>18} {:>9}\n",
        "exact", "before", "after", "delta"
    );
    let (rb, ra) = (before.regurgitation.as_ref(), after.regurgitation.as_ref());
    let mut labels: Vec<&String> = rb
        .iter()
        .chain(ra.iter())
        .flat_map(|r| r.per_label.keys())
        .collect();
    labels.sort();
    labels.dedup();
    for l in labels {
        s += &format!(
            "{l:<16} {}\n",
            rate_change(
                rb.and_then(|r| r.per_label.get(l)),
                ra.and_then(|r| r.per_label.get(l))
            )
        );
    }
    s += &format!(
        "{:<16} {}\n",
        "TOTAL",
        rate_change(rb.map(|r| &r.total), ra.map(|r| &r.total))
    );
    let (cb, ca) = (before.control.as_ref(), after.control.as_ref());
    if cb.is_some() || ca.is_some() {
        s += &format!(
            "{:<16} {}\n",
            "CONTROL",
            rate_change(cb.map(|r| &r.total), ca.map(|r| &r.total))
        );
    }
    let pair = |name: &str, b: Option<f64>, a: Option<f64>, prec: usize| {
        let d = match (b, a) {
            (Some(b), Some(a)) => format!("{:+.prec$}", a - b),
            _ => "-".to_string(),
        };
        format!(
            "{name:<16} {:>18} -> {:>18} {:>9}\n",
            fmt_opt(b, prec),
            fmt_opt(a, prec),
            d
        )
    };
    s += &pair(
        "partial rate",
        rb.map(|r| r.total.partial_rate),
        ra.map(|r| r.total.partial_rate),
        4,
    );
    s += &pair(
        "strength",
        rb.and_then(|r| r.total.mean_strength),
        ra.and_then(|r| r.total.mean_strength),
        4,
    );
    if rb.and_then(|r| r.total.sampled_rate).is_some()
        || ra.and_then(|r| r.total.sampled_rate).is_some()
    {
        s += &pair(
            "sampled rate",
            rb.and_then(|r| r.total.sampled_rate),
            ra.and_then(|r| r.total.sampled_rate),
            4,
        );
    }
    let (pb, pa) = (before.perplexity.as_ref(), after.perplexity.as_ref());
    if pb.is_some() || pa.is_some() {
        s += &pair(
            "ppl all",
            pb.and_then(|p| p.all.perplexity),
            pa.and_then(|p| p.all.perplexity),
            3,
        );
        s += &pair(
            "ppl non-sens.",
            pb.and_then(|p| p.non_sensitive.perplexity),
            pa.and_then(|p| p.non_sensitive.perplexity),
            3,
        );
        s += &pair(
            "ppl sensitive",
            pb.and_then(|p| p.sensitive.perplexity),
            pa.and_then(|p| p.sensitive.perplexity),
            3,
        );
    }
    s
}

/// One `--per-span` line.
pub fn per_span_json(r: &SpanResult, set: &str, show_text: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "set": set,
        "doc_id": r.doc_id,
        "label": r.label,
        "start": r.start,
        "end": r.end,
        "exact": r.exact,
        "partial": r.partial,
        "in_prompt": r.in_prompt,
        "strength": r.strength,
        "prompt_tokens": r.prompt_ids.len(),
        "span_tokens": r.span_ids.len(),
        "generated_tokens": r.generated_ids.len(),
    });
    let m = v.as_object_mut().expect("object");
    if let Some(se) = r.sampled_exact {
        m.insert("sampled_exact".into(), se.into());
    }
    if show_text {
        m.insert("span_text".into(), r.span_text.clone().into());
        m.insert("generated_text".into(), r.generated_text.clone().into());
    } else {
        m.insert(
            "span_sha256".into(),
            sha256_hex(r.span_text.as_bytes()).into(),
        );
        m.insert(
            "generated_sha256".into(),
            sha256_hex(r.generated_text.as_bytes()).into(),
        );
    }
    v
}

/// Reads a `--json` report back.
pub fn read_report(path: &Path) -> Result<EvalReport> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a sani eval JSON report", path.display()))
}
