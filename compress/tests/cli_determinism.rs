//! The same command, inputs and seed give byte-identical weights whatever the thread count:
//! GPTQ, AWQ and RTN quantization and Wanda / SparseGPT pruning on a small synthetic model,
//! run with `--threads 1`, `--threads 2` and `--threads 2` again. Widths are large enough
//! (hidden 256, intermediate 1024) for the parallel matrix products to split their work.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::ok;
use model::testkit::{calib_text, tiny_config, write_hf};

/// Every weight file of a written folder (reports hold wall times and are left out).
fn weights(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .is_some_and(|x| x == "safetensors" || x == "gguf")
            {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    assert!(!out.is_empty(), "{}: no weight files", dir.display());
    out
}

/// Guards that no parallel reduction (Hessian sums, matrix products, scale searches) depends
/// on how the work is split between threads (broken once by scaling the dampening with the
/// thread count: GPTQ's model.safetensors differed between --threads 1 and 2).
#[test]
fn outputs_are_byte_identical_for_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut cfg = tiny_config();
    cfg["hidden_size"] = 256.into();
    cfg["intermediate_size"] = 1024.into();
    cfg["num_hidden_layers"] = 2.into();
    let teacher = root.join("teacher");
    write_hf(&teacher, &cfg, 7, |_, _| {});
    let calib = root.join("calib.txt");
    std::fs::write(&calib, calib_text(6000)).unwrap();
    let (t, c) = (teacher.to_str().unwrap(), calib.to_str().unwrap());
    let cal = ["--calib", c, "--calib-samples", "8", "--calib-len", "64"];
    let runs: Vec<(&str, Vec<&str>)> = vec![
        (
            "gptq",
            [
                &[
                    "quant", t, "--method", "gptq", "--bits", "4", "--group", "64",
                ][..],
                &cal,
                &["--format", "dense,packed"],
            ]
            .concat(),
        ),
        (
            "awq",
            [
                &[
                    "quant", t, "--method", "awq", "--bits", "4", "--group", "64",
                ][..],
                &cal,
            ]
            .concat(),
        ),
        (
            "sparsegpt",
            [
                &["prune", t, "--method", "sparsegpt", "--pattern", "2:4"][..],
                &cal,
                &["--format", "dense,sparse"],
            ]
            .concat(),
        ),
        (
            "wanda",
            [
                &["prune", t, "--method", "wanda", "--sparsity", "0.5"][..],
                &cal,
            ]
            .concat(),
        ),
    ];
    for (name, args) in runs {
        let mut seen: Option<BTreeMap<String, Vec<u8>>> = None;
        for (i, threads) in ["1", "2", "2"].into_iter().enumerate() {
            let out = root.join(format!("{name}-{i}"));
            let o = out.to_str().unwrap();
            let mut full = args.clone();
            full.extend(["--threads", threads, "--out", o]);
            ok(&full);
            let w = weights(&out);
            match &seen {
                None => seen = Some(w),
                Some(first) => {
                    assert_eq!(
                        first.keys().collect::<Vec<_>>(),
                        w.keys().collect::<Vec<_>>()
                    );
                    for (k, v) in first {
                        assert!(
                            *v == w[k],
                            "{name}: {k} differs between --threads 1 and run {i} (--threads {threads})"
                        );
                    }
                }
            }
        }
    }
}
