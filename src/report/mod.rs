//! The static HTML report of a pipeline: results table, plots (SVG, drawn with plotters),
//! a gallery of test images (PNG) and the provenance. Everything is written beside
//! `index.html`; the page loads nothing from the network.

mod gallery;
mod plots;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value as Json;

pub use gallery::{GalleryInput, GalleryItem, MethodGallery};

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
    /// The same test images under each heatmap method.
    pub methods: Option<MethodGallery>,
    /// The metrics of each finished data instance: (label, metrics).
    pub data: Vec<(String, Json)>,
    /// Each finished train/retrain instance: (label, metrics with `epochs`).
    pub trained: Vec<(String, Json)>,
    /// Every warning of a finished instance: (label, flag, message).
    pub warnings: Vec<(String, String, String)>,
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

/// The guards' warnings, one row per instance and flag, ahead of every result they qualify.
fn warnings_html(w: &[(String, String, String)]) -> String {
    let mut s = String::from("<h2 id=\"warnings\">Warnings</h2>");
    if w.is_empty() {
        s.push_str("<p>No sanity guard fired: every finished classifier predicts both classes, its training loss fell, and its accuracy beats the majority-class rate.</p>");
        return s;
    }
    s.push_str("<p>Results of these instances should not be trusted as they are.</p><table><thead><tr><th>instance</th><th>flag</th><th>why</th></tr></thead><tbody>");
    for (label, flag, msg) in w {
        let _ = write!(s, "<tr><td>{}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>", esc(label), esc(flag), esc(msg));
    }
    s.push_str("</tbody></table>");
    s
}

/// Images per class and split, groups, and skipped files of each data instance.
fn data_html(data: &[(String, Json)]) -> String {
    let mut s = String::from("<h2 id=\"data\">Data</h2>");
    if data.is_empty() {
        s.push_str("<p>No finished data stage yet.</p>");
    }
    for (label, m) in data {
        let n = |v: Option<&Json>| v.and_then(|x| x.as_u64()).map(|x| x.to_string()).unwrap_or_else(|| "–".into());
        let _ = write!(
            s,
            "<h3>{}</h3><p>{} images, {} files skipped, {} positive images without a mask (left out of Dice).</p><table><thead><tr><th>split</th><th>positive</th><th>negative</th><th>groups</th></tr></thead><tbody>",
            esc(label),
            n(m.get("images")),
            n(m.get("skipped")),
            m.get("without_mask").and_then(|x| x.as_u64()).unwrap_or(0)
        );
        for split in ["train", "val", "test"] {
            let sp = m.get(split);
            let _ = write!(
                s,
                "<tr><td>{split}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                n(sp.and_then(|x| x.get("positive"))),
                n(sp.and_then(|x| x.get("negative"))),
                n(sp.and_then(|x| x.get("groups")))
            );
        }
        s.push_str("</tbody></table>");
        let skipped: Vec<String> = m
            .get("skipped_files")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
            .map(|f| f.as_str().map(String::from).unwrap_or_else(|| f.to_string()))
            .collect();
        if !skipped.is_empty() {
            let _ = write!(s, "<p>Skipped:</p><ul>");
            for f in skipped.iter().take(20) {
                let _ = write!(s, "<li>{}</li>", esc(f));
            }
            if skipped.len() > 20 {
                let _ = write!(s, "<li>… and {} more</li>", skipped.len() - 20);
            }
            s.push_str("</ul>");
        }
    }
    s
}

/// Writes `index.html`, `img/*.svg` and `img/*.png` into `out`; returns the index path.
pub fn write(input: &ReportInput<'_>, out: &Path) -> Result<std::path::PathBuf, ReportError> {
    let img = out.join("img");
    std::fs::create_dir_all(&img).map_err(|e| io_err(&img, e))?;
    let dice_plot = plots::dice_vs_threshold(&input.segmentation, &img.join("dice_vs_threshold.svg")).map_err(|e| io_err(&img, e))?;
    let acc_plot = plots::retrained_accuracy(&input.classification, &img.join("retrained_accuracy.svg")).map_err(|e| io_err(&img, e))?;
    let items = gallery::render(&input.gallery, &img).map_err(|e| io_err(&img, e))?;
    let metric_plots: Vec<&str> = ["accuracy", "auc", "sensitivity", "specificity"]
        .into_iter()
        .map(|m| plots::metric_bars(&input.classification, m, &img.join(format!("cls_{m}.svg"))).map(|drawn| drawn.then_some(m)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| io_err(&img, e))?
        .into_iter()
        .flatten()
        .collect();
    let mut curve_files = Vec::new();
    for (k, (label, m)) in input.trained.iter().enumerate() {
        let file = format!("curves_{k}.svg");
        let epochs = m.get("epochs").and_then(|e| e.as_array()).cloned().unwrap_or_default();
        let majority = m.get("majority_rate").and_then(|v| v.as_f64());
        if plots::training_curves(label, &epochs, majority, &img.join(&file)).map_err(|e| io_err(&img, e))? {
            curve_files.push((label, file));
        }
    }
    let method_images = match &input.methods {
        Some(g) => gallery::render_methods(g, &img).map_err(|e| io_err(&img, e))?,
        None => vec![],
    };
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
    h.push_str(&warnings_html(&input.warnings));
    h.push_str(&data_html(&input.data));
    h.push_str("<h2 id=\"curves\">Training curves</h2><p>Mean loss and accuracy per epoch on the train split (while training) and on the validation split (after each epoch); the grey level is the test split's majority-class rate.</p>");
    if curve_files.is_empty() {
        h.push_str("<p>No finished training yet.</p>");
    }
    for (label, file) in &curve_files {
        let _ = write!(h, "<p><img src=\"img/{}\" alt=\"training curves of {}\" width=\"900\"></p>", esc(file), esc(label));
    }
    h.push_str("<h2>Do the heatmaps segment the tumor?</h2><p>Mean-Dice is over test images with a tumor (the paper's measure); Dice-all counts every test image (empty prediction of an empty truth = 1).</p>");
    if dice_plot {
        h.push_str("<p><img src=\"img/dice_vs_threshold.svg\" alt=\"mean-Dice against threshold\" width=\"720\"></p>");
    }
    h.push_str(&table_html(&input.segmentation, &["stage", "status"]));
    h.push_str("<h2>Does the classifier look at the tumor?</h2><p>Accuracy of classifiers retrained on heatmap-filtered images, beside the original classifier's.</p>");
    if acc_plot {
        h.push_str("<p><img src=\"img/retrained_accuracy.svg\" alt=\"retrained accuracy per filter mode\" width=\"720\"></p>");
    }
    if !metric_plots.is_empty() {
        h.push_str("<p id=\"metric-charts\">Each classifier's test scores; a red dot is the original classifier's value, a black tick on accuracy the majority-class rate (always answering the more frequent class).</p><p>");
        for m in &metric_plots {
            let _ = write!(h, "<img src=\"img/cls_{m}.svg\" alt=\"{m} per classifier\" width=\"440\">");
        }
        h.push_str("</p>");
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
    if let Some(g) = &input.methods {
        let _ = write!(
            h,
            "<h2 id=\"methods-gallery\">Heatmap methods side by side</h2><p>{}. Each row, left to right: the image, {}, the true tumor (magenta).</p>",
            esc(&g.title),
            esc(&g.methods.join(", "))
        );
        for (file, caption) in &method_images {
            let _ = write!(
                h,
                "<figure><img src=\"img/{}\" alt=\"{}\"><figcaption>{}</figcaption></figure><br>",
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
