//! The static HTML report of a pipeline: results table, plots (SVG, drawn with plotters),
//! a gallery of test images (PNG) and the provenance. Everything is written beside
//! `index.html`; the page loads nothing from the network.

mod gallery;
mod plots;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value as Json;

pub use gallery::{GalleryInput, GalleryItem};

/// A table as the report shows it: column names and rows keyed by column.
pub struct ReportTable {
    pub columns: Vec<String>,
    pub rows: Vec<BTreeMap<String, Json>>,
    /// The columns holding a threshold stage's `value` and `method` axes, if swept.
    pub threshold_value: Option<String>,
    pub threshold_method: Option<String>,
}

pub struct ReportInput<'a> {
    pub pipeline: &'a str,
    pub spec: &'a str,
    pub lock: Option<String>,
    pub segmentation: ReportTable,
    pub classification: ReportTable,
    pub gallery: Vec<GalleryInput>,
    pub pending: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ReportError {
    pub path: String,
    pub message: String,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> ReportError {
    ReportError { path: path.display().to_string(), message: e.to_string() }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A metric or parameter as a table cell: floats to 4 decimals, `missing` for absent values.
/// `camflow show` and the report print the same cells.
pub fn format_cell(v: Option<&Json>, missing: &str) -> String {
    match v {
        None | Some(Json::Null) => missing.into(),
        Some(Json::Number(n)) if n.is_f64() => format!("{:.4}", n.as_f64().unwrap_or(f64::NAN)),
        Some(other) => crate::sweep::show_value(other),
    }
}

fn table_html(t: &ReportTable, skip: &[&str]) -> String {
    let cols: Vec<&String> = t.columns.iter().filter(|c| !skip.contains(&c.as_str())).collect();
    let mut s = String::from("<table><thead><tr>");
    for c in &cols {
        let _ = write!(s, "<th>{}</th>", esc(c));
    }
    s.push_str("</tr></thead><tbody>");
    for r in &t.rows {
        s.push_str("<tr>");
        for c in &cols {
            let _ = write!(s, "<td>{}</td>", esc(&format_cell(r.get(*c), "–")));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

/// Writes `index.html`, `img/*.svg` and `img/*.png` into `out`; returns the index path.
pub fn write(input: &ReportInput<'_>, out: &Path) -> Result<std::path::PathBuf, ReportError> {
    let img = out.join("img");
    std::fs::create_dir_all(&img).map_err(|e| io_err(&img, e))?;
    let dice_plot = plots::dice_vs_threshold(&input.segmentation, &img.join("dice_vs_threshold.svg")).map_err(|e| io_err(&img, e))?;
    let acc_plot = plots::retrained_accuracy(&input.classification, &img.join("retrained_accuracy.svg")).map_err(|e| io_err(&img, e))?;
    let items = gallery::render(&input.gallery, &img).map_err(|e| io_err(&img, e))?;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>camflow report: {p}</title><style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}th{{background:#eee}}figure{{display:inline-block;margin:6px;text-align:center;font-size:11px}}img{{image-rendering:pixelated}}pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:11px}}</style></head><body>",
        p = esc(input.pipeline)
    );
    let _ = write!(
        h,
        "<h1>camflow report: {}</h1><p>camflow {} &middot; {} instances not run yet</p>",
        esc(input.pipeline),
        env!("CARGO_PKG_VERSION"),
        input.pending
    );
    h.push_str("<h2>Do the heatmaps segment the tumor?</h2><p>Mean-Dice is over test images with a tumor (the paper's measure); Dice-all counts every test image (empty prediction of an empty truth = 1).</p>");
    if dice_plot {
        h.push_str("<p><img src=\"img/dice_vs_threshold.svg\" alt=\"mean-Dice against threshold\" width=\"720\"></p>");
    }
    h.push_str(&table_html(&input.segmentation, &["stage", "status"]));
    h.push_str("<h2>Does the classifier look at the tumor?</h2><p>Accuracy of classifiers retrained on heatmap-filtered images, beside the original classifier's.</p>");
    if acc_plot {
        h.push_str("<p><img src=\"img/retrained_accuracy.svg\" alt=\"retrained accuracy per filter mode\" width=\"720\"></p>");
    }
    h.push_str(&table_html(&input.classification, &["status"]));
    h.push_str("<h2>Gallery</h2><p>Each picture: the image with the true tumor contour (red), the heatmap over the image, and the predicted mask (green) with the true contour.</p>");
    for it in &items {
        let _ = write!(h, "<h3>{}</h3>", esc(&it.title));
        for (file, caption) in &it.images {
            let _ = write!(
                h,
                "<figure><img src=\"img/{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>",
                esc(file),
                esc(caption),
                esc(caption)
            );
        }
    }
    let _ = write!(h, "<h2>Spec</h2><pre>{}</pre>", esc(input.spec));
    if let Some(lock) = &input.lock {
        let _ = write!(h, "<h2>Lock (provenance)</h2><pre>{}</pre>", esc(lock));
    }
    h.push_str("</body></html>\n");
    let index = out.join("index.html");
    std::fs::write(&index, h).map_err(|e| io_err(&index, e))?;
    Ok(index)
}
