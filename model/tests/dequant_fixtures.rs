//! `gguf::dequantize` against gguf-py's output for every fixture in
//! `tests/fixtures/dequant/` (see the README there), bit for bit.

use std::path::Path;

use model::gguf::{GgmlType, dequantize};
use serde_json::Value;

fn decode_hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn dequantize_matches_gguf_py_bit_exactly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dequant");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".json") && !n.ends_with(".quant.json")
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 11,
        "expected a fixture per supported type, found {}",
        files.len()
    );
    let mut seen = Vec::new();
    for path in &files {
        let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let name = fx["type"].as_str().unwrap();
        let ty = GgmlType::from_id(fx["ggml_type"].as_u64().unwrap() as u32).unwrap();
        assert_eq!(ty.name(), name, "{}", path.display());
        let bytes = decode_hex(fx["data_hex"].as_str().unwrap());
        let n = fx["n_values"].as_u64().unwrap() as usize;
        let (blk, bsz) = ty.block_layout().unwrap();
        assert_eq!(bytes.len(), n / blk * bsz, "{}: byte count", path.display());
        let expected: Vec<f32> = fx["expected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(expected.len(), n);
        let mut out = vec![f32::NAN; n];
        dequantize(ty, &bytes, &mut out);
        for (i, (g, e)) in out.iter().zip(&expected).enumerate() {
            assert_eq!(
                g.to_bits(),
                e.to_bits(),
                "{name} value {i} (block {}): got {g:e}, gguf-py {e:e}",
                i / blk
            );
        }
        seen.push(name.to_string());
    }
    for t in [
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K",
        "IQ4_NL",
    ] {
        assert!(seen.iter().any(|s| s == t), "no fixture for {t}");
    }
}
