//! `gradcam`: one heatmap per image of every split, from a trained model.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

use super::io;
use super::params as p;
use super::train::{arch_from, backend, load_model, upstream_image};
use crate::ml::memory::{self, Workload};
use crate::ml::backend::{BackendJob, dispatch};
use crate::ml::dataset::Dataset;
use crate::ml::fast_ops::TrainBackend;
use crate::ml::gradcam::{CamMethod, CamTarget, heatmaps_reporting};
use crate::ml::planes::{PlaneKind, Planes};
use crate::ml::{resize, rng::Rng};
use crate::stage_kind::*;

pub struct GradCam;

const METHODS: &[&str] = &["gradcam", "gradcam++", "hirescam", "random"];

/// `last`, a 0-based unit index, or `convN` / `unitN` (1-based, as in the weight names).
fn layer_index(v: Option<&Json>, units: usize) -> Result<usize, StageError> {
    let bad = |s: String| {
        StageError::new(format!(
            "param `layer`: `{s}` is not a layer of this model (it has {units} conv units: use last, 0..{}, or conv1..conv{units})",
            units - 1
        ))
    };
    match v {
        None | Some(Json::Null) => Ok(units - 1),
        Some(Json::Number(n)) => n.as_u64().map(|i| i as usize).filter(|&i| i < units).ok_or_else(|| bad(n.to_string())),
        Some(Json::String(s)) if s == "last" => Ok(units - 1),
        Some(Json::String(s)) => {
            let n = s.strip_prefix("conv").or_else(|| s.strip_prefix("unit")).and_then(|d| d.parse::<usize>().ok());
            n.filter(|&i| i >= 1 && i <= units).map(|i| i - 1).ok_or_else(|| bad(s.clone()))
        }
        Some(other) => Err(bad(other.to_string())),
    }
}

struct CamJob<'a> {
    inputs: &'a BTreeMap<String, InputArtifact>,
    ds: &'a Dataset,
    layer: Json,
    method: CamMethod,
    target: CamTarget,
    batch: usize,
    progress: &'a mut dyn FnMut(Progress),
}

impl BackendJob for CamJob<'_> {
    type Output = Result<(usize, Vec<Vec<f32>>), StageError>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        let (arch, model) = load_model::<B>(self.inputs, "model", &device)?;
        let layer = layer_index(Some(&self.layer), arch.units())?;
        let idx: Vec<usize> = (0..self.ds.samples.len()).collect();
        let progress = self.progress;
        let mut report = |done: usize, total: usize| {
            progress(Progress { unit: "image", done: done as u64, total: total as u64, epoch: None, epochs: None, loss: None })
        };
        Ok((layer, heatmaps_reporting(&model, self.ds, &idx, layer, self.method, self.target, self.batch, &mut report)))
    }
}

/// A smooth random heatmap per image: the baseline that Grad-CAM must beat.
fn random_maps(ds: &Dataset, seed: u64) -> Vec<Vec<f32>> {
    let low = (ds.width / 8).max(2);
    ds.samples
        .iter()
        .map(|s| {
            let mut r = Rng::derive(seed, &format!("random-cam/{}", s.id));
            let grid: Vec<f32> = (0..low * low).map(|_| r.uniform()).collect();
            let up = resize::bilinear(&grid, low, low, ds.width, ds.height);
            let (lo, hi) = up.iter().fold((f32::MAX, f32::MIN), |a, &v| (a.0.min(v), a.1.max(v)));
            up.iter().map(|v| (v - lo) / (hi - lo + 1e-7)).collect()
        })
        .collect()
}

impl StageKind for GradCam {
    fn name(&self) -> &'static str {
        "gradcam"
    }
    fn version(&self) -> u32 {
        // 2: convolutions and pooling on the CPU run through `ml::fast_ops` (other rounding).
        // 3: the portable CPU profile (own GEMM, head, loss and softmax; libm).
        3
    }
    fn doc(&self) -> &'static str {
        "Class-activation heatmaps (Grad-CAM, Grad-CAM++, HiResCAM, or a random baseline) for every image, upsampled to the input and min-max normalised per image."
    }
    fn inputs(&self) -> &'static [InputSlot] {
        &[
            InputSlot { name: "model", artifact: ArtifactType::Model, required: true, doc: "the trained classifier" },
            InputSlot { name: "data", artifact: ArtifactType::Dataset, required: true, doc: "the images to explain" },
        ]
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Heatmaps
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "method",
                ty: ParamType::Choice(METHODS),
                default: || json!("gradcam"),
                optional: false,
                doc: "gradcam (Selvaraju et al.), gradcam++ (Chattopadhay et al.), hirescam (Draelos & Carin), random (baseline)",
            },
            ParamSpec {
                name: "layer",
                ty: ParamType::IntOrStr,
                default: || json!("last"),
                optional: false,
                doc: "conv unit to explain: last, a 0-based index, or convN (1-based)",
            },
            ParamSpec {
                name: "target",
                ty: ParamType::IntOrStr,
                default: || json!("positive"),
                optional: false,
                doc: "class whose score is explained: positive (1), predicted, or a class index",
            },
            ParamSpec {
                name: "batch_size",
                ty: ParamType::Int { min: 1, max: 65_536 },
                default: || json!(32),
                optional: false,
                doc: "images per batch",
            },
        ]
    }
    fn check(&self, params: &Params) -> Vec<(String, String)> {
        match params.get("target") {
            Some(Json::String(s)) if s != "positive" && s != "predicted" => {
                vec![("target".into(), format!("expected positive, predicted, 0 or 1, found `{s}`"))]
            }
            Some(Json::Number(n)) if n.as_u64().is_none_or(|c| c > 1) => {
                vec![("target".into(), format!("expected class 0 or 1, found {n}"))]
            }
            _ => Vec::new(),
        }
    }
    fn backend_dependent(&self) -> bool {
        true
    }
    fn default_resources(&self) -> Resources {
        Resources { cpu: u32::MAX, gpu: GpuShare::NONE, ..Resources::default() }
    }
    fn device_memory(&self, params: &Params, upstream: &dyn Fn(&str) -> Option<Json>) -> Option<u64> {
        if p::str(params, "method").ok()? == "random" {
            return None;
        }
        let (size, channels) = upstream_image(upstream)?;
        // The model's architecture params, from the training upstream.
        let model: Params = super::train::arch_params().iter().filter_map(|s| Some((s.name.to_string(), upstream(s.name)?))).collect();
        let arch = arch_from(&model, channels).ok()?;
        Some(memory::estimate(&arch, size, p::usize(params, "batch_size").ok()?, Workload::GradCam).total)
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<Outcome, StageError> {
        let params = ctx.params;
        let ds = io::dataset(io::file(ctx.inputs, "data", io::DATASET_FILE)?)?;
        let method_name = p::str(params, "method")?;
        let (layer, maps) = if method_name == "random" {
            (Json::Null, random_maps(&ds, ctx.seed))
        } else {
            let target = match params.get("target") {
                Some(Json::String(s)) if s == "predicted" => CamTarget::Predicted,
                Some(Json::Number(n)) => CamTarget::Class(n.as_u64().unwrap_or(1) as usize),
                _ => CamTarget::Class(1),
            };
            let method = CamMethod::parse(method_name).ok_or_else(|| StageError::new(format!("unknown method `{method_name}`")))?;
            let (kind, device) = (backend(ctx)?, ctx.device);
            let job = CamJob {
                inputs: ctx.inputs,
                ds: &ds,
                layer: params.get("layer").cloned().unwrap_or(Json::Null),
                method,
                target,
                batch: p::usize(params, "batch_size")?,
                progress: &mut *ctx.progress,
            };
            let (l, m) = dispatch(kind, device, job).map_err(StageError::new)??;
            (json!(l), m)
        };
        (ctx.log)(format!("{} heatmaps ({method_name}, layer {layer})", maps.len()));
        let planes = Planes {
            kind: PlaneKind::Heatmap,
            height: ds.height,
            width: ds.width,
            ids: ds.samples.iter().map(|s| s.id.clone()).collect(),
            data: maps,
        };
        let f = io::write(ctx.out_dir, io::HEATMAPS_FILE, &planes.encode())?;
        Ok(Outcome { files: vec![f], metrics: json!({ "heatmaps": planes.ids.len(), "layer": layer, "method": method_name }) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names() {
        assert_eq!(layer_index(Some(&json!("last")), 4).unwrap(), 3);
        assert_eq!(layer_index(Some(&json!("conv2")), 4).unwrap(), 1);
        assert_eq!(layer_index(Some(&json!(0)), 4).unwrap(), 0);
        assert!(layer_index(Some(&json!("conv9")), 4).unwrap_err().to_string().contains("not a layer"));
    }
}
