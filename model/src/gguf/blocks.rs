//! GGUF block formats, written down once as `#[repr(C)]` structs whose sizes the compiler
//! checks, each with its dequantization to f32. Layouts and arithmetic follow llama.cpp's
//! `ggml-common.h` and `dequantize_row_*` in `ggml-quants.c`; the fixtures in
//! `tests/fixtures/dequant` (from PyPI `gguf.quants.dequantize`) pin the results.
//!
//! They live in `model` (not `quant`) because reading a GGUF checkpoint needs them and `model`
//! is the foundation every other crate builds on; `quant` adds the quantizers on top.

use half::f16;

/// Values per block of the legacy 32-wide formats.
pub const QK: usize = 32;
/// Values per super-block of the K formats.
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit scales and mins in Q4_K/Q5_K.
pub const K_SCALE_SIZE: usize = 12;

/// A block type: its byte layout and how to expand one block to f32.
pub trait GgmlBlock: bytemuck::Pod {
    /// Values per block.
    const BLOCK: usize;
    /// Writes `Self::BLOCK` values into `out`.
    fn dequantize(&self, out: &mut [f32]);
}

/// `block_q8_0`: 32 signed bytes and one f16 scale.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: u16,
    /// Quantized values.
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// `block_q4_0`: 32 4-bit values with an implicit offset of 8, one f16 scale.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: u16,
    /// Low nibbles hold values 0..16, high nibbles 16..32.
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

/// `block_q4_1`: 32 4-bit values with an f16 scale and an f16 minimum.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: u16,
    /// Minimum.
    pub m: u16,
    /// Low nibbles hold values 0..16, high nibbles 16..32.
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

/// `block_q5_0`: 32 5-bit values (offset 16): 4 low bits in `qs`, the fifth in `qh`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ5_0 {
    /// Scale.
    pub d: u16,
    /// Fifth bits, little-endian u32.
    pub qh: [u8; 4],
    /// Low nibbles.
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

/// `block_q5_1`: 32 5-bit values with scale and minimum.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ5_1 {
    /// Scale.
    pub d: u16,
    /// Minimum.
    pub m: u16,
    /// Fifth bits, little-endian u32.
    pub qh: [u8; 4],
    /// Low nibbles.
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);

/// `block_q3_K`: 256 3-bit values in 16 sub-blocks of 16 with 6-bit signed sub-scales.
/// Value `i` has its low two bits at `qs[32 (i / 128) + i % 32] >> 2 ((i % 128) / 32)` and its
/// high bit at `hmask[i % 32] >> (i / 32)`; level `low + 4 high - 4` (-4..=3) times
/// `d * (scale of sub-block i / 16)`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ3K {
    /// High bits.
    pub hmask: [u8; QK_K / 8],
    /// Low 2 bits.
    pub qs: [u8; QK_K / 4],
    /// Packed 6-bit sub-scales (each stored plus 32).
    pub scales: [u8; K_SCALE_SIZE],
    /// Super-block scale.
    pub d: u16,
}
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);

/// Q3_K's 16 sub-scales (`-32..=31`) from their packing (llama.cpp's `kmask` unpacking): the
/// low 4 bits of sub-block `j` in byte `j % 8` (low nibble for `j < 8`, high nibble after),
/// the top 2 bits in byte `8 + j % 4` at bit `2 (j / 4)`.
pub fn q3k_scales(q: &[u8; K_SCALE_SIZE]) -> [i8; 16] {
    std::array::from_fn(|j| {
        let lo = if j < 8 { q[j] & 0x0f } else { q[j - 8] >> 4 };
        let hi = (q[8 + j % 4] >> (2 * (j / 4))) & 3;
        ((lo | (hi << 4)) as i32 - 32) as i8
    })
}

/// `block_q4_K`: 256 values in 8 sub-blocks of 32, 6-bit sub-scales and sub-mins.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ4K {
    /// Super-block scale of the sub-scales.
    pub d: u16,
    /// Super-block scale of the sub-mins.
    pub dmin: u16,
    /// Packed 6-bit sub-scales and sub-mins.
    pub scales: [u8; K_SCALE_SIZE],
    /// 4-bit values.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

/// `block_q5_K`: as Q4_K with a fifth bit per value.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ5K {
    /// Super-block scale of the sub-scales.
    pub d: u16,
    /// Super-block scale of the sub-mins.
    pub dmin: u16,
    /// Packed 6-bit sub-scales and sub-mins.
    pub scales: [u8; K_SCALE_SIZE],
    /// Fifth bits.
    pub qh: [u8; QK_K / 8],
    /// Low 4 bits.
    pub qs: [u8; QK_K / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);

/// `block_q6_K`: 256 6-bit values in 16 sub-blocks of 16 with 8-bit sub-scales.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockQ6K {
    /// Low 4 bits.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits.
    pub qh: [u8; QK_K / 4],
    /// Sub-block scales.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale.
    pub d: u16,
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

/// IQ4_NL's codebook (llama.cpp `kvalues_iq4nl`): 16 non-uniform int8 levels, denser near 0,
/// which a block's f16 scale multiplies.
pub const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// `block_iq4_nl`: 32 4-bit indices into [`IQ4_NL_VALUES`] and one f16 scale.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BlockIQ4NL {
    /// Scale.
    pub d: u16,
    /// Low nibbles index values 0..16, high nibbles 16..32.
    pub qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockIQ4NL>() == 18);

#[inline]
fn h(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

impl GgmlBlock for BlockQ8_0 {
    const BLOCK: usize = QK;
    fn dequantize(&self, out: &mut [f32]) {
        let d = h(self.d);
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }
}

impl GgmlBlock for BlockQ4_0 {
    const BLOCK: usize = QK;
    fn dequantize(&self, out: &mut [f32]) {
        let d = h(self.d);
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
            out[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

impl GgmlBlock for BlockIQ4NL {
    const BLOCK: usize = QK;
    fn dequantize(&self, out: &mut [f32]) {
        let d = h(self.d);
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = d * IQ4_NL_VALUES[(q & 0x0f) as usize] as f32;
            out[j + QK / 2] = d * IQ4_NL_VALUES[(q >> 4) as usize] as f32;
        }
    }
}

impl GgmlBlock for BlockQ4_1 {
    const BLOCK: usize = QK;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (h(self.d), h(self.m));
        for (j, &q) in self.qs.iter().enumerate() {
            out[j] = (q & 0x0f) as f32 * d + m;
            out[j + QK / 2] = (q >> 4) as f32 * d + m;
        }
    }
}

impl GgmlBlock for BlockQ5_0 {
    const BLOCK: usize = QK;
    fn dequantize(&self, out: &mut [f32]) {
        let d = h(self.d);
        let qh = u32::from_le_bytes(self.qh);
        for (j, &q) in self.qs.iter().enumerate() {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            out[j] = (((q & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
            out[j + QK / 2] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

impl GgmlBlock for BlockQ5_1 {
    const BLOCK: usize = QK;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (h(self.d), h(self.m));
        let qh = u32::from_le_bytes(self.qh);
        for (j, &q) in self.qs.iter().enumerate() {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            out[j] = ((q & 0x0f) as u32 | h0) as f32 * d + m;
            out[j + QK / 2] = ((q >> 4) as u32 | h1) as f32 * d + m;
        }
    }
}

/// Unpacks sub-block `j`'s 6-bit scale and min (llama.cpp `get_scale_min_k4`).
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

impl GgmlBlock for BlockQ3K {
    const BLOCK: usize = QK_K;
    fn dequantize(&self, out: &mut [f32]) {
        let d = h(self.d);
        let sc = q3k_scales(&self.scales);
        for (i, o) in out.iter_mut().enumerate().take(QK_K) {
            let low = (self.qs[32 * (i / 128) + i % 32] >> (2 * ((i % 128) / 32))) & 3;
            let high = (self.hmask[i % 32] >> (i / 32)) & 1;
            let level = (low + 4 * high) as i32 - 4;
            *o = d * sc[i / 16] as f32 * level as f32;
        }
    }
}

impl GgmlBlock for BlockQ4K {
    const BLOCK: usize = QK_K;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (h(self.d), h(self.dmin));
        for j in 0..QK_K / 64 {
            let (sc1, m1) = scale_min_k4(2 * j, &self.scales);
            let (sc2, m2) = scale_min_k4(2 * j + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let q = &self.qs[32 * j..32 * j + 32];
            let o = &mut out[64 * j..64 * j + 64];
            for l in 0..32 {
                o[l] = d1 * (q[l] & 0x0f) as f32 - m1;
                o[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

impl GgmlBlock for BlockQ5K {
    const BLOCK: usize = QK_K;
    fn dequantize(&self, out: &mut [f32]) {
        let (d, dmin) = (h(self.d), h(self.dmin));
        for j in 0..QK_K / 64 {
            let (sc1, m1) = scale_min_k4(2 * j, &self.scales);
            let (sc2, m2) = scale_min_k4(2 * j + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
            let ql = &self.qs[32 * j..32 * j + 32];
            let o = &mut out[64 * j..64 * j + 64];
            for l in 0..32 {
                let hi1 = if self.qh[l] & u1 != 0 { 16 } else { 0 };
                let hi2 = if self.qh[l] & u2 != 0 { 16 } else { 0 };
                o[l] = d1 * ((ql[l] & 0x0f) + hi1) as f32 - m1;
                o[l + 32] = d2 * ((ql[l] >> 4) + hi2) as f32 - m2;
            }
        }
    }
}

impl GgmlBlock for BlockQ6K {
    const BLOCK: usize = QK_K;
    fn dequantize(&self, out: &mut [f32]) {
        let d = h(self.d);
        for n in 0..QK_K / 128 {
            let ql = &self.ql[64 * n..64 * n + 64];
            let qh = &self.qh[32 * n..32 * n + 32];
            let sc = &self.scales[8 * n..8 * n + 8];
            let o = &mut out[128 * n..128 * n + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                o[l] = d * sc[is] as f32 * q1 as f32;
                o[l + 32] = d * sc[is + 2] as f32 * q2 as f32;
                o[l + 64] = d * sc[is + 4] as f32 * q3 as f32;
                o[l + 96] = d * sc[is + 6] as f32 * q4 as f32;
            }
        }
    }
}

/// Expands a byte slice of whole blocks into `out` (one block per `B::BLOCK` values), in
/// parallel over rows of blocks.
pub fn dequantize_blocks<B: GgmlBlock + Sync>(bytes: &[u8], out: &mut [f32]) {
    use rayon::prelude::*;
    let size = std::mem::size_of::<B>();
    debug_assert_eq!(bytes.len() / size * B::BLOCK, out.len());
    // Chunks of blocks per task keep the rayon overhead small; unaligned reads because the
    // mmap offset of a GGUF tensor is only guaranteed to be 32-byte aligned, not align_of.
    const PER_TASK: usize = 256;
    out.par_chunks_mut(B::BLOCK * PER_TASK)
        .zip(bytes.par_chunks(size * PER_TASK))
        .for_each(|(o, b)| {
            for (ob, bb) in o.chunks_exact_mut(B::BLOCK).zip(b.chunks_exact(size)) {
                let block: B = bytemuck::pod_read_unaligned(bb);
                block.dequantize(ob);
            }
        });
}
