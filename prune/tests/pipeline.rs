//! Pruning a tiny synthetic llama end to end through the block driver: the written file has
//! exactly the asked sparsity per linear (and the N:M pattern), the untouched tensors are
//! copied, SparseGPT's reconstruction and Wanda's activation scores beat magnitude on the
//! model's output, and OWL's block sparsities average to the target.

use std::path::Path;

use model::Checkpoint;
use model::testkit::{calib_text, logits, mean_kld, tiny_config, write_hf};
use prune::Pattern;
use prune::mask::{satisfies_nm, sparsity_of};
use prune::method::{Method, MethodOptions};
use prune::owl::Owl;
use prune::pipeline::{PruneOptions, prune};
use quant::pipeline::{DenseSink, OutputSink};

/// The linears of a block, by HF suffix.
fn linears() -> [&'static str; 7] {
    quant::block::LINEARS.map(|(n, _)| n)
}

fn teacher(dir: &Path) -> Checkpoint {
    // Uneven input channels (a few large embedding columns), as real activations have.
    write_hf(dir, &tiny_config(), 7, |name, data| {
        if name == "model.embed_tokens.weight" {
            for (i, v) in data.iter_mut().enumerate() {
                if i % 64 < 4 {
                    *v *= 20.0;
                }
            }
        }
    });
    Checkpoint::open(dir).unwrap()
}

fn windows(ckpt: &Checkpoint, n: usize, seed: u64) -> Vec<Vec<u32>> {
    let tok = model::load_tokenizer(ckpt).unwrap();
    let ids = tok.encode(&calib_text(4000)).unwrap();
    quant::calib::sample_windows(&ids, &tok, n, 64, seed, Path::new("calib")).unwrap()
}

fn run(ckpt: &Checkpoint, out: &Path, method: Method, opts: &PruneOptions) -> Checkpoint {
    std::fs::create_dir_all(out).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(ckpt.path().join(f), out.join(f)).unwrap();
    }
    let mut sinks: Vec<Box<dyn OutputSink>> = vec![Box::new(
        DenseSink::create(
            &out.join("model.safetensors"),
            ckpt.config(),
            model::safetensors_io::StoreDtype::BF16,
        )
        .unwrap(),
    )];
    let m = method.build(&MethodOptions::default());
    let report = prune(
        ckpt,
        m.as_ref(),
        opts,
        model::default_device(),
        &mut sinks,
        |_, _| {},
    )
    .unwrap();
    for s in sinks {
        s.finish().unwrap();
    }
    assert_eq!(report.linears.len(), 7 * ckpt.config().num_hidden_layers);
    Checkpoint::open(out).unwrap()
}

fn linear(ck: &Checkpoint, l: usize, name: &str) -> (Vec<f32>, usize) {
    let meta = ck
        .tensors()
        .into_iter()
        .find(|t| t.name == format!("model.layers.{l}.{name}.weight"))
        .unwrap();
    let shape: Vec<usize> = meta.shape.to_vec();
    (ck.read(&meta.name, &shape).unwrap(), shape[1])
}

#[test]
fn methods_reach_the_pattern_and_keep_the_papers_ordering() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher(&dir.path().join("teacher"));
    let calib = windows(&t, 16, 0);
    let held_out = windows(&t, 4, 99);
    let reference = logits(&t, &held_out);
    let vocab = t.config().vocab_size;
    for pattern in [
        Pattern::Unstructured { sparsity: 0.5 },
        Pattern::NofM { n: 2, m: 4 },
    ] {
        let mut kld = Vec::new();
        for method in [Method::Magnitude, Method::Wanda, Method::Sparsegpt] {
            let opts = PruneOptions {
                refit: 0,
                true_sequential: true,
                pattern,
                calib: if method == Method::Magnitude {
                    Vec::new()
                } else {
                    calib.clone()
                },
                block_sparsity: None,
                sample_rows: 64,
            };
            let out = dir
                .path()
                .join(format!("{method:?}-{}", pattern.label().replace(':', "-")));
            let s = run(&t, &out, method, &opts);
            for l in 0..3 {
                for name in linears() {
                    let (w, cols) = linear(&s, l, name);
                    let sp = sparsity_of(&w);
                    assert!((sp - 0.5).abs() < 1e-3, "{method:?} {name}: {sp}");
                    if let Pattern::NofM { n, m } = pattern {
                        assert!(satisfies_nm(&w, cols, n, m), "{method:?} {name}");
                    }
                }
            }
            // Tensors that are not pruned are copied (bf16 of the teacher's values).
            let norm = s
                .read("model.layers.1.input_layernorm.weight", &[64])
                .unwrap();
            let tn = t
                .read("model.layers.1.input_layernorm.weight", &[64])
                .unwrap();
            assert!(
                norm.iter()
                    .zip(&tn)
                    .all(|(a, b)| (a - b).abs() <= 1e-2 * b.abs())
            );
            kld.push(mean_kld(&reference, &logits(&s, &held_out), vocab));
        }
        let (mag, wanda, sgpt) = (kld[0], kld[1], kld[2]);
        assert!(wanda < mag, "{pattern:?}: wanda {wanda} vs magnitude {mag}");
        assert!(
            sgpt < 0.8 * mag,
            "{pattern:?}: sparsegpt {sgpt} vs magnitude {mag}"
        );
    }
}

#[test]
fn owl_sparsities_apply_per_block_and_average_to_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher(&dir.path().join("teacher"));
    let calib = windows(&t, 8, 0);
    let owl = Owl::new(0.08, 5.0).unwrap();
    let ratios =
        prune::owl::outlier_ratios(&t, &calib, &owl, model::default_device(), |_, _| {}).unwrap();
    assert_eq!(ratios.len(), 3);
    let per_block = owl.sparsities(&ratios, 0.5);
    let mean = per_block.iter().sum::<f64>() / 3.0;
    assert!((mean - 0.5).abs() < 1e-9);
    let opts = PruneOptions {
        refit: 0,
        true_sequential: true,
        pattern: Pattern::Unstructured { sparsity: 0.5 },
        calib,
        block_sparsity: Some(per_block.clone()),
        sample_rows: 0,
    };
    let s = run(&t, &dir.path().join("owl"), Method::Wanda, &opts);
    let mut zeros = 0;
    let mut total = 0;
    for (l, want) in per_block.iter().enumerate() {
        for name in linears() {
            let (w, _) = linear(&s, l, name);
            assert!((sparsity_of(&w) - want).abs() < 2e-2, "block {l} {name}");
            zeros += w.iter().filter(|&&x| x == 0.0).count();
            total += w.len();
        }
    }
    // Each row prunes round(cols x s) weights: off by at most half a weight in 64 per row.
    assert!((zeros as f64 / total as f64 - 0.5).abs() < 0.5 / 64.0 + 1e-9);
}

#[test]
fn one_pass_takes_every_stage_from_the_unpruned_block() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher(&dir.path().join("teacher"));
    let calib = windows(&t, 8, 0);
    let mut outs = Vec::new();
    for true_sequential in [true, false] {
        let opts = PruneOptions {
            refit: 0,
            true_sequential,
            pattern: Pattern::Unstructured { sparsity: 0.5 },
            calib: calib.clone(),
            block_sparsity: None,
            sample_rows: 0,
        };
        let out = dir.path().join(format!("seq-{true_sequential}"));
        outs.push(run(&t, &out, Method::Wanda, &opts));
    }
    let mask = |ck: &Checkpoint, l: usize, name: &str| -> Vec<bool> {
        linear(ck, l, name).0.iter().map(|&x| x == 0.0).collect()
    };
    // Block 0's q/k/v see the same inputs either way; o_proj and later stages see the pruned
    // q/k/v only in true-sequential order, so some of their masks differ.
    for name in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] {
        assert_eq!(mask(&outs[0], 0, name), mask(&outs[1], 0, name), "{name}");
    }
    let later = [
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    assert!(
        later
            .iter()
            .any(|name| mask(&outs[0], 0, name) != mask(&outs[1], 0, name)),
        "one-pass pruned block 0 exactly as true-sequential did"
    );
}

#[test]
fn refit_keeps_every_mask_and_brings_the_student_closer_to_the_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher(&dir.path().join("teacher"));
    let calib = windows(&t, 16, 0);
    let held_out = windows(&t, 4, 99);
    let reference = logits(&t, &held_out);
    let vocab = t.config().vocab_size;
    let layers = t.config().num_hidden_layers;
    for method in [Method::Magnitude, Method::Wanda, Method::Sparsegpt] {
        let mut kld = Vec::new();
        let mut outs = Vec::new();
        for refit in [0, 30] {
            let opts = PruneOptions {
                refit,
                true_sequential: true,
                pattern: Pattern::NofM { n: 2, m: 4 },
                calib: calib.clone(),
                block_sparsity: None,
                sample_rows: 0,
            };
            let out = dir.path().join(format!("{method:?}-{refit}"));
            let s = run(&t, &out, method, &opts);
            kld.push(mean_kld(&reference, &logits(&s, &held_out), vocab));
            outs.push(s);
        }
        // The refit moves kept weights only: block 0's q/k/v (same inputs either way; later
        // stages see the refitted layers) keep their masks, and every linear its pattern.
        for name in linears() {
            let (a, cols) = linear(&outs[0], 0, name);
            let (b, _) = linear(&outs[1], 0, name);
            if name.ends_with("q_proj") || name.ends_with("k_proj") || name.ends_with("v_proj") {
                let moved = a
                    .iter()
                    .zip(&b)
                    .filter(|(x, y)| (**x == 0.0) != (**y == 0.0))
                    .count();
                assert_eq!(moved, 0, "{method:?} {name}: the refit changed the mask");
                assert_ne!(a, b, "{method:?} {name}: the refit changed nothing");
            }
            for l in 0..layers {
                assert!(satisfies_nm(&linear(&outs[1], l, name).0, cols, 2, 4));
            }
        }
        assert!(
            kld[1] < kld[0],
            "{method:?}: refit KLD {} not below {}",
            kld[1],
            kld[0]
        );
    }
}
