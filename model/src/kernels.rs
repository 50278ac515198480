//! CPU kernels of the decoder ([`crate::decode`]): a linear's matrix product split over
//! rayon's threads in fixed slices of output rows, and dot products with AVX2/FMA where the
//! CPU has them. Written by hand because the release build targets baseline x86-64 (burn's
//! and gemm's kernels dispatch at run time, but gemm packs the weights on every call, which
//! costs a second pass over them when only a few rows are multiplied).

use rayon::prelude::*;

/// Output rows per matrix-product call: a fixed split, so results do not depend on threads.
const ROWS_PER_TASK: usize = 128;
/// Up to this many input rows (single-sequence decoding, a few sequences), a linear is dot
/// products over the weight rows; more (batched decoding, a prompt) go to the gemm kernels,
/// whose register blocking wins once the rows are many: 32 sequences decode 19% faster than
/// with dot products (BENCHMARKS.md, "Generation speed").
const DOT_ROWS: usize = 8;

/// `x [m, k] · wᵀ` for `w [n, k]` (both row-major), plus `bias [n]`: `[m, n]` row-major.
pub(crate) fn matmul_t(
    x: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let j0 = t * ROWS_PER_TASK;
            let cols = ROWS_PER_TASK.min(n - j0);
            let mut dst = vec![0f32; m * cols];
            if m <= DOT_ROWS {
                // Decoding (one row per sequence): one pass over the weight rows, each dotted
                // with every input row, four at a time; gemm's packing would copy every
                // weight once more per call.
                for (jj, wj) in w[j0 * k..(j0 + cols) * k].chunks_exact(k).enumerate() {
                    let mut r = 0;
                    while r + 4 <= m {
                        let d = dot4(&x[r * k..(r + 4) * k], wj);
                        for (i, v) in d.into_iter().enumerate() {
                            dst[(r + i) * cols + jj] = v;
                        }
                        r += 4;
                    }
                    for r in r..m {
                        dst[r * cols + jj] = dot(&x[r * k..(r + 1) * k], wj);
                    }
                }
            } else {
                // SAFETY: dst is [m, cols] row-major (column stride 1, row stride cols); x is
                // [m, k] row-major; the rhs is rows j0..j0+cols of w read as the [k, cols] matrix
                // wᵀ (row stride 1, column stride k). Every index stays inside the slices above.
                unsafe {
                    gemm::gemm(
                        m,
                        cols,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        cols as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        w[j0 * k..].as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            if let Some(b) = bias {
                for row in dst.chunks_mut(cols) {
                    for (o, bj) in row.iter_mut().zip(&b[j0..j0 + cols]) {
                        *o += bj;
                    }
                }
            }
            dst
        })
        .collect();
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    let mut y = vec![0f32; m * n];
    for (t, part) in parts.iter().enumerate() {
        let j0 = t * ROWS_PER_TASK;
        let cols = part.len() / m.max(1);
        for r in 0..m {
            y[r * n + j0..r * n + j0 + cols].copy_from_slice(&part[r * cols..(r + 1) * cols]);
        }
    }
    y
}

/// `a · b`, with AVX2 and FMA where the CPU has them (checked once at run time; the release
/// build targets baseline x86-64, whose SSE2 loop is several times slower here).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_plain(a, b)
}

/// The dot products of four rows `x [4, k]` with `w [k]`, as [`dot`] computes each.
fn dot4(x: &[f32], w: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot4_avx2(x, w) };
        }
    }
    dot4_plain(x, w)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot4_avx2(x: &[f32], w: &[f32]) -> [f32; 4] {
    dot4_plain(x, w)
}

/// Four [`dot_plain`]s sharing each load of `w`: the same partial sums in the same order,
/// so a row's result does not depend on whether it went through here or alone.
#[inline(always)]
fn dot4_plain(x: &[f32], w: &[f32]) -> [f32; 4] {
    let k = w.len();
    let (x0, rest) = x.split_at(k);
    let (x1, rest) = rest.split_at(k);
    let (x2, x3) = rest.split_at(k);
    // Four named accumulators (not an array of arrays), so they stay in vector registers.
    let (mut a0, mut a1, mut a2, mut a3) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
    let full = k - k % 16;
    for c in (0..full).step_by(16) {
        let wc: &[f32; 16] = w[c..c + 16].try_into().unwrap();
        let c0: &[f32; 16] = x0[c..c + 16].try_into().unwrap();
        let c1: &[f32; 16] = x1[c..c + 16].try_into().unwrap();
        let c2: &[f32; 16] = x2[c..c + 16].try_into().unwrap();
        let c3: &[f32; 16] = x3[c..c + 16].try_into().unwrap();
        for i in 0..16 {
            a0[i] = c0[i].mul_add(wc[i], a0[i]);
            a1[i] = c1[i].mul_add(wc[i], a1[i]);
            a2[i] = c2[i].mul_add(wc[i], a2[i]);
            a3[i] = c3[i].mul_add(wc[i], a3[i]);
        }
    }
    let fin = |a: &[f32; 16], xr: &[f32]| {
        let tail: f32 = xr[full..].iter().zip(&w[full..]).map(|(p, q)| p * q).sum();
        a.iter().sum::<f32>() + tail
    };
    [fin(&a0, x0), fin(&a1, x1), fin(&a2, x2), fin(&a3, x3)]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_plain(a, b)
}

/// Sixteen partial sums, so the compiler vectorizes the loop (and the result does not depend
/// on which of the two versions ran: the same sums in the same order).
#[inline(always)]
fn dot_plain(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        let (x, y): (&[f32; 16], &[f32; 16]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// Every path (dot products for a few rows, four rows at a time, gemm for many) gives the
    /// product of an f64 reference, bias included; a row's result is the same in any path.
    #[test]
    fn products_match_a_reference_in_every_path() {
        let (n, k) = (300, 77);
        let w = filled(n * k, 1);
        let bias = filled(n, 2);
        for m in [1, 3, 4, 9, DOT_ROWS + 6] {
            let x = filled(m * k, 3);
            let y = matmul_t(&x, m, &w, n, k, Some(&bias));
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = bias[j] as f64
                        + (0..k)
                            .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                            .sum::<f64>();
                    let got = y[r * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "m {m} row {r} col {j}: {got} vs {want}"
                    );
                }
            }
        }
        let x = filled(4 * k, 5);
        let four = dot4(&x, &w[..k]);
        for (r, v) in four.iter().enumerate() {
            assert_eq!(*v, dot(&x[r * k..(r + 1) * k], &w[..k]));
        }
    }
}
