//! `threshold`: heatmaps -> binary masks, per image.

use serde_json::json;

use super::io;
use super::params as p;
use crate::ml::planes::{PlaneKind, Planes};
use crate::ml::threshold::{ThresholdMethod, mask};
use crate::stage_kind::*;

pub struct Threshold;

impl StageKind for Threshold {
    fn name(&self) -> &'static str {
        "threshold"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Turns each heatmap into a binary mask: a fixed cut, Otsu's threshold, or the top percentile of pixels."
    }
    fn inputs(&self) -> &'static [InputSlot] {
        &[InputSlot { name: "heatmaps", artifact: ArtifactType::Heatmaps, required: true, doc: "heatmaps to threshold" }]
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Masks
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "method",
                ty: ParamType::Choice(&["fixed", "otsu", "percentile"]),
                default: || json!("fixed"),
                optional: false,
                doc: "fixed: h >= value; otsu: per-image Otsu cut (value ignored); percentile: keep the top `value` percent of pixels",
            },
            ParamSpec {
                name: "value",
                ty: ParamType::Float { min: 0.0, max: 100.0 },
                default: || json!(0.5),
                optional: false,
                doc: "the cut in [0,1] (fixed) or a percentage (percentile)",
            },
        ]
    }
    fn check(&self, params: &Params, _upstream: &dyn Fn(&str) -> Option<serde_json::Value>) -> Vec<(String, String)> {
        let v = params.get("value").and_then(|v| v.as_f64()).unwrap_or(0.0);
        if p::opt_str(params, "method") == Some("fixed") && v > 1.0 {
            return vec![("value".into(), format!("a fixed threshold must be in [0, 1], found {v}"))];
        }
        Vec::new()
    }
    /// Otsu finds its own cut per image and never reads `value`: changing it must rerun nothing.
    fn key_params(&self, params: &Params) -> Params {
        let mut out = params.clone();
        if p::opt_str(params, "method") == Some("otsu") {
            out.remove("value");
        }
        out
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<Outcome, StageError> {
        let heat = io::planes(io::file(ctx.inputs, "heatmaps", io::HEATMAPS_FILE)?)?;
        let v = p::f64(ctx.params, "value")? as f32;
        let method = match p::str(ctx.params, "method")? {
            "otsu" => ThresholdMethod::Otsu,
            "percentile" => ThresholdMethod::Percentile(v),
            _ => ThresholdMethod::Fixed(v),
        };
        let data: Vec<Vec<f32>> = heat.data.iter().map(|h| mask(h, method).into_iter().map(f32::from).collect()).collect();
        let fg: f64 =
            data.iter().map(|m| m.iter().sum::<f32>() as f64).sum::<f64>() / (data.len().max(1) * heat.height * heat.width) as f64;
        let masks = Planes { kind: PlaneKind::Mask, height: heat.height, width: heat.width, ids: heat.ids, data };
        let f = io::write(ctx.out_dir, io::MASKS_FILE, &masks.encode())?;
        Ok(Outcome { files: vec![f], metrics: json!({ "masks": masks.ids.len(), "foreground_fraction": fg }) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn value_is_in_the_key_except_for_otsu() {
        let params = |method: &str| -> Params { [("method".to_string(), json!(method)), ("value".to_string(), json!(0.3))].into() };
        assert_eq!(Threshold.key_params(&params("otsu")).get("value"), None);
        for method in ["fixed", "percentile"] {
            assert_eq!(Threshold.key_params(&params(method)).get("value"), Some(&json!(0.3)), "{method}");
        }
    }
}
