use super::*;
use burn::tensor::{Device, TensorData};

use crate::testkit::Rng;
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

/// Output and gradients of q, k, v under `sum(out * w)`, by the fused op or burn's, with
/// `kv` key/value heads.
fn run(fused: bool, shape: [usize; 4], kv: usize, seed: u64) -> [Tensor<4>; 4] {
    let device = Device::flex().autodiff();
    let [b, h, s, d] = shape;
    // Deterministic values (the global RNG is shared by tests running in parallel).
    let mut rng = Rng(seed);
    let mut r = |shape: [usize; 4]| {
        let n = shape.iter().product::<usize>();
        let v: Vec<f32> = (0..n).map(|_| 2.0 * rng.next()).collect();
        Tensor::<4>::from_data(TensorData::new(v, shape), &device)
    };
    let (q, k, v, w) = (r(shape), r([b, kv, s, d]), r([b, kv, s, d]), r(shape));
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let scale = 1.0 / (shape[3] as f32).sqrt();
    let out = if fused {
        assert!(crate::fused::applies(&device, q.dtype()));
        causal_attention(q.clone(), k.clone(), v.clone(), scale)
    } else {
        let opts = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let expand = |x: Tensor<4>| {
            x.reshape([b, kv, 1, s, d])
                .repeat_dim(2, h / kv)
                .reshape([b, h, s, d])
        };
        attention(
            q.clone(),
            expand(k.clone()),
            expand(v.clone()),
            None,
            None,
            opts,
        )
    };
    let grads = (out.clone() * w).sum().backward();
    let g = |t: &Tensor<4>| t.grad(&grads).expect("gradient");
    [out.inner(), g(&q), g(&k), g(&v)]
}

#[test]
fn fused_attention_matches_burns_output_and_gradients() {
    // 150 rows: three blocks, the last one partial; grouped keys and values (6 query
    // heads on 2 or 3 key/value heads) as in SmolLM2 and Llama.
    let cases = [
        ([2, 3, 150, 16], 3, 11),
        ([1, 2, 5, 8], 2, 2),
        ([1, 1, 64, 4], 1, 3),
        ([2, 6, 70, 8], 2, 4),
        ([1, 6, 33, 8], 3, 5),
    ];
    for (shape, kv, seed) in cases {
        let ours = run(true, shape, kv, seed);
        let burn = run(false, shape, kv, seed);
        for (name, (a, b)) in ["out", "dq", "dk", "dv"].iter().zip(ours.iter().zip(&burn)) {
            let diff = max_diff(a, b);
            assert!(
                diff < 2e-5,
                "{shape:?} kv {kv} {name}: max difference {diff}"
            );
        }
    }
}
