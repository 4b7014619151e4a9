//! The fused CPU kernels (`sani::nn::fused`) against the composed candle versions (`ops::*_composed`),
//! forward and gradients, plus central finite differences of each fused op's gradient.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use sani::nn::{fused, ops};

const TOL: f32 = 1e-5;

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn randn(r: &mut rand::rngs::StdRng, n: usize, std: f32) -> Vec<f32> {
    // Sum of uniforms: close enough to normal for test data.
    (0..n)
        .map(|_| (0..4).map(|_| r.random_range(-1.0f32..1.0)).sum::<f32>() * std * 0.87)
        .collect()
}

fn tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn assert_finite(what: &str, t: &Tensor) {
    assert!(
        flat(t).iter().all(|v| v.is_finite()),
        "{what}: non-finite values"
    );
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
    assert_finite(what, a);
    assert_finite(what, b);
    let d = max_abs_diff(a, b);
    assert!(d < TOL, "{what}: max abs diff {d:e}");
}

/// sum(y * r) as a differentiable scalar.
fn weighted_sum(y: &Tensor, r: &Tensor) -> Tensor {
    (y * r).unwrap().sum_all().unwrap()
}

/// The same in f64 on the host, for finite differences.
fn weighted_sum_f64(y: &Tensor, r: &[f32]) -> f64 {
    flat(y)
        .iter()
        .zip(r)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum()
}

/// Central differences of `f` at a few flat indices of `x` against the analytic gradient `g`.
fn finite_diff(
    what: &str,
    x: &[f32],
    shape: &[usize],
    g: &Tensor,
    eps: f32,
    f: &dyn Fn(&Tensor) -> f64,
) {
    let g = flat(g);
    let mut r = rng(99);
    let picks: Vec<usize> = (0..12).map(|_| r.random_range(0..x.len())).collect();
    for i in picks {
        let mut xp = x.to_vec();
        xp[i] += eps;
        let mut xm = x.to_vec();
        xm[i] -= eps;
        let fd = (f(&tensor(xp, shape)) - f(&tensor(xm, shape))) / (2.0 * eps as f64);
        let an = g[i] as f64;
        let rel = (fd - an).abs() / fd.abs().max(an.abs()).max(1e-1);
        assert!(
            rel < 1e-2,
            "{what}[{i}]: finite difference {fd:e} vs analytic {an:e} (rel {rel:e})"
        );
    }
}

/// Random additive mask [mb, 1, t, s] with f32::MIN entries, a causal pattern on the first
/// batch row and (with `full_row`) a fully masked query row. Finite differences are meaningless
/// on a fully masked row (f32::MIN swallows the perturbation), so that test leaves it out.
fn mask(r: &mut rand::rngs::StdRng, mb: usize, t: usize, s: usize, full_row: bool) -> Vec<f32> {
    let mut m = vec![0f32; mb * t * s];
    for bi in 0..mb {
        for i in 0..t {
            for j in 0..s {
                let hidden = if bi == 0 {
                    j > i + s.saturating_sub(t)
                } else {
                    r.random_bool(0.3)
                };
                if hidden {
                    m[(bi * t + i) * s + j] = f32::MIN;
                }
            }
        }
    }
    if full_row && t > 1 {
        let row = ((mb - 1) * t + t - 1) * s;
        m[row..row + s].fill(f32::MIN);
    }
    m
}

const SOFTMAX_SHAPES: &[(usize, usize, usize, usize, bool)] = &[
    // (b, h, t, s, mask shared over the batch)
    (2, 3, 5, 7, false),
    (1, 2, 9, 13, false),
    (3, 4, 8, 16, true),
    (2, 2, 1, 11, false),
    (2, 1, 17, 33, false),
];

#[test]
fn softmax_matches_composed() {
    let mut r = rng(1);
    for &(b, h, t, s, shared) in SOFTMAX_SHAPES {
        let mb = if shared { 1 } else { b };
        let shape = [b, h, t, s];
        let n = b * h * t * s;
        let m = tensor(mask(&mut r, mb, t, s, true), &[mb, 1, t, s]);
        let scale = 0.37;
        let x = Var::from_tensor(&tensor(randn(&mut r, n, 3.0), &shape)).unwrap();
        let w = tensor(randn(&mut r, n, 1.0), &shape);
        let pf = fused::scaled_masked_softmax(x.as_tensor(), &m, scale).unwrap();
        let pc = ops::scaled_masked_softmax_composed(x.as_tensor(), &m, scale).unwrap();
        let pd = ops::scaled_masked_softmax(x.as_tensor(), &m, scale).unwrap();
        assert_close(&format!("softmax fwd {shape:?}"), &pf, &pc);
        assert_close(&format!("softmax dispatch {shape:?}"), &pd, &pc);
        let gf = weighted_sum(&pf, &w).backward().unwrap();
        let gc = weighted_sum(&pc, &w).backward().unwrap();
        assert!(gf.get(&m).is_none());
        assert_close(
            &format!("softmax grad {shape:?}"),
            gf.get(&x).unwrap(),
            gc.get(&x).unwrap(),
        );
    }
}

#[test]
fn softmax_gradient_matches_finite_differences() {
    let mut r = rng(2);
    for &(b, h, t, s, shared) in SOFTMAX_SHAPES {
        let mb = if shared { 1 } else { b };
        let shape = [b, h, t, s];
        let n = b * h * t * s;
        let m = tensor(mask(&mut r, mb, t, s, false), &[mb, 1, t, s]);
        let scale = 0.5;
        let xs = randn(&mut r, n, 1.0);
        let ws = randn(&mut r, n, 1.0);
        let x = Var::from_tensor(&tensor(xs.clone(), &shape)).unwrap();
        let p = fused::scaled_masked_softmax(x.as_tensor(), &m, scale).unwrap();
        let g = weighted_sum(&p, &tensor(ws.clone(), &shape))
            .backward()
            .unwrap();
        let f = |xt: &Tensor| {
            weighted_sum_f64(&fused::scaled_masked_softmax(xt, &m, scale).unwrap(), &ws)
        };
        finite_diff(
            &format!("softmax {shape:?}"),
            &xs,
            &shape,
            g.get(&x).unwrap(),
            1e-2,
            &f,
        );
    }
}

const NORM_SHAPES: &[&[usize]] = &[&[4, 7], &[2, 3, 13], &[5, 96], &[3, 1, 33], &[2, 8, 256]];

#[test]
fn norms_match_composed() {
    let mut r = rng(3);
    for &shape in NORM_SHAPES {
        let d = *shape.last().unwrap();
        let n: usize = shape.iter().product();
        let x = Var::from_tensor(&tensor(
            randn(&mut r, n, 2.0).iter().map(|v| v + 0.5).collect(),
            shape,
        ))
        .unwrap();
        let w = Var::from_tensor(&tensor(randn(&mut r, d, 1.0), &[d])).unwrap();
        let b = Var::from_tensor(&tensor(randn(&mut r, d, 1.0), &[d])).unwrap();
        let rw = tensor(randn(&mut r, n, 1.0), shape);

        let yf = fused::layer_norm(&x, &w, &b, 1e-5).unwrap();
        let yc = ops::layer_norm_composed(&x, &w, &b, 1e-5).unwrap();
        assert_close(&format!("layer_norm fwd {shape:?}"), &yf, &yc);
        assert_close(
            &format!("layer_norm dispatch {shape:?}"),
            &ops::layer_norm(&x, &w, &b, 1e-5).unwrap(),
            &yc,
        );
        let gf = weighted_sum(&yf, &rw).backward().unwrap();
        let gc = weighted_sum(&yc, &rw).backward().unwrap();
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            assert_close(
                &format!("layer_norm d{name} {shape:?}"),
                gf.get(v).unwrap(),
                gc.get(v).unwrap(),
            );
        }

        let yf = fused::rms_norm(&x, &w, 1e-6).unwrap();
        let yc = ops::rms_norm_composed(&x, &w, 1e-6).unwrap();
        assert_close(&format!("rms_norm fwd {shape:?}"), &yf, &yc);
        assert_close(
            &format!("rms_norm dispatch {shape:?}"),
            &ops::rms_norm(&x, &w, 1e-6).unwrap(),
            &yc,
        );
        let gf = weighted_sum(&yf, &rw).backward().unwrap();
        let gc = weighted_sum(&yc, &rw).backward().unwrap();
        for (name, v) in [("x", &x), ("w", &w)] {
            assert_close(
                &format!("rms_norm d{name} {shape:?}"),
                gf.get(v).unwrap(),
                gc.get(v).unwrap(),
            );
        }
        assert!(gf.get(&b).is_none());
    }
}

#[test]
fn norm_gradients_match_finite_differences() {
    let mut r = rng(4);
    for &shape in NORM_SHAPES {
        let d = *shape.last().unwrap();
        let n: usize = shape.iter().product();
        let xs = randn(&mut r, n, 1.0);
        let ws = randn(&mut r, d, 1.0);
        let bs = randn(&mut r, d, 1.0);
        let rs = randn(&mut r, n, 1.0);
        let (xt, wt, bt) = (
            tensor(xs.clone(), shape),
            tensor(ws.clone(), &[d]),
            tensor(bs.clone(), &[d]),
        );
        let x = Var::from_tensor(&xt).unwrap();
        let w = Var::from_tensor(&wt).unwrap();
        let b = Var::from_tensor(&bt).unwrap();
        let rw = tensor(rs.clone(), shape);

        let g = weighted_sum(&fused::layer_norm(&x, &w, &b, 1e-5).unwrap(), &rw)
            .backward()
            .unwrap();
        let what = format!("layer_norm {shape:?}");
        let f = |t: &Tensor| weighted_sum_f64(&fused::layer_norm(t, &wt, &bt, 1e-5).unwrap(), &rs);
        finite_diff(
            &format!("{what} dx"),
            &xs,
            shape,
            g.get(&x).unwrap(),
            1e-2,
            &f,
        );
        let f = |t: &Tensor| weighted_sum_f64(&fused::layer_norm(&xt, t, &bt, 1e-5).unwrap(), &rs);
        finite_diff(
            &format!("{what} dw"),
            &ws,
            &[d],
            g.get(&w).unwrap(),
            1e-2,
            &f,
        );
        let f = |t: &Tensor| weighted_sum_f64(&fused::layer_norm(&xt, &wt, t, 1e-5).unwrap(), &rs);
        finite_diff(
            &format!("{what} db"),
            &bs,
            &[d],
            g.get(&b).unwrap(),
            1e-2,
            &f,
        );

        let g = weighted_sum(&fused::rms_norm(&x, &w, 1e-6).unwrap(), &rw)
            .backward()
            .unwrap();
        let what = format!("rms_norm {shape:?}");
        let f = |t: &Tensor| weighted_sum_f64(&fused::rms_norm(t, &wt, 1e-6).unwrap(), &rs);
        finite_diff(
            &format!("{what} dx"),
            &xs,
            shape,
            g.get(&x).unwrap(),
            1e-2,
            &f,
        );
        let f = |t: &Tensor| weighted_sum_f64(&fused::rms_norm(&xt, t, 1e-6).unwrap(), &rs);
        finite_diff(
            &format!("{what} dw"),
            &ws,
            &[d],
            g.get(&w).unwrap(),
            1e-2,
            &f,
        );
    }
}

const NLL_SHAPES: &[(usize, usize)] = &[(5, 11), (7, 600), (3, 1000), (1, 9), (13, 8192)];

fn targets(r: &mut rand::rngs::StdRng, n: usize, v: usize) -> Tensor {
    Tensor::from_vec(
        (0..n)
            .map(|_| r.random_range(0..v as u32))
            .collect::<Vec<u32>>(),
        n,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn token_nll_matches_composed() {
    let mut r = rng(5);
    for &(n, v) in NLL_SHAPES {
        let x = Var::from_tensor(&tensor(randn(&mut r, n * v, 4.0), &[n, v])).unwrap();
        let tg = targets(&mut r, n, v);
        let mut ws = randn(&mut r, n, 1.0);
        ws[0] = 0.0;
        let rw = tensor(ws, &[n]);
        let yf = fused::token_nll(&x, &tg).unwrap();
        let yc = ops::token_nll_composed(&x, &tg).unwrap();
        assert_close(&format!("token_nll fwd {n}x{v}"), &yf, &yc);
        assert_close(
            &format!("token_nll dispatch {n}x{v}"),
            &ops::token_nll(&x, &tg).unwrap(),
            &yc,
        );
        let gf = weighted_sum(&yf, &rw).backward().unwrap();
        let gc = weighted_sum(&yc, &rw).backward().unwrap();
        assert_close(
            &format!("token_nll grad {n}x{v}"),
            gf.get(&x).unwrap(),
            gc.get(&x).unwrap(),
        );

        // masked_cross_entropy uses the fused op: same loss and gradient as the composed one.
        let weights: Vec<f32> = (0..n).map(|i| (i % 3 != 1) as u8 as f32).collect();
        let weights = tensor(weights, &[n]);
        let (lf, cf) = ops::masked_cross_entropy(&x, &tg, &weights).unwrap();
        let (lc, cc) = ops::masked_cross_entropy_composed(&x, &tg, &weights).unwrap();
        assert_eq!(cf, cc);
        assert_close(&format!("masked_cross_entropy {n}x{v}"), &lf, &lc);
        let gf = lf.backward().unwrap();
        let gc = lc.backward().unwrap();
        assert_close(
            &format!("masked_cross_entropy grad {n}x{v}"),
            gf.get(&x).unwrap(),
            gc.get(&x).unwrap(),
        );
    }
}

#[test]
fn token_nll_gradient_matches_finite_differences() {
    let mut r = rng(6);
    for &(n, v) in NLL_SHAPES {
        let xs = randn(&mut r, n * v, 2.0);
        let tg = targets(&mut r, n, v);
        let rs = randn(&mut r, n, 1.0);
        let x = Var::from_tensor(&tensor(xs.clone(), &[n, v])).unwrap();
        let g = weighted_sum(
            &fused::token_nll(&x, &tg).unwrap(),
            &tensor(rs.clone(), &[n]),
        )
        .backward()
        .unwrap();
        let f = |t: &Tensor| weighted_sum_f64(&fused::token_nll(t, &tg).unwrap(), &rs);
        // Include each row's target logit, where the gradient is largest.
        let grad = g.get(&x).unwrap();
        finite_diff(&format!("token_nll {n}x{v}"), &xs, &[n, v], grad, 1e-2, &f);
        let tgv = tg.to_vec1::<u32>().unwrap();
        let gv = flat(grad);
        for (i, &t) in tgv.iter().enumerate() {
            let k = i * v + t as usize;
            let mut xp = xs.clone();
            xp[k] += 1e-2;
            let mut xm = xs.clone();
            xm[k] -= 1e-2;
            let fd = (f(&tensor(xp, &[n, v])) - f(&tensor(xm, &[n, v]))) / 2e-2;
            let rel = (fd - gv[k] as f64).abs() / fd.abs().max(gv[k].abs() as f64).max(1e-1);
            assert!(
                rel < 1e-2,
                "token_nll target logit {i}: {fd:e} vs {:e}",
                gv[k]
            );
        }
    }
}

#[test]
fn fused_ops_reject_bad_input_and_fall_back_for_f64() {
    let x = tensor(vec![0.0; 6], &[2, 3]);
    let bad = Tensor::from_vec(vec![0u32, 3], 2, &Device::Cpu).unwrap();
    assert!(fused::token_nll(&x, &bad).is_err());
    // f64 goes through the composed path and still works.
    let x64 = x.to_dtype(DType::F64).unwrap();
    let ok = Tensor::from_vec(vec![0u32, 2], 2, &Device::Cpu).unwrap();
    let y = ops::token_nll(&x64, &ok).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let w64 = Tensor::ones(3, DType::F64, &Device::Cpu).unwrap();
    let b64 = Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap();
    assert_eq!(
        ops::layer_norm(&x64, &w64, &b64, 1e-5).unwrap().dtype(),
        DType::F64
    );
    assert_eq!(ops::rms_norm(&x64, &w64, 1e-5).unwrap().dtype(), DType::F64);
}

#[test]
fn gelu_new_matches_composed_and_finite_differences() {
    let mut r = rng(7);
    for shape in [&[3usize, 7][..], &[2, 5, 33], &[4, 1000]] {
        let n: usize = shape.iter().product();
        let mut xs = randn(&mut r, n, 3.0);
        xs[0] = 60.0;
        xs[1] = -60.0;
        let rs = randn(&mut r, n, 1.0);
        let x = Var::from_tensor(&tensor(xs.clone(), shape)).unwrap();
        let rw = tensor(rs.clone(), shape);
        let yf = fused::gelu_new(&x).unwrap();
        let yc = x.gelu().unwrap();
        assert_close(&format!("gelu_new fwd {shape:?}"), &yf, &yc);
        assert_close(
            &format!("gelu_new dispatch {shape:?}"),
            &ops::gelu_new(&x).unwrap(),
            &yc,
        );
        let gf = weighted_sum(&yf, &rw).backward().unwrap();
        let gc = weighted_sum(&yc, &rw).backward().unwrap();
        assert_close(
            &format!("gelu_new grad {shape:?}"),
            gf.get(&x).unwrap(),
            gc.get(&x).unwrap(),
        );
        let f = |t: &Tensor| weighted_sum_f64(&fused::gelu_new(t).unwrap(), &rs);
        finite_diff(
            &format!("gelu_new {shape:?}"),
            &xs,
            shape,
            gf.get(&x).unwrap(),
            1e-2,
            &f,
        );
    }
}

#[test]
fn silu_matches_composed_and_finite_differences() {
    let mut r = rng(8);
    for shape in [&[3usize, 7][..], &[2, 5, 33], &[4, 1000]] {
        let n: usize = shape.iter().product();
        let mut xs = randn(&mut r, n, 3.0);
        xs[0] = 100.0;
        xs[1] = -100.0;
        let rs = randn(&mut r, n, 1.0);
        let x = Var::from_tensor(&tensor(xs.clone(), shape)).unwrap();
        let rw = tensor(rs.clone(), shape);
        let yf = fused::silu(&x).unwrap();
        let yc = x.silu().unwrap();
        assert_close(&format!("silu fwd {shape:?}"), &yf, &yc);
        assert_close(
            &format!("silu dispatch {shape:?}"),
            &ops::silu(&x).unwrap(),
            &yc,
        );
        let gf = weighted_sum(&yf, &rw).backward().unwrap();
        let gc = weighted_sum(&yc, &rw).backward().unwrap();
        assert_close(
            &format!("silu grad {shape:?}"),
            gf.get(&x).unwrap(),
            gc.get(&x).unwrap(),
        );
        let f = |t: &Tensor| weighted_sum_f64(&fused::silu(t).unwrap(), &rs);
        finite_diff(
            &format!("silu {shape:?}"),
            &xs,
            shape,
            gf.get(&x).unwrap(),
            1e-2,
            &f,
        );
    }
}

#[test]
fn swiglu_matches_composed_and_finite_differences() {
    let mut r = rng(18);
    for shape in [&[3usize, 7][..], &[2, 5, 33], &[4, 10000]] {
        let n: usize = shape.iter().product();
        let mut gs = randn(&mut r, n, 3.0);
        gs[0] = 100.0;
        gs[1] = -100.0;
        let us = randn(&mut r, n, 1.0);
        let rs = randn(&mut r, n, 1.0);
        let gate = Var::from_tensor(&tensor(gs.clone(), shape)).unwrap();
        let up = Var::from_tensor(&tensor(us.clone(), shape)).unwrap();
        let rw = tensor(rs.clone(), shape);
        let yf = fused::swiglu(&gate, &up).unwrap();
        let yc = (gate.silu().unwrap() * up.as_tensor()).unwrap();
        assert_close(&format!("swiglu fwd {shape:?}"), &yf, &yc);
        assert_close(
            &format!("swiglu dispatch {shape:?}"),
            &ops::swiglu(&gate, &up).unwrap(),
            &yc,
        );
        let gf = weighted_sum(&yf, &rw).backward().unwrap();
        let gc = weighted_sum(&yc, &rw).backward().unwrap();
        for (what, v) in [("gate", &gate), ("up", &up)] {
            assert_close(
                &format!("swiglu d {what} {shape:?}"),
                gf.get(v).unwrap(),
                gc.get(v).unwrap(),
            );
        }
        let up_t = up.as_tensor().clone();
        let f = |t: &Tensor| weighted_sum_f64(&fused::swiglu(t, &up_t).unwrap(), &rs);
        finite_diff(
            &format!("swiglu gate {shape:?}"),
            &gs,
            shape,
            gf.get(&gate).unwrap(),
            1e-2,
            &f,
        );
        let gate_t = gate.as_tensor().clone();
        let f = |t: &Tensor| weighted_sum_f64(&fused::swiglu(&gate_t, t).unwrap(), &rs);
        finite_diff(
            &format!("swiglu up {shape:?}"),
            &us,
            shape,
            gf.get(&up).unwrap(),
            1e-2,
            &f,
        );
    }
}

#[test]
fn linear_and_conv1d_match_composed_and_finite_differences() {
    let mut r = rng(11);
    for (xshape, k, out) in [(&[2usize, 5, 7][..], 7usize, 3usize), (&[6, 16], 16, 9)] {
        for transposed in [false, true] {
            for with_bias in [true, false] {
                let what = format!("linear {xshape:?} t={transposed} bias={with_bias}");
                let nx: usize = xshape.iter().product();
                let xs = randn(&mut r, nx, 1.0);
                let wshape = if transposed { [out, k] } else { [k, out] };
                let ws = randn(&mut r, k * out, 0.5);
                let bs = randn(&mut r, out, 0.5);
                let mut yshape = xshape.to_vec();
                *yshape.last_mut().unwrap() = out;
                let rs = randn(&mut r, nx / k * out, 1.0);
                let x = Var::from_tensor(&tensor(xs.clone(), xshape)).unwrap();
                let w = Var::from_tensor(&tensor(ws.clone(), &wshape)).unwrap();
                let b = Var::from_tensor(&tensor(bs.clone(), &[out])).unwrap();
                let rw = tensor(rs.clone(), &yshape);
                let bias = with_bias.then_some(b.as_tensor());
                let fwd_fused = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| {
                    if transposed {
                        fused::linear(x, w, b).unwrap()
                    } else {
                        fused::conv1d(x, w, b).unwrap()
                    }
                };
                let yf = fwd_fused(&x, &w, bias);
                let yc = if transposed {
                    ops::linear_composed(&x, &w, bias).unwrap()
                } else if let Some(b) = bias {
                    ops::conv1d_composed(&x, &w, b).unwrap()
                } else {
                    let n = nx / k;
                    x.reshape((n, k))
                        .unwrap()
                        .matmul(&w)
                        .unwrap()
                        .reshape(yshape.as_slice())
                        .unwrap()
                };
                assert_close(&format!("{what} fwd"), &yf, &yc);
                let yd = match (transposed, bias) {
                    (true, _) => ops::linear(&x, &w, bias).unwrap(),
                    (false, Some(b)) => ops::conv1d(&x, &w, b).unwrap(),
                    (false, None) => yf.clone(),
                };
                assert_close(&format!("{what} dispatch"), &yd, &yc);
                let gf = weighted_sum(&yf, &rw).backward().unwrap();
                let gc = weighted_sum(&yc, &rw).backward().unwrap();
                let mut checked = vec![(&x, "x"), (&w, "w")];
                if with_bias {
                    checked.push((&b, "b"));
                }
                for (v, name) in checked {
                    assert_close(
                        &format!("{what} grad {name}"),
                        gf.get(v).unwrap(),
                        gc.get(v).unwrap(),
                    );
                }
                let fx = |t: &Tensor| weighted_sum_f64(&fwd_fused(t, &w, bias), &rs);
                finite_diff(
                    &format!("{what} dx"),
                    &xs,
                    xshape,
                    gf.get(&x).unwrap(),
                    1e-2,
                    &fx,
                );
                let fw = |t: &Tensor| weighted_sum_f64(&fwd_fused(&x, t, bias), &rs);
                finite_diff(
                    &format!("{what} dw"),
                    &ws,
                    &wshape,
                    gf.get(&w).unwrap(),
                    1e-2,
                    &fw,
                );
                if with_bias {
                    let fb = |t: &Tensor| weighted_sum_f64(&fwd_fused(&x, &w, Some(t)), &rs);
                    finite_diff(
                        &format!("{what} db"),
                        &bs,
                        &[out],
                        gf.get(&b).unwrap(),
                        1e-2,
                        &fb,
                    );
                }
            }
        }
    }
    // f64 falls back to the composed path.
    let x = Tensor::ones((2, 3), DType::F64, &Device::Cpu).unwrap();
    let w = Tensor::ones((4, 3), DType::F64, &Device::Cpu).unwrap();
    let b = Tensor::ones(4, DType::F64, &Device::Cpu).unwrap();
    let y = ops::linear(&x, &w, Some(&b)).unwrap();
    assert_eq!(y.to_vec2::<f64>().unwrap(), vec![vec![4.0; 4]; 2]);
    let y = ops::conv1d(&x, &w.t().unwrap(), &b).unwrap();
    assert_eq!(y.to_vec2::<f64>().unwrap(), vec![vec![4.0; 4]; 2]);
}

/// A random `k -> out` projection weight in `dtype` (stored (out, in) when `transposed`, else
/// (in, out)) and the same values widened to f32.
fn weight_16_and_widened(
    r: &mut rand::rngs::StdRng,
    dtype: DType,
    (k, out): (usize, usize),
    transposed: bool,
) -> (Tensor, Tensor) {
    let shape = if transposed { [out, k] } else { [k, out] };
    let w16 = tensor(randn(r, k * out, 0.5), &shape)
        .to_dtype(dtype)
        .unwrap();
    let w32 = w16.to_dtype(DType::F32).unwrap();
    (w16, w32)
}

#[test]
fn lora_linear_on_a_16_bit_frozen_weight_equals_it_widened_to_f32() {
    let mut r = rng(13);
    let (k, out, rank) = (9usize, 6usize, 2usize);
    for dtype in [DType::BF16, DType::F16] {
        for transposed in [true, false] {
            let what = format!("lora {dtype:?} t={transposed}");
            let (w16, w32) = weight_16_and_widened(&mut r, dtype, (k, out), transposed);
            let bias = tensor(randn(&mut r, out, 0.5), &[out]);
            let x = Var::from_tensor(&tensor(randn(&mut r, 3 * k, 1.0), &[3, k])).unwrap();
            let a = Var::from_tensor(&tensor(randn(&mut r, rank * k, 0.5), &[rank, k])).unwrap();
            let b =
                Var::from_tensor(&tensor(randn(&mut r, out * rank, 0.5), &[out, rank])).unwrap();
            let rw = tensor(randn(&mut r, 3 * out, 1.0), &[3, out]);
            let run = |w: &Tensor| {
                let y = ops::lora_linear(&x, w, Some(&bias), (&a, &b, 2.0), transposed).unwrap();
                let g = weighted_sum(&y, &rw).backward().unwrap();
                let grads = [&x, &a, &b].map(|v| flat(g.get(v).unwrap()));
                (flat(&y), grads)
            };
            // The same f32 values reach the same kernels: equal to the bit.
            assert_eq!(run(&w16), run(&w32), "{what}");
        }
    }
}

#[test]
fn lora_linear_matches_composed_and_finite_differences() {
    let mut r = rng(12);
    let (k, out, rank) = (7usize, 5usize, 3usize);
    for transposed in [true, false] {
        for with_bias in [true, false] {
            let what = format!("lora t={transposed} bias={with_bias}");
            let xshape = [2usize, 4, k];
            let xs = randn(&mut r, 2 * 4 * k, 1.0);
            let wshape = if transposed { [out, k] } else { [k, out] };
            let w = tensor(randn(&mut r, k * out, 0.5), &wshape);
            let bias = tensor(randn(&mut r, out, 0.5), &[out]);
            let bias = with_bias.then_some(&bias);
            let (a_s, b_s) = (randn(&mut r, rank * k, 0.5), randn(&mut r, out * rank, 0.5));
            let rs = randn(&mut r, 2 * 4 * out, 1.0);
            let rw = tensor(rs.clone(), &[2, 4, out]);
            let x = Var::from_tensor(&tensor(xs.clone(), &xshape)).unwrap();
            let a = Var::from_tensor(&tensor(a_s.clone(), &[rank, k])).unwrap();
            let b = Var::from_tensor(&tensor(b_s.clone(), &[out, rank])).unwrap();
            let fused = |x: &Tensor, a: &Tensor, b: &Tensor| {
                fused::lora_linear(x, &w, bias, a, b, 1.5, transposed).unwrap()
            };
            let yf = fused(&x, &a, &b);
            // composed: the frozen projection, plus the adapter path
            let w_out_in = if transposed {
                w.clone()
            } else {
                w.t().unwrap()
            };
            let base = ops::linear_composed(&x, &w_out_in, bias).unwrap();
            let up = ops::linear_composed(&ops::linear_composed(&x, &a, None).unwrap(), &b, None)
                .unwrap();
            let yc = (base + (up * 1.5).unwrap()).unwrap();
            assert_close(&format!("{what} fwd"), &yf, &yc);
            let yd = ops::lora_linear(&x, &w, bias, (&a, &b, 1.5), transposed).unwrap();
            assert_close(&format!("{what} dispatch"), &yd, &yc);
            let gf = weighted_sum(&yf, &rw).backward().unwrap();
            let gc = weighted_sum(&yc, &rw).backward().unwrap();
            for (v, name) in [(&x, "x"), (&a, "a"), (&b, "b")] {
                assert_close(
                    &format!("{what} grad {name}"),
                    gf.get(v).unwrap(),
                    gc.get(v).unwrap(),
                );
            }
            let fx = |t: &Tensor| weighted_sum_f64(&fused(t, &a, &b), &rs);
            finite_diff(
                &format!("{what} dx"),
                &xs,
                &xshape,
                gf.get(&x).unwrap(),
                1e-2,
                &fx,
            );
            let fa = |t: &Tensor| weighted_sum_f64(&fused(&x, t, &b), &rs);
            finite_diff(
                &format!("{what} da"),
                &a_s,
                &[rank, k],
                gf.get(&a).unwrap(),
                1e-2,
                &fa,
            );
            let fb = |t: &Tensor| weighted_sum_f64(&fused(&x, &a, t), &rs);
            finite_diff(
                &format!("{what} db"),
                &b_s,
                &[out, rank],
                gf.get(&b).unwrap(),
                1e-2,
                &fb,
            );
        }
    }
}

#[test]
fn frozen_inputs_get_no_gradient_from_linear_and_head() {
    let mut r = rng(13);
    let x = Var::from_tensor(&tensor(randn(&mut r, 6 * 4, 1.0), &[6, 4])).unwrap();
    let w = tensor(randn(&mut r, 3 * 4, 1.0), &[3, 4]); // not a Var: frozen
    let y = fused::linear(&x, &w, None).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_some() && g.get(&w).is_none());
    let targets = Tensor::new(&[0u32, 1, 2, 0, 1, 2], &Device::Cpu).unwrap();
    let nll = fused::lm_head_nll(&x, &w, &targets, None).unwrap();
    let g = nll.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_some() && g.get(&w).is_none());
}

#[test]
fn adamw_fused_update_matches_reference() {
    use sani::train::{AdamW, OptimConfig};
    use std::collections::BTreeMap;
    let mut r = rng(5);
    let (ws, rs, bs) = (
        randn(&mut r, 12, 1.0),
        randn(&mut r, 12, 1.0),
        randn(&mut r, 4, 1.0),
    );
    let w = Var::from_tensor(&tensor(ws.clone(), &[3, 4])).unwrap();
    let b = Var::from_tensor(&tensor(bs.clone(), &[4])).unwrap();
    let vars = BTreeMap::from([("w".to_string(), w.clone()), ("b".to_string(), b.clone())]);
    let cfg = OptimConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let (b1, b2, eps, lr, wd) = (cfg.beta1, cfg.beta2, cfg.eps, 0.05, cfg.weight_decay);
    let mut opt = AdamW::new(&vars, cfg).unwrap();
    // loss = sum(w^2 * r) + sum(b^2): grad 2 w r and 2 b.
    let (mut pw, mut pb): (Vec<f64>, Vec<f64>) = (
        ws.iter().map(|&v| v as f64).collect(),
        bs.iter().map(|&v| v as f64).collect(),
    );
    let (mut m, mut v) = (vec![0f64; 16], vec![0f64; 16]);
    for step in 1..=3 {
        let rw = tensor(rs.clone(), &[3, 4]);
        let loss = ((w.sqr().unwrap() * &rw).unwrap().sum_all().unwrap()
            + b.sqr().unwrap().sum_all().unwrap())
        .unwrap();
        opt.step(&loss.backward().unwrap(), lr).unwrap();
        let (bc1, bc2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
        for i in 0..16 {
            let (p, decay) = if i < 12 {
                (&mut pw[i], true)
            } else {
                (&mut pb[i - 12], false)
            };
            let g = if i < 12 {
                2.0 * *p * rs[i] as f64
            } else {
                2.0 * *p
            };
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let upd = (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
            if decay {
                *p *= 1.0 - lr * wd;
            }
            *p -= lr * upd;
        }
    }
    for (got, want) in flat(w.as_tensor())
        .iter()
        .zip(&pw)
        .chain(flat(b.as_tensor()).iter().zip(&pb))
    {
        assert!((*got as f64 - want).abs() < 1e-5, "adamw: {got} vs {want}");
    }
}

#[test]
fn clipping_folded_into_the_update_equals_clipping_the_gradients() {
    use candle_core::DType;
    use sani::train::{clip_grad_norm, clip_scale, grad_norm, AdamW, OptimConfig};
    use std::collections::BTreeMap;
    let mut r = rng(9);
    let (ws, zs) = (randn(&mut r, 12, 1.0), randn(&mut r, 5, 1.0));
    let make = || {
        // An f32 var takes the fused in-place update, an f64 one the composed path.
        let w = Var::from_tensor(&tensor(ws.clone(), &[3, 4])).unwrap();
        let z = Var::from_tensor(&tensor(zs.clone(), &[5]).to_dtype(DType::F64).unwrap()).unwrap();
        BTreeMap::from([("w".to_string(), w), ("z".to_string(), z)])
    };
    let (a, b) = (make(), make());
    let cfg = OptimConfig::default();
    let (mut opt_a, mut opt_b) = (
        AdamW::new(&a, cfg.clone()).unwrap(),
        AdamW::new(&b, cfg).unwrap(),
    );
    let loss = |vars: &BTreeMap<String, Var>| {
        let w = vars["w"].as_tensor().powf(3.0).unwrap().sum_all().unwrap();
        let z = vars["z"].as_tensor().sqr().unwrap().sum_all().unwrap();
        (w + z.to_dtype(DType::F32).unwrap()).unwrap()
    };
    for _ in 0..3 {
        let mut ga = loss(&a).backward().unwrap();
        clip_grad_norm(&mut ga, &a, 0.5).unwrap();
        opt_a.step(&ga, 0.05).unwrap();
        let gb = loss(&b).backward().unwrap();
        let norm = grad_norm(&gb, &b).unwrap();
        assert!(clip_scale(norm, 0.5) < 1.0 && clip_scale(norm, 0.0) == 1.0);
        opt_b.step_scaled(&gb, 0.05, clip_scale(norm, 0.5)).unwrap();
    }
    for name in ["w", "z"] {
        let f32_of = |v: &Var| v.as_tensor().to_dtype(DType::F32).unwrap();
        let d = max_abs_diff(&f32_of(&a[name]), &f32_of(&b[name]));
        assert!(d < 1e-6, "{name}: {d}");
    }
}

#[test]
fn clip_grad_norm_matches_composed_norm() {
    use sani::train::clip_grad_norm;
    use std::collections::BTreeMap;
    let mut r = rng(8);
    let xs = randn(&mut r, 3001, 1.0);
    let x = Var::from_tensor(&tensor(xs.clone(), &[3001])).unwrap();
    let vars = BTreeMap::from([("x".to_string(), x.clone())]);
    // loss = sum(x^3): grad 3 x^2.
    let loss = x.powf(3.0).unwrap().sum_all().unwrap();
    let mut grads = loss.backward().unwrap();
    let want = xs
        .iter()
        .map(|&v| {
            let g = 3.0 * (v as f64) * (v as f64);
            g * g
        })
        .sum::<f64>()
        .sqrt();
    let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
    assert!((norm - want).abs() / want < 1e-5, "norm {norm} vs {want}");
    let clipped = clip_grad_norm(&mut grads, &vars, 0.0).unwrap();
    assert!((clipped - 1.0).abs() < 1e-4, "clipped norm {clipped}");
}

/// (b, h, kvh, t, s, d, mask shared over the batch). t < s: queries after cached keys. t > 64
/// spans several query tiles.
const ATTENTION_SHAPES: &[(usize, usize, usize, usize, usize, usize, bool)] = &[
    (2, 4, 2, 5, 7, 8, false),
    (1, 2, 2, 9, 9, 4, false),
    (3, 6, 3, 8, 16, 5, true),
    (2, 2, 1, 1, 11, 8, false),
    (2, 4, 4, 70, 70, 8, false),
    (1, 3, 1, 130, 131, 6, true),
];

/// q [b, h, t, d] as a transposed view of [b, t, h, d] (the models' layout), k and v contiguous.
fn attention_inputs(
    r: &mut rand::rngs::StdRng,
    (b, h, kvh, t, s, d): (usize, usize, usize, usize, usize, usize),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        randn(r, b * t * h * d, 1.0),
        randn(r, b * kvh * s * d, 1.0),
        randn(r, b * kvh * s * d, 1.0),
    )
}

fn q_view(q: &Tensor, h: usize) -> Tensor {
    let (b, t, hd) = q.dims3().unwrap();
    q.reshape((b, t, h, hd / h))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
}

#[test]
fn attention_matches_composed() {
    let mut r = rng(11);
    for &(b, h, kvh, t, s, d, shared) in ATTENTION_SHAPES {
        let mb = if shared { 1 } else { b };
        let m = tensor(mask(&mut r, mb, t, s, true), &[mb, 1, t, s]);
        let (qs, ks, vs) = attention_inputs(&mut r, (b, h, kvh, t, s, d));
        let q = Var::from_tensor(&tensor(qs, &[b, t, h * d])).unwrap();
        let k = Var::from_tensor(&tensor(ks, &[b, kvh, s, d])).unwrap();
        let v = Var::from_tensor(&tensor(vs, &[b, kvh, s, d])).unwrap();
        let w = tensor(randn(&mut r, b * t * h * d, 1.0), &[b, t, h * d]);
        let scale = 0.41;
        let qv = q_view(q.as_tensor(), h);
        let of = fused::attention(&qv, k.as_tensor(), v.as_tensor(), &m, scale).unwrap();
        let oc = ops::attention_composed(&qv, k.as_tensor(), v.as_tensor(), &m, scale).unwrap();
        let od = ops::attention(&qv, k.as_tensor(), v.as_tensor(), &m, scale).unwrap();
        let what = format!("attention b{b} h{h}/{kvh} t{t} s{s} d{d}");
        assert_close(&format!("{what} fwd"), &of, &oc);
        assert_close(&format!("{what} dispatch"), &od, &oc);
        let gf = weighted_sum(&of, &w).backward().unwrap();
        let gc = weighted_sum(&oc, &w).backward().unwrap();
        assert!(gf.get(&m).is_none());
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            assert_close(
                &format!("{what} grad {name}"),
                gf.get(var).unwrap(),
                gc.get(var).unwrap(),
            );
        }
    }
}

/// Sequences packed back to back in a row (the training layout on the CPU): each query tile
/// reads only the keys from its rows' sequences on, and the result is still that of the whole
/// block-diagonal mask, with and without a sliding window, across tile boundaries.
#[test]
fn attention_over_packed_sequences_matches_composed() {
    let mut r = rng(14);
    let (h, kvh, d, t) = (4, 2, 8, 150);
    let segments = vec![vec![40, 70, 30], vec![90, 25], vec![150]];
    let b = segments.len();
    for window in [None, Some(20)] {
        let m = ops::segment_mask(&segments, t, window, &Device::Cpu).unwrap();
        let (qs, ks, vs) = attention_inputs(&mut r, (b, h, kvh, t, t, d));
        let q = Var::from_tensor(&tensor(qs, &[b, t, h * d])).unwrap();
        let k = Var::from_tensor(&tensor(ks, &[b, kvh, t, d])).unwrap();
        let v = Var::from_tensor(&tensor(vs, &[b, kvh, t, d])).unwrap();
        let w = tensor(randn(&mut r, b * t * h * d, 1.0), &[b, t, h * d]);
        let qv = q_view(q.as_tensor(), h);
        let of = fused::attention(&qv, k.as_tensor(), v.as_tensor(), &m, 0.3).unwrap();
        let oc = ops::attention_composed(&qv, k.as_tensor(), v.as_tensor(), &m, 0.3).unwrap();
        let what = format!("packed sequences, window {window:?}");
        assert_close(&format!("{what} fwd"), &of, &oc);
        let gf = weighted_sum(&of, &w).backward().unwrap();
        let gc = weighted_sum(&oc, &w).backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            assert_close(
                &format!("{what} grad {name}"),
                gf.get(var).unwrap(),
                gc.get(var).unwrap(),
            );
        }
    }
}

#[test]
fn attention_gradient_matches_finite_differences() {
    let mut r = rng(12);
    for &(b, h, kvh, t, s, d, shared) in &ATTENTION_SHAPES[..4] {
        let mb = if shared { 1 } else { b };
        let m = tensor(mask(&mut r, mb, t, s, false), &[mb, 1, t, s]);
        let (qs, ks, vs) = attention_inputs(&mut r, (b, h, kvh, t, s, d));
        let ws = randn(&mut r, b * t * h * d, 1.0);
        let (qshape, kshape) = ([b, t, h * d], [b, kvh, s, d]);
        let q = Var::from_tensor(&tensor(qs.clone(), &qshape)).unwrap();
        let k = Var::from_tensor(&tensor(ks.clone(), &kshape)).unwrap();
        let v = Var::from_tensor(&tensor(vs.clone(), &kshape)).unwrap();
        let scale = 0.5;
        let run = |q: &Tensor, k: &Tensor, v: &Tensor| {
            fused::attention(&q_view(q, h), k, v, &m, scale).unwrap()
        };
        let o = run(q.as_tensor(), k.as_tensor(), v.as_tensor());
        let g = weighted_sum(&o, &tensor(ws.clone(), &qshape))
            .backward()
            .unwrap();
        let what = format!("attention b{b} h{h}/{kvh} t{t} s{s}");
        let (kt, vt) = (k.as_tensor().clone(), v.as_tensor().clone());
        let qt = q.as_tensor().clone();
        finite_diff(
            &format!("{what} q"),
            &qs,
            &qshape,
            g.get(&q).unwrap(),
            1e-2,
            &|x| weighted_sum_f64(&run(x, &kt, &vt), &ws),
        );
        finite_diff(
            &format!("{what} k"),
            &ks,
            &kshape,
            g.get(&k).unwrap(),
            1e-2,
            &|x| weighted_sum_f64(&run(&qt, x, &vt), &ws),
        );
        finite_diff(
            &format!("{what} v"),
            &vs,
            &kshape,
            g.get(&v).unwrap(),
            1e-2,
            &|x| weighted_sum_f64(&run(&qt, &kt, x), &ws),
        );
    }
}

#[test]
fn packed_attention_matches_composed_and_finite_differences() {
    let mut r = rng(13);
    for &(b, h, t, d) in &[
        (2usize, 3usize, 7usize, 4usize),
        (1, 2, 70, 8),
        (3, 1, 1, 5),
    ] {
        let m = tensor(mask(&mut r, b, t, t, false), &[b, 1, t, t]);
        let shape = [b, t, 3 * h * d];
        let xs = randn(&mut r, b * t * 3 * h * d, 1.0);
        let ws = randn(&mut r, b * t * h * d, 1.0);
        let w = tensor(ws.clone(), &[b, t, h * d]);
        let qkv = Var::from_tensor(&tensor(xs.clone(), &shape)).unwrap();
        let scale = 0.45;
        let of = fused::attention_packed(qkv.as_tensor(), h, &m, scale).unwrap();
        let (q, k, v) = ops::split_packed_qkv(qkv.as_tensor(), h).unwrap();
        let oc = ops::attention_composed(&q, &k, &v, &m, scale).unwrap();
        let what = format!("packed attention b{b} h{h} t{t} d{d}");
        assert_close(&format!("{what} fwd"), &of, &oc);
        let gf = weighted_sum(&of, &w).backward().unwrap();
        let gc = weighted_sum(&oc, &w).backward().unwrap();
        assert_close(
            &format!("{what} grad"),
            gf.get(&qkv).unwrap(),
            gc.get(&qkv).unwrap(),
        );
        finite_diff(&what, &xs, &shape, gf.get(&qkv).unwrap(), 1e-2, &|x| {
            weighted_sum_f64(&fused::attention_packed(x, h, &m, scale).unwrap(), &ws)
        });
    }
}

#[test]
fn rope_matches_composed_and_finite_differences() {
    let mut r = rng(14);
    for &(b, t, n, d) in &[(2usize, 5usize, 3usize, 8usize), (1, 9, 2, 4), (3, 1, 4, 6)] {
        let shape = [b, t, n * d];
        let xs = randn(&mut r, b * t * n * d, 1.0);
        // Arbitrary tables (not only HF's repeated halves), so both halves' terms are checked.
        let cos = tensor(randn(&mut r, b * t * d, 1.0), &[b, 1, t, d]);
        let sin = tensor(randn(&mut r, b * t * d, 1.0), &[b, 1, t, d]);
        let ws = randn(&mut r, b * n * t * d, 1.0);
        let w = tensor(ws.clone(), &[b, n, t, d]);
        let x = Var::from_tensor(&tensor(xs.clone(), &shape)).unwrap();
        let yf = fused::rope_heads(x.as_tensor(), &cos, &sin, n).unwrap();
        let yc = ops::rope_heads_composed(x.as_tensor(), &cos, &sin, n).unwrap();
        let what = format!("rope b{b} t{t} n{n} d{d}");
        assert_close(&format!("{what} fwd"), &yf, &yc);
        let gf = weighted_sum(&yf, &w).backward().unwrap();
        let gc = weighted_sum(&yc, &w).backward().unwrap();
        assert_close(
            &format!("{what} grad"),
            gf.get(&x).unwrap(),
            gc.get(&x).unwrap(),
        );
        finite_diff(&what, &xs, &shape, gf.get(&x).unwrap(), 1e-2, &|xt| {
            weighted_sum_f64(&fused::rope_heads(xt, &cos, &sin, n).unwrap(), &ws)
        });
    }
}

#[test]
fn lm_head_nll_matches_composed_across_chunks() {
    let mut r = rng(11);
    // 70,000 columns: about 119 rows per chunk, so 250 rows make two full chunks and a partial
    // one; rows of the middle chunk carry no gradient (the masked-out case the op skips).
    for &(n, d, v) in &[(250usize, 8usize, 70_000usize), (5, 16, 33)] {
        let h = Var::from_tensor(&tensor(randn(&mut r, n * d, 1.0), &[n, d])).unwrap();
        let w = Var::from_tensor(&tensor(randn(&mut r, v * d, 0.5), &[v, d])).unwrap();
        let tg = targets(&mut r, n, v);
        let mut ws = randn(&mut r, n, 1.0);
        for x in ws.iter_mut().take(240).skip(119) {
            *x = 0.0;
        }
        let rw = tensor(ws, &[n]);
        let yf = fused::lm_head_nll(&h, &w, &tg, None).unwrap();
        let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let yc = ops::token_nll_composed(&logits, &tg).unwrap();
        assert_close(&format!("lm_head_nll fwd {n}x{d}x{v}"), &yf, &yc);
        let gf = weighted_sum(&yf, &rw).backward().unwrap();
        let gc = weighted_sum(&yc, &rw).backward().unwrap();
        for (name, var) in [("h", &h), ("w", &w)] {
            assert_close(
                &format!("lm_head_nll grad {name} {n}x{d}x{v}"),
                gf.get(var).unwrap(),
                gc.get(var).unwrap(),
            );
        }
        assert_close(
            &format!("lm_head_nll dispatch {n}x{d}x{v}"),
            &ops::lm_head_nll(&h, &w, &tg, None).unwrap(),
            &yc,
        );
        // Announcing the gradient: computed in the forward, the same result. Announcing a
        // different one than comes back falls back to recomputing.
        let announced: Vec<f32> = flat(&rw);
        for (what, a) in [("announced", announced.clone()), ("wrong", vec![0.5; n])] {
            let y = fused::lm_head_nll(&h, &w, &tg, Some(a)).unwrap();
            assert_close(&format!("lm_head_nll {what} fwd"), &y, &yc);
            let g = weighted_sum(&y, &rw).backward().unwrap();
            for (name, var) in [("h", &h), ("w", &w)] {
                assert_close(
                    &format!("lm_head_nll {what} grad {name} {n}x{d}x{v}"),
                    g.get(var).unwrap(),
                    gc.get(var).unwrap(),
                );
            }
        }
    }
}

#[test]
fn linear_and_conv1d_on_a_16_bit_frozen_weight_equal_it_widened_to_f32() {
    let mut r = rng(14);
    let (k, out) = (9usize, 6usize);
    for dtype in [DType::BF16, DType::F16] {
        for transposed in [true, false] {
            for with_bias in [true, false] {
                if !transposed && !with_bias {
                    continue; // a GPT-2 Conv1D always has its bias
                }
                let what = format!("{dtype:?} t={transposed} bias={with_bias}");
                let (w16, w32) = weight_16_and_widened(&mut r, dtype, (k, out), transposed);
                let bias = tensor(randn(&mut r, out, 0.5), &[out]);
                let x =
                    Var::from_tensor(&tensor(randn(&mut r, 2 * 3 * k, 1.0), &[2, 3, k])).unwrap();
                let rw = tensor(randn(&mut r, 2 * 3 * out, 1.0), &[2, 3, out]);
                let run = |w: &Tensor| {
                    let y = match (transposed, with_bias) {
                        (true, true) => ops::linear(&x, w, Some(&bias)),
                        (true, false) => ops::linear(&x, w, None),
                        (false, _) => ops::conv1d(&x, w, &bias),
                    }
                    .unwrap();
                    let g = weighted_sum(&y, &rw).backward().unwrap();
                    (flat(&y), flat(g.get(&x).unwrap()))
                };
                // The same f32 values reach the same kernels: equal to the bit.
                assert_eq!(run(&w16), run(&w32), "{what}");
            }
        }
    }
    // A trainable bias next to a 16-bit frozen weight still gets its gradient.
    let w16 = tensor(randn(&mut r, k * out, 0.5), &[out, k])
        .to_dtype(DType::BF16)
        .unwrap();
    let bias = Var::from_tensor(&tensor(randn(&mut r, out, 0.5), &[out])).unwrap();
    let x = tensor(randn(&mut r, 3 * k, 1.0), &[3, k]);
    let y = ops::linear(&x, &w16, Some(bias.as_tensor())).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(flat(g.get(&bias).unwrap()), vec![3.0; out]);
}
