//! Magnitude pruning: drop the weights of smallest |W| in each output row. Data-free; the
//! baseline Wanda and SparseGPT are measured against.

use super::{LinearJob, PruneMethod};
use crate::PruneError;
use crate::mask::prune_by_score;

/// Magnitude pruning.
pub struct Magnitude;

impl PruneMethod for Magnitude {
    fn name(&self) -> &'static str {
        "magnitude"
    }
    fn needs_calibration(&self) -> bool {
        false
    }
    fn prune_linear(&self, job: LinearJob<'_>) -> Result<(), PruneError> {
        let scores: Vec<f32> = job.weight.iter().map(|w| w.abs()).collect();
        prune_by_score(job.weight, &scores, job.rows, job.cols, job.pattern);
        Ok(())
    }
}
