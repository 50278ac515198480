//! Refitting the kept weights once the mask is fixed: each output row's kept weights become
//! the least-squares reconstruction of the row's output on the calibration inputs,
//!
//! `min_w (w − w₀)ᵀ H (w − w₀)` with `w_j = 0` wherever the row was pruned,
//!
//! `H = Σ x xᵀ` dampened as SparseGPT's. SparseGPT's column sweep only approximates this optimum
//! (each column is fixed once, seeing the columns after it but never those before); Wanda and
//! magnitude do no update at all. Solved for all rows at once by conjugate gradients with a
//! Jacobi preconditioner, one `[rows, cols] × [cols, cols]` product per iteration, starting from
//! the pruned weights (the idea of updating the weights of a fixed mask by a solver rather
//! than a sweep is Boža, 2024, "Fast and Effective Weight Update for Pruned Large Language
//! Models", which uses ADMM; CG needs no penalty schedule).
//!
//! Hand-written rather than a sparse solver crate: every row has its own mask but all rows
//! share `H`, so the batched product is the whole cost and faer's dense matmul does it.

use faer::{Mat, MatRef};

use crate::PruneError;

/// Refits the non-zero weights of `w` `[rows, cols]` (pruned from `w0`) to reconstruct
/// `x w0ᵀ` on inputs with `Σ x xᵀ = h` `[cols, cols]`, with `iters` conjugate-gradient steps.
/// Exact zeros of `w` stay exact zeros. `damp` is the fraction of the mean diagonal added to
/// it (as SparseGPT's dampening).
pub fn refit(
    name: &str,
    w0: &[f32],
    w: &mut [f32],
    (rows, cols): (usize, usize),
    h: &[f32],
    damp: f64,
    iters: usize,
) -> Result<(), PruneError> {
    if w0.len() != rows * cols || w.len() != rows * cols || h.len() != cols * cols {
        return Err(PruneError::Input(format!(
            "`{name}`: refit shapes disagree ({} and {} weights, {} Hessian entries for {rows} x {cols})",
            w0.len(),
            w.len(),
            h.len()
        )));
    }
    if iters == 0 || rows == 0 || cols == 0 {
        return Ok(());
    }
    // Dead inputs (never active) get a unit diagonal: their weights then simply keep w0. An
    // input with a zero diagonal has a zero row and column (H is a Gram matrix), so the
    // dampened H is H plus a diagonal `shift`, applied beside the product instead of copying H.
    let hii = |i: usize| h[i * cols + i] as f64;
    let diag_mean = (0..cols)
        .map(|i| if hii(i) > 0.0 { hii(i) } else { 1.0 })
        .sum::<f64>()
        / cols as f64;
    let add = damp * diag_mean;
    let shift: Vec<f32> = (0..cols)
        .map(|i| (add + if hii(i) > 0.0 { 0.0 } else { 1.0 }) as f32)
        .collect();
    let op = Dampened {
        h: MatRef::from_row_major_slice(h, cols, cols),
        shift: &shift,
    };
    let pre: Vec<f32> = (0..cols).map(|j| h[j * cols + j] + shift[j]).collect();
    // Rows are independent problems sharing H: solve them in chunks so the six [rows, cols]
    // work matrices stay near 256 MiB whatever the layer (a 7B down_proj is 4096 x 11008).
    let chunk = (REFIT_CHUNK_BYTES / (6 * 4 * cols)).clamp(1, rows);
    for (w0c, wc) in w0.chunks(chunk * cols).zip(w.chunks_mut(chunk * cols)) {
        solve_rows(name, w0c, wc, cols, &op, &pre, iters)?;
    }
    Ok(())
}

/// Bytes of CG work matrices one chunk of rows may hold.
const REFIT_CHUNK_BYTES: usize = 256 << 20;

/// `H + diag(shift)`, applied to rows.
struct Dampened<'a> {
    h: MatRef<'a, f32>,
    shift: &'a [f32],
}

impl Dampened<'_> {
    /// `a (H + diag(shift))`.
    fn apply(&self, a: &Mat<f32>) -> Mat<f32> {
        let mut out = Mat::<f32>::zeros(a.nrows(), self.h.ncols());
        faer::linalg::matmul::matmul(
            out.as_mut(),
            faer::Accum::Replace,
            a.as_ref(),
            self.h,
            1.0,
            faer::Par::rayon(0),
        );
        for (c, &s) in self.shift.iter().enumerate() {
            for r in 0..a.nrows() {
                out[(r, c)] += s * a[(r, c)];
            }
        }
        out
    }
}

/// Conjugate gradients for the rows of `w` (`w0` the unpruned ones) against the dampened
/// Hessian `op` with Jacobi preconditioner `pre`.
fn solve_rows(
    name: &str,
    w0: &[f32],
    w: &mut [f32],
    cols: usize,
    op: &Dampened<'_>,
    pre: &[f32],
    iters: usize,
) -> Result<(), PruneError> {
    let rows = w.len() / cols;
    let mask = Mat::<f32>::from_fn(
        rows,
        cols,
        |r, c| {
            if w[r * cols + c] != 0.0 { 1.0 } else { 0.0 }
        },
    );
    // d = w − w0 (on the mask; off it w is 0, so d = −w0 there and stays so).
    let mut d = Mat::<f32>::from_fn(rows, cols, |r, c| w[r * cols + c] - w0[r * cols + c]);
    // Residual of the normal equations on the mask: r = −(d H) ∘ mask.
    let mut res = op.apply(&d);
    for c in 0..cols {
        for r in 0..rows {
            res[(r, c)] *= -mask[(r, c)];
        }
    }
    let mut z = Mat::<f32>::from_fn(rows, cols, |r, c| res[(r, c)] / pre[c]);
    let mut p = z.clone();
    let mut rz = row_dots(&res, &z);
    for _ in 0..iters {
        let q = op.apply(&p);
        let pq = row_dots(&p, &q);
        let alpha: Vec<f32> = (0..rows)
            .map(|r| {
                if pq[r] > 0.0 && rz[r] > 0.0 {
                    (rz[r] / pq[r]) as f32
                } else {
                    0.0
                }
            })
            .collect();
        for c in 0..cols {
            for r in 0..rows {
                d[(r, c)] += alpha[r] * p[(r, c)];
                res[(r, c)] -= alpha[r] * q[(r, c)] * mask[(r, c)];
                z[(r, c)] = res[(r, c)] / pre[c];
            }
        }
        let rz_new = row_dots(&res, &z);
        for c in 0..cols {
            for r in 0..rows {
                let beta = if rz[r] > 0.0 {
                    (rz_new[r] / rz[r]) as f32
                } else {
                    0.0
                };
                p[(r, c)] = z[(r, c)] + beta * p[(r, c)];
            }
        }
        rz = rz_new;
        if rz.iter().all(|&x| x <= 0.0) {
            break;
        }
    }
    for r in 0..rows {
        for c in 0..cols {
            if mask[(r, c)] != 0.0 {
                let v = w0[r * cols + c] + d[(r, c)];
                if !v.is_finite() {
                    return Err(PruneError::Numerical(format!(
                        "`{name}`: the refit produced a non-finite weight"
                    )));
                }
                // A refitted weight that lands on exactly 0 would read as pruned.
                w[r * cols + c] = if v == 0.0 { f32::MIN_POSITIVE } else { v };
            }
        }
    }
    Ok(())
}

/// Per-row dot products, accumulated in f64.
fn row_dots(a: &Mat<f32>, b: &Mat<f32>) -> Vec<f64> {
    let mut out = vec![0.0f64; a.nrows()];
    for c in 0..a.ncols() {
        for (r, o) in out.iter_mut().enumerate() {
            *o += a[(r, c)] as f64 * b[(r, c)] as f64;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::linalg::solvers::Solve;

    /// ‖X (w − w0)ᵀ‖² through h = XᵀX.
    fn err(w0: &[f32], w: &[f32], rows: usize, cols: usize, h: &[f32]) -> f64 {
        (0..rows)
            .map(|r| {
                let d: Vec<f64> = (0..cols)
                    .map(|c| (w[r * cols + c] - w0[r * cols + c]) as f64)
                    .collect();
                (0..cols)
                    .flat_map(|i| (0..cols).map(move |j| (i, j)))
                    .map(|(i, j)| d[i] * h[i * cols + j] as f64 * d[j])
                    .sum::<f64>()
            })
            .sum()
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn refit_reaches_the_masked_least_squares_optimum_and_keeps_the_zeros() {
        let (rows, cols, n) = (6, 16, 64);
        let mut s = 7u64;
        // Correlated inputs, so that moving kept weights can compensate for pruned ones.
        let base: Vec<f32> = (0..n * cols).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..n * cols)
            .map(|i| base[i] + 0.8 * base[(i / cols) * cols])
            .collect();
        let mut h = vec![0.0f32; cols * cols];
        for t in 0..n {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += x[t * cols + i] * x[t * cols + j];
                }
            }
        }
        let w0: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
        let mut w = w0.clone();
        for (i, v) in w.iter_mut().enumerate() {
            if i % 2 == 0 {
                *v = 0.0;
            }
        }
        let before = err(&w0, &w, rows, cols, &h);
        let mut fit = w.clone();
        refit("t", &w0, &mut fit, (rows, cols), &h, 1e-6, 50).unwrap();
        let after = err(&w0, &fit, rows, cols, &h);
        // The optimum, row by row: H_KK d_K = −H_KP d_P on the kept set K (dampening as used).
        let mut best = w.clone();
        let add = 1e-6 * (0..cols).map(|i| h[i * cols + i] as f64).sum::<f64>() / cols as f64;
        for r in 0..rows {
            let k: Vec<usize> = (0..cols)
                .filter(|c| c % 2 == 1 || (r * cols + c) % 2 == 1)
                .collect();
            let hk = Mat::<f64>::from_fn(k.len(), k.len(), |i, j| {
                h[k[i] * cols + k[j]] as f64 + if i == j { add } else { 0.0 }
            });
            let rhs = Mat::<f64>::from_fn(k.len(), 1, |i, _| {
                (0..cols)
                    .filter(|c| !k.contains(c))
                    .map(|c| h[k[i] * cols + c] as f64 * w0[r * cols + c] as f64)
                    .sum::<f64>()
            });
            let sol = hk.llt(faer::Side::Lower).unwrap().solve(&rhs);
            for (i, &c) in k.iter().enumerate() {
                best[r * cols + c] = (w0[r * cols + c] as f64 + sol[(i, 0)]) as f32;
            }
        }
        let opt = err(&w0, &best, rows, cols, &h);
        assert!(opt < before);
        assert!(
            (after - opt).abs() <= 1e-3 * opt,
            "refit error {after}, optimum {opt}, pruned {before}"
        );
        for (i, v) in fit.iter().enumerate() {
            assert_eq!(*v == 0.0, i % 2 == 0, "zero pattern changed at {i}");
        }
        // Rows are independent (what the chunked solve relies on): row by row gives the same.
        for r in 0..rows {
            let mut one = w[r * cols..(r + 1) * cols].to_vec();
            refit(
                "t",
                &w0[r * cols..(r + 1) * cols],
                &mut one,
                (1, cols),
                &h,
                1e-6,
                50,
            )
            .unwrap();
            for (c, v) in one.iter().enumerate() {
                let f = fit[r * cols + c];
                assert!(
                    (v - f).abs() <= 1e-4 * f.abs().max(1e-2),
                    "row {r} col {c}: {v} vs {f}"
                );
            }
        }
        // Optimal: a small step of any kept weight in either direction does not help.
        for k in [1, 3, 17] {
            for step in [1e-3f32, -1e-3] {
                let mut p = fit.clone();
                p[k] += step;
                assert!(err(&w0, &p, rows, cols, &h) >= after * (1.0 - 1e-5));
            }
        }
    }
}
