//! The data side: documents with sensitive spans ([`spans`]), their tokenization into training
//! windows ([`tokens`]), fake identifiers that replace spans ([`surrogate`]) and the synthetic
//! clinical notes of the demo and the tests ([`synth`]).

pub mod spans;
pub mod surrogate;
pub mod synth;
pub mod tokens;

use rand::seq::IndexedRandom;
use rand::Rng;

/// Month names, as the notes write them and as date surrogates parse and write them.
pub(crate) const MONTHS: &[&str] = &[
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// One entry of a non-empty word list.
pub(crate) fn pick<R: Rng + ?Sized>(rng: &mut R, list: &[&'static str]) -> &'static str {
    list.choose(rng).expect("non-empty list")
}
