//! Pareto frontiers of `compress report` and their SVG plots (plotters, SVG backend only).

use std::path::Path;

use plotters::prelude::*;

/// One labelled point of a plot: size in MB on x, the measure on y.
#[derive(Debug, Clone)]
pub struct PlotPoint {
    /// The run's label, drawn beside the point.
    pub label: String,
    /// Megabytes.
    pub x: f64,
    /// Perplexity or accuracy (%).
    pub y: f64,
}

/// Indices of the points no other point dominates, both coordinates smaller-is-better
/// (negate a larger-is-better one), sorted by x then y: the frontier in drawing order.
/// `a` dominates `b` when it is no worse in both and better in one; equal points dominate
/// neither, so both stay.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    let dominates =
        |a: (f64, f64), b: (f64, f64)| a.0 <= b.0 && a.1 <= b.1 && (a.0 < b.0 || a.1 < b.1);
    let mut front: Vec<usize> = (0..points.len())
        .filter(|&i| !points.iter().any(|&p| dominates(p, points[i])))
        .collect();
    front.sort_by(|&i, &j| {
        let (a, b) = (points[i], points[j]);
        a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1))
    });
    front
}

/// A range around `values` with 8% headroom each side (at least 1 unit when all are equal).
fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
    (lo - 0.08 * span, hi + 0.08 * span)
}

/// Draws `points` (size against a measure) into an SVG at `path`: the frontier as a line
/// through its points, frontier points in colour, dominated ones in grey, every point
/// labelled. `larger_is_better` flips the y sense of the frontier (accuracy).
pub fn plot_pareto(
    path: &Path,
    title: &str,
    y_desc: &str,
    points: &[PlotPoint],
    larger_is_better: bool,
) -> anyhow::Result<()> {
    draw(path, title, y_desc, points, larger_is_better)
        .map_err(|e| anyhow::anyhow!("{}: cannot draw the plot: {e}", path.display()))
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(
    path: &Path,
    title: &str,
    y_desc: &str,
    points: &[PlotPoint],
    larger_is_better: bool,
) -> DrawResult {
    let sign = if larger_is_better { -1.0 } else { 1.0 };
    let coords: Vec<(f64, f64)> = points.iter().map(|p| (p.x, sign * p.y)).collect();
    let front = pareto_front(&coords);
    let (x0, x1) = padded(points.iter().map(|p| p.x));
    let (y0, y1) = padded(points.iter().map(|p| p.y));
    // Room on the right for the labels of the largest runs.
    let x1 = x1 + 0.12 * (x1 - x0);

    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x0.max(0.0)..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("size on disk (MB)")
        .y_desc(y_desc)
        .light_line_style(BLACK.mix(0.05))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()?;

    let blue = RGBColor(31, 119, 180);
    let grey = RGBColor(150, 150, 150);
    let line: Vec<(f64, f64)> = front.iter().map(|&i| (points[i].x, points[i].y)).collect();
    chart
        .draw_series(LineSeries::new(line, blue.stroke_width(2)))?
        .label("Pareto frontier")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], blue.stroke_width(2)));
    chart.draw_series(points.iter().enumerate().map(|(i, p)| {
        let style = if front.contains(&i) {
            blue.filled()
        } else {
            grey.filled()
        };
        EmptyElement::at((p.x, p.y))
            + Circle::new((0, 0), 5, style)
            + Text::new(p.label.clone(), (8, -16), ("sans-serif", 14).into_font())
    }))?;
    chart
        .configure_series_labels()
        // The corner the frontier leaves empty: big and bad.
        .position(if larger_is_better {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        })
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontier_is_the_non_dominated_points() {
        // (size, ppl): 0 small and bad, 1 dominated by 2, 2 middle, 3 big and best,
        // 4 dominated by 3 (same size, worse), 5 equal to 2 (both stay).
        let pts = [
            (1.0, 30.0),
            (3.0, 20.0),
            (2.0, 15.0),
            (4.0, 10.0),
            (4.0, 12.0),
            (2.0, 15.0),
        ];
        assert_eq!(pareto_front(&pts), vec![0, 2, 5, 3]);
        assert_eq!(pareto_front(&[]), Vec::<usize>::new());
        assert_eq!(pareto_front(&[(5.0, 5.0)]), vec![0]);
    }

    #[test]
    fn larger_is_better_by_negation() {
        // (size, -acc): the bigger model with a higher accuracy is on the frontier, the
        // bigger one with a lower accuracy is not.
        let pts = [(1.0, -40.0), (2.0, -50.0), (3.0, -45.0)];
        assert_eq!(pareto_front(&pts), vec![0, 1]);
    }
}
