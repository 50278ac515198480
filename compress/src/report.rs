//! `compress report RUN_DIR... --out DIR`: one comparison table (Markdown, CSV, LaTeX
//! booktabs) and Pareto plots (SVG) from the reports that `compress eval` and the stages
//! wrote.
//!
//! Where the numbers come from, per argument:
//! - a folder: its evaluation is `FOLDER/report.json` (`compress eval ... --json
//!   FOLDER/report.json`); its size facts come from that report, else from the stage
//!   reports in the folder (`quant_report.json`, `prune_report.json`,
//!   `distill_report.json`), else from the weight files at its top level. The label is the
//!   folder's name.
//! - a file: it is the evaluation report (any `compress eval --json` output), labelled with
//!   its stem; a file named `report.json` stands for its folder.
//!
//! A folder with neither report.json nor a stage report is not a run (an error); a run with
//! no evaluation but a size is kept, its measured columns empty ("-"), with a note.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::output::{TempGuard, check_output, commit, temp_sibling};
use crate::report_plot::{PlotPoint, pareto_front, plot_pareto};

/// Arguments of `report`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run folders (with report.json from `compress eval --json`, and/or a stage's
    /// quant/prune/distill report) or evaluation JSON files, in table order.
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<crate::Path>,
    /// Output folder: table.md, table.csv, table.tex, pareto_ppl.svg, pareto_TASK.svg.
    #[arg(long)]
    out: crate::Path,
    /// What to write, comma-separated: md, csv, tex, svg (the plots).
    #[arg(long, value_delimiter = ',', default_values = ["md", "csv", "tex", "svg"])]
    format: Vec<Format>,
    /// Task whose accuracy the second plot shows (default: the first task, by name, that any
    /// run has).
    #[arg(long, value_name = "TASK")]
    accuracy: Option<String>,
    /// Replace an existing --out folder.
    #[arg(long)]
    force: bool,
}

/// An output of `report`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// table.md
    Md,
    /// table.csv
    Csv,
    /// table.tex
    Tex,
    /// pareto_*.svg
    Svg,
}

/// A measurement and its standard error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pm {
    /// The value.
    pub value: f64,
    /// Its standard error.
    pub stderr: f64,
}

/// One task's zero-shot scores (fractions, as in the eval report).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskAcc {
    /// Accuracy ± stderr.
    pub acc: Pm,
    /// Length-normalized accuracy ± stderr.
    pub acc_norm: Pm,
    /// Documents scored.
    pub n: u64,
}

/// What one run contributes to the table; `None` where the reports do not say.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Folder name (or the eval file's stem).
    pub label: String,
    /// The argument it was read from.
    pub path: PathBuf,
    /// Bytes on disk of the model.
    pub bytes: Option<u64>,
    /// Bits of tensor data per parameter.
    pub bpw: Option<f64>,
    /// Parameters.
    pub params: Option<u64>,
    /// Perplexity ± stderr.
    pub ppl: Option<Pm>,
    /// Text, chunks, context and protocol of the perplexity.
    pub ppl_setup: Option<String>,
    /// Mean KL(teacher ‖ student) ± stderr.
    pub kld: Option<Pm>,
    /// The KLD is over the teacher's saved top-k only (a lower bound).
    pub kld_lower_bound: bool,
    /// Task scores by task name.
    pub tasks: BTreeMap<String, TaskAcc>,
    /// Tokens per second of the perplexity pass.
    pub eval_tps: Option<f64>,
    /// Prompt-processing tokens per second (`eval --speed`).
    pub pp_tps: Option<f64>,
    /// Generation tokens per second (`eval --speed`).
    pub tg_tps: Option<f64>,
    /// What the speed was measured on.
    pub engine: Option<String>,
    /// Joules per 1,000 tokens.
    pub energy: Option<f64>,
    /// `rapl` or `estimate`.
    pub energy_source: Option<String>,
    /// Whether an evaluation report was read.
    pub evaluated: bool,
}

impl Run {
    /// Whether any speed was measured.
    pub fn has_speed(&self) -> bool {
        self.eval_tps.is_some() || self.pp_tps.is_some() || self.tg_tps.is_some()
    }
}

/// Stage reports read for size facts, in this order.
const STAGE_REPORTS: [&str; 3] = [
    "quant_report.json",
    "prune_report.json",
    "distill_report.json",
];

/// Size fields of each stage report, smallest stored form first.
fn stage_size_fields(name: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match name {
        "quant_report.json" => (
            &["/packed_bytes", "/bnb_bytes", "/file_bytes", "/dense_bytes"],
            &["/params"],
        ),
        "prune_report.json" => (
            &["/sparse/sparse_bytes", "/dense_bytes", "/bytes_after"],
            &["/params_after", "/params"],
        ),
        _ => (&[], &[]),
    }
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

fn first_u64(v: &Value, ptrs: &[&str]) -> Option<u64> {
    ptrs.iter()
        .find_map(|p| v.pointer(p).and_then(Value::as_u64).filter(|&b| b > 0))
}

fn num(v: &Value, ptr: &str) -> Option<f64> {
    v.pointer(ptr)
        .and_then(Value::as_f64)
        .filter(|x| x.is_finite())
}

fn pm(v: &Value, value: &str, stderr: &str) -> Option<Pm> {
    Some(Pm {
        value: num(v, value)?,
        stderr: num(v, stderr).unwrap_or(f64::NAN),
    })
}

/// Reads one argument: a run folder or an evaluation JSON file.
pub fn read_run(arg: &Path) -> anyhow::Result<Run> {
    let canon = arg
        .canonicalize()
        .with_context(|| format!("{}: no such run folder or report", arg.display()))?;
    let named_report = canon.file_name().is_some_and(|n| n == "report.json");
    let (dir, eval_file, label_of) = if canon.is_dir() {
        let r = canon.join("report.json");
        (Some(canon.clone()), r.is_file().then_some(r), canon.clone())
    } else if named_report {
        let d = canon.parent().map(Path::to_path_buf).unwrap_or_default();
        (Some(d.clone()), Some(canon.clone()), d)
    } else {
        (None, Some(canon.clone()), canon.with_extension(""))
    };
    let label = label_of
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| arg.display().to_string());
    let mut run = Run {
        label,
        path: arg.to_path_buf(),
        ..Run::default()
    };
    if let Some(f) = &eval_file {
        read_eval(&mut run, f)?;
    }
    let stages: Vec<&str> = dir
        .as_ref()
        .map(|d| {
            STAGE_REPORTS
                .into_iter()
                .filter(|s| d.join(s).is_file())
                .collect()
        })
        .unwrap_or_default();
    if !run.evaluated && stages.is_empty() {
        bail!(
            "{}: not a run folder: no report.json (write it with `compress eval MODEL ... --json {}/report.json`) and none of {}",
            arg.display(),
            arg.display(),
            STAGE_REPORTS.join(", ")
        );
    }
    if let Some(d) = &dir {
        fill_size(&mut run, d, &stages)?;
    }
    if !run.evaluated && run.bytes.is_none() {
        bail!(
            "{}: no evaluation (report.json) and no size in {}",
            arg.display(),
            stages.join(", ")
        );
    }
    Ok(run)
}

/// Fills what an evaluation report (`compress eval --json`) holds.
fn read_eval(run: &mut Run, path: &Path) -> anyhow::Result<()> {
    let v = read_json(path)?;
    let known = ["size", "perplexity", "kld", "tasks", "speed"];
    if !v.is_object() || !known.iter().any(|k| v.get(k).is_some()) {
        bail!(
            "{}: not an evaluation report of `compress eval --json` (none of {})",
            path.display(),
            known.join(", ")
        );
    }
    run.evaluated = true;
    run.bytes = first_u64(&v, &["/size/bytes"]);
    run.params = first_u64(&v, &["/size/params"]);
    run.bpw = num(&v, "/size/bits_per_weight").filter(|&b| b > 0.0);
    run.ppl = pm(&v, "/perplexity/value", "/perplexity/stderr");
    if run.ppl.is_some() {
        let text = v
            .get("text")
            .and_then(Value::as_str)
            .map(|t| {
                Path::new(t)
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| t.to_string())
            })
            .unwrap_or_else(|| "unknown text".into());
        let field = |k: &str| match v.pointer(&format!("/perplexity/{k}")) {
            Some(Value::String(s)) => s.clone(),
            Some(x) => x.to_string(),
            None => "?".into(),
        };
        run.ppl_setup = Some(format!(
            "{text}, {} chunks x {} tokens, {} protocol",
            field("chunks"),
            field("ctx"),
            field("protocol").to_lowercase()
        ));
    }
    run.kld = pm(&v, "/kld/mean", "/kld/stderr");
    run.kld_lower_bound = v.pointer("/kld/approximation").is_some();
    if let Some(tasks) = v.get("tasks").and_then(Value::as_object) {
        for (name, t) in tasks {
            let (Some(acc), Some(acc_norm)) = (
                pm(t, "/acc", "/acc_stderr"),
                pm(t, "/acc_norm", "/acc_norm_stderr"),
            ) else {
                bail!("{}: task `{name}` has no acc and acc_norm", path.display());
            };
            let n = t.get("n").and_then(Value::as_u64).unwrap_or(0);
            run.tasks.insert(name.clone(), TaskAcc { acc, acc_norm, n });
        }
    }
    run.eval_tps = num(&v, "/speed/tokens_per_second");
    run.pp_tps = num(&v, "/speed/pp_tokens_per_second");
    run.tg_tps = num(&v, "/speed/tg_tokens_per_second");
    if run.has_speed() {
        let engine = v.pointer("/speed/engine").and_then(Value::as_str);
        let dtype = v.pointer("/speed/compute_dtype").and_then(Value::as_str);
        run.engine = Some(match (engine, dtype) {
            (Some(e), _) => e.to_string(),
            // e.g. "f32 (weights dequantized on load)": the type is the first word.
            (None, Some(d)) => format!(
                "compress's {} reference engine",
                d.split_whitespace().next().unwrap_or(d)
            ),
            (None, None) => {
                "compress's f32 reference engine (assumed: the report does not say)".into()
            }
        });
    }
    if v.pointer("/energy/tokens").and_then(Value::as_u64) > Some(0) {
        run.energy = num(&v, "/energy/joules_per_1k_tokens");
        run.energy_source = v
            .pointer("/energy/source")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    Ok(())
}

/// Fills the size facts the evaluation left out from the folder's stage reports, then from
/// its weight files.
fn fill_size(run: &mut Run, dir: &Path, stages: &[&str]) -> anyhow::Result<()> {
    for s in stages {
        let v = read_json(&dir.join(s))?;
        let (bytes, params) = stage_size_fields(s);
        run.bytes = run.bytes.or_else(|| first_u64(&v, bytes));
        run.params = run.params.or_else(|| first_u64(&v, params));
        if *s == "quant_report.json" && v.get("file_bytes").is_some() {
            // GGUF export: bits per weight over all tensor data, as `eval` reports it.
            run.bpw = run.bpw.or_else(|| num(&v, "/bits_per_weight"));
        }
    }
    if run.bytes.is_none() && !stages.is_empty() {
        let mut total = 0u64;
        for e in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
            let p = e?.path();
            let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
            if p.is_file() && (ext == "safetensors" || ext == "gguf") {
                total += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            }
        }
        run.bytes = (total > 0).then_some(total);
    }
    Ok(())
}

/// Every task name any run has, sorted.
fn all_tasks(runs: &[Run]) -> Vec<String> {
    let mut t: Vec<String> = runs.iter().flat_map(|r| r.tasks.keys().cloned()).collect();
    t.sort();
    t.dedup();
    t
}

/// Frontier membership per run (`None` where the run lacks either coordinate), with both
/// coordinates smaller-is-better after `key`.
fn frontier_flags(runs: &[Run], key: impl Fn(&Run) -> Option<(f64, f64)>) -> Vec<Option<bool>> {
    let idx: Vec<usize> = (0..runs.len())
        .filter(|&i| key(&runs[i]).is_some())
        .collect();
    let pts: Vec<(f64, f64)> = idx.iter().filter_map(|&i| key(&runs[i])).collect();
    let front = pareto_front(&pts);
    let mut flags = vec![None; runs.len()];
    for (k, &i) in idx.iter().enumerate() {
        flags[i] = Some(front.contains(&k));
    }
    flags
}

/// Runs `compress report`.
pub fn run(a: Args) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for r in &a.runs {
        runs.push(read_run(r)?);
    }
    for r in &a.runs {
        check_output(r, &a.out, a.force)?;
    }
    let tasks = all_tasks(&runs);
    let accuracy = match &a.accuracy {
        Some(t) if !tasks.contains(t) => bail!(
            "--accuracy {t}: no run has this task ({})",
            if tasks.is_empty() {
                "no run has task results".to_string()
            } else {
                format!("tasks: {}", tasks.join(", "))
            }
        ),
        Some(t) => Some(t.clone()),
        None => tasks.first().cloned(),
    };
    let size_ppl = |r: &Run| Some((r.bytes? as f64, r.ppl?.value));
    let mut frontiers = vec![("pareto_ppl".to_string(), frontier_flags(&runs, size_ppl))];
    if let Some(t) = &accuracy {
        let size_acc = |r: &Run| Some((r.bytes? as f64, -r.tasks.get(t)?.acc.value));
        frontiers.push((format!("pareto_{t}"), frontier_flags(&runs, size_acc)));
    }

    for r in runs.iter().filter(|r| !r.evaluated) {
        eprintln!(
            "note: {}: no report.json; its perplexity, KLD, task, speed and energy columns are empty (-)",
            r.path.display()
        );
    }
    let tmp = temp_sibling(&a.out);
    let mut guard = TempGuard(Some(tmp.clone()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut written = Vec::new();
    let mut write = |name: &str, text: String| -> anyhow::Result<()> {
        std::fs::write(tmp.join(name), text).with_context(|| name.to_string())?;
        written.push(name.to_string());
        Ok(())
    };
    let md = crate::report_table::markdown(&runs, &tasks);
    if a.format.contains(&Format::Md) {
        write("table.md", md.clone())?;
    }
    if a.format.contains(&Format::Csv) {
        write(
            "table.csv",
            crate::report_table::csv(&runs, &tasks, &frontiers),
        )?;
    }
    if a.format.contains(&Format::Tex) {
        write("table.tex", crate::report_table::latex(&runs, &tasks))?;
    }
    if a.format.contains(&Format::Svg) {
        written.extend(plots(&runs, accuracy.as_deref(), &tmp)?);
    }
    commit(&tmp, &a.out)?;
    guard.0 = None;
    print!("{md}");
    println!("wrote {}: {}", a.out.display(), written.join(", "));
    Ok(())
}

/// Draws the perplexity plot and, with a task, the accuracy plot into `dir`; returns the
/// files written (a plot with no run that has both coordinates is left out, with a note).
fn plots(runs: &[Run], accuracy: Option<&str>, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    let point = |r: &Run, y: Option<f64>| {
        Some(PlotPoint {
            label: r.label.clone(),
            x: r.bytes? as f64 / 1e6,
            y: y?,
        })
    };
    let ppl: Vec<PlotPoint> = runs
        .iter()
        .filter_map(|r| point(r, r.ppl.map(|p| p.value)))
        .collect();
    let mut todo = vec![(
        "pareto_ppl.svg".to_string(),
        "Size against perplexity".to_string(),
        "perplexity (lower is better)".to_string(),
        ppl,
        false,
    )];
    if let Some(t) = accuracy {
        let acc: Vec<PlotPoint> = runs
            .iter()
            .filter_map(|r| point(r, r.tasks.get(t).map(|a| 100.0 * a.acc.value)))
            .collect();
        todo.push((
            format!("pareto_{t}.svg"),
            format!("Size against {t} accuracy"),
            format!("{t} acc % (higher is better)"),
            acc,
            true,
        ));
    }
    for (name, title, y_desc, pts, larger) in todo {
        if pts.is_empty() {
            eprintln!("note: {name} left out: no run has both its size and that measure");
            continue;
        }
        plot_pareto(&dir.join(&name), &title, &y_desc, &pts, larger)?;
        files.push(name);
    }
    Ok(files)
}
