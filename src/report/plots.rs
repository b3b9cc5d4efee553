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
        .filter(|c| !["stage", "status", "instance"].contains(&c.as_str()) && **c != value_col && Some(*c) != method_col.as_ref())
        .collect();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in &t.rows {
        if method_col.as_ref().is_some_and(|m| text(r.get(m)) != "fixed") {
            continue;
        }
        let (Some(x), Some(y)) = (num(r.get(&value_col)), num(r.get("mean_dice"))) else { continue };
        let name = series_cols.iter().map(|c| text(r.get(*c))).collect::<Vec<_>>().join(" / ");
        series.entry(name).or_default().push((x, y));
    }
    if series.is_empty() {
        return Ok(false);
    }
    let ymax = series.values().flatten().map(|p| p.1).fold(0.0, f64::max).max(0.05) * 1.15;
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
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(|e| e.to_string())?;
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
        .filter(|c| !["stage", "status", "instance"].contains(&c.as_str()))
        .collect();
    let labels: Vec<String> = rows.iter().map(|r| label_cols.iter().map(|c| text(r.get(*c))).collect::<Vec<_>>().join(" / ")).collect();
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
    root.present().map_err(|e| e.to_string())?;
    Ok(true)
}
