//! Checkpoint I/O: byte-exact save/reload of every fixture, clear errors on bad input, and the
//! offline Hugging Face cache lookup.

mod common;

use candle_core::{Device, Tensor};
use common::{fixture, max_abs_diff};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sani::io::checkpoint::Checkpoint;
use sani::io::hub::resolve_model_dir;
use sani::model::Model;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

const FIXTURES: &[&str] = &[
    "gpt2_f32",
    "gpt2_legacy",
    "llama_gqa",
    "llama3_sharded",
    "qwen2_bf16",
    "mistral_f32",
    "qwen3_f32",
    "phi3_f32",
    "gemma3_f32",
    "gemma2_f32",
];

fn provenance() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("sani_version".to_string(), "test".to_string()),
        ("sani_source_sha256".to_string(), "0123abcd".to_string()),
    ])
}

fn files_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn shard_files(dir: &Path) -> Vec<String> {
    files_in(dir)
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect()
}

/// A writable copy of a fixture directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in files_in(&fixture(name)) {
        std::fs::copy(fixture(name).join(&f), tmp.path().join(&f)).unwrap();
    }
    tmp
}

fn load(dir: &Path) -> anyhow::Result<Checkpoint> {
    Checkpoint::load(dir, &Device::Cpu)
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error should mention {p:?}: {msg}");
    }
}

/// Rewrites a safetensors file after `edit` changes its (name, dtype, shape, bytes) list.
fn rewrite_safetensors(
    path: &Path,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    std::fs::write(path, safetensors::serialize(views, Some(metadata)).unwrap()).unwrap();
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Asserts that `out` holds exactly the tensors of `src` (names, dtypes, shapes, bytes) in the same
/// shard files and the same side files; each shard either a byte-for-byte copy or rewritten with
/// format=pt plus the provenance as metadata. Returns the shards that were rewritten.
fn assert_same_checkpoint(src: &Path, out: &Path) -> Vec<String> {
    let shards = shard_files(src);
    assert_eq!(shards, shard_files(out), "{}: shard files", src.display());
    let mut total = 0usize;
    let mut rewritten = Vec::new();
    for shard in &shards {
        let a_bytes = std::fs::read(src.join(shard)).unwrap();
        let b_bytes = std::fs::read(out.join(shard)).unwrap();
        if a_bytes == b_bytes {
            let (n, _) = SafeTensors::read_metadata(&b_bytes).unwrap();
            total += b_bytes.len() - n - 8;
            continue;
        }
        rewritten.push(shard.clone());
        let a = SafeTensors::deserialize(&a_bytes).unwrap();
        let b = SafeTensors::deserialize(&b_bytes).unwrap();
        let names = |s: &SafeTensors| -> BTreeSet<String> {
            s.names().into_iter().map(String::from).collect()
        };
        assert_eq!(names(&a), names(&b), "{shard}: tensor names");
        for name in names(&a) {
            let (x, y) = (a.tensor(&name).unwrap(), b.tensor(&name).unwrap());
            assert_eq!(x.dtype(), y.dtype(), "{shard}: {name} dtype");
            assert_eq!(x.shape(), y.shape(), "{shard}: {name} shape");
            assert!(x.data() == y.data(), "{shard}: {name} data differs");
            total += y.data().len();
        }
        let (_, meta) = SafeTensors::read_metadata(&b_bytes).unwrap();
        let meta = meta.metadata().clone().expect("metadata written");
        assert_eq!(
            meta.get("format").map(String::as_str),
            Some("pt"),
            "{shard}: format"
        );
        for (k, v) in provenance() {
            assert_eq!(meta.get(&k), Some(&v), "{shard}: provenance key {k}");
        }
    }
    let index = sani::io::checkpoint::INDEX_FILE;
    if src.join(index).exists() {
        let (a, b) = (read_json(&src.join(index)), read_json(&out.join(index)));
        assert_eq!(a["weight_map"], b["weight_map"], "weight_map");
        assert_eq!(
            b["metadata"]["total_size"].as_u64(),
            Some(total as u64),
            "total_size"
        );
        // Other index metadata (total_parameters) is carried over.
        for (k, v) in a["metadata"].as_object().unwrap() {
            if k != "total_size" {
                assert_eq!(&b["metadata"][k], v, "index metadata {k}");
            }
        }
    } else {
        assert!(!out.join(index).exists());
    }
    for f in files_in(src)
        .iter()
        .filter(|f| !f.ends_with(".safetensors") && f.as_str() != index)
    {
        let (a, b) = (
            std::fs::read(src.join(f)).unwrap(),
            std::fs::read(out.join(f)),
        );
        assert_eq!(Some(a), b.ok(), "{f} copied unchanged");
    }
    rewritten
}

#[test]
fn every_fixture_round_trips_byte_identically() {
    for name in FIXTURES {
        let ckpt = load(&fixture(name)).unwrap();
        let out = tempfile::tempdir().unwrap();
        let written = ckpt.write_to(out.path(), &provenance()).unwrap();
        // Nothing changed: every shard is the input's file, byte for byte.
        assert_eq!(
            assert_same_checkpoint(&fixture(name), out.path()),
            Vec::<String>::new(),
            "{name}"
        );
        assert!(
            written.iter().all(|w| w.changed_tensors == 0),
            "{written:?}"
        );
        for side in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(out.path().join(side).is_file(), "{name}: {side} copied");
        }
        // And the written directory loads into the same model.
        let again = load(out.path()).unwrap();
        assert_eq!(again.shards, ckpt.shards);
        assert_eq!(again.sharded, ckpt.sharded);
        Model::load(&again, &|_| true).unwrap();
        eprintln!(
            "{name}: {} tensors in {} shard(s) round-trip",
            ckpt.entries.len(),
            ckpt.shards.len()
        );
    }
}

#[test]
fn stale_weight_formats_are_not_copied() {
    let src = copy_fixture("gpt2_f32");
    std::fs::write(src.path().join("pytorch_model.bin"), b"decoy").unwrap();
    std::fs::write(src.path().join("tf_model.h5"), b"decoy").unwrap();
    std::fs::write(src.path().join("special_tokens_map.json"), b"{}").unwrap();
    std::fs::create_dir(src.path().join("subdir")).unwrap();
    let ckpt = load(src.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    ckpt.write_to(out.path(), &provenance()).unwrap();
    let got = files_in(out.path());
    assert!(!got.contains("pytorch_model.bin"), "{got:?}");
    assert!(!got.contains("tf_model.h5"), "{got:?}");
    assert!(!got.contains("subdir"), "{got:?}");
    assert!(got.contains("special_tokens_map.json"), "{got:?}");
    assert!(got.contains("tokenizer.json"), "{got:?}");
}

/// Zeroes row 3 and doubles row 5 of the embedding (exact in every float format), writes, and
/// checks the file keeps the stored dtype and reloads to exactly the modified f32 values.
fn modified_var_round_trips(name: &str, embed: &str, dtype: Dtype) {
    let ckpt = load(&fixture(name)).unwrap();
    let var = ckpt.vars()[embed].clone();
    // A copy: `Var::set` writes into the var's storage in place.
    let t = var.as_tensor().copy().unwrap();
    let (rows, cols) = t.dims2().unwrap();
    assert!(rows > 5);
    let zeros = Tensor::zeros((1, cols), t.dtype(), &Device::Cpu).unwrap();
    let doubled = (t.narrow(0, 5, 1).unwrap() * 2.0).unwrap();
    let new = t.slice_assign(&[3..4, 0..cols], &zeros).unwrap();
    let new = new.slice_assign(&[5..6, 0..cols], &doubled).unwrap();
    var.set(&new).unwrap();

    let out = tempfile::tempdir().unwrap();
    ckpt.write_to(out.path(), &provenance()).unwrap();
    let entry = ckpt.entry(embed).unwrap();
    let bytes = std::fs::read(out.path().join(&entry.shard)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor(embed).unwrap().dtype(),
        dtype,
        "{name}: stored dtype kept"
    );

    let again = load(out.path()).unwrap();
    let before = ckpt.vars();
    let after = again.vars();
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (k, v) in &before {
        let a = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = after[k]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(a == b, "{name}: {k} differs after reload");
    }
    let row3 = after[embed]
        .as_tensor()
        .get(3)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(row3.iter().all(|&x| x == 0.0));
    let row5 = after[embed].as_tensor().get(5).unwrap();
    let want5 = (t.get(5).unwrap() * 2.0).unwrap();
    assert_eq!(
        row5.to_vec1::<f32>().unwrap(),
        want5.to_vec1::<f32>().unwrap()
    );
    // Untouched tensors are still byte-identical to the input.
    let src_bytes = std::fs::read(fixture(name).join(&entry.shard)).unwrap();
    let src = SafeTensors::deserialize(&src_bytes).unwrap();
    for n in src.names() {
        if n != embed {
            assert!(
                src.tensor(n).unwrap().data() == st.tensor(n).unwrap().data(),
                "{name}: {n} changed"
            );
        }
    }
    assert!(src.tensor(embed).unwrap().data() != st.tensor(embed).unwrap().data());
    // Only the shard holding the change is rewritten (with provenance); the others are copies.
    assert_eq!(
        assert_same_checkpoint_but(&fixture(name), out.path(), embed),
        vec![entry.shard.clone()],
        "{name}"
    );
}

/// [`assert_same_checkpoint`] for a copy in which only tensor `changed` differs: returns the
/// rewritten shards.
fn assert_same_checkpoint_but(src: &Path, out: &Path, changed: &str) -> Vec<String> {
    let edited = tempfile::tempdir().unwrap();
    for f in files_in(src) {
        std::fs::copy(src.join(&f), edited.path().join(&f)).unwrap();
    }
    let ckpt = load(out).unwrap();
    let shard = ckpt.entry(changed).unwrap().shard.clone();
    // The expected input: the source with `changed` taken from the output.
    rewrite_safetensors(&edited.path().join(&shard), |tensors| {
        let bytes = std::fs::read(out.join(&shard)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for t in tensors.iter_mut().filter(|t| t.0 == changed) {
            t.3 = st.tensor(changed).unwrap().data().to_vec();
        }
    });
    assert_same_checkpoint(edited.path(), out)
}

#[test]
fn modified_vars_are_written_in_the_stored_dtype() {
    modified_var_round_trips("qwen2_bf16", "model.embed_tokens.weight", Dtype::BF16);
    modified_var_round_trips("llama3_sharded", "model.embed_tokens.weight", Dtype::F16);
    modified_var_round_trips("gpt2_f32", "transformer.wte.weight", Dtype::F32);
}

// ---- bad input -------------------------------------------------------------------------------

#[test]
fn missing_config() {
    let dir = copy_fixture("llama_gqa");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(
        &msg,
        &[
            &dir.path().join("config.json").display().to_string(),
            "cannot read",
        ],
    );
}

#[test]
fn unknown_architecture() {
    let dir = copy_fixture("llama_gqa");
    let path = dir.path().join("config.json");
    let mut cfg = read_json(&path);
    cfg["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    cfg["model_type"] = serde_json::json!("falcon");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(
        &msg,
        &[
            &path.display().to_string(),
            "FalconForCausalLM",
            "GPT2LMHeadModel",
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
        ],
    );
    // Only a model_type, unknown.
    cfg.as_object_mut().unwrap().remove("architectures");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(
        &msg,
        &[&path.display().to_string(), "falcon", "LlamaForCausalLM"],
    );
}

#[test]
fn invalid_json_config() {
    let dir = copy_fixture("gpt2_f32");
    let path = dir.path().join("config.json");
    std::fs::write(&path, "{\"architectures\": [\"GPT2LMHeadModel\"], ").unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(&msg, &[&path.display().to_string(), "not valid JSON"]);
}

#[test]
fn missing_tensor() {
    let dir = copy_fixture("llama_gqa");
    let path = dir.path().join("model.safetensors");
    rewrite_safetensors(&path, |t| {
        t.retain(|(n, ..)| n != "model.layers.1.mlp.up_proj.weight")
    });
    let ckpt = load(dir.path()).unwrap();
    let msg = err_of(Model::load(&ckpt, &|_| true));
    assert_mentions(
        &msg,
        &[
            &path.display().to_string(),
            "missing tensor",
            "model.layers.1.mlp.up_proj.weight",
        ],
    );
}

#[test]
fn extra_tensor() {
    let dir = copy_fixture("qwen2_bf16");
    let path = dir.path().join("model.safetensors");
    rewrite_safetensors(&path, |t| {
        t.push((
            "model.layers.0.self_attn.extra.weight".into(),
            Dtype::BF16,
            vec![2, 2],
            vec![0u8; 8],
        ))
    });
    let ckpt = load(dir.path()).unwrap();
    let msg = err_of(Model::load(&ckpt, &|_| true));
    assert_mentions(
        &msg,
        &[
            &path.display().to_string(),
            "unexpected tensor",
            "model.layers.0.self_attn.extra.weight",
            "Qwen2ForCausalLM",
        ],
    );
}

#[test]
fn shape_mismatch() {
    let dir = copy_fixture("gpt2_f32");
    let path = dir.path().join("model.safetensors");
    let name = "transformer.h.1.mlp.c_fc.bias";
    rewrite_safetensors(&path, |t| {
        let e = t.iter_mut().find(|(n, ..)| n == name).unwrap();
        let n = e.2[0] - 1;
        e.2 = vec![n];
        e.3.truncate(n * 4);
    });
    let ckpt = load(dir.path()).unwrap();
    let msg = err_of(Model::load(&ckpt, &|_| true));
    let expected = [
        &path.display().to_string(),
        name,
        "has shape",
        "config.json implies",
    ];
    assert_mentions(&msg, &expected);
    // Headers alone (`sani inspect`) find the same mismatch.
    let headers = Checkpoint::load_headers(dir.path(), &Device::Cpu).unwrap();
    assert_mentions(&err_of(Model::load_frozen(&headers)), &expected);
}

#[test]
fn headers_only_build_every_model_but_hold_no_tensor() {
    for name in FIXTURES {
        let dir = fixture(name);
        let full = load(&dir).unwrap();
        let headers = Checkpoint::load_headers(&dir, &Device::Cpu).unwrap();
        assert!(headers.vars().is_empty(), "{name}");
        assert_eq!(headers.parameter_count(), full.parameter_count(), "{name}");
        let model = Model::load_frozen(&headers).unwrap();
        assert_eq!(model.num_layers(), full.config.num_layers(), "{name}");
        let first = &full.entries[0];
        assert_mentions(
            &err_of(headers.var(&first.name, &first.shape)),
            &["only the headers were loaded"],
        );
        let out = tempfile::tempdir().unwrap();
        assert_mentions(
            &err_of(headers.write_to(out.path(), &provenance())),
            &["only the headers", "nothing to write"],
        );
    }
}

#[test]
fn truncated_weights() {
    let dir = copy_fixture("gpt2_f32");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(&msg, &[&path.display().to_string(), "corrupt or truncated"]);
    // Cut inside the header.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(&msg, &[&path.display().to_string(), "corrupt or truncated"]);
    std::fs::write(&path, b"").unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(&msg, &[&path.display().to_string(), "corrupt or truncated"]);
}

#[test]
fn corrupt_header() {
    let dir = copy_fixture("mistral_f32");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    for (i, b) in bytes[8..40].iter_mut().enumerate() {
        *b = 0xff - i as u8;
    }
    std::fs::write(&path, &bytes).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(&msg, &[&path.display().to_string(), "corrupt or truncated"]);
    // A header length larger than the file.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(&msg, &[&path.display().to_string(), "corrupt or truncated"]);
}

#[test]
fn nonexistent_or_unreadable_dir() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nope");
    let msg = err_of(load(&missing));
    assert_mentions(&msg, &[&missing.display().to_string(), "not a directory"]);
    // A file, not a directory.
    let file = root.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let msg = err_of(load(&file));
    assert_mentions(&msg, &[&file.display().to_string(), "not a directory"]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let dir = copy_fixture("gpt2_f32");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o000)).unwrap();
        // Root reads it anyway; then there is nothing to test.
        let readable = std::fs::read_dir(dir.path()).is_ok();
        let result = load(dir.path());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        if !readable {
            let msg = err_of(result);
            assert_mentions(&msg, &[&dir.path().display().to_string()]);
        }
    }
}

#[test]
fn pytorch_bin_that_is_not_a_torch_zip_is_refused() {
    let dir = copy_fixture("gpt2_f32");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(
        &msg,
        &[
            "pytorch_model.bin",
            "not a zip-format torch.save file",
            "legacy",
        ],
    );
    std::fs::remove_file(dir.path().join("pytorch_model.bin")).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(
        &msg,
        &[
            &dir.path().display().to_string(),
            "no model.safetensors",
            "pytorch_model.bin",
        ],
    );
}

/// `pytorch_model.bin` checkpoints written by torch.save (fixtures of llama_gqa's and
/// qwen2_bf16's weights): the same tensors as the safetensors fixtures, a pickle with anything
/// but tensors refused with the entry named, and the output written as safetensors.
#[test]
fn pytorch_bin_checkpoints_read_as_their_safetensors_twins() {
    for (bin, twin, shards) in [
        ("llama_bin", "llama_gqa", 1),
        ("qwen2_bin_sharded", "qwen2_bf16", 2),
    ] {
        let a = Checkpoint::load(&fixture(bin), &Device::Cpu).unwrap();
        let b = Checkpoint::load(&fixture(twin), &Device::Cpu).unwrap();
        assert!(
            a.from_pickle && a.shards.len() == shards,
            "{bin}: {:?}",
            a.shards
        );
        let layout = |c: &Checkpoint| -> Vec<(String, String, Vec<usize>)> {
            let mut v: Vec<_> = c
                .entries
                .iter()
                .map(|e| (e.name.clone(), format!("{:?}", e.dtype), e.shape.clone()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(layout(&a), layout(&b), "{bin}: names, dtypes, shapes");
        for (name, var) in b.vars() {
            let d = max_abs_diff(var.as_tensor(), a.vars()[&name].as_tensor());
            assert_eq!(d, 0.0, "{bin}: {name}");
        }
        // Written as safetensors, with the same names and dtypes.
        let out = tempfile::tempdir().unwrap();
        let written = a.write_to(out.path(), &provenance()).unwrap();
        assert_eq!(written.len(), shards);
        let files: Vec<String> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|f| f.contains("model"))
            .collect();
        assert!(
            files
                .iter()
                .all(|f| !f.ends_with(".bin") && !f.starts_with("pytorch_model")),
            "{bin}: {files:?}"
        );
        let c = Checkpoint::load(out.path(), &Device::Cpu).unwrap();
        assert!(!c.from_pickle);
        assert_eq!(layout(&c), layout(&b), "{bin}: written layout");
    }
    let msg = err_of(load(&fixture("bin_hostile")));
    assert_mentions(
        &msg,
        &[
            "pytorch_model.bin",
            "`optimizer_hint`",
            "collections.Counter",
            "not a tensor",
        ],
    );
}

#[test]
fn index_problems() {
    // The index lists a shard that does not exist.
    let dir = copy_fixture("llama3_sharded");
    let shard = dir.path().join("model-00002-of-00003.safetensors");
    std::fs::remove_file(&shard).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(
        &msg,
        &[&shard.display().to_string(), "cannot read weight file"],
    );

    // The index points a tensor at a file that is not there.
    let dir = copy_fixture("llama3_sharded");
    let index = dir.path().join(sani::io::checkpoint::INDEX_FILE);
    let mut json = read_json(&index);
    json["weight_map"]["lm_head.weight"] = serde_json::json!("model-00004-of-00003.safetensors");
    std::fs::write(&index, json.to_string()).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(
        &msg,
        &[
            "model-00004-of-00003.safetensors",
            "cannot read weight file",
        ],
    );

    // The index names the wrong shard for a tensor (and no longer lists the shard holding it).
    json["weight_map"]["lm_head.weight"] = serde_json::json!("model-00001-of-00003.safetensors");
    std::fs::write(&index, json.to_string()).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(
        &msg,
        &[
            &index.display().to_string(),
            "lm_head.weight",
            "not stored in model-00001-of-00003",
        ],
    );
    json["weight_map"]["lm_head.weight"] = serde_json::json!("model-00003-of-00003.safetensors");
    json["weight_map"]["model.embed_tokens.weight"] =
        serde_json::json!("model-00002-of-00003.safetensors");
    std::fs::write(&index, json.to_string()).unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(
        &msg,
        &[
            &index.display().to_string(),
            "model.embed_tokens.weight",
            "model-00002-of-00003",
            "stored in model-00001-of-00003",
        ],
    );

    // Invalid index JSON.
    std::fs::write(&index, "{").unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(&msg, &[&index.display().to_string(), "invalid JSON"]);
    std::fs::write(&index, "{}").unwrap();
    let msg = err_of(load(dir.path()));
    assert_mentions(&msg, &[&index.display().to_string(), "weight_map"]);
}

// ---- Hugging Face cache ----------------------------------------------------------------------

/// Lays `fixture` out as huggingface_hub does: blobs, snapshots/<hash>/<file> links to them, and
/// refs/main holding the hash. Returns the snapshot directory.
fn cache_repo(
    cache: &Path,
    repo_id: &str,
    fixture_name: &str,
    hash: &str,
    ref_text: &str,
) -> PathBuf {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snap = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), ref_text).unwrap();
    for (i, f) in files_in(&fixture(fixture_name)).iter().enumerate() {
        let blob = repo.join("blobs").join(format!("{hash}{i:04}"));
        std::fs::copy(fixture(fixture_name).join(f), &blob).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(blob.file_name().unwrap()),
            snap.join(f),
        )
        .unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, snap.join(f)).unwrap();
    }
    snap
}

/// Every assertion that depends on HF_HUB_CACHE / HF_HOME lives in this one test (env vars are
/// process-wide and tests run in parallel).
#[test]
fn hub_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    let hash = "0123456789abcdef0123456789abcdef01234567";
    let snap = cache_repo(cache.path(), "org/tiny-qwen", "qwen2_bf16", hash, hash);
    let hash2 = "89abcdef0123456789abcdef0123456789abcdef";
    let snap2 = cache_repo(
        cache.path(),
        "org/tiny-sharded",
        "llama3_sharded",
        hash2,
        &format!("{hash2}\n"),
    );
    let hash3 = "fedcba9876543210fedcba9876543210fedcba98";
    let snap3 = cache_repo(cache.path(), "org/broken", "llama3_sharded", hash3, hash3);
    // An interrupted download: the link is there, its blob is not.
    let missing_shard = "model-00002-of-00003.safetensors";
    let blob = std::fs::read_link(snap3.join(missing_shard)).unwrap_or_default();
    let _ = std::fs::remove_file(snap3.join(&blob));
    let _ = std::fs::remove_file(snap3.join(missing_shard));

    let saved: Vec<(&str, Option<String>)> = ["HF_HUB_CACHE", "HF_HOME"]
        .iter()
        .map(|k| (*k, std::env::var(k).ok()))
        .collect();
    std::env::set_var("HF_HUB_CACHE", cache.path());
    std::env::remove_var("HF_HOME");

    let result = std::panic::catch_unwind(|| {
        let dir = resolve_model_dir("org/tiny-qwen").unwrap();
        assert_eq!(dir, snap);
        let ckpt = load(&dir).unwrap();
        Model::load(&ckpt, &|_| true).unwrap();
        // Writing from a snapshot of links copies real files.
        let out = tempfile::tempdir().unwrap();
        ckpt.write_to(out.path(), &provenance()).unwrap();
        assert!(!std::fs::symlink_metadata(out.path().join("config.json"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            assert_same_checkpoint(&fixture("qwen2_bf16"), out.path()),
            Vec::<String>::new()
        );

        // A ref with a trailing newline, sharded snapshot.
        let dir = resolve_model_dir("org/tiny-sharded").unwrap();
        assert_eq!(dir, snap2);
        Model::load(&load(&dir).unwrap(), &|_| true).unwrap();

        let msg = err_of(resolve_model_dir("org/absent"));
        assert_mentions(
            &msg,
            &[
                "org/absent",
                &cache.path().display().to_string(),
                "never downloads",
            ],
        );

        let msg = err_of(resolve_model_dir("org/broken"));
        assert_mentions(
            &msg,
            &["org/broken", &snap3.display().to_string(), missing_shard],
        );

        // A local directory wins over the cache; a path that is neither is reported as such.
        assert_eq!(
            resolve_model_dir(fixture("gpt2_f32").to_str().unwrap()).unwrap(),
            fixture("gpt2_f32")
        );
        let msg = err_of(resolve_model_dir("./no/such/dir"));
        assert_mentions(&msg, &["./no/such/dir", "no such model directory"]);

        // HF_HOME/hub when HF_HUB_CACHE is unset.
        let home = tempfile::tempdir().unwrap();
        let snap4 = cache_repo(
            &home.path().join("hub"),
            "org/tiny-qwen",
            "qwen2_bf16",
            hash,
            hash,
        );
        std::env::remove_var("HF_HUB_CACHE");
        std::env::set_var("HF_HOME", home.path());
        assert_eq!(resolve_model_dir("org/tiny-qwen").unwrap(), snap4);
    });

    for (k, v) in saved {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
