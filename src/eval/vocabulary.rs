//! Secrets inside the tokenizer: a BPE trained on the notes learns frequent surnames, record
//! numbers and terms as tokens of their own, and `tokenizer.json` ships them in plain text. No
//! erasure of weights removes that, so `sani eval` counts, per label, the sensitive spans that
//! are a single token in context and those whose every word is a token of its own. The same
//! count on the control spans is the chance level: common first names and short numbers are
//! tokens of any large vocabulary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::regurgitation::SpanResult;

/// Vocabulary counts of one label (or of all spans).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VocabularyCounts {
    pub spans: usize,
    /// Spans encoded as exactly one token in their document.
    pub single_token: usize,
    /// Spans whose every word (split at whitespace) is a single token, with or without the
    /// tokenizer's leading-space form; single-token spans included.
    pub words_as_tokens: usize,
    /// words_as_tokens / spans.
    pub words_as_tokens_rate: f64,
}

/// Per label and in total.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VocabularyExposure {
    pub per_label: BTreeMap<String, VocabularyCounts>,
    pub total: VocabularyCounts,
}

impl VocabularyExposure {
    /// The counts of two disjoint sets of spans together.
    pub fn merged(&self, other: &VocabularyExposure) -> VocabularyExposure {
        let mut out = self.clone();
        for (label, c) in other
            .per_label
            .iter()
            .map(|(l, c)| (Some(l), c))
            .chain([(None, &other.total)])
        {
            let into = match label {
                Some(l) => out.per_label.entry(l.clone()).or_default(),
                None => &mut out.total,
            };
            into.spans += c.spans;
            into.single_token += c.single_token;
            into.words_as_tokens += c.words_as_tokens;
        }
        for c in out.per_label.values_mut().chain([&mut out.total]) {
            c.words_as_tokens_rate = c.words_as_tokens as f64 / c.spans.max(1) as f64;
        }
        out
    }
}

/// Whether `word` is one token of `tok`, on its own or after a space.
fn is_one_token(tok: &Tokenizer, word: &str) -> bool {
    [word.to_string(), format!(" {word}")].iter().any(|w| {
        tok.encode(w.as_str(), false)
            .is_ok_and(|e| e.get_ids().len() == 1)
    })
}

/// Counts the spans of a regurgitation measurement that the vocabulary holds.
pub fn vocabulary_exposure(tok: &Tokenizer, spans: &[SpanResult]) -> VocabularyExposure {
    let mut out = VocabularyExposure::default();
    let mut cache: BTreeMap<String, bool> = BTreeMap::new();
    for s in spans {
        let single = s.span_ids.len() == 1;
        let words_as_tokens = single
            || s.span_text.split_whitespace().all(|w| {
                *cache
                    .entry(w.to_string())
                    .or_insert_with(|| is_one_token(tok, w))
            });
        for c in [
            out.per_label.entry(s.label.clone()).or_default(),
            &mut out.total,
        ] {
            c.spans += 1;
            c.single_token += usize::from(single);
            c.words_as_tokens += usize::from(words_as_tokens);
        }
    }
    for c in out.per_label.values_mut().chain([&mut out.total]) {
        c.words_as_tokens_rate = c.words_as_tokens as f64 / c.spans.max(1) as f64;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(label: &str, text: &str, ids: usize) -> SpanResult {
        SpanResult {
            doc_index: 0,
            doc_id: "d".into(),
            span_index: 0,
            label: label.into(),
            start: 0,
            end: text.chars().count(),
            span_text: text.into(),
            prompt_ids: vec![1],
            span_ids: vec![7; ids],
            max_new_tokens: 4,
            generated_ids: vec![],
            generated_text: String::new(),
            exact: false,
            partial: false,
            in_prompt: false,
            strength: 0.0,
            sampled_exact: None,
            sampled_tokens: 0,
        }
    }

    #[test]
    fn counts_single_tokens_and_whole_words() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2_f32");
        let tok = crate::io::load_tokenizer(&dir).unwrap();
        // A word the fixture's tiny BPE holds as one token, and one it does not.
        let vocab = tok.get_vocab(false);
        let word = vocab
            .keys()
            .filter_map(|t| t.strip_prefix('Ġ'))
            .find(|w| w.len() >= 3 && w.chars().all(char::is_alphabetic))
            .expect("a whole-word token")
            .to_string();
        let rare = "Qzxjvkwq";
        assert!(is_one_token(&tok, &word) && !is_one_token(&tok, rare));
        let e = vocabulary_exposure(
            &tok,
            &[
                span("NAME", &format!("{word} {word}"), 2),
                span("NAME", &format!("{word} {rare}"), 5),
                span("MRN", "x", 1),
            ],
        );
        let name = &e.per_label["NAME"];
        assert_eq!(
            (name.spans, name.single_token, name.words_as_tokens),
            (2, 0, 1)
        );
        assert_eq!(e.per_label["MRN"].single_token, 1);
        assert_eq!((e.total.spans, e.total.words_as_tokens), (3, 2));
        assert!((e.total.words_as_tokens_rate - 2.0 / 3.0).abs() < 1e-12);
    }
}
