//! Sensitive spans and the documents that carry them: parsing and validating the sensitive
//! file formats (JSONL documents with spans, corpus + span references, Presidio results, term lists).
//!
//! Formats accepted by [`load_documents`]:
//!
//! 1. Sensitive file alone: one JSON object per line,
//!    `{"id": "note-17", "text": "...", "spans": [{"start": 8, "end": 18, "label": "NAME", "text": "optional"}]}`.
//! 2. Corpus file (`{"id", "text"}` per line, optionally with `"spans"`) plus a sensitive file whose
//!    lines reference documents by id: `{"id", "start", "end", "label"}`, `{"id", "spans": [...]}`,
//!    Presidio results `{"id", "entity_type", "start", "end", "score"}` or `{"id", "results": [...]}`.
//! 3. Term file (one term per line, `#` comments): every case-insensitive whole-word occurrence
//!    in the documents becomes a `TERM` span. Combinable with 1 or 2.
//!
//! Offsets are Unicode scalar (Rust `char`) offsets, end exclusive. After loading, the spans of each
//! document are sorted by start and non-overlapping (overlapping or touching spans are merged).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One sensitive span: Unicode character (scalar value) offsets into the document text, end exclusive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub label: String,
}

/// A document of the corpus with its sensitive spans (sorted by start, non-overlapping after loading).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    pub id: String,
    pub text: String,
    pub spans: Vec<Span>,
}

/// Where the sensitive spans and their corpus come from (see [`load_documents`]).
#[derive(Debug, Clone, Default)]
pub struct SpanSources {
    pub sensitive: Option<PathBuf>,
    pub corpus: Option<PathBuf>,
    pub terms: Option<PathBuf>,
    /// Quote document and span text in error messages (off: they hold the secrets, and error
    /// messages end up in CI logs).
    pub show_text: bool,
}

impl SpanSources {
    pub fn load(&self) -> Result<Vec<Document>> {
        load_documents_quoting(
            self.sensitive.as_deref(),
            self.corpus.as_deref(),
            self.terms.as_deref(),
            self.show_text,
        )
    }
}

/// Label given to spans found from the term list.
pub const TERM_LABEL: &str = "TERM";

/// Load the documents and their sensitive spans.
///
/// * `sensitive` only: primary format (documents with inline spans).
/// * `corpus` (+ optional `sensitive`): the corpus lines are the documents; the sensitive file's
///   lines reference them by id (span lines, `spans` arrays, Presidio results).
/// * `terms`: added on top of either; term occurrences become `TERM` spans.
///
/// All errors name the file and, for content errors, the 1-based line and the field. They never
/// quote document or span text (see [`load_documents_quoting`]).
pub fn load_documents(
    sensitive: Option<&Path>,
    corpus: Option<&Path>,
    terms: Option<&Path>,
) -> Result<Vec<Document>> {
    load_documents_quoting(sensitive, corpus, terms, false)
}

/// [`load_documents`]; with `show_text`, errors quote the text that does not match.
pub fn load_documents_quoting(
    sensitive: Option<&Path>,
    corpus: Option<&Path>,
    terms: Option<&Path>,
    show_text: bool,
) -> Result<Vec<Document>> {
    let mut docs = match (sensitive, corpus) {
        (_, Some(corpus_path)) => {
            let mut docs = parse_documents_file(corpus_path, show_text)?;
            if let Some(sens_path) = sensitive {
                attach_references_file(&mut docs, sens_path, corpus_path, show_text)?;
            }
            docs
        }
        (Some(sens_path), None) => parse_documents_file(sens_path, show_text)?,
        (None, None) => bail!(
            "no documents: give a sensitive file (documents with spans) or a corpus file (--corpus)"
        ),
    };
    if let Some(terms_path) = terms {
        let terms = read_terms(terms_path)?;
        parse_terms_into(&mut docs, &terms);
    }
    for doc in &mut docs {
        let spans = std::mem::take(&mut doc.spans);
        doc.spans = merge_spans(spans);
    }
    Ok(docs)
}

/// Sorted unique labels of all spans.
pub fn label_names(docs: &[Document]) -> Vec<String> {
    docs.iter()
        .flat_map(|d| d.spans.iter().map(|s| s.label.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Read a term file: one term per line (surrounding whitespace trimmed), blank lines and lines
/// starting with `#` ignored. Errors if the file is unreadable or holds no term.
pub fn read_terms(path: &Path) -> Result<Vec<String>> {
    let content = read_file(path)?;
    let terms: Vec<String> = content
        .lines()
        .map(|l| l.trim_start_matches('\u{feff}').trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if terms.is_empty() {
        bail!(
            "{}: empty term file (no terms; blank lines and '#' comments are ignored)",
            path.display()
        );
    }
    Ok(terms)
}

/// Add a `TERM` span for every case-insensitive occurrence of each term in each document, where
/// the characters just before and after the occurrence (if any) are not alphanumeric nor `_`.
/// Offsets are char offsets of the original text. Spans are appended unsorted and unmerged;
/// call [`merge_spans`] afterwards (as [`load_documents`] does).
pub fn parse_terms_into(docs: &mut [Document], terms: &[String]) {
    // Terms folded char by char (one char of the term <-> one char of the text).
    let mut by_first: HashMap<char, Vec<Vec<char>>> = HashMap::new();
    for t in terms {
        let folded: Vec<char> = t.trim().chars().map(fold_char).collect();
        if folded.is_empty() {
            continue;
        }
        let entry = by_first.entry(folded[0]).or_default();
        if !entry.contains(&folded) {
            entry.push(folded);
        }
    }
    if by_first.is_empty() {
        return;
    }
    for doc in docs.iter_mut() {
        let text: Vec<char> = doc.text.chars().collect();
        let folded: Vec<char> = text.iter().copied().map(fold_char).collect();
        for i in 0..folded.len() {
            if i > 0 && is_word_char(text[i - 1]) {
                continue;
            }
            let Some(cands) = by_first.get(&folded[i]) else {
                continue;
            };
            for term in cands {
                let end = i + term.len();
                if end > folded.len() || folded[i..end] != term[..] {
                    continue;
                }
                if end < text.len() && is_word_char(text[end]) {
                    continue;
                }
                doc.spans.push(Span {
                    start: i,
                    end,
                    label: TERM_LABEL.to_string(),
                });
            }
        }
    }
}

/// Merge overlapping or touching spans (union). The merged span takes the label of its longest
/// piece (ties: the first piece in start order). Result sorted by start.
pub fn merge_spans(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort_by_key(|s| (s.start, s.end)); // stable: equal spans keep input order
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    let mut best_len = 0usize;
    for s in spans {
        let len = s.end - s.start;
        match out.last_mut() {
            Some(cur) if s.start <= cur.end => {
                cur.end = cur.end.max(s.end);
                if len > best_len {
                    best_len = len;
                    cur.label = s.label;
                }
            }
            _ => {
                best_len = len;
                out.push(s);
            }
        }
    }
    out
}

/// Number of chars of a text (span offsets are in these units).
pub fn char_len(text: &str) -> usize {
    text.chars().count()
}

/// The chars [start, end) of a text.
pub fn char_slice(text: &str, start: usize, end: usize) -> String {
    text.chars()
        .skip(start)
        .take(end.saturating_sub(start))
        .collect()
}

/// Char offsets to byte offsets of one text in O(1) memory per 256 chars and O(256) time per
/// lookup, for slicing long documents at many spans without scanning from the start each time.
pub struct CharIndex<'a> {
    text: &'a str,
    /// Byte offset of every 256th char, plus the text's length.
    marks: Vec<usize>,
    chars: usize,
}

impl<'a> CharIndex<'a> {
    const STEP: usize = 256;

    pub fn new(text: &'a str) -> Self {
        let mut marks = Vec::with_capacity(text.len() / Self::STEP + 2);
        let mut chars = 0;
        for (i, (b, _)) in text.char_indices().enumerate() {
            if i % Self::STEP == 0 {
                marks.push(b);
            }
            chars = i + 1;
        }
        CharIndex { text, marks, chars }
    }

    pub fn char_len(&self) -> usize {
        self.chars
    }

    /// Byte offset of char `c` (the text's length for `c >= char_len`).
    pub fn byte(&self, c: usize) -> usize {
        if c >= self.chars {
            return self.text.len();
        }
        let from = self.marks[c / Self::STEP];
        let skip = c % Self::STEP;
        self.text[from..]
            .char_indices()
            .nth(skip)
            .map_or(self.text.len(), |(b, _)| from + b)
    }

    /// The chars `[start, end)`.
    pub fn slice(&self, start: usize, end: usize) -> &'a str {
        let s = self.byte(start);
        &self.text[s..self.byte(end.max(start)).max(s)]
    }
}

// ----------------------------------------------------------------------------------------------
// internals

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Case folding that keeps a 1:1 char correspondence: the lowercase of `c` when it is a single
/// char, else `c` itself (e.g. 'İ', whose lowercase is two chars).
fn fold_char(c: char) -> char {
    let mut lc = c.to_lowercase();
    match (lc.next(), lc.next()) {
        (Some(l), None) => l,
        _ => c,
    }
}

fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Where an error is: file and 1-based line.
struct Loc<'a> {
    file: &'a Path,
    line: usize,
    /// Whether messages may quote document text.
    show_text: bool,
}

impl Loc<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}:{}: {}", self.file.display(), self.line, msg)
    }

    /// `s` for a message: quoted (truncated) with --show-text, else only its length.
    fn quote(&self, s: &str) -> String {
        if self.show_text {
            truncate_for_msg(s)
        } else {
            format!("({} chars, not shown)", char_len(s))
        }
    }

    /// How `expected` and `actual` differ, for a message: the first differing char position,
    /// plus both texts with --show-text.
    fn mismatch(&self, expected: &str, actual: &str) -> String {
        let at = expected
            .chars()
            .zip(actual.chars())
            .take_while(|(a, b)| a == b)
            .count();
        let mut m = format!(
            "{} vs {}, first difference at char {at}",
            self.quote(expected),
            self.quote(actual)
        );
        if !self.show_text {
            m += " (--show-text quotes the text)";
        }
        m
    }
}

/// Non-blank lines of a JSONL file, parsed as JSON objects, with their 1-based line numbers.
fn jsonl_objects(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let content = read_file(path)?;
    let mut out = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let line = if i == 0 {
            line.trim_start_matches('\u{feff}')
        } else {
            line
        };
        if line.trim().is_empty() {
            continue;
        }
        let loc = Loc {
            file: path,
            line: i + 1,
            show_text: false,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| loc.err(format!("invalid JSON: {e}")))?;
        match value {
            Value::Object(map) => out.push((i + 1, map)),
            other => {
                return Err(loc.err(format!(
                    "wrong type: expected a JSON object per line, got {}",
                    type_name(&other)
                )))
            }
        }
    }
    if out.is_empty() {
        bail!(
            "{}: empty input: no documents/lines found (only blank lines)",
            path.display()
        );
    }
    Ok(out)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn truncate_for_msg(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}…")
    }
}

fn get_id(obj: &Map<String, Value>, loc: &Loc) -> Result<String> {
    match obj.get("id") {
        None => Err(loc.err("missing field \"id\"")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
        Some(v) => Err(loc.err(format!(
            "wrong type: field \"id\" must be a string or an integer, got {}",
            type_name(v)
        ))),
    }
}

fn get_text(obj: &Map<String, Value>, loc: &Loc) -> Result<String> {
    match obj.get("text") {
        None => {
            let hint = if obj.contains_key("start") || obj.contains_key("entity_type") {
                " (span reference lines need a corpus file: --corpus)"
            } else {
                ""
            };
            Err(loc.err(format!("missing field \"text\"{hint}")))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(loc.err(format!(
            "wrong type: field \"text\" must be a string, got {}",
            type_name(v)
        ))),
    }
}

/// `prefix` is "" for a span given at the top level of a line, or e.g. "spans[2]." for an element.
fn get_offset(obj: &Map<String, Value>, field: &str, prefix: &str, loc: &Loc) -> Result<usize> {
    match obj.get(field) {
        None => Err(loc.err(format!("missing field \"{prefix}{field}\""))),
        Some(Value::Number(n)) if n.is_u64() => usize::try_from(n.as_u64().unwrap_or(u64::MAX))
            .map_err(|_| loc.err(format!("field \"{prefix}{field}\" is too large: {n}"))),
        Some(v) => Err(loc.err(format!(
            "wrong type: field \"{prefix}{field}\" must be a non-negative integer (char offset), got {}",
            match v {
                Value::Number(n) => n.to_string(),
                other => type_name(other).to_string(),
            }
        ))),
    }
}

fn get_label(obj: &Map<String, Value>, prefix: &str, loc: &Loc) -> Result<String> {
    let (field, value) = match (obj.get("label"), obj.get("entity_type")) {
        (Some(v), _) => ("label", v),
        (None, Some(v)) => ("entity_type", v),
        (None, None) => {
            return Err(loc.err(format!(
                "missing field \"{prefix}label\" (or \"{prefix}entity_type\")"
            )))
        }
    };
    match value {
        Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Value::String(_) => Err(loc.err(format!("field \"{prefix}{field}\" is empty"))),
        v => Err(loc.err(format!(
            "wrong type: field \"{prefix}{field}\" must be a string, got {}",
            type_name(v)
        ))),
    }
}

/// Parse and validate one span object against its document text.
fn parse_span(
    obj: &Map<String, Value>,
    prefix: &str,
    doc_text: &str,
    doc_chars: usize,
    loc: &Loc,
) -> Result<Span> {
    let start = get_offset(obj, "start", prefix, loc)?;
    let end = get_offset(obj, "end", prefix, loc)?;
    let label = get_label(obj, prefix, loc)?;
    if let Some(score) = obj.get("score") {
        if !score.is_number() && !score.is_null() {
            return Err(loc.err(format!(
                "wrong type: field \"{prefix}score\" must be a number, got {}",
                type_name(score)
            )));
        }
    }
    if start >= end {
        return Err(loc.err(format!(
            "field \"{prefix}start\": start {start} >= end {end} (spans must be non-empty, end exclusive)"
        )));
    }
    if end > doc_chars {
        return Err(loc.err(format!(
            "field \"{prefix}end\": end {end} > text length {doc_chars} chars"
        )));
    }
    match obj.get("text") {
        None | Some(Value::Null) => {}
        Some(Value::String(expected)) => {
            let actual = char_slice(doc_text, start, end);
            if &actual != expected {
                return Err(loc.err(format!(
                    "field \"{prefix}text\": the span text does not match the document's chars \
                     [{start}, {end}): {}",
                    loc.mismatch(expected, &actual)
                )));
            }
        }
        Some(v) => {
            return Err(loc.err(format!(
                "wrong type: field \"{prefix}text\" must be a string, got {}",
                type_name(v)
            )))
        }
    }
    Ok(Span { start, end, label })
}

/// Parse the spans of an array field ("spans" or "results") of a line.
fn parse_span_array(
    obj: &Map<String, Value>,
    field: &str,
    doc_text: &str,
    doc_chars: usize,
    loc: &Loc,
) -> Result<Vec<Span>> {
    let items = match obj.get(field) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err(loc.err(format!(
                "wrong type: field \"{field}\" must be an array, got {}",
                type_name(v)
            )))
        }
    };
    let mut spans = Vec::with_capacity(items.len());
    for (k, item) in items.iter().enumerate() {
        let prefix = format!("{field}[{k}].");
        match item {
            Value::Object(span_obj) => {
                spans.push(parse_span(span_obj, &prefix, doc_text, doc_chars, loc)?)
            }
            v => {
                return Err(loc.err(format!(
                    "wrong type: field \"{field}[{k}]\" must be an object, got {}",
                    type_name(v)
                )))
            }
        }
    }
    Ok(spans)
}

/// Parse a documents file (primary format, or a corpus): `{"id", "text", "spans"?}` per line.
fn parse_documents_file(path: &Path, show_text: bool) -> Result<Vec<Document>> {
    let objects = jsonl_objects(path)?;
    let mut docs = Vec::with_capacity(objects.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (line, obj) in objects {
        let loc = Loc {
            file: path,
            line,
            show_text,
        };
        let id = get_id(&obj, &loc)?;
        let text = get_text(&obj, &loc)?;
        if let Some(first) = seen.insert(id.clone(), line) {
            return Err(loc.err(format!(
                "duplicate document id {id:?} (first seen on line {first})"
            )));
        }
        let n = char_len(&text);
        let mut spans = parse_span_array(&obj, "spans", &text, n, &loc)?;
        spans.extend(parse_span_array(&obj, "results", &text, n, &loc)?);
        docs.push(Document { id, text, spans });
    }
    Ok(docs)
}

/// Attach the spans of a reference file (lines referencing corpus documents by id).
fn attach_references_file(
    docs: &mut [Document],
    path: &Path,
    corpus_path: &Path,
    show_text: bool,
) -> Result<()> {
    let objects = jsonl_objects(path)?;
    let index: HashMap<String, usize> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.clone(), i))
        .collect();
    let mut char_lens: Vec<Option<usize>> = vec![None; docs.len()];
    for (line, obj) in objects {
        let loc = Loc {
            file: path,
            line,
            show_text,
        };
        let id = get_id(&obj, &loc)?;
        let Some(&di) = index.get(&id) else {
            return Err(loc.err(format!(
                "unknown document id {id:?} (field \"id\": not in {})",
                corpus_path.display()
            )));
        };
        let doc = &mut docs[di];
        let n = *char_lens[di].get_or_insert_with(|| char_len(&doc.text));
        let has_arrays = obj.contains_key("spans") || obj.contains_key("results");
        if has_arrays {
            if let Some(t) = obj.get("text") {
                match t {
                    Value::String(s) if *s == doc.text => {}
                    Value::String(s) => {
                        return Err(loc.err(format!(
                            "field \"text\" differs from the text of document {id:?} in {}: {}",
                            corpus_path.display(),
                            loc.mismatch(s, &doc.text)
                        )))
                    }
                    v => {
                        return Err(loc.err(format!(
                            "wrong type: field \"text\" must be a string, got {}",
                            type_name(v)
                        )))
                    }
                }
            }
            let mut spans = parse_span_array(&obj, "spans", &doc.text, n, &loc)?;
            spans.extend(parse_span_array(&obj, "results", &doc.text, n, &loc)?);
            doc.spans.extend(spans);
        } else if obj.contains_key("start") || obj.contains_key("end") {
            let span = parse_span(&obj, "", &doc.text, n, &loc)?;
            doc.spans.push(span);
        } else {
            return Err(loc.err(
                "missing field \"start\" (a span line needs \"start\", \"end\" and \"label\"/\"entity_type\", or a \"spans\"/\"results\" array)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn write(&self, name: &str, content: &str) -> PathBuf {
            let p = self.dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        }
    }

    #[test]
    fn char_index_agrees_with_char_slice() {
        let text: String = (0..2000)
            .map(|i| ['a', 'é', '日', '🙂', ' '][i % 5])
            .collect();
        let ix = CharIndex::new(&text);
        assert_eq!(ix.char_len(), 2000);
        for (a, b) in [
            (0, 0),
            (0, 1),
            (3, 700),
            (255, 257),
            (1999, 2000),
            (1500, 2600),
            (2600, 2700),
        ] {
            assert_eq!(ix.slice(a, b), char_slice(&text, a, b), "{a}..{b}");
        }
        assert_eq!(CharIndex::new("").slice(0, 3), "");
    }

    fn err_of(r: Result<Vec<Document>>) -> String {
        format!("{:#}", r.expect_err("expected an error"))
    }

    fn load_primary(content: &str) -> Result<Vec<Document>> {
        let f = Files::new();
        let p = f.write("notes.jsonl", content);
        load_documents(Some(&p), None, None)
    }

    fn sp(start: usize, end: usize, label: &str) -> Span {
        Span {
            start,
            end,
            label: label.to_string(),
        }
    }

    #[test]
    fn primary_format_basic() {
        let docs = load_primary(concat!(
            r#"{"id": "note-17", "text": "Patient John Smith visited.", "spans": [{"start": 8, "end": 18, "label": "NAME", "text": "John Smith"}]}"#,
            "\n\n   \n",
            r#"{"id": 42, "text": "Nothing here."}"#,
            "\n",
            r#"{"id": -3, "text": "Zoë Müller called", "spans": [{"start": 0, "end": 10, "label": "NAME", "text": "Zoë Müller"}]}"#,
            "\n"
        ))
        .unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0].id, "note-17");
        assert_eq!(docs[0].spans, vec![sp(8, 18, "NAME")]);
        assert_eq!(docs[1].id, "42");
        assert!(docs[1].spans.is_empty());
        assert_eq!(docs[2].id, "-3");
        assert_eq!(docs[2].spans, vec![sp(0, 10, "NAME")]);
        assert_eq!(label_names(&docs), vec!["NAME".to_string()]);
    }

    #[test]
    fn crlf_and_bom_tolerated() {
        let docs = load_primary(
            "\u{feff}{\"id\": \"a\", \"text\": \"x\"}\r\n{\"id\": \"b\", \"text\": \"y\"}\r\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].text, "y");
    }

    fn assert_msg(msg: &str, parts: &[&str]) {
        for p in parts {
            assert!(msg.contains(p), "message {msg:?} should contain {p:?}");
        }
    }

    #[test]
    fn error_invalid_json() {
        let msg = err_of(load_primary(
            "{\"id\": \"a\", \"text\": \"x\"}\n{\"id\": \"b\", \"text\": \n",
        ));
        assert_msg(&msg, &["notes.jsonl:2:", "invalid JSON"]);
    }

    #[test]
    fn error_not_an_object() {
        let msg = err_of(load_primary("[1, 2]\n"));
        assert_msg(&msg, &["notes.jsonl:1:", "wrong type", "object"]);
    }

    #[test]
    fn error_missing_fields() {
        let msg = err_of(load_primary("\n\n{\"id\": \"a\"}\n"));
        assert_msg(&msg, &["notes.jsonl:3:", "missing field \"text\""]);
        let msg = err_of(load_primary("{\"text\": \"abc\"}\n"));
        assert_msg(&msg, &["notes.jsonl:1:", "missing field \"id\""]);
        let msg = err_of(load_primary(
            r#"{"id": "a", "text": "abcdef", "spans": [{"start": 1, "end": 2, "label": "X"}, {"start": 1, "label": "X"}]}"#,
        ));
        assert_msg(&msg, &["notes.jsonl:1:", "missing field \"spans[1].end\""]);
        let msg = err_of(load_primary(
            r#"{"id": "a", "text": "abcdef", "spans": [{"start": 1, "end": 2}]}"#,
        ));
        assert_msg(
            &msg,
            &["notes.jsonl:1:", "missing field \"spans[0].label\""],
        );
        // A span reference line without --corpus gets a hint.
        let msg = err_of(load_primary(
            r#"{"id": "a", "start": 1, "end": 2, "label": "X"}"#,
        ));
        assert_msg(
            &msg,
            &["notes.jsonl:1:", "missing field \"text\"", "--corpus"],
        );
    }

    #[test]
    fn error_wrong_types() {
        let msg = err_of(load_primary(r#"{"id": 1.5, "text": "abc"}"#));
        assert_msg(&msg, &["notes.jsonl:1:", "wrong type", "\"id\""]);
        let msg = err_of(load_primary(r#"{"id": "a", "text": 7}"#));
        assert_msg(&msg, &["notes.jsonl:1:", "wrong type", "\"text\""]);
        let msg = err_of(load_primary(
            r#"{"id": "a", "text": "abc", "spans": {"start": 0}}"#,
        ));
        assert_msg(&msg, &["notes.jsonl:1:", "wrong type", "\"spans\""]);
        let msg = err_of(load_primary(
            r#"{"id": "a", "text": "abc", "spans": [{"start": "0", "end": 2, "label": "X"}]}"#,
        ));
        assert_msg(
            &msg,
            &["notes.jsonl:1:", "wrong type", "\"spans[0].start\""],
        );
        let msg = err_of(load_primary(
            r#"{"id": "a", "text": "abc", "spans": [{"start": -1, "end": 2, "label": "X"}]}"#,
        ));
        assert_msg(
            &msg,
            &["notes.jsonl:1:", "wrong type", "\"spans[0].start\""],
        );
        let msg = err_of(load_primary(
            r#"{"id": "a", "text": "abc", "spans": [{"start": 0, "end": 2, "label": 3}]}"#,
        ));
        assert_msg(
            &msg,
            &["notes.jsonl:1:", "wrong type", "\"spans[0].label\""],
        );
        let msg = err_of(load_primary(r#"{"id": "a", "text": "abc", "spans": [7]}"#));
        assert_msg(&msg, &["notes.jsonl:1:", "wrong type", "\"spans[0]\""]);
    }

    #[test]
    fn error_offsets() {
        let text = "x".repeat(98);
        let msg = err_of(load_primary(&format!(
            "{{\"id\": \"a\", \"text\": \"{text}\", \"spans\": [{{\"start\": 100, \"end\": 120, \"label\": \"X\"}}]}}\n"
        )));
        assert_msg(
            &msg,
            &[
                "notes.jsonl:1:",
                "spans[0].end",
                "end 120 > text length 98 chars",
            ],
        );
        // char offsets, not bytes: "Zoë" is 3 chars (4 bytes)
        let msg = err_of(load_primary(
            r#"{"id": "a", "text": "Zoë", "spans": [{"start": 0, "end": 4, "label": "X"}]}"#,
        ));
        assert_msg(&msg, &["end 4 > text length 3 chars"]);
        let msg = err_of(load_primary(
            "{\"id\": \"a\", \"text\": \"abc\"}\n{\"id\": \"b\", \"text\": \"abcdef\", \"spans\": [{\"start\": 3, \"end\": 3, \"label\": \"X\"}]}\n",
        ));
        assert_msg(
            &msg,
            &["notes.jsonl:2:", "spans[0].start", "start 3 >= end 3"],
        );
    }

    #[test]
    fn error_span_text_mismatch() {
        let msg = err_of(load_primary(
            r#"{"id": "a", "text": "Patient John Smith visited.", "spans": [{"start": 8, "end": 18, "label": "NAME", "text": "Jon Smith"}]}"#,
        ));
        assert_msg(
            &msg,
            &[
                "notes.jsonl:1:",
                "spans[0].text",
                "(9 chars, not shown) vs (10 chars, not shown), first difference at char 2",
                "--show-text",
            ],
        );
        assert!(!msg.contains("Smith") && !msg.contains("Jon"), "{msg}");
        let f = Files::new();
        let p = f.write(
            "notes.jsonl",
            r#"{"id": "a", "text": "Patient John Smith visited.", "spans": [{"start": 8, "end": 18, "label": "NAME", "text": "Jon Smith"}]}"#,
        );
        let msg = err_of(load_documents_quoting(Some(&p), None, None, true));
        assert_msg(&msg, &["\"Jon Smith\"", "\"John Smith\""]);
        let long = "y".repeat(200);
        let p = f.write("long.jsonl", &format!(
            "{{\"id\": \"a\", \"text\": \"{long}\", \"spans\": [{{\"start\": 0, \"end\": 200, \"label\": \"N\", \"text\": \"{}\"}}]}}",
            "z".repeat(200)
        ));
        let msg = err_of(load_documents_quoting(Some(&p), None, None, true));
        assert!(msg.len() < 300, "message not truncated: {msg}");
        assert!(msg.contains('…'));
    }

    #[test]
    fn error_duplicate_id_and_empty() {
        let msg = err_of(load_primary(
            "{\"id\": \"a\", \"text\": \"x\"}\n{\"id\": \"b\", \"text\": \"y\"}\n{\"id\": \"a\", \"text\": \"z\"}\n",
        ));
        assert_msg(
            &msg,
            &["notes.jsonl:3:", "duplicate document id \"a\"", "line 1"],
        );
        // integer and string ids collide when equal as strings
        let msg = err_of(load_primary(
            "{\"id\": 7, \"text\": \"x\"}\n{\"id\": \"7\", \"text\": \"y\"}\n",
        ));
        assert_msg(&msg, &["notes.jsonl:2:", "duplicate document id \"7\""]);
        let msg = err_of(load_primary("\n  \n"));
        assert_msg(&msg, &["notes.jsonl", "empty"]);
        let msg = err_of(load_primary(""));
        assert_msg(&msg, &["notes.jsonl", "empty"]);
    }

    #[test]
    fn error_unreadable_file() {
        let f = Files::new();
        let p = f.dir.path().join("missing.jsonl");
        let msg = err_of(load_documents(Some(&p), None, None));
        assert_msg(&msg, &["missing.jsonl", "cannot read"]);
        let msg = err_of(load_documents(None, None, None));
        assert_msg(&msg, &["no documents"]);
    }

    #[test]
    fn merge_overlapping_and_touching() {
        let docs = load_primary(
            r#"{"id": "a", "text": "0123456789abcdefghij", "spans": [{"start": 5, "end": 9, "label": "B"}, {"start": 0, "end": 2, "label": "A"}, {"start": 1, "end": 4, "label": "C"}, {"start": 4, "end": 5, "label": "D"}, {"start": 12, "end": 14, "label": "E"}, {"start": 15, "end": 17, "label": "F"}, {"start": 15, "end": 17, "label": "G"}]}"#,
        )
        .unwrap();
        // [0,2)A + [1,4)C + [4,5)D (touching) + [5,9)B (touching) -> [0,9), longest piece B (len 4)
        assert_eq!(
            docs[0].spans,
            vec![sp(0, 9, "B"), sp(12, 14, "E"), sp(15, 17, "F")]
        );
        // tie on length: first in start order
        assert_eq!(
            merge_spans(vec![sp(3, 6, "Y"), sp(0, 3, "X")]),
            vec![sp(0, 6, "X")]
        );
        // containment
        assert_eq!(
            merge_spans(vec![sp(2, 4, "IN"), sp(0, 10, "OUT")]),
            vec![sp(0, 10, "OUT")]
        );
        assert!(merge_spans(vec![]).is_empty());
    }

    const CORPUS: &str = concat!(
        r#"{"id": "note-1", "text": "Patient John Smith visited."}"#,
        "\n",
        r#"{"id": 2, "text": "Call Zoë Müller at 555-0199."}"#,
        "\n",
        r#"{"id": "note-3", "text": "Repair data without secrets."}"#,
        "\n"
    );

    #[test]
    fn corpus_with_references_and_presidio() {
        let f = Files::new();
        let c = f.write("corpus.jsonl", CORPUS);
        let s = f.write(
            "spans.jsonl",
            concat!(
                r#"{"id": "note-1", "start": 8, "end": 12, "label": "NAME", "text": "John"}"#,
                "\n",
                r#"{"id": "note-1", "start": 12, "end": 18, "label": "NAME"}"#,
                "\n",
                r#"{"id": 2, "entity_type": "PHONE_NUMBER", "start": 19, "end": 27, "score": 0.85}"#,
                "\n",
                r#"{"id": "2", "results": [{"entity_type": "PERSON", "start": 5, "end": 15, "score": 0.9, "analysis_explanation": null}]}"#,
                "\n",
                r#"{"id": "note-1", "spans": []}"#,
                "\n"
            ),
        );
        let docs = load_documents(Some(&s), Some(&c), None).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0].spans, vec![sp(8, 18, "NAME")]); // touching -> merged
        assert_eq!(docs[1].id, "2");
        assert_eq!(
            docs[1].spans,
            vec![sp(5, 15, "PERSON"), sp(19, 27, "PHONE_NUMBER")]
        );
        assert!(docs[2].spans.is_empty()); // stays as repair data
        assert_eq!(label_names(&docs), vec!["NAME", "PERSON", "PHONE_NUMBER"]);
    }

    #[test]
    fn reference_errors() {
        let f = Files::new();
        let c = f.write("corpus.jsonl", CORPUS);
        let s = f.write(
            "refs.jsonl",
            "{\"id\": \"note-1\", \"start\": 8, \"end\": 12, \"label\": \"N\"}\n{\"id\": \"note-9\", \"start\": 0, \"end\": 1, \"label\": \"N\"}\n",
        );
        let msg = err_of(load_documents(Some(&s), Some(&c), None));
        assert_msg(
            &msg,
            &[
                "refs.jsonl:2:",
                "unknown document id \"note-9\"",
                "\"id\"",
                "corpus.jsonl",
            ],
        );
        let s = f.write(
            "refs.jsonl",
            "{\"id\": \"note-1\", \"entity_type\": \"P\", \"start\": 8, \"end\": 99, \"score\": 0.5}\n",
        );
        let msg = err_of(load_documents(Some(&s), Some(&c), None));
        assert_msg(
            &msg,
            &["refs.jsonl:1:", "\"end\"", "end 99 > text length 27 chars"],
        );
        let s = f.write(
            "refs.jsonl",
            "{\"id\": \"note-1\", \"entity_type\": \"P\", \"start\": 8, \"end\": 9, \"score\": \"high\"}\n",
        );
        let msg = err_of(load_documents(Some(&s), Some(&c), None));
        assert_msg(&msg, &["refs.jsonl:1:", "wrong type", "\"score\""]);
        let s = f.write(
            "refs.jsonl",
            "{\"id\": \"note-1\", \"results\": [{\"entity_type\": \"P\", \"start\": 8}]}\n",
        );
        let msg = err_of(load_documents(Some(&s), Some(&c), None));
        assert_msg(&msg, &["refs.jsonl:1:", "missing field \"results[0].end\""]);
        let s = f.write("refs.jsonl", "{\"id\": \"note-1\", \"label\": \"N\"}\n");
        let msg = err_of(load_documents(Some(&s), Some(&c), None));
        assert_msg(&msg, &["refs.jsonl:1:", "missing field \"start\""]);
        let s = f.write(
            "refs.jsonl",
            "{\"id\": \"note-1\", \"start\": 8, \"end\": 12, \"label\": \"N\", \"text\": \"Jonh\"}\n",
        );
        let msg = err_of(load_documents(Some(&s), Some(&c), None));
        assert_msg(
            &msg,
            &["refs.jsonl:1:", "\"text\"", "first difference at char 2"],
        );
        assert!(!msg.contains("Jo"), "{msg}");
        let msg = err_of(load_documents_quoting(Some(&s), Some(&c), None, true));
        assert_msg(&msg, &["\"Jonh\"", "\"John\""]);
        let s = f.write(
            "refs.jsonl",
            "{\"id\": \"note-1\", \"text\": \"other text\", \"spans\": []}\n",
        );
        let msg = err_of(load_documents(Some(&s), Some(&c), None));
        assert_msg(&msg, &["refs.jsonl:1:", "\"text\"", "differs"]);
        // duplicate ids in the corpus
        let c2 = f.write(
            "corpus2.jsonl",
            "{\"id\": \"a\", \"text\": \"x\"}\n{\"id\": \"a\", \"text\": \"y\"}\n",
        );
        let msg = err_of(load_documents(None, Some(&c2), None));
        assert_msg(&msg, &["corpus2.jsonl:2:", "duplicate document id \"a\""]);
        // empty corpus
        let c3 = f.write("corpus3.jsonl", "\n");
        let msg = err_of(load_documents(Some(&s), Some(&c3), None));
        assert_msg(&msg, &["corpus3.jsonl", "empty"]);
    }

    #[test]
    fn terms_case_boundaries_non_ascii() {
        let f = Files::new();
        let c = f.write(
            "corpus.jsonl",
            concat!(
                r#"{"id": "a", "text": "Project ÉCLAIR and project éclair; éclairs, xéclair, _éclair, éclair_x, ÉCLAIR."}"#,
                "\n",
                r#"{"id": "b", "text": "ßtraße: Öl-Firma ÖL Öllampe öl"}"#,
                "\n",
                r#"{"id": "c", "text": "😀acme corp😀 ACME CORP's acmecorp ACME  CORP"}"#,
                "\n"
            ),
        );
        let t = f.write(
            "terms.txt",
            "# confidential\n\n  éclair  \nöl\nAcme Corp\nproject éclair\n",
        );
        let docs = load_documents(None, Some(&c), Some(&t)).unwrap();
        let text_of = |d: &Document, s: &Span| char_slice(&d.text, s.start, s.end);
        let a: Vec<String> = docs[0].spans.iter().map(|s| text_of(&docs[0], s)).collect();
        assert_eq!(
            a,
            vec!["Project ÉCLAIR", "project éclair", "ÉCLAIR"],
            "{:?}",
            docs[0].spans
        );
        assert!(docs[0].spans.iter().all(|s| s.label == TERM_LABEL));
        let b: Vec<String> = docs[1].spans.iter().map(|s| text_of(&docs[1], s)).collect();
        assert_eq!(b, vec!["Öl", "ÖL", "öl"]);
        assert_eq!(docs[1].spans[0].start, 8); // char offset, not byte offset
        let c: Vec<String> = docs[2].spans.iter().map(|s| text_of(&docs[2], s)).collect();
        assert_eq!(c, vec!["acme corp", "ACME CORP"]);
        assert_eq!(docs[2].spans[0], sp(1, 10, TERM_LABEL));
    }

    #[test]
    fn terms_combined_with_primary_merge() {
        let f = Files::new();
        let s = f.write(
            "notes.jsonl",
            r#"{"id": "a", "text": "Dr. Ana Lima met Ana.", "spans": [{"start": 4, "end": 12, "label": "NAME"}]}"#,
        );
        let t = f.write("terms.txt", "ana\n");
        let docs = load_documents(Some(&s), None, Some(&t)).unwrap();
        // "Ana" inside the NAME span merges (NAME is the longest piece); the second "Ana" is a TERM.
        assert_eq!(
            docs[0].spans,
            vec![sp(4, 12, "NAME"), sp(17, 20, TERM_LABEL)]
        );
        assert_eq!(label_names(&docs), vec!["NAME", "TERM"]);
    }

    #[test]
    fn terms_file_errors() {
        let f = Files::new();
        let c = f.write("corpus.jsonl", CORPUS);
        let t = f.write("terms.txt", "# only a comment\n\n   \n");
        let msg = err_of(load_documents(None, Some(&c), Some(&t)));
        assert_msg(&msg, &["terms.txt", "empty term file"]);
        let missing = f.dir.path().join("nope.txt");
        let msg = err_of(load_documents(None, Some(&c), Some(&missing)));
        assert_msg(&msg, &["nope.txt", "cannot read"]);
    }
}
