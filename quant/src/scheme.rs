//! The integer quantization scheme of a linear weight: bits, grouping and symmetry, and the
//! arithmetic that turns a group of weights into integer codes, a scale and a zero point.

use serde::{Deserialize, Serialize};

/// How weights are quantized; written into every output so a student says what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantScheme {
    /// Bits per weight code, 2 to 8.
    pub bits: u8,
    /// Input channels per scale; `None` for one scale per output channel.
    pub group: Option<usize>,
    /// Symmetric (no zero point, codes centred on 2^(bits-1)) or asymmetric.
    pub sym: bool,
}

/// A scheme that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum SchemeError {
    /// Bits out of range.
    #[error("--bits {0} is not supported (2 to 8)")]
    Bits(u8),
    /// Group size zero.
    #[error("tensor `{tensor}`: group size {group} is invalid for its {cols} input channels")]
    Group {
        /// Tensor name.
        tensor: String,
        /// Group size.
        group: usize,
        /// Input channels.
        cols: usize,
    },
}

/// Scale and zero point of one group. Codes are unsigned `0..=qmax`; the value of code `q`
/// is `(q - zero) * scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupParams {
    /// Step between codes.
    pub scale: f32,
    /// Code of zero (2^(bits-1) when symmetric).
    pub zero: i32,
}

impl QuantScheme {
    /// Checks the bits.
    pub fn new(bits: u8, group: Option<usize>, sym: bool) -> Result<Self, SchemeError> {
        if !(2..=8).contains(&bits) {
            return Err(SchemeError::Bits(bits));
        }
        Ok(Self { bits, group, sym })
    }

    /// Largest code.
    pub fn qmax(&self) -> i32 {
        (1 << self.bits) - 1
    }

    /// Input channels per group for a weight with `cols` inputs. When `cols` is not a
    /// multiple of the group size the last group holds the remainder (576 = 4 x 128 + 64),
    /// `ceil(cols / group)` scales per row. (compressed-tensors needs whole groups; the
    /// packed writer stores such layers with groups of gcd(group, cols) and repeated scales.)
    pub fn group_len(&self, tensor: &str, cols: usize) -> Result<usize, SchemeError> {
        match self.group {
            None => Ok(cols),
            Some(g) if g > 0 => Ok(g.min(cols)),
            Some(g) => Err(SchemeError::Group {
                tensor: tensor.into(),
                group: g,
                cols,
            }),
        }
    }

    /// Groups per row for a weight with `cols` inputs.
    pub fn groups(&self, cols: usize) -> usize {
        cols.div_ceil(self.group.unwrap_or(cols).clamp(1, cols.max(1)))
    }

    /// Scale and zero point for a group of weights (min/max, as GPTQ and AWQ compute them).
    pub fn params(&self, w: impl Iterator<Item = f32> + Clone) -> GroupParams {
        let qmax = self.qmax();
        if self.sym {
            let amax = w.fold(0f32, |m, v| m.max(v.abs()));
            let scale = if amax > 0.0 {
                2.0 * amax / qmax as f32
            } else {
                1.0
            };
            GroupParams {
                scale,
                zero: (qmax + 1) / 2,
            }
        } else {
            let (lo, hi) = w.fold((0f32, 0f32), |(lo, hi), v| (lo.min(v), hi.max(v)));
            let range = hi - lo;
            let scale = if range > 0.0 {
                range / qmax as f32
            } else {
                1.0
            };
            let zero = ((-lo / scale).round() as i32).clamp(0, qmax);
            GroupParams { scale, zero }
        }
    }

    /// The code of `w`.
    #[inline]
    pub fn code(&self, w: f32, p: GroupParams) -> u8 {
        ((w / p.scale).round() as i32 + p.zero).clamp(0, self.qmax()) as u8
    }

    /// The value of a code.
    #[inline]
    pub fn value(code: u8, p: GroupParams) -> f32 {
        (code as i32 - p.zero) as f32 * p.scale
    }

    /// Rounds `w` to the nearest representable value.
    #[inline]
    pub fn fake(&self, w: f32, p: GroupParams) -> f32 {
        Self::value(self.code(w, p), p)
    }

    /// Effective bits per weight including one scale (16 bits) per group and, if asymmetric,
    /// one zero point of `bits` bits per group.
    pub fn bits_per_weight(&self, cols: usize) -> f64 {
        let g = cols as f64 / self.groups(cols) as f64;
        self.bits as f64 + 16.0 / g + if self.sym { 0.0 } else { self.bits as f64 / g }
    }

    /// A short label, e.g. `W4 g128 asym`.
    pub fn label(&self) -> String {
        let g = self
            .group
            .map_or("per-channel".to_string(), |g| format!("g{g}"));
        format!(
            "W{} {g} {}",
            self.bits,
            if self.sym { "sym" } else { "asym" }
        )
    }
}

/// A linear weight in integer form: codes in the original column order, and per-group
/// parameters. `g_idx[c]` names the group of input column `c` (not always `c / group`:
/// GPTQ's activation order groups columns in the order it visits them).
#[derive(Debug, Clone)]
pub struct QuantizedLinear {
    /// Output channels.
    pub rows: usize,
    /// Input channels.
    pub cols: usize,
    /// `rows * cols` codes, row-major.
    pub codes: Vec<u8>,
    /// `rows * groups` parameters, row-major.
    pub params: Vec<GroupParams>,
    /// Groups per row.
    pub groups: usize,
    /// Group of each input column.
    pub g_idx: Vec<u32>,
    /// The unrounded values the codes were rounded from (`rows * cols`, row-major), when the
    /// method keeps them: GPTQ with `keep_latent` (its error-updated weights; each code is
    /// `scheme.code(latent, params)`), where QAT can start its latent weights.
    pub latent: Option<Vec<f32>>,
    /// The weight as GGUF blocks instead of codes (GPTQ into a GGUF type,
    /// [`crate::gguf_grid`]): then `codes`, `params` and `g_idx` are empty.
    pub blocks: Option<GgufBlocks>,
}

/// A weight stored as GGUF blocks of one type, rows of whole blocks.
#[derive(Debug, Clone)]
pub struct GgufBlocks {
    /// The block type.
    pub ty: model::gguf::GgmlType,
    /// The bytes of every row, row-major.
    pub bytes: Vec<u8>,
}

impl QuantizedLinear {
    /// Bits per weight of its stored form: the blocks' bytes, or `scheme`'s codes, scales and
    /// zero points.
    pub fn bits_per_weight(&self, scheme: &QuantScheme) -> f64 {
        match &self.blocks {
            Some(b) => b.bytes.len() as f64 * 8.0 / (self.rows * self.cols) as f64,
            None => scheme.bits_per_weight(self.cols),
        }
    }

    /// The dequantized weight, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        if let Some(b) = &self.blocks {
            return crate::blocks::dequantize(b.ty, &b.bytes, self.rows * self.cols);
        }
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let p = self.params[r * self.groups + self.g_idx[c] as usize];
                out[r * self.cols + c] = QuantScheme::value(self.codes[r * self.cols + c], p);
            }
        }
        out
    }
}

/// Round-to-nearest of a whole weight `[rows, cols]` with contiguous groups.
pub fn quantize_rtn(
    scheme: &QuantScheme,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<QuantizedLinear, SchemeError> {
    use rayon::prelude::*;
    let g = scheme.group_len(name, cols)?;
    let groups = cols.div_ceil(g);
    let mut codes = vec![0u8; rows * cols];
    let mut params = vec![
        GroupParams {
            scale: 1.0,
            zero: 0
        };
        rows * groups
    ];
    codes
        .par_chunks_mut(cols)
        .zip(params.par_chunks_mut(groups))
        .enumerate()
        .for_each(|(r, (cr, pr))| {
            let row = &w[r * cols..(r + 1) * cols];
            for k in 0..groups {
                let end = ((k + 1) * g).min(cols);
                let seg = &row[k * g..end];
                let p = scheme.params(seg.iter().copied());
                pr[k] = p;
                for (c, &v) in cr[k * g..end].iter_mut().zip(seg) {
                    *c = scheme.code(v, p);
                }
            }
        });
    Ok(QuantizedLinear {
        rows,
        cols,
        codes,
        params,
        groups,
        g_idx: (0..cols).map(|c| (c / g) as u32).collect(),
        latent: None,
        blocks: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asym_codes_cover_min_and_max() {
        let s = QuantScheme::new(4, None, false).unwrap();
        let w = [-1.0f32, 0.5, 2.0];
        let p = s.params(w.iter().copied());
        assert_eq!(s.code(-1.0, p), 0);
        assert_eq!(s.code(2.0, p), 15);
        assert!((s.fake(2.0, p) - 2.0).abs() < p.scale);
        assert!((s.fake(0.0, p)).abs() < 1e-6, "zero is exact");
    }

    #[test]
    fn sym_is_centred() {
        let s = QuantScheme::new(4, Some(2), true).unwrap();
        let p = s.params([0.3f32, -0.6].into_iter());
        assert_eq!(p.zero, 8);
        assert!((s.fake(-0.6, p) + 0.6).abs() <= p.scale / 2.0 + 1e-6);
    }

    #[test]
    fn rtn_error_is_bounded_by_half_a_step() {
        let s = QuantScheme::new(3, Some(4), false).unwrap();
        let w: Vec<f32> = (0..32)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let q = quantize_rtn(&s, "w", &w, 4, 8).unwrap();
        let d = q.dequantize();
        for r in 0..4 {
            for c in 0..8 {
                let p = q.params[r * 2 + c / 4];
                assert!((d[r * 8 + c] - w[r * 8 + c]).abs() <= p.scale / 2.0 + 1e-6);
            }
        }
    }

    #[test]
    fn bad_bits_and_groups_are_errors() {
        assert!(QuantScheme::new(9, None, true).is_err());
        assert!(QuantScheme::new(1, None, true).is_err());
        let s = QuantScheme::new(4, Some(0), true).unwrap();
        let e = s
            .group_len("model.layers.0.mlp.down_proj.weight", 1536)
            .unwrap_err();
        assert!(e.to_string().contains("down_proj") && e.to_string().contains("1536"));
    }

    #[test]
    fn a_partial_last_group_gets_its_own_scale() {
        let s = QuantScheme::new(4, Some(128), false).unwrap();
        assert_eq!(s.groups(576), 5);
        let w: Vec<f32> = (0..576)
            .map(|i| {
                if i >= 512 {
                    100.0 + i as f32
                } else {
                    (i % 7) as f32 * 0.01
                }
            })
            .collect();
        let q = quantize_rtn(&s, "w", &w, 1, 576).unwrap();
        assert_eq!(q.groups, 5);
        assert_eq!(q.g_idx[575], 4);
        // The large values of the last 64 columns do not spoil the small ones' scale.
        assert!(q.params[0].scale < 0.01);
        let d = q.dequantize();
        assert!((d[3] - w[3]).abs() < 0.005);
    }
}
