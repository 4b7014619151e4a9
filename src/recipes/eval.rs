//! `sani eval`: regurgitation of the sensitive spans (and of a control set, the chance level),
//! perplexity on held-out text, the report (table, `--json`, `--per-span`) and the gate; or the
//! side-by-side comparison of two reports.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;

use crate::data::spans::{load_documents, SpanSources};
use crate::eval::attacks::{run_attacks, AttackSettings};
use crate::eval::perplexity::{perplexity_parts, DEFAULT_PPL_SEQ_LEN};
use crate::eval::regurgitation::{
    regurgitation, resolve_bos_info, RegurgitationSettings, SpanOutcome, SpanResult,
};
pub use crate::eval::report::GateLimits;
use crate::eval::report::{
    gate_of, per_span_json, read_report, render_compare, render_report, EvalReport, ModelInfo,
    ReportSettings, Timing, Verdict,
};
use crate::eval::shard::{merge_reports, ShardPart};
use crate::eval::vocabulary::vocabulary_exposure;
use crate::io::hash::SpanKey;
use crate::io::json;
use crate::io::staged::write_file_atomic;
use crate::model::Model;

/// What `sani eval` is asked to do, validated.
#[derive(Debug, Clone)]
pub enum EvalJob {
    /// Compare two `--json` reports (no model).
    Compare {
        before: PathBuf,
        after: PathBuf,
        gate: GateLimits,
    },
    Measure(Box<Measure>),
    /// Merge the JSON reports of shards (no model).
    Merge {
        reports: Vec<PathBuf>,
        gate: GateLimits,
        json: Option<PathBuf>,
    },
}

/// Measure a model.
#[derive(Debug, Clone)]
pub struct Measure {
    /// Model directory or cached hub repo id, and the adapter merged into it.
    pub model: crate::io::ModelSource,
    pub device: Device,
    pub quiet: bool,
    pub spans: SpanSources,
    /// Measure regurgitation of `spans`.
    pub regurgitation: bool,
    pub control: Option<PathBuf>,
    pub perplexity: Option<PathBuf>,
    pub settings: RegurgitationSettings,
    /// Perplexity window (None: the model's context, at most [`DEFAULT_PPL_SEQ_LEN`]).
    pub max_seq_len: Option<usize>,
    pub gate: GateLimits,
    pub json: Option<PathBuf>,
    pub per_span: Option<PathBuf>,
    /// Key of the per-span hashes (random per run unless the user gives one).
    pub span_key: SpanKey,
    pub show_text: bool,
    /// `--attacks`: the attack suite's settings (None: not run).
    pub attacks: Option<AttackSettings>,
}

fn path_str(p: &Option<PathBuf>) -> Option<String> {
    p.as_ref().map(|p| p.display().to_string())
}

fn compare(before: &Path, after: &Path, limits: &GateLimits) -> Result<Verdict> {
    let before = read_report(before)?;
    let after = read_report(after)?;
    print!("{}", render_compare(&before, &after));
    Ok(match gate_of(&after, limits) {
        Some(g) => {
            println!(
                "gate (after): {} ({})",
                if g.passed { "PASS" } else { "FAIL" },
                g.message
            );
            if g.passed {
                Verdict::Pass
            } else {
                Verdict::Fail
            }
        }
        None => Verdict::Pass,
    })
}

fn verdict_of(report: &EvalReport) -> Verdict {
    match &report.gate {
        Some(g) if !g.passed => Verdict::Fail,
        _ => Verdict::Pass,
    }
}

fn merge(paths: &[PathBuf], gate: &GateLimits, json: Option<&Path>) -> Result<Verdict> {
    let reports = paths
        .iter()
        .map(|p| Ok((p.clone(), read_report(p)?)))
        .collect::<Result<Vec<_>>>()?;
    let report = merge_reports(reports, gate)?;
    print!("{}", render_report(&report));
    if let Some(path) = json {
        json::write_json(path, &report)?;
    }
    Ok(verdict_of(&report))
}

/// Runs `sani eval`.
pub fn run(job: &EvalJob) -> Result<Verdict> {
    let m = match job {
        EvalJob::Compare {
            before,
            after,
            gate,
        } => return compare(before, after, gate),
        EvalJob::Merge {
            reports,
            gate,
            json,
        } => return merge(reports, gate, json.as_deref()),
        EvalJob::Measure(m) => m,
    };
    let started = Instant::now();
    // Inputs are checked before the (slow) model load.
    let docs = if m.regurgitation {
        Some(m.spans.load()?)
    } else {
        None
    };
    let control_docs = match &m.control {
        Some(p) => Some(load_documents(Some(p), None, None)?),
        None => None,
    };
    let ppl_docs = match &m.perplexity {
        Some(p) => {
            let docs = load_documents(Some(p), None, None)?;
            // A shard measures its share of the held-out documents too, by length.
            Some(match m.settings.shard {
                None => docs,
                Some(shard) => {
                    let keep = shard.select(
                        &docs
                            .iter()
                            .map(|d| d.text.chars().count())
                            .collect::<Vec<_>>(),
                    );
                    docs.into_iter()
                        .zip(keep)
                        .filter_map(|(d, k)| k.then_some(d))
                        .collect()
                }
            })
        }
        None => None,
    };
    let (ckpt, tok) = crate::io::open_model(&m.model, &m.device)?;
    let model = Model::load_frozen(&ckpt)?;
    let settings = &m.settings;
    let quiet = m.quiet;
    let mut reg = None;
    if let Some(docs) = &docs {
        if docs.iter().all(|d| d.spans.is_empty()) {
            bail!("no sensitive spans to measure in the sensitive file");
        }
        reg = Some(regurgitation(&model, &tok, docs, settings, quiet)?);
    }
    let ctl = match &control_docs {
        Some(d) => Some(regurgitation(&model, &tok, d, settings, quiet)?),
        None => None,
    };
    let ppl_started = Instant::now();
    let ppl = match &ppl_docs {
        Some(d) => {
            let framing = resolve_bos_info(
                &model,
                &tok,
                settings.bos,
                settings.doc_separator.as_deref(),
            )?
            .framing();
            let len = m
                .max_seq_len
                .unwrap_or(DEFAULT_PPL_SEQ_LEN.min(model.config.max_positions()));
            Some(perplexity_parts(
                &model,
                &tok,
                d,
                &framing,
                len,
                settings.batch_size,
            )?)
        }
        None => None,
    };
    let ppl_seconds = if ppl.is_some() {
        ppl_started.elapsed().as_secs_f64()
    } else {
        0.0
    };
    let reg_seconds: f64 = reg
        .iter()
        .chain(ctl.iter())
        .map(|r| r.summary.seconds)
        .sum();
    let n_spans: usize = reg.iter().chain(ctl.iter()).map(|r| r.spans.len()).sum();
    let gen_tokens: usize = reg
        .iter()
        .chain(ctl.iter())
        .map(|r| r.summary.generated_tokens)
        .sum();
    let attacks = match (&m.attacks, &docs) {
        (Some(a), Some(docs)) => Some(run_attacks(
            &ckpt,
            &model,
            &tok,
            docs,
            control_docs.as_deref(),
            settings,
            reg.as_ref(),
            a,
            quiet,
        )?),
        _ => None,
    };
    let mut report = EvalReport {
        sani_version: env!("CARGO_PKG_VERSION").to_string(),
        model: Some(ModelInfo {
            path: ckpt.dir.display().to_string(),
            architecture: model.config.architecture().to_string(),
            weights_sha256: ckpt.weights_sha256()?,
            adapter: ckpt.adapter.clone(),
        }),
        settings: ReportSettings {
            sensitive: path_str(&m.spans.sensitive),
            corpus: path_str(&m.spans.corpus),
            terms: path_str(&m.spans.terms),
            control: path_str(&m.control),
            perplexity_file: path_str(&m.perplexity),
            prefix_tokens: settings.prefix_tokens,
            max_new_tokens: settings.max_new_tokens,
            decoding: "greedy".to_string(),
            samples: settings.samples,
            temperature: settings.temperature,
            top_k: settings.top_k,
            seed: settings.seed,
            batch_size: settings.batch_size,
            max_seq_len: ppl.as_ref().map(|p| p.max_seq_len),
            bos: reg.as_ref().or(ctl.as_ref()).map(|r| r.bos.clone()),
            max_rate: m.gate.max_rate,
            max_count: m.gate.max_count,
            max_perplexity: m.gate.max_perplexity,
            per_span_hash: (m.per_span.is_some() && !m.show_text).then(|| {
                format!(
                    "hmac-sha256, key {} (id {})",
                    m.span_key.source,
                    m.span_key.key_id()
                )
            }),
        },
        regurgitation: reg.as_ref().map(|r| r.summary.clone()),
        control: ctl.as_ref().map(|r| r.summary.clone()),
        perplexity: ppl.as_ref().map(|p| p.figures()),
        vocabulary: reg.as_ref().map(|r| vocabulary_exposure(&tok, &r.spans)),
        control_vocabulary: ctl.as_ref().map(|r| vocabulary_exposure(&tok, &r.spans)),
        gate: None,
        timing: Timing::of(
            started.elapsed().as_secs_f64(),
            reg_seconds,
            ppl_seconds,
            n_spans,
            gen_tokens,
        ),
        shard: m.settings.shard.map(|shard| ShardPart {
            shard,
            documents: docs.as_ref().map_or(0, |d| {
                m.settings
                    .measured_documents(d)
                    .into_iter()
                    .filter(|&k| k)
                    .count()
            }),
            regurgitation: reg.as_ref().map(|r| outcomes(&r.spans)),
            control: ctl.as_ref().map(|r| outcomes(&r.spans)),
            perplexity: ppl.as_ref().map(|p| p.windows.clone()),
            membership: attacks
                .as_ref()
                .and_then(|a| a.membership.as_ref())
                .map(|m| m.outcomes.clone()),
            control_membership: attacks
                .as_ref()
                .and_then(|a| a.control_membership.as_ref())
                .map(|m| m.outcomes.clone()),
        }),
        attacks,
    };
    report.gate = gate_of(&report, &m.gate);
    let gate_report = report.gate.clone();
    print!("{}", render_report(&report));
    if let Some(path) = &m.json {
        json::write_json(path, &report)?;
    }
    if let Some(path) = &m.per_span {
        let mut out = String::new();
        for (set, r) in [("sensitive", &reg), ("control", &ctl)] {
            for s in r.iter().flat_map(|r| r.spans.iter()) {
                out += &serde_json::to_string(&per_span_json(s, set, m.show_text, &m.span_key))?;
                out.push('\n');
            }
        }
        write_file_atomic(path, out.as_bytes())?;
    }
    Ok(match gate_report {
        Some(g) if !g.passed => Verdict::Fail,
        _ => Verdict::Pass,
    })
}

fn outcomes(spans: &[SpanResult]) -> Vec<SpanOutcome> {
    spans.iter().map(SpanResult::outcome).collect()
}
