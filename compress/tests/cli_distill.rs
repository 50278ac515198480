//! `compress distill` on tiny synthetic models: KD moves the student towards the teacher,
//! the output is a model the other commands read, a seed repeats a run bit for bit, and
//! bad inputs fail with one line before training.

mod common;

use std::path::{Path, PathBuf};

use common::{fails, ok};
use model::Checkpoint;
use model::testkit::{calib_text, logits, mean_kld, tiny_config, write_hf};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    teacher: PathBuf,
    student: PathBuf,
    data: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (teacher, student) = (root.join("teacher"), root.join("student"));
    write_hf(&teacher, &tiny_config(), 1, |_, _| {});
    write_hf(&student, &tiny_config(), 2, |_, _| {});
    let data = root.join("train.txt");
    std::fs::write(&data, calib_text(2500)).unwrap();
    Fixture {
        _dir: dir,
        root,
        teacher,
        student,
        data,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Common training options: 32-token windows, 4 per step, a short run.
const SMALL: [&str; 8] = [
    "--seq-len",
    "32",
    "--batch-tokens",
    "128",
    "--max-tokens",
    "1536",
    "--lr",
    "3e-3",
];

fn distill(f: &Fixture, out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "distill",
        "--student",
        s(&f.student),
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

#[test]
fn kd_moves_the_student_towards_the_teacher_and_writes_a_readable_model() {
    let f = fixture();
    let out = f.root.join("kd");
    let msg = distill(
        &f,
        &out,
        &["--teacher", s(&f.teacher), "--temperature", "2"],
    );
    assert!(msg.contains("12 steps"), "{msg}");
    let before = kld_to_teacher(&f, &f.student);
    let after = kld_to_teacher(&f, &out);
    assert!(
        after < 0.7 * before,
        "KL to the teacher {before:.4} -> {after:.4}"
    );
    // The log: one line per step, the KD term falling.
    let kd = log_field(&out, "kd");
    assert_eq!(kd.len(), 12);
    assert!(kd[11] < 0.7 * kd[0], "KD loss {kd:?}");
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
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("distill_report.json")).unwrap()).unwrap();
    assert_eq!(report["tokens_trained"], 1536);
}

#[test]
fn ce_fine_tuning_lowers_the_data_loss_without_a_teacher() {
    let f = fixture();
    let out = f.root.join("ce");
    distill(&f, &out, &["--loss", "ce"]);
    let ce = log_field(&out, "ce");

    assert!(ce[ce.len() - 1] < 0.8 * ce[0], "CE {ce:?}");
}

#[test]
fn the_same_seed_gives_the_same_weights() {
    let f = fixture();
    let run = |name: &str, seed: &str, lora: &[&str]| {
        let out = f.root.join(name);
        let mut args = vec!["--teacher", s(&f.teacher), "--seed", seed];
        args.extend_from_slice(lora);
        distill(&f, &out, &args);
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let (a, b, c) = (run("a", "3", &[]), run("b", "3", &[]), run("c", "4", &[]));
    assert!(a == b, "two runs with seed 3 wrote different weights");
    assert!(
        a != c,
        "seeds 3 and 4 (different window order) wrote the same weights"
    );
    // LoRA's random factors come from the seed too.
    let lora = ["--lora-rank", "2"];
    let (d, e) = (run("d", "5", &lora), run("e", "5", &lora));
    assert!(d == e, "two LoRA runs with seed 5 wrote different weights");
}

#[test]
fn bad_inputs_fail_before_training_with_one_line() {
    let f = fixture();
    let r = &f.root;
    let out = r.join("out");
    let (st, te, da) = (f.student.as_path(), f.teacher.as_path(), f.data.as_path());
    let p = |x: &str| PathBuf::from(x);
    let base = |extra: &[&str]| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = ["distill", "--student"].iter().map(|x| p(x)).collect();
        v.extend([
            st.to_path_buf(),
            p("--data"),
            da.to_path_buf(),
            p("--out"),
            out.clone(),
        ]);
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
    // A teacher with another vocabulary.
    let mut cfg = tiny_config();
    cfg["vocab_size"] = 320.into();
    let other = r.join("other");
    write_hf(&other, &cfg, 3, |_, _| {});
    go(base(&["--teacher", s(&other)]), "other", &["vocabulary"]);
    // An empty data file, and one shorter than a window.
    let empty = r.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let mut a = base(&["--teacher", s(te)]);
    a[4] = empty.clone();
    go(a, "empty.txt", &["fewer than one window"]);
    // A window beyond the context (256 in the tiny config).
    go(
        base(&["--teacher", s(te), "--seq-len", "300"]),
        "student",
        &["context"],
    );
    // Options that do not apply, or are missing.
    go(
        base(&["--loss", "ce", "--teacher", s(te)]),
        "--teacher",
        &["--loss ce"],
    );
    go(
        base(&["--loss", "ce", "--temperature", "2"]),
        "--temperature",
        &["--loss ce"],
    );
    go(base(&[]), "--teacher", &["needs"]);
    go(
        base(&["--teacher", s(te), "--jsd-beta", "0.5"]),
        "--jsd-beta",
        &["jsd"],
    );
    go(
        base(&["--teacher", s(te), "--loss", "jsd", "--jsd-beta", "1"]),
        "--jsd-beta",
        &["(0, 1)"],
    );
    go(base(&["--teacher", s(te), "--lr", "NaN"]), "--lr", &[]);
    go(
        base(&["--teacher", s(te), "--temperature", "0"]),
        "--temperature",
        &[],
    );
    go(
        base(&[
            "--teacher",
            s(te),
            "--seq-len",
            "64",
            "--batch-tokens",
            "32",
        ]),
        "--batch-tokens",
        &[],
    );
    // LoRA options out of range, without a rank, or naming no linear of the model.
    go(
        base(&["--teacher", s(te), "--lora-rank", "0"]),
        "--lora-rank",
        &[],
    );
    go(
        base(&["--teacher", s(te), "--lora-alpha", "8"]),
        "--lora-rank",
        &[],
    );
    go(
        base(&[
            "--teacher",
            s(te),
            "--lora-rank",
            "4",
            "--lora-targets",
            "q_proj,qq_proj",
        ]),
        "--lora-targets",
        &["qq_proj"],
    );
    // A device this build lacks (the default build has no CUDA backend).
    if !cfg!(feature = "cuda") {
        go(
            base(&["--teacher", s(te), "--device", "cuda"]),
            "--device cuda",
            &["--features cuda"],
        );
    }
    // The output may not be an input.
    let mut a = base(&["--teacher", s(te)]);
    a[6] = st.to_path_buf();
    go(a, "student", &["input model"]);
}

/// Numerical rank of a row-major `rows x cols` matrix (Gram-Schmidt on the rows).
fn rank(m: &[f32], rows: usize, cols: usize) -> usize {
    let scale = m.iter().map(|&x| (x as f64).abs()).fold(0.0, f64::max);
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for r in 0..rows {
        let mut v: Vec<f64> = m[r * cols..(r + 1) * cols]
            .iter()
            .map(|&x| x as f64)
            .collect();
        for b in &basis {
            let d: f64 = v.iter().zip(b).map(|(x, y)| x * y).sum();
            v.iter_mut().zip(b).for_each(|(x, y)| *x -= d * y);
        }
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if n > 1e-3 * scale * (cols as f64).sqrt() {
            basis.push(v.into_iter().map(|x| x / n).collect());
        }
    }
    basis.len()
}

#[test]
fn lora_changes_only_its_targets_by_low_rank_updates() {
    let f = fixture();
    let out = f.root.join("lora");
    distill(
        &f,
        &out,
        &[
            "--teacher",
            s(&f.teacher),
            "--lora-rank",
            "3",
            "--lora-targets",
            "q_proj,down_proj",
        ],
    );
    let before = Checkpoint::open(&f.student).unwrap();
    let after = Checkpoint::open(&out).unwrap();
    let mut adapted = 0;
    for (name, shape) in before.expected_tensors() {
        let (x, y) = (
            before.read(&name, &shape).unwrap(),
            after.read(&name, &shape).unwrap(),
        );
        if name.ends_with("q_proj.weight") || name.ends_with("down_proj.weight") {
            let d: Vec<f32> = y.iter().zip(&x).map(|(a, b)| a - b).collect();
            let r = rank(&d, shape[0], shape[1]);
            assert!((1..=3).contains(&r), "{name}: update of rank {r}");
            adapted += 1;
        } else {
            assert!(x == y, "{name} is not a LoRA target but changed");
        }
    }
    assert_eq!(adapted, 6);
    assert!(kld_to_teacher(&f, &out) < kld_to_teacher(&f, &f.student));
}

#[test]
fn a_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights() {
    let f = fixture();
    let args = |out: &Path| -> Vec<String> {
        let v: Vec<String> = [
            "distill",
            "--student",
            s(&f.student),
            "--teacher",
            s(&f.teacher),
            "--data",
            s(&f.data),
            "--out",
            s(out),
            "--seq-len",
            "32",
            "--batch-tokens",
            "128",
            "--max-tokens",
            "7680",
            "--lr",
            "1e-3",
            "--save-every",
            "2",
        ]
        .map(String::from)
        .to_vec();
        v
    };
    let whole = f.root.join("whole");
    let a: Vec<String> = args(&whole);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !f.root.join("whole.checkpoints").exists(),
        "checkpoints kept after success"
    );
    let expected = std::fs::read(whole.join("model.safetensors")).unwrap();

    // Killed (SIGKILL: no cleanup runs) once its second checkpoint is in place.
    let out = f.root.join("killed");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_compress"))
        .args(args(&out))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ck = f.root.join("killed.checkpoints/checkpoint-4");
    let t0 = std::time::Instant::now();
    while !ck.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run finished before it could be killed"
    );
    assert!(!out.exists(), "a killed run left an output");

    // A resume with other options is refused, naming what differs.
    let mut other = args(&out);
    other.extend(["--resume".into(), "--seed".into(), "9".into()]);
    let other: Vec<PathBuf> = other.iter().map(PathBuf::from).collect();
    let refs: Vec<&Path> = other.iter().map(PathBuf::as_path).collect();
    fails(
        &f.root,
        &refs,
        "killed.checkpoints",
        &["options.seed", "--resume"],
    );
    // A fresh run over the checkpoints is refused without --force.
    let fresh: Vec<PathBuf> = args(&out).iter().map(PathBuf::from).collect();
    let refs: Vec<&Path> = fresh.iter().map(PathBuf::as_path).collect();
    fails(
        &f.root,
        &refs,
        "killed.checkpoints",
        &["--resume", "--force"],
    );

    let mut resume = args(&out);
    resume.push("--resume".into());
    ok(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    let got = std::fs::read(out.join("model.safetensors")).unwrap();
    assert!(
        got == expected,
        "the resumed run wrote other weights than the uninterrupted one"
    );
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 60, "the log lost or repeated steps");
    // Nothing stale beside the outputs: the killed run's temporary folder is gone.
    let names: Vec<String> = std::fs::read_dir(&f.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains(".tmp-")),
        "stale temporaries: {names:?}"
    );
}

#[test]
fn kept_checkpoints_are_models_and_resume_needs_one() {
    let f = fixture();
    let out = f.root.join("kept");
    let none = distill_fails_args(&f, &out, &["--teacher", s(&f.teacher), "--resume"]);
    fails(
        &f.root,
        &none.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
        "kept.checkpoints",
        &["no checkpoint"],
    );
    distill(
        &f,
        &out,
        &[
            "--teacher",
            s(&f.teacher),
            "--save-every",
            "4",
            "--save-limit",
            "0",
            "--keep-checkpoints",
        ],
    );
    let root = f.root.join("kept.checkpoints");
    for step in [4, 8] {
        let ck = root.join(format!("checkpoint-{step}"));
        let e = ok(&[
            "eval",
            s(&ck),
            "--ppl",
            s(&f.data),
            "--ctx",
            "32",
            "--chunks",
            "2",
        ]);
        assert!(e.contains("perplexity"), "{e}");
    }
    assert!(
        !root.join("checkpoint-12").exists(),
        "the final step is the output, not a checkpoint"
    );
    let bad = distill_fails_args(
        &f,
        &f.root.join("x"),
        &["--teacher", s(&f.teacher), "--keep-checkpoints"],
    );
    fails(
        &f.root,
        &bad.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
        "--save-every",
        &[],
    );
}

fn distill_fails_args(f: &Fixture, out: &Path, extra: &[&str]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = [
        "distill",
        "--student",
        s(&f.student),
        "--data",
        s(&f.data),
        "--out",
        s(out),
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    v.extend(SMALL.iter().chain(extra).map(PathBuf::from));
    v
}

/// One field of every line of a run's train_log.jsonl.
fn log_field(out: &Path, field: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()[field]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn a_teacher_cache_trains_like_the_live_teacher_at_the_same_top_k() {
    let f = fixture();
    let cache = f.root.join("teacher.cache");
    let msg = ok(&[
        "distill",
        "--teacher",
        s(&f.teacher),
        "--data",
        s(&f.data),
        "--cache-teacher",
        s(&cache),
        "--seq-len",
        "32",
        "--top-k",
        "16",
        "--temperature",
        "2",
    ]);
    assert!(msg.contains("top 16 of 300"), "{msg}");
    let live = f.root.join("live");
    distill(
        &f,
        &live,
        &[
            "--teacher",
            s(&f.teacher),
            "--top-k",
            "16",
            "--temperature",
            "2",
        ],
    );
    let cached = f.root.join("cached");
    distill(
        &f,
        &cached,
        &["--teacher-cache", s(&cache), "--temperature", "2"],
    );
    let (a, b) = (log_field(&live, "loss"), log_field(&cached, "loss"));
    assert_eq!(a.len(), b.len());
    assert!(
        (a[0] - b[0]).abs() < 1e-4,
        "first step: live {} cached {}",
        a[0],
        b[0]
    );
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() < 1e-3 * x.abs().max(1.0),
            "live {a:?} cached {b:?}"
        );
    }
    assert!(
        b[b.len() - 1] < 0.7 * b[0],
        "training from the cache did not lower the loss: {b:?}"
    );

    // A cache for other windows or another temperature, or beside a live teacher: refused.
    let go = |extra: &[&str], names: &str, needles: &[&str]| {
        let args = distill_fails_args(&f, &f.root.join("o"), extra);
        fails(
            &f.root,
            &args.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
            names,
            needles,
        );
    };
    go(
        &["--teacher-cache", s(&cache)],
        "teacher.cache",
        &["temperature"],
    );
    go(
        &[
            "--teacher-cache",
            s(&cache),
            "--temperature",
            "2",
            "--top-k",
            "4",
        ],
        "--top-k",
        &[],
    );
    go(
        &["--teacher-cache", s(&cache), "--teacher", s(&f.teacher)],
        "--teacher",
        &["not both"],
    );
    let other = f.root.join("other.txt");
    std::fs::write(&other, calib_text(2400)).unwrap();
    let mut a = distill_fails_args(
        &f,
        &f.root.join("o"),
        &["--teacher-cache", s(&cache), "--temperature", "2"],
    );
    a[4] = other.clone();
    fails(
        &f.root,
        &a.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
        "teacher.cache",
        &["windows"],
    );
    // Writing a cache takes no student or output.
    let c2 = f.root.join("c2");
    let a: Vec<PathBuf> = [
        "distill",
        "--teacher",
        s(&f.teacher),
        "--data",
        s(&f.data),
        "--cache-teacher",
        s(&c2),
        "--student",
        s(&f.student),
        "--seq-len",
        "32",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    fails(
        &f.root,
        &a.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
        "--student",
        &["--cache-teacher"],
    );
}

#[test]
fn lora_adapters_in_peft_layout_rebuild_the_merged_model() {
    let f = fixture();
    let out = f.root.join("both");
    let lora = [
        "--teacher",
        s(&f.teacher),
        "--lora-rank",
        "3",
        "--lora-alpha",
        "6",
        "--lora-targets",
        "k_proj,up_proj",
    ];
    distill(&f, &out, &[&lora[..], &["--lora-save", "both"]].concat());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 3);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["k_proj", "up_proj"])
    );
    // W_merged = W_base + (alpha / r) B A, in HF's [out, in] layout.
    let st =
        distill::checkpoint::load_tensors(&out.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(st.len(), 3 * 2 * 2, "{:?}", st.keys().collect::<Vec<_>>());
    let base = Checkpoint::open(&f.student).unwrap();
    let merged = Checkpoint::open(&out).unwrap();
    for l in 0..3 {
        for m in ["self_attn.k_proj", "mlp.up_proj"] {
            let key = |x: &str| format!("base_model.model.model.layers.{l}.{m}.{x}.weight");
            let (a_shape, a) = &st[&key("lora_A")];
            let (b_shape, b) = &st[&key("lora_B")];
            let (r, inp, out_) = (a_shape[0], a_shape[1], b_shape[0]);
            assert_eq!((r, b_shape[1]), (3, 3));
            let name = format!("model.layers.{l}.{m}.weight");
            let w0 = base.read(&name, &[out_, inp]).unwrap();
            let w1 = merged.read(&name, &[out_, inp]).unwrap();
            let mut worst = 0f32;
            for o in 0..out_ {
                for i in 0..inp {
                    let d: f32 = (0..r).map(|k| b[o * r + k] * a[k * inp + i]).sum();
                    worst = worst.max((w0[o * inp + i] + 2.0 * d - w1[o * inp + i]).abs());
                }
            }
            assert!(
                worst < 1e-5,
                "{name}: merged differs from base + BA by {worst}"
            );
        }
    }
    // Adapters alone: a PEFT folder, no model.
    let only = f.root.join("only");
    distill(
        &f,
        &only,
        &[&lora[..], &["--lora-save", "adapters"]].concat(),
    );
    assert!(
        only.join("adapter_model.safetensors").exists() && !only.join("model.safetensors").exists()
    );
}

#[test]
fn hidden_state_loss_trains_and_its_options_are_checked() {
    let f = fixture();
    let out = f.root.join("hid");
    distill(
        &f,
        &out,
        &["--teacher", s(&f.teacher), "--hidden-weight", "0.5"],
    );
    let h = log_field(&out, "hidden");

    assert!(h[h.len() - 1] < 0.9 * h[0], "hidden-state loss {h:?}");
    // A narrower student: the projection is needed, then trains (and is not written).
    let mut sc = tiny_config();
    sc["hidden_size"] = 32.into();
    sc["num_attention_heads"] = 2.into();
    sc["num_key_value_heads"] = 1.into();
    let narrow = f.root.join("narrow");
    write_hf(&narrow, &sc, 5, |_, _| {});
    let go = |student: &Path, extra: &[&str], names: &str, needles: &[&str]| {
        let mut v = distill_fails_args(&f, &f.root.join("o"), extra);
        v[2] = student.to_path_buf();
        fails(
            &f.root,
            &v.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
            names,
            needles,
        );
    };
    let t = s(&f.teacher);
    go(
        &narrow,
        &["--teacher", t, "--hidden-weight", "1"],
        "--hidden-projection",
        &["32", "64"],
    );
    go(
        &f.student,
        &[
            "--teacher",
            t,
            "--hidden-weight",
            "1",
            "--hidden-projection",
        ],
        "--hidden-projection",
        &["does not apply"],
    );
    go(
        &f.student,
        &[
            "--teacher",
            t,
            "--hidden-weight",
            "1",
            "--hidden-layers",
            "0:3",
        ],
        "--hidden-layers",
        &["0:3"],
    );
    go(
        &f.student,
        &["--teacher", t, "--hidden-layers", "0:1"],
        "--hidden-weight",
        &[],
    );
    let n_out = f.root.join("narrow-kd");
    let mut args: Vec<String> = distill_fails_args(
        &f,
        &n_out,
        &[
            "--teacher",
            t,
            "--hidden-weight",
            "1",
            "--hidden-projection",
            "--hidden-layers",
            "0:0,2:2",
        ],
    )
    .iter()
    .map(|p| p.to_string_lossy().to_string())
    .collect();
    args[2] = s(&narrow).to_string();
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let names = Checkpoint::open(&n_out).unwrap().tensors().len();
    assert_eq!(
        names,
        Checkpoint::open(&narrow).unwrap().tensors().len(),
        "projections were written"
    );
}

/// A loss that is not finite stops the run at its step with one error line, nothing written:
/// a student whose (finite, loadable) weights overflow its activations.
#[test]
fn a_non_finite_loss_stops_the_run_naming_the_step() {
    let f = fixture();
    let wild = f.root.join("wild");
    write_hf(&wild, &tiny_config(), 2, |n, d| {
        if n.contains("down_proj") {
            d.iter_mut().for_each(|v| *v = 3e38);
        }
    });
    let out = f.root.join("out");
    let mut args: Vec<PathBuf> = ["distill", "--student"].map(PathBuf::from).to_vec();
    args.push(wild.clone());
    args.extend([
        PathBuf::from("--loss"),
        "ce".into(),
        "--data".into(),
        f.data.clone(),
    ]);
    args.extend(["--save-every", "1", "--out"].map(PathBuf::from));
    args.push(out.clone());
    args.extend(SMALL.map(PathBuf::from));
    let refs: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
    fails(&f.root, &refs, "step 1", &["not finite", "no checkpoint"]);
}
