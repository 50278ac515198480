//! CPU kernels of the decoder ([`crate::decode`]): a linear's matrix product split over
//! rayon's threads in fixed slices of output rows, and dot products with AVX2/FMA where the
//! CPU has them. Written by hand because the release build targets baseline x86-64 (burn's
//! and gemm's kernels dispatch at run time, but gemm packs the weights on every call, which
//! costs a second pass over them when only a few rows are multiplied).

use rayon::prelude::*;

/// Output rows per matrix-product call: a fixed split, so results do not depend on threads.
const ROWS_PER_TASK: usize = 128;
/// Up to this many input rows (decoding one or many sequences), a linear is dot products
/// over the weight rows, four weight rows by four input rows at a time ([`dot4x4_avx512`]); more (a
/// prompt) go to the gemm kernels. gemm packs the weights on every call, a second pass over
/// them that costs 40% of a 32-sequence decoding step (BENCHMARKS.md, "Generation speed").
const DOT_ROWS: usize = 64;
/// Weight rows one input row meets in one pass when decoding one to three rows (AVX-512): eight
/// streams through memory at once instead of one, 25-35% more tokens/s than one weight row
/// at a time on SmolLM2 (BENCHMARKS.md, "Generation speed"); 4 and 16 measured about the same.
const STREAM_ROWS: usize = 8;
/// The same with AVX2, whose 16 registers hold four rows' sixteen partial sums each.
const STREAM_ROWS_AVX2: usize = 4;

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
            if m <= dot_rows() {
                // Decoding (one row per sequence): one pass over the weight rows; the input
                // rows stay in cache.
                dots(x, m, &w[j0 * k..(j0 + cols) * k], cols, k, &mut dst);
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

/// `dst [m, cols] = x [m, k] · wᵀ` for `w [cols, k]`: with four or more rows and AVX-512,
/// tiles of four weight rows by four input rows ([`dot4x4_avx512`]); with one to three rows,
/// groups of weight rows per input row ([`stream_rows`]); the rest one weight row at a time
/// against four input rows ([`dot4`]) or one ([`dot`]). Every entry is exactly [`dot`] of its
/// two rows, whichever path computed it.
fn dots(x: &[f32], m: usize, w: &[f32], cols: usize, k: usize, dst: &mut [f32]) {
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if m >= 4 && has_avx512() {
        while j + 4 <= cols {
            let wq = &w[j * k..(j + 4) * k];
            let mut r = 0;
            while r + 4 <= m {
                // SAFETY: the CPU supports the features the function is compiled for.
                let t = unsafe { dot4x4_avx512(&x[r * k..(r + 4) * k], wq) };
                for (a, row) in t.iter().enumerate() {
                    dst[(r + a) * cols + j..(r + a) * cols + j + 4].copy_from_slice(row);
                }
                r += 4;
            }
            for r in r..m {
                for (b, wj) in wq.chunks_exact(k).enumerate() {
                    dst[r * cols + j + b] = dot(&x[r * k..(r + 1) * k], wj);
                }
            }
            j += 4;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if m < 4 {
        j = stream_rows(x, m, w, cols, k, dst);
    }
    // The weight rows left (all of them without AVX2), one at a time.
    for (jj, wj) in w[j * k..cols * k].chunks_exact(k).enumerate() {
        let mut r = 0;
        while r + 4 <= m {
            let d = dot4(&x[r * k..(r + 4) * k], wj);
            for (i, v) in d.into_iter().enumerate() {
                dst[(r + i) * cols + j + jj] = v;
            }
            r += 4;
        }
        for r in r..m {
            dst[r * cols + j + jj] = dot(&x[r * k..(r + 1) * k], wj);
        }
    }
}

/// The sixteen dot products of four rows `x [4, k]` with four rows `w [4, k]`, as `[x row][w
/// row]`, each exactly as [`dot`] computes it: every load of `x` and `w` feeds four products,
/// so the loop is bound by the multiply-adds, not by the loads. AVX-512 only (its 32
/// registers hold the 16 accumulators; with AVX2's 16 they spill, and [`dots`] is not used).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn dot4x4_avx512(x: &[f32], w: &[f32]) -> [[f32; 4]; 4] {
    use std::arch::x86_64::*;
    let k = x.len() / 4;
    assert!(
        x.len() == 4 * k && w.len() == 4 * k,
        "dot4x4: four rows of one length"
    );
    let full = k - k % 16;
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut c = 0;
    while c < full {
        // SAFETY: c + 16 <= full <= k, so every load reads inside row r of x or w.
        unsafe {
            let wv = [0, 1, 2, 3].map(|b| _mm512_loadu_ps(wp.add(b * k + c)));
            for (a, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(xp.add(a * k + c));
                for (b, v) in row.iter_mut().enumerate() {
                    *v = _mm512_fmadd_ps(xv, wv[b], *v);
                }
            }
        }
        c += 16;
    }
    // The same reduction as dot_plain (the 16 partial sums in order, then the tail), for all
    // sixteen products at once.
    let sums = sum_lanes16(std::array::from_fn(|t| acc[t / 4][t % 4]));
    std::array::from_fn(|a| {
        std::array::from_fn(|b| {
            sums[a * 4 + b] + tail(&x[a * k..(a + 1) * k], &w[b * k..(b + 1) * k], full)
        })
    })
}

/// Each register's 16 lanes added in order, as [`dot_plain`] adds its partial sums: the
/// sixteen registers transposed (lane `i` of every register into register `i`), then added
/// register by register, so one vector add does one step of all sixteen sums. Written out
/// because the plain loop sums one register at a time (a third of a four-by-four tile's time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_lanes16(v: [std::arch::x86_64::__m512; 16]) -> [f32; 16] {
    use std::arch::x86_64::*;
    let (ps, pd) = (_mm512_castpd_ps, _mm512_castps_pd);
    // Pairs of rows interleaved: in each 128-bit block, elements 0-1 (lo) or 2-3 (hi) of both.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (v[i & !1], v[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4g + e]: in block q, element 4q + e of rows 4g..4g + 4.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, e) = (i / 4, i % 4);
        let (a, b) = (pd(t[4 * g + e / 2]), pd(t[4 * g + 2 + e / 2]));
        ps(if e % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // Transpose the 128-bit blocks: column 4q + e takes block q of u[4g + e] for each g.
    let mut cols = [_mm512_setzero_ps(); 16];
    for e in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x44>(u[e], u[4 + e]);
        let v1 = _mm512_shuffle_f32x4::<0xEE>(u[e], u[4 + e]);
        let v2 = _mm512_shuffle_f32x4::<0x44>(u[8 + e], u[12 + e]);
        let v3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + e], u[12 + e]);
        cols[e] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
        cols[4 + e] = _mm512_shuffle_f32x4::<0xDD>(v0, v2);
        cols[8 + e] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
        cols[12 + e] = _mm512_shuffle_f32x4::<0xDD>(v1, v3);
    }
    // `Iterator::sum`'s own starting value, so even the sign of a zero sum is the same.
    let mut s = _mm512_set1_ps(std::iter::empty::<f32>().sum());
    for c in cols {
        s = _mm512_add_ps(s, c);
    }
    let mut out = [0f32; 16];
    // SAFETY: out holds 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), s) };
    out
}

/// The `R` dot products of one row `x [k]` with `R` rows `w [R, k]`, each exactly as [`dot`]
/// computes it (one register of 16 partial sums per weight row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn dot1xr_avx512<const R: usize>(x: &[f32], w: &[f32]) -> [f32; R] {
    use std::arch::x86_64::*;
    let k = x.len();
    assert!(w.len() == R * k, "dot1xr: R rows of x's length");
    let full = k - k % 16;
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [_mm512_setzero_ps(); R];
    let mut c = 0;
    while c < full {
        // SAFETY: c + 16 <= full <= k, so every load reads inside x or row b of w.
        unsafe {
            let xv = _mm512_loadu_ps(xp.add(c));
            for (b, v) in acc.iter_mut().enumerate() {
                *v = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wp.add(b * k + c)), *v);
            }
        }
        c += 16;
    }
    std::array::from_fn(|b| {
        let mut lanes = [0f32; 16];
        // SAFETY: lanes holds 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[b]) };
        reduce(&lanes, x, &w[b * k..(b + 1) * k], full)
    })
}

/// Decoding one to three input rows: the weight rows [`STREAM_ROWS`] at a time, each input
/// row against all of them in one pass ([`dot1xr_avx512`], [`dot1xr_avx2`]). Returns how
/// many weight rows it did (a multiple of the group; none without AVX2).
#[cfg(target_arch = "x86_64")]
fn stream_rows(x: &[f32], m: usize, w: &[f32], cols: usize, k: usize, dst: &mut [f32]) -> usize {
    let (wide, r) = if has_avx512() {
        (true, STREAM_ROWS)
    } else if has_avx2_fma() {
        (false, STREAM_ROWS_AVX2)
    } else {
        return 0;
    };
    let mut j = 0;
    while j + r <= cols {
        let wq = &w[j * k..(j + r) * k];
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let out = &mut dst[i * cols + j..i * cols + j + r];
            // SAFETY: the CPU has the features each kernel is compiled for (checked above).
            unsafe {
                if wide {
                    out.copy_from_slice(&dot1xr_avx512::<STREAM_ROWS>(xi, wq));
                } else {
                    out.copy_from_slice(&dot1xr_avx2::<STREAM_ROWS_AVX2>(xi, wq));
                }
            }
        }
        j += r;
    }
    j
}

/// As [`dot1xr_avx512`] with AVX2: two registers of eight partial sums per weight row (the
/// same sixteen sums as [`dot`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot1xr_avx2<const R: usize>(x: &[f32], w: &[f32]) -> [f32; R] {
    use std::arch::x86_64::*;
    let k = x.len();
    assert!(w.len() == R * k, "dot1xr: R rows of x's length");
    let full = k - k % 16;
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    let mut c = 0;
    while c < full {
        // SAFETY: c + 16 <= full <= k, so every load reads inside x or row b of w.
        unsafe {
            let (xl, xh) = (_mm256_loadu_ps(xp.add(c)), _mm256_loadu_ps(xp.add(c + 8)));
            for b in 0..R {
                let row = wp.add(b * k + c);
                lo[b] = _mm256_fmadd_ps(xl, _mm256_loadu_ps(row), lo[b]);
                hi[b] = _mm256_fmadd_ps(xh, _mm256_loadu_ps(row.add(8)), hi[b]);
            }
        }
        c += 16;
    }
    std::array::from_fn(|b| {
        let mut lanes = [0f32; 16];
        // SAFETY: lanes holds 16 floats, eight per store.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), lo[b]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi[b]);
        }
        reduce(&lanes, x, &w[b * k..(b + 1) * k], full)
    })
}

/// The end of every dot product here, vector kernels and [`dot_plain`] alike: the 16 partial
/// sums added in order, then the products past the last whole 16 (`full` on) added to them.
#[inline(always)]
fn reduce(lanes: &[f32; 16], x: &[f32], w: &[f32], full: usize) -> f32 {
    lanes.iter().sum::<f32>() + tail(x, w, full)
}

/// The products past the last whole 16 (`full` on), in order.
#[inline(always)]
fn tail(x: &[f32], w: &[f32], full: usize) -> f32 {
    x[full..].iter().zip(&w[full..]).map(|(p, q)| p * q).sum()
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma"))
}

/// How many input rows go through dot products ([`dots`]) rather than gemm: [`DOT_ROWS`]
/// with AVX-512, else 8 (without the four-by-four tiles, gemm's register blocking wins from
/// 9 rows).
fn dot_rows() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            return DOT_ROWS;
        }
    }
    8
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
    [
        reduce(&a0, x0, w, full),
        reduce(&a1, x1, w, full),
        reduce(&a2, x2, w, full),
        reduce(&a3, x3, w, full),
    ]
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
    debug_assert_eq!(ra.len(), rb.len(), "dot: rows of one length");
    reduce(&acc, a, b, a.len() - ra.len())
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

    /// Every path (dot products for a few rows, four-by-four tiles, gemm for many) gives the
    /// product of an f64 reference, bias included; a row's result is the same in any path,
    /// and a decoding product's rows equal the one-row product's whatever the batch.
    /// Breakage caught: the tile summing its 16 lanes in reverse (the equality failed); the
    /// streaming kernel with its lanes summed in reverse likewise.
    #[test]
    fn products_match_a_reference_in_every_path() {
        let (n, k) = (300, 77);
        let w = filled(n * k, 1);
        let bias = filled(n, 2);
        for m in [1, 3, 4, 9, 13, DOT_ROWS + 6] {
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
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // With a tail (77) and without (64: only the transposed lane sums).
            for k in [k, 64] {
                let x = filled(4 * k, 5);
                // SAFETY: checked just above.
                let tile = unsafe { dot4x4_avx512(&x, &w[..4 * k]) };
                for (r, row) in tile.iter().enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        let want = dot(&x[r * k..(r + 1) * k], &w[j * k..(j + 1) * k]);
                        assert_eq!(*v, want, "k {k} x row {r} w row {j}");
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            let w8 = &w[..STREAM_ROWS * k];
            let check = |got: &[f32]| {
                for (j, v) in got.iter().enumerate() {
                    assert_eq!(*v, dot(&x[..k], &w[j * k..(j + 1) * k]), "weight row {j}");
                }
            };
            if has_avx512() {
                // SAFETY: checked just above.
                check(&unsafe { dot1xr_avx512::<STREAM_ROWS>(&x[..k], w8) });
            }
            if has_avx2_fma() {
                // SAFETY: checked just above.
                check(&unsafe {
                    dot1xr_avx2::<STREAM_ROWS_AVX2>(&x[..k], &w8[..STREAM_ROWS_AVX2 * k])
                });
            }
        }
        // Every row of a decoding product is the one-row product's, whatever the batch.
        for m in [2, 5, 8, 13, DOT_ROWS]
            .into_iter()
            .filter(|&m| m <= dot_rows())
        {
            let x = filled(m * k, 7);
            let y = matmul_t(&x, m, &w, n, k, None);
            for r in 0..m {
                let one = matmul_t(&x[r * k..(r + 1) * k], 1, &w, n, k, None);
                assert_eq!(&y[r * n..(r + 1) * n], &one[..], "m {m} row {r}");
            }
        }
    }
}
