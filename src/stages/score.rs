//! `score`: segmentation scores of masks against ground truth, and classification scores of
//! a model, on one split. Writes `metrics.json` and a per-image `per_image.csv`.

use std::collections::BTreeMap;

use serde_json::json;

use super::io;
use super::params as p;
use super::train::{backend, classifier_warnings, load_model, nan_to_null};
use crate::ml::backend::{BackendJob, dispatch};
use crate::ml::dataset::{Dataset, Split};
use crate::ml::fast_ops::TrainBackend;
use crate::ml::metrics::{self, Overlap};
use crate::ml::train::predict;
use crate::stage_kind::*;

pub struct Score;

struct PredictJob<'a> {
    inputs: &'a BTreeMap<String, InputArtifact>,
    ds: &'a Dataset,
    idx: &'a [usize],
}

impl BackendJob for PredictJob<'_> {
    type Output = Result<Vec<f32>, StageError>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        let (_, model) = load_model::<B::InnerBackend>(self.inputs, "model", &device, self.ds)?;
        Ok(predict(&model, self.ds, self.idx, 64))
    }
}

impl StageKind for Score {
    fn name(&self) -> &'static str {
        "score"
    }
    fn version(&self) -> u32 {
        // 2: convolutions and pooling on the CPU run through `ml::fast_ops` (other rounding).
        // 3: the portable CPU profile (own GEMM, head, loss and softmax; libm).
        // 4: a model's score adds majority_rate, balanced_accuracy and the guards' `warnings`;
        //    Dice leaves out images without ground truth (`images_without_mask`).
        // 5: `one-class-split` warnings (no single-class blame on such splits).
        5
    }
    fn doc(&self) -> &'static str {
        "Scores masks against the ground truth (mean-Dice over images with tumor, Dice over all images, IoU, pixel precision/recall) and/or a model's classification (accuracy, sensitivity, specificity, ROC AUC)."
    }
    fn inputs(&self) -> &'static [InputSlot] {
        &[
            InputSlot {
                name: "data",
                artifact: ArtifactType::Dataset,
                required: true,
                doc: "ground truth: labels and masks (for a retrained model, the filtered dataset)",
            },
            InputSlot { name: "masks", artifact: ArtifactType::Masks, required: false, doc: "predicted masks to score" },
            InputSlot { name: "model", artifact: ArtifactType::Model, required: false, doc: "classifier to score" },
        ]
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Metrics
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: "split",
            ty: ParamType::Choice(&["test", "val", "train", "all"]),
            default: || json!("test"),
            optional: false,
            doc: "which images are scored",
        }]
    }
    fn check_inputs(&self, given: &[&str]) -> Option<String> {
        // Both inputs are optional, but with neither there is nothing to score.
        (!given.contains(&"masks") && !given.contains(&"model"))
            .then(|| "score needs a `masks` input (masks to score against the ground truth), a `model` input (a classifier), or both".into())
    }
    fn backend_dependent(&self) -> bool {
        // Only through a model input; harmless to key on it always.
        true
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<Outcome, StageError> {
        let ds = io::dataset(io::file(ctx.inputs, "data", io::DATASET_FILE)?)?;
        let idx: Vec<usize> = match p::str(ctx.params, "split")? {
            "all" => (0..ds.samples.len()).collect(),
            "val" => ds.indices(Split::Val),
            "train" => ds.indices(Split::Train),
            _ => ds.indices(Split::Test),
        };
        // The spec refuses this already; a job file built by hand could still ask for it.
        if let Some(m) = self.check_inputs(&ctx.inputs.keys().map(String::as_str).collect::<Vec<_>>()) {
            return Err(StageError::new(m));
        }
        if idx.is_empty() {
            return Err(StageError::new(empty_split(ctx.inputs, p::str(ctx.params, "split")?)));
        }
        let mut metrics = json!({ "images": idx.len() });
        let mut dice_col: Option<Vec<Option<Overlap>>> = None;
        if ctx.inputs.contains_key("masks") {
            let masks = io::planes(io::file(ctx.inputs, "masks", io::MASKS_FILE)?)?;
            let index = masks.index();
            let mut pairs = Vec::with_capacity(idx.len());
            // An image without ground truth (a positive kept by `missing_masks: exclude`) is
            // in no segmentation score: not in Dice, IoU, precision or recall, nor counted
            // among images with tumor; its per-image Dice is empty.
            let mut scored = Vec::with_capacity(idx.len());
            for &i in &idx {
                let s = &ds.samples[i];
                let m = index.get(s.id.as_str()).ok_or_else(|| StageError::new(format!("no mask for sample `{}`", s.id)))?;
                scored.push(!s.mask.is_empty());
                if s.mask.is_empty() {
                    continue;
                }
                let pred: Vec<u8> = masks.data[*m].iter().map(|&v| (v > 0.5) as u8).collect();
                pairs.push((Overlap::of(&pred, &s.mask), s.mask.iter().any(|&v| v > 0)));
            }
            let seg = metrics::segmentation(&pairs);
            metrics["mean_dice"] = nan_to_null(seg.mean_dice);
            metrics["dice_all"] = nan_to_null(seg.dice_all);
            metrics["iou"] = nan_to_null(seg.mean_iou);
            metrics["precision"] = nan_to_null(seg.precision);
            metrics["recall"] = nan_to_null(seg.recall);
            metrics["images_with_tumor"] = json!(seg.images_with_tumor);
            metrics["images_without_mask"] = json!(scored.iter().filter(|s| !**s).count());
            let mut overlaps = pairs.into_iter().map(|p| p.0);
            dice_col = Some(scored.iter().map(|&s| if s { overlaps.next() } else { None }).collect());
        }
        let mut probs: Option<Vec<f32>> = None;
        if ctx.inputs.contains_key("model") {
            let pr =
                dispatch(backend(ctx)?, ctx.device, PredictJob { inputs: ctx.inputs, ds: &ds, idx: &idx }).map_err(StageError::new)??;
            let labels: Vec<u8> = idx.iter().map(|&i| ds.samples[i].label).collect();
            let c = metrics::classification(&pr, &labels);
            metrics["accuracy"] = nan_to_null(c.accuracy);
            metrics["sensitivity"] = nan_to_null(c.sensitivity);
            metrics["specificity"] = nan_to_null(c.specificity);
            metrics["auc"] = nan_to_null(c.auc);
            metrics["majority_rate"] = nan_to_null(c.majority_rate);
            metrics["balanced_accuracy"] = nan_to_null(c.balanced_accuracy);
            let split = p::str(ctx.params, "split")?;
            let warnings = classifier_warnings(&[(split, &c)]);
            for w in &warnings {
                (ctx.log)(format!("warning: {}: {}", w.flag, w.message));
            }
            metrics["warnings"] = json!(warnings);
            probs = Some(pr);
        }
        let mut csv = String::from("id,group,label,probability,dice,iou\n");
        for (k, &i) in idx.iter().enumerate() {
            let s = &ds.samples[i];
            let prob = probs.as_ref().map(|p| format!("{:.6}", p[k])).unwrap_or_default();
            let (d, u) = dice_col
                .as_ref()
                .and_then(|o| o[k].as_ref())
                .map(|o| (format!("{:.6}", o.dice()), format!("{:.6}", o.iou())))
                .unwrap_or_default();
            csv.push_str(&format!("{},{},{},{prob},{d},{u}\n", quote(&s.id), quote(&s.group), s.label));
        }
        let m = io::write(ctx.out_dir, "metrics.json", &serde_json::to_vec_pretty(&metrics).map_err(StageError::new)?)?;
        let c = io::write(ctx.out_dir, "per_image.csv", csv.as_bytes())?;
        (ctx.log)(format!("scored {} images: {metrics}", idx.len()));
        Ok(Outcome { files: vec![m, c], metrics })
    }
}

/// Why there is nothing to score: every metric would be null, which must not pass for a
/// result. Names the split and the upstream params that made it empty.
fn empty_split(inputs: &BTreeMap<String, InputArtifact>, split: &str) -> String {
    let upstream = inputs.get("data");
    let names = ["count", "slices_per_patient", "tumor_fraction", "val_fraction", "test_fraction", "split_seed"];
    let params: Vec<String> = upstream
        .map(|u| names.iter().filter_map(|n| u.params.get(*n).filter(|v| !v.is_null()).map(|v| format!("{n}={v}"))).collect())
        .unwrap_or_default();
    let from = match upstream {
        Some(u) if !params.is_empty() => format!(" (input `data` is a `{}` with {})", u.kind, params.join(", ")),
        Some(u) => format!(" (input `data` is a `{}`)", u.kind),
        None => String::new(),
    };
    format!(
        "split `{split}` holds no images, so there is nothing to score{from}; raise the split's fraction or the number of groups, or score another `split`"
    )
}

fn quote(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_score_needs_masks_or_a_model() {
        assert!(Score.check_inputs(&["data"]).is_some_and(|m| m.contains("`masks`") && m.contains("`model`")));
        for given in [&["data", "masks"][..], &["data", "model"], &["data", "masks", "model"]] {
            assert_eq!(Score.check_inputs(given), None, "{given:?}");
        }
    }
}
