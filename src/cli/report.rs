//! `camflow report PIPELINE -o DIR`: a static HTML report of what has run so far.

use std::path::PathBuf;

use clap::Args;

use super::show::table_of;
use super::{PipelineArgs, Prepared, make_plan, open_store, prepare, print_out};
use crate::cache::Store;
use crate::error::{Error, Result};
use crate::ml::dataset::{Dataset, Split};
use crate::ml::metrics::Overlap;
use crate::ml::planes::Planes;
use crate::plan::Decision;
use crate::report::{self, GalleryInput, ReportInput, ReportTable};

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

pub fn run(cache: &std::path::Path, a: ReportArgs) -> Result<()> {
    let store = open_store(cache)?;
    let p = prepare(&a.p, &store)?;
    let decisions = make_plan(&p, &store, false, &|_| false);
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
    let empty = || ReportTable { columns: vec![], rows: vec![], threshold_value: None, threshold_method: None };
    let seg_stages = stages_with(&p, "masks");
    let cls_stages = stages_with(&p, "model");
    let segmentation = if seg_stages.is_empty() { empty() } else { to_report(table_of(&p, &store, &decisions, &seg_stages)?) };
    let classification = if cls_stages.is_empty() { empty() } else { to_report(table_of(&p, &store, &decisions, &cls_stages)?) };
    let gallery: Vec<GalleryInput> = gallery(&p, &store, &decisions, &segmentation, a.gallery).into_iter().collect();
    let lock = std::fs::read_to_string(crate::lockfile::path_for(&a.p.pipeline)).ok();
    let input = ReportInput { pipeline: &p.pipeline.name, spec: &p.pipeline.source, lock, segmentation, classification, gallery, pending };
    let index = report::write(&input, &a.out).map_err(|e| Error::Io(e.to_string()))?;
    print_out(&format!("report: {}\n", index.display()));
    Ok(())
}
