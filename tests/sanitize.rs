//! `sani sanitize` on the fixture models: erasure touches exactly the reported units, frozen
//! tensors stay bit-identical, runs are deterministic, bad input exits 2 and writes nothing.

mod common;

use candle_core::Device;
use common::*;
use sani::data::synth::{generate_notes, notes_to_jsonl, SynthConfig};
use sani::erase::{self, ResetMode, Selection};
use sani::io::checkpoint::Checkpoint;
use sani::model::Model;
use sani::train::windows_to_examples;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A copy of fixture `name` plus a small notes file, in a temp dir.
fn workspace(name: &str, notes: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let docs = generate_notes(&SynthConfig {
        n_notes: notes,
        seed: 3,
        id_prefix: "n".into(),
    });
    let spans = tmp.path().join("notes.jsonl");
    std::fs::write(&spans, notes_to_jsonl(&docs)).unwrap();
    (tmp, model, spans)
}

fn tensors(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let ckpt = Checkpoint::load(dir, &Device::Cpu).unwrap();
    ckpt.vars()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

fn raw_tensors(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                out.insert(name, view.data().to_vec());
            }
        }
    }
    out
}

#[test]
fn erasure_changes_exactly_the_reported_units() {
    for name in [
        "gpt2_f32",
        "llama_gqa",
        "qwen2_bf16",
        "qwen3_f32",
        "phi3_f32",
        "gemma3_f32",
        "gemma2_f32",
    ] {
        let ckpt = Checkpoint::load(&fixture(name), &Device::Cpu).unwrap();
        let before = tensors(&fixture(name));
        let model = Model::load_frozen(&ckpt).unwrap();
        let layers = erase::last_layers(model.num_layers(), 1);
        let units =
            erase::select_units(&model, &[], &layers, 0.25, Selection::Random, 1, 4).unwrap();
        let width = ckpt.config.mlp_width();
        assert_eq!(units[&layers[0]].len(), width / 4);
        let reset = erase::reset_units(&ckpt, &model, &units, ResetMode::Zero, None, 1).unwrap();
        let slices = model.mlp_unit_slices(layers[0]);
        assert_eq!(
            reset.len(),
            slices.len(),
            "{name}: one report entry per tensor"
        );
        if name == "phi3_f32" {
            // HF's Phi3MLP chunks gate_up_proj's output in two: gate rows, then up rows.
            let fused = slices
                .iter()
                .find(|s| s.name.ends_with("gate_up_proj.weight"))
                .unwrap();
            assert_eq!((fused.axis, fused.offsets.clone()), (0, vec![0, width]));
        }
        for (r, s) in reset.iter().zip(&slices) {
            assert_eq!((&r.tensor, r.axis), (&s.name, s.axis));
            assert_eq!(
                r.indices,
                s.indices(&units[&layers[0]]),
                "{name}: {}",
                r.tensor
            );
        }
        for (tensor, after) in ckpt.vars() {
            let after = after
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let old = &before[&tensor];
            let slice = slices.iter().find(|s| s.name == tensor);
            let dims = ckpt.entry(&tensor).unwrap().shape.clone();
            for (i, (a, b)) in old.iter().zip(&after).enumerate() {
                let in_unit = slice.is_some_and(|s| {
                    let inner: usize = dims[s.axis + 1..].iter().product();
                    let j = (i / inner) % dims[s.axis];
                    s.offsets
                        .iter()
                        .any(|&o| j >= o && units[&layers[0]].contains(&(j - o)))
                });
                if in_unit {
                    assert_eq!(
                        *b, 0.0,
                        "{name}: {tensor}[{i}] in an erased unit must be zero"
                    );
                } else {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{name}: {tensor}[{i}] outside the erased units changed"
                    );
                }
            }
        }
    }
}

#[test]
fn activation_and_attribution_selection_are_deterministic_and_differ_from_random() {
    let ckpt = Checkpoint::load(&fixture("gpt2_f32"), &Device::Cpu).unwrap();
    let tok = sani::io::load_tokenizer(&fixture("gpt2_f32")).unwrap();
    let docs = generate_notes(&SynthConfig {
        n_notes: 4,
        seed: 1,
        id_prefix: "n".into(),
    });
    let labels = sani::data::spans::label_names(&docs);
    let enc = sani::data::tokens::encode_documents(&tok, &docs).unwrap();
    let windows = sani::data::tokens::make_windows(
        &docs,
        &enc,
        &labels,
        &sani::data::tokens::Framing::bos_only(Some(0)),
        64,
        None,
    );
    let examples = windows_to_examples(&windows, true);
    let model = Model::load_frozen(&ckpt).unwrap();
    let layers = vec![1];
    let pick = |s| erase::select_units(&model, &examples, &layers, 0.25, s, 9, 4).unwrap();
    for s in [Selection::Activation, Selection::Attribution] {
        assert_eq!(pick(s), pick(s), "{s:?} is deterministic");
        assert_eq!(pick(s)[&1].len(), ckpt.config.mlp_width() / 4);
    }
    assert_ne!(pick(Selection::Activation), pick(Selection::Random));
}

#[test]
fn repair_keeps_frozen_tensors_bit_identical_and_is_deterministic() {
    let (tmp, model, spans) = workspace("gpt2_f32", 6);
    let run = |out: &str| {
        let out = tmp.path().join(out);
        let o = sani(&[
            "sanitize",
            "--model",
            model.to_str().unwrap(),
            "--sensitive",
            spans.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--erase-layers",
            "1",
            "--erase-fraction",
            "0.5",
            "--epochs",
            "1",
            "--train-scope",
            "last:1",
            "--max-seq-len",
            "64",
            "--batch-size",
            "4",
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        out
    };
    let a = run("a");
    let b = run("b");
    let (input, out_a, out_b) = (raw_tensors(&model), raw_tensors(&a), raw_tensors(&b));
    assert_eq!(out_a, out_b, "same seed, same inputs: same weights");
    let mut changed = Vec::new();
    for (name, bytes) in &input {
        if &out_a[name] != bytes {
            changed.push(name.clone());
        }
    }
    assert!(!changed.is_empty());
    for name in &changed {
        assert!(
            name.starts_with("transformer.h.1.") || name.starts_with("transformer.ln_f."),
            "frozen tensor {name} changed"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("sani_report.json")).unwrap())
            .unwrap();
    assert_eq!(report["erased_units"]["1"].as_array().unwrap().len(), 64);
    assert_eq!(report["config"]["train-scope"], "last:1");
    assert!(report["masked_tokens_per_label"]["NAME"].as_u64().unwrap() > 0);
    assert!(
        a.join("sani_config.toml").is_file()
            && a.join("tokenizer.json").is_file()
            && a.join("config.json").is_file()
    );
    // The output is itself a loadable model.
    Model::load_frozen(&Checkpoint::load(&a, &Device::Cpu).unwrap()).unwrap();
}

#[test]
fn config_file_then_command_line() {
    let (tmp, model, spans) = workspace("llama_gqa", 3);
    let cfg = tmp.path().join("my.toml");
    std::fs::write(
        &cfg,
        "erase-fraction = 0.25\nepochs = 1\nlr = 1e-3\nmax-seq-len = 48\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let o = sani(&[
        "sanitize",
        "--model",
        model.to_str().unwrap(),
        "--sensitive",
        spans.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--lr",
        "2e-4",
        "--repair-target",
        "mask",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let resolved = std::fs::read_to_string(out.join("sani_config.toml")).unwrap();
    assert!(resolved.contains("erase-fraction = 0.25"), "{resolved}");
    assert!(resolved.contains("lr = 0.0002"), "{resolved}");
    assert!(resolved.contains("repair-target = \"mask\""), "{resolved}");
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "erase-fractoin = 0.5\n").unwrap();
    let o = sani(&[
        "sanitize",
        "--model",
        model.to_str().unwrap(),
        "--sensitive",
        spans.to_str().unwrap(),
        "--out",
        tmp.path().join("x").to_str().unwrap(),
        "--config",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("bad.toml") && stderr(&o).contains("erase-fractoin"),
        "{}",
        stderr(&o)
    );
    // The committed hardened config: a share of the documents trains true, with forgetting,
    // in place of its surrogate version (about one pass of the corpus); `--forget-weight`
    // alone adds the true windows to each epoch (more than one pass).
    let hardened = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/hardened.toml");
    let seen_with = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec![
            "sanitize",
            "--model",
            model.to_str().unwrap(),
            "--sensitive",
            spans.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "1",
            "--max-seq-len",
            "48",
            "--quiet",
        ];
        args.extend(extra);
        let o = sani(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let resolved = std::fs::read_to_string(out.join("sani_config.toml")).unwrap();
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("sani_report.json")).unwrap())
                .unwrap();
        let tokens = report["total_tokens"].as_u64().unwrap() as f64;
        let seen = report["epochs"][0]["tokens"].as_u64().unwrap() as f64;
        (resolved, seen / tokens)
    };
    let (resolved, share) = seen_with("hardened", &["--config", hardened.to_str().unwrap()]);
    assert!(resolved.contains("forget-weight = 1.0"), "{resolved}");
    assert!(resolved.contains("forget-share = 0.75"), "{resolved}");
    assert!(
        (0.7..1.3).contains(&share),
        "one pass of the corpus, got {share}"
    );
    let (resolved, default_share) = seen_with("default", &[]);
    assert!(resolved.contains("forget-weight = 0.85"), "{resolved}");
    assert!(resolved.contains("forget-share = 0.75"), "{resolved}");
    assert!(
        (0.7..1.3).contains(&default_share),
        "the default forgets at no extra work, got {default_share}"
    );
    // Resolved for this 2-block, tiny model: the built-in erase-layers erases a quarter of the
    // blocks (at least one), and `train-modules auto` trains every tensor.
    assert!(resolved.contains("erase-layers = 1\n"), "{resolved}");
    assert!(resolved.contains("train-modules = \"all\""), "{resolved}");
    let report = read_json(&tmp.path().join("default").join("sani_report.json"));
    assert_eq!(report["erased_layers"], serde_json::json!([1]));
    let (resolved, _) = seen_with("given", &["--erase-layers", "2"]);
    assert!(resolved.contains("erase-layers = 2\n"), "{resolved}");
    let report = read_json(&tmp.path().join("given").join("sani_report.json"));
    assert_eq!(report["erased_layers"], serde_json::json!([0, 1]));
    let (resolved, added) = seen_with("added", &["--forget-weight", "0.5", "--forget-share", "0"]);
    assert!(resolved.contains("forget-share = 0.0"), "{resolved}");
    assert!(added > 1.3, "surrogate and true windows, got {added}");
}

#[test]
fn bad_input_exits_2_and_writes_nothing() {
    let (tmp, model, spans) = workspace("gpt2_f32", 2);
    let before = raw_tensors(&model);
    let out = tmp.path().join("out");
    let m = model.to_str().unwrap();
    let o_s = out.to_str().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"a\", \"text\": \"Ana Lopez\", \"spans\": [{\"start\": 0, \"end\": 3, \"label\": \"NAME\"}]}\n{\"id\": \"b\", \"text\": \"x\", \"spans\": [{\"start\": 0, \"end\": 9, \"label\": \"NAME\"}]}\n").unwrap();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--sensitive", bad.to_str().unwrap()],
            vec!["bad.jsonl:2", "end"],
        ),
        (
            vec!["--sensitive", "/nonexistent/spans.jsonl"],
            vec!["/nonexistent/spans.jsonl"],
        ),
        (
            vec![
                "--sensitive",
                spans.to_str().unwrap(),
                "--erase-fraction",
                "1.5",
            ],
            vec!["--erase-fraction"],
        ),
        (
            vec![
                "--sensitive",
                spans.to_str().unwrap(),
                "--checkpoint-activations",
                "false",
                "--activation-memory",
                "512",
            ],
            vec!["--activation-memory 512 needs --checkpoint-activations"],
        ),
        (
            vec![
                "--sensitive",
                spans.to_str().unwrap(),
                "--train-scope",
                "top",
            ],
            vec!["--train-scope"],
        ),
        (
            vec![
                "--sensitive",
                spans.to_str().unwrap(),
                "--forget-weight",
                "-0.5",
            ],
            vec!["--forget-weight", "-0.5"],
        ),
        (
            vec![
                "--sensitive",
                spans.to_str().unwrap(),
                "--forget-weight",
                "0.5",
                "--repair-target",
                "mask",
            ],
            vec!["--forget-weight needs --repair-target surrogate"],
        ),
        (
            vec![
                "--sensitive",
                spans.to_str().unwrap(),
                "--forget-weight",
                "1",
                "--forget-share",
                "1.5",
            ],
            vec!["--forget-share must be in [0, 1]", "got 1.5"],
        ),
        (
            vec![
                "--sensitive",
                spans.to_str().unwrap(),
                "--forget-share",
                "-0.25",
            ],
            vec!["--forget-share must be in [0, 1]", "got -0.25"],
        ),
    ];
    for (extra, wanted) in cases {
        let mut args = vec!["sanitize", "--model", m, "--out", o_s];
        args.extend(extra);
        let o = sani(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        for w in wanted {
            assert!(
                stderr(&o).contains(w),
                "{args:?}: `{w}` not in {}",
                stderr(&o)
            );
        }
        assert!(!out.exists(), "nothing written on error");
    }
    // Writing into the input model is refused, and so is an existing output without --force.
    let inside = model.join("sub");
    let o = sani(&[
        "sanitize",
        "--model",
        m,
        "--sensitive",
        spans.to_str().unwrap(),
        "--out",
        inside.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("input model"), "{}", stderr(&o));
    std::fs::create_dir(&out).unwrap();
    let o = sani(&[
        "sanitize",
        "--model",
        m,
        "--sensitive",
        spans.to_str().unwrap(),
        "--out",
        o_s,
        "--epochs",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    let o = sani(&[
        "sanitize",
        "--model",
        m,
        "--sensitive",
        spans.to_str().unwrap(),
        "--out",
        o_s,
        "--epochs",
        "0",
        "--force",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        raw_tensors(&model),
        before,
        "the input model is never modified"
    );
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            n.contains("sani-tmp").then_some(n)
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary dirs left: {leftovers:?}");
}

#[test]
fn ctrl_c_leaves_no_partial_output() {
    let (tmp, model, spans) = workspace("gpt2_f32", 8);
    let out = tmp.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sani"))
        .args([
            "sanitize",
            "--model",
            model.to_str().unwrap(),
            "--sensitive",
            spans.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "10000",
            "--max-seq-len",
            "64",
            "--quiet",
        ])
        .spawn()
        .unwrap();
    // Wait until the run has created its temporary directory, then interrupt it.
    let started = std::time::Instant::now();
    let staged = || {
        std::fs::read_dir(tmp.path()).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .contains("sani-tmp")
        })
    };
    while !staged() && started.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(staged(), "sanitize never started writing");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "interrupted runs exit 130");
    assert!(!out.exists(), "no output after Ctrl-C");
    assert!(!staged(), "temporary directory removed after Ctrl-C");
}

#[test]
fn lora_repair_changes_only_the_targeted_projections_and_is_deterministic() {
    for (fixture_name, targets, touched) in [
        (
            "llama_gqa",
            "q_proj,v_proj",
            &["self_attn.q_proj.weight", "self_attn.v_proj.weight"][..],
        ),
        (
            "gpt2_f32",
            "all-linear",
            &[
                "attn.c_attn.weight",
                "attn.c_proj.weight",
                "mlp.c_fc.weight",
                "mlp.c_proj.weight",
            ][..],
        ),
    ] {
        let (tmp, model, spans) = workspace(fixture_name, 6);
        let run = |out: &str| {
            let out = tmp.path().join(out);
            let o = sani(&[
                "sanitize",
                "--model",
                model.to_str().unwrap(),
                "--sensitive",
                spans.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--erase-fraction",
                "0",
                "--epochs",
                "1",
                "--adapter",
                "lora",
                "--lora-rank",
                "4",
                "--lora-targets",
                targets,
                "--lr",
                "1e-2",
                "--max-seq-len",
                "64",
                "--quiet",
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
            out
        };
        let (a, b) = (run("a"), run("b"));
        let (input, out_a) = (raw_tensors(&model), raw_tensors(&a));
        assert_eq!(
            out_a,
            raw_tensors(&b),
            "{fixture_name}: same seed, same weights"
        );
        let changed: Vec<&String> = input.keys().filter(|n| out_a[*n] != input[*n]).collect();
        let expected = input
            .keys()
            .filter(|n| touched.iter().any(|t| n.ends_with(t)) && !n.contains("lora"))
            .count();
        assert_eq!(
            changed.len(),
            expected,
            "{fixture_name}: changed {changed:?}"
        );
        assert!(changed
            .iter()
            .all(|n| touched.iter().any(|t| n.ends_with(t))));
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(a.join("sani_report.json")).unwrap())
                .unwrap();
        assert_eq!(report["config"]["adapter"], "lora");
        assert_eq!(report["config"]["lora-rank"], 4);
        // Same tensor names and dtypes as the input: a drop-in model, no adapter tensors.
        assert_eq!(
            input.keys().collect::<Vec<_>>(),
            out_a.keys().collect::<Vec<_>>()
        );
        Model::load_frozen(&Checkpoint::load(&a, &Device::Cpu).unwrap()).unwrap();
    }
    // A target list that matches nothing is refused.
    let (tmp, model, spans) = workspace("llama_gqa", 2);
    let o = sani(&[
        "sanitize",
        "--model",
        model.to_str().unwrap(),
        "--sensitive",
        spans.to_str().unwrap(),
        "--out",
        tmp.path().join("x").to_str().unwrap(),
        "--adapter",
        "lora",
        "--lora-targets",
        "c_attn",
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--lora-targets c_attn"),
        "{}",
        stderr(&o)
    );
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn train_modules_limits_repair_to_the_named_modules() {
    let (tmp, model, spans) = workspace("llama_gqa", 4);
    let sanitize = |out: &str, modules: &str| {
        sani(&[
            "sanitize",
            "--model",
            model.to_str().unwrap(),
            "--sensitive",
            spans.to_str().unwrap(),
            "--out",
            tmp.path().join(out).to_str().unwrap(),
            "--erase-fraction",
            "0",
            "--epochs",
            "1",
            "--train-modules",
            modules,
            "--max-seq-len",
            "64",
            "--quiet",
        ])
    };
    let o = sanitize("a", "mlp");
    assert!(o.status.success(), "{}", stderr(&o));
    let (input, out) = (raw_tensors(&model), raw_tensors(&tmp.path().join("a")));
    let changed: Vec<&String> = input.keys().filter(|n| out[*n] != input[*n]).collect();
    assert!(!changed.is_empty());
    assert!(
        changed.iter().all(|n| n.contains(".mlp.")),
        "only MLP tensors train: {changed:?}"
    );
    let o = sanitize("b", "feed_forward");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--train-modules feed_forward"),
        "{}",
        stderr(&o)
    );
    assert!(!tmp.path().join("b").exists());
}

/// Every row of a `sani prepare` Parquet file.
struct RepairRows {
    input_ids: Vec<Vec<i64>>,
    attention_mask: Vec<Vec<i8>>,
    labels: Vec<Vec<i64>>,
    doc_id: Vec<String>,
    window: Vec<i32>,
}

fn read_repair_set(path: &Path) -> RepairRows {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type, Int8Type};
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut rows = RepairRows {
        input_ids: vec![],
        attention_mask: vec![],
        labels: vec![],
        doc_id: vec![],
        window: vec![],
    };
    for batch in reader {
        let batch = batch.unwrap();
        let list = |name: &str| batch.column_by_name(name).unwrap().as_list::<i32>().clone();
        for row in list("input_ids").iter() {
            let row = row.unwrap();
            rows.input_ids
                .push(row.as_primitive::<Int64Type>().values().to_vec());
        }
        for row in list("attention_mask").iter() {
            let row = row.unwrap();
            rows.attention_mask
                .push(row.as_primitive::<Int8Type>().values().to_vec());
        }
        for row in list("labels").iter() {
            let row = row.unwrap();
            rows.labels
                .push(row.as_primitive::<Int64Type>().values().to_vec());
        }
        let ids = batch.column_by_name("doc_id").unwrap().as_string::<i32>();
        rows.doc_id
            .extend(ids.iter().map(|s| s.unwrap().to_string()));
        let w = batch.column_by_name("window").unwrap();
        rows.window
            .extend(w.as_primitive::<Int32Type>().values().iter().copied());
    }
    rows
}

#[test]
fn prepare_writes_the_erased_model_and_the_repair_set_sanitize_trains_on() {
    use sani::data::tokens;
    use sani::recipes::sanitize::ResolvedConfig;
    use sani::train::{Corpus, EpochData, Forgetting, SurrogateData};
    let (tmp, model, spans) = workspace("llama_gqa", 6);
    let (m, sp) = (model.to_str().unwrap(), spans.to_str().unwrap());
    let prepared = tmp.path().join("prepared");
    let o = sani(&[
        "prepare",
        "--model",
        m,
        "--sensitive",
        sp,
        "--out",
        prepared.to_str().unwrap(),
        "--seed",
        "5",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The erased model is what sanitize erases with the same options and seed.
    let erased = tmp.path().join("erased");
    let o = sani(&[
        "sanitize",
        "--model",
        m,
        "--sensitive",
        sp,
        "--out",
        erased.to_str().unwrap(),
        "--seed",
        "5",
        "--epochs",
        "0",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(tensors(&prepared), tensors(&erased));
    assert_ne!(
        tensors(&prepared),
        tensors(&model),
        "erasure changed the model"
    );

    // The repair set, against windows and surrogates made here from the saved config.
    let cfg: ResolvedConfig =
        toml::from_str(&std::fs::read_to_string(prepared.join("sani_config.toml")).unwrap())
            .unwrap();
    assert_eq!(cfg.epochs, 2);
    let ckpt = Checkpoint::load(&model, &Device::Cpu).unwrap();
    let tok = sani::io::load_tokenizer(&model).unwrap();
    let docs = sani::data::spans::load_documents(Some(&spans), None, None).unwrap();
    let corpus = Corpus {
        docs: &docs,
        tok: &tok,
        labels: sani::data::spans::label_names(&docs),
        framing: tokens::resolve_framing(&tok, ckpt.config.bos_token_id(), cfg.bos, None).unwrap(),
        max_seq_len: cfg.max_seq_len.min(ckpt.config.max_positions()),
        stride: None,
    };
    let mut data = SurrogateData {
        corpus: &corpus,
        seed: 5,
        forgetting: Forgetting::Off,
    };
    // What sanitize trained on, from its report: targets and tokens per epoch.
    let sanitized = tmp.path().join("sanitized");
    let o = sani(&[
        "sanitize",
        "--model",
        m,
        "--sensitive",
        sp,
        "--out",
        sanitized.to_str().unwrap(),
        "--seed",
        "5",
        "--forget-weight",
        "0",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sanitized.join("sani_report.json")).unwrap())
            .unwrap();
    let mut epoch_ids = Vec::new();
    for epoch in 0..2 {
        let rows = read_repair_set(&prepared.join(format!("repair/epoch-{epoch}.parquet")));
        let examples = data.examples(epoch).unwrap();
        assert_eq!(rows.input_ids.len(), examples.len());
        let len = examples.iter().map(|e| e.ids.len()).max().unwrap();
        let (mut targets, mut tokens) = (0, 0);
        let mut windows_seen: BTreeMap<&str, i32> = BTreeMap::new();
        for (r, e) in examples.iter().enumerate() {
            let n = e.ids.len();
            assert_eq!(rows.input_ids[r].len(), len, "rows padded to the longest");
            let ids: Vec<i64> = e.ids.iter().map(|&x| x as i64).collect();
            assert_eq!(rows.input_ids[r][..n], ids[..]);
            assert!(rows.attention_mask[r][..n].iter().all(|&x| x == 1));
            assert!(rows.attention_mask[r][n..].iter().all(|&x| x == 0));
            for (i, &label) in rows.labels[r].iter().enumerate() {
                let want = if i > 0 && i < n && e.train[i] {
                    ids[i]
                } else {
                    -100
                };
                assert_eq!(label, want, "row {r}, position {i}");
            }
            targets += rows.labels[r].iter().filter(|&&l| l != -100).count();
            tokens += n;
            assert_eq!(rows.doc_id[r], docs[e.origin.doc].id);
            let k = windows_seen.entry(&docs[e.origin.doc].id).or_insert(0);
            assert_eq!(rows.window[r], *k);
            *k += 1;
        }
        let trained = &report["epochs"][epoch];
        assert_eq!(targets as u64, trained["trained_tokens"].as_u64().unwrap());
        assert_eq!(tokens as u64, trained["tokens"].as_u64().unwrap());
        epoch_ids.push(rows.input_ids);
    }
    assert_ne!(epoch_ids[0], epoch_ids[1], "fresh surrogates each epoch");

    // Mask repair: the sensitive tokens carry no label, the same in every epoch.
    let masked = tmp.path().join("masked");
    let o = sani(&[
        "prepare",
        "--model",
        m,
        "--sensitive",
        sp,
        "--out",
        masked.to_str().unwrap(),
        "--repair-target",
        "mask",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = read_repair_set(&masked.join("repair/epoch-0.parquet"));
    let truth = windows_to_examples(&corpus.windows(&docs).unwrap(), true);
    assert_eq!(rows.input_ids.len(), truth.len());
    for (r, e) in truth.iter().enumerate() {
        for i in 1..e.ids.len() {
            assert_eq!(
                rows.labels[r][i] == -100,
                e.sensitive[i],
                "row {r}, position {i}"
            );
        }
    }
    assert_eq!(
        rows.labels,
        read_repair_set(&masked.join("repair/epoch-1.parquet")).labels
    );

    // What an external trainer cannot apply is refused, and nothing is written.
    let refused = tmp.path().join("refused");
    let o = sani(&[
        "prepare",
        "--model",
        m,
        "--sensitive",
        sp,
        "--out",
        refused.to_str().unwrap(),
        "--forget-weight",
        "0.5",
        "-q",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--forget-weight"), "{}", stderr(&o));
    assert!(!refused.exists());
}

#[test]
fn erasure_reads_only_the_reset_tensors_and_copies_untouched_shards_byte_for_byte() {
    use sani::recipes::sanitize::{sanitize_in_memory, ResolvedConfig};
    let (tmp, model, spans) = workspace("llama3_sharded", 4);
    let (m, sp) = (model.to_str().unwrap(), spans.to_str().unwrap());
    let args = ["--erase-layers", "1", "--seed", "2", "-q"];
    let erased = tmp.path().join("erased");
    let prepared = tmp.path().join("prepared");
    for (cmd, out, extra) in [
        ("sanitize", &erased, &["--epochs", "0"][..]),
        ("prepare", &prepared, &[][..]),
    ] {
        let mut a = vec![cmd, "--model", m, "--sensitive", sp, "--out"];
        a.push(out.to_str().unwrap());
        a.extend(args);
        a.extend(extra);
        let o = sani(&a);
        assert!(o.status.success(), "{cmd}: {}", stderr(&o));
    }
    // Layer 1's MLP lives in shard 2: only that file is rewritten.
    let ckpt = Checkpoint::open(&model, &Device::Cpu).unwrap();
    let mlp: Vec<String> = ["down_proj", "gate_proj", "up_proj"]
        .iter()
        .map(|p| format!("model.layers.1.mlp.{p}.weight"))
        .collect();
    let changed_shard = ckpt.entry(&mlp[0]).unwrap().shard.clone();
    assert!(mlp
        .iter()
        .all(|n| ckpt.entry(n).unwrap().shard == changed_shard));
    for out in [&erased, &prepared] {
        for shard in &ckpt.shards {
            let (a, b) = (
                std::fs::read(model.join(shard)).unwrap(),
                std::fs::read(out.join(shard)).unwrap(),
            );
            assert_eq!(
                a == b,
                shard != &changed_shard,
                "{}: {shard}",
                out.display()
            );
        }
        let report = read_json(&out.join("sani_report.json"));
        let shards = report["output_shards"].as_array().unwrap();
        assert_eq!(shards.len(), ckpt.shards.len());
        for s in shards {
            let want = if s["file"] == changed_shard.as_str() {
                3
            } else {
                0
            };
            assert_eq!(s["changed_tensors"], want, "{s}");
        }
    }
    assert_eq!(tensors(&erased), tensors(&prepared));

    // In memory: opened on demand, erasure reads exactly the tensors it resets, and gives the
    // values a fully loaded model gets.
    let cfg: ResolvedConfig =
        toml::from_str(&std::fs::read_to_string(erased.join("sani_config.toml")).unwrap()).unwrap();
    let tok = sani::io::load_tokenizer(&model).unwrap();
    let docs = sani::data::spans::load_documents(Some(&spans), None, None).unwrap();
    sanitize_in_memory(&ckpt, &tok, &docs, &cfg, true).unwrap();
    assert_eq!(ckpt.resident_tensors(), mlp);
    let full = Checkpoint::load(&model, &Device::Cpu).unwrap();
    sanitize_in_memory(&full, &tok, &docs, &cfg, true).unwrap();
    let eager = tmp.path().join("eager");
    std::fs::create_dir(&eager).unwrap();
    full.write_to(&eager, &BTreeMap::new()).unwrap();
    assert_eq!(raw_tensors(&eager), raw_tensors(&erased));
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `sani sanitize` with one short epoch of repair, and `extra` options.
fn sanitize_one_epoch(
    model: &Path,
    spans: &Path,
    out: &Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "sanitize",
        "--model",
        model.to_str().unwrap(),
        "--sensitive",
        spans.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
        "--max-seq-len",
        "48",
        "-q",
    ];
    args.extend_from_slice(extra);
    sani(&args)
}

/// Every stored tensor's dtype and shape, by name.
fn layout(dir: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    Checkpoint::load_headers(dir, &Device::Cpu)
        .unwrap()
        .entries
        .iter()
        .map(|e| (e.name.clone(), (format!("{:?}", e.dtype), e.shape.clone())))
        .collect()
}

/// Each architecture through the commands a user runs: sanitize (erasure and repair), then
/// eval of the output; the output has the input's tensor names, shapes and dtypes, and the
/// report names the reset rows.
#[test]
fn every_architecture_sanitizes_and_evaluates_end_to_end() {
    for name in [
        "gpt2_f32",
        "llama_gqa",
        "mistral_f32",
        "qwen2_bf16",
        "qwen3_f32",
        "phi3_f32",
        "gemma3_f32",
        "gemma2_f32",
    ] {
        let (tmp, model, spans) = workspace(name, 3);
        let out = tmp.path().join("out");
        let o = sanitize_one_epoch(&model, &spans, &out, &[]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let report = read_json(&out.join("sani_report.json"));
        let reset = report["erased_tensors"].as_array().unwrap();
        assert!(
            reset.len() >= 2
                && reset
                    .iter()
                    .all(|t| !t["indices"].as_array().unwrap().is_empty()),
            "{name}: reset tensors {reset:?}"
        );
        assert_eq!(layout(&out), layout(&model), "{name}: tensor layout");
        let json = tmp.path().join("eval.json");
        let o = sani(&[
            "eval",
            "--model",
            out.to_str().unwrap(),
            "--sensitive",
            spans.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "-q",
        ]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let eval = read_json(&json);
        let spans_measured = eval["regurgitation"]["total"]["measured"].as_u64().unwrap();
        assert!(spans_measured > 0, "{name}: {eval}");
    }
}

/// A `pytorch_model.bin` model (torch.save, sharded) sanitizes into a safetensors model with the
/// same names and dtypes, and the report says the input was a pickle.
#[test]
fn pytorch_bin_input_is_sanitized_into_safetensors() {
    let (tmp, model, spans) = workspace("qwen2_bin_sharded", 3);
    let out = tmp.path().join("out");
    let o = sanitize_one_epoch(&model, &spans, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = read_json(&out.join("sani_report.json"));
    assert_eq!(
        report["input_pickle_files"],
        serde_json::json!([
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin"
        ])
    );
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|f| f.contains("model"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"
        ]
    );
    assert_eq!(layout(&out), layout(&model));
}

/// `--activation-memory` keeps block activations from the forward pass instead of recomputing
/// them: the same repair (to float rounding), recorded in the report.
#[test]
fn kept_activations_give_the_same_repair_as_recomputed_ones() {
    let (tmp, model, spans) = workspace("llama_gqa", 6);
    let run = |out: &str, keep_mib: &str| {
        let out = tmp.path().join(out);
        let o = sanitize_one_epoch(
            &model,
            &spans,
            &out,
            &["--batch-size", "4", "--activation-memory", keep_mib],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        out
    };
    let (recomputed, kept) = (run("recomputed", "0"), run("kept", "64"));
    let (a, b) = (tensors(&recomputed), tensors(&kept));
    let input = tensors(&model);
    let mut changed = 0;
    for (name, x) in &a {
        let y = &b[name];
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(diff <= 1e-4 * scale, "{name}: {diff:e} of {scale:e}");
        changed += usize::from(x != &input[name]);
    }
    assert!(changed > 0, "the repair trained something");
    let report = read_json(&kept.join("sani_report.json"));
    assert_eq!(report["config"]["activation-memory"], 64);
    assert_eq!(report["config"]["checkpoint-activations"], true);
}
