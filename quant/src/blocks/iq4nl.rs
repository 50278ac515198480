//! IQ4_NL: 32 values per block, each a 4-bit index into a fixed non-uniform int8 codebook
//! ([`IQ4_NL_VALUES`], denser near zero, like NF4's) times one f16 scale.
//!
//! The levels are not evenly spaced, so no closed-form rounding exists; the scale is searched
//! (the idea of llama.cpp's IQ4_NL quantizer, written from its description): with per-value
//! weights `w` (`x_j^2` without importance, as llama.cpp's reference; the importance itself
//! otherwise), each candidate inverse scale `(-127 + k) / max` for `k` in `-7..=7` (`max` the
//! value of largest magnitude, so it lands on or beside the codebook's extreme level) maps
//! every value to its nearest level, and the weighted least-squares scale of those levels
//! `d = Σ w q x / Σ w q²` is kept when it explains more of the block (larger
//! `(Σ w q x)² / Σ w q²`). The indices are then chosen again against the f16 scale actually
//! stored. With importance, the block of lower importance-weighted error among this search
//! and the plain one is kept.
//!
//! IQ4_NL has no zero level: a pruned weight decodes to the level nearest 0 (`1·d`, at most
//! a 113th of the block's largest magnitude), so pruned tensors do not keep exact zeros in
//! this type (every other type does).

use model::gguf::GgmlType;
use model::gguf::blocks::{BlockIQ4NL, IQ4_NL_VALUES, QK};

use super::legacy::{inv, pack_nibbles, signed_absmax};
use super::{BlockQuantizer, better, f16_bits, f16_val};

/// Steps of the scale search on each side of `max -> -127`.
const STEPS: i32 = 7;

/// Midpoints between consecutive levels: a value's level index is the number of midpoints at
/// or below it (ties go to the upper level).
const MIDS: [f32; 15] = {
    let mut m = [0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (IQ4_NL_VALUES[i] as f32 + IQ4_NL_VALUES[i + 1] as f32) / 2.0;
        i += 1;
    }
    m
};

/// The index of the level nearest `v` (in level units).
#[inline]
pub(super) fn nearest(v: f32) -> u8 {
    MIDS.partition_point(|&m| m <= v) as u8
}

/// The weighted scale search described above; returns the scale (f32, before f16 rounding).
fn search(x: &[f32], w: &[f32]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < 1e-30 {
        return 0.0;
    }
    let (mut best_d, mut best) = (0f32, 0f32);
    for k in -STEPS..=STEPS {
        let id = (IQ4_NL_VALUES[0] as f32 + k as f32) / max;
        let (mut sqx, mut sq2) = (0f32, 0f32);
        for j in 0..x.len() {
            let q = IQ4_NL_VALUES[nearest(id * x[j]) as usize] as f32;
            sqx += w[j] * q * x[j];
            sq2 += w[j] * q * q;
        }
        if sq2 > 0.0 && sqx * sqx > best * sq2 {
            best_d = sqx / sq2;
            best = best_d * sqx;
        }
    }
    best_d
}

/// The block for scale `d` (rounded to f16), every value to its nearest level under it.
fn encode(x: &[f32], d: f32) -> BlockIQ4NL {
    let bits = f16_bits(d);
    let id = inv(f16_val(bits));
    let q: [u8; QK] = std::array::from_fn(|j| nearest(x[j] * id));
    BlockIQ4NL {
        d: bits,
        qs: pack_nibbles(&q),
    }
}

/// IQ4_NL: the non-linear 4-bit codebook type.
#[derive(Debug)]
pub struct IQ4NL;

impl IQ4NL {
    /// The search weighted by `x_j^2` (llama.cpp's weighting without an importance matrix).
    pub fn plain(x: &[f32]) -> BlockIQ4NL {
        let w: [f32; QK] = std::array::from_fn(|j| x[j] * x[j]);
        encode(x, search(x, &w))
    }
}

impl BlockQuantizer for IQ4NL {
    type Block = BlockIQ4NL;
    const TYPE: GgmlType = GgmlType::IQ4_NL;
    fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockIQ4NL {
        let plain = Self::plain(x);
        let Some(w) = importance else { return plain };
        better(x, w, plain, encode(x, search(x, w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::gguf::blocks::GgmlBlock;

    fn deq(b: &BlockIQ4NL) -> [f32; QK] {
        let mut y = [0f32; QK];
        b.dequantize(&mut y);
        y
    }

    #[test]
    fn nearest_level_and_ties() {
        assert_eq!(nearest(-1000.0), 0);
        assert_eq!(nearest(1000.0), 15);
        for (i, &v) in IQ4_NL_VALUES.iter().enumerate() {
            assert_eq!(nearest(v as f32), i as u8);
        }
        // (-10 + 1) / 2: the tie goes up, to 1.
        assert_eq!(nearest(-4.5), 8);
        assert_eq!(nearest(-4.6), 7);
    }

    #[test]
    fn values_on_the_codebook_are_exact() {
        // A block that is the codebook times a power of two (exact in f16) comes back exactly.
        let x: [f32; QK] = std::array::from_fn(|j| IQ4_NL_VALUES[j % 16] as f32 / 64.0);
        assert_eq!(deq(&IQ4NL::plain(&x)), x);
        let zero = IQ4NL::plain(&[0.0; QK]);
        assert_eq!(deq(&zero), [0.0; QK]);
    }

    #[test]
    fn search_beats_the_extreme_scale() {
        // Against the scale that maps the largest value to -127 (the search's k = 0 before
        // refitting), the search never does worse in x^2-weighted error, and does better on
        // gaussian blocks overall.
        let mut s = 1u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) as f32
        };
        let (mut e_search, mut e_fixed) = (0f64, 0f64);
        for _ in 0..200 {
            let x: [f32; QK] = std::array::from_fn(|_| {
                let (u, v) = (next().max(1e-7), next());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos() * 0.02
            });
            let max = x
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let err = |b: &BlockIQ4NL| -> f64 {
                let y = deq(b);
                (0..QK)
                    .map(|j| (x[j] as f64).powi(2) * ((x[j] - y[j]) as f64).powi(2))
                    .sum()
            };
            let (a, f) = (err(&IQ4NL::plain(&x)), err(&encode(&x, max / -127.0)));
            assert!(a <= f * (1.0 + 1e-2), "search {a} > fixed {f}");
            e_search += a;
            e_fixed += f;
        }
        assert!(e_search < 0.9 * e_fixed, "{e_search} vs {e_fixed}");
    }
}
