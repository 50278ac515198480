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

/// Draws `samples` windows of `len` tokens from a text file (none without one), or takes the
/// first `samples` sequences of a token file (a `.json` list of token-id lists, as
/// `compress generate --calib` and `--dump-calib` write), each cut to `len`. Refuses a
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
    if let Some(seqs) = token_file(path)? {
        return token_windows(path, seqs, samples, len, cfg.vocab_size);
    }
    let text = quant::calib::read_text(path)?;
    let tokens = tok.encode(&text)?;
    Ok(quant::calib::sample_windows(
        &tokens, tok, samples, len, seed, path,
    )?)
}

/// The sequences of a token file: `Some` for a `.json` file holding a JSON array (a JSON
/// file of objects with a `text` field is text, read by `quant::calib::read_text`).
fn token_file(path: &Path) -> anyhow::Result<Option<Vec<Vec<u32>>>> {
    if path.extension().is_none_or(|e| e != "json") {
        return Ok(None);
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'[') {
        return Ok(None);
    }
    let seqs: Vec<Vec<u32>> = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a token file (a JSON list of token-id lists): {e}",
            path.display()
        )
    })?;
    Ok(Some(seqs))
}

/// The first `samples` sequences of a token file, each cut to `len` tokens; too few or too
/// short sequences and ids outside the vocabulary are refused.
fn token_windows(
    path: &Path,
    seqs: Vec<Vec<u32>>,
    samples: usize,
    len: usize,
    vocab: usize,
) -> anyhow::Result<Vec<Vec<u32>>> {
    if len < 2 || samples == 0 {
        bail!("--calib-samples and --calib-len must be positive (len at least 2)");
    }
    if seqs.len() < samples {
        bail!(
            "{}: {} token sequences, fewer than --calib-samples {samples}",
            path.display(),
            seqs.len()
        );
    }
    let mut out = Vec::with_capacity(samples);
    for (i, s) in seqs.into_iter().take(samples).enumerate() {
        if s.len() < len {
            bail!(
                "{}: sequence {i} has {} tokens, fewer than --calib-len {len}",
                path.display(),
                s.len()
            );
        }
        if let Some(t) = s[..len].iter().find(|&&t| t as usize >= vocab) {
            bail!(
                "{}: sequence {i}: token id {t} is outside the model's vocabulary of {vocab}",
                path.display()
            );
        }
        out.push(s[..len].to_vec());
    }
    Ok(out)
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
