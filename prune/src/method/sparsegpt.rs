//! SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be
//! Accurately Pruned in One-Shot"): the optimal-brain-surgeon update GPTQ uses, with a mask
//! instead of a grid. Columns are visited in blocks; on entering a block the mask is chosen
//! adaptively from w² / [H⁻¹]_cc² over the whole block (unstructured) or over each group of M
//! columns as it is reached (N:M), each pruned weight's value becomes error, and that error is
//! pushed onto the columns not yet visited so the layer's output on the calibration inputs is
//! reconstructed. The Hessian machinery is the one GPTQ uses ([`quant::hessian`]).
//!
//! N:M groups: the paper scores each column of a group alone (w² / [H⁻¹]_cc² at the start of
//! the group), but pruning one column changes the later columns of the same group through the
//! error feedback. The sweep's error is exactly Σ e² over pruned columns (e = w_c / U_cc with
//! w_c as the sweep reaches it), so by default ([`NmSelect::Exact`]) every subset of `M − N`
//! columns is run through the group's U block and the one adding the least error is pruned.

use faer::Mat;
use quant::hessian::{update_after_block, update_within_block};
use rayon::prelude::*;

use super::{LinearJob, NmSelect, PruneMethod};
use crate::mask::lowest;
use crate::{Pattern, PruneError};

/// Refit steps after the sweep by default: the sweep fixes each column once and only
/// approximates the least-squares weights of its final mask; three conjugate-gradient steps
/// from the sweep's weights recover most of the rest (SmolLM2 4:8, 128 x 512 calibration:
/// perplexity 52.85 without, 49.11 with 3 steps, for 3% more CPU time; see BENCHMARKS.md).
pub const DEFAULT_REFIT: usize = 3;

/// Most subsets of an N:M group [`NmSelect::Exact`] tries per group (C(8, 4) = 70 for 4:8);
/// patterns with more (8:16 has 12,870) use the paper's saliency.
pub const MAX_SUBSETS: usize = 4096;

/// Every `k`-of-`m` bit mask, in increasing order, or `None` when there are more than
/// [`MAX_SUBSETS`] (or `m` > 63).
fn subsets(m: usize, k: usize) -> Option<Vec<u64>> {
    if m > 63 || k > m {
        return None;
    }
    let mut count: u128 = 1;
    for i in 0..k as u128 {
        count = count * (m as u128 - i) / (i + 1);
        if count > MAX_SUBSETS as u128 {
            return None;
        }
    }
    if k == 0 {
        return Some(vec![0]);
    }
    // Gosper's hack: the next larger integer with the same number of set bits.
    let mut out = Vec::with_capacity(count as usize);
    let mut s: u64 = (1 << k) - 1;
    while s < (1 << m) {
        out.push(s);
        let c = s & s.wrapping_neg();
        let r = s + c;
        s = (((r ^ s) >> 2) / c) | r;
    }
    Some(out)
}

/// The subset (bit `j` = column `j` of the group) whose pruning adds the least sweep error,
/// for a row's group weights `w` and the group's block `ug` `[m, m]` of U (upper triangle read).
fn best_subset(w: &[f32], ug: &[f32], subs: &[u64]) -> u64 {
    let m = w.len();
    let mut cur = [0f32; 64];
    let mut best = (f64::INFINITY, subs[0]);
    for &s in subs {
        cur[..m].copy_from_slice(w);
        let mut loss = 0f64;
        for a in 0..m {
            if s >> a & 1 == 0 {
                continue;
            }
            let e = cur[a] / ug[a * m + a];
            loss += e as f64 * e as f64;
            if loss >= best.0 {
                break;
            }
            for b in a + 1..m {
                cur[b] -= e * ug[a * m + b];
            }
        }
        if loss < best.0 {
            best = (loss, s);
        }
    }
    best.1
}

/// SparseGPT's options.
#[derive(Debug, Clone)]
pub struct SparseGpt {
    /// Dampening added to diag(H), as a fraction of its mean (0.01 in the paper's code).
    pub damp: f64,
    /// Columns per block (128 in the paper).
    pub block: usize,
    /// How an N:M group's pruned columns are chosen.
    pub nm_select: NmSelect,
}

impl PruneMethod for SparseGpt {
    fn name(&self) -> &'static str {
        "sparsegpt"
    }
    fn needs_calibration(&self) -> bool {
        true
    }
    fn needs_hessian(&self) -> bool {
        true
    }
    fn damp(&self) -> f64 {
        self.damp
    }
    fn default_refit(&self) -> usize {
        DEFAULT_REFIT
    }

    fn prune_linear(&self, job: LinearJob<'_>) -> Result<(), PruneError> {
        let prep = job.hessian.ok_or_else(|| {
            PruneError::Input("sparsegpt needs calibration data (--calib FILE)".into())
        })?;
        let (rows, cols) = (job.rows, job.cols);
        let (perm, dead) = (&prep.perm, &prep.dead);
        let u = prep.l.L().transpose();
        // A block holds whole N:M groups.
        let block = match job.pattern {
            Pattern::NofM { m, .. } => (self.block / m).max(1) * m,
            Pattern::Unstructured { .. } => self.block.max(1),
        };
        let mut wm = Mat::<f32>::from_fn(rows, cols, |r, c| {
            if dead[c] {
                0.0
            } else {
                job.weight[r * cols + perm[c]]
            }
        });
        let subs = match (job.pattern, self.nm_select) {
            (Pattern::NofM { n, m }, NmSelect::Exact) => subsets(m, m - n),
            _ => None,
        };
        let mut pruned = vec![false; rows * cols];
        for i1 in (0..cols).step_by(block) {
            let i2 = (i1 + block).min(cols);
            let count = i2 - i1;
            // Saliency w² / [U]_cc² (U the upper Cholesky factor of H⁻¹), as the paper.
            let sal = |wm: &Mat<f32>, r: usize, c: usize| {
                let d = u[(c, c)];
                wm[(r, c)] * wm[(r, c)] / (d * d)
            };
            if let Pattern::Unstructured { sparsity } = job.pattern {
                let k = ((rows * count) as f64 * sparsity).round() as usize;
                let scores: Vec<f32> = (0..rows * count)
                    .map(|i| sal(&wm, i / count, i1 + i % count))
                    .collect();
                for i in lowest(&scores, k) {
                    pruned[(i / count) * cols + i1 + i % count] = true;
                }
            }
            let mut err = Mat::<f32>::zeros(rows, count);
            for i in 0..count {
                let c = i1 + i;
                if let Pattern::NofM { n, m } = job.pattern
                    && (c - i1).is_multiple_of(m)
                {
                    let chosen: Vec<u64> = match &subs {
                        Some(subs) => {
                            let ug: Vec<f32> =
                                (0..m * m).map(|k| u[(c + k / m, c + k % m)]).collect();
                            let wm = &wm;
                            (0..rows)
                                .into_par_iter()
                                .map(|r| {
                                    // m <= 63 here (`subsets`): no allocation per row.
                                    let mut w = [0f32; 64];
                                    for (j, v) in w[..m].iter_mut().enumerate() {
                                        *v = wm[(r, c + j)];
                                    }
                                    best_subset(&w[..m], &ug, subs)
                                })
                                .collect()
                        }
                        None => (0..rows)
                            .map(|r| {
                                let s: Vec<f32> = (c..c + m).map(|j| sal(&wm, r, j)).collect();
                                lowest(&s, m - n).iter().fold(0u64, |b, &j| b | 1 << j)
                            })
                            .collect(),
                    };
                    for (r, bits) in chosen.into_iter().enumerate() {
                        for j in (0..m).filter(|&j| bits >> j & 1 == 1) {
                            pruned[r * cols + c + j] = true;
                        }
                    }
                }
                let d = u[(c, c)];
                for r in 0..rows {
                    if pruned[r * cols + c] {
                        err[(r, i)] = wm[(r, c)] / d;
                        wm[(r, c)] = 0.0;
                    }
                }
                update_within_block(&mut wm, &err, u, i1, i, count);
            }
            update_after_block(&mut wm, &err, u, i1, i2);
        }
        for r in 0..rows {
            for c in 0..cols {
                let v = if pruned[r * cols + c] {
                    0.0
                } else {
                    wm[(r, c)]
                };
                if !v.is_finite() {
                    return Err(PruneError::Numerical(format!(
                        "`{}`: SparseGPT produced a non-finite weight",
                        job.name
                    )));
                }
                job.weight[r * cols + perm[c]] = v;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(s: &mut u64) -> f64 {
        *s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    /// Gauss-Jordan inverse of a small SPD matrix.
    fn inverse(a: &[f64], n: usize) -> Vec<f64> {
        let mut m = a.to_vec();
        let mut inv: Vec<f64> = (0..n * n)
            .map(|k| if k / n == k % n { 1.0 } else { 0.0 })
            .collect();
        for i in 0..n {
            let p = m[i * n + i];
            for j in 0..n {
                m[i * n + j] /= p;
                inv[i * n + j] /= p;
            }
            for r in (0..n).filter(|&r| r != i) {
                let f = m[r * n + i];
                for j in 0..n {
                    m[r * n + j] -= f * m[i * n + j];
                    inv[r * n + j] -= f * inv[i * n + j];
                }
            }
        }
        inv
    }

    /// Upper U with UᵀU = a.
    fn upper_cholesky(a: &[f64], n: usize) -> Vec<f64> {
        let mut u = vec![0f64; n * n];
        for i in 0..n {
            let d = a[i * n + i] - (0..i).map(|k| u[k * n + i].powi(2)).sum::<f64>();
            u[i * n + i] = d.sqrt();
            for j in i + 1..n {
                let s = a[i * n + j] - (0..i).map(|k| u[k * n + i] * u[k * n + j]).sum::<f64>();
                u[i * n + j] = s / u[i * n + i];
            }
        }
        u
    }

    /// The error of pruning the columns in `s` one after another, each removed optimally with
    /// the columns after it free (optimal brain surgeon on the trailing block of H), from H
    /// itself rather than from U.
    fn obs_loss(h: &[f64], n: usize, w: &[f64], s: u64) -> f64 {
        let mut w = w.to_vec();
        let mut loss = 0.0;
        for c in (0..n).filter(|&c| s >> c & 1 == 1) {
            let k = n - c;
            let sub: Vec<f64> = (0..k * k).map(|t| h[(c + t / k) * n + c + t % k]).collect();
            let inv = inverse(&sub, k);
            loss += w[c] * w[c] / inv[0];
            for t in 1..k {
                w[c + t] -= w[c] * inv[t * k] / inv[0];
            }
            w[c] = 0.0;
        }
        loss
    }

    #[test]
    fn subsets_are_all_k_of_m_masks() {
        assert_eq!(subsets(4, 2).unwrap(), vec![3, 5, 6, 9, 10, 12]);
        assert_eq!(subsets(8, 4).unwrap().len(), 70);
        assert!(subsets(8, 4).unwrap().iter().all(|s| s.count_ones() == 4));
        assert!(subsets(16, 8).is_none());
        assert!(subsets(64, 1).is_none());
    }

    /// Broken once by scoring each column alone (no update of the later columns): the chosen
    /// subset was no longer the minimiser for some rows.
    #[test]
    fn exact_selection_minimises_the_surgeon_error_and_beats_saliency() {
        let n = 8;
        let mut seed = 5u64;
        let a: Vec<f64> = (0..12 * n).map(|_| lcg(&mut seed)).collect();
        // Correlated inputs: H = AᵀA + common component + a little dampening.
        let h: Vec<f64> = (0..n * n)
            .map(|t| {
                let (i, j) = (t / n, t % n);
                (0..12).map(|r| a[r * n + i] * a[r * n + j]).sum::<f64>()
                    + 2.0
                    + if i == j { 0.1 } else { 0.0 }
            })
            .collect();
        let u = upper_cholesky(&inverse(&h, n), n);
        let ug: Vec<f32> = u.iter().map(|&v| v as f32).collect();
        let mut differs = 0;
        for k in [2, 4, 6] {
            let subs = subsets(n, k).unwrap();
            for _ in 0..50 {
                let w: Vec<f64> = (0..n).map(|_| lcg(&mut seed)).collect();
                let wf: Vec<f32> = w.iter().map(|&v| v as f32).collect();
                let chosen = best_subset(&wf, &ug, &subs);
                let min = subs
                    .iter()
                    .map(|&s| obs_loss(&h, n, &w, s))
                    .fold(f64::INFINITY, f64::min);
                let got = obs_loss(&h, n, &w, chosen);
                assert!(got <= min * (1.0 + 1e-4), "k {k}: {got} vs min {min}");
                let sal: Vec<f32> = (0..n)
                    .map(|j| (w[j] * w[j] / (u[j * n + j] * u[j * n + j])) as f32)
                    .collect();
                let paper = lowest(&sal, k).iter().fold(0u64, |b, &j| b | 1 << j);
                assert!(got <= obs_loss(&h, n, &w, paper) * (1.0 + 1e-4));
                differs += usize::from(paper != chosen);
            }
        }
        assert!(differs > 0, "the interactions never changed a choice");
    }
}
