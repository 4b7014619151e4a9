//! sani: sanitize fine-tuned causal language models so that they stop regurgitating sensitive
//! data, following SANI ("Leverage Unlearning to Sanitize LLMs", arXiv 2510.21322).

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod demo;
pub mod erase;
pub mod eval;
pub mod finetune;
pub mod fused;
pub mod generate;
pub mod inspect;
pub mod model;
pub mod ops;
pub mod output;
pub mod report;
pub mod runtime;
pub mod sanitize;
pub mod spans;
pub mod surrogate;
pub mod synth;
pub mod tokens;
pub mod train;
