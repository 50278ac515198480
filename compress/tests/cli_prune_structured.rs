//! `compress prune --structured` through the real binary on a tiny synthetic model: a run
//! writes a folder whose config matches its tensors, with a report; every bad request is
//! one `error:` line, exit 2, before any work, with nothing written.

mod common;

use std::path::Path;
use std::process::Command;

use common::fails;
use model::Checkpoint;
use model::testkit::{calib_text, tiny_config, write_hf};

#[test]
fn structured_prune_writes_a_smaller_model_and_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 3, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(3000)).unwrap();
    let (t, c) = (teacher.to_str().unwrap(), calib.to_str().unwrap());
    let out = root.join("student");
    let o = out.to_str().unwrap();

    let run = Command::new(env!("CARGO_BIN_EXE_compress"))
        .args([
            "prune",
            t,
            "--structured",
            "heads",
            "--count",
            "1",
            "--calib",
            c,
            "--calib-samples",
            "4",
            "--calib-len",
            "32",
            "--out",
            o,
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let line = String::from_utf8_lossy(&run.stdout);
    assert!(
        line.contains("1 of 2 KV groups") && line.contains("->"),
        "{line}"
    );
    let ckpt = Checkpoint::open(&out).unwrap();
    assert_eq!(ckpt.config().num_kv_heads(), 1);
    assert_eq!(ckpt.config().head_dim, Some(16));
    for (name, shape) in ckpt.expected_tensors() {
        ckpt.read(&name, &shape).unwrap();
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("prune_report.json")).unwrap()).unwrap();
    assert_eq!(report["params_after"], ckpt.config().num_params());
    assert_eq!(report["removed"]["per_layer"].as_array().unwrap().len(), 3);
    assert!(out.join("tokenizer.json").is_file());

    let bad = root.join("bad");
    let b = bad.to_str().unwrap();
    let base = ["prune", t, "--out", b];
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--structured", "heads", "--calib", c],
            &["--ratio", "--count"],
        ),
        (
            &[
                "--structured",
                "heads",
                "--ratio",
                "0.5",
                "--count",
                "1",
                "--calib",
                c,
            ],
            &["only one"],
        ),
        (
            &["--structured", "channels", "--ratio", "1.5", "--calib", c],
            &["--ratio 1.5", "(0, 1)"],
        ),
        (
            &["--structured", "channels", "--count", "0", "--calib", c],
            &["--count"],
        ),
        (
            &["--structured", "heads", "--count", "2", "--calib", c],
            &["2 of 2 KV groups"],
        ),
        (
            &["--structured", "layers", "--count", "3", "--calib", c],
            &["3 of 3 layers"],
        ),
        (
            &["--structured", "channels", "--count", "256", "--calib", c],
            &["256 of 256"],
        ),
        (
            &[
                "--structured",
                "layers",
                "--target-params",
                "1000",
                "--calib",
                c,
            ],
            &["unreachable"],
        ),
        (&["--structured", "heads", "--count", "1"], &["--calib"]),
        (
            &[
                "--structured",
                "layers",
                "--count",
                "1",
                "--importance",
                "magnitude",
            ],
            &["magnitude", "layers"],
        ),
    ];
    for (extra, needles) in cases {
        let args: Vec<&Path> = base.iter().chain(extra.iter()).map(Path::new).collect();
        fails(root, &args, "", needles);
    }
}
