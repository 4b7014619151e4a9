//! Initialization as Hugging Face `transformers` does it: fresh models for `sani finetune
//! --init`, and the values erased units are reset to (`--reset reinit`).
//!
//! A fresh model is built by loading the architecture from a [`FreshWeights`] source, which
//! draws each tensor the first time it is asked for (in load order, so a seed gives the same
//! model every time); `Checkpoint::fresh` turns the drawn tensors into a checkpoint.

use super::config::ModelConfig;
use super::weights::WeightSource;
use super::Model;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The rule most architectures share: normal(0, initializer_range) for weights; None (ones for
/// norm weights, zeros for biases) otherwise.
pub fn default_init_std(initializer_range: f64, name: &str) -> Option<f64> {
    let is_norm = name.contains("ln_") || name.ends_with("norm.weight");
    if name.ends_with(".bias") || is_norm {
        return None;
    }
    Some(initializer_range)
}

/// Standard deviation of the HF initialization of tensor `name` (None: ones for norm weights,
/// zeros for biases).
pub fn init_std(config: &ModelConfig, name: &str) -> Option<f64> {
    config.spec().init_std(name)
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

/// Tensors drawn on first request, in the order the architecture's loader asks for them.
pub struct FreshWeights<'a> {
    config: &'a ModelConfig,
    device: &'a Device,
    rng: Mutex<StdRng>,
    vars: Mutex<BTreeMap<String, Var>>,
}

impl<'a> FreshWeights<'a> {
    pub fn new(config: &'a ModelConfig, device: &'a Device, seed: u64) -> Self {
        FreshWeights {
            config,
            device,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            vars: Mutex::new(BTreeMap::new()),
        }
    }

    /// Draws every tensor of the model (by loading it once) and returns them by name.
    pub fn draw_all(self) -> Result<BTreeMap<String, Var>> {
        Model::from_source(&self, self.config, self.device, &|_| false)?;
        Ok(self.vars.into_inner().expect("fresh weights"))
    }
}
impl WeightSource for FreshWeights<'_> {
    fn var(&self, name: &str, shape: &[usize]) -> Result<Var> {
        let mut vars = self.vars.lock().expect("fresh weights");
        if let Some(v) = vars.get(name) {
            if v.dims() != shape {
                bail!(
                    "(new model): tensor `{name}` asked for with shapes {:?} and {shape:?}",
                    v.dims()
                );
            }
            return Ok(v.clone());
        }
        let mut rng = self.rng.lock().expect("fresh weights rng");
        let t = init_tensor(self.config, name, shape, &mut rng, self.device)?;
        let v = Var::from_tensor(&t)?;
        vars.insert(name.to_string(), v.clone());
        Ok(v)
    }

    fn contains(&self, name: &str) -> bool {
        self.vars.lock().expect("fresh weights").contains_key(name)
    }
}
