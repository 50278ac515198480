//! One decoder block's weights on the host, and calibration statistics captured at the
//! inputs of its linear layers while the layer engine runs the block.

use std::collections::{BTreeMap, HashMap};

use model::Tensor;
use model::config::Config;
use model::engine::States;
use model::transformer::{DecoderLayer, Rope, Tap};
use model::{Checkpoint, Device};

use crate::QuantError;

/// The linear layers of a block, by HF suffix, with the tap that feeds each.
pub const LINEARS: [(&str, Tap); 7] = [
    ("self_attn.q_proj", Tap::QkvInput),
    ("self_attn.k_proj", Tap::QkvInput),
    ("self_attn.v_proj", Tap::QkvInput),
    ("self_attn.o_proj", Tap::OInput),
    ("mlp.gate_proj", Tap::GateUpInput),
    ("mlp.up_proj", Tap::GateUpInput),
    ("mlp.down_proj", Tap::DownInput),
];

/// A host tensor: values and row-major shape.
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// Values.
    pub data: Vec<f32>,
    /// Row-major shape.
    pub shape: Vec<usize>,
}

/// All tensors of block `layer`, by HF suffix (`self_attn.q_proj.weight`, ...).
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// Block index.
    pub layer: usize,
    /// Tensors by suffix.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl BlockWeights {
    /// Reads block `layer` from a checkpoint.
    pub fn read(ckpt: &Checkpoint, layer: usize) -> Result<Self, QuantError> {
        let prefix = format!("model.layers.{layer}.");
        let mut tensors = BTreeMap::new();
        for (name, shape) in model::checkpoint::block_tensors(ckpt.config(), layer) {
            let data = ckpt.read(&name, &shape)?;
            tensors.insert(name[prefix.len()..].to_string(), HostTensor { data, shape });
        }
        Ok(Self { layer, tensors })
    }

    /// A tensor by suffix.
    pub fn get(&self, name: &str) -> &HostTensor {
        &self.tensors[name]
    }

    /// A tensor by suffix, mutably.
    pub fn get_mut(&mut self, name: &str) -> &mut HostTensor {
        self.tensors.get_mut(name).expect("known tensor")
    }

    /// A burn block from the current values.
    pub fn build(&self, cfg: &Config, device: &Device) -> DecoderLayer {
        DecoderLayer::from_fn(cfg, |name, _| Ok(self.tensors[name].data.clone()), device)
            .expect("all tensors present")
    }
}

/// Statistics of one tap's inputs over the calibration tokens.
#[derive(Debug, Clone)]
pub struct TapStats {
    /// Sum of x xᵀ over tokens, `[in, in]` (only when asked).
    pub xtx: Option<Vec<f32>>,
    /// Mean |x| per input channel.
    pub abs_mean: Vec<f64>,
    /// Mean x² per input channel.
    pub sq_mean: Vec<f64>,
    /// Tokens seen.
    pub tokens: usize,
    /// A strided subsample of input rows, `[n, in]`, for search objectives and error reports.
    pub sample: Vec<f32>,
    /// Input channels.
    pub width: usize,
}

impl TapStats {
    /// Rows in the sample.
    pub fn sample_rows(&self) -> usize {
        self.sample.len() / self.width.max(1)
    }

    /// A copy without the `[in, in]` sum (kept for reports once the Hessian is used).
    pub fn without_xtx(&self) -> Self {
        Self {
            xtx: None,
            abs_mean: self.abs_mean.clone(),
            sq_mean: self.sq_mean.clone(),
            tokens: self.tokens,
            sample: self.sample.clone(),
            width: self.width,
        }
    }
}

/// What to capture.
#[derive(Debug, Clone, Copy)]
pub struct CaptureSpec {
    /// Accumulate x xᵀ (GPTQ's Hessian).
    pub xtx: bool,
    /// Rows to keep in the sample, spread over all windows.
    pub sample_rows: usize,
}

/// Rows gathered before one `XᵀX` product: one large product per 4096 rows, rather than a
/// product and an accumulator copy per window (at 7B widths each `[in, in]` copy is 485 MB).
const XTX_ROWS: usize = 4096;

struct Acc {
    xtx: Option<Tensor<2>>,
    pending: Vec<Tensor<2>>,
    pending_rows: usize,
    abs: Option<Tensor<1>>,
    sq: Option<Tensor<1>>,
    tokens: usize,
    sample: Vec<f32>,
    width: usize,
}

fn add<const D: usize>(a: Option<Tensor<D>>, b: Tensor<D>) -> Option<Tensor<D>> {
    Some(match a {
        Some(a) => a + b,
        None => b,
    })
}

impl Acc {
    fn new(width: usize) -> Self {
        Self {
            xtx: None,
            pending: Vec::new(),
            pending_rows: 0,
            abs: None,
            sq: None,
            tokens: 0,
            sample: Vec::new(),
            width,
        }
    }

    fn flush_xtx(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let x = Tensor::cat(std::mem::take(&mut self.pending), 0);
        self.pending_rows = 0;
        self.xtx = add(self.xtx.take(), x.clone().transpose().matmul(x));
    }

    /// Adds one window `t` `[1, s, w]`; with `xtx: Some(k)` its rows go into XᵀX, the first
    /// one counted `k` times.
    fn add(&mut self, t: &Tensor<3>, xtx: Option<f32>, per_window: usize) {
        let [_, s, w] = t.dims();
        let m = t.clone().reshape([s, w]);
        if let Some(k) = xtx {
            let rows = if k == 1.0 {
                m.clone()
            } else {
                let mut f = vec![1f32; s];
                f[0] = k.sqrt();
                m.clone() * model::transformer::tensor_from(f, [s, 1], &m.device())
            };
            self.pending.push(rows);
            self.pending_rows += s;
            if self.pending_rows >= XTX_ROWS {
                self.flush_xtx();
            }
        }
        self.abs = add(self.abs.take(), m.clone().abs().sum_dim(0).reshape([w]));
        self.sq = add(
            self.sq.take(),
            (m.clone() * m.clone()).sum_dim(0).reshape([w]),
        );
        self.tokens += s;
        if per_window > 0 {
            // Strided rows, skipping position 0 whose activations are atypical (attention sink).
            let step = (s / per_window).max(1);
            let rows: Vec<f32> = m.into_data().try_into_vec::<f32>().expect("f32");
            let mut r = step / 2 + 1;
            let mut taken = 0;
            while r < s && taken < per_window {
                self.sample.extend_from_slice(&rows[r * w..(r + 1) * w]);
                r += step;
                taken += 1;
            }
        }
    }

    fn finish(mut self) -> TapStats {
        self.flush_xtx();
        let n = self.tokens.max(1) as f64;
        let to_vec = |t: Tensor<1>| -> Vec<f64> {
            t.into_data()
                .try_into_vec::<f32>()
                .expect("f32")
                .into_iter()
                .map(f64::from)
                .collect()
        };
        TapStats {
            xtx: self
                .xtx
                .map(|t| t.into_data().try_into_vec::<f32>().expect("f32")),
            abs_mean: self
                .abs
                .map(to_vec)
                .unwrap_or_default()
                .into_iter()
                .map(|v| v / n)
                .collect(),
            sq_mean: self
                .sq
                .map(to_vec)
                .unwrap_or_default()
                .into_iter()
                .map(|v| v / n)
                .collect(),
            tokens: self.tokens,
            sample: self.sample,
            width: self.width,
        }
    }
}

/// Runs `block` over every window of `inputs`, capturing statistics at `taps`, and returns
/// them with the block outputs.
pub fn capture(
    block: &DecoderLayer,
    rope: &Rope,
    inputs: &States,
    taps: &[Tap],
    spec: CaptureSpec,
) -> (HashMap<Tap, TapStats>, States) {
    let mut acc: HashMap<Tap, Acc> = HashMap::new();
    let per_window = spec.sample_rows.div_ceil(inputs.len().max(1));
    let mut outputs = Vec::with_capacity(inputs.len());
    for x in inputs {
        let out = block.forward_tapped(x.clone(), rope, &mut |tap, t| {
            if taps.contains(&tap) {
                acc.entry(tap).or_insert_with(|| Acc::new(t.dims()[2])).add(
                    t,
                    spec.xtx.then_some(1.0),
                    per_window,
                );
            }
        });
        outputs.push(out);
    }
    (
        acc.into_iter().map(|(tap, a)| (tap, a.finish())).collect(),
        outputs,
    )
}

/// Statistics of a list of per-window inputs (one stage of a staged run); with `xtx:
/// Some(k)`, XᵀX with each window's first position counted `k` times (see
/// [`crate::method::gptq::Gptq::sink_weight`]).
pub fn capture_stage(inputs: &[Tensor<3>], xtx: Option<f32>, sample_rows: usize) -> TapStats {
    let width = inputs.first().map_or(0, |t| t.dims()[2]);
    let per_window = sample_rows.div_ceil(inputs.len().max(1));
    let mut acc = Acc::new(width);
    for t in inputs {
        acc.add(t, xtx, per_window);
    }
    acc.finish()
}

/// `x wᵀ` for a sample `x` `[n, in]` and a weight `w` `[out, in]`, on the device.
pub fn sample_matmul(
    x: &[f32],
    n: usize,
    w: &[f32],
    out: usize,
    inp: usize,
    device: &Device,
) -> Tensor<2> {
    let xt = model::transformer::tensor_from(x.to_vec(), [n, inp], device);
    let wt = model::transformer::tensor_from(
        model::transformer::transpose(w, out, inp),
        [inp, out],
        device,
    );
    xt.matmul(wt)
}

/// Relative error ‖x wᵀ − x qᵀ‖ / ‖x wᵀ‖ of a quantized weight on sampled inputs.
pub fn output_error(stats: &TapStats, w: &[f32], q: &[f32], out: usize, device: &Device) -> f64 {
    let n = stats.sample_rows();
    if n == 0 {
        return f64::NAN;
    }
    let a = sample_matmul(&stats.sample, n, w, out, stats.width, device);
    let b = sample_matmul(&stats.sample, n, q, out, stats.width, device);
    let num = (a.clone() - b).powi_scalar(2).sum().into_scalar_f64();
    let den = a.powi_scalar(2).sum().into_scalar_f64();
    (num / den.max(1e-30)).sqrt()
}

/// Helper: a scalar tensor to f64.
pub trait ScalarF64 {
    /// The value.
    fn into_scalar_f64(self) -> f64;
}

impl ScalarF64 for Tensor<1> {
    fn into_scalar_f64(self) -> f64 {
        self.into_data().try_into_vec::<f32>().expect("f32")[0] as f64
    }
}

/// Relative Frobenius error ‖w − q‖ / ‖w‖.
pub fn weight_error(w: &[f32], q: &[f32]) -> f64 {
    let num: f64 = w.iter().zip(q).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink weight k adds (k - 1) x₀ x₀ᵀ per window to XᵀX and nothing else.
    #[test]
    fn the_sink_weight_counts_each_windows_first_row_k_times() {
        let device = Device::default();
        let (s, w) = (5, 3);
        let windows: Vec<Vec<f32>> = (0..2)
            .map(|k| {
                (0..s * w)
                    .map(|i| ((i * 7 + k * 3) % 11) as f32 - 5.0)
                    .collect()
            })
            .collect();
        let inputs: Vec<Tensor<3>> = windows
            .iter()
            .map(|x| model::transformer::tensor_from(x.clone(), [1, s, w], &device))
            .collect();
        let plain = capture_stage(&inputs, Some(1.0), 0).xtx.unwrap();
        let sink = capture_stage(&inputs, Some(100.0), 0);
        for i in 0..w {
            for j in 0..w {
                let extra: f32 = windows.iter().map(|x| 99.0 * x[i] * x[j]).sum();
                let got = sink.xtx.as_ref().unwrap()[i * w + j];
                assert!((got - plain[i * w + j] - extra).abs() < 1e-2, "({i}, {j})");
            }
        }
        // The other statistics count every token once.
        assert_eq!(sink.sq_mean, capture_stage(&inputs, None, 0).sq_mean);
    }
}
