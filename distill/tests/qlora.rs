//! QLoRA on a tiny synthetic model: the decoder linears are held in NF4 (their f32 weights
//! dropped), the 4-bit base stays bit for bit the same through training while the adapters
//! move, the bytes it holds are the NF4 size (4 bits plus the absmax overhead), a block that
//! does not divide a width is refused, and a restored run ends where the uninterrupted one does.

use burn::tensor::Device;
use distill::qlora::Nf4Base;
use distill::{AdamWOptions, CausalLm, LoraOptions, LoraTarget, LossSpec, MicroBatch, Trainer};
use model::Checkpoint;
use model::testkit::{Rng, tiny_config, write_hf};
use quant::nf4::{BnbScheme, BnbType};

const SEQ: usize = 16;

/// The adapters' factors come from the device's one seeded generator: tests that draw them
/// run one at a time, so that a seeded run draws the same factors whatever runs beside it.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn lora(targets: Vec<LoraTarget>) -> LoraOptions {
    LoraOptions {
        rank: 4,
        alpha: 8.0,
        targets,
    }
}

fn nf4(block: usize, double_quant: bool) -> BnbScheme {
    BnbScheme::new(BnbType::Nf4, Some(block), double_quant).unwrap()
}

fn batches(step: usize) -> Vec<MicroBatch> {
    let mut rng = Rng(700 + step as u64);
    let w = (0..2)
        .map(|_| {
            (0..=SEQ)
                .map(|_| ((rng.next() + 1.0) * 149.0) as u32)
                .collect()
        })
        .collect();
    vec![MicroBatch::plain(w)]
}

#[test]
fn the_4bit_base_stays_fixed_while_the_adapters_train() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("s"), &tiny_config(), 1, |_, _| {});
    let ckpt = Checkpoint::open(&dir.path().join("s")).unwrap();
    let plain = Device::flex();
    plain.seed(3);
    let ad = plain.autodiff();
    let opts = lora(vec![LoraTarget::QProj, LoraTarget::DownProj]);
    let s = CausalLm::load(&ckpt, &ad)
        .unwrap()
        .with_4bit_lora(&opts, &nf4(64, true))
        .unwrap();
    // Every decoder linear is held in NF4 with a placeholder for its f32 weight; adapters
    // only on the targets.
    for layer in &s.layers {
        let (a, m) = (&layer.self_attn, &layer.mlp);
        for (lin, targeted) in [
            (&a.q_proj, true),
            (&a.k_proj, false),
            (&a.v_proj, false),
            (&a.o_proj, false),
            (&m.gate_proj, false),
            (&m.up_proj, false),
            (&m.down_proj, true),
        ] {
            let r = lin.weight.reparameterization::<Nf4Base>().unwrap();
            assert_eq!(r.lora.is_some(), targeted);
            assert_eq!(lin.weight.base().dims(), [1, 1], "the f32 weight is kept");
        }
    }
    let base0 = s.base_4bit_weights();
    let all0 = s.hf_tensors();
    let trained0 = s.trainable();
    // Only the adapters train: 2 targets x 3 layers x (A, B).
    assert_eq!(trained0.len(), 12, "{:?}", trained0.keys());
    let spec = LossSpec {
        divergence: None,
        temperature: 1.0,
        kd_weight: 0.0,
        ce_weight: 1.0,
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
    for step in 0..3 {
        tr.step(&batches(step), 1e-3, &mut |_, _| None).unwrap();
    }
    let s = tr.into_student();
    let base1 = s.base_4bit_weights();
    assert_eq!(base0.len(), 7 * 3);
    assert!(base0 == base1, "the 4-bit base changed during training");
    let trained1 = s.trainable();
    for (name, (_, v0)) in &trained0 {
        let v1 = &trained1[name].1;
        assert!(v0 != v1, "adapter {name} did not train");
    }
    // The effective weights moved exactly where there are adapters; every other tensor
    // (embedding, norms, lm_head, the other linears) is as it was.
    let all1 = s.hf_tensors();
    for (name, v0) in &all0 {
        let moved = all1[name] != *v0;
        let adapted = name.contains("q_proj") || name.contains("down_proj");
        assert_eq!(moved, adapted, "{name}: moved {moved}");
    }
}

#[test]
fn the_resident_base_is_the_4bit_size() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("s"), &tiny_config(), 1, |_, _| {});
    let ckpt = Checkpoint::open(&dir.path().join("s")).unwrap();
    let dev = Device::flex();
    let opts = lora(vec![LoraTarget::QProj, LoraTarget::VProj]);
    let load = |scheme: &BnbScheme| {
        CausalLm::load(&ckpt, &dev)
            .unwrap()
            .with_4bit_lora(&opts, scheme)
            .unwrap()
            .base_4bit_bytes()
    };
    // Per layer: q, o 64x64; k, v 32x64; gate, up, down 64x256.
    let params = 3 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 256) as u64;
    let plain = load(&nf4(64, false));
    assert_eq!(plain.linears, 21);
    assert_eq!(plain.params, params);
    assert_eq!(plain.f32_bytes, 4 * params);
    // 4-bit codes and one f32 absmax per 64 values: 4.5 bits of 32 exactly.
    let ratio = plain.resident_bytes as f64 / plain.f32_bytes as f64;
    assert!((ratio - 4.5 / 32.0).abs() < 1e-12, "{ratio}");
    // Double quantization: one byte per block, one f32 per 256 blocks and an offset per
    // tensor; the bits agree with the quant report's count, tensor by tensor.
    let scheme = nf4(64, true);
    let dq = load(&scheme);
    let shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (256, 64), (256, 64)];
    let bits: f64 = (shapes.iter().copied().chain([(64, 256)]))
        .map(|(r, c)| scheme.bits_per_weight(r, c) * (r * c) as f64)
        .sum::<f64>()
        * 3.0;
    assert!((8.0 * dq.resident_bytes as f64 - bits).abs() < 1e-6);
    let bpw = dq.bits_per_weight();
    assert!(bpw > 4.125 && bpw < 4.2, "{bpw}");
}

#[test]
fn a_block_that_does_not_divide_a_width_is_refused() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("s"), &tiny_config(), 1, |_, _| {});
    let ckpt = Checkpoint::open(&dir.path().join("s")).unwrap();
    let m = CausalLm::load(&ckpt, &Device::flex()).unwrap();
    let e = m
        .with_4bit_lora(&lora(vec![LoraTarget::QProj]), &nf4(128, false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("q_proj") && e.contains("128"), "{e}");
}

/// Trains a QLoRA student with CE for steps `from..to`, restored from `restore` and saved
/// to `save` when given.
fn train(
    dir: &std::path::Path,
    (from, to): (usize, usize),
    restore: Option<&std::path::Path>,
    save: Option<&std::path::Path>,
) -> CausalLm {
    let ckpt = Checkpoint::open(&dir.join("s")).unwrap();
    let plain = Device::flex();
    plain.seed(5);
    let ad = plain.autodiff();
    let s = CausalLm::load(&ckpt, &ad)
        .unwrap()
        .with_4bit_lora(&lora(vec![LoraTarget::VProj]), &nf4(32, true))
        .unwrap();
    let spec = LossSpec {
        divergence: None,
        temperature: 1.0,
        kd_weight: 0.0,
        ce_weight: 1.0,
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
    for step in from..to {
        tr.step(&batches(step), 1e-3, &mut |_, _| None).unwrap();
    }
    if let Some(p) = save {
        tr.save(p).unwrap();
    }
    tr.into_student()
}

#[test]
fn a_restored_qlora_run_ends_with_the_uninterrupted_weights() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("s"), &tiny_config(), 1, |_, _| {});
    let whole = train(dir.path(), (0, 4), None, None).hf_tensors();
    let state = dir.path().join("state");
    train(dir.path(), (0, 2), None, Some(&state));
    let resumed = train(dir.path(), (2, 4), Some(&state), None).hf_tensors();
    assert!(resumed == whole, "the resumed QLoRA run ended elsewhere");
}

/// Squared distance between two weight sets over the names in `names`.
fn dist2(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
    names: &[String],
) -> f64 {
    names
        .iter()
        .map(|n| {
            a[n].iter()
                .zip(&b[n])
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>()
        })
        .sum()
}

#[test]
fn loftq_starts_closer_to_the_student_than_the_4bit_base() {
    use distill::loftq::LoraInit;
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("s"), &tiny_config(), 1, |_, _| {});
    let ckpt = Checkpoint::open(&dir.path().join("s")).unwrap();
    let plain = Device::flex();
    plain.seed(5);
    let all = vec![
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];
    let student = CausalLm::load(&ckpt, &plain).unwrap();
    let dense = student.hf_tensors();
    let start = |init| {
        CausalLm::load(&ckpt, &plain)
            .unwrap()
            .with_4bit_lora_init(&lora(all.clone()), &nf4(32, false), init)
            .unwrap()
    };
    let gauss = start(LoraInit::Gaussian);
    let names: Vec<String> = gauss
        .base_4bit_weights()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.len(), 7 * student.layers.len());
    let e_base = dist2(&gauss.hf_tensors(), &dense, &names);
    let one = start(LoraInit::Loftq { iters: 1 });
    // One iteration keeps the student's own 4-bit rounding as the base...
    assert_eq!(one.base_4bit_weights(), gauss.base_4bit_weights());
    // ...and the adapters take away part of its error; more iterations are no worse here.
    let e_one = dist2(&one.hf_tensors(), &dense, &names);
    assert!(
        e_one < 0.95 * e_base,
        "LoftQ {e_one} against the base's {e_base}"
    );
    let three = start(LoraInit::Loftq { iters: 3 });
    let e_three = dist2(&three.hf_tensors(), &dense, &names);
    assert!(
        e_three < e_base,
        "LoftQ x3 {e_three} against the base's {e_base}"
    );
    assert!(
        CausalLm::load(&ckpt, &plain)
            .unwrap()
            .with_4bit_lora_init(&lora(all), &nf4(32, false), LoraInit::Loftq { iters: 0 })
            .is_err()
    );
}
