//! QLoRA (`compress distill --lora-rank R --base-scheme nf4`) on tiny synthetic models: the
//! NF4 base's forward at step 0 is the forward of `compress quant --scheme nf4`'s dense
//! output; a run writes the merged model, the adapters with the dequantized base beside them
//! and the base's resident bytes in distill_report.json; bad inputs fail with one line.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use common::{fails, fails_str, ok};
use distill::lm::values;
use distill::{CausalLm, LoraOptions, LoraTarget};
use model::Checkpoint;
use model::testkit::{calib_text, tiny_config, write_hf};
use model::transformer::Rope;
use quant::nf4::{BnbScheme, BnbType};
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A tiny student whose tensors are all bf16 values, so that the dense bf16 output of
/// `compress quant` holds its embedding, norms and lm_head exactly.
fn student(dir: &Path) -> PathBuf {
    let p = dir.join("student");
    write_hf(&p, &tiny_config(), 7, |_, v| {
        for x in v.iter_mut() {
            *x = f32::from_bits(x.to_bits() & 0xffff_0000);
        }
    });
    p
}

#[test]
fn the_nf4_base_forward_at_step_0_is_the_quantized_models_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let src = student(tmp.path());
    let ckpt = Checkpoint::open(&src).unwrap();
    let dev = Device::flex();
    let rope = Rope::new(ckpt.config(), 24, &dev);
    let windows: Vec<Vec<u32>> = (0..3)
        .map(|w| (0..24).map(|i| (w * 97 + i * 31) % 300).collect())
        .collect();
    for (block, dq) in [(64, false), (32, true)] {
        let out = tmp.path().join(format!("nf4-{block}-{dq}"));
        let mut args = vec!["quant", s(&src), "--scheme", "nf4", "--format", "dense"];
        let b = block.to_string();
        args.extend(["--block", &b, "--out", s(&out)]);
        if dq {
            args.push("--double-quant");
        }
        ok(&args);
        let lora = LoraOptions {
            rank: 4,
            alpha: 8.0,
            targets: vec![LoraTarget::QProj, LoraTarget::VProj, LoraTarget::UpProj],
        };
        let scheme = BnbScheme::new(BnbType::Nf4, Some(block), dq).unwrap();
        // On the plain device and on the autodiff one training uses (whose kernels round
        // differently from the plain ones, so each is compared with itself).
        for d in [dev.clone(), dev.clone().autodiff()] {
            let reference = CausalLm::load(&Checkpoint::open(&out).unwrap(), &d).unwrap();
            let want = values(reference.logits(&windows, &rope));
            let qlora = CausalLm::load(&ckpt, &d)
                .unwrap()
                .with_4bit_lora(&lora, &scheme)
                .unwrap();
            // The forward weights themselves, bit for bit (bf16 values in f32).
            let (tw, tq) = (reference.hf_tensors(), qlora.hf_tensors());
            for (name, w) in &tw {
                assert!(tq[name] == *w, "block {block} dq {dq}: {name} differs");
            }
            let got = values(qlora.logits(&windows, &rope));
            assert_eq!(got.len(), want.len());
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differ,
                0,
                "block {block} dq {dq} {d:?}: {differ} of {} logits differ",
                got.len()
            );
        }
        // And the forward differs from the f32 student's (the base really is 4-bit).
        let f32_student = CausalLm::load(&ckpt, &dev).unwrap();
        let reference = CausalLm::load(&Checkpoint::open(&out).unwrap(), &dev).unwrap();
        assert!(
            values(f32_student.logits(&windows, &rope))
                != values(reference.logits(&windows, &rope))
        );
    }
}

#[test]
fn a_qlora_run_writes_the_merged_model_the_adapters_and_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let src = student(tmp.path());
    let data = tmp.path().join("train.txt");
    std::fs::write(&data, calib_text(1500)).unwrap();
    let out = tmp.path().join("qlora");
    let stdout = ok(&[
        "distill",
        "--student",
        s(&src),
        "--loss",
        "ce",
        "--data",
        s(&data),
        "--seq-len",
        "32",
        "--batch-tokens",
        "64",
        "--max-tokens",
        "256",
        "--lr",
        "1e-3",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q_proj,down_proj",
        "--lora-save",
        "both",
        "--base-scheme",
        "nf4",
        "--out",
        s(&out),
    ]);
    assert!(stdout.contains("distilled"), "{stdout}");
    assert!(
        stdout.contains("base: nf4 b64 held in 103,680 bytes"),
        "{stdout}"
    );
    let r = json(&out.join("distill_report.json"));
    let base = &r["base"];
    assert_eq!(base["scheme"]["type"], "nf4");
    assert_eq!(base["scheme"]["block"], 64);
    assert_eq!(base["scheme"]["double_quant"], false);
    assert_eq!(base["linears"], 21);
    let (res, f32b) = (
        base["resident_bytes"].as_f64().unwrap(),
        base["f32_bytes"].as_f64().unwrap(),
    );
    assert!((res / f32b - 4.5 / 32.0).abs() < 1e-12, "{res} / {f32b}");
    assert_eq!(r["options"]["base_scheme"]["type"], "nf4");
    // The dequantized base beside the adapters: the same weights as compress quant's NF4
    // dense output, and PEFT's config points at it.
    let q = tmp.path().join("nf4");
    ok(&[
        "quant",
        s(&src),
        "--scheme",
        "nf4",
        "--format",
        "dense",
        "--out",
        s(&q),
    ]);
    let at = out.join("adapter");
    let cfg = json(&at.join("adapter_config.json"));
    let base_dir = std::path::absolute(at.join("base")).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], s(&base_dir));
    let (b, qd) = (
        Checkpoint::open(&base_dir).unwrap(),
        Checkpoint::open(&q).unwrap(),
    );
    for (name, shape) in model::checkpoint::expected_tensors(b.config()) {
        assert!(
            b.read(&name, &shape).unwrap() == qd.read(&name, &shape).unwrap(),
            "{name}: the written base is not the NF4 dense weight"
        );
    }
    // --lora-save adapters: the adapters and the base beside them, no merged model.
    let only = tmp.path().join("adapters");
    let mut args = vec![
        "distill",
        "--student",
        s(&src),
        "--loss",
        "ce",
        "--data",
        s(&data),
        "--seq-len",
        "32",
        "--batch-tokens",
        "64",
        "--max-tokens",
        "64",
        "--lora-rank",
        "2",
        "--lora-save",
        "adapters",
        "--base-scheme",
        "nf4",
        "--block",
        "32",
        "--double-quant",
        "--out",
    ];
    args.push(s(&only));
    ok(&args);
    assert!(!only.join("model.safetensors").exists());
    assert!(only.join("adapter_model.safetensors").exists());
    let cfg = json(&only.join("adapter_config.json"));
    let base_dir = std::path::absolute(only.join("base")).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], s(&base_dir));
    assert!(Checkpoint::open(&base_dir).is_ok());
    let r = json(&only.join("distill_report.json"));
    assert_eq!(r["base"]["scheme"]["double_quant"], true);
    assert_eq!(r["base"]["scheme"]["block"], 32);
    // The merged model differs from the base exactly on the adapted linears.
    let m = Checkpoint::open(&out).unwrap();
    for (name, shape) in model::checkpoint::expected_tensors(m.config()) {
        let moved = m.read(&name, &shape).unwrap() != b.read(&name, &shape).unwrap();
        let adapted = name.contains("q_proj") || name.contains("down_proj");
        assert_eq!(moved, adapted, "{name}");
    }
}

#[test]
fn bad_qlora_options_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let src = student(tmp.path());
    let data = tmp.path().join("train.txt");
    std::fs::write(&data, calib_text(300)).unwrap();
    let out = tmp.path().join("o");
    let check = |extra: &[&str], needles: &[&str]| {
        let mut args: Vec<PathBuf> = ["distill", "--student", s(&src), "--loss", "ce"]
            .iter()
            .map(PathBuf::from)
            .collect();
        args.extend(["--data", s(&data), "--seq-len", "32", "--out", s(&out)].map(PathBuf::from));
        args.extend(extra.iter().map(PathBuf::from));
        let refs: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
        fails(tmp.path(), &refs, needles[0], &needles[1..]);
    };
    check(&["--base-scheme", "nf4"], &["--base-scheme", "--lora-rank"]);
    check(&["--block", "64"], &["--block", "--base-scheme"]);
    check(
        &["--lora-rank", "4", "--double-quant"],
        &["--double-quant", "--base-scheme"],
    );
    // hidden 64: q_proj's 64 input columns do not take blocks of 128.
    check(
        &["--lora-rank", "4", "--base-scheme", "nf4", "--block", "128"],
        &["q_proj", "128", "64"],
    );
    check(
        &["--lora-rank", "4", "--base-scheme", "nf4", "--block", "48"],
        &["--block 48"],
    );
    check(
        &["--lora-rank", "4", "--base-scheme", "fp4"],
        &["--base-scheme"],
    );
    check(
        &["--lora-rank", "4", "--lora-init", "loftq"],
        &["--lora-init", "--base-scheme"],
    );
    let q = ["--lora-rank", "4", "--base-scheme", "nf4"];
    check(
        &[&q[..], &["--loftq-iter", "2"]].concat(),
        &["--loftq-iter", "loftq"],
    );
    check(
        &[&q[..], &["--lora-init", "loftq", "--loftq-iter", "0"]].concat(),
        &["--loftq-iter", "1..=16"],
    );
    check(
        &[
            &q[..],
            &["--lora-init", "loftq", "--loftq-iter", "99999999999"],
        ]
        .concat(),
        &["--loftq-iter"],
    );
    // qat trains every weight; a 4-bit LoRA base does not apply.
    let args: Vec<PathBuf> = [
        "qat",
        "--teacher",
        s(&src),
        "--method",
        "rtn",
        "--base-scheme",
        "nf4",
        "--data",
        s(&data),
        "--out",
        s(&out),
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    let refs: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
    fails(tmp.path(), &refs, "--base-scheme", &["qat"]);
}

/// `--requant gptq`: OUT holds what `compress quant --method gptq` makes of the merged student
/// (the same bytes), the adapters beside it, and no temporary folders.
#[test]
fn requant_writes_what_compress_quant_makes_of_the_merged_student() {
    let tmp = tempfile::tempdir().unwrap();
    let src = student(tmp.path());
    let data = tmp.path().join("train.txt");
    std::fs::write(&data, calib_text(1500)).unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "distill",
            "--student",
            s(&src),
            "--loss",
            "ce",
            "--data",
            s(&data),
            "--seq-len",
            "32",
            "--batch-tokens",
            "64",
            "--max-tokens",
            "128",
            "--lr",
            "1e-3",
            "--lora-rank",
            "4",
            "--base-scheme",
            "nf4",
            "--out",
            s(out),
        ];
        args.extend(extra);
        ok(&args)
    };
    let merged = tmp.path().join("merged");
    run(&merged, &[]);
    let by_hand = tmp.path().join("by-hand");
    ok(&[
        "quant",
        s(&merged),
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group",
        "32",
        "--calib",
        s(&data),
        "--calib-len",
        "32",
        "--out",
        s(&by_hand),
    ]);
    let out = tmp.path().join("requant");
    let extra = [
        "--requant",
        "gptq",
        "--requant-group",
        "32",
        "--lora-save",
        "both",
    ];
    run(&out, &extra);
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(read(&out) == read(&by_hand), "requantized weights differ");
    let q = json(&out.join("quant_report.json"));
    assert_eq!(q["report"]["method"], "gptq", "{q}");
    let cfg = json(&out.join("config.json"));
    assert!(cfg.get("quantization_config").is_some(), "{cfg}");
    let r = json(&out.join("distill_report.json"));
    assert_eq!(r["requant"]["method"], "gptq", "{r}");
    assert_eq!(r["requant"]["bits"], 4, "{r}");
    assert!(out.join("adapter/adapter_config.json").is_file());
    assert!(out.join("train_log.jsonl").is_file());
    for gone in [".merged", ".requant"] {
        assert!(!out.join(gone).exists(), "{gone} left in OUT");
    }
}

#[test]
fn bad_requant_options_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let src = student(tmp.path());
    let data = tmp.path().join("train.txt");
    std::fs::write(&data, calib_text(300)).unwrap();
    let out = tmp.path().join("o");
    let check = |cmd: &str, extra: &[&str], needles: &[&str]| {
        let mut args = vec![cmd, "--student", s(&src), "--data", s(&data)];
        args.extend(["--seq-len", "32", "--out", s(&out)]);
        args.extend(extra);
        fails_str(tmp.path(), &args, needles[0], &needles[1..]);
    };
    let ce = ["--loss", "ce"];
    check(
        "distill",
        &[&ce[..], &["--requant-bits", "3"]].concat(),
        &["--requant-bits", "--requant"],
    );
    check(
        "distill",
        &[&ce[..], &["--requant", "rtn", "--requant-bits", "9"]].concat(),
        &["--requant-bits 9"],
    );
    check(
        "distill",
        &[
            &ce[..],
            &[
                "--requant",
                "rtn",
                "--lora-rank",
                "4",
                "--lora-save",
                "adapters",
            ],
        ]
        .concat(),
        &["--requant", "--lora-save adapters"],
    );
    check(
        "qat",
        &["--method", "rtn", "--requant", "rtn"],
        &["--requant", "qat"],
    );
}
