//! Quantization-aware training: the student's decoder linears (q/k/v/o, gate/up/down; not
//! the embedding, norms or lm_head) pass through fake quantization in every forward pass, as
//! a burn reparameterization of their weights (the way LoRA attaches, so the one model
//! definition serves). The arithmetic is PTQ's [`QuantScheme`]: per group of input columns
//! `w_hat = s * (clamp(round(w / s) + z, 0, qmax) - z)`, rounding half away from zero, so at
//! step 0 the forward weights are RTN's dequantized weights bit for bit.
//!
//! Gradients: the rounding is a straight-through estimator (the gradient of `round(x)` taken
//! as 1), so `d w_hat / d w` is 1 where `round(w / s) + z` lies in `[0, qmax]` and 0 where it
//! is clipped. With learned scales (LSQ, Esser et al. 2020) the scale is a parameter and its
//! gradient flows through `w / s` and the final product: `d w_hat / d s` is
//! `round(w / s) - w / s` inside the range and the clipped code minus `z` outside it. LSQ's
//! gradient scale `1 / sqrt(n · qmax)` is left out: AdamW normalizes each parameter's steps.
//! Zero points stay the integers RTN chose.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, Param, ParamId, Reparameterization, Reparameterizer};
use burn::tensor::{Int, Tensor, TensorData};
use model::transformer::transpose;
use quant::scheme::{GroupParams, QuantScheme, QuantizedLinear, quantize_rtn};
use serde::{Deserialize, Serialize};

use crate::lm::{CausalLm, values};
use crate::{DistillError, Result};

/// Where the scales and zero points start: the PTQ method whose result QAT starts from (RTN
/// on the student's own weights; GPTQ's or AWQ's dequantized weights, scales and zero points).
pub type QatInit = quant::method::MethodKind;

/// Quantization-aware training settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QatOptions {
    /// Bits, groups and symmetry of the fake quantization.
    pub scheme: QuantScheme,
    /// The PTQ result the scales and zero points start from.
    pub init: QatInit,
    /// Train the scales (LSQ) instead of keeping them frozen.
    pub learn_scales: bool,
}

/// The fake quantization of one linear weight (burn layout `[in, out]`): scales and zero
/// points per group of input rows and output column.
#[derive(Module, Debug)]
pub struct FakeQuant {
    /// Scales `[groups, out]`; trained when learned, else frozen.
    pub scale: Param<Tensor<2>>,
    /// Zero points `[groups, out]`: integers held as f32, never trained.
    pub zero: Tensor<2>,
    /// Input channels per group (the last group may be shorter).
    pub group: usize,
    /// Largest code.
    pub qmax: u32,
    /// The least a learned scale may become: [`SCALE_FLOOR`], or the smallest initial scale
    /// if that is smaller (so the start is RTN's exactly whatever the weights).
    pub floor: f32,
}

/// The least a learned scale is allowed to shrink to: far below any useful step, far above
/// where `w / s` would leave the integers an f32 holds exactly.
pub const SCALE_FLOOR: f32 = 1e-6;

impl Reparameterization for FakeQuant {
    const NAME: &'static str = "fake_quant";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        let shape = base.shape();
        let dims = base.dims();
        let w: Tensor<2> = base.reshape([dims[0], dims[1]]);
        fake_quant(
            w,
            self.scale.val(),
            self.zero.clone(),
            self.group,
            self.qmax as f32,
            self.floor,
        )
        .reshape(shape)
    }
}

/// `x` rounded to the nearest integer, ties away from zero (as `f32::round`, which PTQ's
/// [`QuantScheme::code`] uses; burn's `round` sends ties to even).
fn round_half_away(x: Tensor<2>) -> Tensor<2> {
    let t = x.clone().trunc();
    let tie = (x.clone() - t.clone()).abs().equal_elem(0.5);
    let away = t + x.clone().sign();
    x.round().mask_where(tie, away)
}

/// Fake-quantizes `w` `[in, out]` with per-group `scale` and `zero` `[groups, out]`, group
/// `g` holding input rows `g * group ..`, scales below `floor` raised to it: the value is
/// exactly [`QuantScheme::fake`]'s, the gradient the straight-through estimator's (see the
/// module docs).
pub fn fake_quant(
    w: Tensor<2>,
    scale: Tensor<2>,
    zero: Tensor<2>,
    group: usize,
    qmax: f32,
    floor: f32,
) -> Tensor<2> {
    let [inp, _] = w.dims();
    let device = w.device();
    let rows: Vec<i64> = (0..inp).map(|c| (c / group) as i64).collect();
    let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [inp]), &device);
    let s = scale.clamp_min(floor).select(0, rows.clone());
    let z = zero.select(0, rows);
    let x = w / s.clone();
    let fixed = x.clone().detach();
    let v = round_half_away(fixed.clone()) + z.clone();
    let inside = v
        .clone()
        .greater_equal_elem(0.0)
        .bool_and(v.clone().lower_equal_elem(qmax))
        .float();
    // Exactly the clipped code in value (x - fixed is 0); gradient 1 inside the range.
    let q = v.clamp(0.0, qmax) + inside * (x - fixed);
    (q - z) * s
}

/// Attaches [`FakeQuant`] to the weights named in `ids`, initialised from `given` where it
/// names the weight, else by RTN on their values.
struct Attach<'a> {
    opts: QatOptions,
    ids: HashMap<ParamId, String>,
    given: Option<&'a BTreeMap<String, QuantizedLinear>>,
}

impl Reparameterizer for Attach<'_> {
    type Reparam = FakeQuant;

    fn reparameterize<const D: usize>(
        &mut self,
        _path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<FakeQuant>) {
        let Some(name) = self.ids.get(&param.id).filter(|_| D == 2) else {
            return (param, None);
        };
        let t = param.base();
        let device = t.device();
        let dims = t.dims();
        let (inp, out) = (dims[0], dims[1]);
        let s = &self.opts.scheme;
        let rtn;
        let q = match self.given.and_then(|g| g.get(name)) {
            Some(q) => q,
            None => {
                let hf = transpose(&values(t), inp, out);
                rtn = quantize_rtn(s, name, &hf, out, inp).expect("group checked before attaching");
                &rtn
            }
        };
        let group = s
            .group_len(name, inp)
            .expect("group checked before attaching");
        // HF order is [out, groups]; the burn layout wants [groups, out].
        let (scale, zero): (Vec<f32>, Vec<f32>) = (0..q.groups)
            .flat_map(|k| (0..out).map(move |r| (r, k)))
            .map(|(r, k)| {
                let p = q.params[r * q.groups + k];
                (p.scale, p.zero as f32)
            })
            .unzip();
        let floor = scale.iter().copied().fold(SCALE_FLOOR, f32::min);
        let shape = [q.groups, out];
        let scale = Tensor::<2>::from_data(TensorData::new(scale, shape), &device);
        let zero = Tensor::<2>::from_data(TensorData::new(zero, shape), &device);
        let fq = FakeQuant {
            scale: Param::from_tensor(scale).set_require_grad(self.opts.learn_scales),
            zero,
            group,
            qmax: s.qmax() as u32,
            floor,
        };
        (param, Some(fq))
    }
}

impl CausalLm {
    /// The weight of every fake-quantizable linear, by HF name (`model.layers.L.X.weight`).
    pub(crate) fn qat_weights(&self) -> Vec<(String, &Param<Tensor<2>>)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            let lins = [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ];
            for ((suffix, _), lin) in quant::block::LINEARS.iter().zip(lins) {
                out.push((format!("model.layers.{l}.{suffix}.weight"), &lin.weight));
            }
        }
        out
    }

    /// Puts every decoder linear weight behind fake quantization, its scales and zero points
    /// from RTN on the current weights (frozen scales unless `opts.learn_scales`). Every other
    /// tensor is left as it is and keeps training. Refused for a group size of 0.
    pub fn with_fake_quant(self, opts: &QatOptions) -> Result<Self> {
        self.attach_fake_quant(opts, None)
    }

    /// As [`Self::with_fake_quant`], with each linear's scales and zero points taken from a
    /// PTQ result (`params`, by HF weight name; the student's weights should be its
    /// dequantized weights, which fake quantization then reproduces exactly). Every linear
    /// must be there, with contiguous groups of the scheme's size (no activation-order
    /// `g_idx`).
    pub fn with_fake_quant_from(
        self,
        opts: &QatOptions,
        params: &BTreeMap<String, QuantizedLinear>,
    ) -> Result<Self> {
        for (name, w) in self.qat_weights() {
            let [inp, out] = w.base().dims();
            let bad = |m: String| Err(DistillError::Invalid(format!("{name}: {m}")));
            let Some(q) = params.get(&name) else {
                return bad("the PTQ result has no scales for it".into());
            };
            let group = opts
                .scheme
                .group_len(&name, inp)
                .map_err(|e| DistillError::Invalid(e.to_string()))?;
            if (q.rows, q.cols, q.groups) != (out, inp, inp.div_ceil(group))
                || q.params.len() != q.rows * q.groups
            {
                return bad(format!(
                    "the PTQ result is {} x {} in {} groups, the student {out} x {inp} in groups of {group}",
                    q.rows, q.cols, q.groups
                ));
            }
            if q.g_idx
                .iter()
                .enumerate()
                .any(|(c, &g)| g as usize != c / group)
            {
                return bad(
                    "its groups are in activation order (g_idx); QAT needs contiguous groups"
                        .into(),
                );
            }
        }
        self.attach_fake_quant(opts, Some(params))
    }

    fn attach_fake_quant(
        self,
        opts: &QatOptions,
        given: Option<&BTreeMap<String, QuantizedLinear>>,
    ) -> Result<Self> {
        let mut ids = HashMap::new();
        for (name, w) in self.qat_weights() {
            if crate::qlora::adapter_of(w).is_some()
                || w.reparameterization::<crate::qlora::Nf4Base>().is_some()
            {
                return Err(DistillError::Invalid(format!(
                    "{name}: fake quantization does not combine with LoRA adapters or a 4-bit base"
                )));
            }
            let inp = w.base().dims()[0];
            opts.scheme
                .group_len(&name, inp)
                .map_err(|e| DistillError::Invalid(e.to_string()))?;
            ids.insert(w.id, name);
        }
        Ok(self.apply_reparameterization(Attach {
            opts: *opts,
            ids,
            given,
        }))
    }

    /// Every fake-quantized linear in integer form, by HF name: the codes of its current
    /// weights under its current scales and zero points (HF layout, contiguous groups). Their
    /// dequantized values are what the forward pass uses.
    pub fn quantized_linears(&self, scheme: &QuantScheme) -> BTreeMap<String, QuantizedLinear> {
        let mut out = BTreeMap::new();
        for (name, w) in self.qat_weights() {
            let Some(fq) = w.reparameterization::<FakeQuant>() else {
                continue;
            };
            let t = w.base();
            let [inp, cols_out] = t.dims();
            let (rows, cols) = (cols_out, inp);
            let hf = transpose(&values(t), inp, cols_out);
            let groups = fq.zero.dims()[0];
            let scale = values(fq.scale.val().clamp_min(fq.floor));
            let zero = values(fq.zero.clone());
            let mut params = Vec::with_capacity(rows * groups);
            for r in 0..rows {
                for k in 0..groups {
                    params.push(GroupParams {
                        scale: scale[k * rows + r],
                        zero: zero[k * rows + r] as i32,
                    });
                }
            }
            let g_idx: Vec<u32> = (0..cols).map(|c| (c / fq.group) as u32).collect();
            let codes = (0..rows * cols)
                .map(|i| {
                    let p = params[(i / cols) * groups + g_idx[i % cols] as usize];
                    scheme.code(hf[i], p)
                })
                .collect();
            let q = QuantizedLinear {
                rows,
                cols,
                codes,
                params,
                groups,
                g_idx,
                latent: None,
                blocks: None,
            };
            out.insert(name, q);
        }
        out
    }
}
