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
use burn::tensor::Tensor;

use crate::fused::{contiguous, flex};
use rayon::prelude::*;

/// Rows of the score matrix handled together: a block's columns stop at its last row.
const BLOCK: usize = 64;

/// Causal attention with a hand-written backward pass (a burn backend extension: the CPU
/// backend computes, autodiff records one node for the whole attention).
#[backend_extension(Flex, Autodiff)]
pub trait CausalAttentionOps: Backend {
    /// `(out, lse)` of causal attention over `q` `[batch, heads, seq, head_dim]` and `k`,
    /// `v` `[batch, kv_heads, seq, head_dim]` (grouped-query attention: query head `i` reads
    /// key/value head `i / (heads / kv_heads)`): `out` as `q`, `lse` `[batch, heads, seq]`
    /// the log-sum-exp of each row's scaled scores.
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

/// Causal attention of `q` `[batch, heads, seq, head_dim]` over `k`, `v` with `heads` or a
/// divisor of it as their head count, through [`CausalAttentionOps`] with softmax scale
/// `scale`; callers check [`crate::fused::applies`] first.
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

/// The sizes of a `[batch, heads, seq, head_dim]` tensor.
fn dims4(t: &FlexTensor) -> [usize; 4] {
    let dims = t.layout().shape().to_vec();
    let [b, h, s, d] = dims[..] else {
        panic!("causal attention takes [batch, heads, seq, head_dim], got {dims:?}")
    };
    [b, h, s, d]
}

/// Which key/value head (flat over batch) query head `i` (flat over batch) reads, with `h`
/// query and `hk` key/value heads per batch row.
fn kv_head(i: usize, h: usize, hk: usize) -> usize {
    (i / h) * hk + (i % h) / (h / hk)
}

impl CausalAttentionOps for Flex {
    fn causal_attention_forward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        scale: f32,
    ) -> (FlexTensor, FlexTensor) {
        let ([b, h, s, d], [_, hk, _, _]) = (dims4(&q), dims4(&k));
        let (q, k, v) = (contiguous(&q), contiguous(&k), contiguous(&v));
        let sd = s * d;
        let mut out = vec![0f32; b * h * sd];
        let mut lse = vec![0f32; b * h * s];
        out.par_chunks_mut(sd)
            .zip(lse.par_chunks_mut(s))
            .enumerate()
            .for_each(|(i, (o, l))| {
                let j = kv_head(i, h, hk);
                let (kj, vj) = (&k[j * sd..(j + 1) * sd], &v[j * sd..(j + 1) * sd]);
                kernel::forward(&q[i * sd..(i + 1) * sd], kj, vj, o, l, s, d, scale);
            });
        (flex(out, vec![b, h, s, d]), flex(lse, vec![b, h, s]))
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
        let ([b, h, s, d], [_, hk, _, _]) = (dims4(&q), dims4(&k));
        let (q, k, v) = (contiguous(&q), contiguous(&k), contiguous(&v));
        let (o, g, lse) = (contiguous(&out), contiguous(&grad), contiguous(&lse));
        let sd = s * d;
        // dk and dv per query head first, then summed over each key/value head's group.
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; b * h * sd],
            vec![0f32; b * h * sd],
            vec![0f32; b * h * sd],
        );
        (
            dq.par_chunks_mut(sd),
            dk.par_chunks_mut(sd),
            dv.par_chunks_mut(sd),
        )
            .into_par_iter()
            .enumerate()
            .for_each(|(i, (dq, dk, dv))| {
                let (r, j) = (i * sd..(i + 1) * sd, kv_head(i, h, hk));
                let head = kernel::Head {
                    q: &q[r.clone()],
                    k: &k[j * sd..(j + 1) * sd],
                    v: &v[j * sd..(j + 1) * sd],
                    o: &o[r.clone()],
                    lse: &lse[i * s..(i + 1) * s],
                    s,
                    d,
                    scale,
                };
                kernel::backward(&head, &g[r], dq, dk, dv);
            });
        let group = |per_query: Vec<f32>| -> Vec<f32> {
            if hk == h {
                return per_query;
            }
            let rep = h / hk;
            let mut summed = vec![0f32; b * hk * sd];
            summed.par_chunks_mut(sd).enumerate().for_each(|(j, dst)| {
                let first = (j / hk) * h + (j % hk) * rep;
                for src in per_query[first * sd..(first + rep) * sd].chunks(sd) {
                    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                }
            });
            summed
        };
        (
            flex(dq, vec![b, h, s, d]),
            flex(group(dk), vec![b, hk, s, d]),
            flex(group(dv), vec![b, hk, s, d]),
        )
    }
}

mod kernel;

#[cfg(test)]
mod tests;
