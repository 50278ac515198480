use super::*;
use burn::tensor::TensorData;

/// Deterministic values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = model::testkit::Rng(seed);
    (0..n).map(|_| rng.next()).collect()
}

fn tensor(v: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v, shape), &Device::flex())
}

fn vals(t: &Tensor<2>) -> Vec<f32> {
    t.to_data().try_into_vec::<f32>().expect("f32")
}

#[test]
fn fused_adamw_follows_burns_adamw_step_for_step() {
    let h = Hyper {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let fused = FusedAdamW::new(h);
    let shape = [70, 1031]; // more than one parallel chunk, not a multiple of it
    let n = shape[0] * shape[1];
    let (mut a, mut b) = (tensor(noise(n, 1), shape), tensor(noise(n, 1), shape));
    let (mut sa, mut sb) = (None, None);
    for step in 0..4u64 {
        let g = tensor(
            noise(n, 10 + step).iter().map(|x| x * 1e-2).collect(),
            shape,
        );
        let lr = 1e-2 / (step + 1) as f64;
        (a, sa) = fused.step(lr, a, g.clone(), sa);
        (b, sb) = fused.burn.step(lr, b, g, sb);
        let (pa, pb) = (vals(&a), vals(&b));
        let diff = pa
            .iter()
            .zip(&pb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-6, "step {step}: parameters differ by {diff}");
        let (ma, mb) = (sa.as_ref().unwrap(), sb.as_ref().unwrap());
        assert_eq!(ma.momentum.time, mb.momentum.time);
        let pairs = [
            (&ma.momentum.moment_1, &mb.momentum.moment_1),
            (&ma.momentum.moment_2, &mb.momentum.moment_2),
        ];
        for (x, y) in pairs {
            let d = vals(x)
                .iter()
                .zip(vals(y))
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-7, "step {step}: moments differ by {d}");
        }
    }
    // The run moved the parameters.
    assert!(
        vals(&a)
            .iter()
            .zip(noise(n, 1))
            .any(|(x, y)| (x - y).abs() > 1e-3)
    );
}
