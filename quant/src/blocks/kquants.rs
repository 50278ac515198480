//! The K formats (256-value super-blocks) Q4_K, Q5_K, Q6_K (Q3_K is [`super::q3k`]).
//!
//! Semantics of ggml's reference quantizers, written from their description:
//! * Q4_K / Q5_K: for each of the 8 sub-blocks of 32, an affine search
//!   ([`super::search_affine`], levels 0..15 / 0..31, minimum kept <= 0) weighted by
//!   `rms(sub-block) + |x|`, candidates `(nmax + rmin + 0.1 k)/(max-min)` with
//!   (rmin, steps) = (-1, 20) for Q4_K and (-0.5, 15) for Q5_K; the 8 scales and 8 (negated)
//!   minimums are quantized to 6 bits against their maxima (`d = max_scale/63`,
//!   `dmin = max_min/63`, both f16), and every value is re-rounded against the scale and
//!   minimum actually stored.
//! * Q6_K: for each of the 16 sub-blocks of 16, a symmetric search
//!   ([`super::search_symmetric`], levels -32..31, weights `x^2`, 19 candidate scales); the
//!   16 scales are quantized to i8 against the one of largest magnitude (`d = max/-128`, f16),
//!   and values re-rounded against the stored scales.
//!
//! With importance the sub-block searches use the importance as weights (Q4_K/Q5_K over twice
//! as many candidates at half the step) and the better of that block and the plain one is kept.

use model::gguf::GgmlType;
use model::gguf::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, K_SCALE_SIZE, QK_K, scale_min_k4};

use super::{
    BlockQuantizer, better, f16_bits, f16_val, nearest_int, search_affine, search_symmetric,
};

/// Result of the Q4_K/Q5_K common part: scales, mins and levels 0..=nmax.
struct AffineK {
    d: u16,
    dmin: u16,
    scales: [u8; K_SCALE_SIZE],
    l: [u8; QK_K],
}

/// Per sub-block of 32: the searched scale, the negated minimum and the error weights.
struct SubSearch {
    scales: [f32; 8],
    mins: [f32; 8],
    weights: [[f32; 32]; 8],
}

fn sub_search(
    x: &[f32],
    importance: Option<&[f32]>,
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> SubSearch {
    let mut out = SubSearch {
        scales: [0f32; 8],
        mins: [0f32; 8],
        weights: [[0f32; 32]; 8],
    };
    let mut lv = [0i32; 32];
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let weights = &mut out.weights[j];
        let (s, m) = match importance {
            None => {
                let av = (sub.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
                for (w, &v) in weights.iter_mut().zip(sub) {
                    *w = av + v.abs();
                }
                search_affine(sub, weights, nmax, rmin, 0.1, nstep, true, &mut lv)
            }
            Some(w) => {
                weights.copy_from_slice(&w[32 * j..32 * j + 32]);
                search_affine(sub, weights, nmax, rmin, 0.05, 2 * nstep, true, &mut lv)
            }
        };
        out.scales[j] = s;
        out.mins[j] = -m;
    }
    out
}

fn affine_k(x: &[f32], importance: Option<&[f32]>, nmax: i32, rmin: f32, nstep: i32) -> AffineK {
    let SubSearch { scales, mins, .. } = sub_search(x, importance, nmax, rmin, nstep);
    let max_scale = scales.iter().fold(0f32, |a, &b| a.max(b));
    let max_min = mins.iter().fold(0f32, |a, &b| a.max(b));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; K_SCALE_SIZE];
    for j in 0..8 {
        let ls = nearest_int(inv_scale * scales[j]).clamp(0, 63) as u8;
        let lm = nearest_int(inv_min * mins[j]).clamp(0, 63) as u8;
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16_bits(max_scale / 63.0);
    let dmin = f16_bits(max_min / 63.0);
    let mut l = [0u8; QK_K];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = f16_val(d) * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = f16_val(dmin) * m as f32;
        for i in 32 * j..32 * j + 32 {
            l[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    AffineK {
        d,
        dmin,
        scales: packed,
        l,
    }
}

/// Q4_K/Q5_K for a super-block holding exact zeros (pruned weights), so that every zero
/// decodes to exactly 0. ggml decodes `d*sc*q - dmin*m`; with `dmin = d * 2^k` and
/// `m = sc*z / 2^k` (an integer), level `z` decodes to `d*sc*(z - z) = 0`, and every product
/// is exact in f32 (an f16 times integers of at most 11 bits). k is tried around
/// log2 of the plain ratio dmin/d (and one each side); per sub-block every zero point z with
/// the few sub-scales next to the one that spans the sub-block's range and keeps `m` whole;
/// the lowest weighted error wins.
fn affine_k_keep_zeros(
    x: &[f32],
    importance: Option<&[f32]>,
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> AffineK {
    let SubSearch {
        scales,
        mins,
        weights,
    } = sub_search(x, importance, nmax, rmin, nstep);
    let mut out = AffineK {
        d: 0,
        dmin: 0,
        scales: [0; K_SCALE_SIZE],
        l: [0; QK_K],
    };
    let max_scale = scales.iter().fold(0f32, |a, &b| a.max(b));
    let max_min = mins.iter().fold(0f32, |a, &b| a.max(b));
    if !(f16_val(f16_bits(max_scale / 63.0)) > 0.0) {
        return out; // every value decodes to 0 (the block is zero or below f16's range)
    }
    // Weighted error of sub-block j at step `step` and zero point z.
    let err = |j: usize, step: f32, z: i32| -> f32 {
        x[32 * j..32 * j + 32]
            .iter()
            .zip(&weights[j])
            .map(|(&v, &w)| {
                let y = if step == 0.0 {
                    0
                } else {
                    (nearest_int(v / step) + z).clamp(0, nmax) - z
                };
                let e = v - step * y as f32;
                w * e * e
            })
            .sum()
    };
    let spans: [(f32, f32); 8] = std::array::from_fn(|j| {
        x[32 * j..32 * j + 32]
            .iter()
            .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)))
    });
    // dmin/d near the plain ratio of the largest minimum to the largest scale, a power of 2;
    // d a little above the plain one too, which gives sc*z more ways to be a multiple of 2^k.
    let k0 = (max_min / max_scale).max(1.0).log2().round() as u32;
    let mut best: Option<(f32, u16, u32, [(i32, i32); 8])> = None;
    for grow in [1.0f32, 1.0625, 1.125, 1.25, 1.375] {
        let d = f16_bits(max_scale * grow / 63.0);
        let dv = f16_val(d);
        for k in k0.saturating_sub(1)..=(k0 + 1).min(6) {
            let pow = 1i32 << k;
            if f16_val(f16_bits(dv * pow as f32)) != dv * pow as f32 {
                continue;
            }
            let mut total = 0f32;
            let mut choice = [(0i32, 0i32); 8];
            for (j, &(lo, hi)) in spans.iter().enumerate() {
                let mut bj = (err(j, 0.0, 0), 0, 0);
                let zf = nearest_int(mins[j] / scales[j].max(f32::MIN_POSITIVE)).clamp(0, nmax);
                // For zero points near the plain one, the sub-scales next to the one that
                // spans [lo, hi], among those whose minimum code sc*z/2^k is whole and <= 63.
                for z in (zf - 4).max(0)..=(zf + 4).min(nmax) {
                    let need = if z == nmax {
                        -lo / z as f32
                    } else if z == 0 {
                        hi / nmax as f32
                    } else {
                        (hi / (nmax - z) as f32).max(-lo / z as f32)
                    };
                    let step = pow / gcd(z.max(1), pow);
                    let top = if z == 0 { 63 } else { 63.min(63 * pow / z) };
                    let base = (need / dv / step as f32).floor() as i32 * step;
                    for sc in [base - step, base, base + step, base + 2 * step] {
                        if sc >= 1 && sc <= top && (sc * z) % pow == 0 {
                            let e = err(j, dv * sc as f32, z);
                            if e < bj.0 {
                                bj = (e, sc, z);
                            }
                        }
                    }
                }
                total += bj.0;
                choice[j] = (bj.1, bj.2);
            }
            if best.as_ref().is_none_or(|b| total < b.0) {
                best = Some((total, d, k, choice));
            }
        }
    }
    let Some((_, d, k, choice)) = best else {
        return out;
    };
    let dv = f16_val(d);
    let pow = 1i32 << k;
    out.d = d;
    out.dmin = f16_bits(dv * pow as f32);
    for (j, &(sc, z)) in choice.iter().enumerate() {
        let (ls, lm) = (sc as u8, (sc * z / pow) as u8);
        if j < 4 {
            out.scales[j] = ls;
            out.scales[j + 4] = lm;
        } else {
            out.scales[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            out.scales[j - 4] |= (ls >> 4) << 6;
            out.scales[j] |= (lm >> 4) << 6;
        }
        let step = dv * sc as f32;
        for i in 32 * j..32 * j + 32 {
            out.l[i] = if sc == 0 {
                0
            } else {
                (nearest_int(x[i] / step) + z).clamp(0, nmax) as u8
            };
        }
    }
    out
}

fn gcd(mut a: i32, mut b: i32) -> i32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The Q4_K/Q5_K common part: the zero-keeping search when asked and the block holds a zero.
fn affine(x: &[f32], importance: Option<&[f32]>, keep_zeros: bool, q5: bool) -> AffineK {
    let (nmax, rmin, nstep) = if q5 { (31, -0.5, 15) } else { (15, -1.0, 20) };
    if keep_zeros && x.contains(&0.0) {
        affine_k_keep_zeros(x, importance, nmax, rmin, nstep)
    } else {
        affine_k(x, importance, nmax, rmin, nstep)
    }
}

/// Q4_K's nibbles for 256 levels 0..=15 (sub-blocks 2n and 2n+1 share bytes 32n..32n+32).
pub(super) fn pack_q4k(l: &[u8; QK_K]) -> [u8; QK_K / 2] {
    let mut qs = [0u8; QK_K / 2];
    for n in 0..4 {
        for i in 0..32 {
            qs[32 * n + i] = l[64 * n + i] | (l[64 * n + 32 + i] << 4);
        }
    }
    qs
}

/// Q5_K's high bits and nibbles for 256 levels 0..=31.
pub(super) fn pack_q5k(l: &[u8; QK_K]) -> ([u8; QK_K / 8], [u8; QK_K / 2]) {
    let mut qs = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 8];
    for n in 0..4 {
        for i in 0..32 {
            let (l1, l2) = (l[64 * n + i], l[64 * n + 32 + i]);
            qh[i] |= ((l1 >> 4) << (2 * n)) | ((l2 >> 4) << (2 * n + 1));
            qs[32 * n + i] = (l1 & 0x0f) | ((l2 & 0x0f) << 4);
        }
    }
    (qh, qs)
}

/// Q6_K's low nibbles and high bit pairs for 256 levels 0..=63 (level 32 decodes to 0).
pub(super) fn pack_q6k(l: &[u8; QK_K]) -> ([u8; QK_K / 2], [u8; QK_K / 4]) {
    let (mut ql, mut qh) = ([0u8; QK_K / 2], [0u8; QK_K / 4]);
    for n in 0..2 {
        let (lb, qlb, qhb) = (128 * n, 64 * n, 32 * n);
        for i in 0..32 {
            let (a, b, c, d) = (l[lb + i], l[lb + i + 32], l[lb + i + 64], l[lb + i + 96]);
            ql[qlb + i] = (a & 0x0f) | ((c & 0x0f) << 4);
            ql[qlb + i + 32] = (b & 0x0f) | ((d & 0x0f) << 4);
            qh[qhb + i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((d >> 4) << 6);
        }
    }
    (ql, qh)
}

fn q4k_block(x: &[f32], importance: Option<&[f32]>, keep_zeros: bool) -> BlockQ4K {
    let a = affine(x, importance, keep_zeros, false);
    BlockQ4K {
        d: a.d,
        dmin: a.dmin,
        scales: a.scales,
        qs: pack_q4k(&a.l),
    }
}

fn q5k_block(x: &[f32], importance: Option<&[f32]>, keep_zeros: bool) -> BlockQ5K {
    let a = affine(x, importance, keep_zeros, true);
    let (qh, qs) = pack_q5k(&a.l);
    BlockQ5K {
        d: a.d,
        dmin: a.dmin,
        scales: a.scales,
        qh,
        qs,
    }
}

fn q6k_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ6K {
    let mut sub_scales = [0f32; 16];
    let mut lv = [0i32; 16];
    let mut weights = [0f32; 16];
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for ib in 0..16 {
        let sub = &x[16 * ib..16 * ib + 16];
        let w = match importance {
            None => {
                for (w, &v) in weights.iter_mut().zip(sub) {
                    *w = v * v;
                }
                &weights[..]
            }
            Some(w) => &w[16 * ib..16 * ib + 16],
        };
        let s = search_symmetric(sub, w, 32, 31, 9, &mut lv);
        sub_scales[ib] = s;
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = s;
        }
    }
    let mut out = BlockQ6K {
        ql: [0; QK_K / 2],
        qh: [0; QK_K / 4],
        scales: [0; QK_K / 16],
        d: 0,
    };
    if max_abs < 1e-15 {
        return out;
    }
    let iscale = -128.0 / max_scale;
    out.d = f16_bits(1.0 / iscale);
    for (o, &s) in out.scales.iter_mut().zip(&sub_scales) {
        *o = nearest_int(iscale * s).clamp(-128, 127) as i8;
    }
    let mut l = [32u8; QK_K];
    for j in 0..16 {
        let dj = f16_val(out.d) * out.scales[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as u8;
        }
    }
    (out.ql, out.qh) = pack_q6k(&l);
    out
}

/// Q4_K: 4.5 bits per weight.
#[derive(Debug)]
pub struct Q4K;

impl BlockQuantizer for Q4K {
    type Block = BlockQ4K;
    const TYPE: GgmlType = GgmlType::Q4_K;
    fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ4K {
        let plain = q4k_block(x, None, false);
        match importance {
            None => plain,
            Some(w) => better(x, w, plain, q4k_block(x, Some(w), false)),
        }
    }
    fn quantize_block_keep_zeros(x: &[f32], importance: Option<&[f32]>) -> Self::Block {
        let plain = q4k_block(x, None, true);
        match importance {
            None => plain,
            Some(w) => better(x, w, plain, q4k_block(x, Some(w), true)),
        }
    }
}

/// Q5_K: 5.5 bits per weight.
#[derive(Debug)]
pub struct Q5K;

impl BlockQuantizer for Q5K {
    type Block = BlockQ5K;
    const TYPE: GgmlType = GgmlType::Q5_K;
    fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ5K {
        let plain = q5k_block(x, None, false);
        match importance {
            None => plain,
            Some(w) => better(x, w, plain, q5k_block(x, Some(w), false)),
        }
    }
    fn quantize_block_keep_zeros(x: &[f32], importance: Option<&[f32]>) -> Self::Block {
        let plain = q5k_block(x, None, true);
        match importance {
            None => plain,
            Some(w) => better(x, w, plain, q5k_block(x, Some(w), true)),
        }
    }
}

/// Q6_K: 6.5625 bits per weight.
#[derive(Debug)]
pub struct Q6K;

impl BlockQuantizer for Q6K {
    type Block = BlockQ6K;
    const TYPE: GgmlType = GgmlType::Q6_K;
    fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ6K {
        let plain = q6k_block(x, None);
        match importance {
            None => plain,
            Some(w) => better(x, w, plain, q6k_block(x, Some(w))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{dequantize, quantize};
    use super::*;

    /// Relative RMSE on gaussian rows, compared with llama.cpp-typical figures.
    #[test]
    fn gaussian_round_trip_error() {
        let mut rng = Rng(3);
        let x = rng.normals(64 * QK_K, 1.0);
        let mut report = Vec::new();
        for (ty, lo, hi) in [
            (GgmlType::Q3_K, 0.12, 0.18),
            (GgmlType::Q4_K, 0.05, 0.09),
            (GgmlType::Q5_K, 0.025, 0.045),
            (GgmlType::Q6_K, 0.012, 0.024),
        ] {
            let y = dequantize(ty, &quantize(ty, &x, 4 * QK_K, None).unwrap(), x.len());
            let e = rel_rmse(&x, &y);
            report.push(format!("{} {e:.4}", ty.name()));
            assert!(
                (lo..=hi).contains(&e),
                "{}: relative RMSE {e} outside [{lo}, {hi}]",
                ty.name()
            );
        }
        eprintln!("{}", report.join(", "));
        // K formats beat the legacy format of the same width on the same data.
        let e = |ty| {
            rel_rmse(
                &x,
                &dequantize(ty, &quantize(ty, &x, 4 * QK_K, None).unwrap(), x.len()),
            )
        };
        assert!(e(GgmlType::Q4_K) < e(GgmlType::Q4_1));
        assert!(e(GgmlType::Q5_K) < e(GgmlType::Q5_1));
    }

    #[test]
    fn scales_pack_and_unpack() {
        // A block whose sub-blocks have very different ranges exercises all 6 bits.
        let mut rng = Rng(5);
        let x: Vec<f32> = (0..QK_K)
            .map(|i| rng.normal() * (1 + i / 32) as f32 + (i / 32) as f32 * 0.3)
            .collect();
        for ty in [
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            let y = dequantize(ty, &quantize(ty, &x, QK_K, None).unwrap(), QK_K);
            let e = rel_rmse(&x, &y);
            let bound = if ty == GgmlType::Q3_K { 0.2 } else { 0.12 };
            assert!(e < bound, "{}: {e}", ty.name());
        }
    }
}
