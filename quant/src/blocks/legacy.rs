//! The 32-wide legacy formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.
//!
//! Plain rounding reproduces ggml's reference quantizers exactly as gguf-py computes them in
//! f32 (byte-identical output):
//! * Q8_0: `d = amax/127`, `q = round_half_away(x/d)`.
//! * Q4_0 / Q5_0: `d = max/-8` (`/-16`) where `max` is the first value of largest magnitude,
//!   `q = min(15, trunc(x/d + 8.5))` (`min(31, trunc(x/d + 16.5))`).
//! * Q4_1 / Q5_1: `d = (max-min)/15` (`/31`), `m = min`, `q = min(15, trunc((x-min)/d + 0.5))`.
//!
//! (`x/d` is computed as `x * (1/d)`, with `1/d = 0` when `d = 0`, as the reference does.)
//! With importance, a weighted scale search ([`super::search_symmetric`] /
//! [`super::search_affine`]) proposes a block, the levels are re-rounded against the f16
//! scale actually stored, and the better of it and the plain block is kept.

use model::gguf::GgmlType;
use model::gguf::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, QK};

use super::{
    BlockQuantizer, better, f16_bits, f16_val, round_away, search_affine, search_symmetric,
};

/// First value of largest magnitude, and that magnitude.
pub(super) fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

#[inline]
pub(super) fn inv(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// Packs 32 levels of 0..16 into nibbles: low nibbles values 0..16, high nibbles 16..32.
pub(super) fn pack_nibbles(q: &[u8; QK]) -> [u8; QK / 2] {
    std::array::from_fn(|j| (q[j] & 0x0f) | ((q[j + QK / 2] & 0x0f) << 4))
}

/// The fifth bits of 32 five-bit levels, bit `j` for value `j`.
pub(super) fn fifth_bits(q: &[u8; QK]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= ((v as u32 >> 4) & 1) << j;
    }
    qh.to_le_bytes()
}

/// Re-rounds `x` to offset levels `0..=top` under the stored f16 scale: `q = round(x/d) + off`.
fn round_sym(x: &[f32], d_bits: u16, off: i32, top: i32) -> [u8; QK] {
    let d = f16_val(d_bits);
    let id = inv(d);
    std::array::from_fn(|j| (round_away(x[j] * id) + off).clamp(0, top) as u8)
}

/// Re-rounds `x` to levels `0..=top` under the stored f16 scale and minimum.
fn round_affine(x: &[f32], d_bits: u16, m_bits: u16, top: i32) -> [u8; QK] {
    let (d, m) = (f16_val(d_bits), f16_val(m_bits));
    let id = inv(d);
    std::array::from_fn(|j| round_away((x[j] - m) * id).clamp(0, top) as u8)
}

/// Weighted symmetric proposal: f16 scale bits (levels are re-rounded by the caller).
fn weighted_sym_scale(x: &[f32], w: &[f32], nmax: i32, hi: i32) -> u16 {
    let mut l = [0i32; QK];
    let d = search_symmetric(x, w, nmax, hi, 9, &mut l);
    f16_bits(d)
}

/// Weighted affine proposal: f16 (scale, min) bits.
fn weighted_affine(x: &[f32], w: &[f32], nmax: i32) -> (u16, u16) {
    let mut l = [0i32; QK];
    let (d, m) = search_affine(x, w, nmax, -1.0, 0.1, 20, false, &mut l);
    (f16_bits(d), f16_bits(m))
}

/// Q8_0: 8-bit symmetric, one f16 scale per 32 values.
#[derive(Debug)]
pub struct Q8_0;

impl Q8_0 {
    /// ggml's reference rounding.
    pub fn reference(x: &[f32]) -> BlockQ8_0 {
        let amax = x.iter().fold(0f32, |m, &v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = inv(d);
        BlockQ8_0 {
            d: f16_bits(d),
            qs: std::array::from_fn(|j| round_away(x[j] * id) as i8),
        }
    }
}

impl BlockQuantizer for Q8_0 {
    type Block = BlockQ8_0;
    const TYPE: GgmlType = GgmlType::Q8_0;
    fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ8_0 {
        let plain = Self::reference(x);
        let Some(w) = importance else { return plain };
        let d = weighted_sym_scale(x, w, 127, 127);
        let id = inv(f16_val(d));
        let cand = BlockQ8_0 {
            d,
            qs: std::array::from_fn(|j| round_away(x[j] * id).clamp(-127, 127) as i8),
        };
        better(x, w, plain, cand)
    }
}

/// Q4_0: 4-bit symmetric (levels -8..7), one f16 scale per 32 values.
#[derive(Debug)]
pub struct Q4_0;

impl Q4_0 {
    /// ggml's reference rounding.
    pub fn reference(x: &[f32]) -> BlockQ4_0 {
        let d = signed_absmax(x) / -8.0;
        let id = inv(d);
        let q: [u8; QK] = std::array::from_fn(|j| ((x[j] * id + 8.5) as i32).clamp(0, 15) as u8);
        BlockQ4_0 {
            d: f16_bits(d),
            qs: pack_nibbles(&q),
        }
    }
}

impl BlockQuantizer for Q4_0 {
    type Block = BlockQ4_0;
    const TYPE: GgmlType = GgmlType::Q4_0;
    fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ4_0 {
        let plain = Self::reference(x);
        let Some(w) = importance else { return plain };
        let d = weighted_sym_scale(x, w, 8, 7);
        let cand = BlockQ4_0 {
            d,
            qs: pack_nibbles(&round_sym(x, d, 8, 15)),
        };
        better(x, w, plain, cand)
    }
}

/// Scale, minimum and levels of an affine block (`y = d*q + m`) in which every exact zero of
/// `x` decodes to exactly 0: the minimum is `-d*z` for an integer zero point z, and d keeps
/// few enough significant bits that `d*z` is itself an f16 (so `m` stores it exactly and
/// `d*z + m` is 0 in f32). `d` is the scale to start from (its low mantissa bits are dropped).
fn affine_keep_zeros(x: &[f32], d: f32, nmax: i32) -> (u16, u16, [u8; QK]) {
    let (min, _) = min_max(x);
    let z = if d > 0.0 {
        super::nearest_int(-min.min(0.0) / d).clamp(0, nmax)
    } else {
        0
    };
    // z needs up to 5 bits; f16 has 11 significant bits: keep at most 11 - bits(z) of d's.
    let drop = 32 - (z as u32).leading_zeros();
    let bits = f16_bits(d);
    let mask = !((1u16 << drop) - 1);
    // Round to the coarser grid (a carry into the exponent is still the nearest value).
    let mut d_bits = bits.wrapping_add((1u16 << drop) >> 1) & mask;
    if !f16_val(d_bits).is_finite() {
        d_bits = bits & mask;
    }
    let dv = f16_val(d_bits);
    let m = -dv * z as f32;
    if f16_val(f16_bits(m)) != m || !dv.is_finite() {
        // Below f16's normal range: a zero point of 0 keeps zeros (negatives clip to 0).
        let q = std::array::from_fn(|j| (x[j] * inv(dv)).round().clamp(0.0, nmax as f32) as u8);
        return (d_bits, 0, q);
    }
    let id = inv(dv);
    let q = std::array::from_fn(|j| (super::nearest_int(x[j] * id) + z).clamp(0, nmax) as u8);
    (d_bits, f16_bits(m), q)
}

/// The zero-keeping affine block of lower weighted error among the plain scale and, with
/// importance, the weighted search's scale.
fn keep_zeros_affine(x: &[f32], importance: Option<&[f32]>, nmax: i32) -> (u16, u16, [u8; QK]) {
    let (min, max) = min_max(x);
    let plain = affine_keep_zeros(x, (max - min) / nmax as f32, nmax);
    let Some(w) = importance else { return plain };
    let (d, _) = weighted_affine(x, w, nmax);
    let cand = affine_keep_zeros(x, f16_val(d), nmax);
    let err = |(d, m, q): &(u16, u16, [u8; QK])| -> f64 {
        let (d, m) = (f16_val(*d), f16_val(*m));
        (0..QK)
            .map(|j| w[j] as f64 * ((x[j] - (q[j] as f32 * d + m)) as f64).powi(2))
            .sum()
    };
    if err(&cand) < err(&plain) {
        cand
    } else {
        plain
    }
}

/// Q4_1: 4-bit affine (levels 0..15), f16 scale and minimum per 32 values.
#[derive(Debug)]
pub struct Q4_1;

impl Q4_1 {
    /// ggml's reference rounding.
    pub fn reference(x: &[f32]) -> BlockQ4_1 {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = inv(d);
        let q: [u8; QK] =
            std::array::from_fn(|j| (((x[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8);
        BlockQ4_1 {
            d: f16_bits(d),
            m: f16_bits(min),
            qs: pack_nibbles(&q),
        }
    }
}

impl BlockQuantizer for Q4_1 {
    type Block = BlockQ4_1;
    const TYPE: GgmlType = GgmlType::Q4_1;
    fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ4_1 {
        let plain = Self::reference(x);
        let Some(w) = importance else { return plain };
        let (d, m) = weighted_affine(x, w, 15);
        let cand = BlockQ4_1 {
            d,
            m,
            qs: pack_nibbles(&round_affine(x, d, m, 15)),
        };
        better(x, w, plain, cand)
    }
    fn quantize_block_keep_zeros(x: &[f32], importance: Option<&[f32]>) -> BlockQ4_1 {
        if !x.contains(&0.0) {
            return Self::quantize_block(x, importance);
        }
        let (d, m, q) = keep_zeros_affine(x, importance, 15);
        BlockQ4_1 {
            d,
            m,
            qs: pack_nibbles(&q),
        }
    }
}

/// Q5_0: 5-bit symmetric (levels -16..15), one f16 scale per 32 values.
#[derive(Debug)]
pub struct Q5_0;

impl Q5_0 {
    /// ggml's reference rounding.
    pub fn reference(x: &[f32]) -> BlockQ5_0 {
        let d = signed_absmax(x) / -16.0;
        let id = inv(d);
        let q: [u8; QK] = std::array::from_fn(|j| ((x[j] * id + 16.5) as i32).clamp(0, 31) as u8);
        BlockQ5_0 {
            d: f16_bits(d),
            qh: fifth_bits(&q),
            qs: pack_nibbles(&q),
        }
    }
}

impl BlockQuantizer for Q5_0 {
    type Block = BlockQ5_0;
    const TYPE: GgmlType = GgmlType::Q5_0;
    fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ5_0 {
        let plain = Self::reference(x);
        let Some(w) = importance else { return plain };
        let d = weighted_sym_scale(x, w, 16, 15);
        let q = round_sym(x, d, 16, 31);
        better(
            x,
            w,
            plain,
            BlockQ5_0 {
                d,
                qh: fifth_bits(&q),
                qs: pack_nibbles(&q),
            },
        )
    }
}

/// Q5_1: 5-bit affine (levels 0..31), f16 scale and minimum per 32 values.
#[derive(Debug)]
pub struct Q5_1;

impl Q5_1 {
    /// ggml's reference rounding.
    pub fn reference(x: &[f32]) -> BlockQ5_1 {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = inv(d);
        let q: [u8; QK] =
            std::array::from_fn(|j| (((x[j] - min) * id + 0.5) as i32).clamp(0, 31) as u8);
        BlockQ5_1 {
            d: f16_bits(d),
            m: f16_bits(min),
            qh: fifth_bits(&q),
            qs: pack_nibbles(&q),
        }
    }
}

impl BlockQuantizer for Q5_1 {
    type Block = BlockQ5_1;
    const TYPE: GgmlType = GgmlType::Q5_1;
    fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ5_1 {
        let plain = Self::reference(x);
        let Some(w) = importance else { return plain };
        let (d, m) = weighted_affine(x, w, 31);
        let q = round_affine(x, d, m, 31);
        better(
            x,
            w,
            plain,
            BlockQ5_1 {
                d,
                m,
                qh: fifth_bits(&q),
                qs: pack_nibbles(&q),
            },
        )
    }
    fn quantize_block_keep_zeros(x: &[f32], importance: Option<&[f32]>) -> BlockQ5_1 {
        if !x.contains(&0.0) {
            return Self::quantize_block(x, importance);
        }
        let (d, m, q) = keep_zeros_affine(x, importance, 31);
        BlockQ5_1 {
            d,
            m,
            qh: fifth_bits(&q),
            qs: pack_nibbles(&q),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_grid_blocks_keep_every_code_and_refuse_what_the_type_cannot_hold() {
        let (rows, row_len) = (3, 64);
        for (ty, bits, sym) in [
            (GgmlType::Q8_0, 8, true),
            (GgmlType::Q4_0, 4, true),
            (GgmlType::Q5_0, 5, true),
            (GgmlType::Q4_1, 4, false),
            (GgmlType::Q5_1, 5, false),
        ] {
            let top = (1u32 << bits) - 1;
            let codes: Vec<u8> = (0..rows * row_len)
                .map(|i| ((i * 7 + i / 5) as u32 % (top + 1)) as u8)
                .collect();
            let params: Vec<(f32, i32)> = (0..rows * row_len / QK)
                .map(|g| {
                    let z = if sym {
                        1 << (bits - 1)
                    } else {
                        (g as i32 * 3) % (top as i32 + 1)
                    };
                    (0.01 + 0.003 * g as f32, z)
                })
                .collect();
            let bytes = encode_on_grid(ty, &codes, &params, row_len).unwrap();
            let back = super::super::dequantize(ty, &bytes, codes.len());
            for (i, (&q, &v)) in codes.iter().zip(&back).enumerate() {
                let (s, z) = params[i / QK];
                let want = if sym {
                    f16_val(f16_bits(s)) * (q as i32 - z) as f32
                } else {
                    f16_val(f16_bits(s)) * q as f32 + f16_val(f16_bits(-s * z as f32))
                };
                assert_eq!(v, want, "{ty:?} value {i}");
            }
        }
        let p = vec![(0.1f32, 8); 2];
        assert!(encode_on_grid(GgmlType::Q4_0, &[3; 64], &p, 64).is_some());
        // Q4_0's zero is 8; a code above 15; a type that is not a legacy one.
        assert!(encode_on_grid(GgmlType::Q4_0, &[3; 64], &[(0.1, 7); 2], 64).is_none());
        assert!(encode_on_grid(GgmlType::Q4_0, &[16; 64], &p, 64).is_none());
        assert!(encode_on_grid(GgmlType::Q4_K, &[3; 64], &p, 64).is_none());
    }

    #[test]
    fn reference_rounding_details() {
        // Q4_0: the first value of largest magnitude sets d = max/-8 (here -8 -> level 0).
        let mut x = [0f32; QK];
        x[3] = -1.0;
        x[5] = 1.0;
        x[7] = 0.5;
        let b = Q4_0::reference(&x);
        assert_eq!(f16_val(b.d), 0.125);
        let mut y = [0f32; QK];
        use model::gguf::blocks::GgmlBlock;
        b.dequantize(&mut y);
        assert_eq!((y[3], y[5], y[7]), (-1.0, 0.875, 0.5));
        // Q8_0 rounds half away from zero.
        let mut x = [0f32; QK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        let b = Q8_0::reference(&x);
        assert_eq!((b.qs[0], b.qs[1], b.qs[2]), (127, 3, -3));
    }
}

/// The bytes of a legacy type for a weight already on a grid of 32-wide groups: `codes`
/// (row-major `[rows, row_len]`) with one `(scale, zero)` per group in `params` (row-major
/// `[rows, row_len / 32]`), decoding as `scale * (code - zero)`. The codes are stored as they
/// are, so the grid is kept; the scale (and an affine type's minimum `-scale * zero`) is
/// stored as the f16 the format holds. Symmetric types need the zero the format implies
/// (Q8_0: 128, Q4_0: 8, Q5_0: 16) and affine ones (Q4_1, Q5_1) take any; `None` when the
/// type is another, a zero or code does not fit it, or the shapes disagree.
pub fn encode_on_grid(
    ty: GgmlType,
    codes: &[u8],
    params: &[(f32, i32)],
    row_len: usize,
) -> Option<Vec<u8>> {
    let (top, sym_zero): (u8, Option<i32>) = match ty {
        GgmlType::Q8_0 => (255, Some(128)),
        GgmlType::Q4_0 => (15, Some(8)),
        GgmlType::Q5_0 => (31, Some(16)),
        GgmlType::Q4_1 => (15, None),
        GgmlType::Q5_1 => (31, None),
        _ => return None,
    };
    if row_len == 0
        || !row_len.is_multiple_of(QK)
        || !codes.len().is_multiple_of(row_len)
        || params.len() != codes.len() / QK
        || codes.iter().any(|&c| c > top)
        || params.iter().any(|&(s, z)| {
            !s.is_finite() || sym_zero.is_some_and(|w| z != w) || !(0..=top as i32).contains(&z)
        })
    {
        return None;
    }
    let mut out = Vec::new();
    for (q, &(s, z)) in codes.chunks_exact(QK).zip(params) {
        let q: &[u8; QK] = q.try_into().expect("32 codes");
        let (d, m) = (f16_bits(s), f16_bits(-s * z as f32));
        match ty {
            GgmlType::Q8_0 => out.extend_from_slice(bytemuck::bytes_of(&BlockQ8_0 {
                d,
                qs: std::array::from_fn(|j| (q[j] as i32 - 128) as i8),
            })),
            GgmlType::Q4_0 => out.extend_from_slice(bytemuck::bytes_of(&BlockQ4_0 {
                d,
                qs: pack_nibbles(q),
            })),
            GgmlType::Q5_0 => out.extend_from_slice(bytemuck::bytes_of(&BlockQ5_0 {
                d,
                qh: fifth_bits(q),
                qs: pack_nibbles(q),
            })),
            GgmlType::Q4_1 => out.extend_from_slice(bytemuck::bytes_of(&BlockQ4_1 {
                d,
                m,
                qs: pack_nibbles(q),
            })),
            _ => out.extend_from_slice(bytemuck::bytes_of(&BlockQ5_1 {
                d,
                m,
                qh: fifth_bits(q),
                qs: pack_nibbles(q),
            })),
        }
    }
    Some(out)
}
