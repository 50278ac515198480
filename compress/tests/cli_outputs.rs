//! Outputs and options of the other subcommands, through the real binary: `eval --json` and
//! `--save-teacher-logits` never replace an input or an existing file without `--force`;
//! absurd calibration sizes, contexts and dampening are refused before any work; a closed
//! output pipe ends the process quietly (no panic, no backtrace).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::fails;
use model::testkit::{calib_text, tiny_config, write_hf};

#[test]
fn outputs_never_replace_inputs_and_absurd_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 9, |_, _| {});
    let text = root.join("text.txt");
    std::fs::write(&text, calib_text(2000)).unwrap();
    let existing = root.join("report.json");
    std::fs::write(&existing, "{}").unwrap();
    let st = teacher.join("model.safetensors");
    let p = |s: &str| PathBuf::from(s);
    // `quant TEACHER --method M --calib TEXT FLAG VALUE --out q`: one option under test.
    let quant_with = |method: &str, flag: &str, value: &str| -> Vec<PathBuf> {
        let head = [p("quant"), teacher.clone(), p("--method"), p(method)];
        let tail = [p("--calib"), text.clone(), p(flag), p(value), p("--out")];
        head.into_iter()
            .chain(tail)
            .chain([root.join("q")])
            .collect()
    };
    let cases: Vec<(Vec<PathBuf>, &str, &str)> = vec![
        (
            vec![
                p("eval"),
                teacher.clone(),
                p("--ppl"),
                text.clone(),
                p("--ctx"),
                p("64"),
                p("--json"),
                st.clone(),
            ],
            "--json",
            "input",
        ),
        (
            vec![
                p("eval"),
                teacher.clone(),
                p("--ppl"),
                text.clone(),
                p("--ctx"),
                p("64"),
                p("--json"),
                text.clone(),
            ],
            "--json",
            "input",
        ),
        (
            vec![
                p("eval"),
                teacher.clone(),
                p("--ppl"),
                text.clone(),
                p("--ctx"),
                p("64"),
                p("--json"),
                existing.clone(),
            ],
            "--json",
            "already exists",
        ),
        (
            vec![
                p("eval"),
                teacher.clone(),
                p("--ppl"),
                text.clone(),
                p("--ctx"),
                p("64"),
                p("--teacher"),
                teacher.clone(),
                p("--save-teacher-logits"),
                st.clone(),
            ],
            "--save-teacher-logits",
            "input",
        ),
        (
            vec![
                p("eval"),
                teacher.clone(),
                p("--ppl"),
                text.clone(),
                p("--ctx"),
                p("100000"),
            ],
            "--ctx",
            "context",
        ),
        (quant_with("gptq", "--damp", "0"), "--damp", "(0, 1]"),
        (
            quant_with("gptq", "--sink-weight", "NaN"),
            "--sink-weight",
            "[1, 10000]",
        ),
        (
            quant_with("awq", "--sink-weight", "10"),
            "--sink-weight",
            "gptq only",
        ),
        (
            quant_with("gptq", "--awq-grid", "duo"),
            "--awq-grid",
            "awq only",
        ),
        (
            quant_with("rtn", "--awq-objective", "own"),
            "--awq-objective",
            "awq only",
        ),
        (
            vec![
                p("quant"),
                teacher.clone(),
                p("--method"),
                p("gptq"),
                p("--calib"),
                text.clone(),
                p("--calib-samples"),
                p("1000000000"),
                p("--calib-len"),
                p("128"),
                p("--out"),
                root.join("q"),
            ],
            "--calib-samples",
            "MiB",
        ),
        (
            vec![
                p("prune"),
                teacher.clone(),
                p("--method"),
                p("wanda"),
                p("--sparsity"),
                p("0.5"),
                p("--calib"),
                text.clone(),
                p("--calib-len"),
                p("100000"),
                p("--out"),
                root.join("q"),
            ],
            "--calib-len",
            "context",
        ),
    ];
    for (args, names, needle) in cases {
        let refs: Vec<&Path> = args.iter().map(|a| a.as_path()).collect();
        fails(root, &refs, names, &[needle]);
    }
}

/// Seen to fail (a panic on the failed print) with the SIGPIPE reset commented out.
#[test]
fn a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher");
    // Hundreds of tiny blocks: a JSON listing far larger than a pipe's buffer.
    let mut cfg = tiny_config();
    cfg["num_hidden_layers"] = 400.into();
    cfg["hidden_size"] = 16.into();
    cfg["intermediate_size"] = 16.into();
    write_hf(&teacher, &cfg, 9, |_, _| {});
    let mut child = Command::new(env!("CARGO_BIN_EXE_compress"))
        .args(["inspect", teacher.to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one byte, then close the pipe while the command is still writing.
    let mut out = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    let _ = out.read(&mut b);
    drop(out);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert_ne!(status.code(), Some(101), "{err}");
}
