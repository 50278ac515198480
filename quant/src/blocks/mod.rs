//! GGUF block quantizers: f32 rows to the block formats declared in
//! [`model::gguf::blocks`] (whose `dequantize` is the inverse).
//!
//! * Legacy 32-wide formats ([`legacy`]): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1. Without importance
//!   they are byte-identical to PyPI gguf's `gguf.quants.quantize` (which mirrors ggml's
//!   reference `quantize_row_*_ref`, computed in f32): checked by `quant/tests/fixtures.rs` and
//!   `scripts/check_gguf_quants.py`.
//! * K formats ([`kquants`]): Q4_K, Q5_K (per 32-value sub-block a weighted least-squares
//!   search over scale and minimum, then 6-bit sub-scales) and Q6_K (per 16-value sub-block a
//!   search over symmetric scales, then 8-bit sub-scales): the semantics of ggml's reference
//!   quantizers, written from their description. gguf-py cannot quantize these, so they are
//!   checked by round-trip error and by gguf-py dequantizing our bytes to our values.
//! * Q3_K ([`q3k`]): per 16-value sub-block a symmetric 3-bit scale search (ggml's
//!   `make_q3_quants`), then 6-bit sub-scales; checked the same way.
//! * [`grid`]: a block with its header fixed, for GPTQ's rounding into any of these types.
//! * IQ4_NL ([`iq4nl`]): 32 indices into a fixed non-uniform codebook and an f16 scale, found by
//!   a weighted scale search (the closest GGUF type to NF4); checked the same way.
//!
//! **Pruned tensors** (at least 1/8 exact zeros) keep every zero exactly in every type but
//! IQ4_NL (whose codebook has no zero level; see [`iq4nl`]): the
//! symmetric types do so by construction; Q4_1/Q5_1 use an integer zero point with a scale
//! short enough that the minimum is exact, and Q4_K/Q5_K a zero point per sub-block with
//! `dmin = d * 2^k` ([`kquants`]). Dense tensors are untouched by this.
//!
//! **Importance** (`Some(w)`, one weight per input column, e.g. E[x_j^2] from calibration):
//! each block's scale (and minimum) is chosen by a small search that minimises
//! `sum_j w_j (x_j - deq_j)^2`; the plain (reference) block is always a candidate and the block
//! with the lower weighted error after f16 rounding of the scales is kept, so the weighted
//! error never exceeds that of plain rounding. [`quantize`] floors the weights at 1e-3 of
//! their row mean so a column calibration never saw still gets a sane code.

pub mod grid;
pub mod iq4nl;
pub mod kquants;
pub mod legacy;
pub mod q3k;

use half::f16;
use model::gguf::GgmlType;
use model::gguf::blocks::GgmlBlock;
use rayon::prelude::*;

/// Why a tensor cannot be quantized as asked.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BlockError {
    /// No quantizer for this type.
    #[error("cannot quantize to {0}")]
    Unsupported(&'static str),
    /// Rows do not split into whole blocks.
    #[error("row length {row} is not a multiple of the {ty} block size {block}")]
    RowLength {
        /// Row length.
        row: usize,
        /// Type name.
        ty: &'static str,
        /// Block size.
        block: usize,
    },
    /// The data is not a whole number of rows.
    #[error("{len} values are not a whole number of rows of {row}")]
    Shape {
        /// Number of values.
        len: usize,
        /// Row length.
        row: usize,
    },
    /// The importance vector does not have one weight per column.
    #[error("importance has {got} values, rows have {row}")]
    Importance {
        /// Its length.
        got: usize,
        /// Row length.
        row: usize,
    },
}

/// A block quantizer for one GGML type.
pub trait BlockQuantizer {
    /// The block layout.
    type Block: GgmlBlock;
    /// The GGML type written.
    const TYPE: GgmlType;

    /// The GGML type written.
    fn ty() -> GgmlType {
        Self::TYPE
    }

    /// Quantizes one block of `Self::Block::BLOCK` values; `importance`, when given, has the
    /// same length and weights each value's squared error.
    fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> Self::Block;

    /// As [`Self::quantize_block`], but every exact zero of `x` decodes to exactly 0 (for
    /// pruned weights). The default suits formats whose reference already does so (the
    /// symmetric ones: a zero rounds to the level that decodes to 0).
    fn quantize_block_keep_zeros(x: &[f32], importance: Option<&[f32]>) -> Self::Block {
        Self::quantize_block(x, importance)
    }

    /// Quantizes one row (a whole number of blocks) into `out` (the row's bytes).
    fn quantize_row(x: &[f32], importance: Option<&[f32]>, keep_zeros: bool, out: &mut [u8]) {
        let n = Self::Block::BLOCK;
        let size = std::mem::size_of::<Self::Block>();
        debug_assert_eq!(x.len() / n * size, out.len());
        for (b, (xb, ob)) in x
            .chunks_exact(n)
            .zip(out.chunks_exact_mut(size))
            .enumerate()
        {
            let w = importance.map(|w| &w[b * n..(b + 1) * n]);
            let block = if keep_zeros {
                Self::quantize_block_keep_zeros(xb, w)
            } else {
                Self::quantize_block(xb, w)
            };
            ob.copy_from_slice(bytemuck::bytes_of(&block));
        }
    }
}

/// ggml's `nearest_int`: round half to even. Adding 1.5 * 2^23 leaves the rounded integer in
/// the low mantissa bits (exact for |x| < 2^22), which avoids a libm call on CPUs targets
/// without SSE4.1 rounding instructions.
#[inline]
pub(crate) fn nearest_int(x: f32) -> i32 {
    if x.abs() < 4_194_304.0 {
        ((x + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
    } else {
        x.round_ties_even() as i32
    }
}

/// `roundf` (half away from zero) in the form gguf-py computes it (`np_roundf`), exact for
/// every finite f32 that fits an i32.
#[inline]
pub(crate) fn round_away(x: f32) -> i32 {
    let a = x.abs();
    let f = a as i32;
    let r = if a - f as f32 >= 0.5 { f + 1 } else { f };
    if x < 0.0 { -r } else { r }
}

/// f32 to f16 bits, round to nearest even (as numpy's `astype(np.float16)` and ggml).
#[inline]
pub(crate) fn f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// f16 bits to f32.
#[inline]
pub(crate) fn f16_val(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// `sum_j w_j (x_j - deq_j)^2` of a block.
pub(crate) fn weighted_error<B: GgmlBlock>(block: &B, x: &[f32], w: &[f32]) -> f64 {
    let mut deq = [0f32; 256];
    let deq = &mut deq[..B::BLOCK];
    block.dequantize(deq);
    x.iter()
        .zip(deq.iter())
        .zip(w)
        .map(|((&a, &b), &w)| w as f64 * ((a - b) as f64).powi(2))
        .sum()
}

/// The candidate with the lower weighted error (`plain` on ties).
pub(crate) fn better<B: GgmlBlock>(x: &[f32], w: &[f32], plain: B, weighted: B) -> B {
    if weighted_error(&weighted, x, w) < weighted_error(&plain, x, w) {
        weighted
    } else {
        plain
    }
}

/// The types [`quantize`] can write.
pub const QUANTIZABLE: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
];

/// f32 to bf16 bits as ggml (`ggml_compute_fp32_to_bf16`) and gguf-py: round to nearest
/// even, NaN made quiet.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return ((n >> 16) | 64) as u16;
    }
    ((n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) >> 16) as u16
}

fn rows_of<Q: BlockQuantizer>(
    data: &[f32],
    row_len: usize,
    importance: Option<&[f32]>,
    keep_zeros: bool,
) -> Vec<u8>
where
    Q::Block: Sync,
{
    let n = Q::Block::BLOCK;
    let row_bytes = row_len / n * std::mem::size_of::<Q::Block>();
    let mut out = vec![0u8; data.len() / n * std::mem::size_of::<Q::Block>()];
    // Several rows per task keep rayon's overhead small for short rows.
    let per_task = (16384 / row_len).max(1);
    out.par_chunks_mut(row_bytes * per_task)
        .zip(data.par_chunks(row_len * per_task))
        .for_each(|(o, x)| {
            for (or, xr) in o.chunks_exact_mut(row_bytes).zip(x.chunks_exact(row_len)) {
                Q::quantize_row(xr, importance, keep_zeros, or);
            }
        });
    out
}

/// Quantizes `data` (rows of `row_len` values, row-major) to `ty`, rows in parallel.
/// `importance` has one weight per column (`row_len` values). F32, F16 and BF16 are plain
/// conversions (importance ignored).
pub fn quantize(
    ty: GgmlType,
    data: &[f32],
    row_len: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>, BlockError> {
    let (block, _) = ty
        .block_layout()
        .ok_or(BlockError::Unsupported(ty.name()))?;
    if !QUANTIZABLE.contains(&ty) {
        return Err(BlockError::Unsupported(ty.name()));
    }
    if row_len == 0 || !row_len.is_multiple_of(block) {
        return Err(BlockError::RowLength {
            row: row_len,
            ty: ty.name(),
            block,
        });
    }
    if !data.len().is_multiple_of(row_len) {
        return Err(BlockError::Shape {
            len: data.len(),
            row: row_len,
        });
    }
    let floored: Option<Vec<f32>> = match importance {
        Some(w) if w.len() != row_len => {
            return Err(BlockError::Importance {
                got: w.len(),
                row: row_len,
            });
        }
        Some(w) => Some(floor_importance(w)),
        None => None,
    };
    let imp = floored.as_deref();
    // A pruned tensor (at least 1/8 exact zeros) keeps every zero exactly; a dense one is
    // quantized as the reference quantizers do, byte for byte.
    let keep_zeros = data.iter().filter(|&&v| v == 0.0).count() * 8 >= data.len();
    Ok(match ty {
        GgmlType::F32 => bytemuck::cast_slice(data).to_vec(),
        GgmlType::F16 => data
            .par_iter()
            .flat_map_iter(|&x| f16_bits(x).to_le_bytes())
            .collect(),
        GgmlType::BF16 => data
            .par_iter()
            .flat_map_iter(|&x| bf16_bits(x).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => rows_of::<legacy::Q8_0>(data, row_len, imp, keep_zeros),
        GgmlType::Q4_0 => rows_of::<legacy::Q4_0>(data, row_len, imp, keep_zeros),
        GgmlType::Q4_1 => rows_of::<legacy::Q4_1>(data, row_len, imp, keep_zeros),
        GgmlType::Q5_0 => rows_of::<legacy::Q5_0>(data, row_len, imp, keep_zeros),
        GgmlType::Q5_1 => rows_of::<legacy::Q5_1>(data, row_len, imp, keep_zeros),
        GgmlType::Q3_K => rows_of::<q3k::Q3K>(data, row_len, imp, keep_zeros),
        GgmlType::Q4_K => rows_of::<kquants::Q4K>(data, row_len, imp, keep_zeros),
        GgmlType::Q5_K => rows_of::<kquants::Q5K>(data, row_len, imp, keep_zeros),
        GgmlType::Q6_K => rows_of::<kquants::Q6K>(data, row_len, imp, keep_zeros),
        GgmlType::IQ4_NL => rows_of::<iq4nl::IQ4NL>(data, row_len, imp, keep_zeros),
        _ => return Err(BlockError::Unsupported(ty.name())),
    })
}

/// Importance floored at 1e-3 of its mean (1 where it is all zero), non-finite values at the
/// floor: a column calibration never saw still gets a sane code.
pub(crate) fn floor_importance(w: &[f32]) -> Vec<f32> {
    let mean = w.iter().map(|&v| v.max(0.0) as f64).sum::<f64>() / w.len().max(1) as f64;
    let floor = if mean > 0.0 {
        (mean * 1e-3) as f32
    } else {
        1.0
    };
    w.iter()
        .map(|&v| if v.is_finite() { v.max(floor) } else { floor })
        .collect()
}

/// Expands `bytes` of type `ty` holding `n` values back to f32 (through
/// [`model::gguf::dequantize`], the reader's own code).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    model::gguf::dequantize(ty, bytes, &mut out);
    out
}

/// Parses a type name as the command line spells it (`q4_k`, `Q8_0`, `f16`...).
pub fn parse_type(name: &str) -> Option<GgmlType> {
    QUANTIZABLE
        .iter()
        .copied()
        .find(|t| t.name().eq_ignore_ascii_case(name))
}

/// Symmetric weighted search (the idea of ggml's `make_qx_quants`): levels `-nmax..=nmax-1`
/// (`-nmax+1..` when `symmetric_hi`), candidate inverse scales `-(nmax + 0.1 k)/max` for
/// `k` in `-steps..=steps` where `max` is the value of largest magnitude, each refined to the
/// weighted least-squares scale of its levels; returns the best scale and writes the levels
/// (without offset) into `l`.
pub(crate) fn search_symmetric(
    x: &[f32],
    w: &[f32],
    nmax: i32,
    hi: i32,
    steps: i32,
    l: &mut [i32],
) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.iter_mut().for_each(|q| *q = 0);
        return 0.0;
    }
    let lo = -nmax;
    let levels = |iscale: f32, l: &mut [i32]| -> (f32, f32) {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for ((&v, &w), q) in x.iter().zip(w).zip(l.iter_mut()) {
            let li = nearest_int(iscale * v).clamp(lo, hi);
            *q = li;
            sumlx += w * v * li as f32;
            suml2 += w * (li * li) as f32;
        }
        (sumlx, suml2)
    };
    let (sumlx, suml2) = levels(-(nmax as f32) / max, l);
    let mut scale = if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    let mut tmp = [0i32; 256];
    let tmp = &mut tmp[..x.len()];
    for k in -steps..=steps {
        if k == 0 {
            continue;
        }
        let (sumlx, suml2) = levels(-(nmax as f32 + 0.1 * k as f32) / max, tmp);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            scale = sumlx / suml2;
            best = scale * sumlx;
            l.copy_from_slice(tmp);
        }
    }
    scale
}

/// Asymmetric weighted search (the idea of ggml's `make_qkx2_quants`): levels `0..=nmax`
/// with `x ≈ scale * l + min`; candidate inverse scales `(nmax + rmin + rdelta k)/(max-min)`
/// for `k` in `0..=nstep`, each refined to the weighted least-squares (scale, min) of its
/// levels. With `min_le_zero` the minimum is kept `<= 0` (K formats store it as a positive
/// offset that is subtracted). Returns `(scale, min)` and writes the levels into `l`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn search_affine(
    x: &[f32],
    w: &[f32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    min_le_zero: bool,
    l: &mut [i32],
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let (mut sum_w, mut sum_x, mut sum_x2) = (0f32, 0f32, 0f32);
    for (&v, &wi) in x.iter().zip(w) {
        min = min.min(v);
        max = max.max(v);
        sum_w += wi;
        sum_x += wi * v;
        sum_x2 += wi * v * v;
    }
    if min_le_zero && min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|q| *q = 0);
        return (0.0, min);
    }
    let range = max - min;
    let mut iscale = nmax as f32 / range;
    let mut scale = 1.0 / iscale;
    let mut best_err = 0f32;
    for ((&v, &wi), q) in x.iter().zip(w).zip(l.iter_mut()) {
        *q = nearest_int(iscale * (v - min)).clamp(0, nmax);
        let d = scale * *q as f32 + min - v;
        best_err += wi * d * d;
    }
    let mut aux = [0i32; 256];
    let aux = &mut aux[..n];
    for k in 0..=nstep {
        iscale = (rmin + rdelta * k as f32 + nmax as f32) / range;
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for ((&v, &wi), q) in x.iter().zip(w).zip(aux.iter_mut()) {
            let li = nearest_int(iscale * (v - min)).clamp(0, nmax);
            *q = li;
            let lf = li as f32;
            sum_l += wi * lf;
            sum_l2 += wi * lf * lf;
            sum_xl += wi * lf * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det <= 0.0 {
            continue;
        }
        let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if min_le_zero && this_min > 0.0 {
            this_min = 0.0;
            this_scale = sum_xl / sum_l2;
        }
        // sum w (s l + m - x)^2 expanded over the sums already at hand (one pass per
        // candidate instead of two).
        let (s, m) = (this_scale, this_min);
        let err = s * s * sum_l2 + 2.0 * s * m * sum_l + m * m * sum_w
            - 2.0 * s * sum_xl
            - 2.0 * m * sum_x
            + sum_x2;
        if err < best_err {
            best_err = err;
            scale = this_scale;
            min = this_min;
            l.copy_from_slice(aux);
        }
    }
    (scale, min)
}

#[cfg(test)]
pub(crate) mod testutil {
    /// A small deterministic PRNG (xorshift64*), so tests need no extra dependency.
    pub struct Rng(pub u64);
    impl Rng {
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn uniform(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
        }
        pub fn normal(&mut self) -> f32 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        }
        pub fn normals(&mut self, n: usize, sd: f32) -> Vec<f32> {
            (0..n).map(|_| self.normal() * sd).collect()
        }
    }

    /// Root-mean-square error relative to the root-mean-square of `x`.
    pub fn rel_rmse(x: &[f32], y: &[f32]) -> f64 {
        let e: f64 = x
            .iter()
            .zip(y)
            .map(|(&a, &b)| ((a - b) as f64).powi(2))
            .sum();
        let s: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
        (e / s).sqrt()
    }

    /// `sum_j w_{j mod row} (x_j - y_j)^2`.
    pub fn weighted_sq(x: &[f32], y: &[f32], w: &[f32]) -> f64 {
        x.iter()
            .zip(y)
            .enumerate()
            .map(|(i, (&a, &b))| w[i % w.len()] as f64 * ((a - b) as f64).powi(2))
            .sum()
    }

    /// Importance with a heavy tail: most columns near 1, one in ten 30-300x larger.
    pub fn skewed_importance(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let base = 0.5 + rng.uniform();
                if rng.uniform() < 0.1 {
                    base * (30.0 + 270.0 * rng.uniform())
                } else {
                    base
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn every_type_round_trips_with_small_error() {
        let mut rng = Rng(7);
        let (rows, row) = (8, 512);
        let x = rng.normals(rows * row, 0.02);
        // Relative RMSE bounds for gaussian data (measured values are well inside).
        for (ty, bound) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::BF16, 4e-3),
            (GgmlType::Q8_0, 0.006),
            (GgmlType::Q6_K, 0.03),
            (GgmlType::Q5_0, 0.06),
            (GgmlType::Q5_1, 0.06),
            (GgmlType::Q5_K, 0.05),
            (GgmlType::Q4_0, 0.12),
            (GgmlType::Q4_1, 0.12),
            (GgmlType::Q4_K, 0.09),
            (GgmlType::IQ4_NL, 0.11),
        ] {
            let q = quantize(ty, &x, row, None).unwrap();
            let (blk, bsz) = ty.block_layout().unwrap();
            assert_eq!(q.len(), x.len() / blk * bsz, "{}", ty.name());
            let y = dequantize(ty, &q, x.len());
            let e = rel_rmse(&x, &y);
            assert!(e <= bound, "{}: relative RMSE {e} > {bound}", ty.name());
        }
    }

    #[test]
    fn importance_never_increases_weighted_error() {
        let mut rng = Rng(11);
        let (rows, row) = (16, 512);
        let mut x = rng.normals(rows * row, 0.02);
        for v in x.iter_mut().step_by(37) {
            *v *= 6.0; // outliers
        }
        let imp = skewed_importance(&mut rng, row);
        for &ty in &QUANTIZABLE[3..] {
            let plain = dequantize(ty, &quantize(ty, &x, row, None).unwrap(), x.len());
            let weighted = dequantize(ty, &quantize(ty, &x, row, Some(&imp)).unwrap(), x.len());
            let (ep, ew) = (
                weighted_sq(&x, &plain, &imp),
                weighted_sq(&x, &weighted, &imp),
            );
            assert!(ew <= ep, "{}: weighted error {ew} > plain {ep}", ty.name());
            // The search should find a real improvement on skewed importance.
            assert!(
                ew < 0.97 * ep,
                "{}: weighted error {ew} barely below plain {ep}",
                ty.name()
            );
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let x = vec![0.5f32; 576];
        assert!(matches!(
            quantize(GgmlType::Q4_K, &x, 576, None),
            Err(BlockError::RowLength { .. })
        ));
        assert!(matches!(
            quantize(GgmlType::Q4_0, &x, 128, None),
            Err(BlockError::Shape { .. })
        ));
        assert!(matches!(
            quantize(GgmlType::Q4_0, &x, 576, Some(&[1.0; 32])),
            Err(BlockError::Importance { .. })
        ));
        assert!(quantize(GgmlType::Other(10, "Q2_K"), &x, 576, None).is_err());
        assert_eq!(
            quantize(GgmlType::Q4_0, &x, 576, None).unwrap().len(),
            18 * 18
        );
    }

    #[test]
    fn constant_and_zero_blocks_are_exact() {
        for &ty in &QUANTIZABLE[3..] {
            let z = vec![0f32; 512];
            let y = dequantize(ty, &quantize(ty, &z, 512, None).unwrap(), 512);
            assert!(y.iter().all(|&v| v == 0.0), "{}", ty.name());
        }
        // Rounding helpers agree with std on ties and near-ties.
        for v in [
            0.5f32,
            1.5,
            2.5,
            -0.5,
            -2.5,
            0.49999997,
            -0.49999997,
            126.5,
            1e-9,
            3e6 + 0.5,
            7e6,
        ] {
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
            assert_eq!(round_away(v), v.round() as i32, "{v}");
        }
        // bf16 rounding matches ggml's formula on a tie.
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
    }
}
