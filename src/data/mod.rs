//! The data side: documents with sensitive spans ([`spans`]), their tokenization into training
//! windows ([`tokens`]), fake identifiers that replace spans ([`surrogate`]) and the synthetic
//! clinical notes of the demo and the tests ([`synth`]).

pub mod spans;
pub mod surrogate;
pub mod synth;
pub mod tokens;
