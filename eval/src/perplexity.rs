//! Perplexity. The `llama` protocol follows llama.cpp's `llama-perplexity`: tokenize the
//! whole file, cut non-overlapping chunks of `ctx` tokens, put BOS first in each chunk only
//! when the tokenizer adds BOS, and score only the second half of each chunk (tokens
//! `ctx/2+1 .. ctx-1`, predicted from positions `ctx/2 .. ctx-2`). The `hf` protocol scores
//! every token after the first of each chunk, as the AWQ and GPTQ papers do.

use std::time::Instant;

use model::engine::LayerEngine;
use model::{Checkpoint, Device, Tokenizer};
use rayon::prelude::*;
use serde::Serialize;

/// Which tokens of a chunk are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// llama.cpp: second half of each chunk, BOS replaces the first token when added.
    Llama,
    /// Every token after the first; BOS only at the start of the text.
    Hf,
}

impl Protocol {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Hf => "hf",
        }
    }
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct PplOptions {
    /// Tokens per chunk.
    pub ctx: usize,
    /// At most this many chunks (all that fit when `None`).
    pub chunks: Option<usize>,
    /// Scoring protocol.
    pub protocol: Protocol,
}

/// Perplexity and the counts behind it.
#[derive(Debug, Clone, Serialize)]
pub struct PplResult {
    /// exp(mean NLL).
    pub value: f64,
    /// Standard error of the perplexity (delta method on the mean NLL, as llama.cpp).
    pub stderr: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub mean_nll: f64,
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Tokens whose probability was scored.
    pub tokens_scored: usize,
    /// Tokens in the whole tokenized file.
    pub tokens_total: usize,
    /// The protocol used.
    pub protocol: Protocol,
    /// Tokens run through the model (chunks x ctx).
    pub tokens_processed: usize,
    /// Seconds spent in the model (weights loading included, tokenization excluded).
    pub wall_seconds: f64,
}

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// From the model crate.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The text is too short for one chunk, or options are out of range.
    #[error("{0}")]
    Input(String),
}

/// Cuts `tokens` into chunks and returns them with the index of the first scored position.
pub fn make_windows(
    tokens: &[u32],
    tok: &Tokenizer,
    opts: &PplOptions,
) -> Result<(Vec<Vec<u32>>, usize), EvalError> {
    let ctx = opts.ctx;
    if ctx < 8 {
        return Err(EvalError::Input(format!(
            "--ctx {ctx} is too small (at least 8)"
        )));
    }
    let mut toks: Vec<u32> = Vec::with_capacity(tokens.len() + 1);
    if opts.protocol == Protocol::Hf && tok.add_bos {
        toks.extend(tok.bos_id);
    }
    toks.extend_from_slice(tokens);
    let available = toks.len() / ctx;
    if available == 0 {
        return Err(EvalError::Input(format!(
            "the text has {} tokens, fewer than one chunk of {ctx}",
            toks.len()
        )));
    }
    let n = opts.chunks.map_or(available, |c| c.min(available));
    let mut windows = Vec::with_capacity(n);
    for i in 0..n {
        let mut w = toks[i * ctx..(i + 1) * ctx].to_vec();
        if opts.protocol == Protocol::Llama
            && tok.add_bos
            && let Some(b) = tok.bos_id
        {
            w[0] = b;
        }
        windows.push(w);
    }
    let first = match opts.protocol {
        Protocol::Llama => ctx / 2,
        Protocol::Hf => 0,
    };
    Ok((windows, first))
}

/// Negative log-likelihoods of `targets` under `logits` (`targets.len()` rows of `vocab`).
pub fn nll_rows(logits: &[f32], vocab: usize, targets: &[u32]) -> Vec<f64> {
    logits
        .par_chunks_exact(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| ((v as f64) - max).exp()).sum();
            max + sum.ln() - row[t as usize] as f64
        })
        .collect()
}

/// Perplexity and its standard error from per-token NLLs (llama.cpp's formula).
pub fn summarize(nll: &[f64]) -> (f64, f64, f64) {
    let n = nll.len() as f64;
    let mean = nll.iter().sum::<f64>() / n;
    let mean2 = nll.iter().map(|v| v * v).sum::<f64>() / n;
    let ppl = mean.exp();
    let var = mean2 - mean * mean;
    let stderr = if var > 0.0 && n > 1.0 {
        (var / (n - 1.0)).sqrt() * ppl
    } else {
        0.0
    };
    (ppl, stderr, mean)
}

/// Evaluates perplexity of `ckpt` on `tokens` (the whole file, tokenized without specials).
/// `progress(done, total)` is called as work advances.
pub fn perplexity(
    ckpt: &Checkpoint,
    tok: &Tokenizer,
    tokens: &[u32],
    opts: &PplOptions,
    device: Device,
    mut progress: impl FnMut(u64, u64),
) -> Result<PplResult, EvalError> {
    let (windows, first) = make_windows(tokens, tok, opts)?;
    let start = Instant::now();
    let engine = LayerEngine::new(ckpt, device, opts.ctx);
    let layers = ckpt.config().num_hidden_layers as u64;
    let total = (layers + 1) * windows.len() as u64;
    let mut done = 0u64;
    progress(done, total);
    let mut states = engine.embed(&windows)?;
    engine.run_blocks(
        &mut states,
        |_, _, _| Ok(()),
        || {
            done += 1;
            progress(done, total);
        },
    )?;
    let head = engine.load_head()?;
    let mut nll = Vec::new();
    for (w, s) in windows.iter().zip(states.iter()) {
        // Position j predicts token j+1; the last position predicts nothing in this chunk.
        let logits = head.logits(s, first);
        let n = opts.ctx - 1 - first;
        nll.extend(nll_rows(
            &logits[..n * head.vocab()],
            head.vocab(),
            &w[first + 1..],
        ));
        done += 1;
        progress(done, total);
    }
    let wall = start.elapsed().as_secs_f64();
    let (value, stderr, mean_nll) = summarize(&nll);
    Ok(PplResult {
        value,
        stderr,
        mean_nll,
        chunks: windows.len(),
        ctx: opts.ctx,
        tokens_scored: nll.len(),
        tokens_total: tokens.len(),
        protocol: opts.protocol,
        tokens_processed: windows.len() * opts.ctx,
        wall_seconds: wall,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        let v = 10;
        let logits = vec![0.5f32; 2 * v];
        let nll = nll_rows(&logits, v, &[3, 7]);
        for x in nll {
            assert!((x - (v as f64).ln()).abs() < 1e-9);
        }
    }

    #[test]
    fn summary_matches_hand_computation() {
        let (ppl, se, mean) = summarize(&[1.0, 2.0, 3.0]);
        assert!((mean - 2.0).abs() < 1e-12);
        assert!((ppl - 2f64.exp()).abs() < 1e-12);
        // var = 14/3 - 4 = 2/3; stderr = sqrt(2/3 / 2) * e^2
        assert!((se - (1.0f64 / 3.0).sqrt() * 2f64.exp()).abs() < 1e-12);
    }
}
