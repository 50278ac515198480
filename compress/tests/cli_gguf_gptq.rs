//! GPTQ into GGUF (`compress quant --method gptq --format gguf:q4_0`): the file holds GPTQ's own
//! grid, not the type's re-rounding of it, and what cannot hold that grid is refused up front.

mod common;

use std::path::Path;

use common::{fails_str, ok};
use model::Checkpoint;
use model::testkit::{calib_text, tiny_config, write_hf};

/// The largest |a − b| of any decoder linear of two models, over that linear's largest |b|.
fn linear_gap(a: &Path, b: &Path) -> f64 {
    let (ca, cb) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
    let cfg = cb.config().clone();
    let mut worst = 0f64;
    for l in 0..cfg.num_hidden_layers {
        for (name, shape) in model::checkpoint::block_tensors(&cfg, l) {
            if !name.ends_with("proj.weight") {
                continue;
            }
            let (x, y) = (
                ca.read(&name, &shape).unwrap(),
                cb.read(&name, &shape).unwrap(),
            );
            let top = y.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let gap = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs())) as f64;
            worst = worst.max(gap / top);
        }
    }
    worst
}

/// The share of 32-value groups of a model's decoder linears that lie on llama.cpp's Q4_0
/// grid as `quantize` lays it out: the value of largest magnitude `e` is code -8, so every
/// value is `k * e / -8` for an integer `k` in -8..=7.
fn share_on_llama_q4_0_grid(m: &Path) -> f64 {
    let c = Checkpoint::open(m).unwrap();
    let cfg = c.config().clone();
    let (mut on, mut all) = (0usize, 0usize);
    for l in 0..cfg.num_hidden_layers {
        for (name, shape) in model::checkpoint::block_tensors(&cfg, l) {
            if !name.ends_with("proj.weight") {
                continue;
            }
            for g in c.read(&name, &shape).unwrap().chunks(32) {
                let e = g
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                if e == 0.0 {
                    continue;
                }
                all += 1;
                on += g.iter().all(|&v| {
                    let k = v / e * -8.0;
                    (k - k.round()).abs() < 1e-3 && (-8.0..=7.0).contains(&k.round())
                }) as usize;
            }
        }
    }
    on as f64 / all as f64
}

/// Each linear of the q4_1 GPTQ GGUF equals the dense GPTQ output at the same grid (W4 g32
/// asym) up to bf16 and f16-scale rounding, while plain Q4 rounding of the same teacher lands
/// elsewhere: the codes are GPTQ's. q4_0's grid is llama.cpp's, which no dense scheme has.
#[test]
fn gptq_goes_into_gguf_on_the_types_own_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 11, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (t, c) = (s(&teacher), s(&calib));
    let cal = ["--calib", &c, "--calib-samples", "8", "--calib-len", "32"];
    for (ty, sym) in [("q4_0", true), ("q4_1", false)] {
        let (g, d, r) = (
            root.join(ty),
            root.join(format!("{ty}-dense")),
            root.join(format!("{ty}-rtn")),
        );
        let format = format!("gguf:{ty}");
        let mut args = vec!["quant", &t, "--method", "gptq", "--format", &format];
        args.extend(cal);
        let gs = s(&g);
        args.extend(["--out", &gs]);
        let out = ok(&args);
        assert!(out.contains("0 linears re-rounded"), "{out}");
        let rs = s(&r);
        ok(&[
            "quant", &t, "--method", "rtn", "--format", &format, "--out", &rs,
        ]);

        let file = g.join("model.gguf");
        if sym {
            // Q4_0's grid is llama.cpp's; plain rounding puts every group's extreme exactly on
            // code -8, while GPTQ searches each group's scale against diag(H) (the imatrix
            // search) when it enters the group, so most of its groups have another scale.
            let (ours, plain) = (
                share_on_llama_q4_0_grid(&file),
                share_on_llama_q4_0_grid(&r.join("model.gguf")),
            );
            assert!(
                plain > 0.99 && ours < 0.9,
                "{ty}: extremes on code -8: GPTQ {ours} vs plain rounding {plain}"
            );
            let vs_rtn = linear_gap(&file, &r.join("model.gguf"));
            assert!(vs_rtn > 0.05, "{ty}: GPTQ GGUF vs plain rounding: {vs_rtn}");
        } else {
            // The same grid as dense GPTQ W4 g32 asym: only q4_1 has a dense twin to compare.
            let mut dense = vec![
                "quant", &t, "--method", "gptq", "--bits", "4", "--group", "32",
            ];
            dense.extend(cal);
            let ds = s(&d);
            dense.extend(["--format", "dense", "--out", &ds]);
            ok(&dense);
            let on_grid = linear_gap(&file, &d);
            let plain = linear_gap(&r.join("model.gguf"), &d);
            assert!(on_grid < 0.01, "{ty}: GPTQ GGUF vs dense GPTQ: {on_grid}");
            assert!(plain > 0.05, "{ty}: plain rounding vs dense GPTQ: {plain}");
        }
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(g.join("quant_report.json")).unwrap()).unwrap();
        assert_eq!(report["method"], "gptq");
        assert_eq!(report["gptq"]["linears_rerounded"], serde_json::json!([]));
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            std::fs::metadata(r.join("model.gguf")).unwrap().len(),
            "{ty}: same types, same size"
        );
    }

    // Refused before any work, one line each.
    let out = s(&root.join("never"));
    let refused = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["quant", t.as_str(), "--out", out.as_str()];
        args.extend(extra);
        fails_str(root, &args, needles[0], &needles[1..]);
    };
    let gptq = ["--method", "gptq", "--calib", c.as_str()];
    refused(
        &[&gptq[..], &["--format", "gguf:q4_k_m"]].concat(),
        &["gguf:q4_k_m", "q4_0, q5_0, q4_1 or q5_1"],
    );
    refused(
        &[&gptq[..], &["--format", "gguf:q4_0", "--act-order"]].concat(),
        &["--act-order", "--static-groups"],
    );
    refused(
        &["--method", "gptq", "--format", "gguf:q4_0"],
        &["--method gptq", "needs --calib"],
    );
    refused(
        &["--format", "gguf:q4_0", "--bits", "3"],
        &["--bits", "does not apply"],
    );
    refused(
        &["--format", "gguf:q4_0", "--propagate", "quantized"],
        &["--propagate", "gptq"],
    );
}
