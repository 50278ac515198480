//! Element-wise parts of a training step as single autodiff nodes with hand-written
//! backward passes, computed row-parallel on the CPU backend: RMSNorm, SwiGLU's
//! `silu(gate) * up`, rotary position embedding and log-softmax. burn differentiates them through their decomposed
//! forms, a dozen single-threaded passes each over `[tokens, width]` tensors (a fifth of a
//! SmolLM2 training step); here each is one parallel pass forward and one backward. Other
//! devices and dtypes take burn's own operations ([`applies`]).

use std::borrow::Cow;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::nn::RmsNorm;
use burn::tensor::activation::{log_softmax as burn_log_softmax, silu};
use burn::tensor::{DType, Device, Tensor, TensorData};

mod kernels;

/// Fused training kernels (a burn backend extension: the CPU backend computes, autodiff
/// records one node per call). Every tensor is read as rows of its last dimension.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// `(y, rstd)`: `y = x * rstd * gamma`, `rstd = 1 / sqrt(mean(x²) + eps)` per row.
    fn rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `(dx, dgamma)` of [`FusedOps::rms_norm`] from the gradient `dy` of `y`.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `silu(gate) * up`.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `(dgate, dup)` of [`FusedOps::swiglu`] from the gradient `dh` of its output.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dh: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Rotary position embedding of `x` `[batch, heads, seq, head_dim]` with tables `cos`,
    /// `sin` `[seq, head_dim]` (the rotate-half form: `x·cos + [−x₂, x₁]·sin`).
    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// The input gradient of [`FusedOps::rope`] from the gradient `dy` of its output.
    fn rope_backward(
        dy: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// Log-softmax over the last dimension.
    fn log_softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The input gradient of [`FusedOps::log_softmax_last`] from its output `y` and gradient `dy`.
    fn log_softmax_last_backward(y: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Whether the fused kernels run for tensors of `dtype` on `device`: f32 on the CPU
/// backend's autodiff device (training). Inference keeps burn's operations.
pub fn applies(device: &Device, dtype: DType) -> bool {
    dtype == DType::F32 && device.is_autodiff() && device.clone().inner() == Device::flex()
}

/// RMSNorm as `norm` computes it, fused when [`applies`].
pub fn rms_norm<const D: usize>(norm: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    if !applies(&x.device(), x.dtype()) {
        return norm.forward(x);
    }
    let gamma = norm.gamma.val().into_dispatch();
    let (y, _) = <Dispatch as FusedOps>::rms_norm(x.into_dispatch(), gamma, norm.epsilon);
    Tensor::from_dispatch(y)
}

/// `silu(gate) * up`, fused when [`applies`].
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    if !applies(&gate.device(), gate.dtype()) {
        return silu(gate) * up;
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// Rotary position embedding (see [`FusedOps::rope`]); callers check [`applies`] first.
pub fn rope(x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::rope(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
    ))
}

/// Log-softmax over the last dimension, fused when [`applies`].
pub fn log_softmax<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !applies(&x.device(), x.dtype()) {
        return burn_log_softmax(x, D - 1);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::log_softmax_last(x.into_dispatch()))
}

/// Records `out`, computed from the inputs behind `guards`, with `backward` and `state` when
/// any input is tracked.
macro_rules! record {
    ($op:expr, $guards:expr, $state:expr, $out:expr) => {
        match $op.prepare::<C>($guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish($state, $out),
            OpsKind::UnTracked(prep) => prep.finish($out),
        }
    };
}

/// Registers each tracked parent's gradient.
macro_rules! register {
    ($grads:expr, $parents:expr, [$($g:expr),+]) => {
        for (node, g) in $parents.into_iter().zip([$($g),+]) {
            if let Some(node) = node {
                $grads.register::<B>(node.id, g);
            }
        }
    };
}

impl<B: Backend + FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct RmsNormBackward;
        impl<B: Backend + FusedOps> Backward<B, 2> for RmsNormBackward {
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);
            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, gamma, rstd) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                let (dx, dgamma) = B::rms_norm_backward(x, gamma, rstd, dy);
                register!(grads, ops.parents, [dx, dgamma]);
            }
        }
        let guards = [x.node(), gamma.node()];
        let (x, gamma) = (x.into_primitive(), gamma.into_primitive());
        let (y, rstd) = B::rms_norm(x.clone(), gamma.clone(), eps);
        let y = record!(RmsNormBackward, guards, (x, gamma, rstd.clone()), y);
        (y, FloatTensor::<Self>::new(rstd))
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // Second derivatives are not needed: computed untracked.
        let (dx, dg) = B::rms_norm_backward(
            x.into_primitive(),
            gamma.into_primitive(),
            rstd.into_primitive(),
            dy.into_primitive(),
        );
        (FloatTensor::<Self>::new(dx), FloatTensor::<Self>::new(dg))
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwiGluBackward;
        impl<B: Backend + FusedOps> Backward<B, 2> for SwiGluBackward {
            type State = (FloatTensor<B>, FloatTensor<B>);
            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (gate, up) = ops.state;
                let dh = grads.consume::<B>(&ops.node);
                let (dg, du) = B::swiglu_backward(gate, up, dh);
                register!(grads, ops.parents, [dg, du]);
            }
        }
        let guards = [gate.node(), up.node()];
        let (gate, up) = (gate.into_primitive(), up.into_primitive());
        let h = B::swiglu(gate.clone(), up.clone());
        record!(SwiGluBackward, guards, (gate, up), h)
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dh: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dg, du) = B::swiglu_backward(
            gate.into_primitive(),
            up.into_primitive(),
            dh.into_primitive(),
        );
        (FloatTensor::<Self>::new(dg), FloatTensor::<Self>::new(du))
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RopeBackward;
        impl<B: Backend + FusedOps> Backward<B, 1> for RopeBackward {
            type State = (FloatTensor<B>, FloatTensor<B>);
            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (cos, sin) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                let dx = B::rope_backward(dy, cos, sin);
                register!(grads, ops.parents, [dx]);
            }
        }
        // The tables are constants: no gradient flows into them.
        let guards = [x.node()];
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        let y = B::rope(x.into_primitive(), cos.clone(), sin.clone());
        record!(RopeBackward, guards, (cos, sin), y)
    }

    fn rope_backward(
        dy: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        FloatTensor::<Self>::new(B::rope_backward(
            dy.into_primitive(),
            cos.into_primitive(),
            sin.into_primitive(),
        ))
    }

    fn log_softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LogSoftmaxBackward;
        impl<B: Backend + FusedOps> Backward<B, 1> for LogSoftmaxBackward {
            type State = FloatTensor<B>;
            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let dy = grads.consume::<B>(&ops.node);
                let dx = B::log_softmax_last_backward(ops.state, dy);
                register!(grads, ops.parents, [dx]);
            }
        }
        let guards = [x.node()];
        let y = B::log_softmax_last(x.into_primitive());
        record!(LogSoftmaxBackward, guards, y.clone(), y)
    }

    fn log_softmax_last_backward(y: FloatTensor<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self> {
        FloatTensor::<Self>::new(B::log_softmax_last_backward(
            y.into_primitive(),
            dy.into_primitive(),
        ))
    }
}

/// Contiguous f32 values of a CPU tensor.
pub(crate) fn contiguous(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(v) => Cow::Borrowed(v),
        None => Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("f32").to_vec()),
    }
}

/// A CPU tensor of `shape` holding `values`.
pub(crate) fn flex(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn shape(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

impl FusedOps for Flex {
    fn rms_norm(x: FlexTensor, gamma: FlexTensor, eps: f64) -> (FlexTensor, FlexTensor) {
        let s = shape(&x);
        let (xv, g) = (contiguous(&x), contiguous(&gamma));
        let (y, rstd) = kernels::rms_norm(&xv, &g, eps as f32);
        (flex(y, s.clone()), flex(rstd, s[..s.len() - 1].to_vec()))
    }

    fn rms_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        rstd: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (s, gs) = (shape(&x), shape(&gamma));
        let (xv, g, r, d) = (
            contiguous(&x),
            contiguous(&gamma),
            contiguous(&rstd),
            contiguous(&dy),
        );
        let (dx, dg) = kernels::rms_norm_backward(&xv, &g, &r, &d);
        (flex(dx, s), flex(dg, gs))
    }

    fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        let s = shape(&gate);
        flex(kernels::swiglu(&contiguous(&gate), &contiguous(&up)), s)
    }

    fn swiglu_backward(
        gate: FlexTensor,
        up: FlexTensor,
        dh: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let s = shape(&gate);
        let (dg, du) =
            kernels::swiglu_backward(&contiguous(&gate), &contiguous(&up), &contiguous(&dh));
        (flex(dg, s.clone()), flex(du, s))
    }

    fn rope(x: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
        let s = shape(&x);
        let d = s[s.len() - 1];
        assert_eq!(
            shape(&cos),
            [s[s.len() - 2], d],
            "rope tables are [seq, head_dim]"
        );
        flex(
            kernels::rope(
                &contiguous(&x),
                &contiguous(&cos),
                &contiguous(&sin),
                d,
                false,
            ),
            s,
        )
    }

    fn rope_backward(dy: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
        let s = shape(&dy);
        let d = s[s.len() - 1];
        flex(
            kernels::rope(
                &contiguous(&dy),
                &contiguous(&cos),
                &contiguous(&sin),
                d,
                true,
            ),
            s,
        )
    }

    fn log_softmax_last(x: FlexTensor) -> FlexTensor {
        let s = shape(&x);
        let n = *s.last().expect("a last dimension");
        flex(kernels::log_softmax(&contiguous(&x), n), s)
    }

    fn log_softmax_last_backward(y: FlexTensor, dy: FlexTensor) -> FlexTensor {
        let s = shape(&y);
        let n = *s.last().expect("a last dimension");
        flex(
            kernels::log_softmax_backward(&contiguous(&y), &contiguous(&dy), n),
            s,
        )
    }
}

#[cfg(test)]
mod tests;
