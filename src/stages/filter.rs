//! `filter`: images multiplied by their heatmaps (or their complement, or a thresholded mask).

use serde_json::json;

use super::io;
use super::params as p;
use crate::ml::filter::{FilterMode, apply};
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
        2
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
        let kept: f64 = out.samples.iter().flat_map(|s| s.image.iter()).map(|v| v.abs() as f64).sum::<f64>()
            / ds.samples.iter().flat_map(|s| s.image.iter()).map(|v| v.abs() as f64).sum::<f64>().max(1e-12);
        let f = io::write(ctx.out_dir, io::DATASET_FILE, &out.encode())?;
        Ok(Outcome { files: vec![f], metrics: json!({ "images": out.samples.len(), "intensity_kept": kept }) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
