//! Tensor operations the models are written in: [`ops`] picks, per call, the fused CPU kernel of
//! [`fused`] (with its own backward pass) or the composed candle ops they are tested against;
//! [`lora`] adds low-rank adapters to frozen projections.

pub mod fused;
pub mod lora;
pub mod ops;
