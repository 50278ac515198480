//! `compress report` on fake run folders (small JSON reports, no model): the Markdown, CSV and
//! LaTeX tables hold each run's values, `-` where a run lacks one, escaped labels; the
//! frontier columns hold exactly the non-dominated runs; the SVG plots exist and name the
//! runs; bad input is one error line with nothing written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fails;
use serde_json::json;

fn write(path: &Path, v: &serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn task(acc: f64, se: f64, n: u64) -> serde_json::Value {
    json!({"acc": acc, "acc_stderr": se, "acc_norm": acc + 0.01, "acc_norm_stderr": se, "n": n, "seconds": 1.0})
}

fn ppl(value: f64, stderr: f64) -> serde_json::Value {
    json!({"value": value, "stderr": stderr, "mean_nll": 3.0, "chunks": 32, "ctx": 512,
        "tokens_scored": 8192, "tokens_total": 300000, "protocol": "llama",
        "tokens_processed": 16384, "wall_seconds": 10.0})
}

/// Four runs under `root`, as arguments in table order:
/// - `teacher/`: 538 MB, ppl 20.0, medqa 30%, speed (f32) and estimated energy;
/// - `gptq_w4g128/`: 100 MB, ppl 22.0, KLD, medqa 28%, no speed, no energy (and a
///   quant_report.json whose size the evaluation overrides);
/// - `evals/rtn_w4.json` (an eval file given directly): 110 MB, ppl 25.0, medqa 35%;
/// - `prune-50%/`: only prune_report.json (300 MB), nothing measured.
///
/// Size/perplexity frontier: gptq_w4g128 and teacher (rtn_w4 is bigger and worse than
/// gptq_w4g128). Size/medqa frontier: gptq_w4g128 and rtn_w4 (teacher is bigger and less
/// accurate than rtn_w4).
fn make_runs(root: &Path) -> Vec<PathBuf> {
    let teacher = root.join("teacher");
    write(
        &teacher.join("report.json"),
        &json!({
            "model": "models/teacher", "format": "hf",
            "size": {"bytes": 538_000_000u64, "params": 134_515_008u64, "bits_per_weight": 32.0},
            "text": "/data/wikitext-2-raw/wiki.test.raw", "perplexity": ppl(20.0, 0.2),
            "tasks": {"medqa": task(0.30, 0.01, 100)},
            "speed": {"tokens_per_second": 100.0, "wall_seconds": 10.0, "threads": 2,
                "pp_tokens_per_second": 200.0, "tg_tokens_per_second": 10.5,
                "compute_dtype": "f32", "peak_rss_bytes": 1000},
            "energy": {"source": "estimate", "joules": 50.0, "joules_per_1k_tokens": 44.4,
                "tokens": 1000, "cpu_seconds": 5.0, "wall_seconds": 10.0, "watts_per_core": 10.0,
                "grid_g_co2e_per_kwh": 475.0, "g_co2e": 0.01, "g_co2e_per_1k_tokens": 0.01}
        }),
    );
    let gptq = root.join("gptq_w4g128");
    write(
        &gptq.join("report.json"),
        &json!({
            "size": {"bytes": 100_000_000u64, "params": 134_515_008u64, "bits_per_weight": 4.5},
            "text": "/data/wikitext-2-raw/wiki.test.raw", "perplexity": ppl(22.0, 0.25),
            "kld": {"mean": 0.05, "stderr": 0.001, "median": 0.01, "p90": 0.1, "p99": 0.5,
                "max": 2.0, "top1_agreement": 90.0, "top1_agreement_stderr": 0.5,
                "rms_delta_p": 3.0, "n": 8192},
            "tasks": {"medqa": task(0.28, 0.012, 100)}
        }),
    );
    write(
        &gptq.join("quant_report.json"),
        &json!({"packed_bytes": 999u64, "dense_bytes": null}),
    );
    let rtn = root.join("evals").join("rtn_w4.json");
    write(
        &rtn,
        &json!({
            "size": {"bytes": 110_000_000u64, "params": 134_515_008u64, "bits_per_weight": 4.25},
            "text": "/data/wikitext-2-raw/wiki.test.raw", "perplexity": ppl(25.0, 0.3),
            "tasks": {"medqa": task(0.35, 0.011, 100)}
        }),
    );
    let pruned = root.join("prune-50%");
    write(
        &pruned.join("prune_report.json"),
        &json!({"params": 134_515_008u64, "dense_bytes": 538_000_000u64,
            "sparse": {"sparse_bytes": 300_000_000u64, "model_params": 134_515_008u64}}),
    );
    vec![teacher, gptq, rtn, pruned]
}

/// Runs `compress report RUNS... --out OUT EXTRA...`, asserting success; returns stderr.
fn report(runs: &[PathBuf], out: &Path, extra: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_compress"))
        .arg("report")
        .args(runs)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "compress report failed: {err}");
    err
}

/// The fields of one CSV line (RFC 4180 quoting, no line breaks inside fields).
fn csv_fields(line: &str) -> Vec<String> {
    let (mut fields, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

/// The CSV's rows, each a map from column name to field.
fn read_csv(path: &Path) -> Vec<std::collections::BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header = csv_fields(lines.next().unwrap());
    lines
        .map(|l| {
            let f = csv_fields(l);
            assert_eq!(f.len(), header.len(), "row {l}");
            header.iter().cloned().zip(f).collect()
        })
        .collect()
}

/// The Markdown table's row whose first cell is `label`.
fn md_row<'a>(md: &'a str, label: &str) -> &'a str {
    md.lines()
        .find(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("no row {label} in\n{md}"))
}

#[test]
fn tables_hold_the_values_dashes_and_escaped_labels() {
    let dir = tempfile::tempdir().unwrap();
    let runs = make_runs(dir.path());
    let out = dir.path().join("cmp");
    let err = report(&runs, &out, &[]);
    // The run without an evaluation is kept, with a note naming it.
    assert!(
        err.contains("prune-50%") && err.contains("no report.json"),
        "{err}"
    );

    let md = std::fs::read_to_string(out.join("table.md")).unwrap();
    let header = md.lines().next().unwrap();
    assert_eq!(
        header,
        "| run | size (MB) | bits/weight | params (M) | perplexity | KLD | medqa acc % | eval tok/s † | prompt tok/s † | gen tok/s † | energy J/1k tok |"
    );
    assert!(md.lines().nth(1).unwrap().starts_with("| :-- | --: |"));
    assert_eq!(
        md_row(&md, "teacher"),
        "| teacher | 538.0 | 32.00 | 134.5 | 20.000 ± 0.200 | - | 30.0 ± 1.0 | 100.0 | 200.0 | 10.5 | 44.4 |"
    );
    // Underscores escaped; the evaluation's size wins over quant_report.json's.
    assert_eq!(
        md_row(&md, "gptq\\_w4g128"),
        "| gptq\\_w4g128 | 100.0 | 4.50 | 134.5 | 22.000 ± 0.250 | 0.0500 ± 0.0010 | 28.0 ± 1.2 | - | - | - | - |"
    );
    assert!(md_row(&md, "rtn\\_w4").contains("| 110.0 | 4.25 |"));
    // Size from the prune report's sparse file; everything measured is "-".
    assert_eq!(
        md_row(&md, "prune-50%"),
        "| prune-50% | 300.0 | - | 134.5 | - | - | - | - | - | - | - |"
    );
    assert!(md.contains("† Speed (tok/s) measured on compress's f32 reference engine (teacher)."));
    assert!(md.contains(
        "wiki.test.raw, 32 chunks x 512 tokens, llama protocol (teacher, gptq\\_w4g128, rtn\\_w4)"
    ));
    assert!(md.contains("medqa: zero-shot accuracy (acc) ± standard error, n = 100 (teacher, gptq\\_w4g128, rtn\\_w4)"));
    assert!(md.contains(
        "Energy per 1,000 tokens processed: estimated from CPU time x watts per core (teacher)."
    ));

    let csv = read_csv(&out.join("table.csv"));
    let labels: Vec<&str> = csv.iter().map(|r| r["run"].as_str()).collect();
    assert_eq!(labels, ["teacher", "gptq_w4g128", "rtn_w4", "prune-50%"]);
    assert_eq!(csv[1]["bytes"], "100000000");
    assert_eq!(csv[1]["perplexity"], "22");
    assert_eq!(csv[1]["perplexity_stderr"], "0.25");
    assert_eq!(csv[1]["kld"], "0.05");
    assert_eq!(csv[1]["kld_lower_bound"], "no");
    assert_eq!(csv[1]["medqa_acc"], "0.28");
    assert_eq!(csv[1]["medqa_n"], "100");
    assert_eq!(csv[0]["gen_tokens_per_second"], "10.5");
    assert_eq!(csv[0]["speed_engine"], "compress's f32 reference engine");
    // Quoted because it holds commas.
    assert_eq!(
        csv[0]["perplexity_setup"],
        "wiki.test.raw, 32 chunks x 512 tokens, llama protocol"
    );
    assert_eq!(csv[0]["energy_source"], "estimate");
    assert_eq!(csv[3]["bytes"], "300000000");
    for col in [
        "perplexity",
        "kld",
        "medqa_acc",
        "eval_tokens_per_second",
        "speed_engine",
    ] {
        assert_eq!(csv[3][col], "-", "{col}");
    }

    let tex = std::fs::read_to_string(out.join("table.tex")).unwrap();
    assert!(
        tex.contains("\\begin{tabular}{lrrrrrrrrrr}\n\\toprule\n"),
        "{tex}"
    );
    assert!(tex.contains("medqa acc \\% & eval tok/s\\textsuperscript{\\dag}"));
    assert!(tex.contains("\\midrule\nteacher & 538.0 & 32.00 & 134.5 & $20.000 \\pm 0.200$ & - &"));
    assert!(tex.contains("\ngptq\\_w4g128 & 100.0 &"));
    assert!(tex.contains("\nprune-50\\% & 300.0 & - & 134.5 & - &"));
    assert!(tex.contains("\\bottomrule\n\\end{tabular}\n\\par\\smallskip\n{\\footnotesize\n\\textsuperscript{\\dag}Speed"));
    // The notes are escaped too.
    assert!(tex.contains("Perplexity ($\\pm$ standard error): wiki.test.raw, 32 chunks x 512 tokens, llama protocol (teacher, gptq\\_w4g128, rtn\\_w4).\\par\n"));
    assert!(tex.ends_with("\\par\n}\n"));
}

#[test]
fn frontier_is_exactly_the_non_dominated_runs_and_plots_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let r = make_runs(dir.path());
    // Another order, the run without measures first: rows follow the arguments, and each
    // flag belongs to its own run.
    let runs = [r[3].clone(), r[2].clone(), r[0].clone(), r[1].clone()];
    let out = dir.path().join("cmp");
    report(&runs, &out, &["--accuracy", "medqa"]);
    let csv = read_csv(&out.join("table.csv"));
    let flags = |col: &str| csv.iter().map(|r| r[col].clone()).collect::<Vec<_>>();
    assert_eq!(
        flags("run"),
        ["prune-50%", "rtn_w4", "teacher", "gptq_w4g128"]
    );
    // prune-50% has no perplexity and no medqa: "-".
    assert_eq!(flags("pareto_ppl"), ["-", "no", "yes", "yes"]);
    assert_eq!(flags("pareto_medqa"), ["-", "yes", "no", "yes"]);

    let ppl = std::fs::read_to_string(out.join("pareto_ppl.svg")).unwrap();
    let acc = std::fs::read_to_string(out.join("pareto_medqa.svg")).unwrap();
    for svg in [&ppl, &acc] {
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        for label in ["teacher", "gptq_w4g128", "rtn_w4", "Pareto frontier"] {
            assert!(svg.contains(label), "{label} not in the plot");
        }
        // A run without the plotted measure is not drawn.
        assert!(!svg.contains("prune-50%"));
    }
    assert!(ppl.contains("perplexity (lower is better)"));
    assert!(acc.contains("medqa acc % (higher is better)"));
}

#[test]
fn formats_select_the_outputs_and_force_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let runs = make_runs(dir.path());
    let out = dir.path().join("cmp");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old.txt"), "old").unwrap();
    report(&runs, &out, &["--format", "csv,tex", "--force"]);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["table.csv", "table.tex"]);
}

#[test]
fn bad_input_is_one_error_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let runs = make_runs(root);
    let (teacher, gptq) = (runs[0].as_path(), runs[1].as_path());
    let p = Path::new;
    let not_run = root.join("notes");
    std::fs::create_dir(&not_run).unwrap();
    std::fs::write(not_run.join("readme.txt"), "not a run").unwrap();
    let out = root.join("cmp");
    fails(
        root,
        &[p("report"), teacher, &not_run, p("--out"), &out],
        "notes",
        &["not a run folder", "report.json"],
    );
    fails(
        root,
        &[
            p("report"),
            teacher,
            &root.join("missing"),
            p("--out"),
            &out,
        ],
        "missing",
        &["no such run folder"],
    );
    fails(
        root,
        &[
            p("report"),
            teacher,
            p("--out"),
            &out,
            p("--format"),
            p("md,pdf"),
        ],
        "--format",
        &["pdf"],
    );
    let existing = root.join("existing");
    std::fs::create_dir(&existing).unwrap();
    fails(
        root,
        &[p("report"), teacher, gptq, p("--out"), &existing],
        "existing",
        &["already exists", "--force"],
    );
    // Inside a run folder: refused even with --force.
    let inside = gptq.join("cmp");
    fails(
        root,
        &[
            p("report"),
            teacher,
            gptq,
            p("--out"),
            &inside,
            p("--force"),
        ],
        "gptq_w4g128",
        &["input"],
    );
    fails(
        root,
        &[
            p("report"),
            teacher,
            p("--out"),
            &out,
            p("--accuracy"),
            p("piqa"),
        ],
        "piqa",
        &["no run has this task", "medqa"],
    );
    // A stage folder without an evaluation or any size.
    let bare = root.join("distilled");
    std::fs::create_dir(&bare).unwrap();
    std::fs::write(bare.join("distill_report.json"), "{}").unwrap();
    fails(
        root,
        &[p("report"), &bare, p("--out"), &out],
        "distilled",
        &["no evaluation"],
    );
    // An eval file that is not an evaluation report.
    let bad = root.join("bad.json");
    std::fs::write(&bad, "{\"hello\": 1}").unwrap();
    fails(
        root,
        &[p("report"), &bad, p("--out"), &out],
        "bad.json",
        &["not an evaluation report"],
    );
}
