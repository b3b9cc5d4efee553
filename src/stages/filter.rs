//! `filter`: images multiplied by their heatmaps (or their complement, or a thresholded mask).

use serde_json::json;

use super::io;
use super::params as p;
use crate::ml::filter::{FilterMode, Leak, WholeImage, apply, leak};
use crate::ml::metrics::Warning;
use crate::stage_kind::*;

pub struct Filter;

/// Whether the mode reads `threshold` (the mask modes); an unknown mode keeps it, to be safe.
fn uses_threshold(params: &Params) -> bool {
    !matches!(params.get("mode").and_then(|m| m.as_str()), Some("multiply" | "inverse"))
}

impl StageKind for Filter {
    fn name(&self) -> &'static str {
        "filter"
    }
    fn version(&self) -> u32 {
        // 2: `threshold` is out of the key in the modes that ignore it (outputs unchanged).
        // 3: metrics add `whole_images`, `leak_accuracy` and the `label-leak` guard (outputs
        // unchanged).
        3
    }
    fn doc(&self) -> &'static str {
        "Filters every image of every split with its heatmap, producing a dataset for retrain."
    }
    fn inputs(&self) -> &'static [InputSlot] {
        &[
            InputSlot { name: "data", artifact: ArtifactType::Dataset, required: true, doc: "the original dataset" },
            InputSlot { name: "heatmaps", artifact: ArtifactType::Heatmaps, required: true, doc: "one heatmap per image" },
        ]
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Dataset
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "mode",
                ty: ParamType::Choice(&["multiply", "inverse", "mask", "inverse-mask"]),
                default: || json!("multiply"),
                optional: false,
                doc: "multiply: image*h; inverse: image*(1-h); mask: image*[h>=threshold]; inverse-mask: image*[h<threshold]",
            },
            ParamSpec {
                name: "threshold",
                ty: ParamType::Float { min: 0.0, max: 1.0 },
                default: || json!(0.5),
                optional: false,
                doc: "cut for the mask modes",
            },
        ]
    }
    /// `multiply` and `inverse` never read `threshold`: changing it must rerun nothing.
    fn key_params(&self, params: &Params) -> Params {
        let mut out = params.clone();
        if !uses_threshold(params) {
            out.remove("threshold");
        }
        out
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<Outcome, StageError> {
        let ds = io::dataset(io::file(ctx.inputs, "data", io::DATASET_FILE)?)?;
        let heat = io::planes(io::file(ctx.inputs, "heatmaps", io::HEATMAPS_FILE)?)?;
        let t = p::f64(ctx.params, "threshold")? as f32;
        let mode = match p::str(ctx.params, "mode")? {
            "inverse" => FilterMode::Inverse,
            "mask" => FilterMode::Mask(t),
            "inverse-mask" => FilterMode::InverseMask(t),
            _ => FilterMode::Multiply,
        };
        let out = apply(&ds, &heat, mode).map_err(StageError::new)?;
        let leak = leak(&ds, &heat, mode).map_err(StageError::new)?;
        let warnings: Vec<Warning> = leak_warning(&leak).into_iter().collect();
        for w in &warnings {
            (ctx.log)(format!("warning: {}: {}", w.flag, w.message));
        }
        let kept: f64 = out.samples.iter().flat_map(|s| s.image.iter()).map(|v| v.abs() as f64).sum::<f64>()
            / ds.samples.iter().flat_map(|s| s.image.iter()).map(|v| v.abs() as f64).sum::<f64>().max(1e-12);
        let f = io::write(ctx.out_dir, io::DATASET_FILE, &out.encode())?;
        let mut whole = serde_json::Map::new();
        for e in WholeImage::ALL {
            let n = |l: u8| leak.test_counts.get(&(e, l)).copied().unwrap_or(0);
            whole.insert(e.name().to_string(), json!({ "negative": n(0), "positive": n(1) }));
        }
        let num = |x: f64| serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, serde_json::Value::Number);
        Ok(Outcome {
            files: vec![f],
            metrics: json!({
                "images": out.samples.len(),
                "intensity_kept": kept,
                "whole_images": whole,
                "leak_accuracy": num(leak.rule_accuracy),
                "leak_baseline": num(leak.baseline_accuracy),
                "warnings": warnings,
            }),
        })
    }
}

/// How far above the train majority's test accuracy the blanked/untouched rule must score to
/// raise `label-leak`: 5 points, well above what one or two odd images move on a test split of
/// a few dozen images, and far below the leak Grad-CAM's ReLU makes (above 40 points on the
/// paper pipeline).
pub const LEAK_MARGIN: f64 = 0.05;

/// `label-leak` when whole-image effects alone classify the test split clearly better than the
/// majority class does: then a retrained classifier's accuracy measures the filtering's
/// pattern as much as what the heatmaps kept (see README, "Sanity guards").
fn leak_warning(l: &Leak) -> Option<Warning> {
    if !(l.rule_accuracy >= l.baseline_accuracy + LEAK_MARGIN) {
        return None;
    }
    let n = |e: WholeImage, lab: u8| l.test_counts.get(&(e, lab)).copied().unwrap_or(0);
    let total = |lab: u8| WholeImage::ALL.iter().map(|&e| n(e, lab)).sum::<usize>();
    let what = |e: WholeImage| match e {
        WholeImage::Blanked => "blanks (every factor 0)",
        WholeImage::Untouched => "leaves untouched (every factor 1)",
        WholeImage::Partly => "filters partly",
    };
    let done: Vec<String> = [WholeImage::Blanked, WholeImage::Untouched]
        .into_iter()
        .filter(|&e| n(e, 0) + n(e, 1) > 0)
        .map(|e| format!("{} {} of {} negative and {} of {} positive test images", what(e), n(e, 0), total(0), n(e, 1), total(1)))
        .collect();
    if done.is_empty() {
        // The rule's edge then comes from train images the test split has no like of.
        return None;
    }
    Some(Warning {
        flag: "label-leak".into(),
        message: format!(
            "the filtering gives the class away: it {}; telling such images from partly filtered ones scores test \
             accuracy {:.3} against {:.3} for the majority class, which a retrained classifier reaches without using \
             what the heatmaps kept (read its accuracy against `leak_accuracy`)",
            done.join(" and "),
            l.rule_accuracy,
            l.baseline_accuracy
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leak_of(counts: &[((WholeImage, u8), usize)], rule: f64, base: f64) -> Leak {
        Leak { test_counts: counts.iter().copied().collect(), rule_accuracy: rule, baseline_accuracy: base }
    }

    #[test]
    fn label_leak_is_raised_only_by_a_clear_margin_and_names_what_was_done() {
        use WholeImage::*;
        let counts = [((Blanked, 0), 64), ((Partly, 0), 1), ((Partly, 1), 62)];
        let w = leak_warning(&leak_of(&counts, 0.992, 0.488)).expect("a leak");
        assert_eq!(w.flag, "label-leak");
        assert!(w.message.contains("blanks (every factor 0) 64 of 65 negative and 0 of 62 positive"), "{}", w.message);
        assert!(!w.message.contains("untouched"), "{}", w.message);
        assert!(w.message.contains("0.992") && w.message.contains("0.488"), "{}", w.message);
        // Within the margin, or no test image blanked or untouched, or no test images: quiet.
        assert_eq!(leak_warning(&leak_of(&counts, 0.488 + LEAK_MARGIN - 0.001, 0.488)), None);
        assert_eq!(leak_warning(&leak_of(&[((Partly, 0), 5), ((Partly, 1), 5)], 0.9, 0.5)), None);
        assert_eq!(leak_warning(&leak_of(&[], f64::NAN, f64::NAN)), None);
    }

    #[test]
    fn threshold_is_in_the_key_only_for_mask_modes() {
        let params = |mode: &str| -> Params { [("mode".to_string(), json!(mode)), ("threshold".to_string(), json!(0.3))].into() };
        for mode in ["multiply", "inverse"] {
            let k = Filter.key_params(&params(mode));
            assert_eq!(k.get("threshold"), None, "{mode}");
            assert_eq!(k.get("mode"), Some(&json!(mode)));
        }
        for mode in ["mask", "inverse-mask"] {
            assert_eq!(Filter.key_params(&params(mode)).get("threshold"), Some(&json!(0.3)), "{mode}");
        }
    }
}
