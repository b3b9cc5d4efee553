//! Result tables: one row per instance (what `camflow show --per-seed` prints), and their
//! aggregation over seeds (what `camflow show` prints by default and the report can plot).
//!
//! A *seed axis* is any sweep axis of a param named `seed` (written as `seeds: N` or as a
//! `seed` grid axis). Rows that differ only in their seed axes are repetitions of one sweep
//! point; every numeric metric of them is summarised as mean, sample sd and a 95% Student-t
//! interval ([`crate::stats`]). Paired comparisons (`accuracy_vs_original`,
//! `mean_dice_vs_random`, ...) are per-seed differences computed before aggregation, so their
//! interval is the paired t interval. Pure: no cache, no terminal.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value as Json, json};

use crate::stats::{LEVEL, Summary, summarize};

/// Rows with their column order, from `camflow show` (per instance) or [`aggregate`].
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<BTreeMap<String, Json>>,
    /// Axis columns -> their axis id (`stage.param`).
    pub axes: BTreeMap<String, String>,
}

/// Columns that are not metrics.
const META: &[&str] = &["stage", "instance", "status", "n"];

/// Suffixes of the columns a metric `m` becomes in an aggregated table: `m` is the mean.
pub const SD: &str = "_sd";
pub const CI_LO: &str = "_ci_lo";
pub const CI_HI: &str = "_ci_hi";
/// The number of seeds a metric's summary is over, where it differs from the row's `n`.
pub const N: &str = "_n";

/// Whether an axis id (`stage.param`) repeats a point rather than moving it: its param is `seed`.
pub fn is_seed_axis(id: &str) -> bool {
    id.split_once('.').map_or(id, |(_, p)| p) == "seed"
}

impl Table {
    /// The seed axis rows are repeated over: the first seed axis in column order, which is
    /// the most upstream one (e.g. `train`'s) because the table's maker (`cli::show`) puts
    /// axis columns in pipeline order. Why only one: a second seed axis below it (a retrain's
    /// own seeds) repeats runs that share one upstream model, so pooling both would count
    /// dependent runs as independent and make intervals too narrow. Further seed axes stay
    /// coordinates of the point.
    pub fn seed_columns(&self) -> Vec<String> {
        self.columns.iter().filter(|c| self.axes.get(*c).is_some_and(|id| is_seed_axis(id))).take(1).cloned().collect()
    }

    /// Metric columns, in column order.
    pub fn metric_columns(&self) -> Vec<String> {
        self.columns.iter().filter(|c| !META.contains(&c.as_str()) && !self.axes.contains_key(*c)).cloned().collect()
    }
}

/// One sweep point of one stage, over its seeds.
#[derive(Debug, Clone)]
pub struct Point {
    pub stage: String,
    /// Axis column -> value, seed axes left out.
    pub axes: BTreeMap<String, Json>,
    /// Instance labels of the point's rows (one per seed), in table order.
    pub instances: Vec<String>,
    /// Seed value of each row (an object of seed columns where there are several).
    pub seeds: Vec<Json>,
    /// Rows whose instance has run.
    pub done: usize,
    /// Metric -> summary over the rows that have a number for it.
    pub metrics: BTreeMap<String, Summary>,
    /// Text columns (e.g. warning flags) -> their distinct values over the rows, joined by `; `.
    pub text: BTreeMap<String, String>,
}

/// Metric columns holding text rather than numbers (e.g. `flags`): listed, not averaged.
fn text_metrics(t: &Table) -> BTreeSet<String> {
    t.metric_columns().into_iter().filter(|m| t.rows.iter().filter_map(|r| r.get(m)).any(|v| !v.is_null() && !v.is_number())).collect()
}

/// A metric is a count (e.g. `images`) when every value of it is an integer: its mean is
/// shown, without spread, since it does not vary by seed in any meaningful way.
fn count_metrics(t: &Table) -> BTreeSet<String> {
    t.metric_columns()
        .into_iter()
        .filter(|m| {
            let mut vals = t.rows.iter().filter_map(|r| r.get(m)).filter(|v| !v.is_null()).peekable();
            vals.peek().is_some() && vals.all(|v| v.is_i64() || v.is_u64())
        })
        .collect()
}

/// Groups the rows of `t` by stage and non-seed axis values, in order of first appearance.
pub fn points(t: &Table) -> Vec<Point> {
    let seeds = t.seed_columns();
    let point_cols: Vec<&String> = t.columns.iter().filter(|c| t.axes.contains_key(*c) && !seeds.contains(c)).collect();
    let texts = text_metrics(t);
    let metrics: Vec<String> = t.metric_columns().into_iter().filter(|m| !texts.contains(m)).collect();
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<&BTreeMap<String, Json>>> = BTreeMap::new();
    for r in &t.rows {
        let key: Vec<Json> = std::iter::once(r.get("stage").cloned().unwrap_or(Json::Null))
            .chain(point_cols.iter().map(|c| r.get(*c).cloned().unwrap_or(Json::Null)))
            .collect();
        let key = serde_json::to_string(&key).unwrap_or_default();
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(r);
    }
    order
        .iter()
        .map(|k| {
            let rows = &groups[k];
            let first = rows[0];
            let done: Vec<&&BTreeMap<String, Json>> =
                rows.iter().filter(|r| r.get("status").and_then(|s| s.as_str()) == Some("done")).collect();
            let mut m = BTreeMap::new();
            for c in &metrics {
                let xs: Vec<f64> = done.iter().filter_map(|r| r.get(c).and_then(|v| v.as_f64())).collect();
                if let Some(s) = summarize(&xs, LEVEL) {
                    m.insert(c.clone(), s);
                }
            }
            let mut text = BTreeMap::new();
            for c in &texts {
                let mut seen: Vec<String> = Vec::new();
                for v in done.iter().filter_map(|r| r.get(c)).filter(|v| !v.is_null()) {
                    let v = crate::sweep::show_value(v);
                    if !v.is_empty() && !seen.contains(&v) {
                        seen.push(v);
                    }
                }
                if !seen.is_empty() {
                    text.insert(c.clone(), seen.join("; "));
                }
            }
            Point {
                stage: first.get("stage").and_then(|s| s.as_str()).unwrap_or_default().to_string(),
                axes: point_cols.iter().filter_map(|c| first.get(*c).map(|v| ((*c).clone(), v.clone()))).collect(),
                instances: rows.iter().filter_map(|r| r.get("instance").and_then(|v| v.as_str()).map(String::from)).collect(),
                seeds: rows
                    .iter()
                    .map(|r| match seeds.as_slice() {
                        [] => Json::Null,
                        [one] => r.get(one).cloned().unwrap_or(Json::Null),
                        many => Json::Object(many.iter().map(|c| (c.clone(), r.get(c).cloned().unwrap_or(Json::Null))).collect()),
                    })
                    .collect(),
                done: done.len(),
                metrics: m,
                text,
            }
        })
        .collect()
}

fn num(x: f64) -> Json {
    serde_json::Number::from_f64(x).map(Json::Number).unwrap_or(Json::Null)
}

/// The table of [`points`]: `stage`, the non-seed axes, `n` (seeds that have run), then per
/// metric `m` (mean), `m_sd`, `m_ci_lo`, `m_ci_hi` (counts: the mean only; text columns such
/// as `flags`: their distinct values), then `status`
/// (`done`, `pending`, or `k/N done`). Each row also carries `instances` and `seeds` (not
/// columns: JSON only).
pub fn aggregate(t: &Table) -> Table {
    let counts = count_metrics(t);
    let texts = text_metrics(t);
    let seeds = t.seed_columns();
    let mut columns = vec!["stage".to_string()];
    columns.extend(t.columns.iter().filter(|c| t.axes.contains_key(*c) && !seeds.contains(c)).cloned());
    columns.push("n".into());
    let points = points(t);
    // A metric missing for some seeds that ran (a null precision of an empty mask) is
    // summarised over fewer seeds than `n`: it gets its own count column `m_n` then.
    let partial: BTreeSet<String> =
        points.iter().flat_map(|p| p.metrics.iter().filter(|(_, s)| s.n != p.done).map(|(m, _)| m.clone())).collect();
    for m in t.metric_columns() {
        columns.push(m.clone());
        if !counts.contains(&m) && !texts.contains(&m) {
            columns.extend([format!("{m}{SD}"), format!("{m}{CI_LO}"), format!("{m}{CI_HI}")]);
            if partial.contains(&m) {
                columns.push(format!("{m}{N}"));
            }
        }
    }
    columns.push("status".into());
    let rows = points
        .into_iter()
        .map(|p| {
            let mut r: BTreeMap<String, Json> = p.axes.clone();
            r.insert("stage".into(), json!(p.stage));
            r.insert("n".into(), json!(p.done));
            for (m, s) in &p.metrics {
                if counts.contains(m) {
                    let whole = s.mean.round() == s.mean && s.sd.is_none_or(|sd| sd == 0.0);
                    r.insert(m.clone(), if whole { json!(s.mean as i64) } else { num(s.mean) });
                    continue;
                }
                r.insert(m.clone(), num(s.mean));
                r.insert(format!("{m}{SD}"), s.sd.map_or(Json::Null, num));
                r.insert(format!("{m}{CI_LO}"), s.ci.map_or(Json::Null, |c| num(c.0)));
                r.insert(format!("{m}{CI_HI}"), s.ci.map_or(Json::Null, |c| num(c.1)));
                if partial.contains(m) {
                    r.insert(format!("{m}{N}"), json!(s.n));
                }
            }
            for (c, v) in &p.text {
                r.insert(c.clone(), json!(v));
            }
            let status = match p.done {
                0 => "pending".to_string(),
                d if d == p.instances.len() => "done".to_string(),
                d => format!("{d}/{} done", p.instances.len()),
            };
            r.insert("status".into(), json!(status));
            r.insert("instances".into(), json!(p.instances));
            r.insert("seeds".into(), Json::Array(p.seeds));
            r
        })
        .collect();
    let axes = t.axes.iter().filter(|(c, _)| !seeds.contains(c)).map(|(c, id)| (c.clone(), id.clone())).collect();
    Table { columns, rows, axes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(stage: &str, arch: &str, seed: u64, acc: Option<f64>, images: u64) -> BTreeMap<String, Json> {
        let mut r = BTreeMap::new();
        r.insert("stage".into(), json!(stage));
        r.insert("instance".into(), json!(format!("{stage}[arch={arch},seed={seed}]")));
        r.insert("arch".into(), json!(arch));
        r.insert("seed".into(), json!(seed));
        r.insert("accuracy".into(), acc.map_or(Json::Null, |a| json!(a)));
        r.insert("images".into(), json!(images));
        r.insert("status".into(), json!(if acc.is_some() { "done" } else { "pending" }));
        r
    }

    fn table(rows: Vec<BTreeMap<String, Json>>) -> Table {
        Table {
            columns: ["stage", "arch", "seed", "accuracy", "images", "status"].map(String::from).to_vec(),
            rows,
            axes: [("arch", "train.arch"), ("seed", "train.seed")].map(|(a, b)| (a.to_string(), b.to_string())).into_iter().collect(),
        }
    }

    #[test]
    fn aggregates_seeds_of_each_point() {
        let t = table(vec![
            row("s", "a", 1, Some(0.8), 40),
            row("s", "b", 1, Some(0.6), 40),
            row("s", "a", 2, Some(0.85), 40),
            row("s", "b", 2, None, 40),
            row("s", "a", 3, Some(0.78), 40),
            row("s", "b", 3, Some(0.7), 40),
        ]);
        let a = aggregate(&t);
        assert_eq!(a.columns, ["stage", "arch", "n", "accuracy", "accuracy_sd", "accuracy_ci_lo", "accuracy_ci_hi", "images", "status"]);
        assert_eq!(a.rows.len(), 2);
        let (ra, rb) = (&a.rows[0], &a.rows[1]);
        assert_eq!((ra["arch"].as_str(), ra["n"].as_u64(), ra["status"].as_str()), (Some("a"), Some(3), Some("done")));
        let want = summarize(&[0.8, 0.85, 0.78], LEVEL).unwrap();
        assert_eq!(ra["accuracy"].as_f64(), Some(want.mean));
        assert_eq!(ra["accuracy_sd"].as_f64(), want.sd);
        assert_eq!(ra["accuracy_ci_lo"].as_f64(), want.ci.map(|c| c.0));
        assert_eq!(ra["images"], json!(40));
        assert_eq!(ra["seeds"], json!([1, 2, 3]));
        // A pending seed is left out and said so.
        assert_eq!((rb["n"].as_u64(), rb["status"].as_str()), (Some(2), Some("2/3 done")));
        assert_eq!(rb["accuracy"].as_f64(), Some((0.6 + 0.7) / 2.0));
        assert!(!a.axes.contains_key("seed"));
    }

    #[test]
    fn a_point_without_seeds_has_no_interval() {
        let mut t = table(vec![row("s", "a", 1, Some(0.8), 40)]);
        t.axes.remove("seed");
        t.columns.retain(|c| c != "seed");
        let a = aggregate(&t);
        assert_eq!(a.rows[0]["n"], json!(1));
        assert_eq!(a.rows[0]["accuracy"].as_f64(), Some(0.8));
        assert!(a.rows[0]["accuracy_sd"].is_null() && a.rows[0]["accuracy_ci_hi"].is_null());
    }

    #[test]
    fn text_columns_are_listed_not_averaged() {
        let mut rows = vec![row("s", "a", 1, Some(0.8), 40), row("s", "a", 2, Some(0.7), 40), row("s", "a", 3, Some(0.9), 40)];
        rows[0].insert("flags".into(), json!("single class"));
        rows[2].insert("flags".into(), json!("single class"));
        rows[1].insert("flags".into(), Json::Null);
        let mut t = table(rows);
        t.columns.insert(5, "flags".into());
        let a = aggregate(&t);
        assert!(a.columns.contains(&"flags".to_string()) && !a.columns.contains(&"flags_sd".to_string()), "{:?}", a.columns);
        assert_eq!(a.rows[0]["flags"], json!("single class"));
    }

    #[test]
    fn seed_axes_by_param_name() {
        assert!(is_seed_axis("train.seed") && !is_seed_axis("data.split_seed") && !is_seed_axis("train.seeds"));
    }

    #[test]
    fn a_metric_missing_for_a_seed_that_ran_gets_its_own_count() {
        let mut rows = vec![row("s", "a", 1, Some(0.8), 40), row("s", "a", 2, Some(0.6), 40), row("s", "a", 3, Some(0.7), 40)];
        rows[1].insert("precision".into(), Json::Null);
        rows[0].insert("precision".into(), json!(0.5));
        rows[2].insert("precision".into(), json!(0.7));
        let mut t = table(rows);
        t.columns.insert(4, "precision".into());
        let a = aggregate(&t);
        let r = &a.rows[0];
        assert_eq!(r["n"].as_u64(), Some(3));
        assert_eq!(r["precision_n"].as_u64(), Some(2), "{r:?}");
        assert!(a.columns.contains(&"precision_n".to_string()) && !a.columns.contains(&"accuracy_n".to_string()));
    }

    #[test]
    fn only_the_most_upstream_seed_axis_repeats_a_point() {
        // train seeds 1..3 x retrain seeds 10, 11: two points (retrain seed 10 and 11), each
        // over 3 independent trainings, never one point over 6 dependent runs.
        let mut rows = Vec::new();
        for ts in 1..=3u64 {
            for rs in [10u64, 11] {
                let mut r = row("cls", "a", ts, Some(0.5 + ts as f64 / 10.0 + rs as f64 / 1000.0), 40);
                r.insert("retrain.seed".into(), json!(rs));
                rows.push(r);
            }
        }
        let mut t = table(rows);
        t.columns.insert(3, "retrain.seed".into());
        t.axes.insert("retrain.seed".into(), "retrain.seed".into());
        let a = aggregate(&t);
        assert_eq!(a.rows.len(), 2);
        assert!(a.rows.iter().all(|r| r["n"].as_u64() == Some(3)), "{:?}", a.rows);
        assert!(a.columns.contains(&"retrain.seed".to_string()));
    }
}
