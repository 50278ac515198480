//! Row-parallel f32 kernels behind [`super::FusedOps`] on the CPU backend.

use rayon::prelude::*;

/// Elements per parallel task of the purely element-wise kernels.
const CHUNK: usize = 1 << 14;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Rows per parallel task for rows of `n` values: at least about `CHUNK` values.
fn min_rows(n: usize) -> usize {
    (CHUNK / n.max(1)).max(1)
}

/// `(y, rstd)` of RMSNorm over rows of `gamma.len()` values.
pub(super) fn rms_norm(x: &[f32], gamma: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = gamma.len();
    let mut y = vec![0f32; x.len()];
    let mut rstd = vec![0f32; x.len() / n];
    y.par_chunks_mut(n)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(n))
        .with_min_len(min_rows(n))
        .for_each(|((y, r), x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for ((y, x), g) in y.iter_mut().zip(x).zip(gamma) {
                *y = x * *r * g;
            }
        });
    (y, rstd)
}

/// `(dx, dgamma)` of RMSNorm: with `x̂ = x·rstd` and `ĝ = dy·gamma`,
/// `dx = rstd·(ĝ − x̂·mean(ĝ·x̂))` and `dgamma = Σ_rows dy·x̂`. `dgamma` is summed over fixed
/// blocks of rows, then block by block in order, so it does not depend on how rayon splits
/// the work (a run's weights stay reproducible).
pub(super) fn rms_norm_backward(
    x: &[f32],
    gamma: &[f32],
    rstd: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let n = gamma.len();
    let block = min_rows(n);
    let mut dx = vec![0f32; x.len()];
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(n * block)
        .zip(x.par_chunks(n * block))
        .zip(dy.par_chunks(n * block))
        .zip(rstd.par_chunks(block))
        .map(|(((dx, x), dy), rstd)| {
            let mut acc = vec![0f32; n];
            let rows = dx
                .chunks_mut(n)
                .zip(x.chunks(n))
                .zip(dy.chunks(n))
                .zip(rstd);
            for (((dx, x), dy), &r) in rows {
                let mut c = 0f32;
                for ((x, dy), g) in x.iter().zip(dy).zip(gamma) {
                    c += dy * g * x * r;
                }
                c /= n as f32;
                let cols = dx.iter_mut().zip(x).zip(dy).zip(gamma).zip(acc.iter_mut());
                for ((((dx, x), dy), g), a) in cols {
                    let xh = x * r;
                    *dx = r * (dy * g - xh * c);
                    *a += dy * xh;
                }
            }
            acc
        })
        .collect();
    let mut dgamma = vec![0f32; n];
    for p in &partial {
        dgamma.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    (dx, dgamma)
}

/// `silu(gate) · up`.
pub(super) fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut h = vec![0f32; gate.len()];
    h.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((h, g), u)| {
            for ((h, &g), u) in h.iter_mut().zip(g).zip(u) {
                *h = g * sigmoid(g) * u;
            }
        });
    h
}

/// `(dgate, dup)` of `silu(gate) · up`: `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`.
pub(super) fn swiglu_backward(gate: &[f32], up: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut dg, mut du) = (vec![0f32; gate.len()], vec![0f32; gate.len()]);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .zip(dh.par_chunks(CHUNK))
        .for_each(|((((dg, du), g), u), dh)| {
            for ((((dg, du), &g), u), dh) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dh)
            {
                let s = sigmoid(g);
                *du = dh * g * s;
                *dg = dh * u * s * (1.0 + g * (1.0 - s));
            }
        });
    (dg, du)
}

/// Rotary embedding of rows of `d` values, row `r` at position `r % seq` of the `[seq, d]`
/// tables: `y₁ = x₁·cos₁ − x₂·sin₁`, `y₂ = x₂·cos₂ + x₁·sin₂` (halves of a row). With
/// `transpose`, the map's transpose, which gives the input gradient:
/// `dx₁ = dy₁·cos₁ + dy₂·sin₂`, `dx₂ = dy₂·cos₂ − dy₁·sin₁`.
pub(super) fn rope(x: &[f32], cos: &[f32], sin: &[f32], d: usize, transpose: bool) -> Vec<f32> {
    let (half, seq) = (d / 2, cos.len() / d);
    let sign = if transpose { -1.0 } else { 1.0 };
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .with_min_len(min_rows(d))
        .for_each(|(r, (y, x))| {
            let p = (r % seq) * d;
            let (c, s) = (&cos[p..p + d], &sin[p..p + d]);
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            for j in 0..half {
                let (s1, s2) = if transpose {
                    (s[j + half], s[j])
                } else {
                    (s[j], s[j + half])
                };
                y1[j] = x1[j] * c[j] - sign * x2[j] * s1;
                y2[j] = x2[j] * c[j + half] + sign * x1[j] * s2;
            }
        });
    y
}

/// Log-softmax over rows of `n` values.
pub(super) fn log_softmax(x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .with_min_len(min_rows(n))
        .for_each(|(y, x)| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = x.iter().map(|v| (v - max).exp()).sum();
            let lse = max + sum.ln();
            y.iter_mut().zip(x).for_each(|(y, x)| *y = x - lse);
        });
    y
}

/// The input gradient of log-softmax: `dx = dy − exp(y)·Σdy` per row.
pub(super) fn log_softmax_backward(y: &[f32], dy: &[f32], n: usize) -> Vec<f32> {
    let mut dx = vec![0f32; y.len()];
    dx.par_chunks_mut(n)
        .zip(y.par_chunks(n))
        .zip(dy.par_chunks(n))
        .with_min_len(min_rows(n))
        .for_each(|((dx, y), dy)| {
            let s: f32 = dy.iter().sum();
            for ((dx, y), dy) in dx.iter_mut().zip(y).zip(dy) {
                *dx = dy - y.exp() * s;
            }
        });
    dx
}
