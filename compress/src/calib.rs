//! Calibration windows as every stage draws them (quant, prune), with the checks that keep an
//! absurd request from running out of memory or past the model's context.

use std::path::Path;

use anyhow::{Context, bail};

/// Bytes of memory available now (Linux `MemAvailable`), if known.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Draws `samples` windows of `len` tokens from a text file (none without one). Refuses a
/// window longer than the model's context and a calibration set whose activations (about
/// six copies of samples × len × hidden f32 values while a block is processed) would not fit
/// in the memory available.
pub(crate) fn windows(
    path: Option<&Path>,
    samples: usize,
    len: usize,
    seed: u64,
    tok: &model::Tokenizer,
    cfg: &model::Config,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    if len > cfg.max_position_embeddings {
        bail!(
            "--calib-len {len} exceeds the model's context of {} tokens",
            cfg.max_position_embeddings
        );
    }
    let need = 6u128 * samples as u128 * len as u128 * cfg.hidden_size as u128 * 4;
    if let Some(avail) = mem_available()
        && need > avail as u128
    {
        bail!(
            "--calib-samples {samples} x --calib-len {len} needs about {} MiB of activations, more than the {} MiB available",
            need >> 20,
            avail >> 20
        );
    }
    let text = quant::calib::read_text(path)?;
    let tokens = tok.encode(&text)?;
    Ok(quant::calib::sample_windows(
        &tokens, tok, samples, len, seed, path,
    )?)
}

/// Writes the drawn windows as JSON (a list of token-id lists), never over an input.
pub(crate) fn dump(
    windows: &[Vec<u32>],
    out: &Path,
    model: &Path,
    force: bool,
) -> anyhow::Result<()> {
    crate::output::check_output_file(out, "--dump-calib", &[model], force)?;
    crate::output::write_atomic(out, serde_json::to_string(windows)?.as_bytes())
        .with_context(|| format!("{}", out.display()))
}
