//! `config.json` of a Hugging Face causal LM, parsed into one of the supported architectures.
//!
//! The serde structs mirror the HF field names; defaults follow `transformers`. Dispatch is on
//! `architectures[0]`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Architectures `sani` can load, as spelled in `config.json`.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
];

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

fn default_true() -> bool {
    true
}
fn default_init_range() -> f64 {
    0.02
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "gpt2_act")]
    pub activation_function: String,
    #[serde(default = "gpt2_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
}

fn gpt2_act() -> String {
    "gelu_new".into()
}
fn gpt2_eps() -> f64 {
    1e-5
}

impl Gpt2Config {
    pub fn inner_size(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
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
}

/// One config for the Llama family: Llama, Mistral and Qwen2 differ only in switches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "llama_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "llama_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "llama_act")]
    pub hidden_act: String,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<TokenIds>,
}

fn llama_eps() -> f64 {
    1e-6
}
fn llama_max_pos() -> usize {
    2048
}
fn llama_act() -> String {
    "silu".into()
}

/// Which member of the Llama family; decides biases and sliding-window rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LlamaFlavor {
    Llama,
    Mistral,
    Qwen2,
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// The RoPE parameters wherever the config put them (`rope_parameters` wins over `rope_scaling`).
    pub fn rope(&self) -> RopeParameters {
        let mut p = self
            .rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default();
        if p.rope_theta.is_none() {
            p.rope_theta = self.rope_theta.or(Some(10000.0));
        }
        p
    }
    /// The sliding window of layer `i`, if that layer uses one.
    pub fn layer_window(&self, flavor: LlamaFlavor, layer: usize) -> Option<usize> {
        let window = self.sliding_window?;
        match flavor {
            LlamaFlavor::Llama => None,
            LlamaFlavor::Mistral => Some(window),
            LlamaFlavor::Qwen2 => {
                let on = self.use_sliding_window.unwrap_or(false)
                    && layer >= self.max_window_layers.unwrap_or(0);
                on.then_some(window)
            }
        }
    }
}

/// A parsed `config.json`.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per loaded model
pub enum ModelConfig {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig, LlamaFlavor),
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
        let arch = match (&probe.architectures, &probe.model_type) {
            (Some(a), _) if !a.is_empty() => a[0].clone(),
            (_, Some(t)) => match t.as_str() {
                "gpt2" => "GPT2LMHeadModel".into(),
                "llama" => "LlamaForCausalLM".into(),
                "mistral" => "MistralForCausalLM".into(),
                "qwen2" => "Qwen2ForCausalLM".into(),
                other => bail!(
                    "field `model_type`: unsupported model type `{other}` and no `architectures`; supported architectures: {}",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            },
            _ => bail!("missing field `architectures`"),
        };
        let llama = |flavor| -> Result<Self> {
            let cfg: LlamaConfig = serde_json::from_str(text)?;
            Ok(ModelConfig::Llama(cfg, flavor))
        };
        let cfg = match arch.as_str() {
            "GPT2LMHeadModel" => ModelConfig::Gpt2(serde_json::from_str(text)?),
            "LlamaForCausalLM" => llama(LlamaFlavor::Llama)?,
            "MistralForCausalLM" => llama(LlamaFlavor::Mistral)?,
            "Qwen2ForCausalLM" => llama(LlamaFlavor::Qwen2)?,
            other => bail!(
                "field `architectures`: unsupported architecture `{other}`; supported: {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            ),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        match self {
            ModelConfig::Gpt2(c) => {
                if c.n_head == 0 || c.n_embd % c.n_head != 0 {
                    bail!(
                        "field `n_embd` ({}) must be a multiple of `n_head` ({})",
                        c.n_embd,
                        c.n_head
                    );
                }
                match c.activation_function.as_str() {
                    "gelu_new" | "gelu_pytorch_tanh" | "gelu" | "relu" | "silu" => {}
                    other => bail!("field `activation_function`: unsupported `{other}`"),
                }
            }
            ModelConfig::Llama(c, _) => {
                if c.num_attention_heads == 0 || c.num_attention_heads % c.kv_heads() != 0 {
                    bail!(
                        "field `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                        c.kv_heads(),
                        c.num_attention_heads
                    );
                }
                if c.hidden_act != "silu" {
                    bail!(
                        "field `hidden_act`: unsupported `{}` (only silu)",
                        c.hidden_act
                    );
                }
                if let Some(t) = c.rope().rope_type.as_deref() {
                    if !matches!(t, "default" | "llama3" | "linear") {
                        bail!("field `rope_scaling.rope_type`: unsupported `{t}` (default, linear, llama3)");
                    }
                }
            }
        }
        Ok(())
    }

    pub fn architecture(&self) -> &'static str {
        match self {
            ModelConfig::Gpt2(_) => "GPT2LMHeadModel",
            ModelConfig::Llama(_, LlamaFlavor::Llama) => "LlamaForCausalLM",
            ModelConfig::Llama(_, LlamaFlavor::Mistral) => "MistralForCausalLM",
            ModelConfig::Llama(_, LlamaFlavor::Qwen2) => "Qwen2ForCausalLM",
        }
    }
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_layer,
            ModelConfig::Llama(c, _) => c.num_hidden_layers,
        }
    }
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_embd,
            ModelConfig::Llama(c, _) => c.hidden_size,
        }
    }
    pub fn mlp_width(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.inner_size(),
            ModelConfig::Llama(c, _) => c.intermediate_size,
        }
    }
    pub fn heads(&self) -> (usize, usize) {
        match self {
            ModelConfig::Gpt2(c) => (c.n_head, c.n_head),
            ModelConfig::Llama(c, _) => (c.num_attention_heads, c.kv_heads()),
        }
    }
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Llama(c, _) => c.vocab_size,
        }
    }
    pub fn tied_embeddings(&self) -> bool {
        match self {
            ModelConfig::Gpt2(c) => c.tie_word_embeddings,
            ModelConfig::Llama(c, _) => c.tie_word_embeddings,
        }
    }
    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_positions,
            ModelConfig::Llama(c, _) => c.max_position_embeddings,
        }
    }
    pub fn initializer_range(&self) -> f64 {
        match self {
            ModelConfig::Gpt2(c) => c.initializer_range,
            ModelConfig::Llama(c, _) => c.initializer_range,
        }
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Gpt2(c) => c.bos_token_id.as_ref().and_then(TokenIds::first),
            ModelConfig::Llama(c, _) => c.bos_token_id.as_ref().and_then(TokenIds::first),
        }
    }
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match self {
            ModelConfig::Gpt2(c) => c
                .eos_token_id
                .as_ref()
                .map(TokenIds::all)
                .unwrap_or_default(),
            ModelConfig::Llama(c, _) => c
                .eos_token_id
                .as_ref()
                .map(TokenIds::all)
                .unwrap_or_default(),
        }
    }
    pub fn pad_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Gpt2(c) => c.pad_token_id.as_ref().and_then(TokenIds::first),
            ModelConfig::Llama(c, _) => c.pad_token_id.as_ref().and_then(TokenIds::first),
        }
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
    fn rope_theta_under_rope_parameters_and_null_fields() {
        let cfg = ModelConfig::from_json(
            r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "sliding_window": null, "head_dim": null,
                "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}"#,
        )
        .unwrap();
        let ModelConfig::Llama(c, LlamaFlavor::Qwen2) = cfg else {
            panic!()
        };
        assert_eq!(c.rope().rope_theta, Some(500000.0));
        assert_eq!(c.head_dim(), 4);
        assert_eq!(c.layer_window(LlamaFlavor::Qwen2, 0), None);
    }
}
