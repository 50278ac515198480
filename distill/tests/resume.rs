//! A run saved after some steps and restored into a fresh trainer ends with exactly the
//! weights of the uninterrupted run (full training and LoRA).

use burn::tensor::Device;
use distill::{
    AdamWOptions, CausalLm, Divergence, LoraOptions, LoraTarget, LossSpec, MicroBatch, Teacher,
    Trainer,
};
use model::Checkpoint;
use model::testkit::{Rng, tiny_config, write_hf};
use model::transformer::Rope;

const SEQ: usize = 16;

fn batches(step: usize) -> Vec<MicroBatch> {
    let mut rng = Rng(100 + step as u64);
    (0..2)
        .map(|_| {
            MicroBatch::plain(vec![
                (0..=SEQ)
                    .map(|_| ((rng.next() + 1.0) * 149.0) as u32)
                    .collect(),
            ])
        })
        .collect()
}

fn spec() -> LossSpec {
    LossSpec {
        divergence: Some(Divergence::Fkl),
        temperature: 1.0,
        kd_weight: 1.0,
        ce_weight: 0.1,
    }
}

/// Trains `steps` from `from` (restored from `state` when given), saving at the end to
/// `save`; returns the final HF tensors.
fn run(
    dir: &std::path::Path,
    lora: Option<&LoraOptions>,
    from: usize,
    to: usize,
    restore: Option<&std::path::Path>,
    save: Option<&std::path::Path>,
) -> Vec<f32> {
    let ckpt = Checkpoint::open(&dir.join("student")).unwrap();
    let tck = Checkpoint::open(&dir.join("teacher")).unwrap();
    let plain = Device::flex();
    plain.seed(1);
    let ad = plain.clone().autodiff();
    let teacher = CausalLm::load(&tck, &plain).unwrap();
    let rope = Rope::new(tck.config(), SEQ, &plain);
    let mut student = CausalLm::load(&ckpt, &ad).unwrap();
    if let Some(l) = lora {
        student = student.with_lora(l);
    }
    let mut tr = Trainer::new(
        student,
        ckpt.config(),
        SEQ,
        AdamWOptions {
            weight_decay: 0.01,
            ..Default::default()
        },
        spec(),
        Some(1.0),
        &ad,
    );
    if let Some(r) = restore {
        tr.restore(r).unwrap();
        assert_eq!(tr.steps(), from);
    }
    for s in from..to {
        tr.step(&batches(s), 1e-2 / (1 + s) as f64, &mut |_, w| {
            Some(Teacher::Logits(teacher.logits(w, &rope)).into())
        })
        .unwrap();
    }
    if let Some(p) = save {
        tr.save(p).unwrap();
    }
    tr.into_student()
        .merged()
        .hf_tensors()
        .into_values()
        .flatten()
        .collect()
}

fn check(lora: Option<LoraOptions>) {
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("student"), &tiny_config(), 1, |_, _| {});
    write_hf(&dir.path().join("teacher"), &tiny_config(), 2, |_, _| {});
    let start: Vec<f32> = CausalLm::load(
        &Checkpoint::open(&dir.path().join("student")).unwrap(),
        &Device::flex(),
    )
    .unwrap()
    .hf_tensors()
    .into_values()
    .flatten()
    .collect();
    let whole = run(dir.path(), lora.as_ref(), 0, 6, None, None);
    assert!(whole != start, "training changed nothing");
    let state = dir.path().join("state");
    let first = run(dir.path(), lora.as_ref(), 0, 3, None, Some(&state));
    assert!(first != whole);
    let resumed = run(dir.path(), lora.as_ref(), 3, 6, Some(&state), None);
    assert!(resumed == whole, "the resumed run ended elsewhere");
    // Without the optimizer state, the same weights and steps end elsewhere (AdamW's moments
    // matter): the restore really carries them.
    std::fs::copy(
        dir.path().join("state/optimizer.bpk"),
        dir.path().join("opt.bak"),
    )
    .unwrap();
    let fresh = dir.path().join("fresh");
    run(dir.path(), lora.as_ref(), 0, 0, None, Some(&fresh));
    std::fs::copy(fresh.join("optimizer.bpk"), state.join("optimizer.bpk")).unwrap();
    let no_moments = run(dir.path(), lora.as_ref(), 3, 6, Some(&state), None);
    assert!(no_moments != whole);
}

#[test]
fn a_restored_full_run_ends_with_the_uninterrupted_weights() {
    check(None);
}

#[test]
fn a_restored_lora_run_ends_with_the_uninterrupted_weights() {
    check(Some(LoraOptions {
        rank: 2,
        alpha: 4.0,
        targets: vec![LoraTarget::QProj, LoraTarget::UpProj],
    }));
}

#[test]
fn stable_ids_are_distinct_and_repeat_across_loads() {
    struct Ids(Vec<u64>);
    impl burn::module::ModuleVisitor for Ids {
        fn visit_float<const D: usize>(
            &mut self,
            p: &burn::module::Param<burn::tensor::Tensor<D>>,
        ) {
            self.0.push(p.id.val());
        }
    }
    use burn::module::Module;
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &tiny_config(), 1, |_, _| {});
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let lora = LoraOptions {
        rank: 2,
        alpha: 4.0,
        targets: vec![LoraTarget::QProj, LoraTarget::VProj, LoraTarget::DownProj],
    };
    let ids = || {
        let m = CausalLm::load(&ckpt, &Device::flex())
            .unwrap()
            .with_lora(&lora)
            .with_stable_ids();
        let mut v = Ids(Vec::new());
        m.visit(&mut v);
        v.0
    };
    let (a, b) = (ids(), ids());
    // 3 layers x (9 tensors + 3 adapters x 2 factors) + embedding, norm, lm_head.
    assert_eq!(a.len(), 3 * (9 + 6) + 3);
    let mut d = a.clone();
    d.sort();
    d.dedup();
    assert_eq!(d.len(), a.len(), "two parameters share an id");
    assert_eq!(a, b, "ids differ between two loads");
}

/// A step whose loss is not finite is refused, names its step and leaves the trainer as it
/// was: a student diverged by an absurd learning rate fails at step 2 with step 1's weights
/// and counters intact. (A student file holding a NaN is refused when it is loaded.)
#[test]
fn a_non_finite_loss_stops_the_step_and_keeps_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    write_hf(&dir.path().join("student"), &tiny_config(), 5, |_, _| {});
    let ad = Device::flex().autodiff();
    let trainer = |name: &str| {
        let ckpt = Checkpoint::open(&dir.path().join(name)).unwrap();
        let student = CausalLm::load(&ckpt, &ad).unwrap();
        let ce = LossSpec {
            divergence: None,
            temperature: 1.0,
            kd_weight: 0.0,
            ce_weight: 1.0,
        };
        Trainer::new(
            student,
            ckpt.config(),
            SEQ,
            AdamWOptions::default(),
            ce,
            None,
            &ad,
        )
    };
    let mut tr = trainer("student");
    tr.step(&batches(0), 1e30, &mut |_, _| None).unwrap();
    let after1 = tr.student().hf_tensors();
    let e = tr.step(&batches(1), 1e30, &mut |_, _| None).unwrap_err();
    assert!(
        matches!(e, distill::DistillError::NonFinite { step: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().starts_with("step 2: the "), "{e}");
    assert_eq!(tr.steps(), 1);
    assert!(
        tr.student().hf_tensors() == after1,
        "the failed step moved the weights"
    );
}
