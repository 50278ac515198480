//! `compress qat` on tiny synthetic models: it trains from RTN's grid towards the teacher,
//! writes a dense model whose linears hold at most 2^bits values per group (what `eval`
//! reads) and a packed one holding the same weights, with `quant_report.json`; bad inputs
//! fail with one line before training.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{fails, fails_str, ok};
use model::Checkpoint;
use model::testkit::{calib_text, logits, mean_kld, tiny_config, write_hf};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    teacher: PathBuf,
    data: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 1, |_, _| {});
    let data = root.join("train.txt");
    std::fs::write(&data, calib_text(2500)).unwrap();
    Fixture {
        _dir: dir,
        root,
        teacher,
        data,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Short training: 32-token windows, 4 per step, 12 steps.
const SMALL: [&str; 8] = [
    "--seq-len",
    "32",
    "--batch-tokens",
    "128",
    "--max-tokens",
    "1536",
    "--lr",
    "1e-4",
];

fn qat(f: &Fixture, out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "qat",
        "--teacher",
        s(&f.teacher),
        "--method",
        "rtn",
        "--data",
        s(&f.data),
        "--out",
        s(out),
    ];
    args.extend_from_slice(&SMALL);
    args.extend_from_slice(extra);
    ok(&args)
}

/// Mean KL(teacher ‖ model) over windows of the training text.
fn kld_to_teacher(f: &Fixture, model: &Path) -> f64 {
    let t = Checkpoint::open(&f.teacher).unwrap();
    let m = Checkpoint::open(model).unwrap();
    let tok = model::load_tokenizer(&t).unwrap();
    let ids = tok.encode(&calib_text(400)).unwrap();
    let windows: Vec<Vec<u32>> = ids.chunks(32).take(6).map(<[u32]>::to_vec).collect();
    mean_kld(&logits(&t, &windows), &logits(&m, &windows), 300)
}

/// The most distinct values any group of `group` inputs of a row holds, over every decoder
/// linear of `model`; and how many linears there are.
fn most_values_per_group(model: &Path, group: Option<usize>) -> (usize, usize) {
    let ckpt = Checkpoint::open(model).unwrap();
    let (mut most, mut linears) = (0, 0);
    for (name, shape) in ckpt.expected_tensors() {
        if !name.contains("_proj.weight") {
            continue;
        }
        linears += 1;
        let w = ckpt.read(&name, &shape).unwrap();
        let (rows, cols) = (shape[0], shape[1]);
        let g = group.unwrap_or(cols);
        for r in 0..rows {
            for c0 in (0..cols).step_by(g) {
                let end = (c0 + g).min(cols);
                let set: BTreeSet<u32> = w[r * cols + c0..r * cols + end]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                most = most.max(set.len());
            }
        }
    }
    (most, linears)
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("quant_report.json")).unwrap()).unwrap()
}

#[test]
fn qat_trains_on_the_grid_and_writes_a_model_eval_reads() {
    let f = fixture();
    let out = f.root.join("qat");
    let msg = qat(&f, &out, &["--bits", "3", "--group", "16"]);
    assert!(
        msg.contains("quantization-aware trained (W3 g16 asym)"),
        "{msg}"
    );
    assert!(msg.contains("12 steps"), "{msg}");
    // Every linear: at most 2^3 values in each group of 16 inputs.
    let (most, linears) = most_values_per_group(&out, Some(16));
    assert!((4..=8).contains(&most), "{most} values in a group");
    assert_eq!(linears, 21);
    let r = report(&out);
    assert_eq!(r["scheme"]["bits"], 3);
    assert_eq!(r["scheme"]["group"], 16);
    assert_eq!(r["qat"]["learn_scales"], false);
    // 3-bit codes, an f16 scale and a 3-bit zero per 16 weights.
    let bpw = r["report"]["linear_bits_per_weight"].as_f64().unwrap();
    assert!((bpw - (3.0 + 19.0 / 16.0)).abs() < 1e-9, "{bpw}");
    assert_eq!(r["report"]["linears"].as_array().unwrap().len(), 21);
    // Training moved the student towards the teacher from where RTN left it.
    let rtn = f.root.join("rtn");
    ok(&[
        "quant",
        s(&f.teacher),
        "--method",
        "rtn",
        "--bits",
        "3",
        "--group",
        "16",
        "--format",
        "dense",
        "--out",
        s(&rtn),
    ]);
    let (before, after) = (kld_to_teacher(&f, &rtn), kld_to_teacher(&f, &out));
    assert!(
        after < before,
        "KL to the teacher: RTN {before:.5}, QAT {after:.5}"
    );
    // The output is a model: eval reads it.
    let eval = ok(&[
        "eval",
        s(&out),
        "--ppl",
        s(&f.data),
        "--ctx",
        "32",
        "--chunks",
        "4",
    ]);
    assert!(eval.contains("perplexity"), "{eval}");

    // Learned symmetric per-channel scales, written dense and packed: still at most 2^4
    // values per row, and the packed model holds exactly the dense weights.
    let out = f.root.join("lsq");
    qat(
        &f,
        &out,
        &[
            "--bits",
            "4",
            "--per-channel",
            "--sym",
            "--learn-scales",
            "--format",
            "dense,packed",
        ],
    );
    let (most, linears) = most_values_per_group(&out, None);
    assert!(most <= 16 && linears == 21, "{most} values in a row");
    let r = report(&out);
    assert_eq!(r["qat"]["learn_scales"], true);
    assert_eq!(r["formats"], serde_json::json!(["dense", "packed"]));
    let (dense, packed) = (
        Checkpoint::open(&out).unwrap(),
        Checkpoint::open(&out.join("packed")).unwrap(),
    );
    let mut compared = 0;
    for (name, shape) in dense.expected_tensors() {
        if name.contains("_proj.weight") {
            let (d, p) = (dense.read(&name, &shape), packed.read(&name, &shape));
            assert!(
                d.unwrap() == p.unwrap(),
                "{name}: packed differs from dense"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 21);
    let eval = ok(&[
        "eval",
        s(&out.join("packed")),
        "--ppl",
        s(&f.data),
        "--ctx",
        "32",
        "--chunks",
        "2",
    ]);
    assert!(eval.contains("perplexity"), "{eval}");
}

#[test]
fn bad_inputs_fail_before_training_with_one_line() {
    let f = fixture();
    let r = &f.root;
    let out = r.join("out");
    let p = |x: &str| PathBuf::from(x);
    let base = |extra: &[&str]| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = vec![p("qat"), p("--teacher"), f.teacher.clone()];
        v.extend([p("--data"), f.data.clone(), p("--out"), out.clone()]);
        if !extra.contains(&"--seq-len") {
            v.extend(["--seq-len", "32", "--batch-tokens", "128"].map(p));
        }
        v.extend(extra.iter().map(|x| p(x)));
        v
    };
    let go = |args: Vec<PathBuf>, names: &str, needles: &[&str]| {
        let refs: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
        fails(r, &refs, names, needles);
    };
    // Nothing to start from.
    go(base(&[]), "--method", &["rtn", "--init"]);
    go(
        base(&["--method", "gptq"]),
        "--method",
        &["gptq", "--calib"],
    );
    go(base(&["--method", "awq"]), "--method", &["awq", "--calib"]);
    let d = f.data.to_str().unwrap();
    go(
        base(&["--method", "rtn", "--calib", d]),
        "--calib",
        &["gptq|awq"],
    );
    // The scheme out of range.
    go(
        base(&["--method", "rtn", "--bits", "9"]),
        "--bits 9",
        &["2 to 8"],
    );
    go(base(&["--method", "rtn", "--bits", "1"]), "--bits 1", &[]);
    go(base(&["--method", "rtn", "--group", "0"]), "--group", &[]);
    go(
        base(&["--method", "rtn", "--group", "16", "--per-channel"]),
        "--per-channel",
        &[],
    );
    // Formats qat does not write, or that cannot hold the bits.
    go(
        base(&["--method", "rtn", "--format", "gguf:q9_9"]),
        "gguf:q9_9",
        &["q4_0"],
    );
    go(
        base(&["--method", "rtn", "--format", "gguf:q4_0,gguf:q8_0"]),
        "--format",
        &["more than one"],
    );
    go(
        base(&["--method", "rtn", "--format", "dense,bnb"]),
        "--format bnb does not apply to qat",
        &["gguf:TYPE"],
    );
    go(
        base(&["--method", "rtn", "--bits", "3", "--format", "packed"]),
        "--format packed",
        &["2, 4 or 8"],
    );
    // A flag given a value, options that do not apply.
    go(
        base(&["--method", "rtn", "--learn-scales=yes"]),
        "--learn-scales",
        &["yes"],
    );
    go(
        base(&["--method", "rtn", "--lora-rank", "2"]),
        "--lora-rank",
        &["qat"],
    );
    // The training checks of distill still apply.
    go(
        base(&["--method", "rtn", "--seq-len", "300"]),
        "context",
        &[],
    );
    go(base(&["--method", "rtn", "--lr", "0"]), "--lr", &[]);
    // No model at all.
    let none: Vec<PathBuf> = [
        "qat",
        "--method",
        "rtn",
        "--loss",
        "ce",
        "--data",
        s(&f.data),
        "--out",
        s(&out),
    ]
    .map(p)
    .to_vec();
    go(none, "--teacher", &["--student"]);
}

/// QAT from GPTQ: GPTQ runs first on the same calibration as `compress quant` draws, and
/// with frozen scales the trained student keeps GPTQ's scales and zero points exactly (RTN's
/// would differ: GPTQ takes them from its error-updated weights); the report names the start,
/// and nothing of the start is left beside the output.
#[test]
fn qat_from_gptq_keeps_gptqs_grid() {
    let f = fixture();
    let calib = f.root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let scheme = ["--bits", "4", "--group", "16"];
    let cal = [
        "--calib",
        s(&calib),
        "--calib-samples",
        "4",
        "--calib-len",
        "32",
    ];
    // `compress quant` (calibrated unless rtn) and `compress qat`, packed W4 g16, into `name`.
    let quant = |method: &str, name: &str| -> PathBuf {
        let out = f.root.join(name);
        let mut args = vec![
            "quant",
            s(&f.teacher),
            "--method",
            method,
            "--format",
            "packed",
        ];
        args.extend_from_slice(&scheme);
        if method != "rtn" {
            args.extend_from_slice(&cal);
        }
        args.extend_from_slice(&["--out", s(&out)]);
        ok(&args);
        out
    };
    let train = |method: &str, name: &str, extra: &[&str]| -> PathBuf {
        let out = f.root.join(name);
        let mut args = vec!["qat", "--teacher", s(&f.teacher), "--method", method];
        args.extend_from_slice(&["--data", s(&f.data), "--format", "packed", "--out", s(&out)]);
        args.extend_from_slice(&scheme);
        args.extend_from_slice(&cal);
        args.extend_from_slice(&SMALL);
        args.extend_from_slice(extra);
        ok(&args);
        out
    };
    let ptq = quant("gptq", "gptq");
    let out = train("gptq", "qat-gptq", &[]);
    let open = |d: &Path| model::safetensors_io::SafetensorsSet::open(d).unwrap();
    let (a, b) = (open(&ptq), open(&out));
    let r = open(&quant("rtn", "rtn"));
    let mut differs_from_rtn = false;
    for l in ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"] {
        let name = format!("model.layers.0.{l}.weight_scale");
        let (x, y) = (
            a.read_f32(&name).unwrap().unwrap().0,
            b.read_f32(&name).unwrap().unwrap().0,
        );
        assert_eq!(x, y, "{name}: QAT's frozen scales are not GPTQ's");
        differs_from_rtn |= r.read_f32(&name).unwrap().unwrap().0 != x;
    }
    assert!(
        differs_from_rtn,
        "GPTQ's scales equal RTN's: the test shows nothing"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("quant_report.json")).unwrap()).unwrap();
    assert_eq!(report["ptq_start"]["method"], "gptq");
    assert_eq!(report["ptq_start"]["calibration"]["samples"], 4);
    // AWQ likewise: its scales, from its scaled weights, are the frozen ones.
    let (a, b) = (
        open(&quant("awq", "awq")),
        open(&train("awq", "qat-awq", &[])),
    );
    for l in ["self_attn.k_proj", "mlp.up_proj"] {
        let name = format!("model.layers.1.{l}.weight_scale");
        let (x, y) = (
            a.read_f32(&name).unwrap().unwrap().0,
            b.read_f32(&name).unwrap().unwrap().0,
        );
        assert_eq!(x, y, "{name}: QAT's frozen scales are not AWQ's");
    }
    // With checkpoints the start lives in OUT.ptq-start: the same student comes out, and the
    // folder goes with the checkpoints.
    let out2 = train("gptq", "qat-gptq-ckpt", &["--save-every", "4"]);
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        bytes(&out) == bytes(&out2),
        "the checkpointed run wrote another student"
    );
    assert!(!f.root.join("qat-gptq-ckpt.checkpoints").exists());
    assert!(!f.root.join("qat-gptq-ckpt.ptq-start").exists());
    let left: Vec<String> = std::fs::read_dir(&f.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("ptq-start") || n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `--gptq-latent`: the latent weights start at GPTQ's unrounded values, which still round to
/// GPTQ's codes (with a vanishing learning rate the packed student is GPTQ's, byte for byte),
/// and training from there differs from training from the grid points.
#[test]
fn qat_from_gptqs_unrounded_weights_starts_at_gptqs_model() {
    let f = fixture();
    let calib = f.root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let common = [
        "--bits",
        "4",
        "--group",
        "16",
        "--format",
        "packed",
        "--calib",
        s(&calib),
        "--calib-samples",
        "4",
        "--calib-len",
        "32",
    ];
    let ptq = f.root.join("gptq");
    let mut args = vec!["quant", s(&f.teacher), "--method", "gptq", "--out", s(&ptq)];
    args.extend_from_slice(&common);
    ok(&args);
    let train = |name: &str, lr: &str, latent: bool| -> PathBuf {
        let out = f.root.join(name);
        let mut args = vec!["qat", "--teacher", s(&f.teacher), "--method", "gptq"];
        args.extend_from_slice(&["--data", s(&f.data), "--out", s(&out), "--lr", lr]);
        args.extend_from_slice(&["--seq-len", "32", "--batch-tokens", "128"]);
        args.extend_from_slice(&["--max-tokens", "1536"]);
        args.extend_from_slice(&common);
        if latent {
            args.push("--gptq-latent");
        }
        ok(&args);
        out
    };
    let packed = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    let still = train("still", "1e-12", true);
    assert!(packed(&still) == packed(&ptq), "step 0 is not GPTQ's model");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(still.join("quant_report.json")).unwrap()).unwrap();
    assert_eq!(report["ptq_start"]["latent"], "gptq unrounded");
    let (latent, grid) = (train("latent", "1e-3", true), train("grid", "1e-3", false));
    assert!(
        packed(&latent) != packed(&grid),
        "the latent start changed nothing"
    );
    assert!(packed(&latent) != packed(&ptq), "training changed nothing");
    // Only GPTQ keeps unrounded weights.
    let out = f.root.join("x");
    let args = [
        "qat",
        "--teacher",
        s(&f.teacher),
        "--method",
        "rtn",
        "--gptq-latent",
        "--data",
        s(&f.data),
        "--out",
        s(&out),
    ];
    fails_str(&f.root, &args, "--gptq-latent", &["gptq"]);
}

/// `--format gguf:TYPE`: where the type's blocks hold the QAT grid (W4 g32 sym in q4_0, asym
/// in q4_1) every linear is written from its trained codes, so the file's weights are the
/// trained ones up to the f16 rounding of the scales; a type that cannot hold it (q4_k) gets
/// its own rounding, further from the trained weights, and the report says which.
#[test]
fn qat_gguf_keeps_the_grid_where_the_type_holds_it() {
    let f = fixture();
    let run = |name: &str, extra: &[&str]| -> serde_json::Value {
        let out = f.root.join(name);
        let mut args = vec!["--bits", "4", "--group", "32"];
        args.extend_from_slice(extra);
        qat(&f, &out, &args);
        assert!(out.join("model.gguf").is_file());
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("quant_report.json")).unwrap()).unwrap();
        r["gguf"].clone()
    };
    let errs = |g: &serde_json::Value| -> Vec<f64> {
        g["per_linear"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["rel_error"].as_f64().unwrap())
            .collect()
    };
    let sym = run("q4_0", &["--sym", "--format", "dense,gguf:q4_0"]);
    let asym = run("q4_1", &["--format", "gguf:q4_1"]);
    let k = run("q4_k", &["--sym", "--format", "gguf:q4_k_m"]);
    for g in [&sym, &asym] {
        assert_eq!(g["linears_grid_kept"], g["linears"], "{g}");
        assert!(errs(g).iter().all(|&e| e < 1e-3), "{:?}", errs(g));
    }
    assert!(!f.root.join("q4_1").join("model.safetensors").exists());
    assert_eq!(k["linears_grid_kept"], 0);
    let (kept, rounded) = (errs(&sym), errs(&k));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&rounded) > 10.0 * mean(&kept),
        "{rounded:?} vs {kept:?}"
    );
}
