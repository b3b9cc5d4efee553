//! `camflow report PIPELINE -o DIR`: a static HTML report of what has run so far.

use std::path::PathBuf;

use clap::Args;

use super::show::table_of;
use super::{PipelineArgs, Prepared, make_plan, open_store_to_read, prepare, print_out};
use crate::cache::Store;
use crate::error::{Error, Result};
use crate::ml::dataset::{Dataset, Split};
use crate::ml::metrics::Overlap;
use crate::ml::planes::Planes;
use crate::plan::Decision;
use crate::report::{self, GalleryInput, MethodGallery, ReportInput, ReportTable};

#[derive(Args)]
pub struct ReportArgs {
    #[command(flatten)]
    p: PipelineArgs,
    /// Output folder (created); index.html and img/ go there.
    #[arg(short, long, default_value = "report")]
    out: PathBuf,
    /// Gallery images per best/worst group.
    #[arg(long, default_value_t = 4)]
    gallery: usize,
}

fn output_path(store: &Store, decisions: &[Decision], idx: usize, file: &str) -> Option<PathBuf> {
    let Decision::Cached { key, .. } = &decisions[idx] else { return None };
    let rec = store.read_record(key)?.ok()?;
    store.verified_object(rec.outputs.get(file)?).ok()
}

fn stages_with(p: &Prepared, slot: &str) -> Vec<String> {
    let mut v: Vec<String> =
        p.instances.iter().filter(|i| i.kind == "score" && i.inputs.contains_key(slot)).map(|i| i.stage.clone()).collect();
    v.dedup();
    v
}

/// Best and worst test images (with tumor) of the best segmentation instance.
fn gallery(p: &Prepared, store: &Store, decisions: &[Decision], seg: &ReportTable, n: usize) -> Option<GalleryInput> {
    let best = seg.rows.iter().filter(|r| r.get("mean_dice").and_then(|v| v.as_f64()).is_some()).max_by(|a, b| {
        let x = a.get("mean_dice").and_then(|v| v.as_f64()).unwrap_or(0.0);
        let y = b.get("mean_dice").and_then(|v| v.as_f64()).unwrap_or(0.0);
        x.total_cmp(&y)
    })?;
    let label = best.get("instance")?.as_str()?;
    let score = p.instances.iter().position(|i| i.label == label)?;
    let masks_i = *p.instances[score].inputs.get("masks")?;
    let data_i = *p.instances[score].inputs.get("data")?;
    let heat_i = *p.instances[masks_i].inputs.get("heatmaps")?;
    let ds = Dataset::decode(&std::fs::read(output_path(store, decisions, data_i, "dataset.bin")?).ok()?).ok()?;
    let heat = Planes::decode(&std::fs::read(output_path(store, decisions, heat_i, "heatmaps.bin")?).ok()?).ok()?;
    let masks = Planes::decode(&std::fs::read(output_path(store, decisions, masks_i, "masks.bin")?).ok()?).ok()?;
    let (hi, mi) = (heat.index(), masks.index());
    let mut scored: Vec<(f64, usize)> = ds
        .indices(Split::Test)
        .into_iter()
        .filter(|&i| ds.samples[i].mask.iter().any(|&m| m > 0))
        .filter_map(|i| {
            let m = &masks.data[*mi.get(ds.samples[i].id.as_str())?];
            let pred: Vec<u8> = m.iter().map(|&v| (v > 0.5) as u8).collect();
            Some((Overlap::of(&pred, &ds.samples[i].mask).dice(), i))
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut picks: Vec<(f64, usize, &str)> = scored.iter().take(n).map(|&(d, i)| (d, i, "best")).collect();
    picks.extend(scored.iter().rev().take(n).rev().map(|&(d, i)| (d, i, "worst")));
    let items = picks
        .into_iter()
        .filter_map(|(d, i, tag)| {
            let s = &ds.samples[i];
            Some((
                s.clone(),
                heat.data[*hi.get(s.id.as_str())?].clone(),
                masks.data[*mi.get(s.id.as_str())?].clone(),
                format!("{tag}: {} (Dice {d:.3})", s.id),
            ))
        })
        .collect();
    Some(GalleryInput { title: format!("{label}: best and worst test images by Dice"), height: ds.height, width: ds.width, items })
}

/// Metrics of a finished instance.
fn metrics_of(store: &Store, decisions: &[Decision], idx: usize) -> Option<serde_json::Value> {
    let Decision::Cached { key, .. } = &decisions[idx] else { return None };
    store.read_record(key)?.ok().map(|r| r.metrics)
}

/// The same test images under each heatmap method: the gradcam instances that explain the
/// same model on the same data as the first gradcam instance, and
/// up to `n` test images with a tumor plus one without.
fn methods_gallery(p: &Prepared, store: &Store, decisions: &[Decision], n: usize) -> Option<MethodGallery> {
    let cams: Vec<usize> = (0..p.instances.len()).filter(|&i| p.instances[i].kind == "gradcam").collect();
    let same = |a: usize, b: usize| {
        p.instances[a].inputs.get("model") == p.instances[b].inputs.get("model")
            && p.instances[a].inputs.get("data") == p.instances[b].inputs.get("data")
    };
    let first = *cams.first()?;
    let group: Vec<usize> = cams.iter().copied().filter(|&d| same(first, d)).collect();
    let data_i = *p.instances[first].inputs.get("data")?;
    let ds = Dataset::decode(&std::fs::read(output_path(store, decisions, data_i, "dataset.bin")?).ok()?).ok()?;
    let mut methods = Vec::new();
    let mut planes = Vec::new();
    for &c in &group {
        let Some(path) = output_path(store, decisions, c, "heatmaps.bin") else { continue };
        let Some(pl) = std::fs::read(path).ok().and_then(|b| Planes::decode(&b).ok()) else { continue };
        methods.push(p.instances[c].params.get("method").map(crate::sweep::show_value).unwrap_or_else(|| p.instances[c].label.clone()));
        planes.push(pl);
    }
    if planes.is_empty() {
        return None;
    }
    let test = ds.indices(Split::Test);
    let tumor = |i: &usize| ds.samples[*i].mask.iter().any(|&m| m > 0);
    let mut picks: Vec<usize> = test.iter().copied().filter(tumor).take(n).collect();
    picks.extend(test.iter().copied().filter(|i| !tumor(i)).take(1));
    let items = picks
        .into_iter()
        .filter_map(|i| {
            let s = &ds.samples[i];
            let heats = planes.iter().map(|pl| pl.index().get(s.id.as_str()).map(|&k| pl.data[k].clone())).collect::<Option<Vec<_>>>()?;
            Some((s.clone(), heats))
        })
        .collect();
    let model = p.instances[first].inputs.get("model").map(|&m| p.instances[m].label.clone()).unwrap_or_default();
    Some(MethodGallery { title: format!("heatmaps of model {model}"), height: ds.height, width: ds.width, methods, items })
}

/// `path` with its deepest existing folder resolved (links, `..`) and the rest appended: where
/// a folder not made yet will be.
fn resolved(path: &std::path::Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut at = abs.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(at) {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                at = parent;
            }
            _ => return abs,
        }
    }
}

pub fn run(cache: &std::path::Path, a: ReportArgs) -> Result<()> {
    // The cache holds only what camflow writes there (`verify` reports anything else).
    let (out, root) = (resolved(&a.out), resolved(cache));
    if out.starts_with(&root) {
        return Err(Error::Usage(format!(
            "report -o {}: that folder is inside the cache ({}), which holds only what camflow writes there; choose one outside it",
            a.out.display(),
            cache.display()
        )));
    }
    let store = open_store_to_read(cache)?;
    let p = prepare(&a.p, &store)?;
    store.note_if_absent();
    let decisions = make_plan(&p, &store, false, &|_| false)?;
    let pending = decisions.iter().filter(|d| !matches!(d, Decision::Cached { .. })).count();
    let thresholds: Vec<&str> = p.pipeline.stages.values().filter(|s| s.kind == "threshold").map(|s| s.name.as_str()).collect();
    let to_report = |t: super::show::Table| {
        let find = |param: &str| {
            t.axes
                .iter()
                .find(|(_, id)| id.split_once('.').is_some_and(|(st, pa)| pa == param && thresholds.contains(&st)))
                .map(|(c, _)| c.clone())
        };
        let (threshold_value, threshold_method) = (find("value"), find("method"));
        ReportTable { columns: t.columns, rows: t.rows, threshold_value, threshold_method }
    };
    // Repetitions over seeds are shown as their mean with a 95% interval (the plots draw it);
    // the gallery still picks one instance from the per-instance rows.
    let aggregated = |t: super::show::Table| if t.seed_columns().is_empty() { t } else { crate::results::aggregate(&t) };
    let empty = || ReportTable { columns: vec![], rows: vec![], threshold_value: None, threshold_method: None };
    let seg_stages = stages_with(&p, "masks");
    let cls_stages = stages_with(&p, "model");
    let seg_rows = if seg_stages.is_empty() { None } else { Some(table_of(&p, &store, &decisions, &seg_stages)?) };
    let gallery: Vec<GalleryInput> = match &seg_rows {
        Some(t) => {
            let per_instance = to_report(t.clone());
            gallery(&p, &store, &decisions, &per_instance, a.gallery).into_iter().collect()
        }
        None => vec![],
    };
    let segmentation = seg_rows.map(|t| to_report(aggregated(t))).unwrap_or_else(empty);
    let classification =
        if cls_stages.is_empty() { empty() } else { to_report(aggregated(table_of(&p, &store, &decisions, &cls_stages)?)) };
    let lock = std::fs::read_to_string(crate::lockfile::path_for(&a.p.pipeline)).ok();
    let (mut data, mut trained, mut warnings) = (Vec::new(), Vec::new(), Vec::new());
    for (i, inst) in p.instances.iter().enumerate() {
        let Some(m) = metrics_of(&store, &decisions, i) else { continue };
        for w in m.get("warnings").and_then(|w| w.as_array()).into_iter().flatten() {
            let text = |k: &str| w.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            warnings.push((inst.label.clone(), text("flag"), text("message")));
        }
        match inst.kind.as_str() {
            "data" => data.push((inst.label.clone(), m)),
            "train" | "retrain" => trained.push((inst.label.clone(), m)),
            _ => {}
        }
    }
    let methods = methods_gallery(&p, &store, &decisions, a.gallery);
    let input = ReportInput {
        pipeline: &p.pipeline.name,
        spec: &p.pipeline.source,
        lock,
        segmentation,
        classification,
        gallery,
        methods,
        data,
        trained,
        warnings,
        pending,
    };
    let index = report::write(&input, &a.out).map_err(|e| Error::Io(e.to_string()))?;
    print_out(&format!("report: {}\n", index.display()));
    Ok(())
}
