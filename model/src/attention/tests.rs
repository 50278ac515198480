use super::*;
use burn::tensor::Distribution;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

fn max_diff(a: &Tensor<4>, b: &Tensor<4>) -> f32 {
    let v = |t: &Tensor<4>| t.to_data().try_into_vec::<f32>().expect("f32");
    let (a, b) = (v(a), v(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Output and gradients of q, k, v under `sum(out * w)`, by the fused op or burn's.
fn run(fused: bool, shape: [usize; 4], seed: u64) -> [Tensor<4>; 4] {
    let device = Device::flex().autodiff();
    Device::flex().seed(seed);
    let r = || Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &Device::flex());
    let (q, k, v, w) = (r(), r(), r(), r());
    let on = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &device).require_grad();
    let (q, k, v) = (on(&q), on(&k), on(&v));
    let w = Tensor::<4>::from_data(w.to_data(), &device);
    let scale = 1.0 / (shape[3] as f32).sqrt();
    let out = if fused {
        assert!(fused_applies(&device, q.dtype()));
        causal_attention(q.clone(), k.clone(), v.clone(), scale)
    } else {
        let opts = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        attention(q.clone(), k.clone(), v.clone(), None, None, opts)
    };
    let grads = (out.clone() * w).sum().backward();
    let g = |t: &Tensor<4>| t.grad(&grads).expect("gradient");
    [out.inner(), g(&q), g(&k), g(&v)]
}

#[test]
fn fused_attention_matches_burns_output_and_gradients() {
    // 150 rows: three blocks, the last one partial.
    for (shape, seed) in [([2, 3, 150, 16], 1), ([1, 2, 5, 8], 2), ([1, 1, 64, 4], 3)] {
        let ours = run(true, shape, seed);
        let burn = run(false, shape, seed);
        for (name, (a, b)) in ["out", "dq", "dk", "dv"].iter().zip(ours.iter().zip(&burn)) {
            let diff = max_diff(a, b);
            assert!(diff < 2e-5, "{shape:?} {name}: max difference {diff}");
        }
    }
}

#[test]
fn fused_attention_applies_only_to_f32_autodiff_on_the_cpu() {
    assert!(fused_applies(&Device::flex().autodiff(), DType::F32));
    assert!(!fused_applies(&Device::flex(), DType::F32));
    assert!(!fused_applies(&Device::flex().autodiff(), DType::F64));
}
