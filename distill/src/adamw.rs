//! AdamW with burn's update rule and state (so optimizer records are burn's `AdamWState`),
//! computed in one parallel pass per parameter on the CPU backend. burn's AdamW runs about
//! fifteen single-threaded tensor operations per parameter, a tenth of a SmolLM2 training
//! step; other devices and dtypes still take burn's own AdamW.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, Optimizer};
use burn::tensor::{DType, Device, Tensor};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

/// Hyper-parameters of one AdamW update (burn's `AdamWConfig` fields).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hyper {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the root of the second moment.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

/// The fused update (a burn backend extension, on the CPU backend).
#[backend_extension(Flex, Autodiff)]
pub trait AdamWOps: Backend {
    /// `(param, m, v)` after step `time` (1-based) of AdamW with learning rate `lr`, from the
    /// parameter, its gradient and the moments before the step (zeros at step 1).
    #[allow(clippy::too_many_arguments)]
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        lr: f64,
        time: usize,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl<B: Backend + AdamWOps, C: CheckpointStrategy> AdamWOps for Autodiff<B, C> {
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        lr: f64,
        time: usize,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // Optimizer updates are not differentiated.
        let (p, m, v) = B::adamw_update(
            param.into_primitive(),
            grad.into_primitive(),
            m.into_primitive(),
            v.into_primitive(),
            lr,
            time,
            beta1,
            beta2,
            eps,
            weight_decay,
        );
        (
            FloatTensor::<Self>::new(p),
            FloatTensor::<Self>::new(m),
            FloatTensor::<Self>::new(v),
        )
    }
}

/// `t` as a contiguous tensor whose buffer holds exactly its values (copied only when `t` is
/// a strided or partial view).
fn whole(t: FlexTensor) -> FlexTensor {
    let n = t.layout().num_elements();
    match t.as_slice::<f32>() {
        Some(v) if v.len() == n && t.storage::<f32>().len() == n => t,
        _ => t.to_contiguous(),
    }
}

impl AdamWOps for Flex {
    fn adamw_update(
        param: FlexTensor,
        grad: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        lr: f64,
        time: usize,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        // In place: the parameter and moments are usually this call's only owners (a shared
        // buffer is copied first by `storage_mut`).
        let (mut p, grad, mut m, mut v) = (whole(param), whole(grad), whole(m), whole(v));
        let h = Hyper {
            beta1,
            beta2,
            eps,
            weight_decay,
        };
        let g = grad.storage::<f32>();
        update(
            p.storage_mut(),
            g,
            m.storage_mut(),
            v.storage_mut(),
            lr,
            time,
            h,
        );
        (p, m, v)
    }
}

/// One AdamW step in place, element for element as burn's `AdamW` computes it (f32
/// arithmetic, bias corrections `1 − βᵗ`, `eps` added to the root, decay `1 − lr·wd`).
pub fn update(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f64,
    time: usize,
    h: Hyper,
) {
    let (f1, f2) = (1.0 - h.beta1, 1.0 - h.beta2);
    let t = time as i32;
    let (c1, c2) = (1f32 - h.beta1.powi(t), 1f32 - h.beta2.powi(t));
    let decay = (1.0 - lr * h.weight_decay as f64) as f32;
    let lr = lr as f32;
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                *m = *m * h.beta1 + g * f1;
                *v = *v * h.beta2 + g * g * f2;
                let delta = (*m / c1) / ((*v / c2).sqrt() + h.eps);
                *p = *p * decay - delta * lr;
            }
        });
}

/// AdamW for burn's module optimizer: the fused update on f32 CPU tensors, burn's `AdamW`
/// elsewhere; both keep burn's `AdamWState`.
#[derive(Clone)]
pub struct FusedAdamW {
    hyper: Hyper,
    burn: AdamW,
}

impl FusedAdamW {
    /// AdamW with `hyper`.
    pub fn new(hyper: Hyper) -> Self {
        let burn = AdamWConfig::new()
            .with_beta_1(hyper.beta1)
            .with_beta_2(hyper.beta2)
            .with_epsilon(hyper.eps)
            .with_weight_decay(hyper.weight_decay)
            .build();
        Self { hyper, burn }
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let device = tensor.device();
        let fused =
            tensor.dtype() == DType::F32 && grad.dtype() == DType::F32 && device == Device::flex();
        if !fused {
            return self.burn.step(lr, tensor, grad, state);
        }
        let (m, v, time) = match state {
            Some(s) => (
                s.momentum.moment_1,
                s.momentum.moment_2,
                s.momentum.time + 1,
            ),
            None => (tensor.zeros_like(), tensor.zeros_like(), 1),
        };
        let h = self.hyper;
        let (p, m, v) = <Dispatch as AdamWOps>::adamw_update(
            tensor.into_dispatch(),
            grad.into_dispatch(),
            m.into_dispatch(),
            v.into_dispatch(),
            lr,
            time,
            h.beta1,
            h.beta2,
            h.eps,
            h.weight_decay,
        );
        let momentum =
            AdaptiveMomentumState::new(time, Tensor::from_dispatch(m), Tensor::from_dispatch(v));
        (Tensor::from_dispatch(p), Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdamW::to_device(state, device)
    }
}

#[cfg(test)]
mod tests;
