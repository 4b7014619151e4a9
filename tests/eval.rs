//! `sani eval`: regurgitation metrics on the tiny fixture models, reports, compare, gate and exit codes.

mod common;

use candle_core::Device;
use clap::Parser;
use common::*;
use rand::SeedableRng;
use sani::cli::eval::{self as cli_eval, EvalArgs};
use sani::data::spans::{Document, Span};
use sani::data::tokens::{BosPolicy, Framing};
use sani::eval::{self, EvalReport, RegurgitationSettings, Verdict};
use sani::io::checkpoint::Checkpoint;
use sani::model::generate::{generate, GenerateOptions};
use sani::model::Model;
use std::path::{Path, PathBuf};
use std::process::Command;
use tokenizers::Tokenizer;

fn load(name: &str) -> (Model, Tokenizer) {
    let ckpt = Checkpoint::load(&fixture(name), &Device::Cpu).unwrap();
    (
        Model::load_frozen(&ckpt).unwrap(),
        sani::io::load_tokenizer(&fixture(name)).unwrap(),
    )
}

fn sp(start: usize, end: usize, label: &str) -> Span {
    Span {
        start,
        end,
        label: label.into(),
    }
}

fn doc(id: &str, text: &str, spans: Vec<Span>) -> Document {
    Document {
        id: id.into(),
        text: text.into(),
        spans,
    }
}

fn write_docs(path: &Path, docs: &[Document]) {
    let text: String = docs
        .iter()
        .map(|d| serde_json::to_string(d).unwrap() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    args: EvalArgs,
}

fn parse(args: &[&str]) -> EvalArgs {
    Wrap::try_parse_from(std::iter::once("eval").chain(args.iter().copied()))
        .unwrap()
        .args
}

/// A document whose span is exactly what gpt2_f32 greedily generates after its prefix.
fn memorized_doc(model: &Model, tok: &Tokenizer) -> Document {
    let prefixes = [
        "Patient record of the clinic:",
        "The patient was seen by",
        "Name:",
        "The chart says that",
        "Record number",
        "Dr.",
    ];
    for p in prefixes {
        // No BOS: the fixtures' tokenizers add none, so `--bos auto` puts none.
        let prompt = tok.encode(p, false).unwrap().get_ids().to_vec();
        let opts = GenerateOptions {
            max_new_tokens: vec![6],
            stop_tokens: vec![0],
            pad_id: 0,
            sampling: None,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let out = generate(model, &[prompt], &opts, &mut rng).unwrap();
        let cont = tok.decode(&out[0], true).unwrap();
        let trimmed = cont.trim();
        if trimmed.is_empty() || cont.contains('\u{fffd}') || p.contains(trimmed) {
            continue;
        }
        let lead = cont.chars().count() - cont.trim_start().chars().count();
        let start = p.chars().count() + lead;
        let end = start + trimmed.chars().count();
        let text = format!("{p}{cont}");
        let d = doc("mem", &text, vec![sp(start, end, "NAME")]);
        let r = eval::regurgitation(
            model,
            tok,
            std::slice::from_ref(&d),
            &RegurgitationSettings::default(),
            true,
        )
        .unwrap();
        if r.spans[0].exact && !r.spans[0].in_prompt {
            return d;
        }
    }
    panic!("no prefix gave a reproducible greedy continuation");
}

#[test]
fn span_at_document_start_is_bos_only() {
    let (model, tok) = load("gpt2_f32");
    let docs = vec![doc(
        "a",
        "John Smith visited the clinic.",
        vec![sp(0, 10, "NAME")],
    )];
    let always = RegurgitationSettings {
        bos: BosPolicy::Always,
        ..Default::default()
    };
    let r = eval::regurgitation(&model, &tok, &docs, &always, true).unwrap();
    let s = &r.spans[0];
    assert_eq!(s.prompt_ids, vec![0], "prompt is the BOS only");
    assert_eq!(r.bos.id, Some(0));
    assert_eq!(r.bos.source, "config");
    assert_eq!(r.bos.bos_only_prompts, 1);
    assert!(!s.in_prompt);
    assert!(!s.span_ids.is_empty());
    assert_eq!(s.max_new_tokens, s.span_ids.len() + 4);
    assert!((0.0..=1.0).contains(&s.strength));
    assert_eq!(r.summary.total.n, 1);
    assert_eq!(r.summary.total.measured, 1);

    // A document separator follows the BOS (here: none, as the tokenizer adds none).
    let sep = RegurgitationSettings {
        doc_separator: Some("<|endoftext|>".into()),
        ..Default::default()
    };
    let r = eval::regurgitation(&model, &tok, &docs, &sep, true).unwrap();
    let sep_id = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!((r.bos.id, r.bos.source.as_str()), (None, "none"));
    assert_eq!(r.bos.doc_separator_ids, vec![sep_id]);
    assert_eq!(r.spans[0].prompt_ids, vec![sep_id]);
    assert_eq!(r.bos.empty_prompt_token, None);

    // Without a BOS (auto: the tokenizer adds none), the prompt falls back to the config's EOS
    // and says so.
    for policy in [BosPolicy::Auto, BosPolicy::Never] {
        let settings = RegurgitationSettings {
            bos: policy,
            ..Default::default()
        };
        let r = eval::regurgitation(&model, &tok, &docs, &settings, true).unwrap();
        assert_eq!(r.bos.id, None);
        assert_eq!(r.spans[0].prompt_ids, vec![0]);
    }
    let never = RegurgitationSettings {
        bos: BosPolicy::Never,
        ..Default::default()
    };
    let r = eval::regurgitation(&model, &tok, &docs, &never, true).unwrap();
    assert_eq!(r.bos.id, None);
    assert_eq!(r.spans[0].prompt_ids, vec![0]);
    assert_eq!(r.bos.empty_prompt_token, Some(0));
    assert!(r
        .bos
        .empty_prompt_source
        .as_deref()
        .unwrap()
        .contains("eos"));
}

#[test]
fn long_document_prompt_cut_from_left() {
    let (model, tok) = load("gpt2_f32");
    let filler = "the patient went for a walk and the weather was nice. ".repeat(12);
    let text = format!("{filler}Seen by Ana Lima today.");
    let start = filler.chars().count() + 8;
    let docs = vec![doc("long", &text, vec![sp(start, start + 8, "NAME")])];
    let before = tok
        .encode(&text[..filler.len() + 8], false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(
        before.len() > 64,
        "document longer than the context ({} tokens)",
        before.len()
    );
    let settings = RegurgitationSettings {
        prefix_tokens: 1000,
        ..Default::default()
    };
    let r = eval::regurgitation(&model, &tok, &docs, &settings, true).unwrap();
    let s = &r.spans[0];
    assert!(
        s.prompt_ids.len() + s.max_new_tokens <= 64,
        "{} + {}",
        s.prompt_ids.len(),
        s.max_new_tokens
    );
    assert_eq!(
        s.prompt_ids.len() + s.max_new_tokens,
        64,
        "uses the whole context"
    );
    // The prompt starts mid-document, so it gets no BOS (training put one only before the
    // document's first token).
    assert_ne!(s.prompt_ids[0], 0, "no BOS mid-document");
    let kept = &s.prompt_ids[..];
    assert_eq!(
        kept,
        &before[before.len() - kept.len()..],
        "the tokens right before the span"
    );

    // K tokens when K is smaller than the room.
    let settings = RegurgitationSettings {
        prefix_tokens: 5,
        ..Default::default()
    };
    let r = eval::regurgitation(&model, &tok, &docs, &settings, true).unwrap();
    assert_eq!(
        r.spans[0].prompt_ids.len(),
        5,
        "K tokens, no BOS mid-document"
    );
}

#[test]
fn in_prompt_spans_are_counted_apart() {
    let (model, tok) = load("gpt2_f32");
    let text = "Ana Lima called. Later Ana Lima came back.";
    let docs = vec![doc("a", text, vec![sp(0, 8, "NAME"), sp(23, 31, "NAME")])];
    let r =
        eval::regurgitation(&model, &tok, &docs, &RegurgitationSettings::default(), true).unwrap();
    assert!(!r.spans[0].in_prompt);
    assert!(r.spans[1].in_prompt);
    let t = &r.summary.total;
    assert_eq!((t.n, t.measured, t.in_prompt), (2, 1, 1));
    assert!(t.exact <= 1);
}

#[test]
fn memorized_span_is_exact_and_fully_extractable() {
    let (model, tok) = load("gpt2_f32");
    let d = memorized_doc(&model, &tok);
    let r = eval::regurgitation(
        &model,
        &tok,
        std::slice::from_ref(&d),
        &RegurgitationSettings::default(),
        true,
    )
    .unwrap();
    let s = &r.spans[0];
    assert!(s.exact && s.partial);
    assert_eq!(s.strength, 1.0);
    assert_eq!(r.summary.total.exact, 1);
    assert_eq!(r.summary.total.exact_rate, 1.0);
    assert_eq!(r.summary.per_label["NAME"].exact, 1);

    // Sampling: greedy-like sampling (top-k 1) reproduces it too.
    let settings = RegurgitationSettings {
        samples: 2,
        top_k: 1,
        ..Default::default()
    };
    let r = eval::regurgitation(&model, &tok, &[d], &settings, true).unwrap();
    assert_eq!(r.spans[0].sampled_exact, Some(true));
    assert_eq!(r.summary.total.sampled_rate, Some(1.0));
}

#[test]
fn perplexity_splits_sensitive_tokens() {
    let (model, tok) = load("llama_gqa");
    let text = "Patient John Smith visited the clinic on Monday. ".repeat(4);
    let docs = vec![doc("p", &text, vec![sp(8, 18, "NAME")])];
    let p = eval::perplexity(&model, &tok, &docs, &Framing::bos_only(Some(0)), 32, 4).unwrap();
    let n = tok.encode(text.as_str(), false).unwrap().get_ids().len();
    assert!(p.windows >= 2);
    assert_eq!(p.max_seq_len, 32);
    assert_eq!(
        p.all.tokens,
        n + 1 - p.windows,
        "every token but each window's first"
    );
    assert!(p.sensitive.tokens > 0);
    assert_eq!(p.sensitive.tokens + p.non_sensitive.tokens, p.all.tokens);
    let all = p.all.perplexity.unwrap();
    assert!(all.is_finite() && all > 1.0);
    // a random model over a 320-token vocabulary: near uniform
    assert!(all < 1000.0, "{all}");
    // batching does not change the result
    let q = eval::perplexity(&model, &tok, &docs, &Framing::bos_only(Some(0)), 32, 1).unwrap();
    assert!((q.all.mean_nll.unwrap() - p.all.mean_nll.unwrap()).abs() < 1e-4);
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    spans: PathBuf,
}

fn setup() -> Setup {
    let (model, tok) = load("gpt2_f32");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut docs = vec![memorized_doc(&model, &tok)];
    docs.push(doc(
        "b",
        "Record number 55512 was filed by Dr. Ana Lima yesterday.",
        vec![sp(14, 19, "ID"), sp(37, 45, "NAME")],
    ));
    let spans = dir.join("spans.jsonl");
    write_docs(&spans, &docs);
    Setup {
        _dir: tmp,
        dir,
        spans,
    }
}

#[test]
fn reports_per_span_and_compare_through_the_library() {
    let s = setup();
    let model = fixture("gpt2_f32");
    let (m, sp_, json, per) = (
        model.to_str().unwrap(),
        s.spans.to_str().unwrap(),
        s.dir.join("r.json"),
        s.dir.join("per.jsonl"),
    );
    let control = s.dir.join("control.jsonl");
    write_docs(
        &control,
        &[doc(
            "c",
            "Visitor Zoe Muller signed in at noon.",
            vec![sp(8, 18, "NAME")],
        )],
    );
    let args = parse(&[
        "--model",
        m,
        "--sensitive",
        sp_,
        "--control",
        control.to_str().unwrap(),
        "--perplexity",
        control.to_str().unwrap(),
        "--regurgitation",
        "--json",
        json.to_str().unwrap(),
        "--per-span",
        per.to_str().unwrap(),
        "--quiet",
        "--max-count",
        "5",
    ]);
    assert_eq!(cli_eval::run(&args).unwrap(), Verdict::Pass);
    let report: EvalReport =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report.sani_version, env!("CARGO_PKG_VERSION"));
    let mi = report.model.as_ref().unwrap();
    assert_eq!(mi.weights_sha256.len(), 64);
    let reg = report.regurgitation.as_ref().unwrap();
    assert_eq!(reg.total.n, 3);
    assert!(reg.total.exact >= 1);
    assert!(reg.per_label.contains_key("ID") && reg.per_label.contains_key("NAME"));
    assert_eq!(report.control.as_ref().unwrap().total.n, 1);
    assert!(report.perplexity.as_ref().unwrap().all.perplexity.is_some());
    assert_eq!(report.settings.prefix_tokens, 32);
    assert_eq!(report.settings.bos.as_ref().unwrap().id, None); // auto: the tokenizer adds none
    assert!(report.gate.as_ref().unwrap().passed);
    assert!(report.timing.seconds > 0.0);
    // raw JSON field names
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for k in [
        "sani_version",
        "model",
        "settings",
        "regurgitation",
        "control",
        "perplexity",
        "gate",
        "timing",
    ] {
        assert!(raw.get(k).is_some(), "missing {k}");
    }
    assert!(raw["timing"]["spans_per_second"].is_number());

    // per-span: hashes, no text
    let per_text = std::fs::read_to_string(&per).unwrap();
    let lines: Vec<serde_json::Value> = per_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert!(
        !per_text.contains("55512") && !per_text.contains("Ana Lima"),
        "{per_text}"
    );
    for l in &lines {
        for k in [
            "doc_id",
            "label",
            "start",
            "end",
            "exact",
            "partial",
            "in_prompt",
            "strength",
            "span_hmac",
            "generated_hmac",
            "key_id",
        ] {
            assert!(l.get(k).is_some(), "missing {k} in {l}");
        }
        assert!(l.get("span_text").is_none() && l.get("generated_text").is_none());
    }
    assert_eq!(lines[3]["set"], "control");

    // --show-text
    let args = parse(&[
        "--model",
        m,
        "--sensitive",
        sp_,
        "--per-span",
        per.to_str().unwrap(),
        "--show-text",
        "-q",
    ]);
    assert_eq!(cli_eval::run(&args).unwrap(), Verdict::Pass);
    let per_text = std::fs::read_to_string(&per).unwrap();
    assert!(per_text.contains("\"span_text\":\"55512\"") && per_text.contains("Ana Lima"));
    assert!(!per_text.contains("span_hmac"));

    // compare, without a model
    let after = s.dir.join("after.json");
    let mut r2 = report.clone();
    r2.regurgitation.as_mut().unwrap().total.exact_rate = 0.0;
    std::fs::write(&after, serde_json::to_string(&r2).unwrap()).unwrap();
    let before_s = eval::report::render_compare(&report, &r2);
    assert!(
        before_s.contains("TOTAL") && before_s.contains("CONTROL") && before_s.contains("ppl all"),
        "{before_s}"
    );
    let args = parse(&["--compare", json.to_str().unwrap(), after.to_str().unwrap()]);
    assert_eq!(cli_eval::run(&args).unwrap(), Verdict::Pass);

    // errors
    let err = cli_eval::run(&parse(&["--sensitive", sp_]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--model"), "{err}");
    let err = cli_eval::run(&parse(&[
        "--model",
        m,
        "--sensitive",
        sp_,
        "--max-rate",
        "1.5",
    ]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("--max-rate"), "{err}");
    assert!(Wrap::try_parse_from([
        "eval",
        "--model",
        m,
        "--max-rate",
        "0.1",
        "--max-count",
        "1"
    ])
    .is_err());
    let err = format!(
        "{:#}",
        cli_eval::run(&parse(&[
            "--model",
            s.dir.to_str().unwrap(),
            "--sensitive",
            sp_
        ]))
        .unwrap_err()
    );
    assert!(!err.is_empty());
}

fn sani(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sani"))
        .arg("eval")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_exit_codes() {
    let s = setup();
    let model = fixture("gpt2_f32");
    let (m, sp_) = (model.to_str().unwrap(), s.spans.to_str().unwrap());

    let (code, out, err) = sani(&["--model", m, "--sensitive", sp_, "--max-rate", "1.0", "-q"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("gate: PASS"), "{out}");
    assert!(out.contains("TOTAL"), "{out}");

    let json = s.dir.join("r.json");
    let (code, out, err) = sani(&[
        "--model",
        m,
        "--sensitive",
        sp_,
        "--max-count",
        "0",
        "-q",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("gate: FAIL"), "{out}");

    let (code, out, _) = sani(&["--compare", json.to_str().unwrap(), json.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("TOTAL") && out.contains("->"), "{out}");

    // no gate: pass
    let (code, _, _) = sani(&["--model", m, "--sensitive", sp_, "-q"]);
    assert_eq!(code, 0);

    // The attack suite: its gate reads the worst case, and its flags are checked.
    let (code, out, err) = sani(&[
        "--model",
        m,
        "--sensitive",
        sp_,
        "--attacks",
        "--attack-samples",
        "1",
        "--attack-prefixes",
        "8,whole",
        "--attack-quantize",
        "int8",
        "--max-rate",
        "1.0",
        "--max-auc",
        "1.0",
        "-q",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("WORST TOTAL") && out.contains("worst-case exact"),
        "{out}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let names: Vec<&str> = r["attacks"]["attacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["attack"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2 + 2 + 1, "{names:?}");
    assert!(names.iter().any(|n| n.contains("whole")) && names.iter().any(|n| n.contains("int8")));
    for (flags, wanted) in [
        (
            vec!["--attacks", "--attack-prefixes", "8,0"],
            "--attack-prefixes",
        ),
        (
            vec!["--attacks", "--attack-quantize", "int3"],
            "--attack-quantize",
        ),
        (vec!["--attacks", "--max-auc", "1.5"], "--max-auc"),
    ] {
        let mut args = vec!["--model", m, "--sensitive", sp_, "-q"];
        args.extend(flags);
        let (code, _, err) = sani(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(wanted), "{args:?}: {err}");
    }
    // --max-auc without the suite is refused.
    let (code, _, err) = sani(&["--model", m, "--sensitive", sp_, "--max-auc", "0.6", "-q"]);
    assert_eq!(code, 2);
    assert!(err.contains("--attacks"), "{err}");

    // Shards: bad specs and a gate on a shard exit 2; merge names what is wrong.
    for (flags, wanted) in [
        (vec!["--shard", "2/2"], "0..=1"),
        (vec!["--shard", "1"], "K/N"),
        (vec!["--shard", "0/2", "--max-rate", "0.1"], "eval merge"),
    ] {
        let mut args = vec!["--model", m, "--sensitive", sp_, "-q"];
        args.extend(flags);
        let (code, _, err) = sani(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(wanted), "{args:?}: {err}");
    }
    let shard_json = |k: usize| s.dir.join(format!("shard{k}.json"));
    for k in 0..2 {
        let spec = format!("{k}/2");
        let path = shard_json(k);
        let (code, _, err) = sani(&[
            "--model",
            m,
            "--sensitive",
            sp_,
            "--shard",
            &spec,
            "-q",
            "--json",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
    }
    let (s0, s1) = (shard_json(0), shard_json(1));
    let (s0, s1, whole) = (
        s0.to_str().unwrap(),
        s1.to_str().unwrap(),
        json.to_str().unwrap(),
    );
    for (reports, wanted) in [
        (vec![s0], "1/2 is missing"),
        (vec![s0, s1, s1], "both are shard 1/2"),
        (vec![s0, whole], "not a shard's report"),
    ] {
        let mut args = vec!["merge"];
        args.extend(reports);
        let (code, _, err) = sani(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(wanted), "{args:?}: {err}");
    }
    let (code, out, err) = sani(&["merge", s1, s0, "--max-rate", "1.0"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gate: PASS"), "{out}");

    // bad spans file: exit 2 with file:line
    let bad = s.dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"a\", \"text\": \"abc\"}\n{\"id\": \"b\", \"text\": \n",
    )
    .unwrap();
    let (code, _, err) = sani(&["--model", m, "--sensitive", bad.to_str().unwrap(), "-q"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad.jsonl:2:"), "{err}");

    // unreadable model, missing tokenizer, bad --max-rate, conflicting gates
    let (code, _, err) = sani(&[
        "--model",
        s.dir.join("nope").to_str().unwrap(),
        "--sensitive",
        sp_,
        "-q",
    ]);
    assert_eq!(code, 2, "{err}");
    let no_tok = s.dir.join("no_tok");
    std::fs::create_dir(&no_tok).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), no_tok.join(f)).unwrap();
    }
    let (code, _, err) = sani(&[
        "--model",
        no_tok.to_str().unwrap(),
        "--sensitive",
        sp_,
        "-q",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tokenizer.json"), "{err}");
    let (code, _, err) = sani(&["--model", m, "--sensitive", sp_, "--max-rate=-0.1", "-q"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = sani(&[
        "--model",
        m,
        "--sensitive",
        sp_,
        "--max-rate",
        "0.5",
        "--max-count",
        "1",
    ]);
    assert_eq!(code, 2, "clap error");
}

/// Rows stop decoding once their outcome is decided: the output is a prefix of plain greedy
/// decoding to `max_new_tokens`, and the figures are those of the whole continuation.
#[test]
fn early_decided_rows_give_the_figures_of_full_decoding() {
    let docs = sani::data::synth::generate_notes(&sani::data::synth::SynthConfig {
        n_notes: 3,
        seed: 5,
        id_prefix: "n".into(),
    });
    for name in ["gpt2_f32", "llama_gqa"] {
        let (model, tok) = load(name);
        let mut docs = docs.clone();
        // One span the model reproduces, so positive outcomes are covered too.
        docs.push(memorized_doc(&model, &tok));
        let r = eval::regurgitation(&model, &tok, &docs, &RegurgitationSettings::default(), true)
            .unwrap();
        let mut shorter = 0;
        for s in &r.spans {
            let opts = GenerateOptions {
                max_new_tokens: vec![s.max_new_tokens],
                stop_tokens: model.config.eos_token_ids(),
                pad_id: 0,
                sampling: None,
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
            let full = generate(&model, std::slice::from_ref(&s.prompt_ids), &opts, &mut rng)
                .unwrap()
                .remove(0);
            assert!(
                full.starts_with(&s.generated_ids),
                "{name}: a prefix of greedy"
            );
            shorter += usize::from(full.len() > s.generated_ids.len());
            let text = tok.decode(&full, true).unwrap();
            assert_eq!(
                eval::regurgitation::match_span(&text, "", &s.span_text),
                (s.exact, s.partial),
                "{name}: span {:?}, full continuation {text:?}",
                s.span_text
            );
        }
        assert!(r.summary.total.exact >= 1, "{name}");
        assert!(
            shorter > r.spans.len() / 2,
            "{name}: most rows stop early ({shorter})"
        );
    }
}
