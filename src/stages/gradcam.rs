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
use crate::ml::gradcam::{CamMethod, CamTarget, heatmaps_for};
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

/// Heatmaps of one model over one data set for one or more (layer, method) requests, from
/// one pass.
struct CamJob<'a> {
    inputs: &'a BTreeMap<String, InputArtifact>,
    ds: &'a Dataset,
    /// Each request's `layer` param (resolved against the model here) and method.
    requests: Vec<(Json, CamMethod)>,
    target: CamTarget,
    batch: usize,
    progress: &'a mut dyn FnMut(Progress),
}

/// A request's layer index and heatmaps, or why it has none (a layer the model lacks).
type Answer = Result<(usize, Vec<Vec<f32>>), StageError>;

impl BackendJob for CamJob<'_> {
    /// One answer per request; an error for all when the model cannot be read.
    type Output = Result<Vec<Answer>, StageError>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        let (arch, model) = load_model::<B>(self.inputs, "model", &device, self.ds)?;
        let layers: Vec<Result<usize, StageError>> = self.requests.iter().map(|(l, _)| layer_index(Some(l), arch.units())).collect();
        let valid: Vec<(usize, CamMethod)> =
            layers.iter().zip(&self.requests).filter_map(|(l, (_, m))| l.as_ref().ok().map(|&l| (l, *m))).collect();
        let idx: Vec<usize> = (0..self.ds.samples.len()).collect();
        let progress = self.progress;
        let mut report = |done: usize, total: usize| {
            progress(Progress { unit: "image", done: done as u64, total: total as u64, epoch: None, epochs: None, loss: None })
        };
        let mut maps = if valid.is_empty() {
            Vec::new().into_iter()
        } else {
            heatmaps_for(&model, self.ds, &idx, &valid, self.target, self.batch, &mut report).into_iter()
        };
        Ok(layers
            .into_iter()
            .map(|l| {
                let l = l?;
                Ok((l, maps.next().ok_or_else(|| StageError::new("the pass gave no heatmaps for this request"))?))
            })
            .collect())
    }
}

/// One instance's params, read: `method` is `None` for the random baseline.
struct Settings<'a> {
    method_name: &'a str,
    method: Option<CamMethod>,
    layer: Json,
    target: CamTarget,
    batch: usize,
}

fn settings(params: &Params) -> Result<Settings<'_>, StageError> {
    let method_name = p::str(params, "method")?;
    let method = match method_name {
        "random" => None,
        name => Some(CamMethod::parse(name).ok_or_else(|| StageError::new(format!("unknown method `{name}`")))?),
    };
    let target = match params.get("target") {
        Some(Json::String(s)) if s == "predicted" => CamTarget::Predicted,
        Some(Json::Number(n)) => CamTarget::Class(n.as_u64().unwrap_or(1) as usize),
        _ => CamTarget::Class(1),
    };
    let layer = params.get("layer").cloned().unwrap_or(Json::Null);
    Ok(Settings { method_name, method, layer, target, batch: p::usize(params, "batch_size")? })
}

/// Writes one instance's heatmaps and says what it wrote.
fn publish(ctx: &mut RunContext<'_>, ds: &Dataset, method_name: &str, layer: Json, maps: Vec<Vec<f32>>) -> Result<Outcome, StageError> {
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
        // 4: batch norm after the explained layer uses the running statistics (it used the
        //    batch's, so a batch-norm model's heatmaps depended on which images shared a batch).
        4
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
    fn check(&self, params: &Params, _upstream: &dyn Fn(&str) -> Option<Json>) -> Vec<(String, String)> {
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
        let ds = io::dataset(io::file(ctx.inputs, "data", io::DATASET_FILE)?)?;
        let set = settings(ctx.params)?;
        let Some(method) = set.method else {
            return publish(ctx, &ds, set.method_name, Json::Null, random_maps(&ds, ctx.seed));
        };
        let (kind, device) = (backend(ctx)?, ctx.device);
        let job = CamJob {
            inputs: ctx.inputs,
            ds: &ds,
            requests: vec![(set.layer.clone(), method)],
            target: set.target,
            batch: set.batch,
            progress: &mut *ctx.progress,
        };
        let answer = dispatch(kind, device, job).map_err(StageError::new)??.pop();
        let (layer, maps) = answer.ok_or_else(|| StageError::new("the pass gave no heatmaps"))??;
        publish(ctx, &ds, set.method_name, json!(layer), maps)
    }
    /// Instances that differ only in `method` and `layer` (not the random baseline, which
    /// needs no model) and read the same model and data: their heatmaps come from one pass.
    fn fusion_key(&self, params: &Params, backend: &str, inputs: &BTreeMap<String, usize>) -> Option<Fusion> {
        if p::str(params, "method").ok()? == "random" {
            return None;
        }
        let rest: serde_json::Map<String, Json> = shared_params(params).map(|(k, v)| (k.clone(), v.clone())).collect();
        Some(Fusion { key: format!("{} {backend} {} {}", self.name(), Json::Object(rest), json!(inputs)), how: FusionKind::SharedWork })
    }
    fn run_group(&self, ctxs: &mut [RunContext<'_>]) -> Vec<Result<Outcome, StageError>> {
        let Some(first) = ctxs.first() else { return Vec::new() };
        // The executor groups by key; checked again here, because a member that does not
        // share the pass must not get another member's heatmaps: it gets an error instead,
        // and the executor runs it alone.
        let (inputs, params) = (first.inputs, first.params);
        let same_files = |ctx: &RunContext<'_>| {
            ctx.inputs.iter().map(|(slot, a)| (slot, &a.files)).eq(inputs.iter().map(|(slot, a)| (slot, &a.files)))
        };
        let same_pass = |ctx: &RunContext<'_>| {
            shared_params(ctx.params).eq(shared_params(params)) && ctx.backend == first.backend && ctx.device == first.device
        };
        let members: Vec<Result<(Json, CamMethod), StageError>> = ctxs
            .iter()
            .map(|ctx| {
                let set = settings(ctx.params)?;
                match set.method {
                    Some(m) if same_files(ctx) && same_pass(ctx) => Ok((set.layer, m)),
                    _ => Err(StageError::new("not part of this group's shared pass")),
                }
            })
            .collect();
        let requests: Vec<(Json, CamMethod)> = members.iter().filter_map(|m| m.as_ref().ok().cloned()).collect();
        if requests.is_empty() {
            // Nobody shares the pass (every member is an error already): nothing to compute.
            return members.into_iter().map(|_| Err(StageError::new("not part of this group's shared pass"))).collect();
        }
        let (kind, device) = (backend(first), first.device);
        let computed = (|| -> Result<(Dataset, Vec<Answer>), StageError> {
            let ds = io::dataset(io::file(inputs, "data", io::DATASET_FILE)?)?;
            let set = settings(params)?;
            let mut sinks: Vec<&mut dyn FnMut(Progress)> = Vec::new();
            for (ctx, m) in ctxs.iter_mut().zip(&members) {
                if m.is_ok() {
                    sinks.push(&mut *ctx.progress);
                }
            }
            let mut progress = |p: Progress| sinks.iter_mut().for_each(|sink| sink(p.clone()));
            let job = CamJob { inputs, ds: &ds, requests, target: set.target, batch: set.batch, progress: &mut progress };
            let answers = dispatch(kind?, device, job).map_err(StageError::new)??;
            Ok((ds, answers))
        })();
        let (ds, answers) = match computed {
            Ok(c) => c,
            Err(e) => return members.into_iter().map(|_| Err(StageError::new(e.to_string()))).collect(),
        };
        // Those with heatmaps (a member asking for a layer the model lacks has none).
        let shared_by = answers.iter().filter(|a| a.is_ok()).count();
        let mut answers = answers.into_iter();
        ctxs.iter_mut()
            .zip(members)
            .map(|(ctx, member)| {
                member?;
                let (layer, maps) = answers.next().ok_or_else(|| StageError::new("the shared pass gave no heatmaps for this member"))??;
                (ctx.log)(format!("fused: heatmaps from one pass shared by {shared_by} instances"));
                publish(ctx, &ds, p::str(ctx.params, "method")?, json!(layer), maps)
            })
            .collect()
    }
}

/// The params a shared pass needs equal: all but `method` and `layer`, which it serves
/// several of.
fn shared_params(params: &Params) -> impl Iterator<Item = (&String, &Json)> {
    params.iter().filter(|(k, _)| k.as_str() != "method" && k.as_str() != "layer")
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

    /// Writes a model's or a data set's files into `dir`, as the upstream stage would.
    fn artifact(dir: &std::path::Path, files: &[(&str, Vec<u8>)]) -> InputArtifact {
        std::fs::create_dir_all(dir).unwrap();
        let files = files
            .iter()
            .map(|(name, bytes)| {
                std::fs::write(dir.join(name), bytes).unwrap();
                (name.to_string(), dir.join(name))
            })
            .collect();
        InputArtifact { files, metrics: Json::Null, params: Params::new(), kind: String::new() }
    }

    fn params(method: &str, layer: Json) -> Params {
        let mut p: Params = GradCam.params().into_iter().map(|s| (s.name.to_string(), (s.default)())).collect();
        p.insert("method".into(), json!(method));
        p.insert("layer".into(), layer);
        p.insert("batch_size".into(), json!(3));
        p
    }

    /// Each member's heatmap file, from `run_group` (members in order), or its error.
    fn run_group(members: &[(Params, BTreeMap<String, InputArtifact>)], out: &std::path::Path) -> Vec<Result<Vec<u8>, String>> {
        let dirs: Vec<std::path::PathBuf> = (0..members.len()).map(|i| out.join(format!("group-{i}"))).collect();
        let (mut logs, mut sinks): (Vec<_>, Vec<_>) = members.iter().map(|_| (|_: String| {}, |_: Progress| {})).unzip();
        let planned = BTreeMap::new();
        let mut ctxs: Vec<RunContext<'_>> = members
            .iter()
            .zip(&dirs)
            .zip(logs.iter_mut().zip(sinks.iter_mut()))
            .map(|(((params, inputs), dir), (log, progress))| {
                std::fs::create_dir_all(dir).unwrap();
                RunContext {
                    params,
                    inputs,
                    out_dir: dir,
                    base_dir: std::path::Path::new("/"),
                    seed: 1,
                    backend: "cpu",
                    device: 0,
                    planned_data: &planned,
                    log: log as &mut dyn FnMut(String),
                    progress: progress as &mut dyn FnMut(Progress),
                }
            })
            .collect();
        let results = GradCam.run_group(&mut ctxs);
        results
            .into_iter()
            .zip(&dirs)
            .map(|(r, dir)| r.map(|_| std::fs::read(dir.join(io::HEATMAPS_FILE)).unwrap()).map_err(|e| e.to_string()))
            .collect()
    }

    /// The same instance run alone.
    fn alone(params: &Params, inputs: &BTreeMap<String, InputArtifact>, out: &std::path::Path) -> Vec<u8> {
        let (mut log, mut progress) = (|_: String| {}, |_: Progress| {});
        let planned = BTreeMap::new();
        std::fs::create_dir_all(out).unwrap();
        let mut ctx = RunContext {
            params,
            inputs,
            out_dir: out,
            base_dir: std::path::Path::new("/"),
            seed: 1,
            backend: "cpu",
            device: 0,
            planned_data: &planned,
            log: &mut log,
            progress: &mut progress,
        };
        GradCam.run(&mut ctx).unwrap();
        std::fs::read(out.join(io::HEATMAPS_FILE)).unwrap()
    }

    /// A group's members (methods and layers) get the heatmaps they get alone; one that does
    /// not share the pass (other data, another target), wherever it sits in the group, gets an
    /// error and takes no other member's heatmaps, as does one asking for a layer the model
    /// lacks; a pass that fails fails every member.
    #[test]
    fn a_group_gives_each_member_its_own_heatmaps_and_refuses_strangers() {
        use crate::ml::model::ArchConfig;
        use crate::ml::synthetic::{SyntheticConfig, generate};
        use burn::backend::{Autodiff, Flex};

        let tmp = tempfile::tempdir().unwrap();
        let arch = ArchConfig::vgg(1, vec![4, 8], true);
        let model = crate::ml::train::seeded_init::<Autodiff<Flex>>(&arch, 2, &Default::default());
        let model_files = vec![
            (io::CONFIG_FILE, serde_json::to_vec(&arch).unwrap()),
            (io::WEIGHTS_FILE, crate::ml::weights::to_safetensors(&arch, &model).unwrap()),
        ];
        let data = |seed: u64| {
            let ds = generate(&SyntheticConfig { count: 7, size: 16, tumor_fraction: 0.5, contrast: 0.6, noise: 0.05, slices_per_patient: 1, seed });
            vec![(io::DATASET_FILE, ds.encode())]
        };
        let inputs = |model: &[(&str, Vec<u8>)], data_seed: u64, name: &str| -> BTreeMap<String, InputArtifact> {
            [
                ("model".to_string(), artifact(&tmp.path().join(format!("{name}-model")), model)),
                ("data".to_string(), artifact(&tmp.path().join(format!("{name}-data")), &data(data_seed))),
            ]
            .into()
        };
        let shared = inputs(&model_files, 1, "shared");
        let other_data = inputs(&model_files, 2, "other");
        let mut predicted = params("gradcam", json!("last"));
        predicted.insert("target".into(), json!("predicted"));
        let members = vec![
            (params("gradcam", json!("last")), shared.clone()),
            (params("hirescam", json!("last")), other_data.clone()),
            (params("gradcam++", json!("last")), shared.clone()),
            (params("hirescam", json!(0)), shared.clone()),
            (params("gradcam", json!("conv9")), shared.clone()),
            (predicted, shared.clone()),
            (params("hirescam", json!("last")), shared.clone()),
            (params("gradcam++", json!("conv1")), shared.clone()),
        ];
        let got = run_group(&members, &tmp.path().join("out"));
        for (i, (r, (p, inp))) in got.iter().zip(&members).enumerate() {
            match i {
                1 | 5 => assert!(r.as_ref().is_err_and(|e| e.contains("not part of this group's shared pass")), "member {i}: {r:?}"),
                4 => assert!(r.as_ref().is_err_and(|e| e.contains("is not a layer of this model")), "member {i}: {r:?}"),
                _ => {
                    let bytes = r.as_ref().unwrap_or_else(|e| panic!("member {i}: {e}"));
                    assert!(*bytes == alone(p, inp, &tmp.path().join(format!("alone-{i}"))), "member {i} differs from its run alone");
                }
            }
        }
        // Methods and layers really differ.
        assert!(got[0].as_ref().ok() != got[2].as_ref().ok());
        assert!(got[2].as_ref().ok() != got[7].as_ref().ok());

        // A model file that cannot be read: every member fails (and is run alone by the executor).
        let broken = inputs(&[(io::CONFIG_FILE, b"{}".to_vec()), (io::WEIGHTS_FILE, Vec::new())], 1, "broken");
        let got = run_group(&[(params("gradcam", json!("last")), broken.clone()), (params("gradcam++", json!("last")), broken)], &tmp.path().join("out2"));
        assert!(got.iter().all(|r| r.as_ref().is_err_and(|e| e.contains("model config"))), "{got:?}");
    }
}
