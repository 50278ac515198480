//! The comparison table of `compress report` as Markdown, CSV and LaTeX (booktabs).
//!
//! Markdown and LaTeX show the columns at least one run has (sizes in MB, parameters in
//! millions, accuracies in %), with notes under the table on how the numbers were measured;
//! CSV has every column, in the units of the JSON reports, plus the frontier flags. A value a
//! run lacks is `-` everywhere.

use crate::report::{Pm, Run};

/// What a run lacks.
const MISSING: &str = "-";

/// A cell before it is formatted for one output.
enum Cell {
    Text(String),
    Num(Option<f64>, usize),
    Pm(Option<Pm>, usize),
}

/// One column of the Markdown/LaTeX table.
struct Column {
    header: String,
    /// Speed columns carry the footnote mark of the engine note.
    speed: bool,
    cells: Vec<Cell>,
}

impl Column {
    fn new(header: &str, cells: Vec<Cell>) -> Self {
        Self {
            header: header.to_string(),
            speed: false,
            cells,
        }
    }
    fn is_empty(&self) -> bool {
        self.cells.iter().all(|c| match c {
            Cell::Text(_) => false,
            Cell::Num(v, _) => v.is_none(),
            Cell::Pm(v, _) => v.is_none(),
        })
    }
}

/// The columns shown in Markdown and LaTeX, empty ones left out.
fn columns(runs: &[Run], tasks: &[String]) -> Vec<Column> {
    let num = |f: &dyn Fn(&Run) -> Option<f64>, prec| -> Vec<Cell> {
        runs.iter().map(|r| Cell::Num(f(r), prec)).collect()
    };
    let mut cols = vec![
        Column::new(
            "run",
            runs.iter().map(|r| Cell::Text(r.label.clone())).collect(),
        ),
        Column::new("size (MB)", num(&|r| r.bytes.map(|b| b as f64 / 1e6), 1)),
        Column::new("bits/weight", num(&|r| r.bpw, 2)),
        Column::new("params (M)", num(&|r| r.params.map(|p| p as f64 / 1e6), 1)),
        Column::new(
            "perplexity",
            runs.iter().map(|r| Cell::Pm(r.ppl, 3)).collect(),
        ),
        Column::new("KLD", runs.iter().map(|r| Cell::Pm(r.kld, 4)).collect()),
    ];
    for t in tasks {
        let pct = |p: Pm| Pm {
            value: 100.0 * p.value,
            stderr: 100.0 * p.stderr,
        };
        let cells = runs
            .iter()
            .map(|r| Cell::Pm(r.tasks.get(t).map(|a| pct(a.acc)), 1))
            .collect();
        cols.push(Column::new(&format!("{t} acc %"), cells));
    }
    let speeds: [(&str, Vec<Cell>); 3] = [
        ("eval tok/s", num(&|r| r.eval_tps, 1)),
        ("prompt tok/s", num(&|r| r.pp_tps, 1)),
        ("gen tok/s", num(&|r| r.tg_tps, 1)),
    ];
    for (h, cells) in speeds {
        let mut c = Column::new(h, cells);
        c.speed = true;
        cols.push(c);
    }
    cols.push(Column::new("energy J/1k tok", num(&|r| r.energy, 1)));
    cols.retain(|c| !c.is_empty());
    cols
}

/// "value" when every run that has one agrees, else "v1 (a, b); v2 (c)"; `None` when no run
/// has one.
fn grouped_note(runs: &[Run], f: impl Fn(&Run) -> Option<String>) -> Option<String> {
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    let mut missing = false;
    for r in runs {
        match f(r) {
            Some(v) => match groups.iter_mut().find(|g| g.0 == v) {
                Some(g) => g.1.push(&r.label),
                None => groups.push((v, vec![&r.label])),
            },
            None => missing = true,
        }
    }
    match groups.len() {
        0 => None,
        1 if !missing => Some(groups.remove(0).0),
        _ => Some(
            groups
                .into_iter()
                .map(|(v, labels)| format!("{v} ({})", labels.join(", ")))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

/// The notes under the Markdown and LaTeX tables; the speed note comes first (the columns
/// carry its mark).
fn notes(runs: &[Run], tasks: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = grouped_note(runs, |r| r.has_speed().then(|| r.engine.clone()).flatten()) {
        let mut note = format!("Speed (tok/s) measured on {e}.");
        if e.contains("reference engine") {
            note += " The reference engine computes the weights in f32 whatever their storage: its tok/s compare runs with each other, not with a deployment runtime.";
        }
        out.push(note);
    }
    if let Some(p) = grouped_note(runs, |r| r.ppl_setup.clone()) {
        out.push(format!("Perplexity (± standard error): {p}."));
    }
    if runs.iter().any(|r| r.kld.is_some()) {
        let mut k =
            "KLD: mean KL divergence of the student from the teacher per scored token, in nats, ± standard error"
                .to_string();
        let lower: Vec<&str> = runs
            .iter()
            .filter(|r| r.kld.is_some() && r.kld_lower_bound)
            .map(|r| r.label.as_str())
            .collect();
        if !lower.is_empty() {
            k += &format!(
                "; for {}, over the teacher's saved top-k tokens only (a lower bound)",
                lower.join(", ")
            );
        }
        out.push(k + ".");
    }
    for t in tasks {
        if let Some(n) = grouped_note(runs, |r| r.tasks.get(t).map(|a| format!("n = {}", a.n))) {
            out.push(format!(
                "{t}: zero-shot accuracy (acc) ± standard error, {n}."
            ));
        }
    }
    if let Some(s) = grouped_note(runs, |r| {
        r.energy.and(r.energy_source.as_deref()).map(|s| match s {
            "estimate" => "estimated from CPU time x watts per core".to_string(),
            "rapl" => "measured by RAPL".to_string(),
            other => other.to_string(),
        })
    }) {
        out.push(format!("Energy per 1,000 tokens processed: {s}."));
    }
    out.push(format!(
        "A dash ({MISSING}) marks what a run did not measure."
    ));
    out
}

fn fmt_num(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| MISSING.into(), |x| format!("{x:.prec$}"))
}

/// Escapes Markdown's table and emphasis characters.
fn md_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | '|' | '*' | '_' | '`' | '[' | ']' | '<' | '>') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The table as GitHub-flavoured Markdown, numbers right-aligned, notes below.
pub fn markdown(runs: &[Run], tasks: &[String]) -> String {
    let cols = columns(runs, tasks);
    let row = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    let mut s = row(cols
        .iter()
        .map(|c| md_escape(&c.header) + if c.speed { " †" } else { "" })
        .collect());
    s += &row(cols
        .iter()
        .enumerate()
        .map(|(i, _)| if i == 0 { ":--" } else { "--:" }.to_string())
        .collect());
    for r in 0..runs.len() {
        s += &row(cols
            .iter()
            .map(|c| match &c.cells[r] {
                Cell::Text(t) => md_escape(t),
                Cell::Num(v, p) => fmt_num(*v, *p),
                Cell::Pm(v, p) => v.map_or_else(
                    || MISSING.into(),
                    |m| format!("{:.p$} ± {:.p$}", m.value, m.stderr),
                ),
            })
            .collect());
    }
    s += "\n";
    for (i, n) in notes(runs, tasks).iter().enumerate() {
        let mark = if i == 0 && cols.iter().any(|c| c.speed) {
            "† "
        } else {
            ""
        };
        s += &format!("- {mark}{}\n", md_escape(n));
    }
    s
}

/// Escapes LaTeX's special characters.
pub fn tex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\textbackslash{}"),
            '&' | '%' | '$' | '#' | '_' | '{' | '}' => {
                out.push('\\');
                out.push(c);
            }
            '~' => out.push_str("\\textasciitilde{}"),
            '^' => out.push_str("\\textasciicircum{}"),
            '<' => out.push_str("\\textless{}"),
            '>' => out.push_str("\\textgreater{}"),
            '±' => out.push_str("$\\pm$"),
            _ => out.push(c),
        }
    }
    out
}

/// The table as a LaTeX `tabular` with booktabs rules (`\usepackage{booktabs}`), numbers
/// right-aligned, and the notes as small paragraphs below it: made to be `\input` inside a
/// `table` float.
pub fn latex(runs: &[Run], tasks: &[String]) -> String {
    let cols = columns(runs, tasks);
    let n = cols.len();
    let spec: String = (0..n).map(|i| if i == 0 { 'l' } else { 'r' }).collect();
    let mut s = format!(
        "% Written by `compress report`; needs \\usepackage{{booktabs}}.\n\\begin{{tabular}}{{{spec}}}\n\\toprule\n"
    );
    let header: Vec<String> = cols
        .iter()
        .map(|c| {
            tex_escape(&c.header)
                + if c.speed {
                    "\\textsuperscript{\\dag}"
                } else {
                    ""
                }
        })
        .collect();
    s += &format!("{} \\\\\n\\midrule\n", header.join(" & "));
    for r in 0..runs.len() {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| match &c.cells[r] {
                Cell::Text(t) => tex_escape(t),
                Cell::Num(v, p) => fmt_num(*v, *p),
                Cell::Pm(v, p) => v.map_or_else(
                    || MISSING.into(),
                    |m| format!("${:.p$} \\pm {:.p$}$", m.value, m.stderr),
                ),
            })
            .collect();
        s += &format!("{} \\\\\n", cells.join(" & "));
    }
    s += "\\bottomrule\n\\end{tabular}\n\\par\\smallskip\n{\\footnotesize\n";
    for (i, note) in notes(runs, tasks).iter().enumerate() {
        let mark = if i == 0 && cols.iter().any(|c| c.speed) {
            "\\textsuperscript{\\dag}"
        } else {
            ""
        };
        s += &format!("{mark}{}\\par\n", tex_escape(note));
    }
    s += "}\n";
    s
}

/// Quotes a CSV field when it holds a comma, quote or line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The table as CSV: every column, in the JSON reports' units (bytes, fractions for
/// accuracies), `-` where a run lacks a value; `frontiers` adds one yes/no column each.
pub fn csv(runs: &[Run], tasks: &[String], frontiers: &[(String, Vec<Option<bool>>)]) -> String {
    let mut header: Vec<String> = [
        "run",
        "path",
        "bytes",
        "bits_per_weight",
        "params",
        "perplexity",
        "perplexity_stderr",
        "perplexity_setup",
        "kld",
        "kld_stderr",
        "kld_lower_bound",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for t in tasks {
        for k in ["acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"] {
            header.push(format!("{t}_{k}"));
        }
    }
    for h in [
        "eval_tokens_per_second",
        "prompt_tokens_per_second",
        "gen_tokens_per_second",
        "speed_engine",
        "energy_joules_per_1k_tokens",
        "energy_source",
    ] {
        header.push(h.to_string());
    }
    header.extend(frontiers.iter().map(|f| f.0.clone()));
    let mut s = header.join(",") + "\n";
    let f = |v: Option<f64>| v.map_or_else(|| MISSING.to_string(), |x| x.to_string());
    let u = |v: Option<u64>| v.map_or_else(|| MISSING.to_string(), |x| x.to_string());
    let t = |v: Option<&str>| v.map_or_else(|| MISSING.to_string(), str::to_string);
    for (i, r) in runs.iter().enumerate() {
        let mut row = vec![
            r.label.clone(),
            r.path.display().to_string(),
            u(r.bytes),
            f(r.bpw),
            u(r.params),
            f(r.ppl.map(|p| p.value)),
            f(r.ppl.map(|p| p.stderr)),
            t(r.ppl_setup.as_deref()),
            f(r.kld.map(|p| p.value)),
            f(r.kld.map(|p| p.stderr)),
            t(r.kld.map(|_| if r.kld_lower_bound { "yes" } else { "no" })),
        ];
        for name in tasks {
            let a = r.tasks.get(name);
            row.push(f(a.map(|a| a.acc.value)));
            row.push(f(a.map(|a| a.acc.stderr)));
            row.push(f(a.map(|a| a.acc_norm.value)));
            row.push(f(a.map(|a| a.acc_norm.stderr)));
            row.push(u(a.map(|a| a.n)));
        }
        row.extend([
            f(r.eval_tps),
            f(r.pp_tps),
            f(r.tg_tps),
            t(r.engine.as_deref()),
            f(r.energy),
            t(r.energy.and(r.energy_source.as_deref())),
        ]);
        for (_, flags) in frontiers {
            row.push(t(flags[i].map(|b| if b { "yes" } else { "no" })));
        }
        s += &(row
            .iter()
            .map(|c| csv_field(c))
            .collect::<Vec<_>>()
            .join(",")
            + "\n");
    }
    s
}
