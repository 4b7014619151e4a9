//! PEFT LoRA adapters (`--adapter-dir`): the merge against PEFT's `merge_and_unload()` weights
//! and logits (fixtures by `scripts/make_fixtures.py adapters`), the commands on the merged
//! model, and the errors for adapters sani cannot merge.

mod common;

use candle_core::{DType, Device};
use common::*;
use sani::io::{open_model, ModelSource};
use sani::model::{AttnContext, Model};
use std::path::{Path, PathBuf};

fn adapter(name: &str) -> PathBuf {
    fixture("adapters").join(name)
}

fn merged_reference(name: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    let path = fixture("adapters").join(format!("{name}.merged.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn merged_weights_and_logits_match_peft() {
    for (name, base) in [
        ("lora_llama", "llama_gqa"),
        ("lora_gpt2_rslora", "gpt2_f32"),
    ] {
        let source = ModelSource {
            model: fixture(base).display().to_string(),
            adapter: Some(adapter(name)),
        };
        let (ckpt, _) = open_model(&source, &Device::Cpu).unwrap();
        let info = ckpt.adapter.clone().expect("adapter merged");
        assert!(!info.merged.is_empty(), "{name}: {info:?}");
        let want = merged_reference(name);
        let mut changed = 0;
        for (tensor, var) in ckpt.vars() {
            let Some(w) = want.get(&format!("merged.{tensor}")) else {
                continue;
            };
            let d = max_abs_diff(var.as_tensor(), w);
            assert!(
                d < 1e-5,
                "{name}: {tensor} differs from PEFT's merge by {d}"
            );
            let base_ckpt =
                sani::io::checkpoint::Checkpoint::open(&fixture(base), &Device::Cpu).unwrap();
            let shape = base_ckpt.entry(&tensor).unwrap().shape.clone();
            let before = base_ckpt.var(&tensor, &shape).unwrap();
            if max_abs_diff(before.as_tensor(), w) > 1e-4 {
                changed += 1;
            }
        }
        let touched: std::collections::BTreeSet<&String> =
            info.merged.iter().chain(&info.replaced).collect();
        assert_eq!(
            changed,
            touched.len(),
            "{name}: the tensors PEFT changed are the ones merged"
        );

        let model = Model::load_frozen(&ckpt).unwrap();
        let r = reference(base);
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let valid: Vec<Vec<bool>> = rows_i64(&r["attention_mask"])
            .iter()
            .map(|row| row.iter().map(|&m| m == 1).collect())
            .collect();
        let ctx = AttnContext::for_training(&valid, model.sliding_window(), &Device::Cpu).unwrap();
        let logits = model.forward(&ids, &ctx, None).unwrap();
        let n = valid[0].len();
        let d = max_abs_diff(
            &logits.get(0).unwrap().narrow(0, 0, n).unwrap(),
            &want["logits"].get(0).unwrap().narrow(0, 0, n).unwrap(),
        );
        eprintln!("{name}: merged logits within {d:.2e} of PEFT's");
        assert!(d < 1e-4, "{name}: logits differ by {d}");
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn sanitize_and_eval_run_on_the_merged_model_and_write_it_in_the_base_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = sani::data::synth::generate_notes(&sani::data::synth::SynthConfig {
        n_notes: 3,
        seed: 3,
        id_prefix: "n".into(),
    });
    let spans = tmp.path().join("notes.jsonl");
    std::fs::write(&spans, sani::data::synth::notes_to_jsonl(&docs)).unwrap();
    let base = fixture("llama_gqa");
    let a = adapter("lora_llama");
    // Erasure only (no repair): the output is PEFT's merged model with the erased units reset.
    let out = tmp.path().join("out");
    let o = sani(&[
        "sanitize",
        "--model",
        base.to_str().unwrap(),
        "--adapter-dir",
        a.to_str().unwrap(),
        "--sensitive",
        spans.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "0",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = read_json(&out.join("sani_report.json"));
    assert_eq!(
        report["input_adapter"]["merged"].as_array().unwrap().len(),
        9,
        "{}",
        report["input_adapter"]
    );
    let reset: std::collections::BTreeSet<String> = report["erased_tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tensor"].as_str().unwrap().to_string())
        .collect();
    let written = sani::io::checkpoint::Checkpoint::load(&out, &Device::Cpu).unwrap();
    let base_ckpt = sani::io::checkpoint::Checkpoint::load_headers(&base, &Device::Cpu).unwrap();
    let layout = |c: &sani::io::checkpoint::Checkpoint| -> Vec<(String, String, Vec<usize>)> {
        c.entries
            .iter()
            .map(|e| (e.name.clone(), format!("{:?}", e.dtype), e.shape.clone()))
            .collect()
    };
    assert_eq!(layout(&written), layout(&base_ckpt));
    let want = merged_reference("lora_llama");
    for (tensor, var) in written.vars() {
        if reset.contains(&tensor) {
            continue;
        }
        let d = max_abs_diff(var.as_tensor(), &want[&format!("merged.{tensor}")]);
        assert!(d < 1e-5, "{tensor}: {d}");
    }
    // The input directories are untouched: the adapter's merge lives in memory only.
    assert!(!base.join("sani_report.json").exists());

    let json = tmp.path().join("eval.json");
    let o = sani(&[
        "eval",
        "--model",
        base.to_str().unwrap(),
        "--adapter-dir",
        a.to_str().unwrap(),
        "--sensitive",
        spans.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let eval = read_json(&json);
    assert_eq!(
        eval["model"]["adapter"]["sha256"],
        report["input_adapter"]["sha256"]
    );
}

#[test]
fn adapters_that_cannot_be_merged_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(adapter("lora_llama").join(f), d.join(f)).unwrap();
        }
        let p = d.join("adapter_config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut c);
        std::fs::write(&p, c.to_string()).unwrap();
        d
    };
    let ia3 = copy("ia3", &|c| c["peft_type"] = "IA3".into());
    let dora = copy("dora", &|c| c["use_dora"] = true.into());
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let cases: Vec<(&str, PathBuf, Vec<&str>)> = vec![
        (
            "llama_gqa",
            ia3,
            vec!["peft_type", "IA3", "supported: LORA"],
        ),
        ("llama_gqa", dora, vec!["use_dora"]),
        ("llama_gqa", empty, vec!["adapter_config.json"]),
        // The right names but other shapes (q_proj 32 -> 64 here).
        (
            "qwen3_f32",
            adapter("lora_llama"),
            vec!["made for another base model"],
        ),
        // Names the base does not have.
        (
            "gpt2_f32",
            adapter("lora_llama"),
            vec!["is not in the base model"],
        ),
    ];
    for (base, dir, wanted) in cases {
        let o = sani(&[
            "inspect",
            "--model",
            fixture(base).to_str().unwrap(),
            "--adapter-dir",
            dir.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{base} {dir:?}: {}", stderr(&o));
        for w in wanted {
            assert!(stderr(&o).contains(w), "`{w}` not in {}", stderr(&o));
        }
    }
}

/// `--output-format adapter`: LoRA repair without erasure written as a PEFT adapter for the
/// unchanged base; merged back (sani's PEFT reader) it is the model `--output-format model`
/// writes with the same seed. What the adapter cannot carry is refused before any work.
#[test]
fn lora_repair_is_written_as_a_peft_adapter_that_merges_into_the_model_output() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = sani::data::synth::generate_notes(&sani::data::synth::SynthConfig {
        n_notes: 3,
        seed: 3,
        id_prefix: "n".into(),
    });
    let spans = tmp.path().join("notes.jsonl");
    std::fs::write(&spans, sani::data::synth::notes_to_jsonl(&docs)).unwrap();
    for base in ["llama_gqa", "gpt2_f32"] {
        let base_dir = fixture(base);
        let run = |out: &Path, format: &str| {
            let o = sani(&[
                "sanitize",
                "--model",
                base_dir.to_str().unwrap(),
                "--sensitive",
                spans.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--adapter",
                "lora",
                "--erase-fraction",
                "0",
                "--epochs",
                "1",
                "--max-seq-len",
                "48",
                "--output-format",
                format,
                "-q",
            ]);
            assert!(o.status.success(), "{base} {format}: {}", stderr(&o));
        };
        let (model_out, adapter_out) = (
            tmp.path().join(format!("{base}-model")),
            tmp.path().join(format!("{base}-adapter")),
        );
        run(&model_out, "model");
        run(&adapter_out, "adapter");
        assert!(adapter_out.join("adapter_config.json").is_file());
        assert!(
            !adapter_out.join("config.json").exists(),
            "an adapter, not a model"
        );
        let report = read_json(&adapter_out.join("sani_report.json"));
        assert_eq!(report["output_adapter"], "adapter_model.safetensors");
        let (merged, _) = open_model(
            &ModelSource {
                model: base_dir.display().to_string(),
                adapter: Some(adapter_out.clone()),
            },
            &Device::Cpu,
        )
        .unwrap();
        let want = sani::io::checkpoint::Checkpoint::load(&model_out, &Device::Cpu).unwrap();
        let mut differ = 0;
        for (name, var) in want.vars() {
            let d = max_abs_diff(var.as_tensor(), merged.vars()[&name].as_tensor());
            assert!(d < 1e-5, "{base}: {name} differs by {d}");
            let base_ckpt =
                sani::io::checkpoint::Checkpoint::load(&base_dir, &Device::Cpu).unwrap();
            if max_abs_diff(var.as_tensor(), base_ckpt.vars()[&name].as_tensor()) > 0.0 {
                differ += 1;
            }
        }
        assert!(differ > 0, "{base}: the repair changed nothing");
    }
    let out = tmp.path().join("refused");
    let llama = fixture("llama_gqa");
    for (extra, wanted) in [
        (vec!["--adapter", "lora"], "--erase-fraction 0"),
        (vec!["--erase-fraction", "0"], "--adapter lora"),
        (
            vec![
                "--adapter",
                "lora",
                "--erase-fraction",
                "0",
                "--adapter-dir",
                adapter("lora_llama").to_str().unwrap(),
            ],
            "--adapter-dir",
        ),
    ] {
        let mut args = vec![
            "sanitize",
            "--model",
            llama.to_str().unwrap(),
            "--sensitive",
            spans.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--output-format",
            "adapter",
        ];
        args.extend(extra);
        let o = sani(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(wanted), "{args:?}: {}", stderr(&o));
        assert!(!out.exists());
    }
}

#[test]
fn lora_holds_a_16_bit_models_adapted_weights_in_their_stored_dtype_and_merges_them_once() {
    use candle_core::Tensor;
    use sani::io::checkpoint::Checkpoint;
    use sani::nn::lora::LoraConfig;
    let dir = fixture("qwen2_bf16");
    let ckpt = Checkpoint::open(&dir, &Device::Cpu).unwrap();
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec!["q_proj".into(), "down_proj".into()],
        seed: 1,
    };
    let model = Model::load_with_lora(&ckpt, &|_| false, Some(&lora)).unwrap();
    let held: Vec<(String, DType)> = ckpt
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.dtype()))
        .collect();
    assert!(!held.is_empty());
    for (name, dtype) in &held {
        let adapted = name.ends_with("q_proj.weight") || name.ends_with("down_proj.weight");
        let want = if adapted { DType::BF16 } else { DType::F32 };
        assert_eq!(*dtype, want, "{name}");
    }
    // What the merge writes: the base widened, plus scale B A, rounded once to bf16.
    let reference = Checkpoint::load(&dir, &Device::Cpu).unwrap();
    let first = &model.lora_adapters()[0];
    let (d_out, r) = first.b.dims2().unwrap();
    first
        .b
        .set(&Tensor::randn(0f32, 0.05, (d_out, r), &Device::Cpu).unwrap())
        .unwrap();
    let delta = (first.b.as_tensor().matmul(first.a.as_tensor()).unwrap() * first.scale).unwrap();
    let want = (reference.vars()[&first.weight].as_tensor() + delta)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    model.merge_lora().unwrap();
    let merged = ckpt.vars()[&first.weight].as_tensor().clone();
    assert_eq!(merged.dtype(), DType::BF16);
    assert_eq!(
        merged
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        want.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    );
    // Asked for in f32 again (by an op that needs it), the tensor is widened, values kept.
    let shape = merged.dims().to_vec();
    let v = ckpt.var(&first.weight, &shape).unwrap();
    assert_eq!(v.dtype(), DType::F32);
    assert_eq!(
        max_abs_diff(v.as_tensor(), &merged.to_dtype(DType::F32).unwrap()),
        0.0
    );
}
