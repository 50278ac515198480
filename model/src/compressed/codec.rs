//! The pure parts of the two compressed-tensors layouts: the little-endian bit stream of
//! `pack-quantized` codes, the dequantization of a packed linear, and the scatter of a
//! `sparse-bitmask` linear's values. Every length is checked against the shape before
//! anything is allocated or indexed; a disagreement is a [`PartError`] naming the part.

use rayon::prelude::*;

/// Code widths read from `pack-quantized` folders (and written by the quant crate). 2, 4 and
/// 8 bits divide 32, so the dense packing of compressed-tensors >= 0.19 and the 32/bits
/// codes per word of earlier versions agree.
pub const PACKED_BITS: [u8; 3] = [2, 4, 8];

/// A stored part of a compressed linear that disagrees with the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartError {
    /// The part's suffix (`weight_packed`, `weight_g_idx`, `row_offsets`, ...).
    pub part: &'static str,
    /// What is wrong, in words.
    pub msg: String,
}

impl std::fmt::Display for PartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.part, self.msg)
    }
}

fn part_err<T>(part: &'static str, msg: String) -> Result<T, PartError> {
    Err(PartError { part, msg })
}

/// Number of 32-bit words holding `n` codes of `bits` bits (saturating: a count no file can
/// hold never equals a stored one).
pub fn packed_words(n: usize, bits: u8) -> usize {
    n.saturating_mul(bits as usize).div_ceil(32)
}

/// Packs codes (each below `2^bits`) into `out` (`packed_words(n, bits)` words) as one
/// little-endian bit stream: code `i` occupies bits `i * bits .. (i + 1) * bits`, and a code
/// may straddle two words. Unused high bits of the last word are zero.
pub fn pack_codes(codes: impl IntoIterator<Item = u8>, bits: u8, out: &mut [i32]) {
    let mask = (1u64 << bits) - 1;
    let (mut acc, mut filled, mut w) = (0u64, 0u32, 0usize);
    for c in codes {
        acc |= (c as u64 & mask) << filled;
        filled += bits as u32;
        if filled >= 32 {
            out[w] = acc as u32 as i32;
            w += 1;
            acc >>= 32;
            filled -= 32;
        }
    }
    if filled > 0 {
        out[w] = acc as u32 as i32;
    }
}

/// The first `n` codes of a bit stream written by [`pack_codes`]; codes past the end of
/// `words` read as zero bits.
pub fn unpack_codes(words: &[i32], bits: u8, n: usize) -> Vec<u8> {
    let mask = (1u64 << bits) - 1;
    let word = |w: usize| words.get(w).map_or(0, |&x| x as u32 as u64);
    (0..n)
        .map(|i| {
            let bit = i * bits as usize;
            let (w, off) = (bit / 32, bit % 32);
            (((word(w) | word(w + 1) << 32) >> off) & mask) as u8
        })
        .collect()
}

/// The stored shapes of a `pack-quantized` linear of `rows` x `cols` with `bits`-bit codes
/// and `group` columns per scale (`None`: one scale per row, strategy `channel`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedShapes {
    /// `weight_packed`: `[rows, packed_words(cols)]`.
    pub packed: [usize; 2],
    /// `weight_scale`: `[rows, groups]`.
    pub scale: [usize; 2],
    /// `weight_zero_point` (asymmetric only): `[packed_words(rows), groups]`.
    pub zero_point: [usize; 2],
    /// `weight_g_idx` (activation order only): `[cols]`.
    pub g_idx: usize,
}

impl PackedShapes {
    /// The shapes, or what makes them impossible (unsupported bits, a zero group, overflow).
    pub fn new(
        bits: u8,
        rows: usize,
        cols: usize,
        group: Option<usize>,
    ) -> Result<Self, PartError> {
        if !PACKED_BITS.contains(&bits) {
            return part_err("num_bits", format!("{bits} bits (supported: 2, 4, 8)"));
        }
        let groups = match group {
            None => 1,
            Some(0) => return part_err("group_size", "a group of 0 columns".into()),
            Some(g) => cols.div_ceil(g),
        };
        let words = |n: usize, what: &'static str| {
            n.checked_mul(bits as usize)
                .map(|b| b.div_ceil(32))
                .ok_or_else(|| PartError {
                    part: what,
                    msg: format!("{n} codes of {bits} bits overflow"),
                })
        };
        Ok(Self {
            packed: [rows, words(cols, "weight_shape")?],
            scale: [rows, groups],
            zero_point: [words(rows, "weight_shape")?, groups],
            g_idx: cols,
        })
    }

    /// Scales per row.
    pub fn groups(&self) -> usize {
        self.scale[1]
    }
}

/// One `pack-quantized` linear's stored parts, as numbers.
#[derive(Debug, Clone, Copy)]
pub struct PackedParts<'a> {
    /// Code width: 2, 4 or 8.
    pub bits: u8,
    /// Output channels.
    pub rows: usize,
    /// Input channels.
    pub cols: usize,
    /// Columns per scale (`None`: one scale per row).
    pub group: Option<usize>,
    /// `weight_packed`, row-major.
    pub packed: &'a [i32],
    /// `weight_scale`, row-major `[rows, groups]`.
    pub scale: &'a [f32],
    /// `weight_zero_point`, row-major; `None` for a symmetric scheme (zero `2^(bits-1)`).
    pub zero_point: Option<&'a [i32]>,
    /// `weight_g_idx`: the group of every column; `None`: column / group.
    pub g_idx: Option<&'a [i32]>,
}

/// `len` must be the product of `shape`.
fn check_len(part: &'static str, len: usize, shape: &[usize]) -> Result<(), PartError> {
    match shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
        Some(n) if n == len => Ok(()),
        _ => part_err(part, format!("{len} values where {shape:?} belong")),
    }
}

/// The f32 weight `[rows, cols]` of a packed linear: `(code - zero) * scale` of the column's
/// group, with the unsigned code and zero fields as packed (the zero is `2^(bits-1)` when
/// symmetric). Every length and group index is checked first.
pub fn dequantize_packed(p: &PackedParts) -> Result<Vec<f32>, PartError> {
    let (rows, cols, bits) = (p.rows, p.cols, p.bits);
    let s = PackedShapes::new(bits, rows, cols, p.group)?;
    let groups = s.groups();
    check_len("weight_packed", p.packed.len(), &s.packed)?;
    check_len("weight_scale", p.scale.len(), &s.scale)?;
    if let Some(z) = p.zero_point {
        check_len("weight_zero_point", z.len(), &s.zero_point)?;
    }
    // The group of every column.
    let col_group: Vec<usize> = match (p.g_idx, p.group) {
        (Some(g), _) => {
            check_len("weight_g_idx", g.len(), &[s.g_idx])?;
            if let Some((c, &j)) = g
                .iter()
                .enumerate()
                .find(|&(_, &j)| j < 0 || j as usize >= groups)
            {
                return part_err(
                    "weight_g_idx",
                    format!("column {c} is in group {j}, outside 0..{groups}"),
                );
            }
            g.iter().map(|&j| j as usize).collect()
        }
        (None, Some(g)) => (0..cols).map(|c| c / g).collect(),
        (None, None) => vec![0; cols],
    };
    // Zero points `[rows, groups]`: column j of the stored words is packed along the rows.
    let zeros: Vec<u8> = match p.zero_point {
        Some(z) => {
            let zw = s.zero_point[0];
            let mut out = vec![0u8; rows * groups];
            for j in 0..groups {
                let col: Vec<i32> = (0..zw).map(|w| z[w * groups + j]).collect();
                for (r, v) in unpack_codes(&col, bits, rows).into_iter().enumerate() {
                    out[r * groups + j] = v;
                }
            }
            out
        }
        None => vec![1 << (bits - 1); rows * groups],
    };
    let pw = s.packed[1];
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let codes = unpack_codes(&p.packed[r * pw..(r + 1) * pw], bits, cols);
            let (scale, zero) = (&p.scale[r * groups..], &zeros[r * groups..]);
            for ((o, &c), &j) in row.iter_mut().zip(&codes).zip(&col_group) {
                *o = (c as i32 - zero[j] as i32) as f32 * scale[j];
            }
        });
    Ok(out)
}

/// The dense bytes (`rows * cols` elements of `elem` bytes) of a `sparse-bitmask` linear:
/// bit `c % 8` of byte `c / 8` of a row's `ceil(cols / 8)` bitmask bytes says whether column
/// `c` holds the row's next stored value; elements not kept are zero bytes. `row_offsets` must
/// be each row's first value (the running count of set bits), the bits past a row's last
/// column clear, and `values` exactly as many elements as bits are set.
pub fn decode_bitmask(
    bitmask: &[u8],
    row_offsets: &[i64],
    values: &[u8],
    elem: usize,
    rows: usize,
    cols: usize,
) -> Result<Vec<u8>, PartError> {
    let rb = cols.div_ceil(8);
    check_len("bitmask", bitmask.len(), &[rows, rb])?;
    check_len("row_offsets", row_offsets.len(), &[rows])?;
    if elem == 0 || !values.len().is_multiple_of(elem) {
        return part_err(
            "compressed",
            format!("{} bytes are not whole {elem}-byte values", values.len()),
        );
    }
    let tail = if cols.is_multiple_of(8) {
        0
    } else {
        0xffu8 << (cols % 8)
    };
    let mut start = Vec::with_capacity(rows);
    let mut total = 0usize;
    for (r, (mask, &off)) in bitmask.chunks(rb.max(1)).zip(row_offsets).enumerate() {
        if rb > 0 && mask[rb - 1] & tail != 0 {
            return part_err("bitmask", format!("row {r} sets bits past column {cols}"));
        }
        if off != total as i64 {
            return part_err(
                "row_offsets",
                format!("row {r} starts at {off}, but the rows before it keep {total} values"),
            );
        }
        start.push(total);
        total += mask.iter().map(|b| b.count_ones() as usize).sum::<usize>();
    }
    if total != values.len() / elem {
        return part_err(
            "compressed",
            format!(
                "{} values, but the bitmask keeps {total}",
                values.len() / elem
            ),
        );
    }
    let row_bytes = cols * elem;
    let mut out = vec![0u8; rows * row_bytes];
    out.par_chunks_mut(row_bytes.max(1))
        .zip(bitmask.par_chunks(rb.max(1)))
        .zip(start)
        .for_each(|((row, mask), mut v)| {
            for c in (0..cols).filter(|c| mask[c / 8] >> (c % 8) & 1 == 1) {
                row[c * elem..(c + 1) * elem].copy_from_slice(&values[v * elem..(v + 1) * elem]);
                v += 1;
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_words() {
        let mut out = [0i32; 2];
        pack_codes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, &mut out);
        assert_eq!(out, [0x8765_4321u32 as i32, 9]);
        let mut out = [0i32; 2];
        pack_codes([1, 2, 3, 4, 0xff], 8, &mut out);
        assert_eq!(out, [0x0403_0201, 0xff]);
        // 3 bits: the 11th code straddles the first two words (bits 30..33).
        let mut out = [0i32; 2];
        pack_codes([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0b111, 1], 3, &mut out);
        assert_eq!(out, [(0b11u32 << 30) as i32, 0b1 | 1 << 1]);
        assert_eq!(unpack_codes(&out, 3, 12)[10..], [0b111, 1]);
    }

    #[test]
    fn pack_then_unpack_is_identity() {
        let mut x = 12345u32;
        for bits in 1..=8u8 {
            for n in [1usize, 7, 31, 32, 33, 100, 576] {
                let codes: Vec<u8> = (0..n)
                    .map(|_| {
                        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        ((x >> 16) % (1 << bits)) as u8
                    })
                    .collect();
                let mut words = vec![0i32; packed_words(n, bits)];
                pack_codes(codes.iter().copied(), bits, &mut words);
                assert_eq!(unpack_codes(&words, bits, n), codes, "bits {bits} n {n}");
            }
        }
    }

    #[test]
    fn known_dequantization() {
        // 2 rows x 4 columns, 4 bits, groups of 2, asymmetric.
        let codes = [[1u8, 2, 3, 4], [15, 0, 8, 9]];
        let packed: Vec<i32> = codes
            .iter()
            .flat_map(|r| {
                let mut w = [0i32; 1];
                pack_codes(r.iter().copied(), 4, &mut w);
                w
            })
            .collect();
        // Zero points [rows, groups] = [[1, 2], [3, 8]], column j packed along the rows.
        let mut zp = [0i32; 2];
        let (mut c0, mut c1) = ([0i32; 1], [0i32; 1]);
        pack_codes([1, 3], 4, &mut c0);
        pack_codes([2, 8], 4, &mut c1);
        (zp[0], zp[1]) = (c0[0], c1[0]);
        let scale = [0.5, 2.0, 1.0, 0.25];
        let p = PackedParts {
            bits: 4,
            rows: 2,
            cols: 4,
            group: Some(2),
            packed: &packed,
            scale: &scale,
            zero_point: Some(&zp),
            g_idx: None,
        };
        let want = [0.0, 0.5, 2.0, 4.0, 12.0, -3.0, 0.0, 0.25];
        assert_eq!(dequantize_packed(&p).unwrap(), want);
        // Symmetric: zero 8. g_idx swaps the groups of columns 0 and 3.
        let g_idx = [1, 0, 1, 0];
        let sym = PackedParts {
            zero_point: None,
            g_idx: Some(&g_idx),
            ..p
        };
        let want = [-14.0, -3.0, -10.0, -2.0, 1.75, -8.0, 0.0, 1.0];
        assert_eq!(dequantize_packed(&sym).unwrap(), want);
        // Wrong lengths and group indices are refused, naming the part.
        let bad = |q: PackedParts| dequantize_packed(&q).unwrap_err().part;
        assert_eq!(bad(PackedParts { cols: 9, ..p }), "weight_packed");
        assert_eq!(
            bad(PackedParts {
                scale: &scale[..3],
                ..p
            }),
            "weight_scale"
        );
        assert_eq!(
            bad(PackedParts {
                zero_point: Some(&zp[..1]),
                ..p
            }),
            "weight_zero_point"
        );
        assert_eq!(
            bad(PackedParts {
                g_idx: Some(&[0, 1, 2, 0]),
                ..p
            }),
            "weight_g_idx"
        );
        assert_eq!(
            bad(PackedParts {
                g_idx: Some(&[0, -1, 0, 0]),
                ..p
            }),
            "weight_g_idx"
        );
        assert_eq!(bad(PackedParts { bits: 3, ..p }), "num_bits");
        assert_eq!(
            bad(PackedParts {
                group: Some(0),
                ..p
            }),
            "group_size"
        );
        assert_eq!(
            bad(PackedParts {
                rows: usize::MAX,
                ..p
            }),
            "weight_shape"
        );
    }

    #[test]
    fn known_bitmask_decoding() {
        // numpy.packbits(mask, axis=-1, bitorder="little") of a 2 x 10 mask, 1-byte values.
        let mask = [0b0000_1001, 0b0000_0001, 0b1000_0000, 0b0000_0010];
        let values = [1u8, 2, 3, 5, 6];
        let dense = decode_bitmask(&mask, &[0, 3], &values, 1, 2, 10).unwrap();
        assert_eq!(
            dense,
            [1, 0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 6]
        );
        let bad = |m: &[u8], o: &[i64], v: &[u8]| decode_bitmask(m, o, v, 1, 2, 10).unwrap_err();
        assert_eq!(bad(&mask, &[0, 2], &values).part, "row_offsets");
        assert_eq!(bad(&mask, &[0, 3], &values[..4]).part, "compressed");
        assert_eq!(bad(&mask[..3], &[0, 3], &values).part, "bitmask");
        // A bit past the last column.
        assert_eq!(bad(&[9, 1, 128, 4], &[0, 3], &values).part, "bitmask");
    }
}
