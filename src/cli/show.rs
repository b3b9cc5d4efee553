//! `camflow show`: one row per sweep point of the chosen stages, with its axis values and
//! metrics, from whatever has run so far. Where a stage repeats points over seeds, rows are
//! aggregated over them (mean, sd, 95% t interval; `crate::results`); `--per-seed` lists
//! one row per instance.

use std::collections::{BTreeMap, BTreeSet};

use clap::{Args, ValueEnum};
use serde_json::{Value as Json, json};

use super::{PipelineArgs, Prepared, make_plan, open_store_to_read, prepare, print_out};
use crate::cache::Store;
use crate::error::{Error, Result};
use crate::plan::Decision;
pub use crate::results::Table;
use crate::results::{CI_HI, CI_LO, SD, aggregate};
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
    /// Keep rows whose column equals a value: --where arch=vgg-small (repeatable; every
    /// condition must hold).
    #[arg(long = "where", value_name = "COLUMN=VALUE")]
    filters: Vec<String>,
    /// One row per instance (per seed) instead of the mean, sd and 95% interval over seeds.
    #[arg(long)]
    per_seed: bool,
    /// Only these metrics (with their sd and interval columns); repeatable.
    #[arg(long, value_name = "METRIC")]
    metric: Vec<String>,
}

/// Metrics of a record as a flat map: scalar values only (per-epoch logs are left out).
fn flat_metrics(m: &Json) -> BTreeMap<String, Json> {
    m.as_object()
        .map(|o| o.iter().filter(|(_, v)| !v.is_object() && !v.is_array()).map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// Rows for the chosen stages, one per instance: `stage`, `instance`, short axis names, then
/// metrics, including the paired differences `accuracy_vs_original`, `auc_vs_original`
/// (a retrained model minus the original it was derived from, same seed) and
/// `mean_dice_vs_random` (masks from a heatmap method minus the same point's masks from the
/// `random` method, same trained model and images). `results::aggregate` summarises it over
/// seeds.
pub fn table(cache: &std::path::Path, p: &PipelineArgs, stages: &[String]) -> Result<Table> {
    let store = open_store_to_read(cache)?;
    let prep = prepare(p, &store)?;
    store.note_if_absent();
    let decisions = make_plan(&prep, &store, false, &|_| false)?;
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
    // model to its `train` instance, then find a score of that model on the same split (a
    // validation-split score of the original is no baseline for a test-split one).
    let split_of = |i: usize| prep.instances[i].params.get("split").and_then(|s| s.as_str()).unwrap_or("test");
    let original_of = |i: usize| -> Option<BTreeMap<String, Json>> {
        let model = *prep.instances[i].inputs.get("model")?;
        if prep.instances[model].kind != "retrain" {
            return None;
        }
        let train = find_upstream(&prep.instances, &prep.instances[model].inputs, |x| x.kind == "train")?;
        // On the images it was trained from: a score of the original on filtered images (a
        // pipeline may have one) is no baseline.
        let own_data = prep.instances[train].inputs.get("data");
        let score = (0..prep.instances.len()).find(|&j| {
            let x = &prep.instances[j];
            x.kind == "score" && x.inputs.get("model") == Some(&train) && x.inputs.get("data") == own_data && split_of(j) == split_of(i)
        })?;
        metrics_of(score)
    };
    // The same point with the random heatmap method: same stage and coordinates except the
    // upstream gradcam stage's `method` axis. Indexed by coordinates once.
    let by_coords: std::collections::HashMap<(&str, String), usize> = prep
        .instances
        .iter()
        .enumerate()
        .filter(|(_, x)| chosen.contains(&x.stage))
        .map(|(i, x)| ((x.stage.as_str(), serde_json::to_string(&x.coords).unwrap_or_default()), i))
        .collect();
    let random_of = |i: usize| -> Option<BTreeMap<String, Json>> {
        let inst = &prep.instances[i];
        let cam = find_upstream(&prep.instances, &inst.inputs, |x| x.kind == "gradcam")?;
        let axis = format!("{}.method", prep.instances[cam].stage);
        if inst.coords.get(&axis)?.as_str()? == "random" {
            return None;
        }
        let mut c = inst.coords.clone();
        c.insert(axis, json!("random"));
        metrics_of(*by_coords.get(&(inst.stage.as_str(), serde_json::to_string(&c).unwrap_or_default()))?)
    };
    let diff = |a: Option<&Json>, b: Option<&Json>| match (a.and_then(|x| x.as_f64()), b.and_then(|x| x.as_f64())) {
        (Some(x), Some(y)) => serde_json::Number::from_f64(x - y).map_or(Json::Null, Json::Number),
        _ => Json::Null,
    };
    // The guards' flags (`warnings: [{flag, ..}]` in a record's metrics) of an instance, of
    // the model it scores and of the data it reads, so a row shows what is wrong with its
    // classifier or its data (a retrained classifier's row: the filter's `label-leak`).
    // One instance's own flags, read once: many rows share one model or one data input.
    let own_flags: std::cell::RefCell<std::collections::HashMap<usize, Vec<String>>> = Default::default();
    let flags_of = |i: usize| -> Vec<String> {
        let inputs = &prep.instances[i].inputs;
        let own = std::iter::once(i).chain(inputs.get("model").copied()).chain(inputs.get("data").copied());
        let mut v: Vec<String> = Vec::new();
        for j in own {
            let mut memo = own_flags.borrow_mut();
            let flags = memo.entry(j).or_insert_with(|| {
                let Decision::Cached { key, .. } = &decisions[j] else { return Vec::new() };
                let Some(Ok(r)) = store.read_record(key) else { return Vec::new() };
                let warnings = r.metrics.get("warnings").and_then(|w| w.as_array()).cloned().unwrap_or_default();
                warnings.iter().filter_map(|w| w.get("flag").and_then(|f| f.as_str()).map(String::from)).collect()
            });
            for f in flags.iter() {
                if !v.contains(f) {
                    v.push(f.clone());
                }
            }
        }
        v
    };
    let mut any_flags = false;
    let mut any_mismatch = false;
    let mut axis_cols: Vec<String> = Vec::new();
    let mut axes: BTreeMap<String, String> = BTreeMap::new();
    let mut metric_cols: BTreeSet<String> = BTreeSet::new();
    let mut rows = Vec::new();
    // Axis columns in pipeline order, upstream stages first (`coords` sorts by stage name):
    // `results` pools rows over the first seed axis, which must be the most upstream one
    // (train's, not a retrain's own seeds, whatever the stages are called).
    let mut rank: BTreeMap<&str, usize> = BTreeMap::new();
    for inst in &prep.instances {
        let next = rank.len();
        rank.entry(inst.stage.as_str()).or_insert(next);
    }
    let stage_rank = |id: &str| id.split_once('.').and_then(|(s, _)| rank.get(s).copied()).unwrap_or(usize::MAX);
    for (idx, (inst, d)) in prep.instances.iter().zip(decisions).enumerate() {
        if !chosen.contains(&inst.stage) {
            continue;
        }
        let mut row = BTreeMap::new();
        row.insert("stage".to_string(), json!(inst.stage));
        row.insert("instance".to_string(), json!(inst.label));
        let mut coords: Vec<(&String, &Json)> = inst.coords.iter().collect();
        coords.sort_by_key(|(id, _)| stage_rank(id));
        for (id, v) in coords {
            let short = id.split_once('.').map(|(_, p)| p).unwrap_or(id);
            let ambiguous = inst.coords.keys().filter(|k| k.split_once('.').map(|(_, p)| p) == Some(short)).count() > 1;
            let col = if ambiguous { id.clone() } else { short.to_string() };
            if !axis_cols.contains(&col) {
                axis_cols.push(col.clone());
            }
            axes.insert(col.clone(), id.clone());
            row.insert(col, v.clone());
        }
        // Params a retrained classifier was set to, unlike the classifier it is compared with
        // (of the instance, or of the model it scores): known from the spec, run or not.
        let mismatch: Vec<crate::sweep::Mismatch> = std::iter::once(idx)
            .chain(inst.inputs.get("model").copied())
            .flat_map(|j| crate::sweep::inherit_mismatches(&prep.instances, j, &prep.catalog))
            .collect();
        if !mismatch.is_empty() {
            any_mismatch = true;
            row.insert("mismatch".to_string(), json!(crate::sweep::describe_mismatches(&mismatch)));
        }
        let status = match d {
            Decision::Cached { .. } => {
                for (k, v) in metrics_of(idx).unwrap_or_default() {
                    metric_cols.insert(k.clone());
                    row.insert(k, v);
                }
                let flags = flags_of(idx);
                if !flags.is_empty() {
                    any_flags = true;
                    row.insert("flags".to_string(), json!(flags.join(",")));
                }
                if let Some(orig) = original_of(idx) {
                    for k in ["accuracy", "auc"] {
                        let col = format!("original_{k}");
                        metric_cols.insert(col.clone());
                        row.insert(col, orig.get(k).cloned().unwrap_or(Json::Null));
                        let col = format!("{k}_vs_original");
                        metric_cols.insert(col.clone());
                        row.insert(col, diff(row.get(k), orig.get(k)));
                    }
                }
                if row.contains_key("mean_dice")
                    && let Some(random) = random_of(idx)
                {
                    metric_cols.insert("mean_dice_vs_random".into());
                    row.insert("mean_dice_vs_random".into(), diff(row.get("mean_dice"), random.get("mean_dice")));
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
        "mean_dice_vs_random",
        "accuracy",
        "original_accuracy",
        "accuracy_vs_original",
        "majority_rate",
        "balanced_accuracy",
        "auc",
        "original_auc",
        "auc_vs_original",
        "sensitivity",
        "specificity",
    ];
    let mut columns = vec!["stage".to_string()];
    columns.extend(axis_cols);
    columns.extend(preferred.iter().filter(|c| metric_cols.contains(**c)).map(|c| c.to_string()));
    columns.extend(metric_cols.iter().filter(|c| !preferred.contains(&c.as_str())).cloned());
    if any_flags {
        columns.push("flags".into());
    }
    if any_mismatch {
        columns.push("mismatch".into());
    }
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

/// Sorts by `col` (numbers by value, then text); rows without a value in `col` go last in
/// either direction, so `--sort -accuracy` starts with the best scored row, not a blank one.
fn sort_rows(rows: &mut [BTreeMap<String, Json>], col: &str, desc: bool) {
    let value = |r: &BTreeMap<String, Json>| r.get(col).filter(|v| !v.is_null()).cloned();
    rows.sort_by(|x, y| match (value(x), value(y)) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (Some(_), None) => std::cmp::Ordering::Less,
        (Some(a), Some(b)) => {
            let o = cmp_json(Some(&a), Some(&b));
            if desc { o.reverse() } else { o }
        }
    });
}

/// Keeps the columns of the chosen metrics (and their sd/interval columns) besides the
/// stage, axis, `n` and `status` columns.
fn keep_metrics(t: &mut Table, metrics: &[String]) -> Result<()> {
    if metrics.is_empty() {
        return Ok(());
    }
    let all = t.metric_columns();
    for m in metrics {
        if !all.contains(m) {
            let names: Vec<&str> = all.iter().filter(|c| ![SD, CI_LO, CI_HI].iter().any(|s| c.ends_with(s))).map(|s| s.as_str()).collect();
            return Err(Error::Usage(format!("--metric {m}: no such metric (metrics: {})", names.join(", "))));
        }
    }
    let wanted = |c: &str| metrics.iter().any(|m| c == m || [SD, CI_LO, CI_HI].iter().any(|s| c == format!("{m}{s}")));
    t.columns.retain(|c| !all.contains(c) || wanted(c));
    Ok(())
}

pub fn show(cache: &std::path::Path, a: ShowArgs) -> Result<()> {
    let per_instance = table(cache, &a.p, &a.stage)?;
    // Aggregate only where there is something to aggregate: without a seed axis the rows are
    // the points already, and their table keeps its columns.
    let seeded = !per_instance.seed_columns().is_empty();
    let mut t = if seeded && !a.per_seed { aggregate(&per_instance) } else { per_instance };
    keep_metrics(&mut t, &a.metric)?;
    for f in &a.filters {
        let (col, val) = f.split_once('=').ok_or_else(|| Error::Usage(format!("--where {f}: expected COLUMN=VALUE")))?;
        if !t.columns.iter().any(|c| c == col) {
            let hint = if seeded && !a.per_seed { "; rows are aggregated over seeds, --per-seed lists each" } else { "" };
            return Err(Error::Usage(format!("--where {f}: no column `{col}` (columns: {}){hint}", t.columns.join(", "))));
        }
        // A number matches by value (`0.50` finds 0.5) or as shown (`0.9843`), anything else
        // by its text.
        let wanted: Option<f64> = val.parse().ok();
        t.rows.retain(|r| {
            r.get(col).is_some_and(|v| match (v.as_f64(), wanted) {
                (Some(x), Some(w)) => x == w || cell(Some(v)) == val,
                _ => show_value(v) == val || cell(Some(v)) == val,
            })
        });
    }
    if let Some(s) = &a.sort {
        let (desc, col) = match s.strip_prefix('-') {
            Some(c) => (true, c),
            None => (false, s.as_str()),
        };
        if !t.columns.iter().any(|c| c == col) {
            return Err(Error::Usage(format!("--sort {s}: no column `{col}` (columns: {})", t.columns.join(", "))));
        }
        sort_rows(&mut t.rows, col, desc);
    }
    let out = match a.format {
        Format::Json => {
            // The table's columns, plus `instance` (`instances` and `seeds` when aggregated).
            let extra = ["instance", "instances", "seeds"];
            let rows: Vec<BTreeMap<&String, &Json>> =
                t.rows.iter().map(|r| r.iter().filter(|(k, _)| t.columns.contains(k) || extra.contains(&k.as_str())).collect()).collect();
            serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n"
        }
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

#[cfg(test)]
mod sort_tests {
    use super::*;

    fn rows(vals: &[Option<Json>]) -> Vec<BTreeMap<String, Json>> {
        vals.iter()
            .enumerate()
            .map(|(i, v)| {
                let mut r = BTreeMap::from([("id".to_string(), json!(i))]);
                if let Some(v) = v {
                    r.insert("acc".into(), v.clone());
                }
                r
            })
            .collect()
    }

    fn ids(r: &[BTreeMap<String, Json>]) -> Vec<i64> {
        r.iter().map(|r| r["id"].as_i64().unwrap()).collect()
    }

    #[test]
    fn rows_without_the_column_go_last_both_ways() {
        let base = rows(&[None, Some(json!(0.5)), Some(Json::Null), Some(json!(0.9)), Some(json!(0.1))]);
        let mut up = base.clone();
        sort_rows(&mut up, "acc", false);
        assert_eq!(ids(&up), vec![4, 1, 3, 0, 2]);
        let mut down = base;
        sort_rows(&mut down, "acc", true);
        assert_eq!(ids(&down), vec![3, 1, 4, 0, 2]);
    }
}
