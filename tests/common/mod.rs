//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs the `sani` binary with `args`.
pub fn sani(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sani"))
        .args(args)
        .output()
        .unwrap()
}

/// A run's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Tensors of `tests/fixtures/<name>.reference.safetensors`.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixture(&format!("{name}.reference.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).expect("reference file")
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn rows_i64(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_vec2::<i64>().unwrap()
}
