//! Tensor operations the models are written in: [`ops`] picks, per call, the fused CPU kernel of
//! [`fused`] (with its own backward pass) or the composed candle ops they are tested against.

pub mod fused;
pub mod ops;
