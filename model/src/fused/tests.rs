use super::*;
use burn::module::Param;
use burn::nn::RmsNormConfig;
use burn::tensor::TensorData;

use crate::testkit::Rng;

fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data().try_into_vec::<f32>().expect("f32")
}

fn assert_close<const D: usize>(what: &str, a: &Tensor<D>, b: &Tensor<D>, tol: f32) {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff < tol, "{what}: max difference {diff}");
}

/// Deterministic values in `[-scale, scale)` on the autodiff CPU device (the global RNG is
/// shared by tests running in parallel).
fn values_for<const D: usize>(shape: [usize; D], scale: f32, seed: u64) -> Tensor<D> {
    let mut rng = Rng(seed);
    let n = shape.iter().product::<usize>();
    let v: Vec<f32> = (0..n).map(|_| scale * rng.next()).collect();
    Tensor::from_data(TensorData::new(v, shape), &Device::flex().autodiff())
}

/// A tracked input.
fn input<const D: usize>(shape: [usize; D], scale: f32, seed: u64) -> Tensor<D> {
    values_for(shape, scale, seed).require_grad()
}

/// `sum(out * w)` for a fixed weighting `w`, so that the gradient is not trivial.
fn weigh<const D: usize>(out: &Tensor<D>) -> Tensor<1> {
    (out.clone() * values_for(out.dims(), 1.0, 99)).sum()
}

#[test]
fn fused_rms_norm_matches_burns_output_and_gradients() {
    let x = input([2, 37, 48], 2.0, 7);
    let dev = Device::flex().autodiff();
    let mut norm = RmsNormConfig::new(48).with_epsilon(1e-5).init(&dev);
    let gamma = input([48], 1.0, 8);
    norm.gamma = Param::from_tensor(gamma);
    assert!(applies(&x.device(), x.dtype()));
    let ours = rms_norm(&norm, x.clone());
    let theirs = norm.forward(x.clone());
    assert_close("y", &ours, &theirs, 1e-5);
    let g1 = weigh(&ours).backward();
    let g2 = weigh(&theirs).backward();
    assert_close("dx", &x.grad(&g1).unwrap(), &x.grad(&g2).unwrap(), 1e-4);
    let dg = |g| norm.gamma.val().grad(g).unwrap();
    assert_close("dgamma", &dg(&g1), &dg(&g2), 1e-3);
}

#[test]
fn fused_swiglu_matches_burns_output_and_gradients() {
    // More elements than one parallel chunk, not a multiple of it.
    let (g, u) = (input([3, 70_001], 3.0, 9), input([3, 70_001], 1.0, 10));
    let ours = swiglu(g.clone(), u.clone());
    let theirs = silu(g.clone()) * u.clone();
    assert_close("h", &ours, &theirs, 1e-5);
    let g1 = weigh(&ours).backward();
    let g2 = weigh(&theirs).backward();
    assert_close("dgate", &g.grad(&g1).unwrap(), &g.grad(&g2).unwrap(), 1e-4);
    assert_close("dup", &u.grad(&g1).unwrap(), &u.grad(&g2).unwrap(), 1e-4);
}

#[test]
fn fused_rope_matches_the_rotate_half_form() {
    let (b, h, s, d) = (2, 3, 21, 8);
    // A strided input, as the attention's heads are; one copy per graph (burn frees a
    // graph in its backward pass).
    let x = input([b, s, h, d], 1.0, 13);
    let x2 = Tensor::<4>::from_data(x.to_data(), &x.device()).require_grad();
    let (cos, sin) = (values_for([s, d], 1.0, 14), values_for([s, d], 1.0, 15));
    let ours = rope(x.clone().swap_dims(1, 2), cos.clone(), sin.clone());
    let xs = x2.clone().swap_dims(1, 2);
    let (lo, hi) = (
        xs.clone().narrow(3, 0, d / 2),
        xs.clone().narrow(3, d / 2, d / 2),
    );
    let rot = Tensor::cat(vec![hi.neg(), lo], 3);
    let theirs = xs * cos.unsqueeze::<4>() + rot * sin.unsqueeze::<4>();
    assert_close("y", &ours, &theirs, 1e-5);
    let g1 = weigh(&ours).backward();
    let g2 = weigh(&theirs).backward();
    assert_close("dx", &x.grad(&g1).unwrap(), &x2.grad(&g2).unwrap(), 1e-5);
}

#[test]
fn fused_log_softmax_matches_burns_output_and_gradients() {
    let x = input([5, 3001], 4.0, 11);
    let ours = log_softmax(x.clone());
    let theirs = burn_log_softmax(x.clone(), 1);
    assert_close("y", &ours, &theirs, 1e-5);
    let g1 = weigh(&ours).backward();
    let g2 = weigh(&theirs).backward();
    // Each row's gradient sums 3,001 terms in f32, in another order than burn's.
    assert_close("dx", &x.grad(&g1).unwrap(), &x.grad(&g2).unwrap(), 5e-4);
}

#[test]
fn fused_ops_fall_back_off_the_autodiff_cpu_device() {
    assert!(applies(&Device::flex().autodiff(), DType::F32));
    assert!(!applies(&Device::flex(), DType::F32));
    assert!(!applies(&Device::flex().autodiff(), DType::F64));
    let x = values_for([2, 8], 1.0, 17).inner();
    assert_close(
        "log_softmax",
        &log_softmax(x.clone()),
        &burn_log_softmax(x, 1),
        0.0 + f32::EPSILON,
    );
}

#[test]
fn rms_norm_weight_gradient_does_not_depend_on_the_thread_count() {
    // Enough rows for many blocks; rayon splits them differently with 1 and 3 threads.
    let (rows, n) = (5000, 48);
    let mut rng = Rng(21);
    let mut v = |len: usize| (0..len).map(|_| rng.next()).collect::<Vec<f32>>();
    let (x, gamma, dy) = (v(rows * n), v(n), v(rows * n));
    let rstd: Vec<f32> = x
        .chunks(n)
        .map(|r| 1.0 / (r.iter().map(|a| a * a).sum::<f32>() / n as f32 + 1e-5).sqrt())
        .collect();
    let on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| kernels::rms_norm_backward(&x, &gamma, &rstd, &dy).1)
    };
    let (one, three) = (on(1), on(3));
    assert_eq!(
        one.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
        three.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
    );
}
