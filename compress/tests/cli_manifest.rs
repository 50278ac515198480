//! `manifest.json`: every model folder a stage writes records its inputs' sha256, the command,
//! seed, times, peak RSS and machine; a GGUF file output carries it in its report.

mod common;

use std::path::Path;

use common::ok;
use model::testkit::{calib_text, tiny_config, write_hf};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn sha(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The input of `role` in manifest `m`: its file named `name` has `want`'s sha256 and size.
fn check_input(m: &Value, role: &str, name: &str, want: &Path) {
    let input = m["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["role"] == role)
        .unwrap_or_else(|| panic!("no {role} input in {m}"));
    let file = input["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"].as_str().unwrap().ends_with(name))
        .unwrap_or_else(|| panic!("no {name} in {input}"));
    assert_eq!(file["sha256"], sha(want), "{role} {name}");
    assert_eq!(
        file["bytes"],
        std::fs::metadata(want).unwrap().len(),
        "{role} {name}"
    );
}

#[test]
fn stages_write_a_manifest_of_their_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 3, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let (t, c) = (teacher.to_str().unwrap(), calib.to_str().unwrap());
    let cal = ["--calib", c, "--calib-samples", "4", "--calib-len", "32"];

    let gptq = root.join("gptq");
    let mut args = vec![
        "quant", t, "--method", "gptq", "--bits", "4", "--group", "32",
    ];
    args.extend(cal);
    args.extend([
        "--seed",
        "5",
        "--format",
        "dense",
        "--out",
        gptq.to_str().unwrap(),
    ]);
    ok(&args);
    let m = json(&gptq.join("manifest.json"));
    assert_eq!(m["format"], "compress-manifest/1");
    check_input(
        &m,
        "teacher",
        "model.safetensors",
        &teacher.join("model.safetensors"),
    );
    check_input(&m, "teacher", "config.json", &teacher.join("config.json"));
    check_input(&m, "calibration", "calib.txt", &calib);
    let s = &m["stages"][0];
    assert_eq!(s["stage"], "quant");
    assert_eq!(s["seed"], 5);
    assert!(s["command"].as_array().unwrap().iter().any(|a| a == "gptq"));
    assert!(s["wall_seconds"].as_f64().unwrap() > 0.0);
    assert!(s["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    let bpw = s["metrics"]["linear_bits_per_weight"].as_f64().unwrap();
    let report = json(&gptq.join("quant_report.json"));
    assert_eq!(
        bpw,
        report["report"]["linear_bits_per_weight"].as_f64().unwrap()
    );
    assert!(m["machine"]["cores"].as_u64().unwrap() >= 1);

    // A GGUF file: the manifest sits in the report written next to it.
    let gguf = root.join("s.gguf");
    ok(&[
        "quant",
        t,
        "--format",
        "gguf:q8_0",
        "--out",
        gguf.to_str().unwrap(),
    ]);
    let side = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("s.") && n.ends_with(".json")
        })
        .expect("a report beside s.gguf");
    let m = &json(&side)["manifest"];
    check_input(
        m,
        "teacher",
        "model.safetensors",
        &teacher.join("model.safetensors"),
    );
    assert!(
        m["stages"][0]["metrics"]["bits_per_weight"]
            .as_f64()
            .unwrap()
            > 8.0
    );

    // Pruning and conversion record theirs too; the pruned student's own files are then the
    // next stage's input.
    let pruned = root.join("pruned");
    let mut args = vec!["prune", t, "--method", "wanda", "--sparsity", "0.5"];
    args.extend(cal);
    args.extend(["--out", pruned.to_str().unwrap()]);
    ok(&args);
    let m = json(&pruned.join("manifest.json"));
    assert_eq!(m["stages"][0]["stage"], "prune");
    check_input(&m, "calibration", "calib.txt", &calib);
    let conv = root.join("conv");
    ok(&["convert", pruned.to_str().unwrap(), conv.to_str().unwrap()]);
    let m = json(&conv.join("manifest.json"));
    check_input(
        &m,
        "model",
        "model.safetensors",
        &pruned.join("model.safetensors"),
    );
}
