//! The eval report: its JSON form (`--json`, read back by `--compare`), the gate, the table and
//! the side-by-side comparison, and the `--per-span` lines.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::attacks::AttackReport;
use super::perplexity::Perplexity;
use super::regurgitation::{BosInfo, LabelCounts, RegurgitationSummary, SpanResult};
use super::shard::ShardPart;
use super::vocabulary::{VocabularyCounts, VocabularyExposure};
use crate::io::hash::SpanKey;

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
    /// The PEFT adapter merged into the weights (`--adapter-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<crate::io::peft::MergedAdapter>,
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
    #[serde(default)]
    pub max_perplexity: Option<f64>,
    /// With --per-span: how span text was hashed (HMAC-SHA-256, key source and key id).
    #[serde(default)]
    pub per_span_hash: Option<String>,
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

impl Timing {
    /// Timings of a run that measured `spans` spans and generated `generated` tokens.
    pub fn of(
        seconds: f64,
        regurgitation_seconds: f64,
        perplexity_seconds: f64,
        spans: usize,
        generated: usize,
    ) -> Timing {
        let per_s = |x: usize| {
            (regurgitation_seconds > 0.0 && spans > 0).then(|| x as f64 / regurgitation_seconds)
        };
        Timing {
            seconds,
            regurgitation_seconds,
            perplexity_seconds,
            spans_per_second: per_s(spans),
            generated_tokens_per_second: per_s(generated),
        }
    }
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
    /// Sensitive spans (and control spans) the tokenizer's vocabulary holds as tokens.
    #[serde(default)]
    pub vocabulary: Option<VocabularyExposure>,
    #[serde(default)]
    pub control_vocabulary: Option<VocabularyExposure>,
    pub gate: Option<GateReport>,
    pub timing: Timing,
    /// `--attacks`: the attack suite's figures (the gate then applies to its worst case).
    #[serde(default)]
    pub attacks: Option<AttackReport>,
    /// `--shard K/N`: which shard this is, and the per-span outcomes `sani eval merge` needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardPart>,
}

/// The gate's limits; a limit whose measurement is missing fails the gate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GateLimits {
    /// Highest total exact rate allowed (0..=1).
    pub max_rate: Option<f64>,
    /// Most spans reproduced exactly.
    pub max_count: Option<usize>,
    /// Highest perplexity on the held-out text (utility: a broken model fails).
    pub max_perplexity: Option<f64>,
    /// Highest membership AUC of the attack suite.
    pub max_auc: Option<f64>,
}

impl GateLimits {
    pub fn is_set(&self) -> bool {
        self.max_rate.is_some()
            || self.max_count.is_some()
            || self.max_perplexity.is_some()
            || self.max_auc.is_some()
    }
}

/// The gate of a report: its exact figures are the attack suite's worst case when the suite
/// ran, else the plain measurement's.
pub fn gate_of(r: &EvalReport, limits: &GateLimits) -> Option<GateReport> {
    let worst = r.attacks.as_ref().map(|a| LabelCounts {
        n: a.worst_total.measured,
        measured: a.worst_total.measured,
        exact: a.worst_total.hits,
        exact_rate: a.worst_total.rate,
        ..LabelCounts::default()
    });
    let total = worst
        .as_ref()
        .or(r.regurgitation.as_ref().map(|g| &g.total));
    let auc = r
        .attacks
        .as_ref()
        .and_then(|a| a.membership.as_ref())
        .and_then(|m| m.total.auc);
    let what = match &r.attacks {
        Some(a) => format!("worst-case exact ({})", a.worst_total.attack),
        None => "exact".to_string(),
    };
    gate(total, &what, r.perplexity.as_ref(), auc, limits)
}

/// Applies the limits to a report's measurements; None when no limit is set. Every limit must
/// hold; a NaN figure never passes. `what` names the exact figures ("exact", or the attack).
pub fn gate(
    total: Option<&LabelCounts>,
    what: &str,
    perplexity: Option<&Perplexity>,
    membership_auc: Option<f64>,
    limits: &GateLimits,
) -> Option<GateReport> {
    // One check: (passed, message); a limit whose figure is missing (or NaN) fails.
    let check = |what: &str, value: Option<f64>, shown: String, max: String, limit: f64| match value
    {
        Some(v) => {
            let passed = v <= limit;
            let op = if passed { "<=" } else { ">" };
            (passed, format!("{what} {shown} {op} max {max}"))
        }
        None => (false, format!("{what} not measured")),
    };
    let mut checks: Vec<(bool, String)> = Vec::new();
    if let Some(r) = limits.max_rate {
        let v = total.map(|t| t.exact_rate);
        let shown = format!("{:.4}", v.unwrap_or(0.0));
        checks.push(check(&format!("{what} rate"), v, shown, r.to_string(), r));
    }
    if let Some(n) = limits.max_count {
        let v = total.map(|t| t.exact);
        let shown = v.unwrap_or(0).to_string();
        checks.push(check(
            &format!("{what} count"),
            v.map(|x| x as f64),
            shown,
            n.to_string(),
            n as f64,
        ));
    }
    if let Some(max) = limits.max_perplexity {
        let v = perplexity.and_then(|p| p.all.perplexity);
        let shown = format!("{:.3}", v.unwrap_or(0.0));
        checks.push(check("perplexity", v, shown, max.to_string(), max));
    }
    if let Some(max) = limits.max_auc {
        let shown = format!("{:.3}", membership_auc.unwrap_or(0.0));
        checks.push(check(
            "membership AUC",
            membership_auc,
            shown,
            max.to_string(),
            max,
        ));
    }
    if checks.is_empty() {
        return None;
    }
    Some(GateReport {
        passed: checks.iter().all(|(p, _)| *p),
        message: checks
            .into_iter()
            .map(|(_, m)| m)
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// The tokenizer lines of the table: totals, the labels with any span held, the control.
fn render_vocabulary(v: &VocabularyExposure, control: Option<&VocabularyExposure>) -> String {
    let line = |c: &VocabularyCounts| {
        format!(
            "{} of {} single tokens, {} ({:.4}) made of whole-word tokens",
            c.single_token, c.spans, c.words_as_tokens, c.words_as_tokens_rate
        )
    };
    let mut s = format!("tokenizer vocabulary: {}", line(&v.total));
    if let Some(c) = control {
        s += &format!(" (control: {:.4})", c.total.words_as_tokens_rate);
    }
    s.push('\n');
    for (label, c) in v.per_label.iter().filter(|(_, c)| c.words_as_tokens > 0) {
        s += &format!("  {label:<14} {}\n", line(c));
    }
    if v.total.words_as_tokens > 0 {
        s += "  (tokenizer.json holds these strings whatever the weights; compare with the \
              control: above it, the tokenizer was likely trained on the sensitive text)\n";
    }
    s
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
        if let Some(a) = &m.adapter {
            s += &format!("{}\n", a.summary());
        }
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
            if let Some(sep) = &b.doc_separator {
                s += &format!("; document separator {sep:?} {:?}", b.doc_separator_ids);
            }
            if let (Some(t), Some(src)) = (b.empty_prompt_token, &b.empty_prompt_source) {
                s += &format!("; empty prompts use token {t} ({src})");
            }
            s.push('\n');
        }
    }
    if let Some(v) = &r.vocabulary {
        s += &render_vocabulary(v, r.control_vocabulary.as_ref());
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
    if let Some(a) = &r.attacks {
        s += &super::attacks::render_attacks(a, r.control.as_ref());
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
        None => s += "gate: none (no --max-rate, --max-count, --max-perplexity or --max-auc)\n",
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
/// One `--per-span` line: where the span is and how it fared; its text and the continuation
/// as keyed hashes under `key` (or as text with `--show-text`).
pub fn per_span_json(
    r: &SpanResult,
    set: &str,
    show_text: bool,
    key: &SpanKey,
) -> serde_json::Value {
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
            "span_hmac".into(),
            key.hmac_hex(r.span_text.as_bytes()).into(),
        );
        m.insert(
            "generated_hmac".into(),
            key.hmac_hex(r.generated_text.as_bytes()).into(),
        );
        m.insert("key_id".into(), key.key_id().into());
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
