//! SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be
//! Accurately Pruned in One-Shot"): the optimal-brain-surgeon update GPTQ uses, with a mask
//! instead of a grid. Columns are visited in blocks; on entering a block the mask is chosen
//! adaptively from w² / [H⁻¹]_cc² over the whole block (unstructured) or over each group of M
//! columns as it is reached (N:M), each pruned weight's value becomes error, and that error is
//! pushed onto the columns not yet visited so the layer's output on the calibration inputs is
//! reconstructed. The Hessian machinery is the one GPTQ uses ([`quant::hessian`]).

use faer::Mat;
use quant::hessian::{update_after_block, update_within_block};

use super::{LinearJob, PruneMethod};
use crate::mask::lowest;
use crate::{Pattern, PruneError};

/// SparseGPT's options.
#[derive(Debug, Clone)]
pub struct SparseGpt {
    /// Dampening added to diag(H), as a fraction of its mean (0.01 in the paper's code).
    pub damp: f64,
    /// Columns per block (128 in the paper).
    pub block: usize,
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
                    for r in 0..rows {
                        let s: Vec<f32> = (c..c + m).map(|j| sal(&wm, r, j)).collect();
                        for j in lowest(&s, m - n) {
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
