//! AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization"): per block, scale the
//! input channels of each group of linear layers by s = mean|x|^alpha (normalised), with
//! alpha from a 20-point grid over [0, 1) that minimises the error of the group's outputs on
//! calibration inputs, and fold 1/s into the preceding norm or linear so the block computes
//! the same function; then search, per output row and group, how far to shrink the weight
//! range before rounding (not for q/k, whose errors the softmax amplifies).
//!
//! Deviation from llm-awq, for CPU budgets: the objective is the output of the group's own
//! linear layers (llm-awq inspects the whole attention for q/k/v and the whole MLP for
//! gate/up), evaluated on a strided subsample of the calibration tokens (`sample_rows`).

use std::collections::{BTreeMap, HashMap};

use model::transformer::Tap;
use model::{Device, Tensor};

use super::{BlockJob, BlockResult, Outputs, QuantMethod};
use crate::QuantError;
use crate::block::{BlockWeights, CaptureSpec, LINEARS, TapStats, capture};
use crate::scheme::{QuantScheme, quantize_rtn};

/// AWQ's options.
#[derive(Debug, Clone)]
pub struct Awq {
    /// Search per-channel scales.
    pub scale_search: bool,
    /// Search clipping ranges.
    pub clip_search: bool,
    /// Grid points for alpha.
    pub grid: usize,
    /// Largest shrink of the range tried by the clipping search.
    pub max_shrink: f64,
    /// Tokens used by the clipping search.
    pub clip_rows: usize,
}

impl Default for Awq {
    fn default() -> Self {
        Self {
            scale_search: true,
            clip_search: true,
            grid: 20,
            max_shrink: 0.5,
            clip_rows: 4096,
        }
    }
}

/// Rounds one linear's weight as it will be stored and returns the values used:
/// `(weight key, values [rows, cols], rows, cols, E[x²] per input column)`. The scale search
/// of AWQ measures candidate scales through it, so it serves both this crate's integer
/// schemes and GGUF block types.
pub type FakeQuant<'f> =
    dyn Fn(&str, &[f32], usize, usize, &[f32]) -> Result<Vec<f32>, QuantError> + 'f;

/// The weight as it will be used: quantized then divided by the scales (`w` already scaled).
fn fake_rows(
    scheme: &QuantScheme,
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, QuantError> {
    Ok(quantize_rtn(scheme, name, w, rows, cols)?.dequantize())
}

fn to_dev(data: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    model::transformer::tensor_from(data, [rows, cols], device)
}

/// Mean squared error between `x wᵀ` and `x qᵀ` (`x` `[n, in]` on the device).
fn mse(
    x: &Tensor<2>,
    reference: &Tensor<2>,
    q: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &Device,
) -> f64 {
    let qt = to_dev(q, rows, cols, device).transpose();
    let d = x.clone().matmul(qt) - reference.clone();
    d.powi_scalar(2)
        .mean()
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32")[0] as f64
}

impl Awq {
    /// Searches the scales of one group and applies them (weights times s, previous op by 1/s).
    /// Returns the scales applied, so inputs seen later can be divided by them.
    fn scale_group(
        &self,
        weights: &mut BlockWeights,
        device: &Device,
        stats: &TapStats,
        linears: &[&str],
        prev: &str,
        fake: &FakeQuant<'_>,
    ) -> Result<Vec<f32>, QuantError> {
        let cols = stats.width;
        let n = stats.sample_rows();
        // The group's weights stacked: [sum of rows, cols].
        let mut w = Vec::new();
        let mut parts = Vec::new();
        for l in linears {
            let key = format!("{l}.weight");
            let t = weights.get(&key);
            w.extend_from_slice(&t.data);
            parts.push((key, t.shape[0]));
        }
        let rows: usize = parts.iter().map(|p| p.1).sum();
        let x = to_dev(stats.sample.clone(), n, cols, device);
        let reference = x.clone().matmul(to_dev(
            model::transformer::transpose(&w, rows, cols),
            cols,
            rows,
            device,
        ));
        let mut best = (f64::INFINITY, vec![1f32; cols]);
        for k in 0..self.grid {
            let alpha = k as f64 / self.grid as f64;
            let mut s: Vec<f64> = stats
                .abs_mean
                .iter()
                .map(|m| m.powf(alpha).max(1e-4))
                .collect();
            let (mx, mn) = s
                .iter()
                .fold((0f64, f64::INFINITY), |(a, b), &v| (a.max(v), b.min(v)));
            let norm = (mx * mn).sqrt();
            s.iter_mut().for_each(|v| *v /= norm);
            // E[x²] of the scaled inputs x / s, for importance-weighted rounding.
            let imp: Vec<f32> = stats
                .sq_mean
                .iter()
                .zip(&s)
                .map(|(m, s)| (m / (s * s)) as f32)
                .collect();
            // One linear at a time, so only one linear's scaled copy exists beside q.
            let mut q = Vec::with_capacity(w.len());
            let mut off = 0;
            for (key, r) in &parts {
                let part = &w[off * cols..(off + r) * cols];
                let scaled: Vec<f32> = part
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v * s[i % cols] as f32)
                    .collect();
                q.extend(fake(key, &scaled, *r, cols, &imp)?);
                off += r;
            }
            q.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v /= s[i % cols] as f32);
            let err = mse(&x, &reference, q, rows, cols, device);
            if err < best.0 {
                best = (err, s.iter().map(|&v| v as f32).collect());
            }
        }
        let s = best.1;
        for l in linears {
            let t = weights.get_mut(&format!("{l}.weight"));
            let c = t.shape[1];
            t.data
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v *= s[i % c]);
        }
        // Fold 1/s into the op that produces the inputs: a norm's gamma, or a linear's rows.
        let key = format!("{prev}.weight");
        let p = weights.get_mut(&key);
        if p.shape.len() == 1 {
            p.data.iter_mut().zip(&s).for_each(|(v, s)| *v /= s);
        } else {
            let pc = p.shape[1];
            for (r, sr) in s.iter().enumerate() {
                p.data[r * pc..(r + 1) * pc]
                    .iter_mut()
                    .for_each(|v| *v /= sr);
            }
            if let Some(b) = weights.tensors.get_mut(&format!("{prev}.bias")) {
                b.data.iter_mut().zip(&s).for_each(|(v, s)| *v /= s);
            }
        }
        Ok(s)
    }

    /// Shrinks each (row, group) range of `name` to the clip that best preserves the
    /// group's partial outputs on sampled inputs `x` `[n, cols]`.
    fn clip_linear(
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

impl Awq {
    /// The scale search of one block: for each linear group (q/k/v, o, gate/up, down) finds
    /// and applies the scales whose rounding by `fake` best preserves the group's outputs on
    /// the captured inputs `st`, folding 1/s into the preceding norm or linear, and rewrites
    /// `st` to describe the scaled inputs x / s. Weights stay unrounded.
    pub fn search_scales(
        &self,
        cfg: &model::Config,
        weights: &mut BlockWeights,
        device: &Device,
        st: &mut HashMap<Tap, TapStats>,
        fake: &FakeQuant<'_>,
    ) -> Result<(), QuantError> {
        let o_foldable = cfg.num_kv_heads() == cfg.num_attention_heads;
        let groups: Vec<(Tap, Vec<&str>, &str)> = vec![
            (
                Tap::QkvInput,
                vec!["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "input_layernorm",
            ),
            (Tap::OInput, vec!["self_attn.o_proj"], "self_attn.v_proj"),
            (
                Tap::GateUpInput,
                vec!["mlp.gate_proj", "mlp.up_proj"],
                "post_attention_layernorm",
            ),
            (Tap::DownInput, vec!["mlp.down_proj"], "mlp.up_proj"),
        ];
        for (tap, linears, prev) in groups {
            // o_proj's inputs come from v through the attention; with grouped KV heads the
            // channels do not map one to one onto v's rows, so llm-awq skips it too.
            if tap == Tap::OInput && !o_foldable {
                continue;
            }
            let stats = st[&tap].clone();
            let s = self.scale_group(weights, device, &stats, &linears, prev, fake)?;
            // The inputs of the scaled group are now x / s.
            let e = st.get_mut(&tap).expect("captured");
            let w = e.width;
            e.sample
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v /= s[i % w]);
            e.abs_mean
                .iter_mut()
                .zip(&s)
                .for_each(|(v, s)| *v /= *s as f64);
            e.sq_mean
                .iter_mut()
                .zip(&s)
                .for_each(|(v, s)| *v /= (*s as f64).powi(2));
        }
        Ok(())
    }
}

impl QuantMethod for Awq {
    fn name(&self) -> &'static str {
        "awq"
    }

    fn needs_calibration(&self) -> bool {
        true
    }

    fn propagate_quantized(&self) -> bool {
        false
    }

    fn returns_teacher_outputs(&self) -> bool {
        true
    }

    fn quantize_block(&self, job: &mut BlockJob<'_>) -> Result<BlockResult, QuantError> {
        let block = job.weights.build(job.cfg, job.device);
        let taps = [Tap::QkvInput, Tap::OInput, Tap::GateUpInput, Tap::DownInput];
        let (mut st, outputs) = capture(
            &block,
            job.rope,
            job.inputs,
            &taps,
            CaptureSpec {
                xtx: false,
                sample_rows: job.sample_rows,
            },
        );
        drop(block);
        if self.scale_search {
            let scheme = job.scheme;
            let fake = |key: &str, w: &[f32], rows: usize, cols: usize, _: &[f32]| {
                fake_rows(&scheme, key, w, rows, cols)
            };
            self.search_scales(job.cfg, job.weights, job.device, &mut st, &fake)?;
        }
        let reference: BTreeMap<String, Vec<f32>> = LINEARS
            .iter()
            .map(|(n, _)| {
                (
                    n.to_string(),
                    job.weights.get(&format!("{n}.weight")).data.clone(),
                )
            })
            .collect();
        if self.clip_search {
            for (name, tap) in LINEARS {
                if name == "self_attn.q_proj" || name == "self_attn.k_proj" {
                    continue;
                }
                let stats = &st[&tap];
                let n = stats.sample_rows().min(self.clip_rows);
                let x = stats.sample[..n * stats.width].to_vec();
                self.clip_linear(job, name, &x, n)?;
            }
        }
        let mut linears = BTreeMap::new();
        let mut stats = BTreeMap::new();
        for (name, tap) in LINEARS {
            let key = format!("{name}.weight");
            let t = job.weights.get(&key);
            let q = quantize_rtn(&job.scheme, &key, &t.data, t.shape[0], t.shape[1])?;
            job.weights.get_mut(&key).data = q.dequantize();
            linears.insert(name.to_string(), q);
            stats.insert(name.to_string(), st[&tap].clone());
        }
        Ok(BlockResult {
            linears,
            reference,
            stats,
            outputs: Outputs::Teacher(outputs),
        })
    }
}
