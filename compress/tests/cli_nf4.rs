//! `compress quant --scheme nf4|fp4|int8-absmax` through the real binary on a tiny synthetic
//! model: the dense and bitsandbytes outputs with their report and config, and the options
//! that do not apply refused with one line, exit 2 and nothing written.

mod common;

use std::path::Path;

use common::{fails, ok};
use model::testkit::{tiny_config, write_hf};
use serde_json::Value;

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn nf4_with_double_quant_writes_dense_and_bnb_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_hf(&src, &tiny_config(), 5, |_, _| {});
    let out = tmp.path().join("nf4");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (src_s, out_s) = (s(&src), s(&out));
    let stdout = ok(&[
        "quant",
        &src_s,
        "--scheme",
        "nf4",
        "--block",
        "32",
        "--double-quant",
        "--format",
        "dense,bnb",
        "--out",
        &out_s,
    ]);
    assert!(stdout.contains("nf4 b32 dq"), "{stdout}");
    let r = json(&out.join("quant_report.json"));
    assert_eq!(r["scheme"]["type"], "nf4");
    assert_eq!(r["scheme"]["block"], 32);
    assert_eq!(r["scheme"]["double_quant"], true);
    let linears = r["report"]["linears"].as_array().unwrap();
    assert_eq!(linears.len(), 7 * 3);
    assert!(
        linears
            .iter()
            .all(|l| l["weight_rel_error"].as_f64().unwrap() > 0.0)
    );
    // 4 bits + 8 per 32 values + nested absmax and offset: just above 4.25.
    let bpw = r["report"]["linear_bits_per_weight"].as_f64().unwrap();
    assert!(bpw > 4.25 && bpw < 4.3, "{bpw}");
    let qc = &json(&out.join("bnb/config.json"))["quantization_config"];
    assert_eq!(qc["quant_method"], "bitsandbytes");
    assert_eq!(qc["load_in_4bit"], true);
    assert_eq!(qc["bnb_4bit_quant_type"], "nf4");
    assert_eq!(qc["bnb_4bit_use_double_quant"], true);
    let st = model::safetensors_io::SafetensorsSet::open(&out.join("bnb")).unwrap();
    let q = "model.layers.1.self_attn.q_proj.weight";
    assert_eq!(st.entries()[q].shape, [64 * 64 / 2, 1]);
    for k in [
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state.bitsandbytes__nf4",
    ] {
        assert!(st.entries().contains_key(&format!("{q}.{k}")), "{k}");
    }
    // The dense folder is a model the other commands read.
    assert!(model::Checkpoint::open(&out).is_ok());
}

/// int8-absmax in bitsandbytes' `load_in_8bit` layout: I8 codes, per-row F32 `SCB`, a U8
/// `weight_format` of 0; the codes times SCB / 127 are the dense folder's weights.
#[test]
fn int8_absmax_writes_the_load_in_8bit_layout() {
    use model::safetensors_io::SafetensorsSet;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_hf(&src, &tiny_config(), 5, |_, _| {});
    let out = tmp.path().join("i8");
    let stdout = ok(&[
        "quant",
        src.to_str().unwrap(),
        "--scheme",
        "int8-absmax",
        "--format",
        "dense,bnb",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stdout.contains("8-bit"), "{stdout}");
    let qc = &json(&out.join("bnb/config.json"))["quantization_config"];
    assert_eq!(qc["load_in_8bit"], true);
    assert_eq!(qc["load_in_4bit"], false);
    let st = SafetensorsSet::open(&out.join("bnb")).unwrap();
    let dense = SafetensorsSet::open(&out).unwrap();
    let mut linears = 0;
    for (name, e) in st.entries() {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if !name.starts_with("model.layers.") || e.shape.len() != 2 {
            continue;
        }
        linears += 1;
        let (rows, cols) = (e.shape[0], e.shape[1]);
        assert_eq!(format!("{:?}", e.dtype), "I8", "{name}");
        let scb_e = &st.entries()[&format!("{module}.SCB")];
        assert_eq!(
            (format!("{:?}", scb_e.dtype), scb_e.shape.clone()),
            ("F32".into(), vec![rows])
        );
        let wf = &st.entries()[&format!("{module}.weight_format")];
        assert!(wf.shape.is_empty(), "{name}");
        assert_eq!(
            st.with_bytes(&format!("{module}.weight_format"), |b| b.to_vec())
                .unwrap(),
            [0]
        );
        let codes = st.with_bytes(name, |b| b.to_vec()).unwrap();
        let (scb, _) = st.read_f32(&format!("{module}.SCB")).unwrap().unwrap();
        let (want, _) = dense.read_f32(name).unwrap().unwrap();
        // The row's largest magnitude takes the code +-127.
        for r in 0..rows {
            let row = &codes[r * cols..(r + 1) * cols];
            assert_eq!(
                row.iter().map(|&c| (c as i8).unsigned_abs()).max(),
                Some(127)
            );
        }
        for (i, (&c, &w)) in codes.iter().zip(&want).enumerate() {
            let v = (c as i8 as f32 * scb[i / cols]) * (1.0f32 / 127.0);
            assert_eq!(half::bf16::from_f32(v).to_f32(), w, "{name}[{i}]");
        }
    }
    assert_eq!(linears, 7 * 3);
}

#[test]
fn options_that_do_not_apply_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_hf(&src, &tiny_config(), 5, |_, _| {});
    let out = tmp.path().join("o");
    let q = |extra: &[&str]| -> Vec<std::path::PathBuf> {
        let mut v: Vec<std::path::PathBuf> = vec!["quant".into(), src.clone()];
        v.extend(extra.iter().map(|s| s.into()));
        v.push("--out".into());
        v.push(out.clone());
        v
    };
    let check = |extra: &[&str], needles: &[&str]| {
        let args = q(extra);
        let refs: Vec<&Path> = args.iter().map(|p| p.as_path()).collect();
        fails(tmp.path(), &refs, needles[0], &needles[1..]);
    };
    check(&["--scheme", "nf4", "--bits", "4"], &["--bits", "--scheme"]);
    check(&["--scheme", "nf4", "--group", "64"], &["--group"]);
    check(&["--scheme", "fp4", "--sym"], &["--sym"]);
    check(&["--scheme", "nf4", "--per-channel"], &["--per-channel"]);
    check(&["--scheme", "nf4", "--calib", "x.txt"], &["--calib"]);
    check(&["--scheme", "nf4", "--damp", "0.1"], &["--damp"]);
    check(&["--scheme", "nf4", "--method", "gptq"], &["--method gptq"]);
    check(&["--scheme", "nf4", "--block", "48"], &["--block 48"]);
    // hidden 64: q_proj's 64 input columns do not take blocks of 128.
    check(
        &["--scheme", "nf4", "--block", "128"],
        &["q_proj", "128", "64"],
    );
    check(&["--block", "64"], &["--block", "--scheme"]);
    check(&["--double-quant"], &["--double-quant"]);
    check(&["--scheme", "int8-absmax", "--block", "64"], &["--block"]);
    check(&["--scheme", "nf4", "--format", "packed"], &["packed"]);
    std::fs::create_dir(&out).unwrap();
    check(&["--scheme", "nf4"], &["already exists", "--force"]);
}
