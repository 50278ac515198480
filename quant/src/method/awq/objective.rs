//! What AWQ's scale search scores a candidate on: the output of the module the group feeds,
//! as llm-awq and llm-compressor do ("module to inspect"): the whole attention through
//! `o_proj` for q/k/v (on whole windows, since attention mixes positions), the whole MLP
//! through `down_proj` for gate/up, and the linear's own output for `o_proj` and
//! `down_proj`. Every layer outside the group keeps its unrounded weights.

use burn::nn::Linear;
use burn::tensor::activation::silu;
use model::transformer::{Attention, DecoderLayer, Positions, Rope, linear_from_hf, transpose};
use model::{Device, Tensor};

use crate::block::BlockWeights;

/// A group's linears stacked as scored: `(weight key, rows)` in stacking order, their
/// weights stacked `[rows, cols]`, and each one's bias (kept unrounded).
pub(super) struct Parts {
    pub keys: Vec<(String, usize)>,
    pub w: Vec<f32>,
    pub biases: Vec<Option<Vec<f32>>>,
    pub cols: usize,
}

impl Parts {
    pub fn of(weights: &BlockWeights, linears: &[&str]) -> Self {
        let keys: Vec<(String, usize)> = linears
            .iter()
            .map(|l| {
                let key = format!("{l}.weight");
                let rows = weights.get(&key).shape[0];
                (key, rows)
            })
            .collect();
        let biases = linears
            .iter()
            .map(|l| {
                weights
                    .tensors
                    .get(&format!("{l}.bias"))
                    .map(|b| b.data.clone())
            })
            .collect();
        let cols = weights.get(&keys[0].0).shape[1];
        let w = keys
            .iter()
            .flat_map(|(key, _)| weights.get(key).data.iter().copied())
            .collect();
        Self {
            keys,
            w,
            biases,
            cols,
        }
    }

    /// Stacked values `[rows, cols]` as the `[cols, rows]` right-hand side of a product.
    fn transposed(&self, q: &[f32], device: &Device) -> Tensor<2> {
        let rows = q.len() / self.cols;
        model::transformer::tensor_from(transpose(q, rows, self.cols), [self.cols, rows], device)
    }

    /// One burn linear per part from the stacked candidate `q` `[rows, cols]`.
    fn linears(&self, q: &[f32], device: &Device) -> Vec<Linear> {
        let mut off = 0;
        self.keys
            .iter()
            .zip(&self.biases)
            .map(|((_, r), b)| {
                let part = q[off * self.cols..(off + r) * self.cols].to_vec();
                off += r;
                linear_from_hf(part, *r, self.cols, b.clone(), device)
            })
            .collect()
    }
}

/// The module output a candidate is scored on, with the unrounded module's output.
pub(super) enum Objective {
    /// The group's own outputs `x qᵀ` on sampled rows `x` `[n, cols]`.
    Own { x: Tensor<2>, reference: Tensor<2> },
    /// The MLP's output `down(silu(x gᵀ) ⊙ x uᵀ)` on sampled rows (parts: gate, up).
    Mlp {
        x: Tensor<2>,
        down: Linear,
        reference: Tensor<2>,
    },
    /// The attention's output through `o_proj` on whole normed windows (parts: q, k, v).
    Attention {
        windows: Vec<Tensor<3>>,
        attn: Box<Attention>,
        reference: Vec<Tensor<3>>,
    },
}

fn sq_sum<const D: usize>(d: Tensor<D>) -> f64 {
    d.powi_scalar(2).sum().into_scalar::<f64>()
}

impl Objective {
    /// The group's own output on `x` `[n, cols]` with its unrounded weights.
    pub fn own(x: Tensor<2>, parts: &Parts, device: &Device) -> Self {
        let reference = x.clone().matmul(parts.transposed(&parts.w, device));
        Self::Own { x, reference }
    }

    /// The MLP of `block` on sampled rows `x` (the post-attention norm's outputs).
    pub fn mlp(x: Tensor<2>, block: &DecoderLayer) -> Self {
        let m = &block.mlp;
        let reference = m
            .down_proj
            .forward(silu(m.gate_proj.forward(x.clone())) * m.up_proj.forward(x.clone()));
        Self::Mlp {
            x,
            down: m.down_proj.clone(),
            reference,
        }
    }

    /// The attention of `block` on block inputs `windows` (each `[1, len, hidden]`), normed
    /// here by the block's input norm.
    pub fn attention(windows: &[Tensor<3>], block: &DecoderLayer, rope: &Rope) -> Self {
        let attn = block.self_attn.clone();
        let windows: Vec<Tensor<3>> = windows
            .iter()
            .map(|x| block.input_layernorm.forward(x.clone()))
            .collect();
        let reference = windows
            .iter()
            .map(|n| {
                attn.o_proj
                    .forward(attn.context(n.clone(), Positions::Causal(rope)))
            })
            .collect();
        Self::Attention {
            windows,
            attn: Box::new(attn),
            reference,
        }
    }

    /// Mean squared error of the module output with the group's weights replaced by `q`
    /// (stacked `[rows, cols]`, already divided by the scales, so the inputs stay unscaled).
    pub fn error(&self, q: &[f32], parts: &Parts, rope: &Rope, device: &Device) -> f64 {
        match self {
            Self::Own { x, reference } => {
                let d = x.clone().matmul(parts.transposed(q, device)) - reference.clone();
                sq_sum(d) / reference.shape().num_elements() as f64
            }
            Self::Mlp { x, down, reference } => {
                let l = parts.linears(q, device);
                let h = silu(l[0].forward(x.clone())) * l[1].forward(x.clone());
                let d = down.forward(h) - reference.clone();
                sq_sum(d) / reference.shape().num_elements() as f64
            }
            Self::Attention {
                windows,
                attn,
                reference,
            } => {
                let mut a = (**attn).clone();
                let mut l = parts.linears(q, device).into_iter();
                a.q_proj = l.next().expect("q part");
                a.k_proj = l.next().expect("k part");
                a.v_proj = l.next().expect("v part");
                let (mut sum, mut count) = (0.0, 0usize);
                for (n, r) in windows.iter().zip(reference) {
                    let y = a
                        .o_proj
                        .forward(a.context(n.clone(), Positions::Causal(rope)));
                    count += r.shape().num_elements();
                    sum += sq_sum(y - r.clone());
                }
                sum / count.max(1) as f64
            }
        }
    }
}
