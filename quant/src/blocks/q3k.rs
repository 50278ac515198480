//! Q3_K (256-value super-blocks of 16 sub-blocks of 16, 3.4375 bits per weight), with the
//! semantics of ggml's reference quantizer, written from its description: for each sub-block
//! a symmetric scale for levels -4..3 found by rounding against the value of largest
//! magnitude (mapped to -4) and then moving single levels while that raises the `x²`-weighted
//! fit `(Σ w l x)² / Σ w l²` (at most 5 passes, ggml's `make_q3_quants`); the 16 scales are
//! quantized to 6 bits against the one of largest magnitude (`d = max/-32`, f16) and values
//! re-rounded against the stored scales. With importance, the sub-block scales come from the
//! weighted symmetric search instead, and the better of that block and the plain one is kept.
//! gguf-py cannot quantize Q3_K; it dequantizes our bytes to our values
//! (`scripts/check_gguf_quants.py`).

use model::gguf::GgmlType;
use model::gguf::blocks::{BlockQ3K, K_SCALE_SIZE, QK_K, q3k_scales};

use super::legacy::signed_absmax;
use super::{BlockQuantizer, better, f16_bits, f16_val, nearest_int, search_symmetric};

/// ggml's `make_q3_quants` (with its refinement): levels `-nmax..nmax` (top exclusive) of one
/// sub-block into `l`, and the scale. Products are formed in ggml's order, f32 throughout.
fn make_q3_quants(x: &[f32], nmax: i32, l: &mut [i32]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (q, &v) in l.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        let w = v * v;
        sumlx += w * v * *q as f32;
        suml2 += w * *q as f32 * *q as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (q, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let mut slx = sumlx - w * v * *q as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * *q as f32 * *q as f32;
                let new = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new != *q {
                    slx += w * v * new as f32;
                    sl2 += w * new as f32 * new as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *q = new;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    sumlx / suml2
}

/// Q3_K's 16 sub-scales `l` (`-32..=31`) packed as [`q3k_scales`] reads them.
fn pack_q3k_scales(ls: &[i32; 16]) -> [u8; K_SCALE_SIZE] {
    let mut out = [0u8; K_SCALE_SIZE];
    for (j, &l) in ls.iter().enumerate() {
        let l = (l + 32) as u8;
        if j < 8 {
            out[j] = l & 0x0f;
        } else {
            out[j - 8] |= (l & 0x0f) << 4;
        }
        out[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
    }
    out
}

/// Q3_K's high-bit mask and 2-bit pairs for 256 levels 0..=7 (level 4 decodes to 0).
pub(super) fn pack_q3k(l: &[u8; QK_K]) -> ([u8; QK_K / 8], [u8; QK_K / 4]) {
    let (mut hmask, mut qs) = ([0u8; QK_K / 8], [0u8; QK_K / 4]);
    for (i, &v) in l.iter().enumerate() {
        hmask[i % 32] |= (v >> 2) << (i / 32);
        qs[32 * (i / 128) + i % 32] |= (v & 3) << (2 * ((i % 128) / 32));
    }
    (hmask, qs)
}

fn q3k_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ3K {
    let mut sub = [0f32; 16];
    let mut l = [0i32; QK_K];
    let (mut max_scale, mut amax) = (0f32, 0f32);
    for j in 0..16 {
        let (xs, ls) = (&x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        sub[j] = match importance {
            None => make_q3_quants(xs, 4, ls),
            Some(w) => search_symmetric(xs, &w[16 * j..16 * j + 16], 4, 3, 9, ls),
        };
        if sub[j].abs() > amax {
            amax = sub[j].abs();
            max_scale = sub[j];
        }
    }
    let mut out = BlockQ3K {
        hmask: [0; QK_K / 8],
        qs: [0; QK_K / 4],
        scales: [0; K_SCALE_SIZE],
        d: 0,
    };
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        out.d = f16_bits(1.0 / iscale);
        out.scales = pack_q3k_scales(&std::array::from_fn(|j| {
            nearest_int(iscale * sub[j]).clamp(-32, 31)
        }));
    }
    let scales = q3k_scales(&out.scales);
    // A sub-block whose stored scale is 0 keeps its search levels (they decode to 0), as ggml.
    for j in 0..16 {
        let dj = f16_val(out.d) * scales[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = nearest_int(x[i] / dj).clamp(-4, 3);
        }
    }
    (out.hmask, out.qs) = pack_q3k(&std::array::from_fn(|i| (l[i] + 4) as u8));
    out
}

/// Q3_K: 3.4375 bits per weight.
#[derive(Debug)]
pub struct Q3K;

impl BlockQuantizer for Q3K {
    type Block = BlockQ3K;
    const TYPE: GgmlType = GgmlType::Q3_K;
    fn quantize_block(x: &[f32], importance: Option<&[f32]>) -> BlockQ3K {
        let plain = q3k_block(x, None);
        match importance {
            None => plain,
            Some(w) => better(x, w, plain, q3k_block(x, Some(w))),
        }
    }
}
