//! End to end, as a new user runs it: `sani demo --quick` trains a small GPT-2 on synthetic notes
//! until it memorizes them, sanitizes it with the default and the paper configuration, and
//! evaluates before and after. Regurgitation must be high before and low after (the default
//! config cuts exact regurgitation by at least 80%), held-out non-sensitive perplexity must rise
//! by less than 15%, and every output must be a loadable model with its reports.

use std::path::Path;
use std::process::Command;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn exact_rate(report: &serde_json::Value, set: &str) -> f64 {
    report[set]["total"]["exact_rate"]
        .as_f64()
        .unwrap_or_else(|| panic!("no {set}.total.exact_rate in {report}"))
}

fn ppl_non_sensitive(report: &serde_json::Value) -> f64 {
    report["perplexity"]["non_sensitive"]["perplexity"]
        .as_f64()
        .expect("perplexity")
}

#[test]
fn quick_demo_memorizes_then_sanitizes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let status = Command::new(env!("CARGO_BIN_EXE_sani"))
        .args(["demo", "--quick", "--quiet", "--out", out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let before = json(&out.join("eval_before.json"));
    let after = json(&out.join("eval_after.json"));
    let paper = json(&out.join("eval_paper.json"));
    let (b, a, p) = (
        exact_rate(&before, "regurgitation"),
        exact_rate(&after, "regurgitation"),
        exact_rate(&paper, "regurgitation"),
    );
    let control = exact_rate(&before, "control");
    let (ppl_b, ppl_a) = (ppl_non_sensitive(&before), ppl_non_sensitive(&after));
    eprintln!(
        "exact regurgitation: before {b:.3}, default sanitize {a:.3}, paper config {p:.3}; control {control:.3}; \
         held-out non-sensitive perplexity {ppl_b:.3} -> {ppl_a:.3}"
    );
    assert!(
        b >= 0.5,
        "the demo model must memorize most identifiers (exact rate {b})"
    );
    assert!(
        a <= 0.2 * b,
        "the default config must cut exact regurgitation by >= 80% ({b} -> {a})"
    );
    assert!(
        ppl_a < 1.15 * ppl_b,
        "non-sensitive perplexity must rise by < 15% ({ppl_b} -> {ppl_a})"
    );
    for model in ["med-gpt", "med-gpt-sanitized", "med-gpt-paper"] {
        let dir = out.join(model);
        let ckpt = sani::io::checkpoint::Checkpoint::load(&dir, &candle_core::Device::Cpu).unwrap();
        sani::model::Model::load_frozen(&ckpt).unwrap();
        assert!(dir.join("tokenizer.json").is_file());
    }
    // The attack suite ran on the sanitized model: every attack, and the worst case over them.
    let attacks = &after["attacks"];
    let rows = attacks["attacks"].as_array().unwrap();
    assert_eq!(rows.len(), 4 + 2 + 4, "{rows:?}");
    let worst = attacks["worst_total"]["rate"].as_f64().unwrap();
    for r in rows {
        assert!(r["total"]["rate"].as_f64().unwrap() <= worst);
    }
    assert!(
        worst >= a,
        "worst case {worst} below the plain greedy rate {a}"
    );
    let after_auc = attacks["membership"]["total"]["auc"].as_f64().unwrap();
    let after_chance = attacks["control_membership"]["total"]["auc"]
        .as_f64()
        .unwrap();
    // The membership probe (true span against fakes of its label, and the same on never-seen
    // control spans) on the memorizing model, and on a model that never saw these notes.
    let probe = |model: &str, gate: &[&str]| {
        let path = tmp.path().join("probe.json");
        let status = Command::new(env!("CARGO_BIN_EXE_sani"))
            .current_dir(&out)
            .args([
                "eval",
                "--model",
                model,
                "--sensitive",
                "notes.jsonl",
                "--control",
                "heldout.jsonl",
                "--attacks",
                "--prefix-tokens",
                "256",
                "--attack-prefixes",
                "whole",
                "--attack-samples",
                "0",
                "--attack-quantize",
                "int4",
                "--quiet",
                "--json",
                path.to_str().unwrap(),
            ])
            .args(gate)
            .status()
            .unwrap();
        let r = json(&path);
        let auc = |k: &str| r["attacks"][k]["total"]["auc"].as_f64().unwrap();
        (
            status.code(),
            auc("membership"),
            auc("control_membership"),
            r,
        )
    };
    let (code, mem, chance, r) = probe("med-gpt", &["--max-auc", "0.6"]);
    assert_eq!(code, Some(1), "a memorizing model fails --max-auc 0.6");
    assert!(r["gate"]["message"]
        .as_str()
        .unwrap()
        .contains("membership AUC"));
    let fresh_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2_f32");
    let (_, fresh, _, _) = probe(fresh_dir.to_str().unwrap(), &[]);
    eprintln!(
        "membership AUC: memorizing {mem:.3} (control {chance:.3}), sanitized {after_auc:.3} \
         (control {after_chance:.3}), fresh {fresh:.3}"
    );
    assert!(mem > 0.85, "memorizing model: membership AUC {mem}");
    // The fakes are other notes' values of the same label: never-seen spans are no likelier
    // than them (chance is about 0.5), memorized spans stand far above.
    assert!(
        (0.35..0.65).contains(&chance),
        "memorizing model, control spans: membership AUC {chance}"
    );
    assert!(mem > chance + 0.2, "memorizing {mem} vs control {chance}");
    assert!(
        (0.35..0.65).contains(&fresh),
        "fresh model: membership AUC {fresh}"
    );
    let report = json(&out.join("med-gpt-sanitized/sani_report.json"));
    assert!(!report["epochs"].as_array().unwrap().is_empty());
    assert!(out.join("notes.jsonl").is_file() && out.join("heldout.jsonl").is_file());
    sharded_eval_merges_into_the_unsharded_report(&out);
}

/// Drops every timing from a report, so that two runs of the same measurement compare equal.
fn without_timings(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| k != "seconds" && k != "timing");
            m.values_mut().for_each(without_timings);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(without_timings),
        _ => {}
    }
}

/// `sani eval --shard K/N` on the memorizing model (so spans are reproduced, sampled and
/// probed), then `sani eval merge`: the same JSON as one unsharded run apart from timings, and
/// the same gate verdict.
fn sharded_eval_merges_into_the_unsharded_report(out: &Path) {
    let eval = |extra: &[&str], json_name: &str| {
        let status = Command::new(env!("CARGO_BIN_EXE_sani"))
            .current_dir(out)
            .args([
                "eval",
                "--model",
                "med-gpt",
                "--sensitive",
                "notes.jsonl",
                "--control",
                "heldout.jsonl",
                "--perplexity",
                "heldout.jsonl",
                "--samples",
                "2",
                "--attacks",
                "--attack-prefixes",
                "8,whole",
                "--attack-samples",
                "2",
                "--attack-quantize",
                "int4",
                "--quiet",
                "--json",
                json_name,
            ])
            .args(extra)
            .status()
            .unwrap();
        status.code()
    };
    assert_eq!(eval(&["--max-rate", "0.03"], "whole.json"), Some(1));
    let shards: Vec<String> = (0..3).map(|k| format!("shard{k}.json")).collect();
    for (k, name) in shards.iter().enumerate() {
        assert_eq!(eval(&["--shard", &format!("{k}/3")], name), Some(0));
    }
    let sizes: Vec<u64> = shards
        .iter()
        .map(|s| {
            json(&out.join(s))["regurgitation"]["total"]["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let whole = json(&out.join("whole.json"));
    assert_eq!(
        sizes.iter().sum::<u64>(),
        whole["regurgitation"]["total"]["n"].as_u64().unwrap()
    );
    assert!(
        sizes.iter().all(|&n| n > 0),
        "every shard measures spans: {sizes:?}"
    );
    let merge = Command::new(env!("CARGO_BIN_EXE_sani"))
        .current_dir(out)
        .args(["eval", "merge", &shards[2], &shards[0], &shards[1]])
        .args(["--max-rate", "0.03", "--json", "merged.json"])
        .output()
        .unwrap();
    assert_eq!(merge.status.code(), Some(1), "{merge:?}");
    let (mut a, mut b) = (whole, json(&out.join("merged.json")));
    assert!(
        a["regurgitation"]["total"]["exact"].as_u64().unwrap() > 0
            && a["attacks"]["membership"]["total"]["auc"].as_f64().unwrap() > 0.6,
        "the memorizing model gives figures worth merging"
    );
    without_timings(&mut a);
    without_timings(&mut b);
    assert_eq!(a, b, "merged shards differ from the unsharded run");
}
