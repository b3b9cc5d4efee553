//! `camflow show`: one row per sweep point of the chosen stages, with its axis values and
//! metrics, from whatever has run so far.

use std::collections::{BTreeMap, BTreeSet};

use clap::{Args, ValueEnum};
use serde_json::{Value as Json, json};

use super::{PipelineArgs, Prepared, make_plan, open_store, prepare, print_out};
use crate::cache::Store;
use crate::error::{Error, Result};
use crate::plan::Decision;
use crate::sweep::{find_upstream, show_value};

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Args)]
pub struct ShowArgs {
    #[command(flatten)]
    p: PipelineArgs,
    /// Stages to list (default: every `score` stage).
    #[arg(long, value_name = "STAGE")]
    stage: Vec<String>,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Sort by this column; prefix with `-` for descending.
    #[arg(long, value_name = "COLUMN", allow_hyphen_values = true)]
    sort: Option<String>,
    /// Keep rows whose column equals a value: --where arch=vgg-small (repeatable).
    #[arg(long = "where", value_name = "COLUMN=VALUE")]
    filters: Vec<String>,
}

/// Metrics of a record as a flat map: scalar values only (per-epoch logs are left out).
fn flat_metrics(m: &Json) -> BTreeMap<String, Json> {
    m.as_object()
        .map(|o| o.iter().filter(|(_, v)| !v.is_object() && !v.is_array()).map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<BTreeMap<String, Json>>,
    /// Axis columns -> their axis id (`stage.param`).
    pub axes: BTreeMap<String, String>,
}

/// Rows for the chosen stages: `stage`, `instance`, short axis names, then metrics.
pub fn table(cache: &std::path::Path, p: &PipelineArgs, stages: &[String]) -> Result<Table> {
    let store = open_store(cache)?;
    let prep = prepare(p, &store)?;
    let decisions = make_plan(&prep, &store, false, &|_| false);
    table_of(&prep, &store, &decisions, stages)
}

/// [`table`] for a pipeline already prepared and planned.
pub fn table_of(prep: &Prepared, store: &Store, decisions: &[Decision], stages: &[String]) -> Result<Table> {
    let chosen: Vec<String> = if stages.is_empty() {
        prep.pipeline.stages.values().filter(|s| s.kind == "score").map(|s| s.name.clone()).collect()
    } else {
        for s in stages {
            if !prep.pipeline.stages.contains_key(s) {
                return Err(Error::Usage(format!(
                    "--stage {s}: no such stage (stages: {})",
                    prep.pipeline.stages.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        stages.to_vec()
    };
    // Metrics of every finished instance, for joins across rows.
    let metrics_of = |i: usize| -> Option<BTreeMap<String, Json>> {
        match &decisions[i] {
            Decision::Cached { key, .. } => store.read_record(key).and_then(|r| r.ok()).map(|r| flat_metrics(&r.metrics)),
            _ => None,
        }
    };
    // The original classifier's score beside a retrained one's: walk up from the retrained
    // model to its `train` instance, then find a score of that model.
    let original_of = |i: usize| -> Option<BTreeMap<String, Json>> {
        let model = *prep.instances[i].inputs.get("model")?;
        if prep.instances[model].kind != "retrain" {
            return None;
        }
        let train = find_upstream(&prep.instances, &prep.instances[model].inputs, |x| x.kind == "train")?;
        let score = prep.instances.iter().position(|x| x.kind == "score" && x.inputs.get("model") == Some(&train))?;
        metrics_of(score)
    };
    let mut axis_cols: Vec<String> = Vec::new();
    let mut axes: BTreeMap<String, String> = BTreeMap::new();
    let mut metric_cols: BTreeSet<String> = BTreeSet::new();
    let mut rows = Vec::new();
    for (idx, (inst, d)) in prep.instances.iter().zip(decisions).enumerate() {
        if !chosen.contains(&inst.stage) {
            continue;
        }
        let mut row = BTreeMap::new();
        row.insert("stage".to_string(), json!(inst.stage));
        row.insert("instance".to_string(), json!(inst.label));
        for (id, v) in &inst.coords {
            let short = id.split_once('.').map(|(_, p)| p).unwrap_or(id);
            let ambiguous = inst.coords.keys().filter(|k| k.split_once('.').map(|(_, p)| p) == Some(short)).count() > 1;
            let col = if ambiguous { id.clone() } else { short.to_string() };
            if !axis_cols.contains(&col) {
                axis_cols.push(col.clone());
            }
            axes.insert(col.clone(), id.clone());
            row.insert(col, v.clone());
        }
        let status = match d {
            Decision::Cached { .. } => {
                for (k, v) in metrics_of(idx).unwrap_or_default() {
                    metric_cols.insert(k.clone());
                    row.insert(k, v);
                }
                if let Some(orig) = original_of(idx) {
                    for k in ["accuracy", "auc"] {
                        let col = format!("original_{k}");
                        metric_cols.insert(col.clone());
                        row.insert(col, orig.get(k).cloned().unwrap_or(Json::Null));
                    }
                }
                "done"
            }
            _ => "pending",
        };
        row.insert("status".to_string(), json!(status));
        rows.push(row);
    }
    let preferred = [
        "mean_dice",
        "dice_all",
        "iou",
        "precision",
        "recall",
        "accuracy",
        "original_accuracy",
        "auc",
        "original_auc",
        "sensitivity",
        "specificity",
    ];
    let mut columns = vec!["stage".to_string()];
    columns.extend(axis_cols);
    columns.extend(preferred.iter().filter(|c| metric_cols.contains(**c)).map(|c| c.to_string()));
    columns.extend(metric_cols.iter().filter(|c| !preferred.contains(&c.as_str())).cloned());
    columns.push("status".into());
    Ok(Table { columns, rows, axes })
}

fn cell(v: Option<&Json>) -> String {
    crate::report::format_cell(v, "-")
}

fn cmp_json(a: Option<&Json>, b: Option<&Json>) -> std::cmp::Ordering {
    match (a.and_then(|x| x.as_f64()), b.and_then(|x| x.as_f64())) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        _ => cell(a).cmp(&cell(b)),
    }
}

pub fn show(cache: &std::path::Path, a: ShowArgs) -> Result<()> {
    let mut t = table(cache, &a.p, &a.stage)?;
    for f in &a.filters {
        let (col, val) = f.split_once('=').ok_or_else(|| Error::Usage(format!("--where {f}: expected COLUMN=VALUE")))?;
        if !t.columns.iter().any(|c| c == col) {
            return Err(Error::Usage(format!("--where {f}: no column `{col}` (columns: {})", t.columns.join(", "))));
        }
        t.rows.retain(|r| r.get(col).map(|v| show_value(v) == val || cell(Some(v)) == val).unwrap_or(false));
    }
    if let Some(s) = &a.sort {
        let (desc, col) = match s.strip_prefix('-') {
            Some(c) => (true, c),
            None => (false, s.as_str()),
        };
        if !t.columns.iter().any(|c| c == col) {
            return Err(Error::Usage(format!("--sort {s}: no column `{col}` (columns: {})", t.columns.join(", "))));
        }
        t.rows.sort_by(|x, y| {
            let o = cmp_json(x.get(col), y.get(col));
            if desc { o.reverse() } else { o }
        });
    }
    let out = match a.format {
        Format::Json => serde_json::to_string_pretty(&t.rows).unwrap_or_default() + "\n",
        Format::Csv => {
            let mut s = t.columns.join(",") + "\n";
            for r in &t.rows {
                let cells: Vec<String> = t
                    .columns
                    .iter()
                    .map(|c| match r.get(c) {
                        None | Some(Json::Null) => String::new(),
                        Some(v) => {
                            let x = show_value(v);
                            if x.contains(',') { format!("\"{x}\"") } else { x }
                        }
                    })
                    .collect();
                s.push_str(&(cells.join(",") + "\n"));
            }
            s
        }
        Format::Table => {
            let cells: Vec<Vec<String>> = t.rows.iter().map(|r| t.columns.iter().map(|c| cell(r.get(c))).collect()).collect();
            let widths: Vec<usize> =
                t.columns.iter().enumerate().map(|(i, c)| cells.iter().map(|r| r[i].len()).chain([c.len()]).max().unwrap_or(0)).collect();
            let line = |v: Vec<&str>| {
                v.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string() + "\n"
            };
            let mut s = line(t.columns.iter().map(|c| c.as_str()).collect());
            for r in &cells {
                s.push_str(&line(r.iter().map(|c| c.as_str()).collect()));
            }
            s
        }
    };
    print_out(&out);
    Ok(())
}
