//! Checkpoint I/O: reads a Hugging Face model directory (single or sharded safetensors, f32, f16
//! or bf16) into f32 `Var`s keyed by their HF names, and writes it back with exactly the input's
//! tensor names, shapes, dtypes and shard layout.
//!
//! Tensors are computed in f32; each one remembers its stored dtype and shard so that the writer
//! can reproduce the layout. An untouched tensor round-trips bit-identically (f16/bf16 -> f32 ->
//! f16/bf16 is exact).

use crate::io::model_files::{check_file_name, check_links_stay_inside};
use crate::model::config::ModelConfig;
use crate::model::init::FreshWeights;
use crate::model::{Model, WeightSource};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

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
    /// Only names, dtypes and shapes were read (see [`Checkpoint::load_headers`]): no var, no
    /// write.
    headers_only: bool,
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
            check_file_name(&index, &format!("weight_map.{name}"), file)?;
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
        Self::load_impl(dir, device, false)
    }

    /// The checkpoint's names, dtypes and shapes, with every float tensor checked for NaN and
    /// Inf as by [`Checkpoint::load`], but no tensor kept: memory stays near one file page
    /// window, not the model. [`Model::load_frozen`] builds on it (shapes checked, no compute);
    /// [`Checkpoint::var`] and writing refuse it. For `sani inspect`.
    pub fn load_headers(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_impl(dir, device, true)
    }

    fn load_impl(dir: &Path, device: &Device, headers_only: bool) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: not a directory (or not readable)", dir.display());
        }
        check_links_stay_inside(dir)?;
        let config = ModelConfig::from_dir(dir)?;
        let (shards, sharded) = weight_files(dir)?;
        let varmap = VarMap::new();
        let mut entries = Vec::new();
        let mut raw = HashMap::new();
        let mut seen = HashSet::new();
        {
            let mut vars = varmap.data().lock().expect("fresh varmap");
            for shard in &shards {
                let path = dir.join(shard);
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("{}: cannot read weight file", path.display()))?;
                // SAFETY: the file is only read, and each tensor is copied out before its pages
                // are dropped; sani never writes into an input model. (A file truncated by
                // another process meanwhile would fault, as with any mmap reader.)
                let bytes = unsafe { memmap2::Mmap::map(&file) }
                    .with_context(|| format!("{}: cannot map weight file", path.display()))?;
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
                    if !seen.insert(name.clone()) {
                        bail!("{}: tensor `{name}` is stored twice", path.display());
                    }
                    let dtype = view.dtype();
                    if candle_dtype(dtype).is_some() {
                        check_finite(dtype, view.data()).map_err(|what| {
                            anyhow!(
                                "{}: tensor `{name}` holds {what}; refusing to load a broken \
                                 model (was it trained with too high a learning rate?)",
                                path.display()
                            )
                        })?;
                    }
                    if !headers_only && candle_dtype(dtype).is_some() {
                        let t = view
                            .load(&Device::Cpu)
                            .and_then(|t| t.to_dtype(DType::F32))
                            .and_then(|t| t.to_device(device))
                            .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
                        vars.insert(name.clone(), Var::from_tensor(&t)?);
                    } else if !headers_only {
                        raw.insert(name.clone(), view.data().to_vec());
                    }
                    entries.push(TensorEntry {
                        name,
                        dtype,
                        shape: view.shape().to_vec(),
                        shard: shard.clone(),
                    });
                    // The tensor is copied: let the kernel drop its file pages, so the peak is
                    // the model in f32, not that plus the file.
                    let data = view.data();
                    let offset = data.as_ptr() as usize - bytes.as_ptr() as usize;
                    // SAFETY: a read-only private mapping of an unmodified file: dropped pages
                    // are read again from the file if touched.
                    let _ = unsafe {
                        bytes.unchecked_advise_range(
                            memmap2::UncheckedAdvice::DontNeed,
                            offset,
                            data.len(),
                        )
                    };
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
            headers_only,
        })
    }

    /// A freshly initialized f32 model for `config` (HF initialization, deterministic under
    /// `seed`), stored as a single `model.safetensors`.
    pub fn fresh(config: ModelConfig, device: &Device, seed: u64) -> Result<Self> {
        let vars = FreshWeights::new(&config, device, seed).draw_all()?;
        Ok(Self::from_vars(config, vars, device))
    }

    /// A new single-file f32 checkpoint holding `vars` (a freshly initialized model).
    pub fn from_vars(config: ModelConfig, vars: BTreeMap<String, Var>, device: &Device) -> Self {
        let entries = vars
            .iter()
            .map(|(name, var)| TensorEntry {
                name: name.clone(),
                dtype: StDtype::F32,
                shape: var.dims().to_vec(),
                shard: SINGLE_FILE.to_string(),
            })
            .collect();
        let varmap = VarMap::new();
        varmap.data().lock().expect("fresh varmap").extend(vars);
        Checkpoint {
            dir: PathBuf::from("(new model)"),
            config,
            entries,
            shards: vec![SINGLE_FILE.to_string()],
            sharded: false,
            varmap,
            raw: HashMap::new(),
            index_metadata: serde_json::Map::new(),
            device: device.clone(),
            side_files: None,
            headers_only: false,
        }
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entry(name).is_some()
    }

    /// The entry of float tensor `name` if it has `shape`; an error naming the file otherwise.
    fn float_entry(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let e = self
            .entry(name)
            .ok_or_else(|| anyhow!("{}: missing tensor `{name}`", self.weights_label()))?;
        if candle_dtype(e.dtype).is_none() {
            bail!(
                "{}: tensor `{name}` is stored as {:?}; sani needs a floating-point tensor \
                 (F32, F16, BF16 or F64) there",
                self.file_of(name),
                e.dtype
            );
        }
        if e.shape != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?} but config.json implies {:?}",
                self.file_of(name),
                e.shape,
                shape
            );
        }
        Ok(e)
    }

    /// The var stored under `name`; an error naming the file when it is missing or has the wrong shape.
    pub fn var(&self, name: &str, shape: &[usize]) -> Result<Var> {
        if self.headers_only {
            self.float_entry(name, shape)?;
            bail!("{}: only the headers were loaded", self.dir.display());
        }
        let var = self
            .varmap
            .data()
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| match self.entry(name) {
                Some(e) => anyhow!(
                    "{}: tensor `{name}` is stored as {:?}; sani needs a floating-point tensor \
                     (F32, F16, BF16 or F64) there",
                    self.file_of(name),
                    e.dtype
                ),
                None => anyhow!("{}: missing tensor `{name}`", self.weights_label()),
            })?;
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
        crate::io::hash::sha256_files(&self.dir, &self.shards)
    }

    /// Writes the weights (same names, shapes, dtypes, shards) and copies every other file of the
    /// input directory except weights in other formats. `dir` must exist and be empty.
    pub fn write_to(&self, dir: &Path, provenance: &BTreeMap<String, String>) -> Result<()> {
        if self.headers_only {
            bail!(
                "{}: only the headers were loaded; nothing to write",
                self.dir.display()
            );
        }
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
            let input = self.side_files.as_ref().map(|d| d.join(shard));
            copy_mode(input.as_deref(), &path)?;
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

impl WeightSource for Checkpoint {
    fn var(&self, name: &str, shape: &[usize]) -> Result<Var> {
        Checkpoint::var(self, name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
    fn frozen(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if !self.headers_only {
            return Ok(Checkpoint::var(self, name, shape)?.as_tensor().detach());
        }
        self.float_entry(name, shape)?;
        // One zero seen through a broadcast: the right shape, no memory.
        Ok(Tensor::zeros((), DType::F32, &self.device)?.broadcast_as(shape)?)
    }
}

impl Model {
    /// Builds the model from a checkpoint; `trainable(name)` decides which tensors get gradients.
    /// Fails on a missing tensor, a shape mismatch, or a tensor the model does not use.
    pub fn load(ckpt: &Checkpoint, trainable: &dyn Fn(&str) -> bool) -> Result<Self> {
        Self::load_with_lora(ckpt, trainable, None)
    }

    /// Loads with LoRA adapters on the projections `lora` targets (see [`crate::nn::lora`]).
    pub fn load_with_lora(
        ckpt: &Checkpoint,
        trainable: &dyn Fn(&str) -> bool,
        lora: Option<&crate::nn::lora::LoraConfig>,
    ) -> Result<Self> {
        let model = Self::from_source_with_lora(ckpt, &ckpt.config, &ckpt.device, trainable, lora)?;
        let spec = ckpt.config.spec();
        ckpt.check_no_extra(model.loaded_names(), |n| spec.is_known_buffer(n))?;
        Ok(model)
    }

    /// Loads with every tensor frozen (inference).
    pub fn load_frozen(ckpt: &Checkpoint) -> Result<Self> {
        Self::load(ckpt, &|_| false)
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

/// Gives `path` the permission bits of `like` (the input shard), or rw-r--r-- for a new model:
/// the safetensors writer creates files readable by the owner only.
fn copy_mode(like: Option<&Path>, path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = like
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0o644, |m| m.permissions().mode() & 0o777);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("{}: cannot set permissions", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = (like, path);
    Ok(())
}

/// Ok when every value of a float tensor (raw little-endian bytes of `dtype`) is finite, else a
/// description of the first non-finite one and their count. Reads the exponent bits only.
pub fn check_finite(dtype: StDtype, bytes: &[u8]) -> std::result::Result<(), String> {
    let (width, exp_mask, mant_mask): (usize, u64, u64) = match dtype {
        StDtype::F16 => (2, 0x7c00, 0x03ff),
        StDtype::BF16 => (2, 0x7f80, 0x007f),
        StDtype::F32 => (4, 0x7f80_0000, 0x007f_ffff),
        StDtype::F64 => (8, 0x7ff0_0000_0000_0000, 0x000f_ffff_ffff_ffff),
        _ => return Ok(()),
    };
    let mut first = None;
    let mut count = 0usize;
    for (i, chunk) in bytes.chunks_exact(width).enumerate() {
        let mut buf = [0u8; 8];
        buf[..width].copy_from_slice(chunk);
        let bits = u64::from_le_bytes(buf);
        if bits & exp_mask == exp_mask {
            count += 1;
            if first.is_none() {
                let kind = if bits & mant_mask == 0 { "Inf" } else { "NaN" };
                first = Some((i, kind));
            }
        }
    }
    match first {
        None => Ok(()),
        Some((i, kind)) => Err(format!(
            "{count} non-finite value{} (the first, element {i}, is {kind})",
            if count == 1 { "" } else { "s" }
        )),
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
