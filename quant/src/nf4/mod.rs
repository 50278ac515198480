//! bitsandbytes-style data-free schemes: NF4 and FP4 (block-wise absmax scaling of a
//! 16-entry codebook, QLoRA's double quantization of the absmax values) and `int8-absmax`
//! (one absmax per row, 8-bit integer codes).
//!
//! - **NF4** (NormalFloat-4, QLoRA, arXiv:2305.14314): each block of `block` consecutive
//!   values of the row-major weight is divided by its absmax, and every value becomes the
//!   index of the nearest of 16 asymmetric quantiles of N(0, 1) with an exact zero.
//! - **FP4**: the same with bitsandbytes' e2m1 table (1 sign, 2 exponent, 1 mantissa bit).
//! - **Double quantization** (QLoRA): the f32 absmax values, minus their mean (kept as
//!   `offset`), are quantized to 8 bits with bitsandbytes' dynamic map in blocks of 256.
//! - **int8-absmax**: bitsandbytes' 8-bit weights (`Int8Params`, LLM.int8's weight format:
//!   `round(127 w / absmax_row)` with one f32 absmax per row). LLM.int8's outlier
//!   decomposition concerns activations at inference time and is not part of the weights,
//!   so it is left out.
//!
//! Rounding follows bitsandbytes' CPU reference (`backends/default/ops.py`): values scaled
//! by `1 / absmax` in f32, clamped to [-1, 1], then bucketed against the f32 midpoints of
//! the sorted codebook (a value on a midpoint goes to the lower entry). The 4-bit codes are
//! always computed from the exact absmax; double quantization only changes the absmax the
//! codes are multiplied by when dequantizing, as in bitsandbytes.

pub mod bnb;
pub mod stage;

use serde::{Deserialize, Serialize};

use crate::QuantError;

/// NF4 codebook, in code order (index = 4-bit code). The values of bitsandbytes'
/// `get_4bit_type("nf4")` (`bitsandbytes/functional.py`, also listed in the QLoRA paper's
/// appendix): `create_normal_map(offset=0.9677083)`, 8 positive and 7 negative quantiles of
/// N(0, 1) normalised to [-1, 1], plus an exact zero.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 (e2m1) codebook in code order, as bitsandbytes' `get_4bit_type("fp4")`: bit 3 is the
/// sign, the low 3 bits select 0, 0.0625, 8, 12, 4, 6, 2, 3 (exponent bias 2, one subnormal),
/// all divided by 12 so that the largest is 1.
pub const FP4: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0, // 12 / 12
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    -0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0, // -12 / 12
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// Values per block of the double-quantized absmax values (QLoRA, bitsandbytes).
pub const NESTED_BLOCK: usize = 256;

/// Block sizes bitsandbytes' 4-bit kernels accept.
pub const BNB_BLOCKS: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8)`, Dettmers 2015, arXiv:1511.04561), sorted: for
/// exponents 10^-6 .. 10^0, the midpoints of 2^i + 1 evenly spaced points in [0.1, 1] (i = 0..6),
/// both signs, plus 0 and 1. Computed in f32 in the same order as torch does, so the values
/// are bitsandbytes' bit for bit (checked by `scripts/check_bnb.py`).
pub fn dynamic_map() -> [f32; 256] {
    // torch.linspace on the CPU: the first half counts up from `start`, the second down from
    // `end`, each a fused multiply-add in f32.
    fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
        let step = (end - start) / (steps - 1) as f32;
        (0..steps)
            .map(|i| {
                if i < steps / 2 {
                    step.mul_add(i as f32, start)
                } else {
                    (-step).mul_add((steps - i - 1) as f32, end)
                }
            })
            .collect()
    }
    let mut data = Vec::with_capacity(256);
    for i in 0..7 {
        let b = linspace(0.1, 1.0, (1 << i) + 1);
        let scale = 10f64.powi(i - 6) as f32;
        for k in 0..b.len() - 1 {
            let mean = (b[k] + b[k + 1]) / 2.0;
            data.push(scale * mean);
            data.push(-(scale * mean));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("256 entries")
}

/// The data-free bitsandbytes schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BnbType {
    /// NormalFloat-4 codebook, block-wise absmax.
    Nf4,
    /// FP4 (e2m1) codebook, block-wise absmax.
    Fp4,
    /// 8-bit integers, one absmax per row.
    Int8Absmax,
}

impl BnbType {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
            Self::Int8Absmax => "int8-absmax",
        }
    }

    /// The 16-entry codebook of a 4-bit type.
    pub fn codebook(self) -> Option<&'static [f32; 16]> {
        match self {
            Self::Nf4 => Some(&NF4),
            Self::Fp4 => Some(&FP4),
            Self::Int8Absmax => None,
        }
    }
}

/// A bitsandbytes scheme with its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BnbScheme {
    /// The codebook or integer type.
    #[serde(rename = "type")]
    pub ty: BnbType,
    /// Values per absmax block (4-bit types); `None` for int8-absmax's one absmax per row.
    pub block: Option<usize>,
    /// QLoRA double quantization of the absmax values (4-bit types).
    pub double_quant: bool,
}

/// Nearest-entry rounding for a codebook: the sorted distinct entries with their codes, and
/// the f32 midpoints between neighbours (what bitsandbytes buckets against).
struct Rounder {
    codes: Vec<u8>,
    bounds: Vec<f32>,
}

impl Rounder {
    fn new(table: &[f32]) -> Self {
        let mut order: Vec<usize> = (0..table.len()).collect();
        // By value, then by code; of FP4's +0 and -0 only +0 (code 0) is kept.
        order.sort_by(|&a, &b| {
            table[a]
                .partial_cmp(&table[b])
                .expect("finite")
                .then(a.cmp(&b))
        });
        order.dedup_by(|b, a| table[*a] == table[*b]);
        let bounds = order
            .windows(2)
            .map(|p| (table[p[0]] + table[p[1]]) / 2.0)
            .collect();
        Self {
            codes: order.iter().map(|&i| i as u8).collect(),
            bounds,
        }
    }

    /// The code of a scaled value in [-1, 1]: the first bucket whose upper bound is >= x.
    #[inline]
    fn code(&self, x: f32) -> u8 {
        self.codes[self.bounds.partition_point(|&b| b < x)]
    }
}

/// Double-quantized absmax values of one tensor (QLoRA): `absmax[i] ≈
/// map[codes[i]] * nested_absmax[i / 256] + offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code per block, an index into [`dynamic_map`].
    pub codes: Vec<u8>,
    /// One f32 absmax per 256 codes (the last group may be shorter).
    pub nested_absmax: Vec<f32>,
    /// The mean of the absmax values, subtracted before quantizing them.
    pub offset: f32,
}

impl DoubleQuant {
    /// Quantizes absmax values as bitsandbytes' `quantize_4bit(compress_statistics=True)`.
    pub fn quantize(absmax: &[f32]) -> Self {
        let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64;
        let offset = mean as f32;
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let map = dynamic_map();
        let rounder = Rounder::new(&map);
        let mut codes = Vec::with_capacity(centred.len());
        let mut nested_absmax = Vec::with_capacity(centred.len().div_ceil(NESTED_BLOCK));
        for chunk in centred.chunks(NESTED_BLOCK) {
            let am = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            // bitsandbytes multiplies full blocks by the reciprocal and divides the last,
            // partial one (whose stored absmax it clamps to 1e-38).
            let (am, scaled): (f32, Box<dyn Fn(f32) -> f32>) = if chunk.len() == NESTED_BLOCK {
                let r = 1.0 / am.max(1e-38);
                (am, Box::new(move |v| v * r))
            } else {
                let am = am.max(1e-38);
                (am, Box::new(move |v| v / am))
            };
            nested_absmax.push(am);
            codes.extend(
                chunk
                    .iter()
                    .map(|&v| rounder.code(scaled(v).clamp(-1.0, 1.0))),
            );
        }
        Self {
            codes,
            nested_absmax,
            offset,
        }
    }

    /// The absmax values the codes stand for (bitsandbytes' `dequantize_blockwise` + offset).
    pub fn absmax(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| map[c as usize] * self.nested_absmax[i / NESTED_BLOCK] + self.offset)
            .collect()
    }
}

/// The scale of each block: plain f32 absmax values, or double-quantized ones.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantization.
    Double(DoubleQuant),
}

/// A linear weight in a bitsandbytes scheme.
#[derive(Debug, Clone)]
pub struct BnbLinear {
    /// The scheme.
    pub scheme: BnbScheme,
    /// Output channels.
    pub rows: usize,
    /// Input channels.
    pub cols: usize,
    /// One code per weight, row-major: a 4-bit codebook index, or for int8-absmax the
    /// int8 value's two's-complement byte.
    pub codes: Vec<u8>,
    /// Block scales (int8-absmax: one per row, never double-quantized).
    pub absmax: Absmax,
}

impl BnbScheme {
    /// Checks the options: 4-bit types take a block bitsandbytes accepts (default 64) and
    /// optional double quantization; int8-absmax takes neither.
    pub fn new(ty: BnbType, block: Option<usize>, double_quant: bool) -> Result<Self, QuantError> {
        if ty == BnbType::Int8Absmax {
            if block.is_some() || double_quant {
                return Err(QuantError::Input(format!(
                    "--scheme int8-absmax has one absmax per row; {} does not apply",
                    if block.is_some() {
                        "--block"
                    } else {
                        "--double-quant"
                    }
                )));
            }
            return Ok(Self {
                ty,
                block: None,
                double_quant: false,
            });
        }
        let block = block.unwrap_or(64);
        if !BNB_BLOCKS.contains(&block) {
            return Err(QuantError::Input(format!(
                "--block {block}: bitsandbytes' 4-bit blocks are 32, 64, 128, 256, 512, 1024, 2048 or 4096 values"
            )));
        }
        Ok(Self {
            ty,
            block: Some(block),
            double_quant,
        })
    }

    /// A short label, e.g. `nf4 b64 dq`.
    pub fn label(&self) -> String {
        match self.block {
            None => format!("{} per-row", self.ty.name()),
            Some(b) => format!(
                "{} b{b}{}",
                self.ty.name(),
                if self.double_quant { " dq" } else { "" }
            ),
        }
    }

    /// Code bits per weight.
    pub fn code_bits(&self) -> u32 {
        if self.ty == BnbType::Int8Absmax { 8 } else { 4 }
    }

    /// Errors unless every block lies within one row (the block divides the width).
    pub fn check_width(&self, tensor: &str, cols: usize) -> Result<(), QuantError> {
        match self.block {
            Some(b) if !cols.is_multiple_of(b) => Err(QuantError::Input(format!(
                "tensor `{tensor}`: --block {b} does not divide its {cols} input columns"
            ))),
            _ => Ok(()),
        }
    }

    /// Bits per weight as the QLoRA paper counts them, for blocks that fill whole nested
    /// blocks: `4 + 32/block`, with double quantization `4 + 8/block + 32/(block * 256)`
    /// (4.127 at block 64). `None` for int8-absmax, whose overhead depends on the width.
    pub fn nominal_bits_per_weight(&self) -> Option<f64> {
        let b = self.block? as f64;
        Some(if self.double_quant {
            4.0 + 8.0 / b + 32.0 / (b * NESTED_BLOCK as f64)
        } else {
            4.0 + 32.0 / b
        })
    }

    /// Exact stored bits per weight of one `[rows, cols]` tensor: codes, absmax values, and
    /// with double quantization the 8-bit absmax codes, one f32 per (possibly partial) group
    /// of 256 of them and the f32 offset. The codebooks themselves (16 and 256 f32 values per
    /// tensor in the bitsandbytes file) are format constants and not counted, as in the paper.
    pub fn bits_per_weight(&self, rows: usize, cols: usize) -> f64 {
        let n = (rows * cols) as f64;
        let bits = match self.block {
            None => 8.0 * n + 32.0 * rows as f64,
            Some(b) => {
                let blocks = (rows * cols).div_ceil(b);
                let scale_bits = if self.double_quant {
                    8 * blocks + 32 * blocks.div_ceil(NESTED_BLOCK) + 32
                } else {
                    32 * blocks
                };
                4.0 * n + scale_bits as f64
            }
        };
        bits / n.max(1.0)
    }
}

/// Quantizes a `[rows, cols]` row-major weight `w` (named `name` in errors).
pub fn quantize(
    scheme: &BnbScheme,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<BnbLinear, QuantError> {
    use rayon::prelude::*;
    if w.len() != rows * cols {
        return Err(QuantError::Input(format!(
            "tensor `{name}`: {} values for shape [{rows}, {cols}]",
            w.len()
        )));
    }
    scheme.check_width(name, cols)?;
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::Numerical(format!(
            "tensor `{name}`: non-finite value at index {i}"
        )));
    }
    let Some(table) = scheme.ty.codebook() else {
        // int8-absmax: round(w * (127 / absmax)), half to even as torch.round.
        let mut codes = vec![0u8; w.len()];
        let mut absmax = vec![0f32; rows];
        codes
            .par_chunks_mut(cols.max(1))
            .zip(absmax.par_iter_mut())
            .zip(w.par_chunks(cols.max(1)))
            .for_each(|((c, a), row)| {
                *a = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let k = 127.0 / *a;
                for (c, &v) in c.iter_mut().zip(row) {
                    let q = if *a > 0.0 {
                        (v * k).round_ties_even()
                    } else {
                        0.0
                    };
                    *c = (q.clamp(-127.0, 127.0) as i8) as u8;
                }
            });
        return Ok(BnbLinear {
            scheme: *scheme,
            rows,
            cols,
            codes,
            absmax: Absmax::Plain(absmax),
        });
    };
    let b = scheme.block.expect("4-bit types have blocks");
    let rounder = Rounder::new(table);
    let mut codes = vec![0u8; w.len()];
    let mut absmax = vec![0f32; w.len() / b];
    codes
        .par_chunks_mut(b)
        .zip(absmax.par_iter_mut())
        .zip(w.par_chunks(b))
        .for_each(|((c, a), blk)| {
            *a = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let r = 1.0 / a.max(1e-38);
            for (c, &v) in c.iter_mut().zip(blk) {
                *c = rounder.code((v * r).clamp(-1.0, 1.0));
            }
        });
    let absmax = if scheme.double_quant {
        Absmax::Double(DoubleQuant::quantize(&absmax))
    } else {
        Absmax::Plain(absmax)
    };
    Ok(BnbLinear {
        scheme: *scheme,
        rows,
        cols,
        codes,
        absmax,
    })
}

impl BnbLinear {
    /// The absmax value each block (int8-absmax: each row) is dequantized with.
    pub fn scales(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double(d) => d.absmax(),
        }
    }

    /// Values per scale.
    pub fn block(&self) -> usize {
        self.scheme.block.unwrap_or(self.cols)
    }

    /// The dequantized weight, row-major, as bitsandbytes computes it in f32
    /// (`code * absmax`; int8-absmax: `(q * absmax) / 127` as `int8_vectorwise_dequant`).
    pub fn dequantize(&self) -> Vec<f32> {
        let scales = self.scales();
        let b = self.block().max(1);
        match self.scheme.ty.codebook() {
            Some(t) => self
                .codes
                .iter()
                .enumerate()
                .map(|(i, &c)| t[c as usize] * scales[i / b])
                .collect(),
            None => {
                // bitsandbytes multiplies by the f32 constant 1/127 rather than dividing.
                let inv = 1.0f32 / 127.0;
                self.codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| (c as i8 as f32 * scales[i / b]) * inv)
                    .collect()
            }
        }
    }

    /// 4-bit codes two per byte in bitsandbytes' order: the first value of each pair in the
    /// high nibble. Errors for int8-absmax.
    pub fn packed(&self) -> Result<Vec<u8>, QuantError> {
        if self.scheme.code_bits() != 4 {
            return Err(QuantError::Input(format!(
                "{} codes are bytes, not nibbles",
                self.scheme.ty.name()
            )));
        }
        Ok(self
            .codes
            .chunks(2)
            .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(0))
            .collect())
    }
}

#[cfg(test)]
mod tests;
