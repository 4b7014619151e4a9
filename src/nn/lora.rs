//! LoRA (Hu et al. 2021) as PEFT does it: a frozen projection `y = x W^T` gains a trainable
//! low-rank path, `y = x W^T + (alpha / r) (x A^T) B^T`, with A [r, in] drawn Kaiming-uniform and
//! B [out, r] zero, so training starts exactly at the base model. The optimizer holds state for
//! A and B only; at the end [`LoraVars::merge`] folds `(alpha / r) B A` into W, so the output is
//! a plain model of the input's layout.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::ops;

/// Which projections get adapters, and their shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Module names (`q_proj`, `c_attn`, ...) matched against the end of each projection's
    /// path, or `all-linear`: every projection of every block (never the embedding or head).
    pub targets: Vec<String>,
    /// Seed of the A initialization.
    pub seed: u64,
}

/// The target list that means every projection.
pub const ALL_LINEAR: &str = "all-linear";

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("--lora-rank must be at least 1");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("--lora-alpha must be a positive number, got {}", self.alpha);
        }
        if self.targets.is_empty() || self.targets.iter().any(|t| t.trim().is_empty()) {
            bail!("--lora-targets needs module names (e.g. q_proj,v_proj) or all-linear");
        }
        Ok(())
    }

    /// The factor on the low-rank path.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Whether the projection at `module` (its full path, e.g. `model.layers.3.self_attn.q_proj`)
    /// gets an adapter.
    pub fn targets_module(&self, module: &str) -> bool {
        self.targets.iter().any(|t| {
            t == ALL_LINEAR
                || module == t
                || module
                    .strip_suffix(t.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
    }
}

/// The low-rank path of one projection, as the forward pass uses it.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl LoraAdapter {
    /// The frozen projection of `x` by `w` (stored (out, in) when `transposed`, else (in, out))
    /// and `bias`, plus `scale (x A^T) B^T`.
    pub fn forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        transposed: bool,
    ) -> candle_core::Result<Tensor> {
        ops::lora_linear(x, w, bias, (&self.a, &self.b, self.scale), transposed)
    }
}

/// One adapter's trainable vars and the base weight they are merged into.
#[derive(Debug, Clone)]
pub struct LoraVars {
    /// The base weight's tensor name.
    pub weight: String,
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    /// The base weight itself (shared with the checkpoint, so a merge updates it in place).
    base: Var,
    /// GPT-2 `Conv1D`: the weight is stored (in, out), so the update is transposed.
    stored_in_out: bool,
}

impl LoraVars {
    /// Creates the adapter of `module`, whose weight `base` maps `d_in` to `d_out`.
    pub fn new(
        cfg: &LoraConfig,
        module: &str,
        base: Var,
        (d_in, d_out): (usize, usize),
        stored_in_out: bool,
    ) -> Result<(LoraVars, LoraAdapter)> {
        let device = base.device().clone();
        let r = cfg.rank;
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ fnv1a(module));
        let bound = 1.0 / (d_in as f64).sqrt();
        let a: Vec<f32> = (0..r * d_in)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (r, d_in), &device)?)?;
        let b = Var::from_tensor(&Tensor::zeros(
            (d_out, r),
            candle_core::DType::F32,
            &device,
        )?)?;
        let adapter = LoraAdapter {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: cfg.scale(),
        };
        let vars = LoraVars {
            weight: format!("{module}.weight"),
            a,
            b,
            scale: cfg.scale(),
            base,
            stored_in_out,
        };
        Ok((vars, adapter))
    }

    /// A copy of the trained matrices, for writing them as a PEFT adapter.
    pub fn snapshot(&self) -> Result<TrainedLora> {
        Ok(TrainedLora {
            module: self.weight.trim_end_matches(".weight").to_string(),
            a: self.a.as_tensor().copy()?,
            b: self.b.as_tensor().copy()?,
            stored_in_out: self.stored_in_out,
        })
    }

    /// The names PEFT gives the two matrices.
    pub fn var_names(&self) -> (String, String) {
        let module = self.weight.trim_end_matches(".weight");
        (
            format!("{module}.lora_A.weight"),
            format!("{module}.lora_B.weight"),
        )
    }

    /// W += scale * B A (transposed for a weight stored (in, out)), in place, summed in f32
    /// and rounded once to W's dtype.
    pub fn merge(&self) -> Result<()> {
        let delta = (self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?;
        let delta = if self.stored_in_out {
            delta.t()?
        } else {
            delta
        };
        let w = self.base.as_tensor();
        let merged = (w.to_dtype(candle_core::DType::F32)? + delta)?;
        self.base.set(&merged.to_dtype(w.dtype())?)?;
        Ok(())
    }
}

/// One trained adapter, detached from the model: A [r, in] and B [out, r] of module `module`
/// (PEFT's `lora_A` / `lora_B` of the same name).
#[derive(Debug, Clone)]
pub struct TrainedLora {
    pub module: String,
    pub a: Tensor,
    pub b: Tensor,
    /// The base weight is stored (in, out) (GPT-2 `Conv1D`: PEFT's `fan_in_fan_out`).
    pub stored_in_out: bool,
}

/// FNV-1a of a name: a per-module seed that does not depend on load order.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg(targets: &[&str]) -> LoraConfig {
        LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            seed: 1,
        }
    }

    #[test]
    fn targets_match_the_end_of_the_module_path() {
        let c = cfg(&["q_proj", "mlp.c_proj"]);
        assert!(c.targets_module("model.layers.0.self_attn.q_proj"));
        assert!(c.targets_module("q_proj"));
        assert!(!c.targets_module("model.layers.0.self_attn.xq_proj"));
        assert!(c.targets_module("transformer.h.1.mlp.c_proj"));
        assert!(!c.targets_module("transformer.h.1.attn.c_proj"));
        assert!(cfg(&[ALL_LINEAR]).targets_module("anything"));
        assert!(cfg(&[]).validate().is_err());
    }

    #[test]
    fn starts_at_the_base_and_merges_to_what_it_computes() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (3, 5), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (4, 5), &dev)?;
        for stored_in_out in [false, true] {
            let stored = if stored_in_out {
                w.t()?.contiguous()?
            } else {
                w.clone()
            };
            let base = Var::from_tensor(&stored)?;
            let (vars, adapter) =
                LoraVars::new(&cfg(&["m"]), "m", base.clone(), (5, 3), stored_in_out)?;
            let y0 = adapter.forward(&x, &stored, None, !stored_in_out)?;
            let d0 = (y0 - x.matmul(&w.t()?)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d0 < 1e-5, "B = 0: the base projection ({d0})");
            vars.b.set(&Tensor::randn(0f32, 1.0, (3, 2), &dev)?)?;
            let adapter = LoraAdapter {
                a: vars.a.as_tensor().clone(),
                b: vars.b.as_tensor().clone(),
                scale: vars.scale,
            };
            let y = adapter.forward(&x, &stored, None, !stored_in_out)?;
            vars.merge()?;
            let merged = if stored_in_out {
                base.as_tensor().t()?
            } else {
                base.as_tensor().clone()
            };
            let y_merged = x.matmul(&merged.t()?)?;
            let diff = (y - y_merged)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-4,
                "merged weight computes the adapter's output ({diff})"
            );
        }
        Ok(())
    }
}
