//! Calibration data: a text file (plain text, or JSONL with a `text` field per line),
//! tokenized whole, from which `samples` windows of `len` tokens are drawn at seeded random
//! offsets, so a recipe names its calibration exactly.

use std::path::Path;

use model::Tokenizer;

use crate::QuantError;

/// Reads a calibration file: JSONL (every line an object with a `text` string) or plain text.
pub fn read_text(path: &Path) -> Result<String, QuantError> {
    let bytes =
        std::fs::read(path).map_err(|e| QuantError::Input(format!("{}: {e}", path.display())))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| QuantError::Input(format!("{}: not UTF-8 text ({e})", path.display())))?;
    let is_jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    if !is_jsonl {
        return Ok(text);
    }
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            QuantError::Input(format!("{}:{}: invalid JSON ({e})", path.display(), i + 1))
        })?;
        let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            QuantError::Input(format!(
                "{}:{}: no string field `text`",
                path.display(),
                i + 1
            ))
        })?;
        out.push_str(t);
        out.push_str("\n\n");
    }
    Ok(out)
}

/// SplitMix64: a tiny seeded generator, so a seed means the same windows on every machine.
pub struct SplitMix(u64);

impl SplitMix {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Draws `samples` windows of `len` tokens (BOS first when the tokenizer adds it).
pub fn sample_windows(
    tokens: &[u32],
    tok: &Tokenizer,
    samples: usize,
    len: usize,
    seed: u64,
    source: &Path,
) -> Result<Vec<Vec<u32>>, QuantError> {
    if len < 2 || samples == 0 {
        return Err(QuantError::Input(
            "--calib-samples and --calib-len must be positive (len at least 2)".into(),
        ));
    }
    if tokens.len() < len {
        return Err(QuantError::Input(format!(
            "{}: calibration text has {} tokens, fewer than one sequence of {len}",
            source.display(),
            tokens.len()
        )));
    }
    let mut rng = SplitMix::new(seed);
    let span = (tokens.len() - len + 1) as u64;
    Ok((0..samples)
        .map(|_| {
            let start = (rng.next_u64() % span) as usize;
            let mut w = tokens[start..start + len].to_vec();
            if tok.add_bos
                && let Some(b) = tok.bos_id
            {
                w[0] = b;
            }
            w
        })
        .collect())
}
