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

/// Per-token comparison of two distributions.
pub struct TokenStats {
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
    let lse = (max as f64)
        + row
            .iter()
            .map(|&v| ((v - max) as f64).exp())
            .sum::<f64>()
            .ln();
    (row.iter().map(|&v| v as f64 - lse).collect(), arg)
}

/// Compares teacher and student logit rows at one position whose correct token is `target`.
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
pub fn check_same_vocab(
    teacher: &Checkpoint,
    student: &Checkpoint,
    tt: &Tokenizer,
    ts: &Tokenizer,
) -> Result<(), EvalError> {
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
    let per_model =
        (student.config().num_hidden_layers + teacher.config().num_hidden_layers) as u64;
    let total = (per_model + 1) * windows.len() as u64;
    let mut done = 0u64;
    let mut run = |ck: &Checkpoint,
                   done: &mut u64|
     -> Result<(Vec<model::Tensor<3>>, model::engine::Head), EvalError> {
        let engine = LayerEngine::new(ck, device.clone(), opts.ctx);
        let mut states = engine.embed(&windows)?;
        engine.run_blocks(
            &mut states,
            |_, _, _| Ok(()),
            || {
                *done += 1;
                progress(*done, total);
            },
        )?;
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
            .map(|j| {
                compare(
                    &lt[j * v..(j + 1) * v],
                    &ls[j * v..(j + 1) * v],
                    targets[j] as usize,
                )
            })
            .collect();
        stats.extend(chunk);
        done += 1;
        progress(done, total);
    }
    let wall = start.elapsed().as_secs_f64();
    Ok(summarize_stats(
        stats,
        &windows,
        tokens.len(),
        opts,
        t_secs,
        wall - t_secs,
    ))
}

fn summarize_stats(
    stats: Vec<TokenStats>,
    windows: &[Vec<u32>],
    tokens_total: usize,
    opts: &PplOptions,
    t_secs: f64,
    s_secs: f64,
) -> (PplResult, PplResult, KldResult) {
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
            tokens_total,
            protocol: opts.protocol,
            tokens_processed: windows.len() * opts.ctx,
            wall_seconds: secs,
        }
    };
    let teacher_ppl = ppl(stats.iter().map(|s| s.nll_t).collect(), t_secs);
    let student_ppl = ppl(stats.iter().map(|s| s.nll_s).collect(), s_secs);
    (student_ppl, teacher_ppl, kld)
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
    fn top_k_with_all_tokens_equals_full_kl() {
        let t = [0.1f32, 2.0, -1.0, 0.7, 0.0];
        let s = [0.3f32, 1.5, -0.2, 0.1, 0.4];
        let full = compare(&t, &s, 3);
        let topk = TopK::from_logits(&t, 5, 3).compare(&s, 3);
        assert!((full.kl - topk.kl).abs() < 1e-6);
        assert!((full.dp - topk.dp).abs() < 1e-6 && full.same_top == topk.same_top);
        // Fewer tokens: a lower bound (merging can only lose divergence).
        let k2 = TopK::from_logits(&t, 2, 3).compare(&s, 3);
        assert!(k2.kl <= full.kl + 1e-9 && k2.kl > 0.0);
        assert_eq!(TopK::from_logits(&t, 2, 3).top[0].0, 1);
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

/// The teacher's distribution at one scored position, reduced to its top-k tokens: enough to
/// bound KL from below (the other tokens merged into one bucket), give the top token, and
/// the probability of the correct token.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    /// (token, log-probability), most likely first.
    pub top: Vec<(u32, f32)>,
    /// Log-probability of the correct token.
    pub target_logp: f32,
}

impl TopK {
    /// Reduces a logit row.
    pub fn from_logits(row: &[f32], k: usize, target: usize) -> Self {
        let (lp, _) = log_softmax(row);
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let k = k.min(row.len()).max(1);
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            lp[b as usize]
                .partial_cmp(&lp[a as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut top: Vec<(u32, f32)> = idx[..k]
            .iter()
            .map(|&i| (i, lp[i as usize] as f32))
            .collect();
        top.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
        Self {
            top,
            target_logp: lp[target] as f32,
        }
    }

    /// Compares with a student logit row.
    fn compare(&self, s: &[f32], target: usize) -> TokenStats {
        let (ls, as_) = log_softmax(s);
        let mut kl = 0.0;
        let (mut pt_top, mut ps_top) = (0.0, 0.0);
        for &(i, lt) in &self.top {
            let (pt, lsi) = ((lt as f64).exp(), ls[i as usize]);
            kl += pt * (lt as f64 - lsi);
            pt_top += pt;
            ps_top += lsi.exp();
        }
        let (pr, qr) = ((1.0 - pt_top).max(0.0), (1.0 - ps_top).max(1e-30));
        // Mass below f32 rounding of the stored log-probabilities is not a bucket.
        if pr > 1e-6 {
            kl += pr * (pr.ln() - qr.ln());
        }
        TokenStats {
            kl: kl.max(0.0),
            same_top: self.top[0].0 as usize == as_,
            dp: ls[target].exp() - (self.target_logp as f64).exp(),
            nll_t: -(self.target_logp as f64),
            nll_s: -ls[target],
        }
    }
}

/// Saved teacher log-probabilities: a JSON header line, then per scored position `k`
/// (u32 id, f32 log-prob) pairs and the f32 log-prob of the correct token, little-endian.
pub struct TeacherLogits {
    /// Header: model, ctx, chunks, first, k, vocab, a hash of the evaluated tokens.
    pub header: serde_json::Value,
    /// Positions in order.
    pub rows: Vec<TopK>,
}

fn token_hash(windows: &[Vec<u32>]) -> String {
    // FNV-1a over the token ids: detects a file saved for other text, ctx or tokenizer.
    let mut h: u64 = 0xcbf29ce484222325;
    for w in windows {
        for &t in w {
            for b in t.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x100000001b3);
            }
        }
    }
    format!("{h:016x}")
}

impl TeacherLogits {
    /// Writes to `path` (via a temporary name).
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let k = self.header["k"].as_u64().unwrap_or(0) as usize;
        let tmp = path.with_extension("tmp-partial");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        writeln!(f, "{}", self.header)?;
        for r in &self.rows {
            for j in 0..k {
                let (id, lp) = r.top.get(j).copied().unwrap_or((0, f32::NEG_INFINITY));
                f.write_all(&id.to_le_bytes())?;
                f.write_all(&lp.to_le_bytes())?;
            }
            f.write_all(&r.target_logp.to_le_bytes())?;
        }
        f.flush()?;
        drop(f);
        std::fs::rename(tmp, path)
    }

    /// Reads a file written by [`TeacherLogits::save`], checking its size against the header.
    pub fn load(path: &std::path::Path) -> Result<Self, EvalError> {
        let bad = |m: String| EvalError::Input(format!("{}: {m}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let nl = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("no header line".into()))?;
        let header: serde_json::Value =
            serde_json::from_slice(&bytes[..nl]).map_err(|e| bad(format!("bad header: {e}")))?;
        let k = header["k"]
            .as_u64()
            .ok_or_else(|| bad("header lacks k".into()))? as usize;
        let n = header["positions"]
            .as_u64()
            .ok_or_else(|| bad("header lacks positions".into()))? as usize;
        let rec = k
            .checked_mul(8)
            .and_then(|v| v.checked_add(4))
            .ok_or_else(|| bad("k too large".into()))?;
        let body = &bytes[nl + 1..];
        if k == 0 || n.checked_mul(rec) != Some(body.len()) {
            return Err(bad(format!(
                "expected {n} records of {rec} bytes, found {} bytes",
                body.len()
            )));
        }
        let f32_at = |o: usize| f32::from_le_bytes(body[o..o + 4].try_into().expect("4 bytes"));
        let rows = (0..n)
            .map(|i| {
                let base = i * rec;
                let top = (0..k)
                    .map(|j| {
                        (
                            u32::from_le_bytes(
                                body[base + 8 * j..base + 8 * j + 4].try_into().expect("4"),
                            ),
                            f32_at(base + 8 * j + 4),
                        )
                    })
                    .filter(|(_, lp)| lp.is_finite())
                    .collect();
                TopK {
                    top,
                    target_logp: f32_at(base + 8 * k),
                }
            })
            .collect();
        Ok(Self { header, rows })
    }
}

/// Runs the teacher and keeps its top-k log-probabilities at every scored position.
pub fn teacher_logits(
    teacher: &Checkpoint,
    tok: &Tokenizer,
    tokens: &[u32],
    opts: &PplOptions,
    k: usize,
    device: Device,
    mut progress: impl FnMut(u64, u64),
) -> Result<TeacherLogits, EvalError> {
    let (windows, first) = make_windows(tokens, tok, opts)?;
    let engine = LayerEngine::new(teacher, device, opts.ctx);
    let total = (teacher.config().num_hidden_layers as u64 + 1) * windows.len() as u64;
    let mut done = 0u64;
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
    let (n, v) = (opts.ctx - 1 - first, head.vocab());
    let mut rows = Vec::with_capacity(n * windows.len());
    for (w, st) in windows.iter().zip(&states) {
        let lt = head.logits(st, first);
        let targets = &w[first + 1..];
        let chunk: Vec<TopK> = (0..n)
            .into_par_iter()
            .map(|j| TopK::from_logits(&lt[j * v..(j + 1) * v], k, targets[j] as usize))
            .collect();
        rows.extend(chunk);
        done += 1;
        progress(done, total);
    }
    let header = serde_json::json!({
        "format": "compress-teacher-logits-v1", "model": teacher.path(), "ctx": opts.ctx,
        "chunks": windows.len(), "first": first, "k": k, "vocab": v, "positions": rows.len(),
        "protocol": opts.protocol, "tokens_fnv1a": token_hash(&windows),
    });
    Ok(TeacherLogits { header, rows })
}

/// The student's divergence from saved teacher log-probabilities (top-k: KL is a lower
/// bound that merges the tokens outside the teacher's top k into one bucket).
pub fn kl_from_saved(
    saved: &TeacherLogits,
    student: &Checkpoint,
    tok: &Tokenizer,
    tokens: &[u32],
    opts: &PplOptions,
    device: Device,
    mut progress: impl FnMut(u64, u64),
) -> Result<(PplResult, PplResult, KldResult), EvalError> {
    let (windows, first) = make_windows(tokens, tok, opts)?;
    let h = &saved.header;
    if h["ctx"].as_u64() != Some(opts.ctx as u64)
        || h["chunks"].as_u64() != Some(windows.len() as u64)
        || h["tokens_fnv1a"].as_str() != Some(token_hash(&windows).as_str())
    {
        return Err(EvalError::Input(format!(
            "saved teacher logits were made for other text, ctx or chunks (file: ctx {}, chunks {}; now: ctx {}, chunks {})",
            h["ctx"],
            h["chunks"],
            opts.ctx,
            windows.len()
        )));
    }
    if h["vocab"].as_u64() != Some(student.config().vocab_size as u64) {
        return Err(EvalError::Input(format!(
            "saved teacher logits have a vocabulary of {} tokens, the student {}",
            h["vocab"],
            student.config().vocab_size
        )));
    }
    let start = std::time::Instant::now();
    let engine = LayerEngine::new(student, device, opts.ctx);
    let total = (student.config().num_hidden_layers as u64 + 1) * windows.len() as u64;
    let mut done = 0u64;
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
    let (n, v) = (opts.ctx - 1 - first, head.vocab());
    let mut stats = Vec::new();
    for (c, (w, st)) in windows.iter().zip(&states).enumerate() {
        let ls = head.logits(st, first);
        let targets = &w[first + 1..];
        let chunk: Vec<TokenStats> = (0..n)
            .into_par_iter()
            .map(|j| saved.rows[c * n + j].compare(&ls[j * v..(j + 1) * v], targets[j] as usize))
            .collect();
        stats.extend(chunk);
        done += 1;
        progress(done, total);
    }
    Ok(summarize_stats(
        stats,
        &windows,
        tokens.len(),
        opts,
        0.0,
        start.elapsed().as_secs_f64(),
    ))
}
