//! The block quantizers against gguf-py 0.19.0: `model/tests/fixtures/dequant/<TYPE>.quant.json`
//! holds an input and the exact bytes `gguf.quants.quantize` produced for it (Q8_0, Q4_0,
//! Q4_1); `<TYPE>.json` holds gguf-py-quantized bytes (all legacy types) or random K-quant
//! blocks with gguf-py's dequantization of them.

use std::path::PathBuf;

use model::gguf::GgmlType;
use quant::blocks::{dequantize, parse_type, quantize};

fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures/dequant")
        .join(name);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn plain_rounding_is_byte_identical_to_gguf_py() {
    for name in ["Q8_0", "Q4_0", "Q4_1"] {
        let f = fixture(&format!("{name}.quant.json"));
        let ty = parse_type(name).unwrap();
        let input = floats(&f["input"]);
        let want = hex(f["data_hex"].as_str().unwrap());
        let got = quantize(ty, &input, input.len(), None).unwrap();
        assert_eq!(got, want, "{name}: bytes differ from gguf.quants.quantize");
        // Row by row gives the same bytes as one long row.
        assert_eq!(
            quantize(ty, &input, 32, None).unwrap(),
            want,
            "{name} rows of 32"
        );
    }
}

/// Requantizing gguf-py's own dequantized output reproduces its bytes (Q5_0/Q5_1 have no
/// stored input, so this is their Rust-side check; scripts/check_gguf_quants.py compares them
/// on random inputs).
#[test]
fn requantizing_gguf_py_output_is_stable() {
    for name in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"] {
        let f = fixture(&format!("{name}.json"));
        assert_eq!(f["source"], "quantized");
        let ty = parse_type(name).unwrap();
        let bytes = hex(f["data_hex"].as_str().unwrap());
        let expected = floats(&f["expected"]);
        let ours = dequantize(ty, &bytes, expected.len());
        assert_eq!(ours, expected, "{name}: dequantization differs");
        let again = quantize(ty, &ours, ours.len(), None).unwrap();
        let back = dequantize(ty, &again, ours.len());
        assert_eq!(back, expected, "{name}: requantized values differ");
    }
}

#[test]
fn k_quants_dequantize_like_gguf_py_and_requantize_closely() {
    for name in ["Q4_K", "Q5_K", "Q6_K"] {
        let f = fixture(&format!("{name}.json"));
        let ty = parse_type(name).unwrap();
        let bytes = hex(f["data_hex"].as_str().unwrap());
        let expected = floats(&f["expected"]);
        assert_eq!(dequantize(ty, &bytes, expected.len()), expected, "{name}");
        let y = dequantize(
            ty,
            &quantize(ty, &expected, 256, None).unwrap(),
            expected.len(),
        );
        let err: f64 = expected
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let sig: f64 = expected.iter().map(|a| (*a as f64).powi(2)).sum();
        assert!(
            (err / sig).sqrt() < 0.1,
            "{name}: relative error {}",
            (err / sig).sqrt()
        );
    }
    assert_eq!(parse_type("q4_k"), Some(GgmlType::Q4_K));
}
