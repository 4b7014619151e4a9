//! `config.json` of a Hugging Face causal LM, parsed by the architecture it names.
//!
//! Dispatch is on `architectures[0]` (or `model_type`) through the registry
//! [`super::ARCHITECTURES`]; each architecture parses its own serde struct (HF field names,
//! `transformers` defaults) and reports the numbers the rest of `sani` needs as a
//! [`ConfigSummary`]. Every shared accessor of [`ModelConfig`] reads that summary.

use super::{CausalLm, Weights};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// Architectures `sani` can load, as spelled in `config.json`.
pub fn supported_architectures() -> Vec<&'static str> {
    super::ARCHITECTURES.iter().map(|a| a.name).collect()
}

/// A token id field that HF writes either as one integer or as a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn first(&self) -> Option<u32> {
        match self {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }
    pub fn all(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `bos_token_id`, `eos_token_id`, `pad_token_id` as most configs write them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SpecialTokenIds {
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
}

pub(crate) fn default_true() -> bool {
    true
}
pub(crate) fn default_init_range() -> f64 {
    0.02
}

/// RoPE parameters as written by transformers 4 (`rope_scaling`) or 5 (`rope_parameters`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// LongRoPE (Phi-3): per-frequency divisors within / beyond the original context.
    #[serde(default)]
    pub short_factor: Option<Vec<f64>>,
    #[serde(default)]
    pub long_factor: Option<Vec<f64>>,
    /// Scale of cos and sin (LongRoPE; derived from the context ratio when absent).
    #[serde(default)]
    pub attention_factor: Option<f64>,
    /// Share of each head's dimensions that rotate (Phi-3; the rest pass through).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

/// The numbers every architecture's config gives the rest of `sani`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigSummary {
    pub num_layers: usize,
    pub hidden_size: usize,
    /// MLP intermediate units per block.
    pub mlp_width: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab_size: usize,
    pub tied_embeddings: bool,
    pub max_positions: usize,
    pub initializer_range: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl ConfigSummary {
    /// The token-id part of a summary, from the usual fields.
    pub fn with_tokens(mut self, ids: &SpecialTokenIds) -> Self {
        self.bos_token_id = ids.bos_token_id.as_ref().and_then(TokenIds::first);
        self.eos_token_ids = ids
            .eos_token_id
            .as_ref()
            .map(TokenIds::all)
            .unwrap_or_default();
        self.pad_token_id = ids.pad_token_id.as_ref().and_then(TokenIds::first);
        self
    }
}

/// One architecture's parsed config: what it tells `sani`, and how to build the model.
pub trait ArchConfig: std::fmt::Debug + Send + Sync {
    fn summary(&self) -> ConfigSummary;
    /// Standard deviation of the HF initialization of tensor `name` (None: ones for norm
    /// weights, zeros for biases).
    fn init_std(&self, name: &str) -> Option<f64> {
        super::init::default_init_std(self.summary().initializer_range, name)
    }
    /// Whether weight `name` is stored [in, out] (GPT-2's Conv1D) rather than [out, in].
    fn stores_in_out(&self, _name: &str) -> bool {
        false
    }
    /// Tensors some checkpoints store that the model does not use (carried through unchanged).
    fn is_known_buffer(&self, name: &str) -> bool;
    /// Loads the model's tensors from `w` (the root of the checkpoint's names).
    fn load(&self, w: &mut Weights) -> Result<Box<dyn CausalLm>>;
}

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    architecture: &'static str,
    summary: ConfigSummary,
    spec: Arc<dyn ArchConfig>,
}

#[derive(Deserialize)]
struct ArchitectureProbe {
    #[serde(default)]
    architectures: Option<Vec<String>>,
    #[serde(default)]
    model_type: Option<String>,
}

impl ModelConfig {
    /// Reads and parses `config.json` in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: cannot read config.json (is this a Hugging Face model directory?)",
                path.display()
            )
        })?;
        Self::from_json(&text).with_context(|| format!("{}: invalid model config", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let probe: ArchitectureProbe =
            serde_json::from_str(text).context("config.json is not valid JSON")?;
        let supported = || supported_architectures().join(", ");
        let registered = match (&probe.architectures, &probe.model_type) {
            (Some(a), _) if !a.is_empty() => {
                match super::ARCHITECTURES.iter().find(|r| r.name == a[0]) {
                    Some(r) => r,
                    None => bail!(
                        "field `architectures`: unsupported architecture `{}`; supported: {}",
                        a[0],
                        supported()
                    ),
                }
            }
            (_, Some(t)) => match super::ARCHITECTURES.iter().find(|r| r.model_type == t) {
                Some(r) => r,
                None => bail!(
                    "field `model_type`: unsupported model type `{t}` and no `architectures`; supported architectures: {}",
                    supported()
                ),
            },
            _ => bail!("missing field `architectures`"),
        };
        let spec = (registered.parse)(text)?;
        Ok(ModelConfig {
            architecture: registered.name,
            summary: spec.summary(),
            spec,
        })
    }

    /// The architecture-specific config.
    pub fn spec(&self) -> &dyn ArchConfig {
        self.spec.as_ref()
    }

    pub fn architecture(&self) -> &'static str {
        self.architecture
    }
    pub fn summary(&self) -> &ConfigSummary {
        &self.summary
    }
    pub fn num_layers(&self) -> usize {
        self.summary.num_layers
    }
    pub fn hidden_size(&self) -> usize {
        self.summary.hidden_size
    }
    pub fn mlp_width(&self) -> usize {
        self.summary.mlp_width
    }
    /// (attention heads, key/value heads).
    pub fn heads(&self) -> (usize, usize) {
        (self.summary.heads, self.summary.kv_heads)
    }
    pub fn vocab_size(&self) -> usize {
        self.summary.vocab_size
    }
    pub fn tied_embeddings(&self) -> bool {
        self.summary.tied_embeddings
    }
    pub fn max_positions(&self) -> usize {
        self.summary.max_positions
    }
    pub fn initializer_range(&self) -> f64 {
        self.summary.initializer_range
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        self.summary.bos_token_id
    }
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.summary.eos_token_ids.clone()
    }
    pub fn pad_token_id(&self) -> Option<u32> {
        self.summary.pad_token_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_architecture_lists_supported() {
        let err = ModelConfig::from_json(r#"{"architectures": ["BertForMaskedLM"]}"#).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("BertForMaskedLM")
                && msg.contains("GPT2LMHeadModel")
                && msg.contains("Qwen2ForCausalLM"),
            "{msg}"
        );
    }

    #[test]
    fn model_type_when_architectures_is_missing() {
        let cfg = ModelConfig::from_json(
            r#"{"model_type": "mistral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap();
        assert_eq!(cfg.architecture(), "MistralForCausalLM");
        let err = ModelConfig::from_json(r#"{"model_type": "bert"}"#).unwrap_err();
        assert!(format!("{err:#}").contains("model_type"));
    }
}
