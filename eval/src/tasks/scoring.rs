//! Log-likelihood scoring of multiple-choice continuations on the layer-by-layer engine, and
//! the acc / acc_norm metrics.
//!
//! Tokenization follows lm-evaluation-harness: trailing whitespace of the context moves to the
//! front of the continuation, the context and context+continuation are encoded separately,
//! and the continuation tokens are the tail of the second beyond the length of the first. BOS
//! goes first when the tokenizer adds one.
//!
//! Two window shapes keep the work near one pass over each context:
//! - every continuation is one token: the window is the context alone and all choices are read
//!   from the logits of its last position;
//! - otherwise the continuations are packed after the context, each restarting its positions
//!   where the context ends and masked to see only the context and itself, so one window
//!   scores them all exactly as separate `context + continuation` windows would.
//!
//! Windows are run in groups of about [`GROUP_TOKENS`] tokens so activations stay bounded.

use model::Tokenizer;
use model::engine::{Head, LayerEngine};
use model::transformer::WindowLayout;
use rayon::prelude::*;

use crate::perplexity::EvalError;

/// Tokens per group of windows run through all blocks together.
pub const GROUP_TOKENS: usize = 64 * 1024;

/// One document ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Context tokens (BOS first when the tokenizer adds it).
    pub context: Vec<u32>,
    /// Tokens of each continuation.
    pub continuations: Vec<Vec<u32>>,
}

impl Request {
    /// Whether every continuation is a single token (one window, last position only).
    pub fn single_token(&self) -> bool {
        self.continuations.iter().all(|c| c.len() == 1)
    }

    /// Tokens in this request's window.
    pub fn window_len(&self) -> usize {
        if self.single_token() {
            self.context.len()
        } else {
            self.context.len() + self.continuations.iter().map(Vec::len).sum::<usize>()
        }
    }

    /// The tokens of this request's window.
    pub fn window(&self) -> Vec<u32> {
        let mut w = self.context.clone();
        if !self.single_token() {
            for c in &self.continuations {
                w.extend_from_slice(c);
            }
        }
        w
    }

    /// Positions and segments of the packed window: the context at `0..n` (segment 0), then
    /// continuation k at `n..n+len_k` (segment k+1).
    pub fn packed_layout(&self) -> (Vec<usize>, Vec<u32>) {
        let n = self.context.len();
        let mut pos: Vec<usize> = (0..n).collect();
        let mut seg = vec![0u32; n];
        for (k, c) in self.continuations.iter().enumerate() {
            pos.extend(n..n + c.len());
            seg.extend(std::iter::repeat_n(k as u32 + 1, c.len()));
        }
        (pos, seg)
    }

    /// Window rows whose logits score the continuations, and for each continuation the
    /// (index into those rows, target token) pairs to sum.
    pub fn score_rows(&self) -> (Vec<usize>, Vec<Vec<(usize, u32)>>) {
        let n = self.context.len();
        let mut rows = vec![n - 1];
        let mut picks = Vec::with_capacity(self.continuations.len());
        if self.single_token() {
            for c in &self.continuations {
                picks.push(vec![(0, c[0])]);
            }
            return (rows, picks);
        }
        let mut offset = n;
        for c in &self.continuations {
            let mut p = vec![(0, c[0])];
            // Token j of the continuation is predicted at the window row of token j-1.
            for (j, &t) in c.iter().enumerate().skip(1) {
                p.push((rows.len(), t));
                rows.push(offset + j - 1);
            }
            picks.push(p);
            offset += c.len();
        }
        (rows, picks)
    }
}

/// Encodes a context and its continuations the way lm-evaluation-harness does. A context
/// longer than `max_len` minus the longest continuation loses tokens from its start (after
/// BOS).
pub fn encode_request(
    tok: &Tokenizer,
    context: &str,
    continuations: &[String],
    max_len: usize,
) -> Result<Request, EvalError> {
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    let ctx = tok.encode(trimmed)?;
    let mut conts = Vec::with_capacity(continuations.len());
    for c in continuations {
        let whole = tok.encode(&format!("{trimmed}{moved}{c}"))?;
        let tail = whole.get(ctx.len()..).unwrap_or(&[]).to_vec();
        if tail.is_empty() {
            return Err(EvalError::Input(format!(
                "continuation {c:?} adds no tokens after context {context:?}"
            )));
        }
        conts.push(tail);
    }
    let mut context = Vec::with_capacity(ctx.len() + 1);
    if tok.add_bos
        && let Some(b) = tok.bos_id
    {
        context.push(b);
    }
    let keep = usize::from(!context.is_empty());
    context.extend(ctx);
    if context.is_empty() {
        return Err(EvalError::Input(
            "empty context and no BOS token to start from".into(),
        ));
    }
    let longest = conts.iter().map(Vec::len).max().unwrap_or(0);
    if context.len() + longest > max_len {
        let excess = context.len() + longest - max_len;
        if excess >= context.len() - keep {
            return Err(EvalError::Input(format!(
                "a continuation of {longest} tokens does not fit in {max_len} positions"
            )));
        }
        context.drain(keep..keep + excess);
    }
    Ok(Request {
        context,
        continuations: conts,
    })
}

/// Log-sum-exp of one row of logits.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// Summed log-probabilities of each request's continuations from the logits of its rows.
fn read_scores(req: &Request, logits: &[f32], vocab: usize) -> Vec<f64> {
    let (_, picks) = req.score_rows();
    let rows: Vec<&[f32]> = logits.chunks_exact(vocab).collect();
    let lse: Vec<f64> = rows.par_iter().map(|r| log_sum_exp(r)).collect();
    picks
        .iter()
        .map(|p| {
            p.iter()
                .map(|&(r, t)| rows[r][t as usize] as f64 - lse[r])
                .sum()
        })
        .collect()
}

/// Log-likelihood of every continuation of every request, in order. `progress(done, total)`
/// counts (window, block) steps plus one head step per window.
pub fn score_requests(
    engine: &LayerEngine<'_>,
    head: &Head,
    reqs: &[Request],
    group_tokens: usize,
    mut progress: impl FnMut(u64, u64),
) -> Result<Vec<Vec<f64>>, EvalError> {
    let cfg = engine.checkpoint().config();
    let (n_heads, layers) = (cfg.num_attention_heads, cfg.num_hidden_layers as u64);
    // Homogeneous groups: single-token requests run causal, the rest with packed layouts.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for single in [true, false] {
        let mut cur: Vec<usize> = Vec::new();
        let mut tokens = 0;
        for (i, r) in reqs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.single_token() == single)
        {
            if !cur.is_empty() && tokens + r.window_len() > group_tokens {
                groups.push(std::mem::take(&mut cur));
                tokens = 0;
            }
            tokens += r.window_len();
            cur.push(i);
        }
        if !cur.is_empty() {
            groups.push(cur);
        }
    }
    let total = (layers + 1) * reqs.len() as u64;
    let mut done = 0u64;
    progress(done, total);
    let mut out: Vec<Vec<f64>> = vec![Vec::new(); reqs.len()];
    for group in groups {
        let windows: Vec<Vec<u32>> = group.iter().map(|&i| reqs[i].window()).collect();
        let single = reqs[group[0]].single_token();
        let layouts: Option<Vec<WindowLayout>> = (!single).then(|| {
            group
                .iter()
                .map(|&i| {
                    let (pos, seg) = reqs[i].packed_layout();
                    engine.rope().layout(&pos, Some(&seg), n_heads)
                })
                .collect()
        });
        let mut states = engine.embed(&windows)?;
        engine.run_blocks_with(
            &mut states,
            layouts.as_deref(),
            |_, _, _| Ok(()),
            || {
                done += 1;
                progress(done, total);
            },
        )?;
        for (&i, s) in group.iter().zip(&states) {
            let (rows, _) = reqs[i].score_rows();
            let logits = head.logits_at(s, &rows);
            out[i] = read_scores(&reqs[i], &logits, head.vocab());
            done += 1;
            progress(done, total);
        }
    }
    Ok(out)
}

/// Index of the largest value (the first on ties, as numpy's argmax).
pub fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// lm-eval's (acc, acc_norm) predictions: the argmax of the summed log-likelihoods, and of
/// the log-likelihoods divided by the length of each choice string in characters (the choice
/// as written, without the space put before it).
pub fn predictions(lls: &[f64], choices: &[String]) -> (usize, usize) {
    let norm: Vec<f64> = lls
        .iter()
        .zip(choices)
        .map(|(l, c)| l / c.chars().count().max(1) as f64)
        .collect();
    (argmax(lls), argmax(&norm))
}

/// Mean of 0/1 outcomes and its standard error, sqrt(p(1-p)/(n-1)) (lm-eval's sample
/// standard error of the mean).
pub fn mean_stderr(hits: &[bool]) -> (f64, f64) {
    let n = hits.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let p = hits.iter().filter(|&&h| h).count() as f64 / n as f64;
    let se = if n > 1 {
        (p * (1.0 - p) / (n as f64 - 1.0)).sqrt()
    } else {
        0.0
    };
    (p, se)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acc_and_acc_norm_can_disagree() {
        // " Paris" (5 chars) at -6 vs " the capital city of France" (26 chars) at -13: acc
        // picks the short one, acc_norm the long one (-1.2/char vs -0.5/char).
        let choices = vec![
            "Paris".to_string(),
            "the capital city of France".to_string(),
        ];
        assert_eq!(predictions(&[-6.0, -13.0], &choices), (0, 1));
        // Both agree when the long choice is also more likely overall.
        assert_eq!(predictions(&[-6.0, -5.0], &choices), (1, 1));
        // Ties go to the first choice, as numpy's argmax.
        assert_eq!(
            predictions(&[-1.0, -1.0], &["ab".into(), "cd".into()]),
            (0, 0)
        );
    }

    #[test]
    fn stderr_matches_lm_eval_formula() {
        let hits = [true, true, true, false];
        let (p, se) = mean_stderr(&hits);
        assert!((p - 0.75).abs() < 1e-12);
        // sample variance (ddof=1) = 0.25, / n = 0.0625 -> 0.25; equals sqrt(p(1-p)/(n-1)).
        assert!((se - (0.75f64 * 0.25 / 3.0).sqrt()).abs() < 1e-12);
        assert!((se - 0.25).abs() < 1e-12);
    }

    #[test]
    fn packed_rows_and_layout() {
        let r = Request {
            context: vec![1, 2, 3],
            continuations: vec![vec![10, 11, 12], vec![20]],
        };
        assert!(!r.single_token());
        assert_eq!(r.window(), vec![1, 2, 3, 10, 11, 12, 20]);
        let (pos, seg) = r.packed_layout();
        assert_eq!(pos, vec![0, 1, 2, 3, 4, 5, 3]);
        assert_eq!(seg, vec![0, 0, 0, 1, 1, 1, 2]);
        let (rows, picks) = r.score_rows();
        // Row 2 (last context token) predicts the first token of both; 11 from row 3, 12
        // from row 4.
        assert_eq!(rows, vec![2, 3, 4]);
        assert_eq!(picks, vec![vec![(0, 10), (1, 11), (2, 12)], vec![(0, 20)]]);
        let s = Request {
            context: vec![1, 2],
            continuations: vec![vec![7], vec![8], vec![9]],
        };
        assert!(s.single_token());
        assert_eq!(s.window(), vec![1, 2]);
        assert_eq!(
            s.score_rows(),
            (vec![1], vec![vec![(0, 7)], vec![(0, 8)], vec![(0, 9)]])
        );
    }

    #[test]
    fn scores_from_logits() {
        // Two rows over a vocabulary of 3.
        let r = Request {
            context: vec![0],
            continuations: vec![vec![1, 2], vec![2]],
        };
        let logits = [0.0f32, 1.0, 2.0, 3.0, 0.0, 0.0];
        let s = read_scores(&r, &logits, 3);
        let l0 = (1f64 + 1f64.exp() + 2f64.exp()).ln();
        let l1 = (3f64.exp() + 2.0).ln();
        assert!((s[0] - ((1.0 - l0) + (0.0 - l1))).abs() < 1e-9);
        assert!((s[1] - (2.0 - l0)).abs() < 1e-9);
    }
}
