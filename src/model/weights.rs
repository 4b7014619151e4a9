//! How an architecture gets its tensors: a [`Weights`] view is a name prefix over a [`Loader`],
//! in the spirit of candle's `VarBuilder`. Each tensor name is written once, in the `load` of
//! the struct that owns it; the loader records which names each block and the final norm used,
//! so that the lists of tensors a block owns come from loading, not from a second list.

use crate::nn::lora::{LoraAdapter, LoraConfig, LoraVars};
use anyhow::Result;
use candle_core::{Tensor, Var};
use std::collections::{BTreeMap, HashSet};

/// Where tensors come from: a checkpoint on disk, or a fresh initialization.
pub trait WeightSource {
    /// The tensor stored (or created) under `name`; an error when it is missing or has another shape.
    fn var(&self, name: &str, shape: &[usize]) -> Result<Var>;
    fn contains(&self, name: &str) -> bool;
    /// The tensor under `name`, for use without gradient (a source may give a view that holds
    /// no data when nothing will be computed with it).
    fn frozen(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.var(name, shape)?.as_tensor().detach())
    }
    /// The tensor under `name` in the dtype it is stored in when that takes less memory than
    /// f32 (bf16, f16), else as [`WeightSource::var`] gives it: for frozen weights read only by
    /// ops that widen them as they go.
    fn stored(&self, name: &str, shape: &[usize]) -> Result<Var> {
        self.var(name, shape)
    }
}

/// Which part of the model a tensor belongs to (for training scopes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Other,
    Block(usize),
    FinalNorm,
}

/// The tensor names a loaded model used, by part.
#[derive(Debug, Clone, Default)]
pub struct LoadedNames {
    pub all: HashSet<String>,
    /// Per transformer block, the names of its tensors in load order.
    pub blocks: BTreeMap<usize, Vec<String>>,
    pub final_norm: Vec<String>,
}

/// Looks tensors up in a source, recording which names were used and which are trainable.
pub struct Loader<'a> {
    source: &'a dyn WeightSource,
    trainable: &'a dyn Fn(&str) -> bool,
    part: Part,
    pub names: LoadedNames,
    pub vars: BTreeMap<String, Var>,
    /// Adapters to add to the projections it names (None: no LoRA).
    lora: Option<LoraConfig>,
    /// The adapters created, in load order (their vars are also in `vars`).
    pub adapters: Vec<LoraVars>,
    /// Frozen projection weights held in their stored 16-bit dtype (see
    /// [`Loader::holding_frozen_projections_stored`]).
    frozen_projections_stored: bool,
}

impl<'a> Loader<'a> {
    pub fn new(source: &'a dyn WeightSource, trainable: &'a dyn Fn(&str) -> bool) -> Self {
        Loader {
            source,
            trainable,
            part: Part::Other,
            names: LoadedNames::default(),
            vars: BTreeMap::new(),
            lora: None,
            adapters: Vec::new(),
            frozen_projections_stored: false,
        }
    }

    /// Holds the frozen projection weights (every one but the trained ones) in their stored
    /// dtype when that is 16-bit, as LoRA's base weights are: the linear ops widen them per
    /// pass. For training, where the f32 copies would stay resident for the whole run; not for
    /// inference, where a decoding step would widen every weight each time.
    pub fn holding_frozen_projections_stored(mut self, on: bool) -> Self {
        self.frozen_projections_stored = on;
        self
    }

    /// Adds LoRA adapters to the projections `cfg` targets.
    pub fn with_lora(mut self, cfg: Option<LoraConfig>) -> Self {
        self.lora = cfg;
        self
    }

    /// The weight of the projection `module` (stored `shape`, mapping `dims`) and its adapter,
    /// when LoRA targets it. The adapted weight stays frozen, held in its stored dtype (see
    /// [`WeightSource::stored`]); the merge at the end updates it in place.
    fn adapted_weight(
        &mut self,
        module: &str,
        shape: &[usize],
        dims: (usize, usize),
        stored_in_out: bool,
    ) -> Result<Option<(Tensor, LoraAdapter)>> {
        let Some(cfg) = self.lora.clone().filter(|c| c.targets_module(module)) else {
            return Ok(None);
        };
        let name = format!("{module}.weight");
        let base = self.source.stored(&name, shape)?;
        self.record(&name);
        let weight = base.as_tensor().detach();
        let (vars, adapter) = LoraVars::new(&cfg, module, base, dims, stored_in_out)?;
        let (a, b) = vars.var_names();
        self.vars.insert(a, vars.a.clone());
        self.vars.insert(b, vars.b.clone());
        self.adapters.push(vars);
        Ok(Some((weight, adapter)))
    }

    /// The root view (no prefix).
    pub fn root(&mut self) -> Weights<'_, 'a> {
        Weights {
            loader: self,
            prefix: String::new(),
        }
    }

    /// Records that `name` was loaded, under the current part.
    fn record(&mut self, name: &str) {
        self.names.all.insert(name.to_string());
        match self.part {
            Part::Block(i) => self.names.blocks.entry(i).or_default().push(name.into()),
            Part::FinalNorm => self.names.final_norm.push(name.into()),
            Part::Other => {}
        }
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.record(name);
        if !(self.trainable)(name) {
            return self.source.frozen(name, shape);
        }
        let var = self.source.var(name, shape)?;
        self.vars.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }
}

/// A name prefix over a [`Loader`]: `w.pp("mlp").get("c_fc.weight", ..)` loads `<prefix>.mlp.c_fc.weight`.
pub struct Weights<'l, 'a> {
    loader: &'l mut Loader<'a>,
    prefix: String,
}

impl<'a> Weights<'_, 'a> {
    /// The full name of `name` under this prefix.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A view one level down (`pp("")` is the same prefix).
    pub fn pp(&mut self, sub: impl std::fmt::Display) -> Weights<'_, 'a> {
        let sub = sub.to_string();
        let prefix = if sub.is_empty() {
            self.prefix.clone()
        } else {
            self.name(&sub)
        };
        Weights {
            loader: self.loader,
            prefix,
        }
    }

    pub fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.name(name);
        self.loader.get(&full, shape)
    }

    /// The tensor when `present`, else None (optional biases).
    pub fn get_if(&mut self, present: bool, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        present.then(|| self.get(name, shape)).transpose()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.loader.source.contains(&self.name(name))
    }

    /// The weight of the projection at this prefix (`<prefix>.weight`, `d_in` -> `d_out`,
    /// stored (in, out) when `stored_in_out`, a GPT-2 `Conv1D`, else (out, in)) and its LoRA
    /// adapter when LoRA is on and targets it.
    pub fn projection(
        &mut self,
        d_in: usize,
        d_out: usize,
        stored_in_out: bool,
    ) -> Result<(Tensor, Option<LoraAdapter>)> {
        let shape = match stored_in_out {
            true => [d_in, d_out],
            false => [d_out, d_in],
        };
        let module = self.prefix.clone();
        match self
            .loader
            .adapted_weight(&module, &shape, (d_in, d_out), stored_in_out)?
        {
            Some((weight, adapter)) => Ok((weight, Some(adapter))),
            None => {
                let name = self.name("weight");
                if self.loader.frozen_projections_stored && !(self.loader.trainable)(&name) {
                    self.loader.record(&name);
                    let w = self.loader.source.stored(&name, &shape)?;
                    return Ok((w.as_tensor().detach(), None));
                }
                Ok((self.get("weight", &shape)?, None))
            }
        }
    }

    /// Loads transformer block `layer` with `load`, recording the names it loads as the block's.
    pub fn block<T>(
        &mut self,
        layer: usize,
        load: impl FnOnce(&mut Weights<'_, 'a>) -> Result<T>,
    ) -> Result<T> {
        self.in_part(Part::Block(layer), load)
    }

    /// Loads the final norm with `load`, recording its names.
    pub fn final_norm<T>(
        &mut self,
        load: impl FnOnce(&mut Weights<'_, 'a>) -> Result<T>,
    ) -> Result<T> {
        self.in_part(Part::FinalNorm, load)
    }

    fn in_part<T>(
        &mut self,
        part: Part,
        load: impl FnOnce(&mut Weights<'_, 'a>) -> Result<T>,
    ) -> Result<T> {
        let before = std::mem::replace(&mut self.loader.part, part);
        let out = load(self);
        self.loader.part = before;
        out
    }
}
