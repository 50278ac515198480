//! Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language
//! Models"): score each weight by |W_ij| · ‖X_j‖₂, the size of its input channel over the
//! calibration tokens, and drop the lowest within each output row. No weight update.

use super::{LinearJob, PruneMethod};
use crate::PruneError;
use crate::mask::prune_by_score;

/// Wanda pruning.
pub struct Wanda;

/// Wanda's scores of `w` `[rows, cols]` given mean x² per input channel (‖X_j‖₂ up to a
/// constant factor, which does not change any comparison).
pub fn scores(w: &[f32], cols: usize, sq_mean: &[f64]) -> Vec<f32> {
    let norm: Vec<f32> = sq_mean.iter().map(|v| v.sqrt() as f32).collect();
    w.iter()
        .enumerate()
        .map(|(i, x)| x.abs() * norm[i % cols])
        .collect()
}

impl PruneMethod for Wanda {
    fn name(&self) -> &'static str {
        "wanda"
    }
    fn needs_calibration(&self) -> bool {
        true
    }
    fn prune_linear(&self, job: LinearJob<'_>) -> Result<(), PruneError> {
        let stats = job.stats.ok_or_else(|| {
            PruneError::Input("wanda needs calibration data (--calib FILE)".into())
        })?;
        if stats.sq_mean.len() != job.cols {
            return Err(PruneError::Input(format!(
                "`{}`: {} input statistics for {} input channels",
                job.name,
                stats.sq_mean.len(),
                job.cols
            )));
        }
        let s = scores(job.weight, job.cols, &stats.sq_mean);
        prune_by_score(job.weight, &s, job.rows, job.cols, job.pattern);
        Ok(())
    }
}
