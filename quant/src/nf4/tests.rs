use super::*;

fn nf4(block: usize, dq: bool) -> BnbScheme {
    BnbScheme::new(BnbType::Nf4, Some(block), dq).unwrap()
}

/// Deterministic pseudo-random values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn dynamic_map_is_bitsandbytes_bit_for_bit() {
    // FNV-1a of the little-endian f32 bytes of bitsandbytes 0.50.2's create_dynamic_map(),
    // and three of its values, printed from torch.
    let m = dynamic_map();
    let h = model::hash::fnv1a(m.iter().flat_map(|v| v.to_le_bytes()));
    assert_eq!(h, 0xd677_f22a_9666_5bc4);
    assert_eq!(m[0], -0.992_968_74);
    assert_eq!(m[127], 0.0);
    assert_eq!(m[128], 5.500_000_4e-7);
    assert_eq!(m[255], 1.0);
}

#[test]
fn codebooks_are_qlora_nf4_and_bnb_fp4() {
    // NF4: sorted, asymmetric (7 negative, 8 positive), exact zero at code 7, ends at ±1.
    assert!(NF4.windows(2).all(|p| p[0] < p[1]));
    assert_eq!((NF4[0], NF4[7], NF4[15]), (-1.0, 0.0, 1.0));
    assert_eq!(NF4.iter().filter(|v| **v > 0.0).count(), 8);
    assert_eq!(NF4[8], 0.079_580_3);
    // FP4: bit 3 is the sign, 0b011 is the largest magnitude.
    for c in 0..8 {
        assert_eq!(FP4[c + 8], -FP4[c]);
    }
    assert_eq!(FP4[3], 1.0);
    assert_eq!(FP4[5], 0.5);
    assert_eq!(FP4[1], 0.0625 / 12.0);
}

#[test]
fn rounding_picks_the_expected_codes() {
    // One block whose absmax is 1: each value's code worked out by hand from the tables.
    let w = [1.0, 0.5, -0.3, 0.04, 0.03, -0.05, -0.0, -1.0];
    let q = quantize(&nf4(32, false), "w", &[w; 4].concat(), 1, 32).unwrap();
    assert_eq!(&q.codes[..8], &[15, 12, 4, 8, 7, 6, 7, 0]);
    let fp4 = BnbScheme::new(BnbType::Fp4, Some(32), false).unwrap();
    let w = [1.0, 0.5, 0.3, -0.9, 0.002, 0.003, -0.002, 0.2];
    let q = quantize(&fp4, "w", &[w; 4].concat(), 1, 32).unwrap();
    assert_eq!(&q.codes[..8], &[3, 5, 4, 11, 0, 1, 0, 14 - 8]);
}

#[test]
fn every_value_goes_to_a_nearest_entry() {
    for ty in [BnbType::Nf4, BnbType::Fp4] {
        let table = ty.codebook().unwrap();
        let s = BnbScheme::new(ty, Some(64), false).unwrap();
        let w = noise(64 * 50, 3);
        let q = quantize(&s, "w", &w, 50, 64).unwrap();
        let scales = q.scales();
        for (i, (&c, &v)) in q.codes.iter().zip(&w).enumerate() {
            let x = v / scales[i / 64];
            let best = table.iter().map(|t| (t - x).abs()).fold(f32::MAX, f32::min);
            assert!((table[c as usize] - x).abs() <= best + 1e-6, "{ty:?} {x}");
        }
    }
}

#[test]
fn values_on_the_grid_round_trip_exactly() {
    for ty in [BnbType::Nf4, BnbType::Fp4] {
        let table = ty.codebook().unwrap();
        let (rows, cols) = (6, 128);
        let mut w = Vec::new();
        let mut codes = Vec::new();
        for blk in 0..rows * cols / 64 {
            let a = 0.01 * (blk + 1) as f32;
            for k in 0..64 {
                // Code 3 is +1 in FP4 and code 15 in NF4: put it first so the absmax is `a`.
                let c = if k == 0 {
                    if ty == BnbType::Nf4 { 15 } else { 3 }
                } else {
                    ((k * 7 + blk) % 16) as u8
                };
                // FP4's -0 (code 8) is stored as +0 (code 0).
                codes.push(if ty == BnbType::Fp4 && c == 8 { 0 } else { c });
                w.push(table[c as usize] * a);
            }
        }
        let q = quantize(
            &BnbScheme::new(ty, Some(64), false).unwrap(),
            "w",
            &w,
            rows,
            cols,
        )
        .unwrap();
        assert_eq!(q.codes, codes, "{ty:?}");
        let d = q.dequantize();
        assert!(d.iter().zip(&w).all(|(a, b)| a == b), "{ty:?}");
    }
}

#[test]
fn zero_stays_zero() {
    for dq in [false, true] {
        let mut w = noise(64 * 256 * 2, 5);
        for (i, v) in w.iter_mut().enumerate() {
            if i % 5 == 0 || (640..704).contains(&i) {
                *v = 0.0;
            }
        }
        let q = quantize(&nf4(64, dq), "w", &w, 128, 256).unwrap();
        let d = q.dequantize();
        for (a, b) in w.iter().zip(&d) {
            if *a == 0.0 {
                assert_eq!(*b, 0.0);
            }
        }
    }
    let q = quantize(
        &BnbScheme::new(BnbType::Int8Absmax, None, false).unwrap(),
        "w",
        &[0.0; 8],
        2,
        4,
    )
    .unwrap();
    assert!(q.dequantize().iter().all(|v| *v == 0.0));
}

#[test]
fn bits_per_weight_count_absmax_and_double_quant() {
    // The QLoRA paper's 4.127 for NF4 + DQ at block 64.
    let dq = nf4(64, true);
    assert_eq!(
        dq.nominal_bits_per_weight(),
        Some(4.0 + 8.0 / 64.0 + 32.0 / 16384.0)
    );
    assert!((dq.nominal_bits_per_weight().unwrap() - 4.127).abs() < 5e-4);
    assert_eq!(nf4(64, false).nominal_bits_per_weight(), Some(4.5));
    // Exact for one [576, 576] tensor: 5184 blocks, 21 nested absmax (the last partial), offset.
    let n = 576.0 * 576.0;
    let exact = (4.0 * n + 8.0 * 5184.0 + 32.0 * 21.0 + 32.0) / n;
    assert_eq!(dq.bits_per_weight(576, 576), exact);
    assert_eq!(nf4(64, false).bits_per_weight(576, 576), 4.5);
    let i8 = BnbScheme::new(BnbType::Int8Absmax, None, false).unwrap();
    assert_eq!(i8.bits_per_weight(10, 64), 8.5);
    assert_eq!(i8.nominal_bits_per_weight(), None);
}

#[test]
fn double_quant_error_is_bounded_by_half_a_map_step() {
    let absmax: Vec<f32> = noise(1000, 9).iter().map(|v| 0.05 + 0.04 * v).collect();
    let d = DoubleQuant::quantize(&absmax);
    assert_eq!((d.codes.len(), d.nested_absmax.len()), (1000, 4));
    let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / 1000.0;
    assert!((d.offset as f64 - mean).abs() < 1e-7);
    let map = dynamic_map();
    let half_gap = map.windows(2).map(|p| p[1] - p[0]).fold(0f32, f32::max) / 2.0;
    assert!(half_gap < 0.008, "{half_gap}");
    let back = d.absmax();
    let mut worst = 0f32;
    for (i, (a, b)) in absmax.iter().zip(&back).enumerate() {
        let bound = d.nested_absmax[i / NESTED_BLOCK] * half_gap + 1e-6;
        assert!((a - b).abs() <= bound, "{i}: {a} vs {b}");
        worst = worst.max((a - b).abs());
    }
    // Within 1% of the mean absmax here (the centred values span ±0.04 around 0.05).
    assert!(worst < 0.01 * 0.05, "{worst}");
    // And the weights: DQ adds little to NF4's own error.
    let w = noise(64 * 512, 11);
    let e = |dq| {
        let q = quantize(&nf4(64, dq), "w", &w, 64, 512).unwrap();
        crate::block::weight_error(&w, &q.dequantize())
    };
    let (plain, dq) = (e(false), e(true));
    assert!(plain < 0.12 && dq < plain * 1.02, "{plain} {dq}");
}

#[test]
fn codes_pack_high_nibble_first() {
    let q = BnbLinear {
        scheme: nf4(32, false),
        rows: 1,
        cols: 4,
        codes: vec![1, 2, 3, 15],
        absmax: Absmax::Plain(vec![1.0]),
    };
    assert_eq!(q.packed().unwrap(), vec![0x12, 0x3f]);
}

#[test]
fn int8_absmax_rounds_per_row_like_bitsandbytes() {
    let s = BnbScheme::new(BnbType::Int8Absmax, None, false).unwrap();
    let w = [1.0, -0.5, 0.25, 0.0, 2.0, 1.0, -2.0, 0.5];
    let q = quantize(&s, "w", &w, 2, 4).unwrap();
    // -63.5 rounds half to even, to -64; 31.75 to 32.
    let codes: Vec<i8> = q.codes.iter().map(|&c| c as i8).collect();
    assert_eq!(codes, [127, -64, 32, 0, 127, 64, -127, 32]);
    let d = q.dequantize();
    assert_eq!(d[0], 1.0 * 127.0 * (1.0 / 127.0));
    assert!((d[1] + 0.5).abs() < 0.01 && (d[6] + 2.0).abs() < 1e-6);
}

#[test]
fn bad_input_is_refused_with_names_and_widths() {
    let e = quantize(
        &nf4(64, false),
        "model.layers.0.mlp.down_proj.weight",
        &[0.0; 96],
        1,
        96,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("down_proj") && e.contains("64") && e.contains("96"),
        "{e}"
    );
    let mut w = vec![0.5; 64];
    w[3] = f32::NAN;
    assert!(quantize(&nf4(64, false), "w", &w, 1, 64).is_err());
    assert!(BnbScheme::new(BnbType::Nf4, Some(48), false).is_err());
    assert!(BnbScheme::new(BnbType::Int8Absmax, Some(64), false).is_err());
    assert!(BnbScheme::new(BnbType::Int8Absmax, None, true).is_err());
    assert_eq!(nf4(64, true).label(), "nf4 b64 dq");
}
