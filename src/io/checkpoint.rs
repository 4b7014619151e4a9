//! Checkpoint I/O: reads a Hugging Face model directory (single or sharded safetensors, f32, f16
//! or bf16) into f32 `Var`s keyed by their HF names, and writes it back with exactly the input's
//! tensor names, shapes, dtypes and shard layout.
//!
//! Tensors are computed in f32; each one remembers its stored dtype and shard so that the writer
//! can reproduce the layout. An untouched tensor round-trips bit-identically (f16/bf16 -> f32 ->
//! f16/bf16 is exact).

use crate::model::config::ModelConfig;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one stored tensor lives and how it is stored.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub shard: String,
}

/// A loaded model directory.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// Every stored tensor, sorted by shard then name.
    pub entries: Vec<TensorEntry>,
    /// Shard file names in order (one entry, `model.safetensors`, when not sharded).
    pub shards: Vec<String>,
    pub sharded: bool,
    /// Floating-point tensors as f32 vars on the compute device, keyed by HF name.
    pub varmap: VarMap,
    /// Tensors that are not floating point, kept as their raw little-endian bytes.
    raw: HashMap<String, Vec<u8>>,
    /// The `metadata` object of the input index (e.g. `total_parameters`), written back with
    /// `total_size` recomputed.
    index_metadata: serde_json::Map<String, serde_json::Value>,
    pub device: Device,
    /// Directory whose config, tokenizer and other side files are copied on write (None for a
    /// freshly initialized model: its writer supplies them).
    pub side_files: Option<PathBuf>,
    /// While building a fresh model: missing tensors are created with the HF initialization.
    init_rng: Option<Mutex<StdRng>>,
}

/// Standard deviation of the HF initialization of tensor `name` (None: ones for norm weights,
/// zeros for biases).
pub fn init_std(config: &ModelConfig, name: &str) -> Option<f64> {
    let base = config.initializer_range();
    let is_norm = name.contains("ln_") || name.ends_with("norm.weight");
    if name.ends_with(".bias") || is_norm {
        return None;
    }
    match config {
        // GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        ModelConfig::Gpt2(c) if name.ends_with("c_proj.weight") => {
            Some(base / (2.0 * c.n_layer as f64).sqrt())
        }
        _ => Some(base),
    }
}

/// A tensor of `shape` drawn as HF initializes `name`.
pub fn init_tensor(
    config: &ModelConfig,
    name: &str,
    shape: &[usize],
    rng: &mut StdRng,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = match init_std(config, name) {
        Some(std) => (0..n).map(|_| (normal(rng) * std) as f32).collect(),
        None if name.ends_with(".bias") => vec![0.0; n],
        None => vec![1.0; n],
    };
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn candle_dtype(dtype: StDtype) -> Option<DType> {
    Some(match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        _ => return None,
    })
}

/// The weight files of a model directory: shard names, and whether an index was used.
pub fn weight_files(dir: &Path) -> Result<(Vec<String>, bool)> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("{}: cannot read", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: missing field `weight_map`", index.display()))?;
        let mut shards: Vec<String> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                anyhow!(
                    "{}: field `weight_map.{name}` is not a string",
                    index.display()
                )
            })?;
            if !shards.iter().any(|s| s == file) {
                shards.push(file.to_string());
            }
        }
        shards.sort();
        return Ok((shards, true));
    }
    if dir.join(SINGLE_FILE).is_file() {
        return Ok((vec![SINGLE_FILE.to_string()], false));
    }
    let has_bin = dir.join("pytorch_model.bin").exists();
    bail!(
        "{}: no {SINGLE_FILE} or {INDEX_FILE} found{}",
        dir.display(),
        if has_bin {
            " (pytorch_model.bin is not supported: convert it to safetensors first)"
        } else {
            ""
        }
    )
}

impl Checkpoint {
    /// Loads config and weights from a model directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: not a directory (or not readable)", dir.display());
        }
        let config = ModelConfig::from_dir(dir)?;
        let (shards, sharded) = weight_files(dir)?;
        let varmap = VarMap::new();
        let mut entries = Vec::new();
        let mut raw = HashMap::new();
        {
            let mut vars = varmap.data().lock().expect("fresh varmap");
            for shard in &shards {
                let path = dir.join(shard);
                let bytes = std::fs::read(&path)
                    .with_context(|| format!("{}: cannot read weight file", path.display()))?;
                let st = SafeTensors::deserialize(&bytes).map_err(|e| {
                    anyhow!(
                        "{}: corrupt or truncated safetensors file: {e}",
                        path.display()
                    )
                })?;
                let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
                names.sort();
                for name in names {
                    let view = st.tensor(&name)?;
                    if vars.contains_key(&name) || raw.contains_key(&name) {
                        bail!("{}: tensor `{name}` is stored twice", path.display());
                    }
                    let dtype = view.dtype();
                    if candle_dtype(dtype).is_some() {
                        let t = view
                            .load(&Device::Cpu)
                            .and_then(|t| t.to_dtype(DType::F32))
                            .and_then(|t| t.to_device(device))
                            .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
                        vars.insert(name.clone(), Var::from_tensor(&t)?);
                    } else {
                        raw.insert(name.clone(), view.data().to_vec());
                    }
                    entries.push(TensorEntry {
                        name,
                        dtype,
                        shape: view.shape().to_vec(),
                        shard: shard.clone(),
                    });
                }
            }
        }
        let index_metadata = if sharded {
            check_index_matches(dir, &entries)?
        } else {
            serde_json::Map::new()
        };
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            entries,
            shards,
            sharded,
            varmap,
            raw,
            index_metadata,
            device: device.clone(),
            side_files: Some(dir.to_path_buf()),
            init_rng: None,
        })
    }

    /// A freshly initialized f32 model for `config` (HF initialization, deterministic under `seed`),
    /// stored as a single `model.safetensors`.
    pub fn init(config: ModelConfig, device: &Device, seed: u64) -> Result<Self> {
        let mut ckpt = Checkpoint {
            dir: PathBuf::from("(new model)"),
            config,
            entries: Vec::new(),
            shards: vec![SINGLE_FILE.to_string()],
            sharded: false,
            varmap: VarMap::new(),
            raw: HashMap::new(),
            index_metadata: serde_json::Map::new(),
            device: device.clone(),
            side_files: None,
            init_rng: Some(Mutex::new(StdRng::seed_from_u64(seed))),
        };
        crate::model::Model::load_frozen(&ckpt)?;
        ckpt.init_rng = None;
        ckpt.entries = ckpt
            .vars()
            .into_iter()
            .map(|(name, var)| TensorEntry {
                name,
                dtype: StDtype::F32,
                shape: var.dims().to_vec(),
                shard: SINGLE_FILE.to_string(),
            })
            .collect();
        Ok(ckpt)
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.varmap.data().lock().unwrap().contains_key(name) || self.raw.contains_key(name)
    }

    /// The var stored under `name`; an error naming the file when it is missing or has the wrong shape.
    pub fn var(&self, name: &str, shape: &[usize]) -> Result<Var> {
        if let Some(rng) = &self.init_rng {
            let mut vars = self.varmap.data().lock().unwrap();
            if !vars.contains_key(name) {
                let t = init_tensor(
                    &self.config,
                    name,
                    shape,
                    &mut rng.lock().unwrap(),
                    &self.device,
                )?;
                vars.insert(name.to_string(), Var::from_tensor(&t)?);
            }
        }
        let var = self
            .varmap
            .data()
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("{}: missing tensor `{name}`", self.weights_label()))?;
        if var.dims() != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?} but config.json implies {:?}",
                self.file_of(name),
                var.dims(),
                shape
            );
        }
        Ok(var)
    }

    /// All float vars, sorted by name.
    pub fn vars(&self) -> BTreeMap<String, Var> {
        self.varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn weights_label(&self) -> String {
        let file = if self.sharded {
            INDEX_FILE
        } else {
            SINGLE_FILE
        };
        self.dir.join(file).display().to_string()
    }

    fn file_of(&self, name: &str) -> String {
        match self.entry(name) {
            Some(e) => self.dir.join(&e.shard).display().to_string(),
            None => self.weights_label(),
        }
    }

    /// Fails when the checkpoint holds tensors the model did not use, other than known buffers.
    pub fn check_no_extra(
        &self,
        used: &HashSet<String>,
        allowed_extra: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let extra: Vec<&str> = self
            .entries
            .iter()
            .map(|e| e.name.as_str())
            .filter(|n| !used.contains(*n) && !allowed_extra(n))
            .collect();
        if let Some(first) = extra.first() {
            bail!(
                "{}: unexpected tensor `{first}`{} not used by {}",
                self.file_of(first),
                if extra.len() > 1 {
                    format!(" (and {} more)", extra.len() - 1)
                } else {
                    String::new()
                },
                self.config.architecture()
            );
        }
        Ok(())
    }

    pub fn parameter_count(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// SHA-256 over the weight files, in shard order.
    pub fn weights_sha256(&self) -> Result<String> {
        sha256_files(&self.dir, &self.shards)
    }

    /// Writes the weights (same names, shapes, dtypes, shards) and copies every other file of the
    /// input directory except weights in other formats. `dir` must exist and be empty.
    pub fn write_to(&self, dir: &Path, provenance: &BTreeMap<String, String>) -> Result<()> {
        let mut metadata: HashMap<String, String> = provenance
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        metadata.insert("format".into(), "pt".into());
        let vars = self.vars();
        let mut total_size = 0usize;
        let mut weight_map = BTreeMap::new();
        for shard in &self.shards {
            let mut views = Vec::new();
            for e in self.entries.iter().filter(|e| &e.shard == shard) {
                let view = match self.raw.get(&e.name) {
                    Some(bytes) => OutTensor::Raw {
                        dtype: e.dtype,
                        shape: e.shape.clone(),
                        data: bytes,
                    },
                    None => {
                        let dt = candle_dtype(e.dtype).expect("float tensors are vars");
                        let t = vars[&e.name]
                            .as_tensor()
                            .to_device(&Device::Cpu)?
                            .to_dtype(dt)?;
                        OutTensor::Candle(t)
                    }
                };
                total_size += view.data_len();
                weight_map.insert(e.name.clone(), shard.clone());
                views.push((e.name.clone(), view));
            }
            let path = dir.join(shard);
            safetensors::tensor::serialize_to_file(views, Some(metadata.clone()), &path)
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        if self.sharded {
            let mut index_metadata = self.index_metadata.clone();
            index_metadata.insert("total_size".into(), total_size.into());
            let index = serde_json::json!({
                "metadata": index_metadata,
                "weight_map": weight_map,
            });
            let path = dir.join(INDEX_FILE);
            std::fs::write(&path, serde_json::to_string_pretty(&index)? + "\n")
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        match &self.side_files {
            Some(src) => copy_side_files(src, dir),
            None => Ok(()),
        }
    }
}

/// Checks that every tensor the index lists is stored in the shard it names; returns the index's
/// `metadata` object.
fn check_index_matches(
    dir: &Path,
    entries: &[TensorEntry],
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let index = dir.join(INDEX_FILE);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
    let map = json["weight_map"]
        .as_object()
        .expect("checked by weight_files");
    for (name, file) in map {
        match entries.iter().find(|e| &e.name == name) {
            None => bail!(
                "{}: `{name}` is listed in weight_map but not stored in {}",
                index.display(),
                file.as_str().unwrap_or("?")
            ),
            Some(e) if Some(e.shard.as_str()) != file.as_str() => bail!(
                "{}: `{name}` is listed in {} but stored in {}",
                index.display(),
                file.as_str().unwrap_or("?"),
                e.shard
            ),
            _ => {}
        }
    }
    Ok(json
        .get("metadata")
        .and_then(|m| m.as_object())
        .cloned()
        .unwrap_or_default())
}

/// A tensor to serialize: either a candle tensor in its stored dtype or raw bytes carried through.
enum OutTensor<'a> {
    Candle(Tensor),
    Raw {
        dtype: StDtype,
        shape: Vec<usize>,
        data: &'a [u8],
    },
}

impl View for OutTensor<'_> {
    fn dtype(&self) -> StDtype {
        match self {
            OutTensor::Candle(t) => View::dtype(t),
            OutTensor::Raw { dtype, .. } => *dtype,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::Candle(t) => t.dims(),
            OutTensor::Raw { shape, .. } => shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutTensor::Candle(t) => View::data(t),
            OutTensor::Raw { data, .. } => Cow::Borrowed(data),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            OutTensor::Candle(t) => View::data_len(t),
            OutTensor::Raw { data, .. } => data.len(),
        }
    }
}

/// Weight formats that must not be copied beside rewritten safetensors (they would be stale).
fn is_weight_file(name: &str) -> bool {
    const EXTS: &[&str] = &[
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".gguf",
        ".onnx",
    ];
    name == INDEX_FILE
        || name.ends_with(".index.json")
        || EXTS.iter().any(|ext| name.ends_with(ext))
        || name == crate::io::json::SANITIZE_REPORT_FILE
}

/// Copies config, generation config, tokenizer files and any other plain file of `src` to `dst`.
pub fn copy_side_files(src: &Path, dst: &Path) -> Result<()> {
    for entry in
        std::fs::read_dir(src).with_context(|| format!("{}: cannot list", src.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        if !path.is_file() || is_weight_file(&name) {
            continue;
        }
        std::fs::copy(&path, dst.join(&name))
            .with_context(|| format!("{}: cannot copy to {}", path.display(), dst.display()))?;
    }
    Ok(())
}

pub fn sha256_files(dir: &Path, files: &[String]) -> Result<String> {
    let mut hasher = Sha256::new();
    for f in files {
        let path = dir.join(f);
        let mut file = std::fs::File::open(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        std::io::copy(&mut file, &mut hasher)?;
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Resolves `--model`: a local directory, or a hub repo id found in the local Hugging Face cache
/// (`HF_HOME` / `HF_HUB_CACHE`). `sani` never downloads.
pub fn resolve_model_dir(model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        if !path.is_dir() {
            bail!("{model}: --model must be a model directory, not a file");
        }
        return Ok(path.to_path_buf());
    }
    let looks_like_repo =
        model.split('/').count() == 2 && !model.starts_with('.') && !model.ends_with('/');
    if !looks_like_repo {
        bail!("{model}: no such model directory");
    }
    let cache = hub_cache();
    let not_cached = || {
        anyhow!(
            "{model}: not a local directory and not in the Hugging Face cache at {} \
             (sani never downloads: fetch it with `hf download {model}` where there is network, \
             or pass a local directory)",
            cache.path().display()
        )
    };
    // The layout huggingface_hub writes: models--org--name/refs/main holds the commit hash of
    // models--org--name/snapshots/<hash>/. Read it ourselves so that a trailing newline is fine.
    let repo_dir = cache
        .path()
        .join(format!("models--{}", model.replace('/', "--")));
    let hash =
        std::fs::read_to_string(repo_dir.join("refs").join("main")).map_err(|_| not_cached())?;
    let dir = repo_dir.join("snapshots").join(hash.trim());
    if !dir.is_dir() {
        return Err(not_cached());
    }
    if !dir.join("config.json").is_file() {
        bail!(
            "{model}: cached snapshot {} lacks config.json",
            dir.display()
        );
    }
    let (shards, _) = weight_files(&dir)
        .with_context(|| format!("{model}: cached snapshot {} is incomplete", dir.display()))?;
    for shard in shards {
        if !dir.join(&shard).is_file() {
            bail!("{model}: cached snapshot {} lacks {shard}", dir.display());
        }
    }
    Ok(dir)
}

fn hub_cache() -> hf_hub::Cache {
    if let Ok(dir) = std::env::var("HF_HUB_CACHE") {
        return hf_hub::Cache::new(PathBuf::from(dir));
    }
    hf_hub::Cache::from_env()
}
