//! Hostile and broken input (issue 10): a model directory or spans file from anywhere cannot make
//! `sani` read or write outside its directories, pass the gate with a broken model, crash on
//! token ids, leave staging behind on SIGTERM, or print secrets. Every case runs the binary in a
//! temp dir and checks the exit code, the message (file and field), that the inputs are
//! unchanged and that nothing appeared outside the output.

mod common;

use common::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sani::data::synth::{generate_notes, notes_to_jsonl, SynthConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Every file under `root` (not following links) with its bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_symlink() {
                let target = std::fs::read_link(e.path()).unwrap();
                out.insert(e.path(), target.to_string_lossy().as_bytes().to_vec());
            } else {
                out.insert(e.path(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

struct Work {
    tmp: tempfile::TempDir,
    model: PathBuf,
    spans: PathBuf,
}

impl Work {
    /// A copy of fixture `name` and a notes file with a few documents.
    fn new(name: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir(&model).unwrap();
        for e in std::fs::read_dir(fixture(name)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
        }
        let docs = generate_notes(&SynthConfig {
            n_notes: 3,
            seed: 5,
            id_prefix: "h".into(),
        });
        let spans = tmp.path().join("notes.jsonl");
        std::fs::write(&spans, notes_to_jsonl(&docs)).unwrap();
        Work { tmp, model, spans }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    fn m(&self) -> &str {
        self.model.to_str().unwrap()
    }
    fn s(&self) -> &str {
        self.spans.to_str().unwrap()
    }
    fn sanitize(&self, extra: &[&str]) -> Output {
        let out = self.path("out");
        let mut args = vec![
            "sanitize",
            "--model",
            self.m(),
            "--sensitive",
            self.s(),
            "--out",
            out.to_str().unwrap(),
            "--max-seq-len",
            "32",
            "--quiet",
        ];
        if !extra.contains(&"--epochs") {
            args.extend(["--epochs", "1"]);
        }
        args.extend_from_slice(extra);
        sani(&args)
    }
    fn eval(&self, extra: &[&str]) -> Output {
        let mut args = vec!["eval", "--model", self.m(), "--sensitive", self.s(), "-q"];
        args.extend_from_slice(extra);
        sani(&args)
    }
}

/// Asserts a refused run: exit 2, every part in stderr, the tree under the temp dir unchanged.
fn assert_refused(o: &Output, parts: &[&str], before: &BTreeMap<PathBuf, Vec<u8>>, root: &Path) {
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(o));
    for p in parts {
        assert!(stderr(o).contains(p), "`{p}` not in: {}", stderr(o));
    }
    assert!(
        !stderr(o).contains("stack backtrace") && !stderr(o).contains("panicked"),
        "{}",
        stderr(o)
    );
    assert_eq!(&snapshot(root), before, "nothing written, nothing changed");
}

/// Rewrites F32 tensor `name` of the safetensors file `path` through `f`, and optionally
/// converts it to `dtype` (raw bytes from `f`'s f32 values cast to i32 for I32).
fn edit_tensor(path: &Path, name: &str, dtype: Dtype, f: impl Fn(&mut Vec<f32>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (n, v) in st.tensors() {
        let mut data = v.data().to_vec();
        let mut dt = v.dtype();
        if n == name {
            assert_eq!(v.dtype(), Dtype::F32);
            let mut vals: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            f(&mut vals);
            data = match dtype {
                Dtype::I32 => vals
                    .iter()
                    .flat_map(|x| (*x as i32).to_le_bytes())
                    .collect(),
                _ => vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            dt = dtype;
        }
        owned.push((n, dt, v.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, dt, shape, data)| {
            (
                n.clone(),
                TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn weight_map_entries_cannot_leave_the_model_dir() {
    let w = Work::new("llama3_sharded");
    let index = w.model.join("model.safetensors.index.json");
    let original = std::fs::read_to_string(&index).unwrap();
    let shard = "model-00002-of-00003.safetensors";
    // The shard moved next to the model and named from inside it.
    std::fs::copy(w.model.join(shard), w.path("x.safetensors")).unwrap();
    let abs = w.path("x.safetensors").display().to_string();
    for bad in ["../x.safetensors", abs.as_str(), "sub/x.safetensors"] {
        let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
        for v in json["weight_map"].as_object_mut().unwrap().values_mut() {
            if v == shard {
                *v = bad.into();
            }
        }
        std::fs::write(&index, serde_json::to_string(&json).unwrap()).unwrap();
        let before = snapshot(w.tmp.path());
        for o in [
            w.sanitize(&[]),
            w.eval(&[]),
            sani(&["inspect", "--model", w.m()]),
        ] {
            assert_refused(
                &o,
                &[
                    "model.safetensors.index.json",
                    "field `weight_map.",
                    bad,
                    "refused",
                ],
                &before,
                w.tmp.path(),
            );
        }
    }
}

#[cfg(unix)]
#[test]
fn symlinks_out_of_the_model_dir_are_refused() {
    let w = Work::new("gpt2_f32");
    std::fs::rename(w.model.join("tokenizer.json"), w.path("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink("../tokenizer.json", w.model.join("tokenizer.json")).unwrap();
    let before = snapshot(w.tmp.path());
    for o in [w.sanitize(&[]), w.eval(&[])] {
        assert_refused(
            &o,
            &["model/tokenizer.json", "outside the model directory"],
            &before,
            w.tmp.path(),
        );
    }
    // A link inside the directory is fine.
    std::fs::remove_file(w.model.join("tokenizer.json")).unwrap();
    std::fs::rename(w.path("tokenizer.json"), w.model.join("tok.json")).unwrap();
    std::os::unix::fs::symlink("tok.json", w.model.join("tokenizer.json")).unwrap();
    let o = w.eval(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn non_finite_weights_are_refused_at_load() {
    for (value, kind) in [(f32::NAN, "NaN"), (f32::INFINITY, "Inf")] {
        let w = Work::new("gpt2_f32");
        edit_tensor(
            &w.model.join("model.safetensors"),
            "transformer.h.1.mlp.c_fc.weight",
            Dtype::F32,
            |v| v[17] = value,
        );
        let before = snapshot(w.tmp.path());
        let parts = [
            "model/model.safetensors",
            "transformer.h.1.mlp.c_fc.weight",
            "1 non-finite value",
            kind,
        ];
        for o in [
            w.sanitize(&[]),
            w.eval(&["--max-rate", "0.03"]),
            sani(&["inspect", "--model", w.m()]),
        ] {
            assert_refused(&o, &parts, &before, w.tmp.path());
        }
    }
}

#[test]
fn a_diverging_repair_or_finetune_writes_nothing() {
    let w = Work::new("gpt2_f32");
    let before = snapshot(w.tmp.path());
    // Every tensor trains: the weights overflow to inf.
    let o = w.sanitize(&["--lr", "1e10", "--epochs", "3", "--train-modules", "all"]);
    assert_refused(&o, &["training diverged", "--lr"], &before, w.tmp.path());
    // Only the MLPs train (the default above 50M parameters): behind the norms every value and
    // the loss stay finite, but the weights grow a billion-fold.
    let o = w.sanitize(&["--lr", "1e10", "--epochs", "3", "--train-modules", "mlp"]);
    assert_refused(
        &o,
        &["training diverged", "grew from norm"],
        &before,
        w.tmp.path(),
    );
    let out = w.path("ft");
    let o = sani(&[
        "finetune",
        "--model",
        w.m(),
        "--data",
        w.s(),
        "--out",
        out.to_str().unwrap(),
        "--lr",
        "1e10",
        "--epochs",
        "3",
        "--max-seq-len",
        "32",
        "-q",
    ]);
    assert_refused(&o, &["training diverged"], &before, w.tmp.path());
}

#[test]
fn eval_never_passes_a_model_with_non_finite_logits() {
    let w = Work::new("gpt2_f32");
    // Finite weights whose logits overflow f32.
    edit_tensor(
        &w.model.join("model.safetensors"),
        "transformer.ln_f.weight",
        Dtype::F32,
        |v| v.iter_mut().for_each(|x| *x = 3e38),
    );
    let ppl = w.path("heldout.jsonl");
    std::fs::copy(&w.spans, &ppl).unwrap();
    let before = snapshot(w.tmp.path());
    let o = w.eval(&["--max-rate", "0.03"]);
    assert_refused(&o, &["logits are not finite"], &before, w.tmp.path());
    assert!(!stdout(&o).contains("PASS"), "{}", stdout(&o));
    let o = sani(&[
        "eval",
        "--model",
        w.m(),
        "--perplexity",
        ppl.to_str().unwrap(),
        "--max-perplexity",
        "1000",
        "-q",
    ]);
    assert_refused(&o, &["not finite"], &before, w.tmp.path());
}

#[test]
fn max_perplexity_gates_utility() {
    let w = Work::new("gpt2_f32");
    let ppl = w.path("heldout.jsonl");
    std::fs::copy(&w.spans, &ppl).unwrap();
    let p = ppl.to_str().unwrap();
    let json = w.path("e.json");
    let j = json.to_str().unwrap();
    // The fixture is untrained: its perplexity is about its vocabulary size (320).
    let o = w.eval(&["--perplexity", p, "--max-perplexity", "1e6", "--json", j]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["gate"]["passed"], true);
    assert_eq!(report["settings"]["max_perplexity"], 1e6);
    let o = w.eval(&[
        "--perplexity",
        p,
        "--max-perplexity",
        "2",
        "--max-rate",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stdout(&o).contains("gate: FAIL"), "{}", stdout(&o));
    assert!(stdout(&o).contains("perplexity") && stdout(&o).contains("> max 2"));
    // Gating what was not measured is an error.
    let o = w.eval(&["--max-perplexity", "2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--max-perplexity needs --perplexity"));
    let o = sani(&[
        "eval",
        "--model",
        w.m(),
        "--perplexity",
        p,
        "--max-rate",
        "0.1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("give a sensitive file"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn token_ids_beyond_the_embedding_are_named() {
    let w = Work::new("gpt2_f32");
    let config = w.model.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["bos_token_id"] = 5000.into();
    std::fs::write(&config, c.to_string()).unwrap();
    let before = snapshot(w.tmp.path());
    let parts = ["model/config.json", "`bos_token_id` is 5000", "320 rows"];
    assert_refused(&w.sanitize(&[]), &parts, &before, w.tmp.path());
    assert_refused(&w.eval(&[]), &parts, &before, w.tmp.path());
    let o = sani(&["inspect", "--model", w.m()]);
    assert_refused(&o, &["1 problem"], &before, w.tmp.path());
    assert!(stdout(&o).contains("problem        ") && stdout(&o).contains("bos_token_id"));
    let o = sani(&["inspect", "--model", w.m(), "--json"]);
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(j["problems"][0].as_str().unwrap().contains("bos_token_id"));

    // A tokenizer with ids past the embedding.
    let w = Work::new("gpt2_f32");
    let path = w.model.join("tokenizer.json");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    t["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": 400, "content": "<extra>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    std::fs::write(&path, t.to_string()).unwrap();
    let before = snapshot(w.tmp.path());
    let parts = [
        "model/tokenizer.json",
        "1 token id is beyond",
        "largest 320",
    ];
    assert_refused(&w.sanitize(&[]), &parts, &before, w.tmp.path());
    assert_refused(&w.eval(&[]), &parts, &before, w.tmp.path());
}

#[cfg(unix)]
#[test]
fn sigterm_and_sighup_clean_up_and_stale_staging_is_swept() {
    for (signal, code) in [("-TERM", 143), ("-HUP", 129)] {
        let w = Work::new("gpt2_f32");
        let out = w.path("out");
        let child = Command::new(env!("CARGO_BIN_EXE_sani"))
            .args([
                "sanitize",
                "--model",
                w.m(),
                "--sensitive",
                w.s(),
                "--out",
                out.to_str().unwrap(),
                "--epochs",
                "100000",
                "--max-seq-len",
                "32",
                "-q",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let staged = || {
            std::fs::read_dir(w.tmp.path()).unwrap().any(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("sani-tmp")
            })
        };
        let started = std::time::Instant::now();
        while !staged() && started.elapsed().as_secs() < 60 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(staged(), "sanitize never started writing");
        let pid = child.id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(code), "{signal}: {}", stderr(&o));
        assert!(stderr(&o).contains("no output written"), "{}", stderr(&o));
        assert!(!out.exists() && !staged(), "{signal}: nothing left behind");
    }

    // What a SIGKILLed run leaves (a pid that cannot be running: Linux pids stay below 2^22)
    // is removed by the next run into the same directory.
    let w = Work::new("gpt2_f32");
    let stale = w.path(&format!(".out.sani-tmp-{}-0", (1u32 << 22) + 5));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), "half written").unwrap();
    let o = w.sanitize(&["--epochs", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stale.exists());
    assert!(
        stderr(&o).contains("left by an earlier run") && stderr(&o).contains(".out.sani-tmp-"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn per_span_hashes_are_keyed_and_errors_do_not_quote_secrets() {
    let w = Work::new("gpt2_f32");
    let per = w.path("per.jsonl");
    let p = per.to_str().unwrap();
    let lines = |o: &Output| -> Vec<serde_json::Value> {
        assert!(o.status.success(), "{}", stderr(o));
        std::fs::read_to_string(&per)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let a = lines(&w.eval(&["--per-span", p]));
    let b = lines(&w.eval(&["--per-span", p]));
    assert!(a.len() > 3);
    // The plain sha256 of a span's text (what a dictionary attack computes) appears nowhere.
    let docs = sani::data::spans::load_documents(Some(&w.spans), None, None).unwrap();
    let first = &docs[0].spans[0];
    let text = sani::data::spans::char_slice(&docs[0].text, first.start, first.end);
    let plain = sani::io::hash::sha256_hex(text.as_bytes());
    let all = std::fs::read_to_string(&per).unwrap();
    assert!(!all.contains(&plain) && !all.contains(&text));
    // A random key per run: the same span hashes differently in two runs.
    assert_ne!(a[0]["span_hmac"], b[0]["span_hmac"]);
    assert_ne!(a[0]["key_id"], b[0]["key_id"]);
    // A shared key file joins runs.
    let key = w.path("span.key");
    std::fs::write(&key, "a shared secret of enough bytes\n").unwrap();
    let k = key.to_str().unwrap();
    let c = lines(&w.eval(&["--per-span", p, "--span-key-file", k]));
    let d = lines(&w.eval(&["--per-span", p, "--span-key-file", k]));
    assert_eq!(c[0]["span_hmac"], d[0]["span_hmac"]);
    assert_eq!(c[0]["key_id"], d[0]["key_id"]);
    let json = w.path("e.json");
    let o = w.eval(&[
        "--per-span",
        p,
        "--span-key-file",
        k,
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let report = std::fs::read_to_string(&json).unwrap();
    assert!(
        report.contains("hmac-sha256, key file")
            && report.contains(c[0]["key_id"].as_str().unwrap())
    );

    // A span whose `text` does not match: the message names file, line and field, not the text.
    let bad = w.path("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"a\", \"text\": \"Patient Maria Gonzalez, MRN 4471923.\", \"spans\": [{\"start\": 8, \"end\": 22, \"label\": \"NAME\", \"text\": \"Maria Gonzales\"}]}\n",
    )
    .unwrap();
    let before = snapshot(w.tmp.path());
    for o in [
        sani(&[
            "eval",
            "--model",
            w.m(),
            "--sensitive",
            bad.to_str().unwrap(),
        ]),
        sani(&[
            "sanitize",
            "--model",
            w.m(),
            "--sensitive",
            bad.to_str().unwrap(),
            "--out",
            w.path("out").to_str().unwrap(),
        ]),
    ] {
        assert_refused(
            &o,
            &[
                "bad.jsonl:1:",
                "spans[0].text",
                "first difference at char 13",
            ],
            &before,
            w.tmp.path(),
        );
        assert!(!stderr(&o).contains("Gonzal") && !stderr(&o).contains("Maria"));
    }
    let o = sani(&[
        "eval",
        "--model",
        w.m(),
        "--sensitive",
        bad.to_str().unwrap(),
        "--show-text",
    ]);
    assert!(stderr(&o).contains("\"Maria Gonzales\""), "{}", stderr(&o));
}

#[test]
fn option_bounds_and_negative_values() {
    let w = Work::new("gpt2_f32");
    let before = snapshot(w.tmp.path());
    let cases: &[(&[&str], &str)] = &[
        (&["--lr", "-1"], "--lr must be a positive number, got -1"),
        (&["--max-grad-norm", "-1"], "--max-grad-norm must be zero"),
        (
            &["--weight-decay", "-0.1"],
            "--weight-decay must be zero or positive",
        ),
        (
            &["--erase-layers", "99"],
            "--erase-layers 99: the model has only 2 layers",
        ),
        (
            &["--train-scope", "last:5"],
            "--train-scope last:5: the model has only 2 layers",
        ),
        (
            &["--threads", "1000"],
            "--threads 1000: must be between 1 and the",
        ),
    ];
    for (extra, wanted) in cases {
        assert_refused(&w.sanitize(extra), &[wanted], &before, w.tmp.path());
    }
    let o = w.eval(&["--max-rate", "-0.5"]);
    assert_refused(
        &o,
        &["--max-rate must be between 0 and 1"],
        &before,
        w.tmp.path(),
    );
}

#[cfg(unix)]
#[test]
fn outputs_keep_the_input_permissions_and_int_tensors_are_named() {
    use std::os::unix::fs::PermissionsExt;
    let w = Work::new("gpt2_f32");
    let weights = w.model.join("model.safetensors");
    std::fs::set_permissions(&weights, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = w.sanitize(&["--epochs", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&w.path("out/model.safetensors")), 0o644);

    edit_tensor(&weights, "transformer.wpe.weight", Dtype::I32, |_| {});
    let before = snapshot(w.tmp.path());
    let o = w.eval(&[]);
    assert_refused(
        &o,
        &["transformer.wpe.weight", "stored as I32", "floating-point"],
        &before,
        w.tmp.path(),
    );
}

#[test]
fn a_ten_thousand_span_document_is_measured_in_bounded_memory() {
    // One document of ~1 MB with spans all along it: the prompt window is bounded, so this
    // takes well under a second (it was quadratic in the document length).
    let w = Work::new("gpt2_f32");
    let mut text = String::new();
    let mut spans = Vec::new();
    while text.len() < 1_000_000 {
        text += "the patient was seen today with a mild cough and no fever, follow up. Dr. ";
        let start = text.chars().count();
        text += "Ana Lima";
        if spans.len() < 40 {
            spans.push(serde_json::json!({"start": start, "end": start + 8, "label": "NAME"}));
        }
        text += ". ";
    }
    let doc = serde_json::json!({"id": "long", "text": text, "spans": spans});
    let path = w.path("long.jsonl");
    std::fs::write(&path, doc.to_string() + "\n").unwrap();
    let started = std::time::Instant::now();
    let o = sani(&[
        "eval",
        "--model",
        w.m(),
        "--sensitive",
        path.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(started.elapsed().as_secs() < 60);
}

/// Deterministic pseudo-random bytes (xorshift), so the randomized tests below are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Mutations of a valid input: flipped bytes, cut tails, inserted JSON fragments.
fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    const PIECES: &[&str] = &[
        "\"",
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "-1",
        "1e400",
        "null",
        "\"../x\"",
        "\"start\": 9999999999999",
        "\\u0000",
        "\u{feff}",
        "\n",
        "\"end\": -3",
        "18446744073709551616",
        "\"/etc/passwd\"",
    ];
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(4) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            1 => v.truncate(rng.below(v.len() + 1)),
            2 => {
                let i = rng.below(v.len() + 1);
                let p = PIECES[rng.below(PIECES.len())].as_bytes();
                v.splice(i..i, p.iter().copied());
            }
            _ if !v.is_empty() => {
                let i = rng.below(v.len());
                let j = (i + rng.below(16)).min(v.len());
                v.drain(i..j);
            }
            _ => {}
        }
    }
    v
}

#[test]
fn randomized_spans_files_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = generate_notes(&SynthConfig {
        n_notes: 2,
        seed: 9,
        id_prefix: "r".into(),
    });
    let valid = notes_to_jsonl(&docs);
    let refs = "{\"id\": \"r-0\", \"start\": 0, \"end\": 4, \"label\": \"X\"}\n";
    let (doc_path, ref_path) = (tmp.path().join("docs.jsonl"), tmp.path().join("refs.jsonl"));
    let mut rng = Rng(0x5eed_1234);
    let mut errors = 0;
    for i in 0..400 {
        let bytes = mutate(&mut rng, valid.as_bytes());
        std::fs::write(&doc_path, &bytes).unwrap();
        let r = std::panic::catch_unwind(|| {
            if i % 2 == 0 {
                sani::data::spans::load_documents(Some(&doc_path), None, None).map(|_| ())
            } else {
                std::fs::write(&ref_path, mutate(&mut Rng(i as u64 + 1), refs.as_bytes())).unwrap();
                sani::data::spans::load_documents(Some(&ref_path), Some(&doc_path), None)
                    .map(|_| ())
            }
        });
        let r = r.unwrap_or_else(|_| {
            panic!("panic on input {i}: {:?}", String::from_utf8_lossy(&bytes))
        });
        if let Err(e) = r {
            errors += 1;
            let msg = format!("{e:#}");
            assert!(
                msg.contains("docs.jsonl") || msg.contains("refs.jsonl"),
                "{msg}"
            );
        }
    }
    assert!(
        errors > 100,
        "the mutations should break most inputs ({errors})"
    );
}

#[test]
fn randomized_checkpoint_headers_and_indexes_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    let src = fixture("llama3_sharded");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let index = std::fs::read(src.join("model.safetensors.index.json")).unwrap();
    let shard_name = "model-00001-of-00003.safetensors";
    let shard = std::fs::read(src.join(shard_name)).unwrap();
    let header_len = 8 + u64::from_le_bytes(shard[..8].try_into().unwrap()) as usize;
    let mut rng = Rng(0xc0ffee);
    for i in 0..200 {
        let (name, bytes) = if i % 2 == 0 {
            let mut head = mutate(&mut rng, &shard[8..header_len]);
            if rng.below(2) == 0 {
                head = shard[8..header_len].to_vec();
                let at = rng.below(head.len());
                head[at] = b"0123456789\",:{}[]"[rng.below(17)];
            }
            let mut b = (head.len() as u64).to_le_bytes().to_vec();
            b.extend(head);
            b.extend_from_slice(&shard[header_len..]);
            (shard_name, b)
        } else {
            ("model.safetensors.index.json", mutate(&mut rng, &index))
        };
        std::fs::write(dir.join(name), &bytes).unwrap();
        let r = std::panic::catch_unwind(|| {
            sani::io::checkpoint::Checkpoint::load(&dir, &candle_core::Device::Cpu)
                .and_then(|c| sani::model::Model::load_frozen(&c).map(|_| ()))
        });
        assert!(r.is_ok(), "panic on mutated {name} #{i}");
        std::fs::write(dir.join(name), if i % 2 == 0 { &shard } else { &index }).unwrap();
    }
    // Nothing outside the model dir was touched.
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}
