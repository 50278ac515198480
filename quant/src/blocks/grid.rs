//! One GGUF block with its header fixed (scales, minimums, sub-block scales), so that values
//! arriving later can be rounded on the grid it defines and the chosen levels packed into the
//! type's bytes: what GPTQ needs to write its column-by-column error feedback into any block
//! type, K-quants included (the header is chosen when the sweep enters the block, as GPTQ
//! fixes a group's scale at the group boundary).
//!
//! [`FixedBlock::fix`] takes the header from the type's own quantizer (importance-weighted,
//! the plain block kept when it is better), so rounding the same values on it reproduces that
//! quantizer's block; [`FixedBlock::round`] rounds one value; [`FixedBlock::encode`] packs.

use model::gguf::GgmlType;
use model::gguf::blocks::{
    BlockIQ4NL, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, IQ4_NL_VALUES, QK, QK_K, q3k_scales, scale_min_k4,
};

use super::iq4nl::{IQ4NL, nearest};
use super::kquants::{Q4K, Q5K, Q6K, pack_q4k, pack_q5k, pack_q6k};
use super::legacy::{self, fifth_bits, inv, pack_nibbles};
use super::q3k::{Q3K, pack_q3k};
use super::{BlockQuantizer, f16_val, nearest_int};

/// The grid of one sub-block: level `q` in `lo..=hi` decodes to `d * q + b`, or with the
/// IQ4_NL codebook to `d * IQ4_NL_VALUES[q]`.
#[derive(Debug, Clone, Copy)]
struct SubGrid {
    d: f32,
    b: f32,
    lo: i32,
    hi: i32,
    codebook: bool,
}

impl SubGrid {
    fn linear(d: f32, b: f32, lo: i32, hi: i32) -> Self {
        Self {
            d,
            b,
            lo,
            hi,
            codebook: false,
        }
    }

    /// The level nearest `x` and its value.
    fn round(&self, x: f32) -> (i32, f32) {
        if self.codebook {
            let k = nearest(x * inv(self.d)) as usize;
            return (k as i32, self.d * IQ4_NL_VALUES[k] as f32);
        }
        let q = if self.d == 0.0 {
            0
        } else {
            nearest_int((x - self.b) / self.d)
        }
        .clamp(self.lo, self.hi);
        (q, self.d * q as f32 + self.b)
    }
}

/// A block of type `ty` whose header is fixed.
#[derive(Debug, Clone)]
pub struct FixedBlock {
    ty: GgmlType,
    /// The quantizer's block bytes; [`Self::encode`] replaces its levels.
    bytes: Vec<u8>,
    /// One grid per sub-block of `sub` values.
    grids: Vec<SubGrid>,
    sub: usize,
}

/// The types [`FixedBlock`] handles.
pub fn supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q8_0
            | GgmlType::Q4_0
            | GgmlType::Q5_0
            | GgmlType::Q4_1
            | GgmlType::Q5_1
            | GgmlType::IQ4_NL
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::Q6_K
    )
}

fn block<Q: BlockQuantizer>(x: &[f32], w: &[f32], keep_zeros: bool) -> Q::Block {
    if keep_zeros {
        Q::quantize_block_keep_zeros(x, Some(w))
    } else {
        Q::quantize_block(x, Some(w))
    }
}

/// The 8 affine grids of a Q4_K/Q5_K header.
fn k_affine(d: u16, dmin: u16, scales: &[u8; 12], hi: i32) -> Vec<SubGrid> {
    (0..8)
        .map(|j| {
            let (sc, m) = scale_min_k4(j, scales);
            SubGrid::linear(f16_val(d) * sc as f32, -(f16_val(dmin) * m as f32), 0, hi)
        })
        .collect()
}

/// `bytes` read as a block `B`, changed by `set` (its levels), and written back.
fn repack<B: bytemuck::Pod>(bytes: &[u8], set: impl FnOnce(&mut B)) -> Vec<u8> {
    let mut b: B = bytemuck::pod_read_unaligned(bytes);
    set(&mut b);
    bytemuck::bytes_of(&b).to_vec()
}

impl FixedBlock {
    /// The header `ty`'s quantizer chooses for `x` (one block) under importance `w`; with
    /// `keep_zeros` the zero-keeping variant (pruned weights). `None` for other types.
    pub fn fix(ty: GgmlType, x: &[f32], w: &[f32], keep_zeros: bool) -> Option<Self> {
        let one = |d: f32, b: f32, lo: i32, hi: i32| vec![SubGrid::linear(d, b, lo, hi)];
        let (bytes, grids, sub) = match ty {
            GgmlType::Q8_0 => {
                let b = block::<legacy::Q8_0>(x, w, keep_zeros);
                let g = one(f16_val(b.d), 0.0, -127, 127);
                (bytemuck::bytes_of(&b).to_vec(), g, QK)
            }
            GgmlType::Q4_0 => {
                let b = block::<legacy::Q4_0>(x, w, keep_zeros);
                let g = one(f16_val(b.d), 0.0, -8, 7);
                (bytemuck::bytes_of(&b).to_vec(), g, QK)
            }
            GgmlType::Q5_0 => {
                let b = block::<legacy::Q5_0>(x, w, keep_zeros);
                let g = one(f16_val(b.d), 0.0, -16, 15);
                (bytemuck::bytes_of(&b).to_vec(), g, QK)
            }
            GgmlType::Q4_1 => {
                let b = block::<legacy::Q4_1>(x, w, keep_zeros);
                let g = one(f16_val(b.d), f16_val(b.m), 0, 15);
                (bytemuck::bytes_of(&b).to_vec(), g, QK)
            }
            GgmlType::Q5_1 => {
                let b = block::<legacy::Q5_1>(x, w, keep_zeros);
                let g = one(f16_val(b.d), f16_val(b.m), 0, 31);
                (bytemuck::bytes_of(&b).to_vec(), g, QK)
            }
            GgmlType::IQ4_NL => {
                let b = block::<IQ4NL>(x, w, keep_zeros);
                let g = vec![SubGrid {
                    codebook: true,
                    ..SubGrid::linear(f16_val(b.d), 0.0, 0, 15)
                }];
                (bytemuck::bytes_of(&b).to_vec(), g, QK)
            }
            GgmlType::Q3_K => {
                let b = block::<Q3K>(x, w, keep_zeros);
                let d = f16_val(b.d);
                let g = q3k_scales(&b.scales)
                    .iter()
                    .map(|&sc| SubGrid::linear(d * sc as f32, 0.0, -4, 3))
                    .collect();
                (bytemuck::bytes_of(&b).to_vec(), g, 16)
            }
            GgmlType::Q4_K => {
                let b = block::<Q4K>(x, w, keep_zeros);
                let g = k_affine(b.d, b.dmin, &b.scales, 15);
                (bytemuck::bytes_of(&b).to_vec(), g, 32)
            }
            GgmlType::Q5_K => {
                let b = block::<Q5K>(x, w, keep_zeros);
                let g = k_affine(b.d, b.dmin, &b.scales, 31);
                (bytemuck::bytes_of(&b).to_vec(), g, 32)
            }
            GgmlType::Q6_K => {
                let b = block::<Q6K>(x, w, keep_zeros);
                let d = f16_val(b.d);
                let g = (0..16)
                    .map(|j| SubGrid::linear(d * b.scales[j] as f32, 0.0, -32, 31))
                    .collect();
                (bytemuck::bytes_of(&b).to_vec(), g, 16)
            }
            _ => return None,
        };
        Some(Self {
            ty,
            bytes,
            grids,
            sub,
        })
    }

    /// Values per block.
    pub fn len(&self) -> usize {
        self.grids.len() * self.sub
    }

    /// Whether the block holds no values (never: every type has a block).
    pub fn is_empty(&self) -> bool {
        self.grids.is_empty()
    }

    /// The level of position `i` nearest `x`, and its value.
    pub fn round(&self, i: usize, x: f32) -> (i32, f32) {
        self.grids[i / self.sub].round(x)
    }

    /// The block's bytes with `levels` (one per position, as [`Self::round`] gave them).
    pub fn encode(&self, levels: &[i32]) -> Vec<u8> {
        debug_assert_eq!(levels.len(), self.len());
        let at = |off: i32| -> Vec<u8> { levels.iter().map(|&q| (q + off) as u8).collect() };
        let b32 = |off: i32| -> [u8; QK] { at(off).try_into().expect("32 levels") };
        let b256 = |off: i32| -> [u8; QK_K] { at(off).try_into().expect("256 levels") };
        let bytes = &self.bytes;
        match self.ty {
            GgmlType::Q8_0 => repack(bytes, |b: &mut BlockQ8_0| {
                b.qs = std::array::from_fn(|j| levels[j] as i8)
            }),
            GgmlType::Q4_0 => repack(bytes, |b: &mut BlockQ4_0| b.qs = pack_nibbles(&b32(8))),
            GgmlType::Q5_0 => repack(bytes, |b: &mut BlockQ5_0| {
                let q = b32(16);
                (b.qh, b.qs) = (fifth_bits(&q), pack_nibbles(&q));
            }),
            GgmlType::Q4_1 => repack(bytes, |b: &mut BlockQ4_1| b.qs = pack_nibbles(&b32(0))),
            GgmlType::Q5_1 => repack(bytes, |b: &mut BlockQ5_1| {
                let q = b32(0);
                (b.qh, b.qs) = (fifth_bits(&q), pack_nibbles(&q));
            }),
            GgmlType::IQ4_NL => repack(bytes, |b: &mut BlockIQ4NL| b.qs = pack_nibbles(&b32(0))),
            GgmlType::Q3_K => repack(bytes, |b: &mut BlockQ3K| {
                (b.hmask, b.qs) = pack_q3k(&b256(4))
            }),
            GgmlType::Q4_K => repack(bytes, |b: &mut BlockQ4K| b.qs = pack_q4k(&b256(0))),
            GgmlType::Q5_K => repack(bytes, |b: &mut BlockQ5K| (b.qh, b.qs) = pack_q5k(&b256(0))),
            GgmlType::Q6_K => repack(bytes, |b: &mut BlockQ6K| (b.ql, b.qh) = pack_q6k(&b256(32))),
            _ => unreachable!("fix() builds supported types only"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Rng;
    use super::*;

    /// Rounding a block's own values on the header its quantizer chose gives that quantizer's
    /// bytes, for every type, with and without zero-keeping. Broken once by packing Q6_K's
    /// levels without the +32 offset: Q6_K failed.
    #[test]
    fn rounding_on_the_fixed_header_is_the_quantizers_block() {
        let mut rng = Rng(11);
        for ty in super::super::QUANTIZABLE
            .iter()
            .copied()
            .filter(|&t| supported(t))
        {
            let (n, _) = ty.block_layout().unwrap();
            for trial in 0..20 {
                let mut x: Vec<f32> = (0..n).map(|_| rng.normal() * 0.05).collect();
                let keep = trial % 2 == 1 && ty != GgmlType::IQ4_NL;
                if keep {
                    for v in x.iter_mut().step_by(3) {
                        *v = 0.0;
                    }
                }
                let w: Vec<f32> = (0..n).map(|_| 0.1 + rng.normal().abs()).collect();
                let fb = FixedBlock::fix(ty, &x, &w, keep).unwrap();
                assert_eq!(fb.len(), n);
                let levels: Vec<i32> = (0..n).map(|i| fb.round(i, x[i]).0).collect();
                let want = super::super::quantize(ty, &x, n, Some(&w)).unwrap();
                assert_eq!(fb.encode(&levels), want, "{ty:?} trial {trial}");
                // And the values `round` reports are the file's.
                let deq = super::super::dequantize(ty, &want, n);
                for i in 0..n {
                    assert_eq!(fb.round(i, x[i]).1, deq[i], "{ty:?} value {i}");
                }
            }
        }
    }
}
