//! Divergence of a student from its teacher over the same chunks as perplexity, as
//! llama.cpp's `--kl-divergence` mode reports it: mean KL(teacher ‖ student) per scored token
//! with its standard error and percentiles, top-1 agreement, and the RMS of the change in
//! the probability of the correct token. Both models run layer by layer; only their final
//! hidden states are kept, and logits are recomputed chunk by chunk from both heads.

use model::engine::LayerEngine;
use model::{Checkpoint, Device, Tokenizer};
use rayon::prelude::*;
use serde::Serialize;

use crate::perplexity::{EvalError, PplOptions, PplResult, Protocol, make_windows, summarize};

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

/// Format tag in the header of a saved teacher-logits file.
pub const TEACHER_LOGITS_FORMAT: &str = "compress-teacher-logits-v1";

/// The header line is a few hundred bytes of JSON; a longer first line is not a header.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Slack for the f32 rounding of stored log-probabilities.
const LOGP_SLACK: f32 = 1e-5;

/// The header of a saved teacher-logits file: the run its rows belong to. Every field is
/// checked on reading (types, ranges, consistency with each other and with the file size)
/// and against the run that uses the file ([`TeacherLogits::check_run`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TeacherHeader {
    /// Always [`TEACHER_LOGITS_FORMAT`].
    pub format: String,
    /// The teacher the rows came from (informative only).
    pub model: String,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Chunks evaluated.
    pub chunks: usize,
    /// First scored position of each chunk (set by the protocol and ctx).
    pub first: usize,
    /// Tokens kept per position, at most `vocab`.
    pub k: usize,
    /// The teacher's vocabulary size.
    pub vocab: usize,
    /// Scored positions in all: `chunks * (ctx - 1 - first)`.
    pub positions: usize,
    /// Scoring protocol: `llama` or `hf`.
    pub protocol: String,
    /// FNV-1a hash of the evaluated token windows, 16 lowercase hex digits.
    pub tokens_fnv1a: String,
}

/// The name a protocol has in headers and on the command line.
fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Llama => "llama",
        Protocol::Hf => "hf",
    }
}

/// First scored position of a chunk of `ctx` tokens, as [`make_windows`] sets it.
fn first_scored(protocol: &str, ctx: usize) -> Option<usize> {
    match protocol {
        "llama" => Some(ctx / 2),
        "hf" => Some(0),
        _ => None,
    }
}

/// A JSON value for an error message, cut short so the message stays one short line.
fn shown(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// Bytes of one record: `k` (id, log-prob) pairs and the correct token's log-prob.
fn record_bytes(k: usize) -> Option<usize> {
    k.checked_mul(8)?.checked_add(4)
}

impl TeacherHeader {
    /// Reads and checks the header line (without its newline). `file` names the file in errors.
    fn parse(line: &[u8], file: &str) -> Result<Self, EvalError> {
        let bad = |m: String| EvalError::Input(format!("{file}: {m}"));
        let v: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| bad(format!("the header line is not JSON ({e})")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("the header line is not a JSON object".into()))?;
        let field = |f: &str| {
            obj.get(f)
                .ok_or_else(|| bad(format!("the header lacks field `{f}`")))
        };
        let uint = |f: &str| -> Result<usize, EvalError> {
            let x = field(f)?;
            x.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "header field `{f}` is {}, not a non-negative integer",
                        shown(x)
                    ))
                })
        };
        let string = |f: &str| -> Result<String, EvalError> {
            let x = field(f)?;
            x.as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("header field `{f}` is {}, not a string", shown(x))))
        };
        let h = Self {
            format: string("format")?,
            model: string("model")?,
            ctx: uint("ctx")?,
            chunks: uint("chunks")?,
            first: uint("first")?,
            k: uint("k")?,
            vocab: uint("vocab")?,
            positions: uint("positions")?,
            protocol: string("protocol")?,
            tokens_fnv1a: string("tokens_fnv1a")?,
        };
        h.check(file)?;
        Ok(h)
    }

    /// Checks the fields against each other: a known format and protocol, the first scored
    /// position that protocol gives, positions = chunks x scored tokens per chunk, 1 <= k <=
    /// vocab, and a well-formed token hash.
    fn check(&self, file: &str) -> Result<(), EvalError> {
        let bad = |m: String| Err(EvalError::Input(format!("{file}: {m}")));
        let s = |x: &str| shown(&serde_json::Value::from(x));
        if self.format != TEACHER_LOGITS_FORMAT {
            return bad(format!(
                "header field `format` is {}, expected \"{TEACHER_LOGITS_FORMAT}\"",
                s(&self.format)
            ));
        }
        let Some(first) = first_scored(&self.protocol, self.ctx) else {
            return bad(format!(
                "header field `protocol` is {}, expected \"llama\" or \"hf\"",
                s(&self.protocol)
            ));
        };
        if first + 1 >= self.ctx {
            return bad(format!(
                "header field `ctx` is {}: protocol {} scores no token of such a chunk",
                self.ctx, self.protocol
            ));
        }
        if self.first != first {
            return bad(format!(
                "header field `first` is {}, but protocol {} with ctx {} scores from position {first}",
                self.first, self.protocol, self.ctx
            ));
        }
        if self.chunks == 0 {
            return bad("header field `chunks` is 0".into());
        }
        let per_chunk = self.ctx - 1 - first;
        if self.chunks.checked_mul(per_chunk) != Some(self.positions) {
            return bad(format!(
                "header field `positions` is {}, but {} chunks x {per_chunk} scored tokens make {}",
                self.positions,
                self.chunks,
                self.chunks as u128 * per_chunk as u128
            ));
        }
        if self.vocab == 0 {
            return bad("header field `vocab` is 0".into());
        }
        if self.k == 0 || self.k > self.vocab {
            return bad(format!(
                "header field `k` is {}, outside 1..={} (field `vocab`)",
                self.k, self.vocab
            ));
        }
        let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if self.tokens_fnv1a.len() != 16 || !self.tokens_fnv1a.chars().all(hex) {
            return bad(format!(
                "header field `tokens_fnv1a` is {}, not 16 lowercase hex digits",
                s(&self.tokens_fnv1a)
            ));
        }
        Ok(())
    }

    /// Checks that `body_len` bytes after the header line hold exactly `positions` records.
    fn check_body_len(&self, body_len: u64, file: &str) -> Result<usize, EvalError> {
        let rec = record_bytes(self.k).ok_or_else(|| {
            EvalError::Input(format!("{file}: header field `k` is {}, too large", self.k))
        })?;
        let expected = self.positions as u128 * rec as u128;
        if expected != body_len as u128 {
            return Err(EvalError::Input(format!(
                "{file}: header fields `positions` {} and `k` {} need {expected} bytes of records after the header line, the file has {body_len}",
                self.positions, self.k
            )));
        }
        Ok(rec)
    }
}

/// Checks one decoded record (record `i`): `k` distinct token ids inside the vocabulary,
/// finite log-probabilities <= 0 sorted from most likely, a total probability of at most 1,
/// and a finite correct-token log-probability <= 0.
fn check_row(i: usize, row: &TopK, h: &TeacherHeader, ids: &mut Vec<u32>) -> Result<(), String> {
    if row.top.len() != h.k {
        return Err(format!(
            "record {i} has {} top-k entries, header field `k` is {}",
            row.top.len(),
            h.k
        ));
    }
    let mut mass = 0.0f64;
    for (j, &(id, lp)) in row.top.iter().enumerate() {
        if id as usize >= h.vocab {
            return Err(format!(
                "record {i}: token id {id} is outside the vocabulary of {} (header field `vocab`)",
                h.vocab
            ));
        }
        if !lp.is_finite() || lp > LOGP_SLACK {
            return Err(format!(
                "record {i}: log-probability {lp} of token {id} is not a finite value <= 0"
            ));
        }
        if j > 0 && lp > row.top[j - 1].1 {
            return Err(format!(
                "record {i}: top-k entries are not sorted from the most likely"
            ));
        }
        mass += (lp as f64).exp();
    }
    if mass > 1.0 + 1e-3 {
        return Err(format!(
            "record {i}: top-k probabilities sum to {mass:.4}, more than 1"
        ));
    }
    ids.clear();
    ids.extend(row.top.iter().map(|&(id, _)| id));
    ids.sort_unstable();
    if let Some(d) = ids.windows(2).find(|p| p[0] == p[1]) {
        return Err(format!("record {i}: token id {} appears twice", d[0]));
    }
    let t = row.target_logp;
    if !t.is_finite() || t > LOGP_SLACK {
        return Err(format!(
            "record {i}: log-probability {t} of the correct token is not a finite value <= 0"
        ));
    }
    Ok(())
}

/// Finds the end of the header line within its size limit.
fn header_end(bytes: &[u8], file: &str) -> Result<usize, EvalError> {
    if bytes.is_empty() {
        return Err(EvalError::Input(format!(
            "{file}: the file is empty: not saved teacher logits"
        )));
    }
    bytes
        .iter()
        .take(MAX_HEADER_BYTES)
        .position(|&b| b == b'\n')
        .ok_or_else(|| {
            EvalError::Input(format!(
                "{file}: no header line (a JSON object and a newline) in the first {MAX_HEADER_BYTES} bytes: not saved teacher logits"
            ))
        })
}

/// Saved teacher log-probabilities: a JSON header line, then per scored position `k`
/// (u32 id, f32 log-prob) pairs and the f32 log-prob of the correct token, little-endian.
#[derive(Debug, Clone)]
pub struct TeacherLogits {
    /// What run the rows belong to.
    pub header: TeacherHeader,
    /// Positions in order.
    pub rows: Vec<TopK>,
    /// The file the rows were read from (empty when computed here); errors name it.
    pub path: std::path::PathBuf,
}

fn token_hash(windows: &[Vec<u32>]) -> String {
    // Detects a file saved for other text, ctx or tokenizer.
    model::hash::windows_fnv1a(windows)
}

impl TeacherLogits {
    /// The file for error messages.
    fn name(&self) -> String {
        if self.path.as_os_str().is_empty() {
            "teacher logits".into()
        } else {
            self.path.display().to_string()
        }
    }

    /// Writes to `path` (via a temporary name).
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let k = self.header.k;
        let tmp = path.with_extension("tmp-partial");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        writeln!(f, "{}", serde_json::to_string(&self.header)?)?;
        for (i, r) in self.rows.iter().enumerate() {
            // A short row would shift every later record.
            if r.top.len() != k {
                drop(f);
                let _ = std::fs::remove_file(&tmp);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("row {i} has {} entries, k is {k}", r.top.len()),
                ));
            }
            for &(id, lp) in &r.top {
                f.write_all(&id.to_le_bytes())?;
                f.write_all(&lp.to_le_bytes())?;
            }
            f.write_all(&r.target_logp.to_le_bytes())?;
        }
        f.flush()?;
        drop(f);
        std::fs::rename(tmp, path)
    }

    /// Parses the bytes of a file written by [`TeacherLogits::save`] (`path` names it in
    /// errors), checking every header field, the size against the header, and every record.
    pub fn parse(bytes: &[u8], path: &std::path::Path) -> Result<Self, EvalError> {
        let file = path.display().to_string();
        let nl = header_end(bytes, &file)?;
        let header = TeacherHeader::parse(&bytes[..nl], &file)?;
        let body = &bytes[nl + 1..];
        let rec = header.check_body_len(body.len() as u64, &file)?;
        let k = header.k;
        let f32_at = |r: &[u8], o: usize| f32::from_le_bytes([r[o], r[o + 1], r[o + 2], r[o + 3]]);
        let u32_at = |r: &[u8], o: usize| u32::from_le_bytes([r[o], r[o + 1], r[o + 2], r[o + 3]]);
        // The size matched the header, so this allocation is bounded by the file.
        let mut rows = Vec::with_capacity(header.positions);
        let mut ids = Vec::with_capacity(k);
        for (i, r) in body.chunks_exact(rec).enumerate() {
            let row = TopK {
                top: (0..k)
                    .map(|j| (u32_at(r, 8 * j), f32_at(r, 8 * j + 4)))
                    .collect(),
                target_logp: f32_at(r, 8 * k),
            };
            check_row(i, &row, &header, &mut ids)
                .map_err(|m| EvalError::Input(format!("{file}: {m}")))?;
            rows.push(row);
        }
        Ok(Self {
            header,
            rows,
            path: path.to_path_buf(),
        })
    }

    /// Reads and checks a file written by [`TeacherLogits::save`]: the header first, then
    /// its counts against the file size, and only then the records ([`Self::parse`]).
    pub fn load(path: &std::path::Path) -> Result<Self, EvalError> {
        use std::io::Read;
        let file = path.display().to_string();
        let io = |e: std::io::Error| {
            EvalError::Input(format!("{file}: cannot read teacher logits: {e}"))
        };
        let f = std::fs::File::open(path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        let mut bytes = Vec::new();
        (&f).take(MAX_HEADER_BYTES as u64)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        let nl = header_end(&bytes, &file)?;
        let header = TeacherHeader::parse(&bytes[..nl], &file)?;
        // A header that lies about its counts is refused before the body is read.
        header.check_body_len(len.saturating_sub(nl as u64 + 1), &file)?;
        (&f).read_to_end(&mut bytes).map_err(io)?;
        Self::parse(&bytes, path)
    }

    /// Checks every field and record (as [`Self::parse`] does) and that the rows fit the run
    /// about to use them: the same protocol, ctx, first scored position, chunks, positions,
    /// vocabulary (the student's `vocab`) and tokens, and at each position the correct
    /// token's log-probability agrees with the top k. `windows` and `first` come from
    /// [`make_windows`] for `opts`. Cheap next to running the student: call it first.
    pub fn check_run(
        &self,
        vocab: usize,
        windows: &[Vec<u32>],
        first: usize,
        opts: &PplOptions,
    ) -> Result<(), EvalError> {
        let file = self.name();
        let h = &self.header;
        h.check(&file)?;
        let bad = |m: String| EvalError::Input(format!("{file}: {m}"));
        if self.rows.len() != h.positions {
            return Err(bad(format!(
                "{} records, header field `positions` is {}",
                self.rows.len(),
                h.positions
            )));
        }
        let mut ids = Vec::with_capacity(h.k);
        for (i, r) in self.rows.iter().enumerate() {
            check_row(i, r, h, &mut ids).map_err(bad)?;
        }
        // Field by field against this run; each message gives both values.
        let n = opts.ctx.saturating_sub(first + 1);
        let fields: [(&str, String, String, &str); 7] = [
            (
                "protocol",
                h.protocol.clone(),
                protocol_name(opts.protocol).into(),
                "--protocol",
            ),
            ("ctx", h.ctx.to_string(), opts.ctx.to_string(), "--ctx"),
            (
                "first",
                h.first.to_string(),
                first.to_string(),
                "first scored position, set by --protocol and --ctx",
            ),
            (
                "chunks",
                h.chunks.to_string(),
                windows.len().to_string(),
                "--chunks and the length of the --ppl text",
            ),
            (
                "positions",
                h.positions.to_string(),
                (windows.len() as u128 * n as u128).to_string(),
                "chunks x scored tokens per chunk",
            ),
            (
                "vocab",
                h.vocab.to_string(),
                vocab.to_string(),
                "the student's vocab_size",
            ),
            (
                "tokens_fnv1a",
                h.tokens_fnv1a.clone(),
                token_hash(windows),
                "hash of the evaluated tokens: another --ppl text or tokenizer",
            ),
        ];
        for (field, saved, now, what) in fields {
            if saved != now {
                return Err(bad(format!(
                    "saved with {field} {saved}, this run has {field} {now} ({what})"
                )));
            }
        }
        // The correct token's log-probability must match its top-k entry, or lie below the
        // k-th when it is not among them: rows saved for other tokens do not.
        for (c, w) in windows.iter().enumerate() {
            if w.len() != opts.ctx {
                return Err(bad(format!(
                    "chunk {c} has {} tokens, ctx is {}",
                    w.len(),
                    opts.ctx
                )));
            }
            for (j, &t) in w[first + 1..].iter().enumerate() {
                let i = c * n + j;
                let row = &self.rows[i];
                if t as usize >= h.vocab {
                    return Err(bad(format!(
                        "record {i}: the correct token {t} is outside the vocabulary of {}",
                        h.vocab
                    )));
                }
                let tl = row.target_logp;
                let fits = match row.top.iter().find(|e| e.0 == t) {
                    Some(&(_, lp)) => (lp - tl).abs() <= 1e-4 * (1.0 + lp.abs()),
                    None => h.k == h.vocab || tl <= row.top[h.k - 1].1 + LOGP_SLACK,
                };
                if !fits {
                    return Err(bad(format!(
                        "record {i}: log-probability {tl} of the correct token {t} disagrees with the top k (rows saved for other tokens)"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Runs the teacher and keeps its top-k log-probabilities at every scored position (`k` is
/// capped at the vocabulary).
pub fn teacher_logits(
    teacher: &Checkpoint,
    tok: &Tokenizer,
    tokens: &[u32],
    opts: &PplOptions,
    k: usize,
    device: Device,
    mut progress: impl FnMut(u64, u64),
) -> Result<TeacherLogits, EvalError> {
    if k == 0 {
        return Err(EvalError::Input("--top-k must be at least 1".into()));
    }
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
    let k = k.min(v);
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
    let header = TeacherHeader {
        format: TEACHER_LOGITS_FORMAT.into(),
        model: teacher.path().display().to_string(),
        ctx: opts.ctx,
        chunks: windows.len(),
        first,
        k,
        vocab: v,
        positions: rows.len(),
        protocol: protocol_name(opts.protocol).into(),
        tokens_fnv1a: token_hash(&windows),
    };
    Ok(TeacherLogits {
        header,
        rows,
        path: std::path::PathBuf::new(),
    })
}

/// The student's divergence from saved teacher log-probabilities (top-k: KL is a lower
/// bound that merges the tokens outside the teacher's top k into one bucket). The saved rows
/// are checked against this run ([`TeacherLogits::check_run`]) before the student runs.
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
    saved.check_run(student.config().vocab_size, &windows, first, opts)?;
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
