//! Quantizes raw little-endian f32 values with the crate's block quantizers (used by
//! `scripts/check_gguf_quants.py` to compare with gguf-py).
//!
//! `quantize_blocks TYPE IN.f32 OUT.bin [--row N] [--importance W.f32] [--dequant OUT.f32]`
//! TYPE: q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q5_k q6_k f16 bf16 f32. Rows of N values (default: the
//! whole input is one row); the importance file holds N f32 weights. `--dequant` also writes
//! our own dequantization of the bytes.

use std::process::exit;

fn read_f32(path: &str) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| fail(&format!("{path}: {e}")));
    if !b.len().is_multiple_of(4) {
        fail(&format!(
            "{path}: length {} is not a multiple of 4",
            b.len()
        ));
    }
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        fail(
            "usage: quantize_blocks TYPE IN.f32 OUT.bin [--row N] [--importance W.f32] [--dequant OUT.f32]",
        );
    }
    let ty = quant::blocks::parse_type(&args[0])
        .unwrap_or_else(|| fail(&format!("unknown type `{}`", args[0])));
    let x = read_f32(&args[1]);
    let (mut row, mut imp, mut deq) = (x.len(), None, None);
    let mut i = 3;
    while i < args.len() {
        let val = args
            .get(i + 1)
            .unwrap_or_else(|| fail(&format!("{} needs a value", args[i])));
        match args[i].as_str() {
            "--row" => row = val.parse().unwrap_or_else(|_| fail("--row needs a number")),
            "--importance" => imp = Some(read_f32(val)),
            "--dequant" => deq = Some(val.clone()),
            other => fail(&format!("unknown option {other}")),
        }
        i += 2;
    }
    let bytes = quant::blocks::quantize(ty, &x, row, imp.as_deref())
        .unwrap_or_else(|e| fail(&e.to_string()));
    std::fs::write(&args[2], &bytes).unwrap_or_else(|e| fail(&format!("{}: {e}", args[2])));
    if let Some(p) = deq {
        let y = quant::blocks::dequantize(ty, &bytes, x.len());
        let out: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&p, out).unwrap_or_else(|e| fail(&format!("{p}: {e}")));
    }
}
