//! Structured pruning on tiny synthetic checkpoints: units that provably contribute nothing
//! (zeroed weights) must be the ones chosen, and removing them must leave the logits
//! unchanged; the written config must match every tensor; parameter budgets must be met.
//! Teacher weights are rounded to bf16 so the bf16 output holds exactly the teacher's values.

use std::path::Path;

use model::engine::LayerEngine;
use model::testkit::{calib_text, tiny_config, write_hf};
use model::{Checkpoint, Config};
use prune::structured::{
    self as st, Amount, ImportanceKind, Plan, Scores, Unit, pruned_config, resolve_removal,
};
use serde_json::Value;

fn round_bf16(v: &mut [f32]) {
    for x in v {
        *x = half::bf16::from_f32(*x).to_f32();
    }
}

/// Writes a teacher from `config`, letting `edit` zero what the test needs.
fn teacher(dir: &Path, config: &Value, mut edit: impl FnMut(&str, &mut Vec<f32>)) {
    write_hf(dir, config, 7, |name, v| {
        edit(name, v);
        round_bf16(v);
    });
}

/// Calibration (or evaluation) windows of `len` tokens drawn from the test text.
fn windows(ckpt: &Checkpoint, n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let tok = model::load_tokenizer(ckpt).unwrap();
    let ids = tok.encode(&calib_text(3000)).unwrap();
    quant::calib::sample_windows(&ids, &tok, n, len, seed, Path::new("calib")).unwrap()
}

/// Scores, selects and writes a pruned folder (config.json + model.safetensors) at `out`.
fn prune_to(
    src: &Path,
    out: &Path,
    unit: Unit,
    kind: ImportanceKind,
    amount: Amount,
) -> (Plan, Scores) {
    let ckpt = Checkpoint::open(src).unwrap();
    let removed = resolve_removal(ckpt.config(), unit, amount).unwrap();
    let scores = match kind {
        ImportanceKind::Activation => {
            let w = windows(&ckpt, 4, 64, 1);
            st::activation_scores(&ckpt, unit, &w, model::default_device(), |_| {}).unwrap()
        }
        ImportanceKind::Magnitude => st::magnitude_scores(&ckpt, unit, |_| {}).unwrap(),
    };
    let plan = st::select(ckpt.config(), unit, removed, &scores).unwrap();
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string(&plan.config).unwrap(),
    )
    .unwrap();
    st::write_weights(
        &ckpt,
        &plan,
        &out.join("model.safetensors"),
        model::safetensors_io::StoreDtype::BF16,
        |_| {},
    )
    .unwrap();
    (plan, scores)
}

/// Logits of every position of `windows`, flattened.
fn logits(dir: &Path, windows: &[Vec<u32>]) -> Vec<f32> {
    let ckpt = Checkpoint::open(dir).unwrap();
    let engine = LayerEngine::new(&ckpt, model::default_device(), 64);
    let mut states = engine.embed(windows).unwrap();
    engine
        .run_blocks(&mut states, |_, _, _| Ok(()), || {})
        .unwrap();
    let head = engine.load_head().unwrap();
    states.iter().flat_map(|s| head.logits(s, 0)).collect()
}

/// Largest |a - b| relative to the largest |a|.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let m = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
    (d / m.max(1e-12)) as f64
}

/// The teacher's and the pruned folder's logits on fresh windows.
fn compare(teacher: &Path, pruned: &Path) -> f64 {
    let w = windows(&Checkpoint::open(teacher).unwrap(), 2, 48, 99);
    rel_diff(&logits(teacher, &w), &logits(pruned, &w))
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[test]
fn dead_mlp_channels_are_removed_and_logits_are_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("teacher");
    // Layer l: 32 channels whose gate and up rows are zero, a different set per layer.
    let dead = |l: usize| -> Vec<usize> {
        let mut v: Vec<usize> = (0..32).map(|k| (l * 11 + k * 7) % 256).collect();
        v.sort_unstable();
        v
    };
    teacher(&src, &tiny_config(), |name, v| {
        if let Some(l) = layer_of(name)
            && (name.ends_with("mlp.gate_proj.weight") || name.ends_with("mlp.up_proj.weight"))
        {
            for c in dead(l) {
                v[c * 64..(c + 1) * 64].fill(0.0);
            }
        }
    });
    for kind in [ImportanceKind::Activation, ImportanceKind::Magnitude] {
        let out = tmp.path().join(format!("pruned-{kind:?}"));
        let (plan, _) = prune_to(&src, &out, Unit::Channels, kind, Amount::Count(32));
        for l in 0..3 {
            assert_eq!(plan.removed_units[l], dead(l), "{kind:?}: layer {l}");
        }
        assert_eq!(plan.config.intermediate_size, 224);
        let d = compare(&src, &out);
        assert!(d < 1e-5, "{kind:?}: logits moved by {d:e}");
    }
}

/// Zeroes the o_proj columns of KV group `g` (query heads 2g and 2g+1 of 16 dims) in `v`,
/// an o_proj of `rows` rows and 64 columns.
fn zero_group_columns(v: &mut [f32], rows: usize, g: usize) {
    for r in 0..rows {
        v[r * 64 + g * 32..r * 64 + (g + 1) * 32].fill(0.0);
    }
}

#[test]
fn a_kv_group_without_output_is_removed_and_logits_are_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    // Plain llama, and qwen2 (q/k/v biases, which must be sliced with the rows).
    let mut qwen = tiny_config();
    qwen["model_type"] = "qwen2".into();
    for (tag, cfg) in [("llama", tiny_config()), ("qwen2", qwen)] {
        let src = tmp.path().join(format!("teacher-{tag}"));
        // The dead group alternates with the layer: 1, 0, 1.
        let dead = |l: usize| (l + 1) % 2;
        teacher(&src, &cfg, |name, v| {
            if let Some(l) = layer_of(name)
                && name.ends_with("self_attn.o_proj.weight")
            {
                zero_group_columns(v, 64, dead(l));
            }
        });
        for kind in [ImportanceKind::Activation, ImportanceKind::Magnitude] {
            let out = tmp.path().join(format!("pruned-{tag}-{kind:?}"));
            let (plan, _) = prune_to(&src, &out, Unit::Heads, kind, Amount::Count(1));
            for l in 0..3 {
                assert_eq!(
                    plan.removed_units[l],
                    vec![dead(l)],
                    "{tag} {kind:?}: layer {l}"
                );
            }
            let c = &plan.config;
            assert_eq!((c.num_attention_heads, c.num_kv_heads()), (2, 1));
            // 2 heads of 16 no longer fill the 64-wide hidden state: head_dim is explicit.
            assert_eq!(c.head_dim, Some(16));
            let d = compare(&src, &out);
            assert!(d < 1e-5, "{tag} {kind:?}: logits moved by {d:e}");
        }
    }
}

#[test]
fn an_identity_block_is_the_layer_removed_and_logits_are_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("teacher");
    teacher(&src, &tiny_config(), |name, v| {
        if name.starts_with("model.layers.1.")
            && (name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight"))
        {
            v.fill(0.0);
        }
    });
    let out = tmp.path().join("pruned");
    let (plan, scores) = prune_to(
        &src,
        &out,
        Unit::Layers,
        ImportanceKind::Activation,
        Amount::Count(1),
    );
    assert_eq!(plan.removed_units, vec![vec![1]]);
    assert_eq!(plan.kept_layers, vec![0, 2]);
    assert!(
        scores.0[1][0].abs() < 1e-6,
        "identity block influence {:?}",
        scores.0
    );
    assert!(scores.0[0][0] > 1e-4 && scores.0[2][0] > 1e-4);
    assert_eq!(plan.config.num_hidden_layers, 2);
    let d = compare(&src, &out);
    assert!(d < 1e-5, "logits moved by {d:e}");
    let ckpt = Checkpoint::open(&src).unwrap();
    let e = st::magnitude_scores(&ckpt, Unit::Layers, |_| {}).unwrap_err();
    assert!(e.to_string().contains("--importance activation"), "{e}");
}

/// Opens a pruned folder and reads every tensor its config implies with that shape; checks
/// there are no others and returns the parameter count found in the file.
fn check_folder(dir: &Path) -> (Config, u64) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let expected = ckpt.expected_tensors();
    let mut numel = 0u64;
    for (name, shape) in &expected {
        let data = ckpt.read(name, shape).unwrap();
        numel += data.len() as u64;
    }
    assert_eq!(
        ckpt.tensors().len(),
        expected.len(),
        "extra tensors in {dir:?}"
    );
    (ckpt.config().clone(), numel)
}

#[test]
fn config_matches_every_tensor_and_params_drop_as_reported() {
    let tmp = tempfile::tempdir().unwrap();
    // Every bias there is, so bias slicing is exercised too.
    let mut cfg = tiny_config();
    cfg["attention_bias"] = true.into();
    cfg["mlp_bias"] = true.into();
    let src = tmp.path().join("teacher");
    teacher(&src, &cfg, |_, _| {});
    let before = Checkpoint::open(&src).unwrap().config().num_params();
    for (unit, amount, kind) in [
        (Unit::Heads, Amount::Ratio(0.5), ImportanceKind::Activation),
        (
            Unit::Channels,
            Amount::Ratio(0.3),
            ImportanceKind::Activation,
        ),
        (Unit::Channels, Amount::Count(5), ImportanceKind::Magnitude),
        (Unit::Layers, Amount::Count(2), ImportanceKind::Activation),
    ] {
        let out = tmp.path().join(format!("{unit:?}-{amount:?}"));
        let (plan, _) = prune_to(&src, &out, unit, kind, amount);
        let (read_cfg, numel) = check_folder(&out);
        assert_eq!(read_cfg, plan.config);
        assert_eq!(numel, plan.config.num_params(), "{unit:?}");
        assert!(numel < before);
        let teacher_cfg = Checkpoint::open(&src).unwrap().config().clone();
        assert_eq!(plan.config, pruned_config(&teacher_cfg, unit, plan.removed));
        // Each removed unit takes a known number of parameters in each of the 3 layers.
        let per_unit: u64 = match unit {
            // q rows (+ bias) and o columns of 2 query heads of 16, k and v rows (+ biases)
            // of 1 KV head of 16; o_proj's bias stays.
            Unit::Heads => 2 * (32 * 64) + 32 + 2 * (16 * 64 + 16),
            // gate and up rows (+ biases) and a down column.
            Unit::Channels => 3 * 64 + 2,
            Unit::Layers => continue,
        };
        assert_eq!(
            before - numel,
            3 * per_unit * plan.removed as u64,
            "{unit:?}"
        );
    }
}

#[test]
fn target_params_picks_the_smallest_removal_that_meets_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("teacher");
    teacher(&src, &tiny_config(), |_, _| {});
    let cfg = Checkpoint::open(&src).unwrap().config().clone();
    // Channels go in steps of 32: a budget a little above the 96-channel model needs 96.
    let budget = pruned_config(&cfg, Unit::Channels, 96).num_params() + 10;
    assert!(pruned_config(&cfg, Unit::Channels, 64).num_params() > budget);
    let k = resolve_removal(&cfg, Unit::Channels, Amount::TargetParams(budget)).unwrap();
    assert_eq!(k, 96);
    let out = tmp.path().join("pruned");
    let (plan, _) = prune_to(
        &src,
        &out,
        Unit::Channels,
        ImportanceKind::Magnitude,
        Amount::TargetParams(budget),
    );
    let (_, numel) = check_folder(&out);
    assert!(numel <= budget, "{numel} > {budget}");
    assert_eq!(plan.config.intermediate_size, 160);
    // Layers: exactly the 1-layer-smaller model's count is enough for one layer.
    let one = pruned_config(&cfg, Unit::Layers, 1).num_params();
    assert_eq!(
        resolve_removal(&cfg, Unit::Layers, Amount::TargetParams(one)).unwrap(),
        1
    );
    assert_eq!(
        resolve_removal(&cfg, Unit::Layers, Amount::TargetParams(one - 1)).unwrap(),
        2
    );
    for p in [1000, cfg.num_params()] {
        let e = resolve_removal(&cfg, Unit::Heads, Amount::TargetParams(p)).unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
    }
}
