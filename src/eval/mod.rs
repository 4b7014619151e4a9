//! Measurements of a model: regurgitation of sensitive spans ([`regurgitation`]), the attack
//! suite built on it ([`attacks`]), utility as perplexity ([`perplexity`]), secrets held by the
//! tokenizer itself ([`vocabulary`]), the report with its gate ([`report`]), and sharded runs with
//! their merge ([`shard`]). The `sani eval` recipe
//! that runs them is [`crate::recipes::eval`].

pub mod attacks;
pub mod perplexity;
pub mod regurgitation;
pub mod report;
pub mod shard;
pub mod vocabulary;

pub use perplexity::{perplexity, Perplexity, PplStat, DEFAULT_PPL_SEQ_LEN};
pub use regurgitation::{
    regurgitation, BosInfo, LabelCounts, RegurgitationResult, RegurgitationSettings,
    RegurgitationSummary, SpanResult,
};
pub use report::{EvalReport, Verdict};
