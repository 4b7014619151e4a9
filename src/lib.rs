//! sani: sanitize fine-tuned causal language models so that they stop regurgitating sensitive
//! data, following SANI ("Leverage Unlearning to Sanitize LLMs", arXiv 2510.21322).
//!
//! Layers, each depending only on the ones listed before it (README, "Architecture"):
//! - [`nn`]: tensor ops with fused CPU kernels (forward and backward);
//! - [`model`]: `config.json`, the architectures behind the [`model::CausalLm`] trait, decoding;
//! - [`io`]: model directories on disk (checkpoints, the hub cache, atomic output, JSON);
//! - [`data`]: documents with sensitive spans, tokenization into windows, surrogates, synthetic notes;
//! - [`train`], [`erase`], [`eval`]: the building blocks of sanitizing and measuring;
//! - [`recipes`]: the workflows (`sanitize`, `finetune`, `eval`, `inspect`, `demo`);
//! - [`cli`]: the command line: subcommands, flags resolved into jobs, exit codes.

pub mod cli;
pub mod data;
pub mod erase;
pub mod eval;
pub mod io;
pub mod model;
pub mod nn;
pub mod recipes;
pub mod runtime;
pub mod train;
