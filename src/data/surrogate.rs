//! Fake replacement identifiers ("surrogates") for surrogate repair.
//!
//! Every epoch, each sensitive span of the repair corpus is replaced by a fresh fake identifier of
//! the same type, and the model trains on those tokens instead of the real ones. Surrogates come
//! from built-in generators chosen by label (case-insensitive, common aliases), drawing on name,
//! city and hospital lists disjoint from the ones used by [`crate::data::synth`], so a surrogate never
//! coincides with a synthetic corpus identifier. Unknown labels get a format-preserving
//! substitution (letters by letters of the same case, digits by digits, the rest kept). A
//! surrogate always differs from the original when the original holds a letter or digit.

use super::{pick, MONTHS};
use crate::data::spans::{Document, Span};
use rand::Rng;
use std::collections::BTreeMap;

// Lists disjoint from synth.rs (checked by a test).
const SUR_FIRST_NAMES: &[&str] = &[
    "Alice",
    "Bernadette",
    "Cecilia",
    "Delphine",
    "Edith",
    "Florence",
    "Gwendolyn",
    "Henrietta",
    "Isolde",
    "Josephine",
    "Kathleen",
    "Lorna",
    "Marguerite",
    "Nell",
    "Ophelia",
    "Penelope",
    "Rosamund",
    "Sylvia",
    "Tabitha",
    "Ursula",
    "Violet",
    "Winona",
    "Yvonne",
    "Zelda",
    "Ottilie",
    "Albert",
    "Bartholomew",
    "Cedric",
    "Desmond",
    "Edmund",
    "Fergus",
    "Gilbert",
    "Horace",
    "Ignatius",
    "Jasper",
    "Leopold",
    "Mortimer",
    "Neville",
    "Osbert",
    "Percival",
    "Quentin",
    "Reginald",
    "Sebastian",
    "Tobias",
    "Ulrich",
    "Virgil",
    "Wilfred",
    "Xavier",
    "Ambrose",
    "Barnaby",
    "Crispin",
    "Dorian",
    "Everett",
    "Humphrey",
    "Lucian",
    "Montague",
    "Roderick",
    "Silas",
    "Thaddeus",
    "Vaughan",
];

const SUR_LAST_NAMES: &[&str] = &[
    "Abernathy",
    "Bellweather",
    "Cartwright",
    "Davenport",
    "Ellsworth",
    "Fairbanks",
    "Goodfellow",
    "Hollingsworth",
    "Ingleby",
    "Jessop",
    "Kettering",
    "Lockhart",
    "Merriweather",
    "Netherton",
    "Oakes",
    "Pettigrew",
    "Quimby",
    "Radcliffe",
    "Standish",
    "Thackeray",
    "Underhill",
    "Vickers",
    "Wainwright",
    "Yardley",
    "Aldridge",
    "Braithwaite",
    "Crowther",
    "Dunbar",
    "Entwistle",
    "Fotheringham",
    "Greaves",
    "Huxley",
    "Ingram",
    "Jellicoe",
    "Kingsley",
    "Lovelace",
    "Marwood",
    "Northcott",
    "Osgood",
    "Pickering",
    "Rowntree",
    "Sedgwick",
    "Tolliver",
    "Upton",
    "Vale",
    "Whitmore",
    "Wycliffe",
    "Ashcombe",
    "Birtwhistle",
    "Calloway",
    "Dewhurst",
    "Eversley",
    "Farnsworth",
    "Gladstone",
    "Hathaway",
    "Ibbotson",
    "Kilbride",
    "Langley",
    "Mortlake",
    "Penhaligon",
];

const SUR_CITIES: &[&str] = &[
    "Applecross",
    "Barrowmere",
    "Cobblestone",
    "Dovercourt",
    "Edgewater",
    "Fernhill",
    "Gorsemoor",
    "Hollowmere",
    "Inverleith",
    "Jesmond Vale",
    "Kirkwall Bay",
    "Lowestead",
    "Mossbank",
    "Netherfield",
    "Ormsby",
    "Penrith Cross",
    "Quarrybank",
    "Rushmere",
    "Sandhurst",
    "Tarnside",
    "Umberleigh",
    "Vinegate",
    "Wetherby Green",
    "Yewbarrow",
];

const SUR_STREETS: &[&str] = &[
    "Acorn", "Bracken", "Copper", "Daisy", "Elder", "Fern", "Gorse", "Harebell", "Iris", "Jasmine",
    "Kiln", "Lilac", "Magnolia", "Nettle", "Osprey", "Pebble", "Reed", "Sorrel", "Tansy", "Vetch",
    "Wren", "Yarrow",
];

const SUR_STREET_SUFFIXES: &[&str] = &["Street", "Road", "Avenue", "Lane", "Drive", "Gardens"];

const SUR_HOSPITAL_PATTERNS: &[&str] = &[
    "{C} District Hospital",
    "{C} Infirmary",
    "{L} Medical Centre",
    "{L} Foundation Hospital",
    "{C} Regional Hospital",
];

const SUR_EMAIL_DOMAINS: &[&str] = &[
    "surrogate.example",
    "maildrop.example",
    "postbox.example",
    "mail.invalid",
];

const SUR_WARD_NAMES: &[&str] = &[
    "Bluebird",
    "Kingfisher",
    "Puffin",
    "Robin",
    "Swallow",
    "Lapwing",
    "Curlew",
    "Plover",
];

const SUR_DIAGNOSES: &[&str] = &[
    "sarcoidosis",
    "Addison disease",
    "Kawasaki disease",
    "Ménière disease",
    "polymyalgia rheumatica",
    "hereditary haemochromatosis",
    "Sjögren syndrome",
    "primary biliary cholangitis",
    "autoimmune hepatitis",
    "giant cell arteritis",
    "Hashimoto thyroiditis",
    "idiopathic pulmonary fibrosis",
];

const TITLES: &[&str] = &[
    "Dr. ", "Dr ", "Mr. ", "Mr ", "Mrs. ", "Mrs ", "Ms. ", "Ms ", "Miss ", "Prof. ", "Prof ",
];

/// Kind of generator selected by a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Name,
    Doctor,
    Date,
    Phone,
    Email,
    Record,
    Address,
    Location,
    Age,
    City,
    Hospital,
    Ward,
    Diagnosis,
    Generic,
}

fn kind_of(label: &str) -> Kind {
    let key = label.trim().to_ascii_uppercase().replace(['-', ' '], "_");
    match key.as_str() {
        "NAME" | "PERSON" | "PATIENT" | "PER" | "PATIENT_NAME" => Kind::Name,
        "DOCTOR" | "PHYSICIAN" => Kind::Doctor,
        "DATE" | "DATE_TIME" | "DOB" | "DATE_OF_BIRTH" => Kind::Date,
        "PHONE" | "PHONE_NUMBER" | "TELEPHONE" | "FAX" => Kind::Phone,
        "EMAIL" | "EMAIL_ADDRESS" => Kind::Email,
        "MRN" | "ID" | "SSN" | "US_SSN" | "RECORD" | "ACCOUNT" | "MEDICAL_RECORD" | "ID_NUMBER"
        | "ACCOUNT_NUMBER" => Kind::Record,
        "ADDRESS" | "STREET" | "STREET_ADDRESS" => Kind::Address,
        "LOCATION" | "LOC" => Kind::Location,
        "AGE" => Kind::Age,
        "CITY" => Kind::City,
        "HOSPITAL" | "ORGANIZATION" | "ORG" => Kind::Hospital,
        "WARD" => Kind::Ward,
        "DIAGNOSIS" | "CONDITION" => Kind::Diagnosis,
        _ => Kind::Generic,
    }
}

fn has_alnum(s: &str) -> bool {
    s.chars().any(|c| c.is_alphanumeric())
}

/// A fresh fake identifier of the type named by `label`, replacing `original` (used to keep its
/// format: date layout, digit layout of numbers, a "Dr. " or other title prefix, ...). Differs
/// from `original` whenever `original` holds a letter or digit.
pub fn surrogate_for(label: &str, original: &str, rng: &mut impl Rng) -> String {
    let kind = kind_of(label);
    for _ in 0..32 {
        let candidate = generate(kind, original, rng);
        if candidate != original || !has_alnum(original) {
            return candidate;
        }
    }
    // Practically unreachable (tiny originals such as a one-digit age): force a difference.
    format_preserving(original, rng)
}

fn generate<R: Rng + ?Sized>(kind: Kind, original: &str, rng: &mut R) -> String {
    match kind {
        Kind::Name | Kind::Doctor => name(original, rng),
        Kind::Date => date(original, rng),
        Kind::Phone => digits_only(original, rng),
        Kind::Email => email(rng),
        Kind::Record => record(original, rng),
        Kind::Address => address(original, rng),
        Kind::Location => {
            if original.chars().any(|c| c.is_ascii_digit()) {
                address(original, rng)
            } else {
                pick(rng, SUR_CITIES).to_string()
            }
        }
        Kind::Age => age(original, rng),
        Kind::City => pick(rng, SUR_CITIES).to_string(),
        Kind::Hospital => pick(rng, SUR_HOSPITAL_PATTERNS)
            .replace("{C}", pick(rng, SUR_CITIES))
            .replace("{L}", pick(rng, SUR_LAST_NAMES)),
        Kind::Ward => ward(original, rng),
        Kind::Diagnosis => pick(rng, SUR_DIAGNOSES).to_string(),
        Kind::Generic => format_preserving(original, rng),
    }
}

/// Names: keep a leading title ("Dr. ", "Ms. ", ...), one word → surname, more → first + last;
/// all-caps originals give all-caps surrogates.
/// Splits a name into its leading whitespace + title ("Dr. ", "Ms. ", ...) and the rest.
fn split_title(original: &str) -> (&str, &str) {
    let trimmed = original.trim_start();
    let lead = original.len() - trimmed.len();
    let title = TITLES
        .iter()
        .find(|t| {
            trimmed.len() >= t.len()
                && trimmed.is_char_boundary(t.len())
                && trimmed[..t.len()].eq_ignore_ascii_case(t)
        })
        .map_or(0, |t| t.len());
    original.split_at(lead + title)
}

fn is_all_caps(s: &str) -> bool {
    let letters: Vec<char> = s.chars().filter(|c| c.is_alphabetic()).collect();
    letters.len() > 1 && letters.iter().all(|c| c.is_uppercase())
}

/// Names: keep a leading title ("Dr. ", "Ms. ", ...), one word → surname, more → first + last;
/// all-caps originals give all-caps surrogates.
fn name<R: Rng + ?Sized>(original: &str, rng: &mut R) -> String {
    let (prefix, rest) = split_title(original);
    let orig_words: Vec<String> = rest.split_whitespace().map(str::to_lowercase).collect();
    // Never reuse a word of the original (possible when the corpus uses surrogate-list names).
    let mut draw = |list: &[&'static str]| {
        let mut w = pick(rng, list);
        for _ in 0..16 {
            if !orig_words.contains(&w.to_lowercase()) {
                break;
            }
            w = pick(rng, list);
        }
        w
    };
    let body = if orig_words.len() == 1 {
        draw(SUR_LAST_NAMES).to_string()
    } else {
        let first = draw(SUR_FIRST_NAMES);
        format!("{first} {}", draw(SUR_LAST_NAMES))
    };
    let body = if is_all_caps(rest) {
        body.to_uppercase()
    } else {
        body
    };
    format!("{prefix}{body}")
}

#[derive(Clone, Copy)]
struct Ymd {
    year: u32,
    month: u32,
    day: u32,
}

fn random_ymd<R: Rng + ?Sized>(rng: &mut R) -> Ymd {
    Ymd {
        year: rng.random_range(1930..=2025),
        month: rng.random_range(1..=12),
        day: rng.random_range(1..=28),
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Month index (0-based) and whether the original was abbreviated, for "March", "Mar", "Mar.".
fn parse_month(word: &str) -> Option<(usize, bool)> {
    let w = word.trim_end_matches('.');
    MONTHS.iter().enumerate().find_map(|(i, m)| {
        if m.eq_ignore_ascii_case(w) {
            Some((i, false))
        } else if w.len() == 3 && m[..3].eq_ignore_ascii_case(w) {
            Some((i, true))
        } else {
            None
        }
    })
}

fn month_name(month: u32, abbreviated: bool, dot: bool) -> String {
    let full = MONTHS[(month - 1) as usize];
    if abbreviated {
        format!("{}{}", &full[..3], if dot { "." } else { "" })
    } else {
        full.to_string()
    }
}

fn pad(value: u32, width: usize) -> String {
    format!("{value:0width$}")
}

/// Dates in the original's format: ISO `yyyy-mm-dd`, `dd/mm/yyyy` (or `mm/dd/yyyy` when the
/// second field exceeds 12; also `.` or `-` separators), `Month d, yyyy`, `d Month yyyy`;
/// anything else gets its digits replaced.
fn date<R: Rng + ?Sized>(original: &str, rng: &mut R) -> String {
    let d = random_ymd(rng);
    let s = original.trim();
    let (lead, trail) = {
        let start = original.len() - original.trim_start().len();
        let end = original.trim_end().len();
        (&original[..start], &original[end..])
    };
    let wrap = |core: String| format!("{lead}{core}{trail}");
    // ISO yyyy-mm-dd
    let b = s.as_bytes();
    if b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && all_digits(&s[..4])
        && all_digits(&s[5..7])
        && all_digits(&s[8..])
    {
        return wrap(format!("{:04}-{:02}-{:02}", d.year, d.month, d.day));
    }
    // d/m/y with / . or - separators and a 4- or 2-digit year
    for sep in ['/', '.', '-'] {
        let parts: Vec<&str> = s.split(sep).collect();
        if parts.len() == 3
            && parts.iter().all(|p| all_digits(p))
            && parts[0].len() <= 2
            && parts[1].len() <= 2
            && (parts[2].len() == 4 || parts[2].len() == 2)
        {
            let us_order = parts[1].parse::<u32>().unwrap_or(0) > 12;
            let (a, b2) = if us_order {
                (d.month, d.day)
            } else {
                (d.day, d.month)
            };
            let year = if parts[2].len() == 4 {
                pad(d.year, 4)
            } else {
                pad(d.year % 100, 2)
            };
            return wrap(format!(
                "{}{sep}{}{sep}{year}",
                pad(a, parts[0].len()),
                pad(b2, parts[1].len())
            ));
        }
    }
    let words: Vec<&str> = s.split_whitespace().collect();
    if words.len() == 3 {
        // Month d, yyyy
        if let Some((_, abbr)) = parse_month(words[0]) {
            let day = words[1].trim_end_matches(',');
            if all_digits(day) && all_digits(words[2]) && words[2].len() == 4 {
                let comma = if words[1].ends_with(',') { "," } else { "" };
                return wrap(format!(
                    "{} {}{comma} {}",
                    month_name(d.month, abbr, words[0].ends_with('.')),
                    d.day,
                    d.year
                ));
            }
        }
        // d Month yyyy
        if let Some((_, abbr)) = parse_month(words[1]) {
            if all_digits(words[0]) && all_digits(words[2]) && words[2].len() == 4 {
                return wrap(format!(
                    "{} {} {}",
                    d.day,
                    month_name(d.month, abbr, words[1].ends_with('.')),
                    d.year
                ));
            }
        }
    }
    digits_only(original, rng)
}

/// Every ASCII digit replaced by a random digit (a leading digit stays non-zero when it was);
/// everything else kept.
fn digits_only<R: Rng + ?Sized>(original: &str, rng: &mut R) -> String {
    let mut first = true;
    original
        .chars()
        .map(|c| {
            if c.is_ascii_digit() {
                let nonzero = first && c != '0';
                first = false;
                let lo = if nonzero { 1 } else { 0 };
                char::from(b'0' + rng.random_range(lo..10u8))
            } else {
                c
            }
        })
        .collect()
}

/// Record / ID numbers: with three or more digits, only digits change (letter prefixes such as
/// "MRN-" are format markers); otherwise letters and digits change.
fn record<R: Rng + ?Sized>(original: &str, rng: &mut R) -> String {
    if original.chars().filter(|c| c.is_ascii_digit()).count() >= 3 {
        digits_only(original, rng)
    } else {
        format_preserving_once(original, rng)
    }
}

fn email<R: Rng + ?Sized>(rng: &mut R) -> String {
    let first = pick(rng, SUR_FIRST_NAMES).to_ascii_lowercase();
    let last = pick(rng, SUR_LAST_NAMES).to_ascii_lowercase();
    let domain = pick(rng, SUR_EMAIL_DOMAINS);
    match rng.random_range(0..3) {
        0 => format!("{first}.{last}@{domain}"),
        1 => format!("{}{last}{}@{domain}", &first[..1], rng.random_range(1..100)),
        _ => format!("{last}_{first}{}@{domain}", rng.random_range(10..1000)),
    }
}

/// Number (if the original starts with one) + street + suffix, plus ", City" if the original has
/// a comma.
fn address<R: Rng + ?Sized>(original: &str, rng: &mut R) -> String {
    let mut out = String::new();
    if original
        .trim_start()
        .starts_with(|c: char| c.is_ascii_digit())
    {
        out.push_str(&rng.random_range(1..1000).to_string());
        out.push(' ');
    }
    out.push_str(pick(rng, SUR_STREETS));
    out.push(' ');
    out.push_str(pick(rng, SUR_STREET_SUFFIXES));
    if original.contains(',') {
        out.push_str(", ");
        out.push_str(pick(rng, SUR_CITIES));
    }
    out
}

/// Ages: the first number replaced by one in the same band (child, adult, 90+); the rest kept.
fn age<R: Rng + ?Sized>(original: &str, rng: &mut R) -> String {
    let start = match original.find(|c: char| c.is_ascii_digit()) {
        Some(i) => i,
        None => return format_preserving_once(original, rng),
    };
    let len = original[start..]
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(original.len() - start);
    let n: u64 = original[start..start + len].parse().unwrap_or(40);
    let new = match n {
        0..=17 => rng.random_range(1..=17),
        18..=89 => rng.random_range(18..=89),
        _ => rng.random_range(90..=104),
    };
    format!("{}{new}{}", &original[..start], &original[start + len..])
}

fn ward<R: Rng + ?Sized>(original: &str, rng: &mut R) -> String {
    if original.chars().any(|c| c.is_ascii_digit()) {
        format!(
            "Ward {}{}",
            rng.random_range(21..=40),
            char::from(rng.random_range(b'A'..=b'H'))
        )
    } else {
        format!("{} Ward", pick(rng, SUR_WARD_NAMES))
    }
}

/// One draw of the format-preserving substitution (may equal the original).
fn format_preserving_once<R: Rng + ?Sized>(original: &str, rng: &mut R) -> String {
    original
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() {
                char::from(rng.random_range(b'a'..=b'z'))
            } else if c.is_ascii_uppercase() {
                char::from(rng.random_range(b'A'..=b'Z'))
            } else if c.is_ascii_digit() {
                char::from(rng.random_range(b'0'..=b'9'))
            } else {
                c
            }
        })
        .collect()
}

/// Format-preserving substitution guaranteed to differ from `original` when it holds an ASCII
/// letter or digit.
fn format_preserving<R: Rng + ?Sized>(original: &str, rng: &mut R) -> String {
    for _ in 0..16 {
        let out = format_preserving_once(original, rng);
        if out != original {
            return out;
        }
    }
    // Force: change the first ASCII alphanumeric char to another of its class.
    let mut changed = false;
    original
        .chars()
        .map(|c| {
            if changed || !c.is_ascii_alphanumeric() {
                return c;
            }
            changed = true;
            let (base, n) = if c.is_ascii_digit() {
                (b'0', 10)
            } else if c.is_ascii_lowercase() {
                (b'a', 26)
            } else {
                (b'A', 26)
            };
            let offset = rng.random_range(1..n);
            char::from(base + (c as u8 - base + offset) % n)
        })
        .collect()
}

/// Keeps the surrogates of one document consistent: the same (type, original) gets the same
/// surrogate, and name words are mapped consistently ("Zoë Müller" → "Alice Abernathy" makes a
/// later "Ms. Müller" → "Ms. Abernathy" and "Zoë" → "Alice").
#[derive(Default)]
struct DocMemo {
    exact: BTreeMap<(Kind, String), String>,
    words: BTreeMap<String, String>,
}

impl DocMemo {
    fn replace<R: Rng>(&mut self, label: &str, original: &str, rng: &mut R) -> String {
        let kind = kind_of(label);
        let key = (kind, original.to_string());
        if let Some(done) = self.exact.get(&key) {
            return done.clone();
        }
        let fresh = surrogate_for(label, original, rng);
        let out = if matches!(kind, Kind::Name | Kind::Doctor) {
            self.harmonize_name(original, fresh)
        } else {
            fresh
        };
        self.exact.insert(key, out.clone());
        out
    }

    fn harmonize_name(&mut self, original: &str, fresh: String) -> String {
        let orig_words: Vec<&str> = split_title(original).1.split_whitespace().collect();
        let (prefix, fresh_rest) = split_title(&fresh);
        let fresh_words: Vec<&str> = fresh_rest.split_whitespace().collect();
        if orig_words.is_empty() || orig_words.len() != fresh_words.len() {
            return fresh;
        }
        let mut words = Vec::with_capacity(orig_words.len());
        for (o, f) in orig_words.iter().zip(&fresh_words) {
            let key = o.to_lowercase();
            let mapped = match self.words.get(&key) {
                Some(m) => m.clone(),
                None => {
                    self.words.insert(key, f.to_string());
                    f.to_string()
                }
            };
            words.push(if is_all_caps(o) {
                mapped.to_uppercase()
            } else if is_all_caps(&mapped) {
                let mut cs = mapped.chars();
                cs.next()
                    .map(|c| c.to_string() + &cs.as_str().to_lowercase())
                    .unwrap_or_default()
            } else {
                mapped
            });
        }
        let out = format!("{prefix}{}", words.join(" "));
        if out == original {
            fresh
        } else {
            out
        }
    }
}

/// A copy of `doc` with every span's text replaced by a surrogate of its label; span offsets are
/// recomputed (chars, end exclusive), labels kept, spans returned sorted by start. Within the
/// document, repeated identifiers stay consistent (same original → same surrogate; name words
/// mapped consistently across full names, surnames and first names), while every call draws
/// fresh surrogates. Span ends past the text are clamped; a span overlapping an earlier one is
/// dropped (its text is part of the earlier replacement).
pub fn apply_surrogates(doc: &Document, rng: &mut impl Rng) -> Document {
    let chars: Vec<char> = doc.text.chars().collect();
    let mut spans: Vec<&Span> = doc.spans.iter().collect();
    spans.sort_by_key(|s| (s.start, s.end));
    let mut text = String::with_capacity(doc.text.len());
    let mut new_spans = Vec::with_capacity(spans.len());
    let mut cursor = 0usize; // chars of the original consumed
    let mut out_len = 0usize; // chars written
    let mut memo = DocMemo::default();
    for s in spans {
        let start = s.start.min(chars.len());
        let end = s.end.clamp(start, chars.len());
        if start < cursor {
            continue;
        }
        let before: String = chars[cursor..start].iter().collect();
        text.push_str(&before);
        out_len += start - cursor;
        let original: String = chars[start..end].iter().collect();
        let replacement = memo.replace(&s.label, &original, rng);
        let n = replacement.chars().count();
        text.push_str(&replacement);
        new_spans.push(Span {
            start: out_len,
            end: out_len + n,
            label: s.label.clone(),
        });
        out_len += n;
        cursor = end;
    }
    text.extend(&chars[cursor..]);
    Document {
        id: doc.id.clone(),
        text,
        spans: new_spans,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::BTreeSet;

    fn rng(seed: u64) -> StdRng {
        StdRng::seed_from_u64(seed)
    }

    fn shape(s: &str) -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_digit() {
                    '9'
                } else if c.is_ascii_lowercase() {
                    'a'
                } else if c.is_ascii_uppercase() {
                    'A'
                } else {
                    c
                }
            })
            .collect()
    }

    fn slice(text: &str, s: &Span) -> String {
        text.chars().skip(s.start).take(s.end - s.start).collect()
    }

    #[test]
    fn date_formats_kept() {
        let mut r = rng(1);
        for _ in 0..200 {
            let iso = surrogate_for("DATE", "1984-03-12", &mut r);
            assert_eq!(shape(&iso), "9999-99-99", "{iso}");
            let m: u32 = iso[5..7].parse().unwrap();
            assert!((1..=12).contains(&m));
            let dmy = surrogate_for("dob", "12/03/1984", &mut r);
            assert_eq!(shape(&dmy), "99/99/9999", "{dmy}");
            assert!(dmy[3..5].parse::<u32>().unwrap() <= 12);
            let us = surrogate_for("DATE", "03/25/1984", &mut r);
            assert!(us[..2].parse::<u32>().unwrap() <= 12, "{us}");
            let long = surrogate_for("Date_Time", "March 12, 1984", &mut r);
            let w: Vec<&str> = long.split(' ').collect();
            assert!(
                MONTHS.contains(&w[0]) && w[1].ends_with(',') && w[2].len() == 4,
                "{long}"
            );
            let abbr = surrogate_for("DATE", "12 Mar 1984", &mut r);
            let w: Vec<&str> = abbr.split(' ').collect();
            assert!(w[1].len() == 3 && w[2].len() == 4, "{abbr}");
            let other = surrogate_for("DATE", "1984/3", &mut r);
            assert_eq!(other.len(), 6);
            assert_eq!(&other[4..5], "/");
        }
    }

    #[test]
    fn record_phone_email_formats_kept() {
        let mut r = rng(2);
        for _ in 0..200 {
            let mrn = surrogate_for("MRN", "MRN-4829301", &mut r);
            assert!(
                mrn.starts_with("MRN-") && shape(&mrn) == "AAA-9999999",
                "{mrn}"
            );
            let ssn = surrogate_for("us_ssn", "123-45-6789", &mut r);
            assert_eq!(shape(&ssn), "999-99-9999");
            let acc = surrogate_for("ACCOUNT", "AB-7", &mut r);
            assert_eq!(shape(&acc), "AA-9");
            let ph = surrogate_for("PHONE_NUMBER", "+1 (555) 123-4567", &mut r);
            assert_eq!(shape(&ph), "+9 (999) 999-9999", "{ph}");
            let em = surrogate_for("email_address", "jose.muller@example.com", &mut r);
            assert_eq!(em.matches('@').count(), 1);
            assert!(em.is_ascii() && !em.contains(' '));
            let age = surrogate_for("AGE", "47-year-old", &mut r);
            assert!(age.ends_with("-year-old"));
            let n: u32 = age.trim_end_matches("-year-old").parse().unwrap();
            assert!((18..=89).contains(&n));
            let addr = surrogate_for("ADDRESS", "42 Linden Street, Riverton", &mut r);
            assert!(addr.starts_with(|c: char| c.is_ascii_digit()) && addr.contains(", "));
            let city = surrogate_for("CITY", "Riverton", &mut r);
            assert!(SUR_CITIES.contains(&city.as_str()));
            let org = surrogate_for("organization", "Riverton General Hospital", &mut r);
            assert!(!org.is_empty());
        }
    }

    #[test]
    fn names_and_doctor_prefix() {
        let mut r = rng(3);
        for _ in 0..200 {
            let d = surrogate_for("DOCTOR", "Dr. José Núñez", &mut r);
            assert!(d.starts_with("Dr. "), "{d}");
            assert_eq!(d.split(' ').count(), 3);
            let d1 = surrogate_for("doctor", "Dr. Müller", &mut r);
            assert!(d1.starts_with("Dr. ") && d1.split(' ').count() == 2, "{d1}");
            let p = surrogate_for("PERSON", "Zoë Müller", &mut r);
            assert_eq!(p.split(' ').count(), 2);
            assert!(!p.starts_with("Dr"));
            let one = surrogate_for("patient", "Müller", &mut r);
            assert!(SUR_LAST_NAMES.contains(&one.as_str()));
            let own = surrogate_for("NAME", "Alice Abernathy", &mut r);
            assert!(
                !own.contains("Alice") && !own.contains("Abernathy"),
                "{own}"
            );
            let ms = surrogate_for("NAME", "Ms. Müller", &mut r);
            assert!(ms.starts_with("Ms. "));
            let caps = surrogate_for("NAME", "JOSÉ NÚÑEZ", &mut r);
            assert_eq!(caps, caps.to_uppercase());
        }
    }

    #[test]
    fn generic_format_preserving() {
        let mut r = rng(4);
        for _ in 0..500 {
            let orig = "Ab-9 ñ/x";
            let s = surrogate_for("FOO_BAR", orig, &mut r);
            assert_eq!(shape(&s), shape(orig));
            assert!(s.contains(" ñ/"));
            assert_ne!(s, orig);
            // Tiny originals still differ.
            assert_ne!(surrogate_for("X", "7", &mut r), "7");
            assert_ne!(surrogate_for("X", "q", &mut r), "q");
        }
        assert_eq!(surrogate_for("X", "--", &mut r), "--");
        assert!(!surrogate_for("NAME", "", &mut r).is_empty());
    }

    #[test]
    fn surrogate_differs_from_original() {
        let cases = [
            ("NAME", "Zoë Müller"),
            ("DOCTOR", "Dr. Chen"),
            ("DATE", "1984-03-12"),
            ("DATE", "12/03/1984"),
            ("DATE", "March 12, 1984"),
            ("MRN", "MRN-4829301"),
            ("PHONE", "(555) 123-4567"),
            ("EMAIL", "a@b.c"),
            ("ADDRESS", "1 Mill Lane"),
            ("AGE", "19"),
            ("AGE", "5"),
            ("CITY", "Applecross"),
            ("HOSPITAL", "St. Luke's Hospital"),
            ("WARD", "Ward 4B"),
            ("DIAGNOSIS", "sarcoidosis"),
            ("LOCATION", "Paris"),
            ("ZIP", "12345"),
            ("ID", "A1"),
        ];
        let mut r = rng(5);
        for (label, orig) in cases {
            for _ in 0..300 {
                let s = surrogate_for(label, orig, &mut r);
                assert_ne!(s, orig, "{label}");
                assert!(!s.is_empty());
            }
        }
    }

    #[test]
    fn deterministic_under_seeded_rng() {
        let draw = |seed| -> Vec<String> {
            let mut r = rng(seed);
            [
                "NAME", "DATE", "MRN", "PHONE", "EMAIL", "ADDRESS", "CITY", "XYZ",
            ]
            .iter()
            .map(|l| surrogate_for(l, "Some 12/03/1984 value 42", &mut r))
            .collect()
        };
        assert_eq!(draw(9), draw(9));
        assert_ne!(draw(9), draw(10));
        let doc = crate::data::synth::generate_notes(&crate::data::synth::SynthConfig {
            n_notes: 3,
            seed: 1,
            id_prefix: "d".into(),
        });
        let a: Vec<Document> = doc
            .iter()
            .map(|d| apply_surrogates(d, &mut rng(1)))
            .collect();
        let b: Vec<Document> = doc
            .iter()
            .map(|d| apply_surrogates(d, &mut rng(1)))
            .collect();
        assert_eq!(a, b);
    }

    /// Check that `new` is `old` with each span replaced, text outside spans unchanged.
    fn check_apply(old: &Document, new: &Document) {
        assert_eq!(old.id, new.id);
        assert_eq!(old.spans.len(), new.spans.len());
        let (oc, nc): (Vec<char>, Vec<char>) =
            (old.text.chars().collect(), new.text.chars().collect());
        let (mut op, mut np) = (0, 0);
        for (os, ns) in old.spans.iter().zip(&new.spans) {
            assert_eq!(os.label, ns.label);
            assert_eq!(
                oc[op..os.start],
                nc[np..ns.start],
                "text between spans unchanged"
            );
            assert!(ns.end <= nc.len());
            let (ov, nv) = (slice(&old.text, os), slice(&new.text, ns));
            if ov.chars().any(|c| c.is_alphanumeric()) {
                assert_ne!(ov, nv);
            }
            op = os.end;
            np = ns.end;
        }
        assert_eq!(oc[op..], nc[np..], "tail unchanged");
    }

    #[test]
    fn apply_surrogates_offsets_with_multibyte() {
        let text = "Ünïcødé 🙂 note: Zoë Müller (MRN-4829301) saw Dr. Núñez on 12/03/1984 — ok 🙂";
        let find = |needle: &str| {
            let b = text.find(needle).unwrap();
            let start = text[..b].chars().count();
            (start, start + needle.chars().count())
        };
        let mk = |needle: &str, label: &str| {
            let (start, end) = find(needle);
            Span {
                start,
                end,
                label: label.into(),
            }
        };
        let doc = Document {
            id: "m".into(),
            text: text.into(),
            spans: vec![
                mk("Zoë Müller", "NAME"),
                mk("MRN-4829301", "MRN"),
                mk("Dr. Núñez", "DOCTOR"),
                mk("12/03/1984", "DATE"),
            ],
        };
        for seed in 0..50 {
            let new = apply_surrogates(&doc, &mut rng(seed));
            check_apply(&doc, &new);
            assert!(new.text.starts_with("Ünïcødé 🙂 note: "));
            assert!(new.text.ends_with(" — ok 🙂"));
            assert!(slice(&new.text, &new.spans[2]).starts_with("Dr. "));
            assert_eq!(shape(&slice(&new.text, &new.spans[3])), "99/99/9999");
            assert!(slice(&new.text, &new.spans[1]).starts_with("MRN-"));
        }
    }

    #[test]
    fn apply_surrogates_on_synthetic_notes() {
        let docs = crate::data::synth::generate_notes(&crate::data::synth::SynthConfig {
            n_notes: 60,
            seed: 21,
            id_prefix: "s".into(),
        });
        let mut r = rng(0);
        for d in &docs {
            let new = apply_surrogates(d, &mut r);
            check_apply(d, &new);
            for s in new.spans.iter().filter(|s| s.label == "DOCTOR") {
                assert!(slice(&new.text, s).starts_with("Dr. "));
            }
        }
    }

    #[test]
    fn apply_surrogates_consistent_within_document() {
        let text = "Zoë Müller, seen by Dr. Chen. Ms. Müller agreed. Zoë Müller and Dr. Chen. Zoë.";
        let spans: Vec<Span> = [
            ("Zoë Müller", 0, "NAME"),
            ("Dr. Chen", 0, "DOCTOR"),
            ("Müller", 1, "NAME"),
            ("Zoë Müller", 1, "NAME"),
            ("Dr. Chen", 1, "DOCTOR"),
            ("Zoë", 2, "NAME"),
        ]
        .iter()
        .map(|(needle, nth, label)| {
            let b = text.match_indices(needle).nth(*nth).unwrap().0;
            let start = text[..b].chars().count();
            Span {
                start,
                end: start + needle.chars().count(),
                label: label.to_string(),
            }
        })
        .collect();
        let doc = Document {
            id: "c".into(),
            text: text.into(),
            spans,
        };
        for seed in 0..20 {
            let new = apply_surrogates(&doc, &mut rng(seed));
            check_apply(&doc, &new);
            let v: Vec<String> = new.spans.iter().map(|s| slice(&new.text, s)).collect();
            let (first, last) = v[0].split_once(' ').unwrap();
            assert_eq!(v[2], last);
            assert_eq!(v[3], v[0]);
            assert_eq!(v[4], v[1]);
            assert_eq!(v[5], first);
            assert!(new.text.contains(&format!("Ms. {last} agreed")));
        }
        // Fresh surrogates on every call.
        let a = apply_surrogates(&doc, &mut rng(1));
        let b = apply_surrogates(&doc, &mut rng(2));
        assert_ne!(a.text, b.text);
    }

    #[test]
    fn apply_surrogates_unsorted_overlapping_and_out_of_range() {
        let doc = Document {
            id: "u".into(),
            text: "abc 123 def".into(),
            spans: vec![
                Span {
                    start: 8,
                    end: 99,
                    label: "X".into(),
                },
                Span {
                    start: 0,
                    end: 3,
                    label: "X".into(),
                },
                Span {
                    start: 1,
                    end: 5,
                    label: "X".into(),
                },
            ],
        };
        let new = apply_surrogates(&doc, &mut rng(1));
        assert_eq!(new.spans.len(), 2);
        assert_eq!(new.spans[0].start, 0);
        assert_eq!(&new.text[3..8], " 123 ");
        assert_eq!(new.text.chars().count(), 11);
        assert_ne!(&new.text[8..], "def");
    }

    #[test]
    fn surrogate_lists_disjoint_from_synth() {
        use crate::data::synth::{CITIES, DIAGNOSES, FIRST_NAMES_F, FIRST_NAMES_M, LAST_NAMES};
        let corpus: BTreeSet<&str> = FIRST_NAMES_F
            .iter()
            .chain(FIRST_NAMES_M)
            .chain(LAST_NAMES)
            .chain(CITIES)
            .chain(DIAGNOSES)
            .copied()
            .collect();
        for s in SUR_FIRST_NAMES
            .iter()
            .chain(SUR_LAST_NAMES)
            .chain(SUR_CITIES)
            .chain(SUR_DIAGNOSES)
        {
            assert!(!corpus.contains(s), "{s} also in synth lists");
        }
        let mut r = rng(6);
        let names: BTreeSet<String> = (0..2000)
            .map(|_| surrogate_for("NAME", "A B", &mut r))
            .collect();
        assert!(names.len() > 1000, "diverse surrogate names");
    }
}
