//! GPTQ into GGUF (`compress quant --method gptq --format gguf:q4_0|q4_k_m`): the file holds
//! GPTQ's own codes in each linear's block type (K-quants included), not the type's re-rounding
//! of them, and a type GPTQ cannot write is refused up front.

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

/// Each linear of a GPTQ GGUF lands well away from plain rounding of the same teacher (GPTQ's
/// error feedback), in the plan's types at the same file size: q4_0, q4_1, and q4_k_m, which
/// mixes Q4_K / Q6_K (the 256-wide down_proj) with Q5_0 / Q8_0 fallbacks. (That the blocks
/// are GPTQ's own rounding, not a re-rounding, is `quant`'s identity-Hessian test.)
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
    for ty in ["q4_0", "q4_1", "q4_k_m"] {
        let (g, r) = (root.join(ty), root.join(format!("{ty}-rtn")));
        let format = format!("gguf:{ty}");
        let mut args = vec!["quant", &t, "--method", "gptq", "--format", &format];
        args.extend(cal);
        let gs = s(&g);
        args.extend(["--out", &gs]);
        let out = ok(&args);
        assert!(out.contains("GPTQ into each linear's block type"), "{out}");
        let rs = s(&r);
        ok(&[
            "quant", &t, "--method", "rtn", "--format", &format, "--out", &rs,
        ]);

        let file = g.join("model.gguf");
        // GPTQ's error feedback moves weights well beyond a rounding step of plain rounding.
        let vs_rtn = linear_gap(&file, &r.join("model.gguf"));
        assert!(vs_rtn > 0.05, "{ty}: GPTQ GGUF vs plain rounding: {vs_rtn}");
        if ty == "q4_0" {
            // Plain rounding puts every Q4_0 group's extreme exactly on code -8, while GPTQ
            // searches each block's scale against diag(H) (the imatrix search) when it enters
            // the block, so most of its groups have another scale.
            let (ours, plain) = (
                share_on_llama_q4_0_grid(&file),
                share_on_llama_q4_0_grid(&r.join("model.gguf")),
            );
            assert!(
                plain > 0.99 && ours < 0.9,
                "{ty}: extremes on code -8: GPTQ {ours} vs plain rounding {plain}"
            );
        }
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(g.join("quant_report.json")).unwrap()).unwrap();
        assert_eq!(report["method"], "gptq");
        assert_eq!(report["gptq"]["plan"], ty);
        if ty == "q4_k_m" {
            let types = &report["tensor_types"];
            assert_eq!(types["blk.2.ffn_down.weight"], "Q6_K", "{types}");
            assert_eq!(types["blk.0.ffn_down.weight"], "Q4_K", "{types}");
            assert_eq!(types["blk.1.attn_q.weight"], "Q5_0", "{types}");
        }
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
        &[
            &gptq[..],
            &["--format", "gguf:q4_k_m", "--tensor-type", "ffn_down=f16"],
        ]
        .concat(),
        &["gguf:q4_k_m", "blk.0.ffn_down.weight would be F16"],
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
