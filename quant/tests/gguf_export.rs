//! GGUF export end to end on a tiny synthetic llama: HF folder -> GGUF (several plans) ->
//! read back through `model::Checkpoint`, and GGUF -> GGUF (tokenizer keys copied).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use model::Checkpoint;
use model::gguf::GgmlType;
use model::gguf::writer::{MetaValue, read_metadata};
use quant::gguf_export::{TypePlan, export};

use model::testkit::Rng;

const VOCAB: usize = 300;

/// A tiny llama: hidden 64, 4 heads of 16, 2 kv heads, ffn 256, 3 layers (model::testkit).
fn write_tiny_hf(dir: &Path, tied: bool) -> BTreeMap<String, Vec<f32>> {
    let mut config = model::testkit::tiny_config();
    config["tie_word_embeddings"] = tied.into();
    model::testkit::write_hf(dir, &config, 0x9e37_79b9_7f4a_7c15, |_, _| {})
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let e: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let s: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (e / s).sqrt()
}

fn run_export(
    src: &Path,
    out: &Path,
    plan: &TypePlan,
    imp: Option<&HashMap<String, Vec<f32>>>,
) -> quant::gguf_export::ExportReport {
    let ckpt = Checkpoint::open(src).unwrap();
    let mut seen = 0;
    let r = export(&ckpt, out, plan, imp, &mut |p| {
        seen += 1;
        assert_eq!(p.index, seen);
    })
    .unwrap();
    assert_eq!(seen, r.tensors.len());
    r
}

#[test]
fn hf_to_gguf_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let orig = write_tiny_hf(&hf, false);

    // F32: exact round trip (names, q/k permutation, shapes).
    let f32_path = dir.path().join("f32.gguf");
    let r = run_export(
        &hf,
        &f32_path,
        &TypePlan::preset("f32", 3, false, 1).unwrap(),
        None,
    );
    assert_eq!(r.tensors.len(), orig.len());
    let ck = Checkpoint::open(&f32_path).unwrap();
    for (name, shape) in ck.expected_tensors() {
        assert_eq!(ck.read(&name, &shape).unwrap(), orig[&name], "{name}");
    }
    let g = ck.gguf().unwrap();
    assert_eq!(g.get_str("general.architecture"), Some("llama"));
    assert_eq!(g.get_u64("llama.block_count"), Some(3));
    assert_eq!(g.get_u64("llama.rope.dimension_count"), Some(16));
    assert_eq!(g.get_u64("general.quantization_version"), Some(2));
    assert_eq!(g.get_str("tokenizer.ggml.pre"), Some("smollm"));
    assert_eq!(g.get_str("tokenizer.chat_template"), Some("{{ messages }}"));
    assert_eq!(g.get_u64("tokenizer.ggml.padding_token_id"), Some(1));
    assert_eq!(g.get_u64("tokenizer.ggml.unknown_token_id"), Some(0));
    assert_eq!(g.get_bool("tokenizer.ggml.add_bos_token"), Some(false));
    assert_eq!(g.get_array("tokenizer.ggml.tokens").unwrap().len(), VOCAB);
    assert_eq!(
        g.get_array("tokenizer.ggml.merges").unwrap()[1].as_str(),
        Some("h e")
    );
    let types = g.get_array("tokenizer.ggml.token_type").unwrap();
    assert_eq!(
        (types[0].as_i64(), types[5].as_i64(), types[299].as_i64()),
        (Some(3), Some(1), Some(5))
    );
    // The tokenizer rebuilt from GGUF metadata tokenizes like the original.
    let a = model::load_tokenizer(&Checkpoint::open(&hf).unwrap()).unwrap();
    let b = model::load_tokenizer(&ck).unwrap();
    for text in ["the hello 123", "<s> the</s>\n x"] {
        assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap(), "{text}");
    }

    // Quantized plans: types as planned, values close.
    for (preset, bound) in [
        ("q8_0", 0.01),
        ("q4_0", 0.15),
        ("q4_k_m", 0.15),
        ("q5_k_m", 0.08),
        ("q6_k", 0.03),
    ] {
        let path = dir.path().join(format!("{preset}.gguf"));
        let plan = TypePlan::preset(preset, 3, false, 1).unwrap();
        let r = run_export(&hf, &path, &plan, None);
        let ck = Checkpoint::open(&path).unwrap();
        let g = ck.gguf().unwrap();
        assert_eq!(g.get_u64("general.file_type"), Some(plan.file_type as u64));
        for t in &r.tensors {
            let gt = g.tensor(&t.name).unwrap();
            assert_eq!((gt.ty, &gt.shape), (t.ty, &t.shape), "{}", t.name);
        }
        for (name, shape) in ck.expected_tensors() {
            let e = rel_err(&orig[&name], &ck.read(&name, &shape).unwrap());
            assert!(e < bound, "{preset} {name}: relative error {e}");
        }
        assert_eq!(r.file_bytes, std::fs::metadata(&path).unwrap().len());
        if preset == "q4_k_m" {
            // Hidden 64 is not a multiple of 256: Q4_K falls back to Q5_0; ffn_down rows are 256.
            assert_eq!(g.tensor("blk.1.attn_q.weight").unwrap().ty, GgmlType::Q5_0);
            assert_eq!(
                g.tensor("blk.1.ffn_down.weight").unwrap().ty,
                GgmlType::Q4_K
            );
            assert_eq!(
                g.tensor("blk.2.ffn_down.weight").unwrap().ty,
                GgmlType::Q6_K
            );
            assert_eq!(g.tensor("output.weight").unwrap().ty, GgmlType::Q8_0);
            assert_eq!(g.tensor("output_norm.weight").unwrap().ty, GgmlType::F32);
            assert!(r.fallbacks().count() > 0);
        }
    }

    // GGUF source: tokenizer keys copied with their types; values re-quantized.
    let again = dir.path().join("again.gguf");
    run_export(
        &f32_path,
        &again,
        &TypePlan::preset("q8_0", 3, false, 1).unwrap(),
        None,
    );
    let tok = |p: &Path| -> Vec<(String, MetaValue)> {
        read_metadata(p)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .collect()
    };
    assert_eq!(tok(&again), tok(&f32_path));
    let ck = Checkpoint::open(&again).unwrap();
    let q = ck
        .read("model.layers.2.self_attn.k_proj.weight", &[32, 64])
        .unwrap();
    assert!(rel_err(&orig["model.layers.2.self_attn.k_proj.weight"], &q) < 0.01);
}

#[test]
fn importance_and_tied_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let orig = write_tiny_hf(&hf, true);
    let mut imp = HashMap::new();
    let w: Vec<f32> = (0..64)
        .map(|j| if j % 7 == 0 { 50.0 } else { 1.0 })
        .collect();
    for l in 0..3 {
        imp.insert(
            format!("model.layers.{l}.self_attn.q_proj.weight"),
            w.clone(),
        );
    }
    imp.insert("lm_head.weight".to_string(), w.clone());
    let plan = TypePlan::preset("q4_0", 3, true, 1).unwrap();
    let plain = dir.path().join("plain.gguf");
    let weighted = dir.path().join("weighted.gguf");
    run_export(&hf, &plain, &plan, None);
    let r = run_export(&hf, &weighted, &plan, Some(&imp));
    assert!(r.tensors.iter().all(|t| t.name != "output.weight"));
    let (cp, cw) = (
        Checkpoint::open(&plain).unwrap(),
        Checkpoint::open(&weighted).unwrap(),
    );
    // Tied: token_embd takes the output rule (Q6_K, falls back to Q8_0 for rows of 64).
    assert_eq!(
        cw.gguf().unwrap().tensor("token_embd.weight").unwrap().ty,
        GgmlType::Q8_0
    );
    let werr = |ck: &Checkpoint, name: &str, shape: &[usize]| -> f64 {
        let y = ck.read(name, shape).unwrap();
        orig[name]
            .iter()
            .zip(&y)
            .enumerate()
            .map(|(i, (a, b))| w[i % 64] as f64 * ((a - b) as f64).powi(2))
            .sum()
    };
    for l in 0..3 {
        let n = format!("model.layers.{l}.self_attn.q_proj.weight");
        let (ep, ew) = (werr(&cp, &n, &[64, 64]), werr(&cw, &n, &[64, 64]));
        assert!(ew < ep, "{n}: weighted {ew} >= plain {ep}");
    }
    // Tensors without importance are identical.
    let n = "model.layers.1.mlp.up_proj.weight";
    assert_eq!(
        cp.read(n, &[256, 64]).unwrap(),
        cw.read(n, &[256, 64]).unwrap()
    );
    // A wrong-length importance vector is an error naming the tensor.
    imp.insert("model.layers.0.mlp.up_proj.weight".into(), vec![1.0; 3]);
    let ck = Checkpoint::open(&hf).unwrap();
    let e = export(
        &ck,
        &dir.path().join("bad.gguf"),
        &plan,
        Some(&imp),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("blk.0.ffn_up.weight"), "{e}");
}

#[test]
fn calibrated_export_uses_importance_and_folds_awq_scales() {
    use quant::gguf_calib::{GgufCalibration, export_calibrated};
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let orig = write_tiny_hf(&hf, false);
    let ckpt = Checkpoint::open(&hf).unwrap();
    let plan = TypePlan::preset("q4_0", 3, false, 1).unwrap();
    let mut rng = Rng(7);
    let windows: Vec<Vec<u32>> = (0..4)
        .map(|_| {
            (0..32)
                .map(|_| (rng.next().abs() * (VOCAB as f32 - 1.0)) as u32)
                .collect()
        })
        .collect();
    let plain = dir.path().join("plain.gguf");
    run_export(&hf, &plain, &plan, None);
    let mut out = Vec::new();
    for awq in [None, Some(quant::method::awq::Awq::default())] {
        let path = dir.path().join(if awq.is_some() {
            "awq.gguf"
        } else {
            "imatrix.gguf"
        });
        let calib = GgufCalibration {
            windows: &windows,
            awq,
            sample_rows: 64,
        };
        let r = export_calibrated(
            &ckpt,
            &path,
            &plan,
            &calib,
            model::default_device(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(r.tensors.len(), ckpt.expected_tensors().len());
        out.push(Checkpoint::open(&path).unwrap());
    }
    let cp = Checkpoint::open(&plain).unwrap();
    let (imat, awq) = (&out[0], &out[1]);
    let awq_of = |c: &Checkpoint, n: &str| c.read(n, &[64]).unwrap();
    // A block whose q/k/v the search did scale (alpha = 0, no scaling, may win in some).
    let layer = (0..3)
        .find(|l| {
            let n = format!("model.layers.{l}.input_layernorm.weight");
            awq_of(awq, &n) != orig[&n]
        })
        .expect("AWQ scaled the q/k/v inputs of some block");
    let norm = &format!("model.layers.{layer}.input_layernorm.weight");
    let q = &format!("model.layers.{layer}.self_attn.q_proj.weight");
    // Importance only: norms untouched, linears rounded differently from plain rounding, and
    // still close to the teacher.
    assert_eq!(imat.read(norm, &[64]).unwrap(), orig[norm]);
    assert_ne!(
        imat.read(q, &[64, 64]).unwrap(),
        cp.read(q, &[64, 64]).unwrap()
    );
    assert!(rel_err(&orig[q], &imat.read(q, &[64, 64]).unwrap()) < 0.2);
    // AWQ: the scales live in the norm now (gamma / s), and q_proj holds W * s.
    let g = awq.read(norm, &[64]).unwrap();
    assert_ne!(g, orig[norm]);
    assert!(g.iter().all(|v| v.is_finite()));
    let (w0, wa) = (&orig[q], awq.read(q, &[64, 64]).unwrap());
    // Undo the scaling per column: (W s)_rc * (gamma / s)_c / gamma_c ~ W_rc.
    let undone: Vec<f32> = wa
        .iter()
        .enumerate()
        .map(|(i, v)| v * g[i % 64] / orig[norm][i % 64])
        .collect();
    assert!(rel_err(w0, &undone) < 0.2, "{}", rel_err(w0, &undone));
}
