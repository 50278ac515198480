//! Causal self-attention for training on the CPU backend: a forward pass that keeps each
//! row's log-sum-exp, and a backward pass that recomputes the probabilities block by block
//! (FlashAttention's recomputation; on a CPU one head's rows fit in cache).
//!
//! burn's autodiff differentiates attention through its decomposed fallback: about fifteen
//! single-threaded passes over every `[heads, seq, seq]` score tensor per layer, a quarter of
//! a training step of SmolLM2 at 512 tokens. Here each head's products run through `gemm`,
//! only the causal (lower) part of every score matrix is computed, and heads run in
//! parallel. Inference keeps burn's own attention (already fused on this backend).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

/// Rows of the score matrix handled together: a block's columns stop at its last row.
const BLOCK: usize = 64;

/// Causal attention with a hand-written backward pass (a burn backend extension: the CPU
/// backend computes, autodiff records one node for the whole attention).
#[backend_extension(Flex, Autodiff)]
pub trait CausalAttentionOps: Backend {
    /// `(out, lse)` of causal attention over `q`, `k`, `v` `[batch, heads, seq, head_dim]`
    /// (keys and values already repeated to the query heads): `out` as `q`, `lse`
    /// `[batch, heads, seq]` the log-sum-exp of each row's scaled scores.
    fn causal_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `(dq, dk, dv)` from the forward's inputs and outputs and the gradient of `out`.
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Whether [`causal_attention`] runs here: f32 tensors on the CPU backend's autodiff device.
pub fn fused_applies(device: &Device, dtype: DType) -> bool {
    dtype == DType::F32 && device.is_autodiff() && device.clone().inner() == Device::flex()
}

/// Causal attention `[batch, heads, seq, head_dim]` through [`CausalAttentionOps`] with
/// softmax scale `scale`; callers check [`fused_applies`] first.
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f32) -> Tensor<4> {
    use burn::backend::Dispatch;
    let (out, _lse) = <Dispatch as CausalAttentionOps>::causal_attention_forward(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale,
    );
    Tensor::from_dispatch(out)
}

impl<B: Backend + CausalAttentionOps, C: CheckpointStrategy> CausalAttentionOps for Autodiff<B, C> {
    fn causal_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct AttentionBackward;

        impl<B: Backend + CausalAttentionOps> Backward<B, 3> for AttentionBackward {
            /// q, k, v, out, lse, scale.
            type State = (
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                f32,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (q, k, v, out, lse, scale) = ops.state;
                let grad = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) = B::causal_attention_backward(q, k, v, out, lse, grad, scale);
                let [nq, nk, nv] = ops.parents;
                for (node, g) in [(nq, dq), (nk, dk), (nv, dv)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        let guards = [q.node(), k.node(), v.node()];
        let (qp, kp, vp) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let (out, lse) = B::causal_attention_forward(qp.clone(), kp.clone(), vp.clone(), scale);
        let out = match AttentionBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((qp, kp, vp, out.clone(), lse.clone(), scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        (out, FloatTensor::<Self>::new(lse))
    }

    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // A backward of a backward is not needed: computed untracked.
        let (dq, dk, dv) = B::causal_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            out.into_primitive(),
            lse.into_primitive(),
            grad.into_primitive(),
            scale,
        );
        (
            FloatTensor::<Self>::new(dq),
            FloatTensor::<Self>::new(dk),
            FloatTensor::<Self>::new(dv),
        )
    }
}

/// Contiguous f32 values and the `[batch * heads, seq, head_dim]` sizes of a CPU tensor.
fn values(t: &FlexTensor) -> (std::borrow::Cow<'_, [f32]>, [usize; 3]) {
    let dims = t.layout().shape().to_vec();
    let [b, h, s, d] = dims[..] else {
        panic!("causal attention takes [batch, heads, seq, head_dim], got {dims:?}")
    };
    let v = match t.as_slice::<f32>() {
        Some(v) => std::borrow::Cow::Borrowed(v),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().unwrap().to_vec()),
    };
    (v, [b * h, s, d])
}

fn flex(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

impl CausalAttentionOps for Flex {
    fn causal_attention_forward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        scale: f32,
    ) -> (FlexTensor, FlexTensor) {
        let shape = q.layout().shape().to_vec();
        let ((q, [n, s, d]), (k, _), (v, _)) = (values(&q), values(&k), values(&v));
        let mut out = vec![0f32; n * s * d];
        let mut lse = vec![0f32; n * s];
        out.par_chunks_mut(s * d)
            .zip(lse.par_chunks_mut(s))
            .enumerate()
            .for_each(|(h, (o, l))| {
                let r = h * s * d..(h + 1) * s * d;
                kernel::forward(&q[r.clone()], &k[r.clone()], &v[r], o, l, s, d, scale);
            });
        let lse_shape = shape[..3].to_vec();
        (flex(out, shape), flex(lse, lse_shape))
    }

    fn causal_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        out: FlexTensor,
        lse: FlexTensor,
        grad: FlexTensor,
        scale: f32,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = q.layout().shape().to_vec();
        let (q, [n, s, d]) = values(&q);
        let ((k, _), (v, _), (o, _), (g, _)) =
            (values(&k), values(&v), values(&out), values(&grad));
        let lse = lse.to_contiguous();
        let lse = lse.as_slice::<f32>().expect("contiguous f32");
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; n * s * d],
            vec![0f32; n * s * d],
            vec![0f32; n * s * d],
        );
        (
            dq.par_chunks_mut(s * d),
            dk.par_chunks_mut(s * d),
            dv.par_chunks_mut(s * d),
        )
            .into_par_iter()
            .enumerate()
            .for_each(|(h, (dq, dk, dv))| {
                let r = h * s * d..(h + 1) * s * d;
                let head = kernel::Head {
                    q: &q[r.clone()],
                    k: &k[r.clone()],
                    v: &v[r.clone()],
                    o: &o[r.clone()],
                    lse: &lse[h * s..(h + 1) * s],
                    s,
                    d,
                    scale,
                };
                kernel::backward(&head, &g[r], dq, dk, dv);
            });
        (
            flex(dq, shape.clone()),
            flex(dk, shape.clone()),
            flex(dv, shape),
        )
    }
}

mod kernel;

#[cfg(test)]
mod tests;
