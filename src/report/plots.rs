//! The report's plots, drawn with plotters into SVG files.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde_json::Value as Json;

use super::ReportTable;

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn num(v: Option<&Json>) -> Option<f64> {
    v.and_then(|x| x.as_f64()).filter(|x| x.is_finite())
}

fn text(v: Option<&Json>) -> String {
    match v {
        Some(Json::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "-".into(),
    }
}

/// Mean-Dice against the fixed threshold value, one curve per other axis combination
/// (model, CAM method...). Returns false when there is nothing to plot.
pub fn dice_vs_threshold(t: &ReportTable, out: &Path) -> Result<bool, String> {
    let method_col = t.threshold_method.clone();
    let Some(value_col) = t.threshold_value.clone() else { return Ok(false) };
    let series_cols: Vec<&String> = t
        .columns
        .iter()
        .take_while(|c| c.as_str() != "mean_dice")
        .filter(|c| !["stage", "status", "instance", "n"].contains(&c.as_str()) && **c != value_col && Some(*c) != method_col.as_ref())
        .collect();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    // Rows aggregated over seeds carry a 95% interval: drawn as a vertical bar at the point.
    let mut intervals: BTreeMap<String, Vec<(f64, f64, f64)>> = BTreeMap::new();
    for r in &t.rows {
        if method_col.as_ref().is_some_and(|m| text(r.get(m)) != "fixed") {
            continue;
        }
        let (Some(x), Some(y)) = (num(r.get(&value_col)), num(r.get("mean_dice"))) else { continue };
        let name = series_cols.iter().map(|c| text(r.get(*c))).collect::<Vec<_>>().join(" / ");
        if let (Some(lo), Some(hi)) = (num(r.get("mean_dice_ci_lo")), num(r.get("mean_dice_ci_hi"))) {
            intervals.entry(name.clone()).or_default().push((x, lo, hi));
        }
        series.entry(name).or_default().push((x, y));
    }
    if series.is_empty() {
        return Ok(false);
    }
    // Otsu picks a threshold per image, so it has no x: its mean-Dice is a dashed level
    // across the plot in the colour of the series it belongs to.
    let mut otsu: BTreeMap<String, f64> = BTreeMap::new();
    if let Some(m) = &method_col {
        for r in t.rows.iter().filter(|r| text(r.get(m)) == "otsu") {
            let Some(y) = num(r.get("mean_dice")) else { continue };
            otsu.insert(series_cols.iter().map(|c| text(r.get(*c))).collect::<Vec<_>>().join(" / "), y);
        }
    }
    let ymax = series.values().flatten().map(|p| p.1).chain(otsu.values().copied()).fold(0.0, f64::max).max(0.05) * 1.15;
    let root = SVGBackend::new(out, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("mean-Dice of thresholded heatmaps against threshold", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..1f64, 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("threshold").y_desc("mean-Dice (test images with tumor)").draw().map_err(|e| e.to_string())?;
    for (i, (name, mut pts)) in series.into_iter().enumerate() {
        let otsu_y = otsu.get(&name).copied();
        let bars = intervals.remove(&name).unwrap_or_default();
        let otsu_label = format!("{name} (Otsu)");
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| e.to_string())?;
        chart
            .draw_series(bars.into_iter().map(|(x, lo, hi)| PathElement::new(vec![(x, lo), (x, hi)], color.stroke_width(1))))
            .map_err(|e| e.to_string())?;
        if let Some(y) = otsu_y {
            let dashes =
                (0..25).map(move |k| PathElement::new(vec![(k as f64 / 25.0, y), ((k as f64 + 0.6) / 25.0, y)], color.stroke_width(2)));
            chart
                .draw_series(dashes)
                .map_err(|e| e.to_string())?
                .label(otsu_label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 7, y)], color.stroke_width(2)));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(true)
}

/// Accuracy of each retrained classifier (grouped by filter mode) beside its original.
pub fn retrained_accuracy(t: &ReportTable, out: &Path) -> Result<bool, String> {
    let rows: Vec<_> = t.rows.iter().filter(|r| num(r.get("accuracy")).is_some() && num(r.get("original_accuracy")).is_some()).collect();
    if rows.is_empty() {
        return Ok(false);
    }
    let label_cols: Vec<&String> = t
        .columns
        .iter()
        .take_while(|c| c.as_str() != "accuracy")
        .filter(|c| !["stage", "status", "instance", "n"].contains(&c.as_str()))
        .collect();
    let labels = row_labels(&rows, &label_cols);
    let n = rows.len();
    let root = SVGBackend::new(out, (900, 140 + 22 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("test accuracy: retrained on filtered images (bar) vs original (dot)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(330)
        .build_cartesian_2d(0f64..1.05f64, (0..n).into_segmented())
        .map_err(|e| e.to_string())?;
    let lbl = labels.clone();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("accuracy")
        .y_labels(n)
        .y_label_formatter(&move |v| match v {
            SegmentValue::CenterOf(i) => lbl.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let acc = num(r.get("accuracy")).unwrap_or(0.0);
            let mut bar = Rectangle::new([(0.0, SegmentValue::Exact(i)), (acc, SegmentValue::Exact(i + 1))], PALETTE[0].mix(0.7).filled());
            bar.set_margin(3, 3, 0, 0);
            bar
        }))
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(
            rows.iter().enumerate().map(|(i, r)| {
                Circle::new((num(r.get("original_accuracy")).unwrap_or(0.0), SegmentValue::CenterOf(i)), 5, PALETTE[3].filled())
            }),
        )
        .map_err(|e| e.to_string())?;
    majority_ticks(&mut chart, &rows)?;
    root.present().map_err(|e| e.to_string())?;
    Ok(true)
}

type BarChart<'a> = ChartContext<
    'a,
    SVGBackend<'a>,
    Cartesian2d<
        plotters::coord::types::RangedCoordf64,
        plotters::coord::ranged1d::SegmentedCoord<plotters::coord::types::RangedCoordusize>,
    >,
>;

/// The majority-class rate of each row as a black tick across its bar: an accuracy left of
/// it is no better than always answering the more frequent class.
fn majority_ticks(chart: &mut BarChart<'_>, rows: &[&BTreeMap<String, Json>]) -> Result<(), String> {
    chart
        .draw_series(rows.iter().enumerate().filter_map(|(i, r)| {
            let m = num(r.get("majority_rate"))?;
            Some(PathElement::new(vec![(m, SegmentValue::Exact(i)), (m, SegmentValue::Exact(i + 1))], BLACK.stroke_width(3)))
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// One horizontal bar per classification row for `metric` (accuracy, auc, sensitivity,
/// specificity), a red dot for the original classifier's value where the table has one, and
/// for accuracy the majority-class rate as a black tick.
pub fn metric_bars(t: &ReportTable, metric: &str, out: &Path) -> Result<bool, String> {
    let rows: Vec<&BTreeMap<String, Json>> = t.rows.iter().filter(|r| num(r.get(metric)).is_some()).collect();
    if rows.is_empty() {
        return Ok(false);
    }
    let label_cols: Vec<&String> = t
        .columns
        .iter()
        .take_while(|c| !["mean_dice", "accuracy"].contains(&c.as_str()))
        .filter(|c| !["status", "instance", "n"].contains(&c.as_str()))
        .collect();
    let labels = row_labels(&rows, &label_cols);
    let n = rows.len();
    let root = SVGBackend::new(out, (440, 110 + 22 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let caption = if metric == "accuracy" { "accuracy (black: majority-class rate)".to_string() } else { metric.replace('_', " ") };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(170)
        .build_cartesian_2d(0f64..1.05f64, (0..n).into_segmented())
        .map_err(|e| e.to_string())?;
    let lbl = labels.clone();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&move |v| match v {
            SegmentValue::CenterOf(i) => lbl.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let v = num(r.get(metric)).unwrap_or(0.0);
            let mut bar = Rectangle::new([(0.0, SegmentValue::Exact(i)), (v, SegmentValue::Exact(i + 1))], PALETTE[0].mix(0.7).filled());
            bar.set_margin(3, 3, 0, 0);
            bar
        }))
        .map_err(|e| e.to_string())?;
    // Rows aggregated over seeds: the 95% interval of the mean as a black whisker.
    let (lo, hi) = (format!("{metric}_ci_lo"), format!("{metric}_ci_hi"));
    chart
        .draw_series(rows.iter().enumerate().filter_map(|(i, r)| {
            let (a, b) = (num(r.get(&lo))?, num(r.get(&hi))?);
            Some(PathElement::new(vec![(a, SegmentValue::CenterOf(i)), (b, SegmentValue::CenterOf(i))], BLACK.stroke_width(2)))
        }))
        .map_err(|e| e.to_string())?;
    let orig = format!("original_{metric}");
    chart
        .draw_series(
            rows.iter()
                .enumerate()
                .filter_map(|(i, r)| Some(Circle::new((num(r.get(&orig))?, SegmentValue::CenterOf(i)), 4, PALETTE[3].filled()))),
        )
        .map_err(|e| e.to_string())?;
    if metric == "accuracy" {
        majority_ticks(&mut chart, &rows)?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(true)
}

/// The colours of the training curves: train and validation (used by no other plot, so the
/// report's pixel test can find them).
pub const CURVE_TRAIN: RGBColor = RGBColor(148, 103, 189);
pub const CURVE_VAL: RGBColor = RGBColor(23, 190, 207);

/// Loss and accuracy per epoch, train and validation, side by side; `majority` (the test
/// split's majority-class rate) as a grey level on the accuracy panel.
pub fn training_curves(title: &str, epochs: &[Json], majority: Option<f64>, out: &Path) -> Result<bool, String> {
    let series = |k: &str| -> Vec<(f64, f64)> { epochs.iter().filter_map(|e| Some((num(e.get("epoch"))?, num(e.get(k))?))).collect() };
    let (loss, vloss, acc, vacc) = (series("loss"), series("val_loss"), series("accuracy"), series("val_accuracy"));
    if loss.is_empty() {
        return Ok(false);
    }
    let last = epochs.len().max(2) as f64;
    let root = SVGBackend::new(out, (900, 300)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root.titled(title, ("sans-serif", 16)).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(450);
    let lmax = loss.iter().chain(&vloss).map(|p| p.1).fold(0.0, f64::max).max(0.1) * 1.1;
    for (area, name, ymax, train, val) in [(&left, "loss", lmax, &loss, &vloss), (&right, "accuracy", 1.05, &acc, &vacc)] {
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(1f64..last, 0f64..ymax)
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().x_desc("epoch").y_desc(name).draw().map_err(|e| e.to_string())?;
        if name == "accuracy"
            && let Some(m) = majority
        {
            chart
                .draw_series(LineSeries::new(vec![(1.0, m), (last, m)], RGBColor(120, 120, 120).stroke_width(1)))
                .map_err(|e| e.to_string())?
                .label("majority rate (test)")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RGBColor(120, 120, 120)));
        }
        for (pts, color, label) in [(train, CURVE_TRAIN, "train"), (val, CURVE_VAL, "validation")] {
            if pts.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled()))).map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(true)
}

/// One y-axis label per row: its label columns' values joined by ` / `.
fn row_labels(rows: &[&BTreeMap<String, Json>], label_cols: &[&String]) -> Vec<String> {
    rows.iter().map(|r| label_cols.iter().map(|c| text(r.get(*c))).collect::<Vec<_>>().join(" / ")).collect()
}
