//! `sani inspect`: what a model directory holds.

use crate::cli::ModelArgs;
use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct ModelSummary {
    pub path: String,
    pub architecture: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub mlp_width: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub parameters: usize,
    /// Number of tensors stored in each dtype.
    pub dtypes: BTreeMap<String, usize>,
    pub tied_embeddings: bool,
    pub shards: usize,
    pub tokenizer_vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// What would make other commands refuse this model (empty when none).
    pub problems: Vec<String>,
    /// The PEFT adapter merged for `--adapter-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<crate::io::peft::MergedAdapter>,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let device = args.model.runtime.setup()?;
    let (ckpt, tok, problems) = crate::io::open_model_lenient(&args.model.source(), &device)?;
    // Building the model validates names and shapes.
    crate::model::Model::load_frozen(&ckpt)?;
    let c = &ckpt.config;
    let mut dtypes = BTreeMap::new();
    for e in &ckpt.entries {
        *dtypes.entry(format!("{:?}", e.dtype)).or_insert(0) += 1;
    }
    let (heads, kv_heads) = c.heads();
    let s = ModelSummary {
        path: ckpt.dir.display().to_string(),
        architecture: c.architecture().to_string(),
        layers: c.num_layers(),
        hidden_size: c.hidden_size(),
        mlp_width: c.mlp_width(),
        heads,
        kv_heads,
        vocab_size: c.vocab_size(),
        max_positions: c.max_positions(),
        parameters: ckpt.parameter_count(),
        dtypes,
        tied_embeddings: c.tied_embeddings(),
        shards: ckpt.shards.len(),
        tokenizer_vocab_size: tok.get_vocab_size(true),
        bos_token_id: c.bos_token_id(),
        eos_token_ids: c.eos_token_ids(),
        problems,
        adapter: ckpt.adapter.clone(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return problems_verdict(&s.problems);
    }
    println!("model          {}", s.path);
    println!("architecture   {}", s.architecture);
    println!("layers         {}", s.layers);
    println!("hidden size    {}", s.hidden_size);
    println!("MLP width      {}", s.mlp_width);
    println!("heads          {} (kv heads {})", s.heads, s.kv_heads);
    println!(
        "vocab          {} (tokenizer {})",
        s.vocab_size, s.tokenizer_vocab_size
    );
    println!("context        {}", s.max_positions);
    println!(
        "parameters     {} ({:.2}M)",
        s.parameters,
        s.parameters as f64 / 1e6
    );
    let dt: Vec<String> = s.dtypes.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    println!("dtypes         {}", dt.join(", "));
    println!("tied head      {}", s.tied_embeddings);
    println!("shards         {}", s.shards);
    if let Some(a) = &s.adapter {
        println!("{}", a.summary());
    }
    for p in &s.problems {
        println!("problem        {p}");
    }
    problems_verdict(&s.problems)
}

/// Exit 2 when the model has problems, so a script notices.
fn problems_verdict(problems: &[String]) -> Result<()> {
    match problems.len() {
        0 => Ok(()),
        n => bail!(
            "the model has {n} problem{} (listed above); other commands refuse it",
            if n == 1 { "" } else { "s" }
        ),
    }
}
