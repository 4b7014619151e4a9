//! The workflows behind the subcommands, each a function over the building blocks: `sanitize`
//! (erase, repair, write), `prepare` (erase, and the repair set for an external trainer),
//! `eval`, `finetune`, `inspect` and `demo`.

pub mod demo;
pub mod eval;
pub mod finetune;
pub mod inspect;
pub mod prepare;
pub mod sanitize;

use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Duration and throughput of one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseTiming {
    pub phase: String,
    pub seconds: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
}

impl PhaseTiming {
    pub fn new(phase: &str, start: Instant, tokens: usize) -> Self {
        let seconds = start.elapsed().as_secs_f64();
        PhaseTiming {
            phase: phase.to_string(),
            seconds,
            tokens,
            tokens_per_s: if seconds > 0.0 {
                tokens as f64 / seconds
            } else {
                0.0
            },
        }
    }
}
