//! AWQ's clipping search (llm-awq's `auto_clip`): per output row and group, how far to shrink
//! the weight range before rounding so the group's partial outputs on sampled inputs change
//! least.

use super::{Awq, fake_rows};
use crate::QuantError;
use crate::method::BlockJob;
use model::Tensor;

impl Awq {
    /// Shrinks each (row, group) range of `name` to the clip that best preserves the
    /// group's partial outputs on sampled inputs `x` `[n, cols]`.
    pub(super) fn clip_linear(
        &self,
        job: &mut BlockJob<'_>,
        name: &str,
        x: &[f32],
        n: usize,
    ) -> Result<(), QuantError> {
        let key = format!("{name}.weight");
        let t = job.weights.get(&key).clone();
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let g = job.scheme.group_len(&key, cols)?;
        let groups = cols.div_ceil(g);
        let padded = groups * g;
        let device = job.device.clone();
        // Zero-pad a partial last group; zero inputs add nothing to the partial outputs.
        let pad = |m: &[f32], rows: usize| -> Vec<f32> {
            if padded == cols {
                return m.to_vec();
            }
            let mut out = vec![0f32; rows * padded];
            for r in 0..rows {
                out[r * padded..r * padded + cols].copy_from_slice(&m[r * cols..(r + 1) * cols]);
            }
            out
        };
        // [groups, n, g] inputs; candidates are scored on chunks of output rows so the
        // [groups, n, rows] partial outputs stay near 16M floats (at 7B widths a whole
        // down_proj would take 720 MB per copy).
        let xg =
            model::transformer::tensor_from(pad(x, n), [n, groups, g], &device).swap_dims(0, 1);
        let chunk = (16 * 1024 * 1024 / (groups * n).max(1)).clamp(1, rows);
        let amax: Vec<f32> = (0..rows * groups)
            .map(|i| {
                let (r, k) = (i / groups, i % groups);
                t.data[r * cols + k * g..r * cols + ((k + 1) * g).min(cols)]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()))
            })
            .collect();
        let steps = (self.max_shrink * self.grid as f64) as usize;
        let mut best_max = amax.clone();
        for r0 in (0..rows).step_by(chunk) {
            let cr = chunk.min(rows - r0);
            let wpart = &t.data[r0 * cols..(r0 + cr) * cols];
            let partial = |w: &[f32]| -> Tensor<3> {
                let wg = model::transformer::tensor_from(pad(w, cr), [cr, groups, g], &device)
                    .swap_dims(0, 1);
                xg.clone().matmul(wg.swap_dims(1, 2)) // [groups, n, cr]
            };
            let reference = partial(wpart);
            let mut best_err = vec![f32::INFINITY; cr * groups];
            for i in 0..steps.max(1) {
                let ratio = 1.0 - i as f32 / self.grid as f32;
                let clipped: Vec<f32> = wpart
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| {
                        let m = amax[(r0 + j / cols) * groups + (j % cols) / g] * ratio;
                        v.clamp(-m, m)
                    })
                    .collect();
                let q = fake_rows(&job.scheme, &key, &clipped, cr, cols)?;
                let d = partial(&q) - reference.clone();
                // Squared error summed over tokens: [groups, 1, cr] -> per (row, group).
                let e = d
                    .powi_scalar(2)
                    .sum_dim(1)
                    .into_data()
                    .try_into_vec::<f32>()
                    .expect("f32");
                for k in 0..groups {
                    for r in 0..cr {
                        let v = e[k * cr + r];
                        if v < best_err[r * groups + k] {
                            best_err[r * groups + k] = v;
                            best_max[(r0 + r) * groups + k] = amax[(r0 + r) * groups + k] * ratio;
                        }
                    }
                }
            }
        }
        let w = job.weights.get_mut(&key);
        for (j, v) in w.data.iter_mut().enumerate() {
            let m = best_max[(j / cols) * groups + (j % cols) / g];
            *v = v.clamp(-m, m);
        }
        Ok(())
    }
}
