//! AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization"): per block, scale the
//! input channels of each group of linear layers by s (a grid of candidates between no
//! scaling and the activations' mean magnitude), keep the s whose rounding best preserves the
//! output of the module the group feeds, and fold 1/s into the preceding norm or linear so
//! the block computes the same function; then search, per output row and group, how far to
//! shrink the weight range before rounding (not for q/k, whose errors the softmax amplifies).
//!
//! The candidates: `mean|x|^α` ([`AwqGrid::Act`], llm-awq's, the default), or llm-compressor's
//! `mean|x|^α / mean|ŵ|^(1−α)` with ŵ the weights normalised per quantization group
//! ([`AwqGrid::Duo`], whose grid also holds α = 0 without weights, i.e. no scaling). The objective is the module output (attention through `o_proj` for q/k/v, the
//! whole MLP for gate/up, see [`objective`]) on whole calibration windows, about
//! `sample_rows` tokens (llm-compressor scores all tokens; a few windows keep CPU time near
//! that of rounding, and whole windows keep the attention sink at its natural weight).

mod clip;
mod objective;

use std::collections::{BTreeMap, HashMap};

use model::transformer::{Rope, Tap};
use model::{Device, Tensor};

use super::{BlockJob, BlockResult, Outputs, QuantMethod};
use crate::QuantError;
use crate::block::{BlockWeights, CaptureSpec, LINEARS, TapStats, capture};
use crate::scheme::{QuantScheme, quantize_rtn};
use objective::{Objective, Parts};

/// The candidate scales of AWQ's grid search (`--awq-grid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum AwqGrid {
    /// `mean|x|^α`, α = k/n for k < n (llm-awq). The default: on SmolLM2 W4 g64 with the
    /// module objective it beats `duo` on perplexity and KLD (BENCHMARKS.md, "AWQ").
    #[default]
    Act,
    /// `mean|x|^α / mean|ŵ|^(1−α)`, α from 0 to 1, plus no scaling (llm-compressor's
    /// default `duo_scaling`).
    Duo,
    /// Half the points of each (llm-compressor's `duo_scaling="both"`).
    Both,
}

impl AwqGrid {
    /// The `(α, with weight means)` points of an `n`-point grid.
    pub fn points(self, n: usize) -> Vec<(f64, bool)> {
        let n = n.max(2);
        match self {
            Self::Act => (0..n).map(|k| (k as f64 / n as f64, false)).collect(),
            Self::Duo => std::iter::once((0.0, false))
                .chain((0..n - 1).map(|k| (k as f64 / (n - 2).max(1) as f64, true)))
                .collect(),
            Self::Both => {
                let h = (n / 2).max(2);
                (0..h)
                    .flat_map(|k| {
                        let a = k as f64 / (h - 1) as f64;
                        [(a, false), (a, true)]
                    })
                    .collect()
            }
        }
    }
}

/// What AWQ's scale search scores a candidate on (`--awq-objective`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum AwqObjective {
    /// The module the group feeds: q/k/v through the attention and `o_proj`, gate/up through
    /// the whole MLP (llm-awq, llm-compressor).
    #[default]
    Module,
    /// Each group's own outputs (this crate's first objective, kept for comparison).
    Own,
}

/// AWQ's options.
#[derive(Debug, Clone)]
pub struct Awq {
    /// Search per-channel scales.
    pub scale_search: bool,
    /// Search clipping ranges (llm-awq's `auto_clip`; off by default, see
    /// [`super::MethodOptions::awq_clip`]).
    pub clip_search: bool,
    /// Grid points for alpha.
    pub grid: usize,
    /// Which candidates the grid holds.
    pub candidates: AwqGrid,
    /// What a candidate is scored on.
    pub objective: AwqObjective,
    /// Largest shrink of the range tried by the clipping search.
    pub max_shrink: f64,
    /// Tokens used by the clipping search.
    pub clip_rows: usize,
}

impl Awq {
    /// AWQ with the command line's options (`o` checked by
    /// [`super::MethodKind::check_options`]).
    pub fn from_options(o: &super::MethodOptions) -> Self {
        Self {
            scale_search: !o.no_awq_scale,
            clip_search: o.awq_clip,
            candidates: o.awq_grid.unwrap_or_default(),
            objective: o.awq_objective.unwrap_or_default(),
            ..Self::default()
        }
    }
}

impl Default for Awq {
    fn default() -> Self {
        Self {
            scale_search: true,
            clip_search: false,
            grid: 20,
            candidates: AwqGrid::default(),
            objective: AwqObjective::default(),
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

/// What the scale search of a block sees besides its weights: the input statistics of each
/// linear group (rewritten to describe the scaled inputs), the block's calibration inputs
/// (for the attention objective), the rounding, and the length of the groups that share a
/// scale (for the weight means of [`AwqGrid::Duo`]).
pub struct ScaleSearch<'a, 'f> {
    /// Captured statistics by tap.
    pub stats: &'a mut HashMap<Tap, TapStats>,
    /// The block's calibration inputs, `[1, len, hidden]` each.
    pub inputs: &'a [Tensor<3>],
    /// RoPE tables covering the windows.
    pub rope: &'a Rope,
    /// The rounding of a candidate.
    pub fake: &'f FakeQuant<'f>,
    /// Elements per quantization group of a weight `(key, cols)`.
    pub group_len: &'f dyn Fn(&str, usize) -> Result<usize, QuantError>,
}

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

/// llm-compressor's weight means: |w| over each quantization group's largest |w|, averaged
/// over the rows of all the group's linears, per input channel.
fn weight_means(
    parts: &Parts,
    group_len: &dyn Fn(&str, usize) -> Result<usize, QuantError>,
) -> Result<Vec<f64>, QuantError> {
    let cols = parts.cols;
    let mut sum = vec![0f64; cols];
    let mut rows = 0usize;
    for (key, r) in &parts.keys {
        let g = group_len(key, cols)?.clamp(1, cols);
        for row in parts.w[rows * cols..(rows + r) * cols].chunks(cols) {
            for (c0, chunk) in row.chunks(g).enumerate() {
                let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 + 1e-6;
                for (j, v) in chunk.iter().enumerate() {
                    sum[c0 * g + j] += v.abs() as f64 / m;
                }
            }
        }
        rows += r;
    }
    Ok(sum.into_iter().map(|s| s / rows.max(1) as f64).collect())
}

/// The inputs of the groups at `taps` on whole `windows`, `[tokens, width]` each.
/// Whole windows keep each position at its natural weight: the first position's activations
/// (the attention sink) are outliers a strided sample either misses or over-weights.
fn window_rows(
    block: &model::transformer::DecoderLayer,
    windows: &[Tensor<3>],
    rope: &Rope,
    taps: &[Tap],
) -> HashMap<Tap, Tensor<2>> {
    let mut parts: HashMap<Tap, Vec<Tensor<2>>> = HashMap::new();
    for x in windows {
        block.forward_tapped(x.clone(), rope, &mut |tap, t| {
            if taps.contains(&tap) {
                let [b, s, w] = t.dims();
                parts
                    .entry(tap)
                    .or_default()
                    .push(t.clone().reshape([b * s, w]));
            }
        });
    }
    parts
        .into_iter()
        .map(|(tap, ts)| (tap, Tensor::cat(ts, 0)))
        .collect()
}

/// Block inputs to score the modules on: whole windows spread over the calibration set,
/// about `rows` tokens (at least one window).
fn pick_windows(inputs: &[Tensor<3>], rows: usize) -> Vec<Tensor<3>> {
    let mut out = Vec::new();
    if inputs.is_empty() {
        return out;
    }
    let len = inputs[0].dims()[1].max(1);
    let k = rows.div_ceil(len).clamp(1, inputs.len());
    for i in 0..k {
        out.push(inputs[i * inputs.len() / k].clone());
    }
    out
}

impl Awq {
    /// Searches the scales of one group and applies them (weights times s, previous op by 1/s).
    /// Returns the scales applied, so inputs seen later can be divided by them.
    #[allow(clippy::too_many_arguments)]
    fn scale_group(
        &self,
        weights: &mut BlockWeights,
        device: &Device,
        stats: &TapStats,
        parts: &Parts,
        linears: &[&str],
        prev: &str,
        objective: &Objective,
        search: &ScaleSearch<'_, '_>,
    ) -> Result<Vec<f32>, QuantError> {
        let (cols, w) = (parts.cols, &parts.w);
        let w_mean = if self.candidates == AwqGrid::Act {
            Vec::new()
        } else {
            weight_means(parts, search.group_len)?
        };
        let mut best = (f64::INFINITY, vec![1f32; cols]);
        for (alpha, duo) in self.candidates.points(self.grid) {
            let mut s: Vec<f64> = stats
                .abs_mean
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    let v = if duo {
                        m.powf(alpha) / (w_mean[j].powf(1.0 - alpha) + 1e-4)
                    } else {
                        m.powf(alpha)
                    };
                    if v.is_finite() { v.max(1e-4) } else { 1.0 }
                })
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
            for (key, r) in &parts.keys {
                let part = &w[off * cols..(off + r) * cols];
                let scaled: Vec<f32> = part
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v * s[i % cols] as f32)
                    .collect();
                q.extend((search.fake)(key, &scaled, *r, cols, &imp)?);
                off += r;
            }
            q.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v /= s[i % cols] as f32);
            let err = objective.error(&q, parts, search.rope, device);
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

    /// The scale search of one block: for each linear group (q/k/v, o, gate/up, down) finds
    /// and applies the scales whose rounding by `search.fake` best preserves the output of
    /// the module the group feeds, folding 1/s into the preceding norm or linear, and
    /// rewrites `search.stats` to describe the scaled inputs x / s. Weights stay unrounded.
    pub fn search_scales(
        &self,
        cfg: &model::Config,
        weights: &mut BlockWeights,
        device: &Device,
        search: &mut ScaleSearch<'_, '_>,
    ) -> Result<(), QuantError> {
        let o_foldable = cfg.num_kv_heads() == cfg.num_attention_heads;
        // The rows every objective is scored on: whole windows when the block inputs are
        // at hand, else (a staged run without them) the strided sample of each tap.
        let windows = pick_windows(search.inputs, search.stats[&Tap::QkvInput].sample_rows());
        // (q/k/v are scored through the attention on the windows themselves.)
        let taps: &[Tap] = if o_foldable {
            &[Tap::OInput, Tap::GateUpInput, Tap::DownInput]
        } else {
            &[Tap::GateUpInput, Tap::DownInput]
        };
        let mut rows = if windows.is_empty() {
            HashMap::new()
        } else {
            window_rows(&weights.build(cfg, device), &windows, search.rope, taps)
        };
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
            let stats = &search.stats[&tap];
            let parts = Parts::of(weights, &linears);
            let x = || {
                rows.get(&tap).cloned().unwrap_or_else(|| {
                    to_dev(
                        stats.sample.clone(),
                        stats.sample_rows(),
                        stats.width,
                        device,
                    )
                })
            };
            // Built from the current weights: earlier groups' scales are folded in, so the
            // block still computes the original function on the original inputs.
            let objective = match (self.objective, tap) {
                (AwqObjective::Module, Tap::QkvInput) if !windows.is_empty() => {
                    Objective::attention(&windows, &weights.build(cfg, device), search.rope)
                }
                (AwqObjective::Module, Tap::GateUpInput) => {
                    Objective::mlp(x(), &weights.build(cfg, device))
                }
                _ => Objective::own(x(), &parts, device),
            };
            let s = self.scale_group(
                weights, device, stats, &parts, &linears, prev, &objective, search,
            )?;
            // The inputs of the scaled group are now x / s. Its window rows are not used
            // again: a fold changes only the inputs of the group it scales.
            rows.remove(&tap);
            let e = search.stats.get_mut(&tap).expect("captured");
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
            let group_len = |key: &str, cols: usize| Ok(scheme.group_len(key, cols)?);
            let mut search = ScaleSearch {
                stats: &mut st,
                inputs: job.inputs,
                rope: job.rope,
                fake: &fake,
                group_len: &group_len,
            };
            self.search_scales(job.cfg, job.weights, job.device, &mut search)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use model::testkit;

    /// The rows AWQ scores o, gate/up and down on are every position of the picked windows,
    /// the first (attention sink) included, exactly as the block computes them.
    /// Breakage caught: starting the rows at position 1 (as the strided sample does) fails the
    /// row count and the comparison.
    #[test]
    fn window_rows_are_every_position_of_the_windows() {
        let tmp = tempfile::tempdir().unwrap();
        testkit::write_hf(tmp.path(), &testkit::tiny_config(), 3, |_, _| {});
        let ckpt = model::Checkpoint::open(tmp.path()).unwrap();
        let cfg = ckpt.config().clone();
        let device = model::default_device();
        let block = BlockWeights::read(&ckpt, 0).unwrap().build(&cfg, &device);
        let rope = Rope::new(&cfg, 8, &device);
        let mut rng = testkit::Rng(0x9e37_79b9_7f4a_7c15);
        let inputs: Vec<Tensor<3>> = (0..5)
            .map(|_| {
                let v: Vec<f32> = (0..8 * cfg.hidden_size).map(|_| rng.next()).collect();
                model::transformer::tensor_from(v, [1, 8, cfg.hidden_size], &device)
            })
            .collect();
        let windows = pick_windows(&inputs, 20);
        assert_eq!(
            windows.len(),
            3,
            "20 tokens of 8-token windows: three windows"
        );
        let taps = [Tap::OInput, Tap::GateUpInput, Tap::DownInput];
        let rows = window_rows(&block, &windows, &rope, &taps);
        assert_eq!(rows.len(), 3);
        for tap in [Tap::OInput, Tap::GateUpInput, Tap::DownInput] {
            let mut want = Vec::new();
            for x in &windows {
                block.forward_tapped(x.clone(), &rope, &mut |t, v| {
                    if t == tap {
                        want.extend(v.clone().into_data().try_into_vec::<f32>().unwrap());
                    }
                });
            }
            let got = rows[&tap]
                .clone()
                .into_data()
                .try_into_vec::<f32>()
                .unwrap();
            assert_eq!(rows[&tap].dims()[0], 24, "{tap:?}");
            assert_eq!(got, want, "{tap:?}");
        }
    }
}
