//! OWL (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity"): blocks whose Wanda scores
//! have more outliers keep more of their weights. A block's outlier ratio D_l is the fraction
//! of its linear weights whose score |W_ij|·‖X_j‖₂ exceeds `m` times the block's mean score
//! (M = 5 in the paper); the ratios are scaled linearly to [0, 2λ] (λ = 0.08), centred, and
//! added to the target density, so sparsities differ by at most 2λ and (with equally sized
//! blocks) average to the target.

use model::{Checkpoint, Device};
use quant::block::{BlockWeights, CaptureSpec, LINEARS, capture};
use quant::pipeline::BlockCtx;

use crate::PruneError;
use crate::method::wanda;

/// OWL's hyper-parameters.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Owl {
    /// Largest deviation of a block's sparsity from the target (λ).
    pub lambda: f64,
    /// Outlier threshold as a multiple of the block's mean score (M).
    pub m: f64,
}

impl Owl {
    /// Checks the ranges: λ in [0, 0.5), M > 0.
    pub fn new(lambda: f64, m: f64) -> Result<Self, PruneError> {
        if !(0.0..0.5).contains(&lambda) {
            return Err(PruneError::Input(format!(
                "--owl-lambda {lambda} is outside [0, 0.5)"
            )));
        }
        if !(m.is_finite() && m > 0.0) {
            return Err(PruneError::Input(format!("--owl-m {m} must be positive")));
        }
        Ok(Self { lambda, m })
    }

    /// Sparsity of each block for an overall `target`, from the blocks' outlier ratios.
    pub fn sparsities(&self, ratios: &[f64], target: f64) -> Vec<f64> {
        let (lo, hi) = ratios
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &r| {
                (a.min(r), b.max(r))
            });
        if ratios.is_empty() || hi - lo <= 0.0 {
            return vec![target; ratios.len()];
        }
        let scaled: Vec<f64> = ratios
            .iter()
            .map(|r| (r - lo) / (hi - lo) * 2.0 * self.lambda)
            .collect();
        let mean = scaled.iter().sum::<f64>() / scaled.len() as f64;
        scaled
            .iter()
            .map(|s| (1.0 - (s - mean + 1.0 - target)).clamp(0.0, 0.999))
            .collect()
    }

    /// The outlier ratio of one block with its calibration inputs, as the block's dense
    /// weights see them; returns it with the block's outputs (the next block's inputs).
    pub fn block_ratio(&self, ctx: &BlockCtx<'_>) -> (f64, model::engine::States) {
        let block = ctx.weights.build(ctx.cfg, ctx.device);
        let taps: Vec<_> = LINEARS.iter().map(|(_, t)| *t).collect();
        let spec = CaptureSpec {
            xtx: false,
            sample_rows: 0,
        };
        let (stats, outputs) = capture(&block, ctx.rope, ctx.inputs, &taps, spec);
        let mut all: Vec<f32> = Vec::new();
        for (name, tap) in LINEARS {
            let t = ctx.weights.get(&format!("{name}.weight"));
            all.extend(wanda::scores(&t.data, t.shape[1], &stats[&tap].sq_mean));
        }
        let mean = all.iter().map(|&v| v as f64).sum::<f64>() / all.len().max(1) as f64;
        let thr = (self.m * mean) as f32;
        let ratio = all.iter().filter(|&&v| v > thr).count() as f64 / all.len().max(1) as f64;
        (ratio, outputs)
    }
}

/// The outlier ratio of every block of the dense teacher on the calibration windows.
pub fn outlier_ratios(
    ckpt: &Checkpoint,
    calib: &[Vec<u32>],
    owl: &Owl,
    device: Device,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<f64>, PruneError> {
    let cfg = ckpt.config().clone();
    let max_len = calib.iter().map(|w| w.len()).max().unwrap_or(1);
    let engine = model::engine::LayerEngine::new(ckpt, device.clone(), max_len);
    let mut states = engine.embed(calib)?;
    let mut ratios = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let mut weights = BlockWeights::read(ckpt, l)?;
        let ctx = BlockCtx {
            cfg: &cfg,
            weights: &mut weights,
            inputs: &states,
            rope: engine.rope(),
            device: &device,
            layer: l,
        };
        let (r, out) = owl.block_ratio(&ctx);
        ratios.push(r);
        states = out;
        progress(l + 1, cfg.num_hidden_layers);
    }
    Ok(ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparsities_keep_the_mean_and_favour_outlier_blocks() {
        let owl = Owl::new(0.08, 5.0).unwrap();
        let s = owl.sparsities(&[0.01, 0.03, 0.02, 0.06], 0.5);
        let mean = s.iter().sum::<f64>() / s.len() as f64;
        assert!((mean - 0.5).abs() < 1e-12, "{s:?}");
        // Most outliers -> lowest sparsity; spread is 2 lambda.
        assert!(s[3] < s[1] && s[1] < s[2] && s[2] < s[0], "{s:?}");
        assert!((s[0] - s[3] - 0.16).abs() < 1e-12, "{s:?}");
        assert_eq!(owl.sparsities(&[0.02, 0.02], 0.5), vec![0.5, 0.5]);
    }
}
