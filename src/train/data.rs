//! What a training run trains on, epoch by epoch: the corpus cut into windows, the windows as
//! examples (sensitive targets masked or not), and surrogate data, where every epoch the spans
//! get fresh fake values before tokenization.

use super::Example;
use crate::data::spans::Document;
use crate::data::surrogate::apply_surrogates;
use crate::data::tokens::{self, Framing, Window};
use anyhow::Result;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokenizers::Tokenizer;

/// Makes the examples of one epoch (called each epoch, so surrogates can be redrawn).
pub trait EpochData {
    fn examples(&mut self, epoch: usize) -> Result<Vec<Example>>;
    /// True when every epoch yields the same examples (frozen blocks can then be computed once).
    fn is_fixed(&self) -> bool;
}

/// Fixed examples, the same every epoch.
pub struct FixedData(pub Vec<Example>);

impl EpochData for FixedData {
    fn examples(&mut self, _epoch: usize) -> Result<Vec<Example>> {
        Ok(self.0.clone())
    }
    fn is_fixed(&self) -> bool {
        true
    }
}

/// Converts tokenized windows to training examples; `mask_sensitive` removes them from the loss.
pub fn windows_to_examples(windows: &[Window], mask_sensitive: bool) -> Vec<Example> {
    windows
        .iter()
        .filter(|w| w.ids.len() >= 2)
        .map(|w| Example {
            forget: Vec::new(),
            ids: w.ids.clone(),
            train: w
                .sensitive
                .iter()
                .map(|&s| !(mask_sensitive && s))
                .collect(),
            sensitive: w.sensitive.clone(),
        })
        .collect()
}

/// The corpus tokenized into examples.
pub struct Corpus<'a> {
    pub docs: &'a [Document],
    pub tok: &'a Tokenizer,
    pub labels: Vec<String>,
    pub framing: Framing,
    pub max_seq_len: usize,
    pub stride: Option<usize>,
}

impl Corpus<'_> {
    pub fn windows(&self, docs: &[Document]) -> Result<Vec<Window>> {
        let enc = tokens::encode_documents(self.tok, docs)?;
        Ok(tokens::make_windows(
            docs,
            &enc,
            &self.labels,
            &self.framing,
            self.max_seq_len,
            self.stride,
        ))
    }
}

/// The windows as forget examples: the true sensitive tokens are the forget targets, nothing
/// else is trained (see [`super::TrainStep::with_forgetting`]).
pub fn windows_to_forget_examples(windows: &[Window]) -> Vec<Example> {
    windows
        .iter()
        .filter(|w| w.ids.len() >= 2 && w.sensitive.iter().any(|&s| s))
        .map(|w| Example {
            ids: w.ids.clone(),
            train: vec![false; w.ids.len()],
            sensitive: vec![false; w.ids.len()],
            forget: w.sensitive.clone(),
        })
        .collect()
}

/// Surrogate repair data: every epoch the spans get fresh fake values before tokenization.
/// With `forget`, the true windows that hold spans join every epoch as forget examples.
pub struct SurrogateData<'a> {
    pub corpus: &'a Corpus<'a>,
    pub seed: u64,
    pub forget: bool,
}

impl EpochData for SurrogateData<'_> {
    fn examples(&mut self, epoch: usize) -> Result<Vec<Example>> {
        let mut rng =
            StdRng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
        let docs: Vec<Document> = self
            .corpus
            .docs
            .iter()
            .map(|d| apply_surrogates(d, &mut rng))
            .collect();
        let mut examples = windows_to_examples(&self.corpus.windows(&docs)?, false);
        if self.forget {
            let truth = self.corpus.windows(self.corpus.docs)?;
            examples.extend(windows_to_forget_examples(&truth));
        }
        Ok(examples)
    }
    fn is_fixed(&self) -> bool {
        false
    }
}
