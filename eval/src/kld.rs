//! Divergence of a student from its teacher over the same chunks as perplexity, as
//! llama.cpp's `--kl-divergence` mode reports it: mean KL(teacher ‖ student) per scored token
//! with its standard error and percentiles, top-1 agreement, and the RMS of the change in
//! the probability of the correct token. Both models run layer by layer; only their final
//! hidden states are kept, and logits are recomputed chunk by chunk from both heads.

use model::engine::LayerEngine;
use model::{Checkpoint, Device, Tokenizer};
use rayon::prelude::*;
use serde::Serialize;

use crate::perplexity::{EvalError, PplOptions, PplResult, make_windows, summarize};

/// Divergence statistics.
#[derive(Debug, Clone, Serialize)]
pub struct KldResult {
    /// Mean KL(teacher ‖ student) per scored token (nats).
    pub mean: f64,
    /// Standard error of the mean.
    pub stderr: f64,
    /// Median.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Percent of scored positions where both models' most likely token is the same.
    pub top1_agreement: f64,
    /// Standard error of the agreement (percent).
    pub top1_agreement_stderr: f64,
    /// RMS of p_student(correct) - p_teacher(correct), in percent.
    pub rms_delta_p: f64,
    /// Scored tokens.
    pub n: usize,
}

/// Per-token comparison of two logit rows.
struct TokenStats {
    kl: f64,
    same_top: bool,
    dp: f64,
    nll_t: f64,
    nll_s: f64,
}

fn log_softmax(row: &[f32]) -> (Vec<f64>, usize) {
    let mut arg = 0;
    let mut max = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > max {
            max = v;
            arg = i;
        }
    }
    let lse = (max as f64) + row.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln();
    (row.iter().map(|&v| v as f64 - lse).collect(), arg)
}

fn compare(t: &[f32], s: &[f32], target: usize) -> TokenStats {
    let (lt, at) = log_softmax(t);
    let (ls, as_) = log_softmax(s);
    let kl: f64 = lt.iter().zip(&ls).map(|(&a, &b)| a.exp() * (a - b)).sum();
    TokenStats {
        kl: kl.max(0.0),
        same_top: at == as_,
        dp: ls[target].exp() - lt[target].exp(),
        nll_t: -lt[target],
        nll_s: -ls[target],
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx]
}

/// Checks teacher and student can be compared token for token.
pub fn check_same_vocab(teacher: &Checkpoint, student: &Checkpoint, tt: &Tokenizer, ts: &Tokenizer) -> Result<(), EvalError> {
    let (vt, vs) = (teacher.config().vocab_size, student.config().vocab_size);
    if vt != vs {
        return Err(EvalError::Input(format!(
            "teacher {} has a vocabulary of {vt} tokens, student {} has {vs}: KL divergence needs the same vocabulary",
            teacher.path().display(),
            student.path().display()
        )));
    }
    let probe = "The patient was given 250 mg of amoxicillin, twice daily.\n";
    if tt.encode(probe).map_err(EvalError::Model)? != ts.encode(probe).map_err(EvalError::Model)? {
        return Err(EvalError::Input(format!(
            "teacher {} and student {} tokenize text differently: KL divergence needs the same tokenizer",
            teacher.path().display(),
            student.path().display()
        )));
    }
    Ok(())
}

/// Perplexity of both models and the student's divergence from the teacher.
pub fn kl_divergence(
    teacher: &Checkpoint,
    student: &Checkpoint,
    tok: &Tokenizer,
    tokens: &[u32],
    opts: &PplOptions,
    device: Device,
    mut progress: impl FnMut(u64, u64),
) -> Result<(PplResult, PplResult, KldResult), EvalError> {
    let (windows, first) = make_windows(tokens, tok, opts)?;
    let start = std::time::Instant::now();
    let per_model = (student.config().num_hidden_layers + teacher.config().num_hidden_layers) as u64;
    let total = (per_model + 1) * windows.len() as u64;
    let mut done = 0u64;
    let mut run = |ck: &Checkpoint, done: &mut u64| -> Result<(Vec<model::Tensor<3>>, model::engine::Head), EvalError> {
        let engine = LayerEngine::new(ck, device.clone(), opts.ctx);
        let mut states = engine.embed(&windows)?;
        engine.run_blocks(&mut states, |_, _, _| Ok(()), || {
            *done += 1;
            progress(*done, total);
        })?;
        Ok((states, engine.load_head()?))
    };
    let (t_states, t_head) = run(teacher, &mut done)?;
    let t_secs = start.elapsed().as_secs_f64();
    let (s_states, s_head) = run(student, &mut done)?;
    let mut stats: Vec<TokenStats> = Vec::new();
    let n = opts.ctx - 1 - first;
    let v = s_head.vocab();
    for ((w, ts), ss) in windows.iter().zip(&t_states).zip(&s_states) {
        let lt = t_head.logits(ts, first);
        let ls = s_head.logits(ss, first);
        let targets = &w[first + 1..];
        let chunk: Vec<TokenStats> = (0..n)
            .into_par_iter()
            .map(|j| compare(&lt[j * v..(j + 1) * v], &ls[j * v..(j + 1) * v], targets[j] as usize))
            .collect();
        stats.extend(chunk);
        done += 1;
        progress(done, total);
    }
    let wall = start.elapsed().as_secs_f64();
    let cnt = stats.len();
    let mut kls: Vec<f64> = stats.iter().map(|s| s.kl).collect();
    let mean = kls.iter().sum::<f64>() / cnt as f64;
    let var = kls.iter().map(|k| (k - mean).powi(2)).sum::<f64>() / (cnt.max(2) - 1) as f64;
    kls.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let agree = stats.iter().filter(|s| s.same_top).count() as f64 / cnt as f64;
    let rms_dp = (stats.iter().map(|s| s.dp * s.dp).sum::<f64>() / cnt as f64).sqrt();
    let kld = KldResult {
        mean,
        stderr: (var / cnt as f64).sqrt(),
        median: percentile(&kls, 0.5),
        p90: percentile(&kls, 0.9),
        p99: percentile(&kls, 0.99),
        max: kls.last().copied().unwrap_or(0.0),
        top1_agreement: 100.0 * agree,
        top1_agreement_stderr: 100.0 * (agree * (1.0 - agree) / (cnt.max(2) - 1) as f64).sqrt(),
        rms_delta_p: 100.0 * rms_dp,
        n: cnt,
    };
    let ppl = |nll: Vec<f64>, secs: f64| {
        let (value, stderr, mean_nll) = summarize(&nll);
        PplResult {
            value,
            stderr,
            mean_nll,
            chunks: windows.len(),
            ctx: opts.ctx,
            tokens_scored: nll.len(),
            tokens_total: tokens.len(),
            protocol: opts.protocol,
            tokens_processed: windows.len() * opts.ctx,
            wall_seconds: secs,
        }
    };
    let teacher_ppl = ppl(stats.iter().map(|s| s.nll_t).collect(), t_secs);
    let student_ppl = ppl(stats.iter().map(|s| s.nll_s).collect(), wall - t_secs);
    Ok((student_ppl, teacher_ppl, kld))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_rows_have_zero_divergence_and_agree() {
        let row = [0.3f32, -1.0, 2.0, 0.5];
        let s = compare(&row, &row, 2);
        assert!(s.kl.abs() < 1e-12 && s.same_top && s.dp.abs() < 1e-15);
    }

    #[test]
    fn divergence_matches_hand_computation() {
        // Teacher p = (0.5, 0.5); student q = (0.25, 0.75): KL = 0.5 ln 2 + 0.5 ln(2/3).
        let t = [0.0f32, 0.0];
        let s = [0.0f32, 3f32.ln()];
        let st = compare(&t, &s, 0);
        let expect = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((st.kl - expect).abs() < 1e-7, "{} vs {expect}", st.kl);
        assert!((st.dp - (0.25 - 0.5)).abs() < 1e-7);
    }
}
