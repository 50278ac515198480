//! First use, as a new user meets the CLI: help that lists every command, a compressed
//! `quant` output by default with its size against the input, one rule for `.gguf` outputs,
//! one error line for a missing file, reports whose path is printed, and the data script
//! (`scripts/get-data.sh`) checked end to end against a local mirror.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fails, ok, run};
use model::testkit::{calib_text, require_file, tiny_config, write_hf};

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `n` with digit grouping, as the CLI prints it.
fn grouped(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn help_lists_every_command_and_documents_the_options() {
    let top = ok(&["--help"]);
    let commands = top
        .split("Commands:")
        .nth(1)
        .and_then(|r| r.split("Options:").next())
        .unwrap_or_default();
    for c in ["inspect", "convert", "eval", "quant", "prune"] {
        assert!(
            commands.lines().any(|l| l.trim_start().starts_with(c)),
            "`compress --help` lacks {c}: {top}"
        );
    }
    assert!(top.contains("COMPRESS_DATA"), "{top}");
    let eval = ok(&["eval", "--help"]);
    for needle in ["KLD", "--tasks", "--limit", "--data-dir", "COMPRESS_DATA"] {
        assert!(
            eval.contains(needle),
            "`eval --help` lacks {needle}: {eval}"
        );
    }
    let quant = ok(&["quant", "--help"]);
    assert!(!quant.contains("must divide"), "{quant}");
    assert!(quant.contains("shorter last group"), "{quant}");
    assert!(quant.contains("Default:"), "{quant}");
}

#[test]
fn inspect_of_a_missing_file_prints_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    fails(
        dir.path(),
        &[Path::new("inspect"), &missing],
        "missing.gguf",
        &["No such file"],
    );
    let err = String::from_utf8_lossy(&run(&["inspect", s(&missing)]).stderr).into_owned();
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

#[test]
fn quant_writes_a_compressed_model_by_default_and_prints_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 7, |_, _| {});
    let (packed, dense) = (root.join("default"), root.join("dense"));
    let out = ok(&["quant", s(&teacher), "--out", s(&packed)]);
    ok(&[
        "quant",
        s(&teacher),
        "--format",
        "dense",
        "--out",
        s(&dense),
    ]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(packed.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["quantization_config"]["format"], "pack-quantized",
        "{cfg}"
    );
    let (p, d) = (
        len(&packed.join("model.safetensors")),
        len(&dense.join("model.safetensors")),
    );
    assert!(2 * p < d, "default output {p} bytes, dense bf16 {d} bytes");
    // `size: IN bytes (input) → OUT bytes (packed, ...)`, with digit grouping.
    let input = len(&teacher.join("model.safetensors"));
    let line = out.lines().find(|l| l.starts_with("size:")).unwrap_or("");
    assert!(
        line.contains(&format!(
            "{} bytes (input) → {} bytes (packed",
            grouped(input),
            grouped(p)
        )),
        "{out}"
    );
    assert!(grouped(p).contains(','), "{p} too small to show grouping");
    // Where the report went; RTN without calibration has no output error: `–` and a footnote.
    assert!(
        out.contains(&format!("report: {}", s(&packed.join("quant_report.json")))),
        "{out}"
    );
    assert!(packed.join("quant_report.json").is_file());
    assert!(!out.contains("NaN"), "{out}");
    assert!(out.contains("–") && out.contains("give --calib"), "{out}");
    assert!(out.contains("--format dense"), "{out}");
}

#[test]
fn a_gguf_out_is_a_file_for_quant_and_convert() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 5, |_, _| {});
    let t = s(&teacher);

    let c = root.join("c.gguf");
    ok(&["convert", t, s(&c), "--type", "q8_0"]);
    assert!(c.is_file());
    let q = root.join("q.gguf");
    let out = ok(&["quant", t, "--format", "gguf:q8_0", "--out", s(&q)]);
    assert!(q.is_file(), "quant --out q.gguf made a folder");
    let report = root.join("q.quant_report.json");
    assert!(report.is_file());
    assert!(out.contains(&format!("report: {}", s(&report))), "{out}");
    assert_eq!(len(&q), len(&c), "same type, same file size");
    // Without --format a .gguf OUT takes the GGUF type closest to the scheme (W4 asym: q4_1).
    let d = root.join("d.gguf");
    let out = ok(&["quant", t, "--out", s(&d)]);
    assert!(d.is_file() && out.contains("gguf:q4_1"), "{out}");
    // An HF-folder format with a .gguf OUT is refused.
    fails(
        root,
        &[
            Path::new("quant"),
            &teacher,
            Path::new("--format"),
            Path::new("dense"),
            Path::new("--out"),
            &root.join("x.gguf"),
        ],
        "x.gguf",
        &["--format dense"],
    );
}

#[test]
fn a_gguf_input_is_quantized_to_gguf_and_a_larger_output_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let teacher = root.join("teacher");
    // FFN 192: no row fits Q4_K's 256-value blocks.
    let mut cfg = tiny_config();
    cfg["intermediate_size"] = 192.into();
    write_hf(&teacher, &cfg, 11, |_, _| {});
    let f32 = root.join("f32.gguf");
    ok(&["convert", s(&teacher), s(&f32), "--type", "f32"]);
    // The default for a GGUF input: a folder with model.gguf of the closest type.
    let g = root.join("g");
    let out = ok(&["quant", s(&f32), "--out", s(&g)]);
    let file = g.join("model.gguf");
    assert!(file.is_file() && g.join("quant_report.json").is_file());
    assert!(len(&file) < len(&f32) / 4, "{out}");
    assert!(out.contains("gguf:q4_1") && out.contains("→"), "{out}");

    // q4_k_m from a q5_0 input: the rows (64 and 192 wide) fall back from Q4_K to q5_0, and
    // from Q6_K to q8_0; the output is larger than the input, and says so.
    let q5 = root.join("q5_0.gguf");
    ok(&["convert", s(&teacher), s(&q5), "--type", "q5_0"]);
    let k = root.join("k.gguf");
    let out = ok(&["quant", s(&q5), "--format", "gguf:q4_k_m", "--out", s(&k)]);
    assert!(len(&k) > len(&q5));
    assert!(
        out.contains("larger than the input") && out.contains("fell back"),
        "{out}"
    );
    let named = out
        .split("gguf:")
        .last()
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    assert!(out.contains("would be smaller"), "{out}");
    let alt = root.join("alt.gguf");
    ok(&["convert", s(&teacher), s(&alt), "--type", &named]);
    assert!(
        len(&alt) < len(&q5),
        "gguf:{named} is not smaller than the input: {out}"
    );
}

#[test]
fn eval_says_where_the_report_went_and_where_task_data_comes_from() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let teacher = root.join("teacher");
    write_hf(&teacher, &tiny_config(), 3, |_, _| {});
    let text = root.join("text.txt");
    std::fs::write(&text, calib_text(1500)).unwrap();
    let json = root.join("r.json");
    let out = ok(&[
        "eval",
        s(&teacher),
        "--ppl",
        s(&text),
        "--ctx",
        "64",
        "--chunks",
        "2",
        "--json",
        s(&json),
    ]);
    assert!(json.is_file());
    assert!(out.contains(&format!("report: {}", s(&json))), "{out}");
    let nodata = root.join("nodata");
    fails(
        root,
        &[
            Path::new("eval"),
            &teacher,
            Path::new("--tasks"),
            Path::new("piqa"),
            Path::new("--data-dir"),
            &nodata,
        ],
        "nodata",
        &["COMPRESS_DATA", "scripts/get-data.sh"],
    );
}

/// `scripts/get-data.sh` against a mirror built from the shared data folder: the files come
/// back byte for byte, and a damaged file is refused by its sha256, leaving nothing behind.
#[test]
fn get_data_fetches_from_a_mirror_and_checks_sha256() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let shared = std::env::var_os("COMPRESS_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("../shared/data"));
    if !require_file(
        &shared.join("wikitext-2-raw/wiki.test.raw"),
        "the data folder; scripts/get-data.sh fetches it",
    ) {
        return;
    }
    let script = repo.join("scripts/get-data.sh");
    let dir = tempfile::tempdir().unwrap();
    let (mirror, data) = (dir.path().join("mirror"), dir.path().join("data"));
    let bash = |args: &[&str], env: &[(&str, &Path)]| -> Output {
        let mut c = Command::new("bash");
        c.arg(&script).args(args).env_remove("COMPRESS_DATA_MIRROR");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let o = bash(
        &["--make-mirror", s(&mirror)],
        &[("COMPRESS_DATA", &shared)],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let url = PathBuf::from(format!("file://{}", s(&mirror)));
    let o = bash(&[s(&data)], &[("COMPRESS_DATA_MIRROR", &url)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains(&format!("export COMPRESS_DATA={}", s(&data))),
        "{stdout}"
    );
    let files = [
        "wikitext-2-raw/wiki.test.raw",
        "wikitext-2/wiki.valid.tokens",
        "pubmedqa/ori_pqal.json",
        "pubmedqa/test_ground_truth.json",
        "piqa/valid.jsonl",
        "piqa/valid-labels.lst",
        "arc/arc_easy_test.jsonl",
        "medqa/test.jsonl",
        "mmlu-medical/anatomy_test.csv",
        "mmlu-medical/professional_medicine_test.csv",
    ];
    for f in files {
        assert!(
            std::fs::read(data.join(f)).unwrap() == std::fs::read(shared.join(f)).unwrap(),
            "{f} differs"
        );
    }
    // A damaged source: refused, and the file is not left in place.
    let medqa = mirror
        .join("raw.githubusercontent.com/xk-huang/medagents-benchmark/HEAD/data/medqa/test.jsonl");
    let mut bytes = std::fs::read(&medqa).unwrap();
    bytes[100] ^= 1;
    std::fs::remove_file(&medqa).unwrap();
    std::fs::write(&medqa, bytes).unwrap();
    std::fs::remove_file(data.join("medqa/test.jsonl")).unwrap();
    let o = bash(&[s(&data)], &[("COMPRESS_DATA_MIRROR", &url)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a damaged file was accepted");
    assert!(
        err.contains("medqa/test.jsonl") && err.contains("sha256"),
        "{err}"
    );
    assert!(!data.join("medqa/test.jsonl").exists());
    assert!(!data.join("medqa/test.jsonl.part").exists());
}

/// `inspect` says when rope_theta is HF's class default rather than the file's value (a
/// config without it), in the table and in --json; a config that has it says nothing more.
#[test]
fn inspect_says_when_rope_theta_is_a_default() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    write_hf(&m, &tiny_config(), 1, |_, _| {});
    let json = |m: &Path| -> serde_json::Value {
        serde_json::from_str(&ok(&["inspect", s(m), "--json"])).unwrap()
    };
    assert_eq!(json(&m)["rope_theta_defaulted"], false);
    assert!(!ok(&["inspect", s(&m)]).contains("not in config.json"));
    let cfg_path = m.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("rope_theta");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    assert_eq!(json(&m)["rope_theta_defaulted"], true);
    assert!(ok(&["inspect", s(&m)]).contains("not in config.json"));
}
