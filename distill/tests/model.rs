//! The trainable whole model is the engine's model: same logits as the layer-by-layer
//! engine, and its tensors written back unchanged.

use burn::tensor::Device;
use distill::CausalLm;
use model::Checkpoint;
use model::testkit::{Rng, tiny_config, write_hf};
use model::transformer::Rope;

fn check(config: serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let written = write_hf(dir.path(), &config, 5, |_, _| {});
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let cfg = ckpt.config().clone();
    let mut rng = Rng(9);
    let windows: Vec<Vec<u32>> = (0..3)
        .map(|_| {
            (0..20)
                .map(|_| ((rng.next() + 1.0) * 0.5 * (cfg.vocab_size - 1) as f32) as u32)
                .collect()
        })
        .collect();
    let engine = model::testkit::logits(&ckpt, &windows);
    let device = Device::flex();
    let lm = CausalLm::load(&ckpt, &device).unwrap();
    let ours = distill::lm::values(lm.logits(&windows, &Rope::new(&cfg, 20, &device)));
    let flat: Vec<f32> = engine.into_iter().flatten().collect();
    assert_eq!(ours.len(), flat.len());
    let worst = ours
        .iter()
        .zip(&flat)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst < 1e-4, "logits differ from the engine's by {worst}");
    // Written back: every tensor of the checkpoint, bit for bit (no tied lm_head invented).
    let back = lm.hf_tensors();
    let expected: Vec<String> = ckpt
        .expected_tensors()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        back.keys().cloned().collect::<Vec<_>>().len(),
        expected.len()
    );
    for name in expected {
        assert_eq!(
            back[&name], written[&name],
            "{name} changed on the way through"
        );
    }
}

#[test]
fn logits_and_tensors_match_the_engine_untied_llama() {
    check(tiny_config());
}

#[test]
fn logits_and_tensors_match_the_engine_tied_qwen2() {
    let mut c = tiny_config();
    c["model_type"] = "qwen2".into();
    c["tie_word_embeddings"] = true.into();
    check(c);
}
