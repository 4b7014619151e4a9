//! PEFT LoRA adapters (`--adapter-dir DIR`): `adapter_config.json` and
//! `adapter_model.safetensors` as PEFT writes them, merged into the base checkpoint in f32
//! (`W += scale * B @ A`, transposed for weights stored [in, out] such as GPT-2's Conv1D), so
//! that every command runs on the merged model and writes it in the base's layout and dtypes.
//!
//! The adapter file is the source of truth for which modules are adapted (`target_modules` is
//! recorded, not re-matched). Tensors it holds besides `lora_A`/`lora_B` pairs
//! (`modules_to_save`, trained biases, a targeted embedding's saved `base_layer`) replace the
//! base tensor of the same name. Anything else
//! (DoRA, other PEFT types, a base whose shapes differ) is a clear error.

use crate::io::checkpoint::Checkpoint;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The fields of `adapter_config.json` that decide the merge.
#[derive(Debug, Clone, Deserialize)]
struct AdapterConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    target_modules: Option<serde_json::Value>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

/// What was merged, for the reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MergedAdapter {
    pub dir: String,
    pub sha256: String,
    pub base_model_name_or_path: Option<String>,
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub target_modules: serde_json::Value,
    /// Base tensors that took a low-rank update.
    pub merged: Vec<String>,
    pub modules_to_save: Vec<String>,
    /// Base tensors replaced whole (`modules_to_save`, trained biases).
    pub replaced: Vec<String>,
}

impl MergedAdapter {
    /// One line for the command's output.
    pub fn summary(&self) -> String {
        format!(
            "adapter: {} (LoRA r {}, alpha {}{}, sha256 {}) merged into {} tensors{}",
            self.dir,
            self.rank,
            self.alpha,
            if self.use_rslora { ", rsLoRA" } else { "" },
            &self.sha256[..16],
            self.merged.len(),
            match self.replaced.len() {
                0 => String::new(),
                n => format!(", {n} replaced (modules_to_save)"),
            }
        )
    }
}

const PREFIX: &str = "base_model.model.";
/// The files of a PEFT adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Reads the adapter in `dir` and merges it into `ckpt` (whose vars then hold the merged
/// weights; writing the checkpoint writes them in the base's dtypes).
pub fn merge_adapter(ckpt: &Checkpoint, dir: &Path) -> Result<MergedAdapter> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "{}: cannot read adapter_config.json (is --adapter-dir a PEFT adapter directory?)",
            cfg_path.display()
        )
    })?;
    let cfg: AdapterConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid adapter config", cfg_path.display()))?;
    match cfg.peft_type.as_deref() {
        Some("LORA") => {}
        Some(t) => bail!(
            "{}: field `peft_type`: `{t}` adapters are not supported (supported: LORA)",
            cfg_path.display()
        ),
        None => bail!("{}: missing field `peft_type`", cfg_path.display()),
    }
    if cfg.use_dora {
        bail!(
            "{}: field `use_dora`: DoRA adapters are not supported (plain LoRA only)",
            cfg_path.display()
        );
    }
    let (Some(rank), Some(alpha)) = (cfg.r, cfg.lora_alpha) else {
        bail!(
            "{}: fields `r` and `lora_alpha` are required",
            cfg_path.display()
        );
    };
    for key in cfg.rank_pattern.keys().chain(cfg.alpha_pattern.keys()) {
        if key.chars().any(|c| "()[]{}*+?|^$\\".contains(c)) {
            bail!(
                "{}: pattern `{key}` in `rank_pattern`/`alpha_pattern`: only plain module names are supported",
                cfg_path.display()
            );
        }
    }
    let weights = dir.join("adapter_model.safetensors");
    if !weights.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            " (only adapter_model.bin is there: convert it to safetensors with PEFT)"
        } else {
            ""
        };
        bail!("{}: missing{hint}", weights.display());
    }
    let bytes =
        std::fs::read(&weights).with_context(|| format!("{}: cannot read", weights.display()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
        .with_context(|| format!("{}: not a valid safetensors file", weights.display()))?;

    // Group lora_A / lora_B by module; everything else is a whole tensor.
    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>, bool)> = BTreeMap::new();
    let mut whole: Vec<(String, Tensor)> = Vec::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = tensors[name].clone();
        let Some(inner) = name.strip_prefix(PREFIX) else {
            bail!(
                "{}: tensor `{name}` is not under `{PREFIX}` (not a PEFT causal-LM adapter)",
                weights.display()
            );
        };
        if inner.contains("lora_magnitude_vector") {
            bail!(
                "{}: `{name}`: DoRA adapters are not supported",
                weights.display()
            );
        }
        let split = [
            (".lora_A.weight", false, true),
            (".lora_B.weight", false, false),
            (".lora_embedding_A", true, true),
            (".lora_embedding_B", true, false),
        ]
        .into_iter()
        .find_map(|(suffix, emb, is_a)| inner.strip_suffix(suffix).map(|m| (m, emb, is_a)));
        match split {
            Some((module, emb, is_a)) => {
                let entry = pairs.entry(module.to_string()).or_insert((None, None, emb));
                if is_a {
                    entry.0 = Some(t);
                } else {
                    entry.1 = Some(t);
                }
            }
            // A targeted embedding's own weight, saved by PEFT with `save_embedding_layers`.
            None => whole.push((inner.replace(".base_layer.", "."), t)),
        }
    }
    if pairs.is_empty() && whole.is_empty() {
        bail!("{}: holds no tensors", weights.display());
    }

    // Whole tensors first: a saved `base_layer` is what the low-rank update adds to.
    let mut replaced = Vec::new();
    for (name, t) in whole {
        let target = base_name(ckpt, &name).with_context(|| {
            format!(
                "{}: tensor `{PREFIX}{name}` (modules_to_save, a trained bias or a saved base layer) is not in the base model {} (does the adapter belong to it?)",
                weights.display(),
                ckpt.dir.display()
            )
        })?;
        let shape = ckpt.entry(&target).expect("found").shape.clone();
        if t.dims() != shape.as_slice() {
            bail!(
                "{}: `{PREFIX}{name}` is {:?}, the base tensor `{target}` {shape:?}",
                weights.display(),
                t.dims()
            );
        }
        let var = ckpt.var(&target, &shape)?;
        var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        replaced.push(target);
    }
    let mut merged = Vec::new();
    for (module, (a, b, embedding)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            bail!(
                "{}: module `{module}` has only one of lora_A / lora_B",
                weights.display()
            );
        };
        let target = base_name(ckpt, &format!("{module}.weight")).with_context(|| {
            format!(
                "{}: module `{module}` is not in the base model {} (does the adapter belong to it?)",
                weights.display(),
                ckpt.dir.display()
            )
        })?;
        let a = a.to_dtype(DType::F32)?;
        let b = b.to_dtype(DType::F32)?;
        let r = a.dim(0)?;
        if b.dim(1)? != r {
            bail!(
                "{}: `{module}`: lora_A has rank {r}, lora_B {}",
                weights.display(),
                b.dim(1)?
            );
        }
        let short = module.rsplit('.').next().unwrap_or(&module);
        let r_cfg = cfg.rank_pattern.get(short).copied().unwrap_or(rank);
        if r_cfg != r {
            bail!(
                "{}: `{module}`: rank {r} in the weights, {r_cfg} in adapter_config.json",
                weights.display()
            );
        }
        let a_cfg = cfg.alpha_pattern.get(short).copied().unwrap_or(alpha);
        let scale = if cfg.use_rslora {
            a_cfg / (r as f64).sqrt()
        } else {
            a_cfg / r as f64
        };
        // [out, in] for a Linear; embeddings: A [r, vocab], B [d, r] -> [vocab, d].
        let delta = b.matmul(&a)?;
        let delta = if embedding { delta.t()? } else { delta };
        let (out, inp) = delta.dims2()?;
        let entry = ckpt.entry(&target).expect("base_name found it");
        let shape = entry.shape.clone();
        let stored_in_out = ckpt.config.spec().stores_in_out(&target) || cfg.fan_in_fan_out;
        let delta = if shape == [out, inp] && !(stored_in_out && out == inp) {
            delta
        } else if shape == [inp, out] {
            delta.t()?
        } else {
            bail!(
                "{}: `{module}`: the update is [{out}, {inp}] but the base tensor `{target}` is {shape:?}: the adapter was made for another base model",
                weights.display()
            );
        };
        let var = ckpt.var(&target, &shape)?;
        let w = (var.as_tensor() + (delta * scale)?.to_device(var.device())?)?;
        var.set(&w)?;
        merged.push(target);
    }
    Ok(MergedAdapter {
        dir: dir.display().to_string(),
        sha256: crate::io::hash::sha256_hex(&bytes),
        base_model_name_or_path: cfg.base_model_name_or_path,
        rank,
        alpha,
        use_rslora: cfg.use_rslora,
        target_modules: cfg.target_modules.unwrap_or(serde_json::Value::Null),
        merged,
        modules_to_save: cfg.modules_to_save.unwrap_or_default(),
        replaced,
    })
}

/// The base checkpoint's name for an adapter's tensor name: as is, or without GPT-2's
/// `transformer.` prefix (checkpoints written without it).
fn base_name(ckpt: &Checkpoint, name: &str) -> Result<String> {
    if ckpt.contains(name) {
        return Ok(name.to_string());
    }
    if let Some(short) = name.strip_prefix("transformer.") {
        if ckpt.contains(short) {
            return Ok(short.to_string());
        }
    }
    bail!("no tensor `{name}`")
}
