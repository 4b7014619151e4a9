//! What a training run trains on, epoch by epoch: the corpus cut into windows, the windows as
//! examples (sensitive targets masked or not), and surrogate data, where every epoch the spans
//! get fresh fake values before tokenization.

use super::step::Origin;
use super::Example;
use crate::data::spans::Document;
use crate::data::surrogate::apply_surrogates;
use crate::data::tokens::{self, Framing, Window};
use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
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
            origin: Origin {
                doc: w.doc_index,
                start: w.start,
            },
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

/// The true windows as forget examples: their sensitive tokens are the forget targets (see
/// [`super::TrainStep::with_forgetting`]). With `train_rest` every window's other tokens train as
/// usual; without it only the windows that hold spans are kept, and nothing else trains.
pub fn windows_to_forget_examples(windows: &[Window], train_rest: bool) -> Vec<Example> {
    windows
        .iter()
        .filter(|w| w.ids.len() >= 2 && (train_rest || w.sensitive.iter().any(|&s| s)))
        .map(|w| Example {
            ids: w.ids.clone(),
            train: w.sensitive.iter().map(|&s| train_rest && !s).collect(),
            sensitive: vec![false; w.ids.len()],
            forget: w.sensitive.clone(),
            origin: Origin {
                doc: w.doc_index,
                start: w.start,
            },
        })
        .collect()
}

/// How surrogate repair forgets the true values (besides training on fakes in their place).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Forgetting {
    /// Surrogates only.
    Off,
    /// The true windows that hold spans join every epoch as forget examples (twice the work).
    Added,
    /// Each epoch, this share of the documents is trained in its true form instead of with
    /// surrogates: their sensitive tokens are forget targets, the rest trains as usual (the
    /// same work as surrogates only).
    Share(f64),
}

/// Which documents train in their true form in `epoch` under [`Forgetting::Share`]`(share)`: a
/// block of `round(share x n)` documents of one fixed random order, each epoch's block starting
/// where the previous one ended. Every document is forgotten as evenly as the share allows (at
/// 0.75 over 2 epochs, each once or twice), where an independent draw per epoch left one in
/// 16 never forgotten. The order has its own seed stream, so the surrogates of the other
/// documents are those of a run without forgetting.
pub fn kept_true_in_epoch(n: usize, share: f64, seed: u64, epoch: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_mul(7_000_003)));
    let per_epoch = (share.clamp(0.0, 1.0) * n as f64).round() as usize;
    let mut kept = vec![false; n];
    if n == 0 {
        return kept;
    }
    let start = (epoch * per_epoch) % n;
    for k in 0..per_epoch {
        kept[order[(start + k) % n]] = true;
    }
    kept
}

/// Surrogate repair data: every epoch the spans get fresh fake values before tokenization,
/// with the true values forgotten as `forgetting` says.
pub struct SurrogateData<'a> {
    pub corpus: &'a Corpus<'a>,
    pub seed: u64,
    pub forgetting: Forgetting,
}

impl EpochData for SurrogateData<'_> {
    fn examples(&mut self, epoch: usize) -> Result<Vec<Example>> {
        let mut rng =
            StdRng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
        let kept = match self.forgetting {
            Forgetting::Share(q) => kept_true_in_epoch(self.corpus.docs.len(), q, self.seed, epoch),
            _ => vec![false; self.corpus.docs.len()],
        };
        let mut docs = Vec::with_capacity(self.corpus.docs.len());
        let (mut fake_of, mut true_of) = (Vec::new(), Vec::new());
        let mut kept_true = Vec::new();
        for (i, d) in self.corpus.docs.iter().enumerate() {
            let fake = apply_surrogates(d, &mut rng);
            if kept[i] {
                kept_true.push(d.clone());
                true_of.push(i);
            } else {
                docs.push(fake);
                fake_of.push(i);
            }
        }
        // Origins index the corpus, not the lists the windows were cut from.
        let origin_in = |mut e: Vec<Example>, of: &[usize]| {
            for x in &mut e {
                x.origin.doc = of[x.origin.doc];
            }
            e
        };
        let mut examples = origin_in(
            windows_to_examples(&self.corpus.windows(&docs)?, false),
            &fake_of,
        );
        match self.forgetting {
            Forgetting::Off => {}
            Forgetting::Added => {
                let truth = self.corpus.windows(self.corpus.docs)?;
                examples.extend(windows_to_forget_examples(&truth, false));
            }
            Forgetting::Share(_) => {
                if !kept_true.is_empty() {
                    let truth = self.corpus.windows(&kept_true)?;
                    examples.extend(origin_in(
                        windows_to_forget_examples(&truth, true),
                        &true_of,
                    ));
                }
            }
        }
        Ok(examples)
    }
    fn is_fixed(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::spans::Span;
    use crate::data::tokens::train_test_tokenizer;

    fn docs() -> Vec<Document> {
        (0..40)
            .map(|i| {
                let text = format!("Patient Ann Lee{i} was seen on the ward today.");
                Document {
                    id: format!("d{i}"),
                    spans: vec![Span {
                        start: 8,
                        end: text.find(" was").unwrap(),
                        label: "NAME".into(),
                    }],
                    text,
                }
            })
            .collect()
    }

    fn epoch(forgetting: Forgetting, docs: &[Document], tok: &Tokenizer) -> Vec<Example> {
        let corpus = Corpus {
            docs,
            tok,
            labels: vec!["NAME".into()],
            framing: Framing::bos_only(None),
            max_seq_len: 64,
            stride: None,
        };
        SurrogateData {
            corpus: &corpus,
            seed: 3,
            forgetting,
        }
        .examples(0)
        .unwrap()
    }

    #[test]
    fn a_share_of_documents_trains_true_with_its_spans_as_forget_targets() {
        let docs = docs();
        let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
        let tok = train_test_tokenizer(&texts, 300);
        let off = epoch(Forgetting::Off, &docs, &tok);
        let added = epoch(Forgetting::Added, &docs, &tok);
        let share = epoch(Forgetting::Share(0.5), &docs, &tok);
        assert_eq!(off.len(), 40);
        assert_eq!(added.len(), 80, "every true window added");
        assert_eq!(share.len(), 40, "the same work as surrogates only");
        let truth: Vec<&Example> = share.iter().filter(|e| e.forget.contains(&true)).collect();
        assert_eq!(truth.len(), 20, "exactly the share of the documents");
        for e in &truth {
            // Sensitive tokens are forget targets only; everything else trains.
            for i in 0..e.ids.len() {
                assert_eq!(e.train[i], !e.forget[i]);
                assert!(!e.sensitive[i]);
            }
        }
        // The documents kept true are the originals, the others get the same surrogates as
        // without forgetting.
        let true_ids: Vec<Vec<u32>> = tokens::encode_documents(&tok, &docs)
            .unwrap()
            .into_iter()
            .map(|d| d.ids)
            .collect();
        for e in &truth {
            assert_eq!(e.ids, true_ids[e.origin.doc], "origin names the document");
        }
        let fakes: Vec<&Example> = share.iter().filter(|e| !e.forget.contains(&true)).collect();
        for e in fakes {
            assert!(off.iter().any(|o| o.ids == e.ids && o.origin == e.origin));
            assert!(e.sensitive.contains(&true));
        }
    }

    #[test]
    fn every_document_is_forgotten_as_evenly_as_the_share_allows() {
        for (n, share, epochs) in [(40, 0.75, 2), (17, 0.5, 3), (5, 0.3, 4), (1, 1.0, 2)] {
            let mut times = vec![0usize; n];
            for epoch in 0..epochs {
                let kept = kept_true_in_epoch(n, share, 3, epoch);
                let per_epoch = (share * n as f64).round() as usize;
                assert_eq!(kept.iter().filter(|&&k| k).count(), per_epoch);
                for (t, k) in times.iter_mut().zip(kept) {
                    *t += k as usize;
                }
            }
            let (lo, hi) = (times.iter().min().unwrap(), times.iter().max().unwrap());
            assert!(hi - lo <= 1, "n {n} share {share}: {times:?}");
        }
        assert!(kept_true_in_epoch(0, 0.5, 3, 1).is_empty());
        // Another seed, another order.
        assert_ne!(
            kept_true_in_epoch(40, 0.5, 3, 0),
            kept_true_in_epoch(40, 0.5, 4, 0)
        );
    }
}
