//! The training loop's gradients against finite differences, and the KD loss's fixed point:
//! a student identical to its teacher has zero loss and zero gradient.

use std::collections::BTreeMap;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use distill::{CausalLm, Divergence, LossSpec, Teacher};
use model::testkit::{Rng, tiny_config, write_hf};
use model::transformer::Rope;
use model::{Checkpoint, Config};

const SEQ: usize = 12;

fn windows(seed: u64, vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = Rng(seed);
    (0..2)
        .map(|_| {
            (0..=SEQ)
                .map(|_| ((rng.next() + 1.0) * 0.5 * (vocab as f32 - 1.0)) as u32)
                .collect()
        })
        .collect()
}

fn model_from(cfg: &Config, t: &BTreeMap<String, Vec<f32>>, device: &Device) -> CausalLm {
    CausalLm::from_fn(cfg, |n, _| Ok(t[n].clone()), device).expect("build model")
}

/// The loss of `student` against `teacher` logits on `w`, and its gradients by HF name.
fn loss_and_grads(
    spec: &LossSpec,
    student: &CausalLm,
    teacher: Option<Teacher>,
    w: &[Vec<u32>],
    rope: &Rope,
    device: &Device,
) -> (f64, BTreeMap<String, Vec<f32>>) {
    let inputs: Vec<Vec<u32>> = w.iter().map(|x| x[..SEQ].to_vec()).collect();
    let tg: Vec<i64> = w
        .iter()
        .flat_map(|x| x[1..].iter().map(|&t| t as i64))
        .collect();
    let n = tg.len();
    let tg = Tensor::<1, Int>::from_data(TensorData::new(tg, [n]), device);
    let parts = spec.compute(
        student.logits(&inputs, rope),
        teacher,
        tg,
        None,
        1.0 / n as f64,
    );
    let loss = parts.total.clone().into_scalar::<f64>();
    if !device.is_autodiff() {
        return (loss, BTreeMap::new());
    }
    let grads = GradientsParams::from_grads(parts.total.backward(), student);
    (loss, student.hf_grads(&grads))
}

struct Fixture {
    cfg: Config,
    student: BTreeMap<String, Vec<f32>>,
    teacher: BTreeMap<String, Vec<f32>>,
    windows: Vec<Vec<u32>>,
}

fn fixture(config: serde_json::Value) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let student = write_hf(&dir.path().join("s"), &config, 1, |_, _| {});
    let teacher = write_hf(&dir.path().join("t"), &config, 2, |_, _| {});
    let cfg = Checkpoint::open(&dir.path().join("s"))
        .unwrap()
        .config()
        .clone();
    let windows = windows(7, cfg.vocab_size);
    Fixture {
        cfg,
        student,
        teacher,
        windows,
    }
}

fn teacher_logits(f: &Fixture, rope: &Rope, device: &Device) -> Tensor<2> {
    let t = model_from(&f.cfg, &f.teacher, device);
    let inputs: Vec<Vec<u32>> = f.windows.iter().map(|x| x[..SEQ].to_vec()).collect();
    t.logits(&inputs, rope)
}

/// Every parameter kind's gradient agrees with central differences along the gradient's
/// own direction (a directional derivative is large enough to measure in f32) and at its
/// largest entry.
fn check_gradients(config: serde_json::Value, spec: LossSpec) {
    check_gradients_k(config, spec, None);
}

/// As [`check_gradients`], against the teacher's top `k` tokens plus a rest bucket when given.
fn check_gradients_k(config: serde_json::Value, spec: LossSpec, k: Option<usize>) {
    let f = fixture(config);
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    let (rope_p, rope_a) = (Rope::new(&f.cfg, SEQ, &plain), Rope::new(&f.cfg, SEQ, &ad));
    let t_plain = teacher_logits(&f, &rope_p, &plain);
    let teacher_of = |z: Tensor<2>| match k {
        Some(k) => Teacher::top_k_of(z, k, spec.temperature),
        None => Teacher::Logits(z),
    };
    let student = model_from(&f.cfg, &f.student, &ad);
    let (_, grads) = loss_and_grads(
        &spec,
        &student,
        Some(teacher_of(t_plain.clone().autodiff())),
        &f.windows,
        &rope_a,
        &ad,
    );
    assert_eq!(grads.len(), f.student.len(), "a parameter has no gradient");
    let loss_at = |t: &BTreeMap<String, Vec<f32>>| {
        let m = model_from(&f.cfg, t, &plain);
        loss_and_grads(
            &spec,
            &m,
            Some(teacher_of(t_plain.clone())),
            &f.windows,
            &rope_p,
            &plain,
        )
        .0
    };
    for (name, g) in &grads {
        let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{name}: zero gradient");
        // Along g/|g|: the derivative is |g|.
        let w = &f.student[name];
        // A step that moves the loss by ~0.1% (far above its f32 resolution) unless that
        // would move the tensor by more than 5% of its norm; the tolerance adds what the
        // loss's rounding (a few ulps) can do to the quotient.
        let loss0 = loss_at(&f.student);
        let wnorm = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let eps = (1e-3 * loss0 / norm).min(0.05 * wnorm);
        let noise = |e: f64| 16.0 * loss0 * f32::EPSILON as f64 / (2.0 * e);
        let shifted = |sign: f64| {
            let mut t = f.student.clone();
            for (x, gi) in t.get_mut(name).unwrap().iter_mut().zip(g) {
                *x += (sign * eps * *gi as f64 / norm) as f32;
            }
            loss_at(&t)
        };
        let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps);
        assert!(
            (fd - norm).abs() < 0.02 * norm + noise(eps),
            "{name}: directional derivative {fd:.6e} vs |grad| {norm:.6e} (step {eps:.2e})"
        );
        // The largest single entry.
        let (i, gi) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        // A step far above the f32 resolution of the loss, small beside the layer's width.
        let e = 0.05;
        let at = |d: f64| {
            let mut t = f.student.clone();
            t.get_mut(name).unwrap()[i] += d as f32;
            loss_at(&t)
        };
        let fd = (at(e) - at(-e)) / (2.0 * e);
        assert!(
            (fd - *gi as f64).abs() < 0.05 * gi.abs() as f64 + noise(e),
            "{name}[{i}]: finite difference {fd:.6e} vs grad {gi:.6e}"
        );
    }
}

fn kd(divergence: Divergence) -> LossSpec {
    LossSpec {
        divergence: Some(divergence),
        temperature: 2.0,
        kd_weight: 1.0,
        ce_weight: 0.5,
    }
}

#[test]
fn gradients_match_finite_differences_for_every_parameter_kind() {
    // Untied llama (attention, MLP, norms, embedding, lm_head) with forward KL + CE.
    check_gradients(tiny_config(), kd(Divergence::Fkl));
    // At T = 1 the KD and CE terms share one log-softmax.
    check_gradients(
        tiny_config(),
        LossSpec {
            temperature: 1.0,
            ..kd(Divergence::Fkl)
        },
    );
}

#[test]
fn gradients_of_tied_biased_models_and_other_divergences() {
    // Qwen2-style q/k/v biases and a tied embedding, under reverse KL and JSD.
    let mut c = tiny_config();
    c["model_type"] = "qwen2".into();
    c["tie_word_embeddings"] = true.into();
    c["num_hidden_layers"] = 2.into();
    check_gradients(c.clone(), kd(Divergence::Rkl));
    check_gradients(c, kd(Divergence::Jsd { beta: 0.3 }));
}

#[test]
fn gradients_through_a_top_k_teacher_with_a_rest_bucket() {
    // The cached-teacher loss: top 8 of 300 tokens plus one bucket for the rest.
    for div in [
        Divergence::Fkl,
        Divergence::Rkl,
        Divergence::Jsd { beta: 0.5 },
    ] {
        check_gradients_k(tiny_config(), kd(div), Some(8));
    }
}

#[test]
fn a_student_identical_to_its_teacher_has_zero_kd_loss_and_gradient() {
    let f = fixture(tiny_config());
    let plain = Device::flex();
    let ad = plain.clone().autodiff();
    let rope_p = Rope::new(&f.cfg, SEQ, &plain);
    let rope_a = Rope::new(&f.cfg, SEQ, &ad);
    let t = model_from(&f.cfg, &f.student, &plain);
    let inputs: Vec<Vec<u32>> = f.windows.iter().map(|x| x[..SEQ].to_vec()).collect();
    let t_logits = t.logits(&inputs, &rope_p);
    for div in [
        Divergence::Fkl,
        Divergence::Rkl,
        Divergence::Jsd { beta: 0.5 },
    ] {
        let spec = LossSpec {
            ce_weight: 0.0,
            ..kd(div)
        };
        let student = model_from(&f.cfg, &f.student, &ad);
        let (loss, grads) = loss_and_grads(
            &spec,
            &student,
            Some(Teacher::Logits(t_logits.clone().autodiff())),
            &f.windows,
            &rope_a,
            &ad,
        );
        assert!(loss.abs() < 1e-7, "{div:?}: loss {loss}");
        let worst = grads.values().flatten().fold(0f32, |m, g| m.max(g.abs()));
        assert!(worst < 1e-6, "{div:?}: largest gradient entry {worst}");
        // The same student against another teacher is not at a fixed point.
        let other = teacher_logits(&f, &rope_p, &plain);
        let (loss, _) = loss_and_grads(
            &spec,
            &student,
            Some(Teacher::Logits(other.autodiff())),
            &f.windows,
            &rope_a,
            &ad,
        );
        assert!(
            loss > 1e-3,
            "{div:?}: a different teacher gives loss {loss}"
        );
    }
}

/// Adds `delta` (flattened, the parameter's shape) to the parameter `id`.
struct AddTo {
    id: burn::module::ParamId,
    delta: Vec<f32>,
}

impl burn::module::ModuleMapper for AddTo {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<D>>,
    ) -> burn::module::Param<Tensor<D>> {
        if param.id != self.id {
            return param;
        }
        let delta = self.delta.clone();
        param.map(move |t| {
            let d = Tensor::<1>::from_data(
                TensorData::new(delta, [t.shape().num_elements()]),
                &t.device(),
            );
            // A fresh leaf that keeps requiring gradients (an op's result would not be one).
            (t.clone() + d.reshape(t.shape())).detach().require_grad()
        })
    }
}

#[test]
fn lora_factor_gradients_match_finite_differences() {
    use burn::module::Module;
    let f = fixture(tiny_config());
    let ad = Device::flex().autodiff();
    ad.seed(11);
    let rope = Rope::new(&f.cfg, SEQ, &ad);
    let t_logits = teacher_logits(&f, &rope, &ad).detach();
    let spec = kd(Divergence::Fkl);
    let opts = distill::LoraOptions {
        rank: 4,
        alpha: 8.0,
        targets: vec![distill::LoraTarget::QProj, distill::LoraTarget::DownProj],
    };
    let mut student = model_from(&f.cfg, &f.student, &ad).with_lora(&opts);
    // B starts at zero (so A's gradient is zero): move every B off zero first.
    let mut rng = Rng(77);
    for layer in 0..f.cfg.num_hidden_layers {
        for ad_ in [
            student.layers[layer]
                .self_attn
                .q_proj
                .weight
                .adapter()
                .unwrap(),
            student.layers[layer]
                .mlp
                .down_proj
                .weight
                .adapter()
                .unwrap(),
        ]
        .map(|a| (a.b.id, a.b.val().shape().num_elements()))
        .to_vec()
        {
            let delta = (0..ad_.1).map(|_| 0.05 * rng.next()).collect();
            student = student.map(&mut AddTo { id: ad_.0, delta });
        }
    }
    let loss_of = |m: &CausalLm| {
        loss_and_grads(
            &spec,
            m,
            Some(Teacher::Logits(t_logits.clone())),
            &f.windows,
            &rope,
            &ad,
        )
    };
    let (loss0, grads) = loss_of(&student);
    let lora: Vec<_> = grads
        .keys()
        .filter(|k| k.contains(".lora_"))
        .cloned()
        .collect();
    assert_eq!(lora.len(), 4 * f.cfg.num_hidden_layers, "{lora:?}");
    // Only the factors train: frozen weights report no gradient.
    assert_eq!(grads.len(), lora.len(), "frozen tensors have gradients");
    let ids = {
        let mut ids = std::collections::BTreeMap::new();
        student.for_each_param(&mut |name, p| {
            if let distill::lm::ParamRef::Plain2(p) = p {
                ids.insert(name.to_string(), p.id);
            }
        });
        ids
    };
    for name in lora {
        let g = &grads[&name];
        let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{name}: zero gradient");
        let eps = 1e-3 * loss0 / norm;
        let shifted = |sign: f64| {
            let delta = g
                .iter()
                .map(|&x| (sign * eps * x as f64 / norm) as f32)
                .collect();
            let m = student.clone().map(&mut AddTo {
                id: ids[&name],
                delta,
            });
            loss_of(&m).0
        };
        let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps);
        let noise = 16.0 * loss0 * f32::EPSILON as f64 / (2.0 * eps);
        assert!(
            (fd - norm).abs() < 0.02 * norm + noise,
            "{name}: directional derivative {fd:.6e} vs |grad| {norm:.6e}"
        );
    }
}

#[test]
fn hidden_state_loss_gradients_through_a_projection_match_finite_differences() {
    use burn::module::Module;
    // A narrower student (32 wide, 2 blocks) against the 64-wide, 3-block teacher.
    let dir = tempfile::tempdir().unwrap();
    let mut sc = tiny_config();
    sc["hidden_size"] = 32.into();
    sc["num_attention_heads"] = 2.into();
    sc["num_key_value_heads"] = 1.into();
    sc["num_hidden_layers"] = 2.into();
    let st = write_hf(&dir.path().join("s"), &sc, 3, |_, _| {});
    write_hf(&dir.path().join("t"), &tiny_config(), 4, |_, _| {});
    let scfg = Checkpoint::open(&dir.path().join("s"))
        .unwrap()
        .config()
        .clone();
    let tck = Checkpoint::open(&dir.path().join("t")).unwrap();
    let ad = Device::flex().autodiff();
    ad.seed(5);
    let w = windows(7, 300);
    let inputs: Vec<Vec<u32>> = w.iter().map(|x| x[..SEQ].to_vec()).collect();
    let tg: Vec<i64> = w
        .iter()
        .flat_map(|x| x[1..].iter().map(|&t| t as i64))
        .collect();
    let n = tg.len();
    let teacher = CausalLm::load(&tck, &ad).unwrap();
    let (t_logits, t_hidden) =
        teacher.logits_and_hidden(&inputs, &Rope::new(tck.config(), SEQ, &ad), &[1, 2]);
    let (t_logits, t_hidden): (Tensor<2>, Vec<Tensor<2>>) = (
        t_logits.detach(),
        t_hidden.into_iter().map(|h| h.detach()).collect(),
    );
    let student = model_from(&scfg, &st, &ad).with_projections(&[64, 64]);
    let rope = Rope::new(&scfg, SEQ, &ad);
    let spec = kd(Divergence::Fkl);
    let total = |m: &CausalLm| {
        let (logits, hs) = m.logits_and_hidden(&inputs, &rope, &[0, 1]);
        let targets = Tensor::<1, Int>::from_data(TensorData::new(tg.clone(), [n]), &ad);
        let parts = spec.compute(
            logits,
            Some(Teacher::Logits(t_logits.clone())),
            targets,
            None,
            1.0 / n as f64,
        );
        let h = distill::train::hidden_mse(m, hs, t_hidden.clone(), None, n);
        parts.total + h.mul_scalar(0.3 / n as f64)
    };
    let loss = total(&student);
    let loss0 = loss.clone().into_scalar::<f64>();
    let grads = GradientsParams::from_grads(loss.backward(), &student);
    let named = student.hf_grads(&grads);
    let mut ids = std::collections::BTreeMap::new();
    student.for_each_param(&mut |name, p| {
        let id = match p {
            distill::lm::ParamRef::Plain2(p) | distill::lm::ParamRef::Linear(p) => p.id,
            distill::lm::ParamRef::Vector(p) => p.id,
        };
        ids.insert(name.to_string(), id);
    });
    for name in [
        "distill.hidden_proj.0.weight",
        "distill.hidden_proj.1.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.input_layernorm.weight",
    ] {
        let g = &named[name];
        let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{name}: zero gradient");
        let eps = 1e-3 * loss0 / norm;
        // The mapper adds in stored layout; linear weights are stored [in, out] (HF transposed).
        let stored = |sign: f64| -> Vec<f32> {
            let hf: Vec<f32> = g
                .iter()
                .map(|&x| (sign * eps * x as f64 / norm) as f32)
                .collect();
            if name.ends_with("input_layernorm.weight") {
                return hf;
            }
            let (rows, cols) = if name.starts_with("distill") {
                (64, 32)
            } else {
                (256, 32)
            };
            model::transformer::transpose(&hf, rows, cols)
        };
        let at = |sign: f64| {
            let m = student.clone().map(&mut AddTo {
                id: ids[name],
                delta: stored(sign),
            });
            total(&m).into_scalar::<f64>()
        };
        let fd = (at(1.0) - at(-1.0)) / (2.0 * eps);
        let noise = 16.0 * loss0 * f32::EPSILON as f64 / (2.0 * eps);
        assert!(
            (fd - norm).abs() < 0.02 * norm + noise,
            "{name}: {fd:.6e} vs {norm:.6e}"
        );
    }
}
