//! Sharded evaluation: `sani eval --shard K/N` measures a deterministic share of the spans, and
//! `sani eval merge` combines the shards' JSON reports into the report, figures and gate verdict
//! of one unsharded run.
//!
//! A shard holds whole documents: the documents are split into N contiguous ranges of about
//! equal weight (spans for the sensitive and control files, characters for the perplexity file),
//! so concatenating the shards in order gives the file order. Every figure is computed from
//! per-span outcomes, per-window perplexity sums and per-span membership scores that a shard's
//! report carries in `shard`; randomness is drawn per span (sampling, membership fakes) and the
//! pools that fakes come from always hold the whole file, so a span gets the same outcome
//! whichever shard measures it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

use super::attacks::{AttackReport, AucOutcome, Membership};
use super::perplexity::{PerplexityParts, PplSums};
use super::regurgitation::{summarize_outcomes, BosInfo, RegurgitationSummary, SpanOutcome};
use super::report::{gate_of, EvalReport, GateLimits, Timing};
use super::vocabulary::VocabularyExposure;

/// Shard `index` of `count` (0-based, as Slurm's `--array=0-N-1` and Kubernetes'
/// `JOB_COMPLETION_INDEX`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| anyhow!("--shard {s:?}: expected K/N, e.g. 0/4"))?;
        let parse = |x: &str, what: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| anyhow!("--shard {s:?}: {what} {x:?} is not a whole number"))
        };
        let (index, count) = (parse(k, "K")?, parse(n, "N")?);
        if count == 0 {
            bail!("--shard {s:?}: N must be at least 1");
        }
        if index >= count {
            bail!(
                "--shard {s:?}: K must be in 0..={} (shards count from 0, as Kubernetes' \
                 JOB_COMPLETION_INDEX and Slurm's --array=0-{})",
                count - 1,
                count - 1
            );
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Which documents this shard holds, from each document's weight: N contiguous ranges, a
    /// document going to the range its weight's midpoint falls in (documents without weight
    /// are spread by position).
    pub fn select(&self, weights: &[usize]) -> Vec<bool> {
        let n = self.count as u128;
        let total: u128 = weights.iter().map(|&w| w as u128).sum();
        let mut before = 0u128;
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let shard = if total == 0 {
                    i as u128 * n / weights.len().max(1) as u128
                } else {
                    // Midpoint (before + w/2) scaled to 0..n, in integers.
                    ((2 * before + w as u128) * n / (2 * total)).min(n - 1)
                };
                before += w as u128;
                shard as usize == self.index
            })
            .collect()
    }
}

/// What a shard's report carries so that a merge can recompute every figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardPart {
    pub shard: Shard,
    /// Documents of the sensitive file this shard measured (of all of them).
    pub documents: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regurgitation: Option<Vec<SpanOutcome>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<Vec<SpanOutcome>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<Vec<PplSums>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<Vec<AucOutcome>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_membership: Option<Vec<AucOutcome>>,
}

/// One report per shard, in any order, combined into the report of one unsharded run (its
/// figures, and its gate under `gate`). Every shard must come from the same model and settings,
/// and every index of 0..N must be there once.
pub fn merge_reports(reports: Vec<(PathBuf, EvalReport)>, gate: &GateLimits) -> Result<EvalReport> {
    let Some((first_path, first)) = reports.first() else {
        bail!("eval merge: no reports given");
    };
    let part_of = |path: &PathBuf, r: &EvalReport| -> Result<ShardPart> {
        r.shard.clone().ok_or_else(|| {
            anyhow!(
                "{}: not a shard's report (no `shard` field); shards are written by \
                 `sani eval --shard K/N --json FILE`",
                path.display()
            )
        })
    };
    let count = part_of(first_path, first)?.shard.count;
    let mut slots: Vec<Option<(&PathBuf, &EvalReport, ShardPart)>> = vec![None; count];
    for (path, r) in &reports {
        let part = part_of(path, r)?;
        if part.shard.count != count {
            bail!(
                "{}: shard {} does not belong with {} (shard of {})",
                path.display(),
                part.shard,
                first_path.display(),
                count
            );
        }
        if let Some((other, ..)) = &slots[part.shard.index] {
            bail!(
                "{} and {}: both are shard {}",
                other.display(),
                path.display(),
                part.shard
            );
        }
        same_run(first_path, first, path, r)?;
        let index = part.shard.index;
        slots[index] = Some((path, r, part));
    }
    let missing: Vec<String> = (0..count)
        .filter(|&k| slots[k].is_none())
        .map(|k| format!("{k}/{count}"))
        .collect();
    if !missing.is_empty() {
        let (noun, verb) = if missing.len() == 1 {
            ("shard", "is")
        } else {
            ("shards", "are")
        };
        bail!(
            "eval merge: {noun} {} {verb} missing (every shard of 0..{count} must be given once)",
            missing.join(", ")
        );
    }
    let shards: Vec<(&EvalReport, ShardPart)> = slots
        .into_iter()
        .flatten()
        .map(|(_, r, p)| (r, p))
        .collect();
    let first = shards[0].0;

    let sampled = first.settings.samples > 0;
    let spans_of = |get: fn(&ShardPart) -> &Option<Vec<SpanOutcome>>,
                    summary: fn(&EvalReport) -> &Option<RegurgitationSummary>|
     -> Option<RegurgitationSummary> {
        summary(first).as_ref()?;
        let mut all: Vec<SpanOutcome> = shards
            .iter()
            .flat_map(|(_, p)| get(p).iter().flatten().cloned())
            .collect();
        all.sort_by_key(|o| (o.doc_index, o.span_index));
        let mut s = summarize_outcomes(&all, sampled);
        s.seconds = shards
            .iter()
            .filter_map(|(r, _)| summary(r).as_ref())
            .map(|s| s.seconds)
            .sum();
        Some(s)
    };
    let regurgitation = spans_of(|p| &p.regurgitation, |r| &r.regurgitation);
    let control = spans_of(|p| &p.control, |r| &r.control);
    let perplexity = first.perplexity.as_ref().map(|p0| {
        PerplexityParts {
            documents: shards
                .iter()
                .filter_map(|(r, _)| r.perplexity.as_ref())
                .map(|p| p.documents)
                .sum(),
            max_seq_len: p0.max_seq_len,
            bos: p0.bos,
            doc_separator: p0.doc_separator.clone(),
            windows: shards
                .iter()
                .flat_map(|(_, p)| p.perplexity.iter().flatten().cloned())
                .collect(),
        }
        .figures()
    });
    let vocabulary = |get: fn(&EvalReport) -> &Option<VocabularyExposure>| {
        get(first).as_ref()?;
        Some(
            shards
                .iter()
                .filter_map(|(r, _)| get(r).as_ref())
                .fold(VocabularyExposure::default(), |a, b| a.merged(b)),
        )
    };
    let attacks = match &first.attacks {
        None => None,
        Some(a0) => Some(merge_attacks(a0, &shards)?),
    };
    let sum = |f: fn(&Timing) -> f64| shards.iter().map(|(r, _)| f(&r.timing)).sum::<f64>();
    let n_spans: usize = regurgitation
        .iter()
        .chain(control.iter())
        .map(|s| s.total.n)
        .sum();
    let generated: usize = regurgitation
        .iter()
        .chain(control.iter())
        .map(|s| s.generated_tokens)
        .sum();
    let mut settings = first.settings.clone();
    settings.max_rate = gate.max_rate;
    settings.max_count = gate.max_count;
    settings.max_perplexity = gate.max_perplexity;
    if let Some(bos) = &mut settings.bos {
        let all: Vec<&BosInfo> = shards
            .iter()
            .filter_map(|(r, _)| r.settings.bos.as_ref())
            .collect();
        bos.bos_only_prompts = all.iter().map(|b| b.bos_only_prompts).sum();
        if let Some(b) = all.iter().find(|b| b.empty_prompt_token.is_some()) {
            bos.empty_prompt_token = b.empty_prompt_token;
            bos.empty_prompt_source = b.empty_prompt_source.clone();
        }
    }
    let keys: Vec<&Option<String>> = shards
        .iter()
        .map(|(r, _)| &r.settings.per_span_hash)
        .collect();
    if keys.iter().any(|k| *k != keys[0]) {
        settings.per_span_hash = Some(format!(
            "per shard: {}",
            keys.iter()
                .map(|k| k.as_deref().unwrap_or("none"))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let mut merged = EvalReport {
        sani_version: first.sani_version.clone(),
        model: first.model.clone(),
        settings,
        regurgitation,
        control,
        perplexity,
        vocabulary: vocabulary(|r| &r.vocabulary),
        control_vocabulary: vocabulary(|r| &r.control_vocabulary),
        gate: None,
        timing: Timing::of(
            sum(|t| t.seconds),
            sum(|t| t.regurgitation_seconds),
            sum(|t| t.perplexity_seconds),
            n_spans,
            generated,
        ),
        attacks,
        shard: None,
    };
    merged.gate = gate_of(&merged, gate);
    Ok(merged)
}

/// The attack suite's figures over all shards.
fn merge_attacks(a0: &AttackReport, shards: &[(&EvalReport, ShardPart)]) -> Result<AttackReport> {
    let suites: Vec<&AttackReport> = shards
        .iter()
        .map(|(r, _)| r.attacks.as_ref())
        .collect::<Option<_>>()
        .ok_or_else(|| anyhow!("eval merge: some shards ran the attack suite and some did not"))?;
    let mut rows = suites[0].attacks.clone();
    for suite in &suites[1..] {
        if suite.attacks.len() != rows.len()
            || suite
                .attacks
                .iter()
                .zip(&rows)
                .any(|(a, b)| a.attack != b.attack)
        {
            bail!("eval merge: the shards ran different attacks");
        }
        rows = rows
            .iter()
            .zip(&suite.attacks)
            .map(|(a, b)| a.merged(b))
            .collect();
    }
    let probe = |m0: &Option<Membership>,
                 get: fn(&ShardPart) -> &Option<Vec<AucOutcome>>|
     -> Option<Membership> {
        let m0 = m0.as_ref()?;
        let mut all: Vec<AucOutcome> = shards
            .iter()
            .flat_map(|(_, p)| get(p).iter().flatten().cloned())
            .collect();
        all.sort_by_key(|o| (o.doc_index, o.span_index));
        Some(Membership::of(m0.fakes, m0.fakes_from, &all))
    };
    Ok(AttackReport::assemble(
        a0.settings.clone(),
        rows,
        probe(&a0.membership, |p| &p.membership),
        probe(&a0.control_membership, |p| &p.control_membership),
        suites.iter().map(|s| s.seconds).sum(),
    ))
}

/// Checks that two shards measured the same model with the same settings.
fn same_run(pa: &Path, a: &EvalReport, pb: &Path, b: &EvalReport) -> Result<()> {
    let differs = |what: &str| {
        bail!(
            "{} and {}: not shards of one run ({what} differ)",
            pa.display(),
            pb.display()
        )
    };
    if a.model.as_ref().map(|m| &m.weights_sha256) != b.model.as_ref().map(|m| &m.weights_sha256) {
        return differs("the models' weights");
    }
    let comparable = |r: &EvalReport| {
        let mut s = r.settings.clone();
        s.per_span_hash = None;
        if let Some(b) = &mut s.bos {
            // Counts of the shard's own prompts.
            b.bos_only_prompts = 0;
            b.empty_prompt_token = None;
            b.empty_prompt_source = None;
        }
        s
    };
    if comparable(a) != comparable(b) {
        return differs("their settings");
    }
    if a.attacks.as_ref().map(|x| &x.settings) != b.attacks.as_ref().map(|x| &x.settings) {
        return differs("their attack settings");
    }
    let parts = |r: &EvalReport| {
        let p = r.shard.as_ref();
        (
            r.regurgitation.is_some() == p.is_some_and(|p| p.regurgitation.is_some()),
            r.control.is_some() == p.is_some_and(|p| p.control.is_some()),
            r.perplexity.is_some() == p.is_some_and(|p| p.perplexity.is_some()),
        )
    };
    if parts(a) != (true, true, true) || parts(b) != (true, true, true) {
        bail!(
            "{} or {}: a measurement without the per-span outcomes a merge needs",
            pa.display(),
            pb.display()
        );
    }
    if a.sani_version != b.sani_version {
        return differs("sani versions");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_documents_in_contiguous_balanced_ranges() {
        let weights = [3, 0, 5, 1, 1, 8, 2, 0, 4, 6];
        for n in 1..=12 {
            let picks: Vec<Vec<bool>> = (0..n)
                .map(|index| Shard { index, count: n }.select(&weights))
                .collect();
            let mut owner = Vec::new();
            for d in 0..weights.len() {
                let owners: Vec<usize> = picks
                    .iter()
                    .enumerate()
                    .filter_map(|(k, p)| p[d].then_some(k))
                    .collect();
                assert_eq!(owners.len(), 1, "document {d} in exactly one of {n} shards");
                owner.push(owners[0]);
            }
            assert!(
                owner.windows(2).all(|w| w[0] <= w[1]),
                "contiguous: {owner:?}"
            );
            if n == 2 {
                let first: usize = (0..weights.len())
                    .filter(|&d| owner[d] == 0)
                    .map(|d| weights[d])
                    .sum();
                assert!((10..=20).contains(&first), "balanced: {first} of 30");
            }
        }
        let empty = Shard { index: 1, count: 3 }.select(&[0, 0, 0, 0, 0, 0]);
        assert_eq!(empty, [false, false, true, true, false, false]);
    }

    #[test]
    fn parses_k_of_n_and_names_the_range() {
        assert_eq!(
            "2/4".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 4 }
        );
        let err = "4/4".parse::<Shard>().unwrap_err().to_string();
        assert!(err.contains("0..=3"), "{err}");
        assert!("1".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
        assert!("a/2".parse::<Shard>().is_err());
    }
}
