//! Quantization-aware training on a tiny synthetic model: at step 0 the fake-quantized
//! weights are PTQ's RTN weights bit for bit; the straight-through gradient is 1 inside the
//! clipping range and 0 outside it, and the scales' LSQ gradient is as documented; learned
//! scales move and frozen ones do not; a restored run ends where the uninterrupted one does.

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};
use distill::lm::values;
use distill::qat::fake_quant;
use distill::{
    AdamWOptions, CausalLm, LossSpec, MicroBatch, QatInit, QatOptions, Teacher, Trainer,
};
use model::testkit::{Rng, tiny_config, write_hf};
use model::transformer::Rope;
use model::{Checkpoint, Config};
use quant::scheme::{GroupParams, QuantScheme, quantize_rtn};

const SEQ: usize = 16;

fn opts(bits: u8, group: Option<usize>, sym: bool, learn_scales: bool) -> QatOptions {
    QatOptions {
        scheme: QuantScheme::new(bits, group, sym).unwrap(),
        init: QatInit::Rtn,
        learn_scales,
    }
}

fn is_linear(name: &str) -> bool {
    quant::block::LINEARS
        .iter()
        .any(|(l, _)| name.ends_with(&format!("{l}.weight")))
}

/// The student's tensors and config, from a tiny synthetic HF folder.
fn student(dir: &std::path::Path) -> (Config, BTreeMap<String, Vec<f32>>) {
    let t = write_hf(&dir.join("student"), &tiny_config(), 1, |_, _| {});
    let cfg = Checkpoint::open(&dir.join("student"))
        .unwrap()
        .config()
        .clone();
    (cfg, t)
}

#[test]
fn at_step_0_the_fake_quant_weights_are_the_rtn_weights_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, orig) = student(dir.path());
    let ad = Device::flex().autodiff();
    // Groups that divide the widths (16), one that leaves a shorter last group (48: 64 =
    // 48 + 16, 256 = 5 x 48 + 16), per channel; both symmetries; 3 and 4 bits.
    for o in [
        opts(4, Some(16), false, false),
        opts(3, Some(48), false, true),
        opts(4, Some(16), true, false),
        opts(2, None, true, true),
    ] {
        let m = CausalLm::from_fn(&cfg, |n, _| Ok(orig[n].clone()), &ad).unwrap();
        let m = m.with_fake_quant(&o).unwrap();
        let now = m.hf_tensors();
        let grids = m.quantized_linears(&o.scheme);
        let mut linears = 0;
        for (name, w) in &orig {
            if !is_linear(name) {
                assert!(
                    now[name] == *w,
                    "{name} is not a decoder linear but changed"
                );
                continue;
            }
            linears += 1;
            let (rows, cols) = (
                grids[name].rows,
                w.len() / grids[name].rows, // HF [out, in]
            );
            let rtn = quantize_rtn(&o.scheme, name, w, rows, cols).unwrap();
            let deq = rtn.dequantize();
            let same = now[name]
                .iter()
                .zip(&deq)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{} {name}: forward weights differ from RTN's",
                o.scheme.label()
            );
            assert_eq!(grids[name].codes, rtn.codes, "{name}: codes");
            assert_eq!(grids[name].params, rtn.params, "{name}: scales and zeros");
            assert!(grids[name].dequantize() == deq, "{name}: integer form");
        }
        assert_eq!(linears, 7 * cfg.num_hidden_layers);
    }
}

/// `w` `[4, 3]` (burn layout: 4 inputs in 2 groups of 2, 3 outputs) with scale 0.1 or 0.25
/// (per group and output) and zero point 8 at 4 bits: codes below 0 and above 15 before
/// clipping, and exact ties.
fn hand_case() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let w = vec![
        -2.5, -0.8, 0.125, // code -2 (clipped), 0 (the edge), 9 (the tie 0.5 rounded away)
        0.3, 0.75, 1.5, // 9, 15 or 16 (7.5 in f32), 14
        -0.375, 2.0, 0.62, // 6 (the tie -1.5 rounded away), 28 (clipped), 14
        0.0, -3.0, 0.7, // 8, -22 (clipped), 15
    ];
    let scale = vec![0.25, 0.1, 0.25, 0.25, 0.1, 0.1];
    let zero = vec![8.0; 6];
    (w, scale, zero)
}

#[test]
fn the_ste_passes_the_gradient_inside_the_clipping_range_and_stops_it_outside() {
    let ad = Device::flex().autodiff();
    let (w, scale, zero) = hand_case();
    let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [4, 3]), &ad).require_grad();
    let st = Tensor::<2>::from_data(TensorData::new(scale.clone(), [2, 3]), &ad).require_grad();
    let zt = Tensor::<2>::from_data(TensorData::new(zero.clone(), [2, 3]), &ad);
    let out = fake_quant(wt.clone(), st.clone(), zt, 2, 15.0, 1e-6);
    let value = values(out.clone());
    let grads = out.sum().backward();
    let gw = values(wt.grad(&grads).unwrap());
    let gs = values(st.grad(&grads).unwrap());
    let scheme = QuantScheme::new(4, Some(2), true).unwrap();
    let (mut inside_n, mut outside_n) = (0, 0);
    let mut expect_gs = [0f64; 6];
    for r in 0..4 {
        for c in 0..3 {
            let i = r * 3 + c;
            let k = (r / 2) * 3 + c;
            let p = GroupParams {
                scale: scale[k],
                zero: 8,
            };
            // The value is PTQ's, ties rounded away from zero as f32::round does.
            let fake = scheme.fake(w[i], p);
            assert_eq!(value[i].to_bits(), fake.to_bits(), "w[{i}] = {}", w[i]);
            let v = (w[i] / p.scale).round() as i32 + 8;
            let inside = (0..=15).contains(&v);
            if inside {
                inside_n += 1;
                assert!((gw[i] - 1.0).abs() < 1e-6, "w[{i}] inside: grad {}", gw[i]);
                expect_gs[k] += (v - 8) as f64 - (w[i] / p.scale) as f64;
            } else {
                outside_n += 1;
                assert_eq!(gw[i], 0.0, "w[{i}] clipped: grad {}", gw[i]);
                expect_gs[k] += (v.clamp(0, 15) - 8) as f64;
            }
        }
    }
    assert!(
        inside_n >= 6 && outside_n >= 3,
        "{inside_n} inside, {outside_n} outside"
    );
    // LSQ: d w_hat / d s = round(w/s) - w/s inside, the clipped code minus z outside.
    for (k, (g, e)) in gs.iter().zip(expect_gs).enumerate() {
        assert!((*g as f64 - e).abs() < 1e-4, "scale {k}: grad {g} vs {e}");
    }
}

fn batches(step: usize) -> Vec<MicroBatch> {
    let mut rng = Rng(300 + step as u64);
    let w = (0..2)
        .map(|_| {
            (0..=SEQ)
                .map(|_| ((rng.next() + 1.0) * 149.0) as u32)
                .collect()
        })
        .collect();
    vec![MicroBatch::plain(w)]
}

/// Trains a QAT student with KD for steps `from..to` (restored from `restore`, saved to
/// `save`); returns the trained model.
fn train(
    dir: &std::path::Path,
    o: &QatOptions,
    (from, to): (usize, usize),
    restore: Option<&std::path::Path>,
    save: Option<&std::path::Path>,
) -> CausalLm {
    let ckpt = Checkpoint::open(&dir.join("student")).unwrap();
    let plain = Device::flex();
    plain.seed(1);
    let ad = plain.clone().autodiff();
    let teacher = CausalLm::load(&Checkpoint::open(&dir.join("teacher")).unwrap(), &plain).unwrap();
    let rope = Rope::new(ckpt.config(), SEQ, &plain);
    let s = CausalLm::load(&ckpt, &ad)
        .unwrap()
        .with_fake_quant(o)
        .unwrap();
    let spec = LossSpec {
        divergence: Some(distill::Divergence::Fkl),
        temperature: 1.0,
        kd_weight: 1.0,
        ce_weight: 0.0,
    };
    let mut tr = Trainer::new(
        s,
        ckpt.config(),
        SEQ,
        AdamWOptions::default(),
        spec,
        Some(1.0),
        &ad,
    );
    if let Some(r) = restore {
        tr.restore(r).unwrap();
    }
    for s in from..to {
        tr.step(&batches(s), 1e-3, &mut |_, w| {
            Some(Teacher::Logits(teacher.logits(w, &rope)).into())
        })
        .unwrap();
    }
    if let Some(p) = save {
        tr.save(p).unwrap();
    }
    tr.into_student()
}

#[test]
fn learned_scales_move_and_frozen_scales_do_not() {
    let dir = tempfile::tempdir().unwrap();
    student(dir.path());
    write_hf(&dir.path().join("teacher"), &tiny_config(), 2, |_, _| {});
    for learn in [false, true] {
        let o = opts(3, Some(16), false, learn);
        let before = train(dir.path(), &o, (0, 0), None, None);
        let after = train(dir.path(), &o, (0, 2), None, None);
        let (g0, g1) = (
            before.quantized_linears(&o.scheme),
            after.quantized_linears(&o.scheme),
        );
        let (mut moved, mut total) = (0, 0);
        for (name, q0) in &g0 {
            let q1 = &g1[name];
            for (p0, p1) in q0.params.iter().zip(&q1.params) {
                assert_eq!(p0.zero, p1.zero, "{name}: zero points are frozen");
                total += 1;
                moved += usize::from(p0.scale != p1.scale);
            }
        }
        let scales = after
            .trainable()
            .keys()
            .filter(|k| k.contains("fake_quant"))
            .count();
        if learn {
            assert!(
                moved > total / 2,
                "learned scales: {moved} of {total} moved"
            );
            assert_eq!(scales, g0.len(), "one trained scale tensor per linear");
        } else {
            assert_eq!(moved, 0, "frozen scales: {moved} of {total} moved");
            assert_eq!(scales, 0, "frozen scales are not trained");
        }
        // The latent weights train either way, and the written weights stay on the grid.
        let (w0, w1) = (before.hf_tensors(), after.hf_tensors());
        let name = "model.layers.0.mlp.down_proj.weight";
        assert!(w0[name] != w1[name], "{name} did not train");
        let d = g1[name].dequantize();
        let bad: Vec<(usize, f32, f32)> = d
            .iter()
            .zip(&w1[name])
            .enumerate()
            .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
            .map(|(i, (a, b))| (i, *a, *b))
            .take(5)
            .collect();
        assert!(
            bad.is_empty(),
            "learn {learn}: {name} is off its grid: {bad:?}"
        );
    }
}

#[test]
fn a_restored_qat_run_ends_with_the_uninterrupted_weights() {
    let dir = tempfile::tempdir().unwrap();
    student(dir.path());
    write_hf(&dir.path().join("teacher"), &tiny_config(), 2, |_, _| {});
    let o = opts(4, Some(32), true, true);
    let whole = train(dir.path(), &o, (0, 4), None, None).hf_tensors();
    let state = dir.path().join("state");
    train(dir.path(), &o, (0, 2), None, Some(&state));
    let resumed = train(dir.path(), &o, (2, 4), Some(&state), None).hf_tensors();
    assert!(resumed == whole, "the resumed QAT run ended elsewhere");
}

/// Given PTQ parameters are used instead of RTN's, and whose dequantized weights the student
/// holds come back unchanged from the forward weights; a PTQ result with a missing linear or
/// activation-order groups is refused.
#[test]
fn fake_quant_from_given_params_keeps_them_and_reproduces_their_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, orig) = student(dir.path());
    let ad = Device::flex().autodiff();
    let o = opts(4, Some(16), false, false);
    // A grid RTN would not choose: RTN's scales stretched by 1.25, codes re-rounded on it.
    let mut given = BTreeMap::new();
    let mut start = orig.clone();
    let scheme = o.scheme;
    let m0 = CausalLm::from_fn(&cfg, |n, _| Ok(orig[n].clone()), &ad).unwrap();
    let rtn = m0.with_fake_quant(&o).unwrap().quantized_linears(&scheme);
    for (name, q) in &rtn {
        let mut q = q.clone();
        for p in q.params.iter_mut() {
            p.scale *= 1.25;
        }
        let src = &orig[name];
        q.codes = (0..q.rows * q.cols)
            .map(|i| {
                let p = q.params[(i / q.cols) * q.groups + q.g_idx[i % q.cols] as usize];
                scheme.code(src[i], p)
            })
            .collect();
        start.insert(name.clone(), q.dequantize());
        given.insert(name.clone(), q);
    }
    let m = CausalLm::from_fn(&cfg, |n, _| Ok(start[n].clone()), &ad).unwrap();
    let m = m.with_fake_quant_from(&o, &given).unwrap();
    let now = m.hf_tensors();
    let back = m.quantized_linears(&scheme);
    for (name, q) in &given {
        assert_eq!(
            now[name], start[name],
            "{name}: forward weights moved at step 0"
        );
        let scales = |x: &quant::scheme::QuantizedLinear| -> Vec<f32> {
            x.params.iter().map(|p| p.scale).collect()
        };
        assert_eq!(
            scales(&back[name]),
            scales(q),
            "{name}: not the given scales"
        );
        assert_ne!(scales(&rtn[name]), scales(q));
    }

    let name = given.keys().next().unwrap().clone();
    let mut missing = given.clone();
    missing.remove(&name);
    let m = CausalLm::from_fn(&cfg, |n, _| Ok(start[n].clone()), &ad).unwrap();
    let e = m
        .with_fake_quant_from(&o, &missing)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&name), "{e}");
    let mut act = given.clone();
    act.get_mut(&name).unwrap().g_idx.reverse();
    let m = CausalLm::from_fn(&cfg, |n, _| Ok(start[n].clone()), &ad).unwrap();
    let e = m.with_fake_quant_from(&o, &act).err().unwrap().to_string();
    assert!(e.contains("activation order"), "{e}");
}
