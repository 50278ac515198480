//! Recovery curve of a distillation benchmark as an SVG: perplexity against tokens seen, one
//! line per run, with the teacher, the pruned student and the 30%-recovery target as
//! horizontal lines.
//!
//! ```sh
//! cargo run --release -p eval --example curve -- OUT/curve.csv OUT/curve.svg
//! ```
//! The CSV is the one `scripts/bench/distill.sh` writes: a header, then
//! `run,tokens,perplexity,perplexity_se,recovered`; the runs `teacher` and `pruned` are the
//! reference levels, every other run is a curve.
#![allow(missing_docs)]

use std::collections::BTreeMap;

use plotters::prelude::*;

/// Share of the teacher–pruned gap the target line marks.
const TARGET: f64 = 0.30;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Reads the CSV: (reference levels by name, curves by run as (tokens, perplexity)).
#[allow(clippy::type_complexity)]
fn read(path: &str) -> Res<(BTreeMap<String, f64>, BTreeMap<String, Vec<(f64, f64)>>)> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().ok_or_else(|| format!("{path}: empty"))?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or_else(|| format!("{path}: no `{name}` column"))
    };
    let (ir, it, ip) = (col("run")?, col("tokens")?, col("perplexity")?);
    let mut refs = BTreeMap::new();
    let mut runs: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (n, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let bad = || format!("{path}:{}: cannot read `{line}`", n + 2);
        let run = f.get(ir).ok_or_else(bad)?.to_string();
        let tokens: f64 = f.get(it).ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let ppl: f64 = f.get(ip).ok_or_else(bad)?.parse().map_err(|_| bad())?;
        match run.as_str() {
            "teacher" | "pruned" => {
                refs.insert(run, ppl);
            }
            _ => runs.entry(run).or_default().push((tokens, ppl)),
        }
    }
    for pts in runs.values_mut() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok((refs, runs))
}

fn run() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [csv, svg] = args.as_slice() else {
        return Err("usage: curve CURVE.csv OUT.svg".into());
    };
    let (refs, runs) = read(csv)?;
    if runs.is_empty() {
        return Err(format!("{csv}: no training runs").into());
    }
    let teacher = refs.get("teacher").copied();
    let pruned = refs.get("pruned").copied();
    let target = teacher.zip(pruned).map(|(t, p)| p - TARGET * (p - t));

    let xmax = runs.values().flatten().map(|p| p.0).fold(1.0_f64, f64::max);
    let ys = runs
        .values()
        .flatten()
        .map(|p| p.1)
        .chain(teacher)
        .chain(pruned);
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), y| {
        (l.min(y), h.max(y))
    });
    // Headroom above the curves for the legend.
    let span = (hi - lo).max(1.0);
    let (ylo, yhi) = ((lo - 0.08 * span).max(0.0), hi + 0.35 * span);
    let kilo = xmax >= 10_000.0;

    let root = SVGBackend::new(svg, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Recovery of the pruned student (wikitext-2 test perplexity)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..xmax * 1.02, ylo..yhi)?;
    chart
        .configure_mesh()
        .x_desc("tokens seen")
        .y_desc("perplexity")
        .light_line_style(BLACK.mix(0.04))
        .x_label_formatter(&|x| {
            if kilo {
                format!("{:.0}k", x / 1000.0)
            } else {
                format!("{x:.0}")
            }
        })
        .y_label_formatter(&|y| format!("{y:.1}"))
        .draw()?;

    // Reference levels: dashed, grey shades, labelled in the legend with their value.
    let levels = [
        ("teacher", teacher, BLACK),
        ("pruned", pruned, RGBColor(120, 120, 120)),
        ("30% recovered", target, RGBColor(200, 60, 60)),
    ];
    for (name, y, color) in levels {
        let Some(y) = y else { continue };
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, y), (xmax * 1.02, y)],
                8,
                5,
                color.stroke_width(1),
            ))?
            .label(format!("{name} ({y:.2})"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
    }

    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    for (i, (name, pts)) in runs.iter().enumerate() {
        let color = palette[i % palette.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    println!("wrote {svg}");
    Ok(())
}
