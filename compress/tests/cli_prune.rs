//! `compress prune` through the real binary on a tiny synthetic model: a successful run
//! writes a loadable folder with the asked sparsity and a report; every bad option is one
//! `error:` line, exit 2, before any work, with nothing written.

mod common;

use std::path::Path;
use std::process::Command;

use common::fails;
use model::testkit::{calib_text, tiny_config, write_hf};

fn compress(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_compress"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `compress args` and requires success.
fn succeeds(args: &[&str]) {
    let r = compress(args);
    assert!(
        r.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn prune_writes_a_sparse_student_and_refuses_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 3, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let (t, c) = (teacher.to_str().unwrap(), calib.to_str().unwrap());
    let out = root.join("student");
    let o = out.to_str().unwrap();

    succeeds(&[
        "prune",
        t,
        "--method",
        "wanda",
        "--pattern",
        "2:4",
        "--calib",
        c,
        "--calib-samples",
        "4",
        "--calib-len",
        "32",
        "--out",
        o,
        "--format",
        "dense,sparse",
    ]);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("prune_report.json")).unwrap()).unwrap();
    let r = &report["report"];
    assert_eq!(
        r["linear_zeros"].as_u64().unwrap() * 2,
        r["linear_params"].as_u64().unwrap()
    );
    assert_eq!(report["pattern"]["kind"], "nof_m");
    let student = model::Checkpoint::open(&out).unwrap();
    let w = student
        .read("model.layers.2.mlp.down_proj.weight", &[64, 256])
        .unwrap();
    assert!(prune::mask::satisfies_nm(&w, 256, 2, 4));
    let sparse = std::fs::metadata(out.join("sparse/model.safetensors"))
        .unwrap()
        .len();
    let dense = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(sparse < dense, "sparse {sparse} >= dense {dense}");
    // No temporary folder is left beside the output.
    let left: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // `--dtype f32`: the weights magnitude keeps are the teacher's f32 values, bit for bit.
    let f32_out = root.join("f32");
    succeeds(&[
        "prune",
        t,
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--dtype",
        "f32",
        "--out",
        f32_out.to_str().unwrap(),
    ]);
    let (s, t32) = (
        model::Checkpoint::open(&f32_out).unwrap(),
        model::Checkpoint::open(&teacher).unwrap(),
    );
    let name = "model.layers.1.self_attn.o_proj.weight";
    assert_eq!(
        s.tensors().iter().find(|m| m.name == name).unwrap().dtype,
        "F32"
    );
    let (a, b) = (
        s.read(name, &[64, 64]).unwrap(),
        t32.read(name, &[64, 64]).unwrap(),
    );
    assert!(a.iter().zip(&b).all(|(x, y)| *x == 0.0 || x == y));
    assert_eq!(a.iter().filter(|&&x| x == 0.0).count(), a.len() / 2);

    // `--refit` with magnitude (calibration allowed then): the same zeros, kept weights moved,
    // and the report records the steps.
    let refit_out = root.join("refit");
    succeeds(&[
        "prune",
        t,
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--dtype",
        "f32",
        "--calib",
        c,
        "--calib-samples",
        "4",
        "--calib-len",
        "32",
        "--refit",
        "10",
        "--out",
        refit_out.to_str().unwrap(),
    ]);
    let r = model::Checkpoint::open(&refit_out)
        .unwrap()
        .read(name, &[64, 64])
        .unwrap();
    assert!(r.iter().zip(&a).all(|(x, y)| (*x == 0.0) == (*y == 0.0)));
    assert!(
        r.iter().zip(&a).any(|(x, y)| x != y),
        "the refit moved no weight"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(refit_out.join("prune_report.json")).unwrap())
            .unwrap();
    assert_eq!(report["options"]["refit"], 10);

    let p = |s: &str| Path::new(s).to_path_buf();
    let new_out = root.join("other");
    let no = new_out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["--method", "wanda", "--sparsity", "1.0", "--calib", c],
            "--sparsity",
            "outside",
        ),
        (
            vec!["--method", "wanda", "--sparsity", "-0.2", "--calib", c],
            "--sparsity",
            "outside",
        ),
        (
            vec!["--method", "magnitude", "--pattern", "4:4"],
            "--pattern",
            "N < M",
        ),
        (
            vec!["--method", "magnitude", "--pattern", "3:6"],
            "M does not divide",
            "q_proj",
        ),
        (
            vec![
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--pattern",
                "2:4",
            ],
            "--sparsity",
            "exclude",
        ),
        (
            vec!["--method", "wanda", "--sparsity", "0.5"],
            "--calib",
            "needs",
        ),
        (
            vec![
                "--method",
                "wanda",
                "--pattern",
                "2:4",
                "--nm-select",
                "saliency",
                "--calib",
                c,
            ],
            "--nm-select",
            "sparsegpt",
        ),
        (
            vec![
                "--method",
                "sparsegpt",
                "--sparsity",
                "0.5",
                "--nm-select",
                "exact",
                "--calib",
                c,
            ],
            "--nm-select",
            "--pattern",
        ),
        (
            vec![
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--calib",
                c,
                "--damp",
                "0.1",
            ],
            "--damp",
            "sparsegpt",
        ),
        (
            vec![
                "--method",
                "sparsegpt",
                "--sparsity",
                "0.5",
                "--calib",
                c,
                "--damp",
                "0",
            ],
            "--damp",
            "(0, 1]",
        ),
        (
            vec![
                "--method",
                "wanda",
                "--pattern",
                "2:4",
                "--calib",
                c,
                "--owl",
            ],
            "--owl",
            "unstructured",
        ),
        (
            vec!["--method", "magnitude", "--sparsity", "0.5", "--calib", c],
            "--calib",
            "data-free",
        ),
        (
            vec![
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--ratio",
                "0.2",
            ],
            "--ratio",
            "--structured",
        ),
        (
            vec!["--structured", "heads", "--method", "wanda"],
            "--method",
            "--structured",
        ),
        (vec!["--sparsity", "0.5"], "--method", "--structured"),
        (
            vec![
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--true-sequential",
            ],
            "--true-sequential",
            "calibrated",
        ),
        (
            vec![
                "--structured",
                "layers",
                "--count",
                "1",
                "--true-sequential",
            ],
            "--true-sequential",
            "--structured",
        ),
        (
            vec![
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--refit",
                "20",
            ],
            "--refit",
            "--calib",
        ),
        (
            vec![
                "--method",
                "wanda",
                "--sparsity",
                "0.5",
                "--calib",
                c,
                "--refit",
                "100000",
            ],
            "--refit",
            "beyond",
        ),
        (
            vec!["--structured", "layers", "--count", "1", "--refit", "5"],
            "--refit",
            "--structured",
        ),
        (
            vec![
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--dtype",
                "f8",
            ],
            "--dtype",
            "f8",
        ),
    ];
    for (args, names, needle) in cases {
        let mut full: Vec<std::path::PathBuf> = vec![p("prune"), teacher.clone()];
        full.extend(args.iter().map(|a| p(a)));
        full.extend([p("--out"), p(no)]);
        let refs: Vec<&Path> = full.iter().map(|x| x.as_path()).collect();
        fails(root, &refs, names, &[needle]);
    }
    // The existing output is not replaced without --force, and never inside the teacher.
    for (target, needle) in [
        (o.to_string(), "already exists"),
        (format!("{t}/x"), "input model"),
    ] {
        let args = [
            p("prune"),
            teacher.clone(),
            p("--method"),
            p("magnitude"),
            p("--sparsity"),
            p("0.5"),
            p("--out"),
            p(&target),
        ];
        let refs: Vec<&Path> = args.iter().map(|x| x.as_path()).collect();
        fails(root, &refs, "", &[needle]);
    }
    // A model whose config disagrees with its tensors (a structurally pruned model whose
    // config was edited back) is refused before any work, by every stage.
    let edited = root.join("edited");
    let mut cfg = tiny_config();
    write_hf(&edited, &cfg, 4, |_, _| {});
    cfg["intermediate_size"] = 192.into();
    std::fs::write(edited.join("config.json"), cfg.to_string()).unwrap();
    for args in [
        vec![
            p("prune"),
            edited.clone(),
            p("--method"),
            p("magnitude"),
            p("--sparsity"),
            p("0.5"),
        ],
        vec![
            p("prune"),
            edited.clone(),
            p("--structured"),
            p("channels"),
            p("--ratio"),
            p("0.25"),
            p("--importance"),
            p("magnitude"),
        ],
        vec![p("quant"), edited.clone(), p("--method"), p("rtn")],
    ] {
        let mut full = args;
        full.extend([p("--out"), p(no)]);
        let refs: Vec<&Path> = full.iter().map(|x| x.as_path()).collect();
        fails(root, &refs, "gate_proj", &["config and tensors disagree"]);
    }
}

/// prune -> quant to GGUF K-quants: every pruned zero is still exactly zero in the GGUF
/// (Q4_K's reference rounding moves zeros; the quantizer keeps them for pruned tensors).
#[test]
fn pruned_zeros_survive_gguf_k_quants() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let teacher = root.join("teacher");
    // Widths that are multiples of 256, so the linears are written as Q4_K / Q6_K.
    let mut cfg = tiny_config();
    cfg["hidden_size"] = 256.into();
    cfg["intermediate_size"] = 512.into();
    cfg["num_attention_heads"] = 4.into();
    cfg["num_key_value_heads"] = 4.into();
    write_hf(&teacher, &cfg, 11, |_, _| {});
    let pruned = root.join("pruned");
    let gguf = root.join("q.gguf");
    let back = root.join("back");
    for args in [
        vec![
            "prune",
            teacher.to_str().unwrap(),
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--dtype",
            "f32",
            "--out",
            pruned.to_str().unwrap(),
        ],
        vec![
            "quant",
            pruned.to_str().unwrap(),
            "--method",
            "rtn",
            "--format",
            "gguf:q4_k_m",
            "--out",
            gguf.to_str().unwrap(),
        ],
        vec![
            "convert",
            gguf.to_str().unwrap(),
            back.to_str().unwrap(),
            "--dtype",
            "f32",
        ],
    ] {
        succeeds(&args);
    }
    let (p, b) = (
        model::Checkpoint::open(&pruned).unwrap(),
        model::Checkpoint::open(&back).unwrap(),
    );
    let mut kquant = 0;
    for t in model::Checkpoint::open(&gguf).unwrap().tensors() {
        kquant += usize::from(t.dtype == "Q4_K");
    }
    assert!(kquant > 0, "no Q4_K tensor was written");
    for l in 0..3 {
        for (name, shape) in [
            ("self_attn.q_proj", [256, 256]),
            ("mlp.down_proj", [256, 512]),
            ("mlp.up_proj", [512, 256]),
        ] {
            let n = format!("model.layers.{l}.{name}.weight");
            let (a, q) = (p.read(&n, &shape).unwrap(), b.read(&n, &shape).unwrap());
            let lost = a
                .iter()
                .zip(&q)
                .filter(|(x, y)| **x == 0.0 && **y != 0.0)
                .count();
            assert_eq!(lost, 0, "{n}: {lost} pruned weights are no longer zero");
        }
    }
}

/// SparseGPT refits 3 steps unless told otherwise: the report says so, block 0 keeps the same
/// zeros as `--refit 0` (its statistics come from the unpruned block either way) and every one
/// of its linears reconstructs its outputs at least as well.
#[test]
fn sparsegpt_refits_by_default_and_refit_0_is_the_plain_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 3, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let (t, c) = (teacher.to_str().unwrap(), calib.to_str().unwrap());
    let run = |name: &str, extra: &[&str]| {
        let out = root.join(name);
        let mut args = vec![
            "prune",
            t,
            "--method",
            "sparsegpt",
            "--pattern",
            "2:4",
            "--calib",
            c,
            "--calib-samples",
            "4",
            "--calib-len",
            "32",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        succeeds(&args);
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("prune_report.json")).unwrap()).unwrap();
        (out, report)
    };
    let (d_out, d_rep) = run("default", &[]);
    let (p_out, p_rep) = run("plain", &["--refit", "0"]);
    assert_eq!(d_rep["options"]["refit"], 3);
    assert_eq!(p_rep["options"]["refit"], 0);
    let (d, p) = (
        model::Checkpoint::open(&d_out).unwrap(),
        model::Checkpoint::open(&p_out).unwrap(),
    );
    let mut moved = 0;
    for (name, shape) in model::checkpoint::block_tensors(d.config(), 0) {
        if !name.ends_with("proj.weight") {
            continue;
        }
        let (a, b) = (
            d.read(&name, &shape).unwrap(),
            p.read(&name, &shape).unwrap(),
        );
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(*x == 0.0, *y == 0.0, "{name}: the refit changed the mask");
        }
        moved += a.iter().zip(&b).filter(|(x, y)| x != y).count();
    }
    assert!(moved > 0, "the default refit moved no weight");
    let errs = |r: &serde_json::Value| -> Vec<(String, f64)> {
        r["report"]["linears"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["name"].as_str().unwrap().starts_with("model.layers.0."))
            .map(|l| {
                let n = l["name"].as_str().unwrap().to_string();
                (n, l["output_rel_error"].as_f64().unwrap())
            })
            .collect()
    };
    let (de, pe) = (errs(&d_rep), errs(&p_rep));
    assert_eq!(de.len(), 7);
    for ((n, a), (_, b)) in de.iter().zip(&pe) {
        assert!(
            *a <= b * 1.0001,
            "{n}: output error {a} with the refit, {b} without"
        );
    }
    assert!(de.iter().zip(&pe).any(|((_, a), (_, b))| a < &(b * 0.999)));
}
