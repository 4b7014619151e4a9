//! Checkpoint I/O: reads a Hugging Face model directory (single or sharded safetensors, f32, f16
//! or bf16) into f32 `Var`s keyed by their HF names, and writes it back with exactly the input's
//! tensor names, shapes, dtypes and shard layout.
//!
//! Tensors are computed in f32; each one remembers its stored dtype and shard so that the writer
//! can reproduce the layout. The weight files stay memory-mapped: [`Checkpoint::open`] reads a
//! tensor only when it is first asked for (erasure touches a few blocks, so memory stays near
//! those tensors, not the model), and the writer copies every shard whose tensors all still hold
//! their stored values byte for byte (its metadata included), rewriting only the others.

use crate::io::model_files::{check_file_name, check_links_stay_inside};
use crate::io::pickle;
use crate::model::config::ModelConfig;
use crate::model::init::FreshWeights;
use crate::model::{Model, WeightSource};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// PyTorch pickle checkpoints, read (see [`crate::io::pickle`]) and written as safetensors.
pub const PICKLE_FILE: &str = "pytorch_model.bin";
pub const PICKLE_INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// Where one stored tensor lives and how it is stored.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub shard: String,
    /// The tensor's bytes within its (mapped) shard file; empty for a model made in memory.
    pub bytes: Range<usize>,
}

/// Which tensors a checkpoint holds in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Residency {
    /// Every float tensor, read at load.
    All,
    /// Each float tensor from its mapped file when first asked for.
    OnDemand,
    /// None: names, dtypes and shapes only.
    HeadersOnly,
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
    /// Floating-point tensors read so far, as f32 vars on the compute device, keyed by HF name.
    pub varmap: VarMap,
    /// The input's weight files, mapped read-only, by shard name (empty for a model made in
    /// memory).
    files: HashMap<String, memmap2::Mmap>,
    /// The `metadata` object of the input index (e.g. `total_parameters`), written back with
    /// `total_size` recomputed.
    index_metadata: serde_json::Map<String, serde_json::Value>,
    pub device: Device,
    /// Directory whose config, tokenizer and other side files are copied on write (None for a
    /// freshly initialized model: its writer supplies them).
    pub side_files: Option<PathBuf>,
    residency: Residency,
    /// The PEFT adapter merged into the vars (`--adapter-dir`), if any.
    pub adapter: Option<crate::io::peft::MergedAdapter>,
    /// The weight files as the input stores them (`shards` are the output's names).
    pub input_files: Vec<String>,
    /// The input is a PyTorch pickle checkpoint: read into memory, written as safetensors.
    pub from_pickle: bool,
}

impl Checkpoint {
    /// Parameters stored in the checkpoint (elements of every tensor).
    pub fn num_params(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }
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
    let mut index = dir.join(INDEX_FILE);
    if !index.is_file() && !dir.join(SINGLE_FILE).is_file() && dir.join(PICKLE_INDEX_FILE).is_file()
    {
        index = dir.join(PICKLE_INDEX_FILE);
    }
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
    if dir.join(PICKLE_FILE).is_file() {
        return Ok((vec![PICKLE_FILE.to_string()], false));
    }
    bail!(
        "{}: no {SINGLE_FILE}, {INDEX_FILE}, {PICKLE_FILE} or {PICKLE_INDEX_FILE} found",
        dir.display(),
    )
}

impl Checkpoint {
    /// Loads config and every weight from a model directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_impl(dir, device, Residency::All)
    }

    /// Opens a model directory as [`Checkpoint::load`] does (same checks), reading each tensor
    /// from its mapped file only when [`Checkpoint::var`] first asks for it: a run that touches a
    /// few tensors holds only those.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_impl(dir, device, Residency::OnDemand)
    }

    /// The checkpoint's names, dtypes and shapes, with every float tensor checked for NaN and
    /// Inf as by [`Checkpoint::load`], but no tensor kept: memory stays near one file page
    /// window, not the model. [`Model::load_frozen`] builds on it (shapes checked, no compute);
    /// [`Checkpoint::var`] and writing refuse it. For `sani inspect`.
    pub fn load_headers(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_impl(dir, device, Residency::HeadersOnly)
    }

    fn load_impl(dir: &Path, device: &Device, residency: Residency) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: not a directory (or not readable)", dir.display());
        }
        check_links_stay_inside(dir)?;
        let config = ModelConfig::from_dir(dir)?;
        let (input_files, sharded) = weight_files(dir)?;
        let from_pickle = input_files.iter().any(|f| pickle::is_pickle(f));
        let shards: Vec<String> = input_files
            .iter()
            .map(|f| match pickle::is_pickle(f) {
                true => pickle::safetensors_name(f),
                false => f.clone(),
            })
            .collect();
        let mut entries = Vec::new();
        let mut files = HashMap::new();
        let mut seen = HashSet::new();
        for (shard, input) in shards.iter().zip(&input_files) {
            let path = dir.join(input);
            let bytes = if pickle::is_pickle(input) {
                // The tensors, validated, as a safetensors image in an unnamed temporary file
                // (gone when the checkpoint is dropped), mapped like any input shard.
                let image = pickle::to_safetensors(&path)?;
                let mut tmp = tempfile::tempfile()
                    .context("cannot create a temporary file for the converted weights")?;
                std::io::Write::write_all(&mut tmp, &image)
                    .context("cannot write the converted weights to a temporary file")?;
                drop(image);
                // SAFETY: the file is unnamed and private to this process.
                unsafe { memmap2::Mmap::map(&tmp) }.with_context(|| {
                    format!("{}: cannot map the converted weights", path.display())
                })?
            } else {
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("{}: cannot read weight file", path.display()))?;
                // SAFETY: the file is only read; sani never writes into an input model. (A file
                // truncated by another process meanwhile would fault, as with any mmap reader.)
                unsafe { memmap2::Mmap::map(&file) }
                    .with_context(|| format!("{}: cannot map weight file", path.display()))?
            };
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
                let data = view.data();
                if candle_dtype(dtype).is_some() {
                    check_finite(dtype, data).map_err(|what| {
                        anyhow!(
                            "{}: tensor `{name}` holds {what}; refusing to load a broken \
                             model (was it trained with too high a learning rate?)",
                            path.display()
                        )
                    })?;
                }
                let offset = data.as_ptr() as usize - bytes.as_ptr() as usize;
                let range = offset..offset + data.len();
                drop_pages(&bytes, &range);
                entries.push(TensorEntry {
                    name,
                    dtype,
                    shape: view.shape().to_vec(),
                    shard: shard.clone(),
                    bytes: range,
                });
            }
            files.insert(shard.clone(), bytes);
        }
        let index_metadata = if sharded {
            let index = if from_pickle {
                PICKLE_INDEX_FILE
            } else {
                INDEX_FILE
            };
            check_index_matches(&dir.join(index), &entries, from_pickle)?
        } else {
            serde_json::Map::new()
        };
        let ckpt = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            entries,
            shards,
            sharded,
            varmap: VarMap::new(),
            files,
            index_metadata,
            device: device.clone(),
            side_files: Some(dir.to_path_buf()),
            residency,
            adapter: None,
            input_files,
            from_pickle,
        };
        if residency == Residency::All {
            for e in ckpt
                .entries
                .iter()
                .filter(|e| candle_dtype(e.dtype).is_some())
            {
                ckpt.read_var(e)?;
            }
        }
        Ok(ckpt)
    }

    /// Reads float tensor `e` from its mapped file into a new f32 var (kept in `varmap`).
    fn read_var(&self, e: &TensorEntry) -> Result<Var> {
        self.read_var_as(e, DType::F32)
    }

    /// Reads tensor `e` in `dtype` and makes it the resident var of its name.
    fn read_var_as(&self, e: &TensorEntry, dtype: DType) -> Result<Var> {
        let t = self.read_as(e, dtype, &self.device)?;
        self.make_resident(&e.name, &t)
    }

    fn make_resident(&self, name: &str, t: &Tensor) -> Result<Var> {
        let var = Var::from_tensor(t)?;
        self.varmap
            .data()
            .lock()
            .unwrap()
            .insert(name.to_string(), var.clone());
        Ok(var)
    }

    /// Float tensor `e` as stored in the input file, in `dtype` on `device`.
    fn read_as(&self, e: &TensorEntry, dtype: DType, device: &Device) -> Result<Tensor> {
        let file = &self.files[&e.shard];
        let data = &file[e.bytes.clone()];
        let t = safetensors::tensor::TensorView::new(e.dtype, e.shape.clone(), data)
            .map_err(anyhow::Error::from)
            .and_then(|v| match (dtype, widened_f32(e.dtype, data)) {
                (DType::F32, Some(values)) => {
                    Ok(Tensor::from_vec(values, v.shape(), &Device::Cpu)?)
                }
                _ => Ok(v.load(&Device::Cpu)?.to_dtype(dtype)?),
            })
            .and_then(|t| Ok(t.to_device(device)?))
            .with_context(|| {
                format!("{}: tensor `{}`", self.dir.join(&e.shard).display(), e.name)
            })?;
        // The tensor is copied: let the kernel drop its file pages, so the peak is the
        // tensors in f32, not that plus the file.
        drop_pages(file, &e.bytes);
        Ok(t)
    }

    /// The names of the float tensors read into memory so far.
    pub fn resident_tensors(&self) -> Vec<String> {
        let mut names: Vec<String> = self.varmap.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        names
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
                bytes: 0..0,
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
            files: HashMap::new(),
            index_metadata: serde_json::Map::new(),
            device: device.clone(),
            side_files: None,
            residency: Residency::All,
            adapter: None,
            input_files: Vec::new(),
            from_pickle: false,
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
        if self.residency == Residency::HeadersOnly {
            self.float_entry(name, shape)?;
            bail!("{}: only the headers were loaded", self.dir.display());
        }
        let resident = self.varmap.data().lock().unwrap().get(name).cloned();
        let resident = match resident {
            // Held in its stored 16-bit dtype (`stored`) until now: back to f32.
            Some(v) if v.dtype() != DType::F32 => {
                Some(self.make_resident(name, &v.as_tensor().to_dtype(DType::F32)?)?)
            }
            None if self.residency == Residency::OnDemand => {
                let e = self.float_entry(name, shape)?;
                Some(self.read_var(e)?)
            }
            v => v,
        };
        let var = resident.ok_or_else(|| match self.entry(name) {
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

    /// The var stored under `name` in its stored dtype when that is 16-bit (bf16 or f16: half
    /// the memory of f32), else as [`Checkpoint::var`] gives it. For frozen weights that are
    /// only read through ops that widen them as they go (a LoRA adapter's base). A resident f32
    /// var of a 16-bit tensor (erased, say) is rounded to the stored dtype, as writing it would.
    pub fn stored(&self, name: &str, shape: &[usize]) -> Result<Var> {
        let e = self.float_entry(name, shape)?;
        let dtype = match candle_dtype(e.dtype) {
            Some(d @ (DType::BF16 | DType::F16)) => d,
            _ => return self.var(name, shape),
        };
        if self.residency == Residency::HeadersOnly {
            return self.var(name, shape);
        }
        let resident = self.varmap.data().lock().unwrap().get(name).cloned();
        match resident {
            Some(v) if v.dtype() == dtype => Ok(v),
            Some(v) => self.make_resident(name, &v.as_tensor().to_dtype(dtype)?),
            None if self.residency == Residency::OnDemand => self.read_var_as(e, dtype),
            None => self.var(name, shape),
        }
    }

    /// The float vars read so far (all of them unless opened with [`Checkpoint::open`]), sorted
    /// by name.
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
        crate::io::hash::sha256_files(&self.dir, &self.input_files)
    }

    /// Writes the weights (same names, shapes, dtypes, shards) and copies every other file of the
    /// input directory except weights in other formats. `dir` must exist and be empty.
    ///
    /// A shard whose tensors all still hold their stored values (never read, or read and equal)
    /// is copied byte for byte, its metadata included; the others are written tensor by tensor
    /// with `provenance` as metadata, so memory stays near one tensor beyond what is resident.
    pub fn write_to(
        &self,
        dir: &Path,
        provenance: &BTreeMap<String, String>,
    ) -> Result<Vec<ShardWrite>> {
        if self.residency == Residency::HeadersOnly {
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
        let mut written = Vec::new();
        for shard in &self.shards {
            let entries: Vec<&TensorEntry> =
                self.entries.iter().filter(|e| &e.shard == shard).collect();
            let changed = entries
                .iter()
                .map(|e| self.changed(e, vars.get(&e.name)))
                .collect::<Result<Vec<bool>>>()?;
            let rewritten = changed.iter().filter(|c| **c).count();
            let path = dir.join(shard);
            for e in &entries {
                total_size += stored_len(&e.shape, e.dtype);
                weight_map.insert(e.name.clone(), shard.clone());
            }
            written.push(ShardWrite {
                file: shard.clone(),
                tensors: entries.len(),
                changed_tensors: rewritten,
            });
            let input = self.side_files.as_ref().map(|d| d.join(shard));
            if rewritten == 0 && !self.from_pickle {
                let from = input.expect("a mapped shard has an input file");
                std::fs::copy(&from, &path).with_context(|| {
                    format!("{}: cannot copy to {}", from.display(), path.display())
                })?;
                continue;
            }
            let views: Vec<(String, OutTensor)> = entries
                .iter()
                .zip(&changed)
                .map(|(e, &changed)| {
                    let view = if changed {
                        OutTensor::Var {
                            var: vars[&e.name].clone(),
                            dtype: e.dtype,
                        }
                    } else {
                        OutTensor::Mapped {
                            entry: e,
                            file: &self.files[&e.shard],
                        }
                    };
                    (e.name.clone(), view)
                })
                .collect();
            safetensors::tensor::serialize_to_file(views, Some(metadata.clone()), &path)
                .with_context(|| format!("{}: cannot write", path.display()))?;
            copy_mode(input.as_deref().filter(|p| p.exists()), &path)?;
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
        if let Some(src) = &self.side_files {
            copy_side_files(src, dir)?;
        }
        Ok(written)
    }

    /// Whether tensor `e` no longer holds its stored value: it was read (`var`) and now differs,
    /// or there is no input file (a model made in memory).
    fn changed(&self, e: &TensorEntry, var: Option<&Var>) -> Result<bool> {
        let Some(var) = var else {
            return Ok(!self.files.contains_key(&e.shard));
        };
        let Some(file) = self.files.get(&e.shard) else {
            return Ok(true);
        };
        let same = holds_bytes(var.as_tensor(), e.dtype, &file[e.bytes.clone()])
            .with_context(|| format!("{}: tensor `{}`", self.file_of(&e.name), e.name))?;
        drop_pages(file, &e.bytes);
        Ok(!same)
    }
}

/// How one output shard was produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardWrite {
    pub file: String,
    pub tensors: usize,
    /// Tensors whose values changed; 0: the input file was copied byte for byte.
    pub changed_tensors: usize,
}

/// A shape-only view of a checkpoint: every tensor frozen and seen as a broadcast zero, nothing
/// read. For a model whose structure is needed but not its values (which tensors erasure
/// touches).
pub struct Shapes<'a>(pub &'a Checkpoint);

impl WeightSource for Shapes<'_> {
    fn var(&self, name: &str, shape: &[usize]) -> Result<Var> {
        self.0.float_entry(name, shape)?;
        bail!(
            "{}: tensor `{name}` is seen by shape only",
            self.0.dir.display()
        )
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
    fn frozen(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.0.float_entry(name, shape)?;
        // One zero seen through a broadcast: the right shape, no memory.
        Ok(Tensor::zeros((), DType::F32, &self.0.device)?.broadcast_as(shape)?)
    }
}

impl WeightSource for Checkpoint {
    fn var(&self, name: &str, shape: &[usize]) -> Result<Var> {
        Checkpoint::var(self, name, shape)
    }
    fn stored(&self, name: &str, shape: &[usize]) -> Result<Var> {
        Checkpoint::stored(self, name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
    fn frozen(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if self.residency == Residency::HeadersOnly {
            return Shapes(self).frozen(name, shape);
        }
        Ok(Checkpoint::var(self, name, shape)?.as_tensor().detach())
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
        Self::load_checked(ckpt, trainable, lora, false)
    }

    /// Loads for training: as [`Model::load_with_lora`], but the frozen projections (every one
    /// `trainable` leaves out, and LoRA's bases) are held in their stored dtype when it is bf16
    /// or f16, half the memory of f32; the linear ops widen them per pass.
    pub fn load_to_train(
        ckpt: &Checkpoint,
        trainable: &dyn Fn(&str) -> bool,
        lora: Option<&crate::nn::lora::LoraConfig>,
    ) -> Result<Self> {
        Self::load_checked(ckpt, trainable, lora, true)
    }

    fn load_checked(
        ckpt: &Checkpoint,
        trainable: &dyn Fn(&str) -> bool,
        lora: Option<&crate::nn::lora::LoraConfig>,
        frozen_stored: bool,
    ) -> Result<Self> {
        let model = Self::from_source_with_lora(
            ckpt,
            &ckpt.config,
            &ckpt.device,
            trainable,
            lora,
            frozen_stored,
        )?;
        let spec = ckpt.config.spec();
        ckpt.check_no_extra(model.loaded_names(), |n| spec.is_known_buffer(n))?;
        Ok(model)
    }

    /// Loads with every tensor frozen (inference).
    pub fn load_frozen(ckpt: &Checkpoint) -> Result<Self> {
        Self::load(ckpt, &|_| false)
    }

    /// The model's structure (config, tensor names and shapes, checked as by [`Model::load`])
    /// with no tensor read: for what depends on shapes only, such as the tensors erasure touches.
    pub fn load_shapes(ckpt: &Checkpoint) -> Result<Self> {
        let model = Self::from_source(&Shapes(ckpt), &ckpt.config, &ckpt.device, &|_| false)?;
        let spec = ckpt.config.spec();
        ckpt.check_no_extra(model.loaded_names(), |n| spec.is_known_buffer(n))?;
        Ok(model)
    }
}

/// Checks that every tensor the index lists is stored in the shard it names; returns the index's
/// `metadata` object.
fn check_index_matches(
    index: &Path,
    entries: &[TensorEntry],
    from_pickle: bool,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index)?)?;
    let map = json["weight_map"]
        .as_object()
        .expect("checked by weight_files");
    for (name, file) in map {
        let file = &match (file.as_str(), from_pickle) {
            (Some(f), true) => serde_json::Value::from(pickle::safetensors_name(f)),
            _ => file.clone(),
        };
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

/// A tensor to serialize: a var converted to its stored dtype, or the input file's bytes carried
/// through. Each yields its bytes only when the writer asks, one tensor at a time.
enum OutTensor<'a> {
    Var {
        var: Var,
        dtype: StDtype,
    },
    Mapped {
        entry: &'a TensorEntry,
        file: &'a memmap2::Mmap,
    },
}

impl View for OutTensor<'_> {
    fn dtype(&self) -> StDtype {
        match self {
            OutTensor::Var { dtype, .. } => *dtype,
            OutTensor::Mapped { entry, .. } => entry.dtype,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::Var { var, .. } => var.dims(),
            OutTensor::Mapped { entry, .. } => &entry.shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutTensor::Var { var, dtype } => {
                let dt = candle_dtype(*dtype).expect("vars are float tensors");
                // A finite f32 CPU tensor always converts (checked at load; training keeps
                // weights finite or fails first).
                let t = var
                    .as_tensor()
                    .to_device(&Device::Cpu)
                    .and_then(|t| t.to_dtype(dt))
                    .expect("an f32 tensor converts to its stored dtype");
                Cow::Owned(View::data(&t).into_owned())
            }
            OutTensor::Mapped { entry, file } => {
                // Copied out, its pages dropped: a mapped page counts as resident once touched.
                let bytes = file[entry.bytes.clone()].to_vec();
                drop_pages(file, &entry.bytes);
                Cow::Owned(bytes)
            }
        }
    }
    fn data_len(&self) -> usize {
        stored_len(self.shape(), self.dtype())
    }
}

/// Whether f32 tensor `t`, converted to `dtype` as the writer would, has exactly the bytes
/// `stored` (little-endian). Holds at most one copy of `t` in `dtype` (none when it is f32).
fn holds_bytes(t: &Tensor, dtype: StDtype, stored: &[u8]) -> Result<bool> {
    fn same<const N: usize, T: Copy>(v: &[T], stored: &[u8], le: impl Fn(T) -> [u8; N]) -> bool {
        v.len() * N == stored.len()
            && v.iter()
                .zip(stored.chunks_exact(N))
                .all(|(&x, b)| le(x) == b)
    }
    let dt = candle_dtype(dtype).ok_or_else(|| anyhow!("{dtype:?} is not a float dtype"))?;
    let t = t.to_device(&Device::Cpu)?.to_dtype(dt)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        bail!("expected a CPU tensor");
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| anyhow!("expected a contiguous tensor"))?;
    use candle_core::CpuStorage as S;
    Ok(match cpu {
        S::F32(v) => same(&v[a..b], stored, f32::to_le_bytes),
        S::F64(v) => same(&v[a..b], stored, f64::to_le_bytes),
        S::F16(v) => same(&v[a..b], stored, |x| x.to_bits().to_le_bytes()),
        S::BF16(v) => same(&v[a..b], stored, |x| x.to_bits().to_le_bytes()),
        _ => bail!("unexpected dtype {:?}", t.dtype()),
    })
}

/// The bytes a tensor of `shape` takes when stored as `dtype`.
fn stored_len(shape: &[usize], dtype: StDtype) -> usize {
    (shape.iter().product::<usize>() * dtype.bitsize()).div_ceil(8)
}

/// Lets the kernel drop the pages of `range` of a read-only mapping (they are read from the
/// file again if touched): a tensor already copied out need not stay resident.
/// Stored little-endian bf16 or f32 values as f32, converted straight from the file's bytes in
/// parallel chunks (None for other dtypes). One pass and no 16-bit copy in between; each
/// thread also takes the first touch of its part of the fresh output, which on a VM costs
/// about as much as the conversion.
fn widened_f32(dtype: StDtype, bytes: &[u8]) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    let width = match dtype {
        StDtype::BF16 => 2,
        StDtype::F32 => 4,
        _ => return None,
    };
    if !bytes.len().is_multiple_of(width) {
        return None;
    }
    let n = bytes.len() / width;
    let mut out: Vec<f32> = Vec::with_capacity(n);
    const CHUNK: usize = 1 << 16;
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .for_each(|(dst, src)| {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(width)) {
                d.write(match width {
                    2 => f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
                    _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                });
            }
        });
    // SAFETY: the loop above wrote each of the first n elements (the chunks cover them all).
    unsafe { out.set_len(n) };
    Some(out)
}

fn drop_pages(file: &memmap2::Mmap, range: &Range<usize>) {
    // SAFETY: a read-only private mapping of a file sani does not modify: dropped pages are
    // read again from the file if touched.
    let _ = unsafe {
        file.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
    };
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
    match dtype {
        StDtype::F16 => non_finite::<2>(bytes, 0x7c00, 0x03ff),
        StDtype::BF16 => non_finite::<2>(bytes, 0x7f80, 0x007f),
        StDtype::F32 => non_finite::<4>(bytes, 0x7f80_0000, 0x007f_ffff),
        StDtype::F64 => non_finite::<8>(bytes, 0x7ff0_0000_0000_0000, 0x000f_ffff_ffff_ffff),
        _ => Ok(()),
    }
}

/// [`check_finite`] for little-endian floats of `W` bytes: a value is not finite when all its
/// exponent bits are set (an Inf when its mantissa is 0). The count is one branch-free pass
/// (the width is a constant, so it vectorizes); the first is looked for only when there is one.
fn non_finite<const W: usize>(
    bytes: &[u8],
    exp_mask: u64,
    mant_mask: u64,
) -> std::result::Result<(), String> {
    let bits = |chunk: &[u8]| {
        let mut buf = [0u8; 8];
        buf[..W].copy_from_slice(chunk);
        u64::from_le_bytes(buf)
    };
    let count = bytes
        .chunks_exact(W)
        .map(|c| (bits(c) & exp_mask == exp_mask) as usize)
        .sum::<usize>();
    if count == 0 {
        return Ok(());
    }
    let (i, first) = bytes
        .chunks_exact(W)
        .map(bits)
        .enumerate()
        .find(|(_, b)| b & exp_mask == exp_mask)
        .expect("counted above");
    let kind = if first & mant_mask == 0 { "Inf" } else { "NaN" };
    Err(format!(
        "{count} non-finite value{} (the first, element {i}, is {kind})",
        if count == 1 { "" } else { "s" }
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_widen_to_f32_as_candle_converts_them() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            1e-40,
            -1e-42,
            3.4e38,
            f32::INFINITY,
            f32::NAN,
        ];
        // More than one parallel chunk, and a length that is not a multiple of it.
        let values: Vec<f32> = (0..150_001)
            .map(|i| {
                specials
                    .get(i)
                    .copied()
                    .unwrap_or((i as f32 * 0.37).sin() * 1e3)
            })
            .collect();
        for (dtype, st) in [(DType::BF16, StDtype::BF16), (DType::F32, StDtype::F32)] {
            // Any bit pattern may be stored: bf16 takes the high half of each f32's bits.
            let bytes: Vec<u8> = values
                .iter()
                .flat_map(|v| match dtype {
                    DType::BF16 => ((v.to_bits() >> 16) as u16).to_le_bytes().to_vec(),
                    _ => v.to_le_bytes().to_vec(),
                })
                .collect();
            let n = values.len();
            let stored = Tensor::from_raw_buffer(&bytes, dtype, &[n], &Device::Cpu).unwrap();
            let ours = widened_f32(st, &bytes).unwrap();
            let candle = stored
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ours.len(), candle.len());
            for (i, (a, b)) in ours.iter().zip(&candle).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{dtype:?} value {i}");
            }
            assert!(widened_f32(st, &bytes[..bytes.len() - 1]).is_none());
        }
        assert!(widened_f32(StDtype::F16, &[0, 0]).is_none());
    }

    #[test]
    fn non_finite_values_are_counted_and_the_first_named_in_every_float_dtype() {
        // The bytes the writer stores for `xs` in `dtype`.
        let bytes_in = |dtype: StDtype, xs: &[f32]| {
            let t = Tensor::new(xs, &Device::Cpu).unwrap();
            let t = t.to_dtype(candle_dtype(dtype).unwrap()).unwrap();
            View::data(&t).into_owned()
        };
        for dtype in [StDtype::F16, StDtype::BF16, StDtype::F32, StDtype::F64] {
            let bytes = |xs: &[f32]| bytes_in(dtype, xs);
            let finite = [0.0, -1.5, 6e4, -0.0, 1e-3];
            assert_eq!(check_finite(dtype, &bytes(&finite)), Ok(()), "{dtype:?}");
            let bad = [1.0, f32::INFINITY, 2.0, f32::NAN, f32::NEG_INFINITY];
            assert_eq!(
                check_finite(dtype, &bytes(&bad)),
                Err("3 non-finite values (the first, element 1, is Inf)".into()),
                "{dtype:?}"
            );
            assert_eq!(
                check_finite(dtype, &bytes(&[0.5, f32::NAN])),
                Err("1 non-finite value (the first, element 1, is NaN)".into()),
                "{dtype:?}"
            );
        }
        assert_eq!(check_finite(StDtype::I64, &[0xff; 16]), Ok(()));
    }
}
