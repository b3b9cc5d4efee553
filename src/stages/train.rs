//! `train` and `retrain`: a CNN classifier trained on a dataset's train split, validated on
//! val, scored on test. `retrain` is the same work on a heatmap-filtered dataset; it is its
//! own kind so the DAG, the tables and the report can tell the two apart.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

use super::io;
use super::params as p;
use crate::ml::backend::{BackendJob, BackendKind, dispatch};
use crate::ml::dataset::{Dataset, Split};
use crate::ml::fast_ops::TrainBackend;
use crate::ml::fused::{self, Member};
use crate::ml::metrics::{self, ClassificationScores, Warning};
use crate::ml::memory::{self, Workload};
use crate::ml::model::ArchConfig;
use crate::ml::train::{self as ml_train, ClassWeights, OptimizerKind, TrainConfig};
use crate::ml::weights;
use crate::stage_kind::*;

pub struct Train {
    pub retrain: bool,
}

pub fn arch_params() -> Vec<ParamSpec> {
    vec![
        ParamSpec {
            name: "arch",
            ty: ParamType::Choice(&["vgg-small", "vgg", "resnet"]),
            default: || json!("vgg-small"),
            optional: false,
            doc: "architecture: vgg-small (reference), vgg (widths, batch_norm), resnet (widths per stage, blocks)",
        },
        ParamSpec {
            name: "widths",
            ty: ParamType::IntList,
            default: || json!([16, 32, 64, 64]),
            optional: false,
            doc: "vgg: channels of each conv unit, each pooling the image but the last (N units need images of at least 2^(N-1)); resnet: channels of each stage, pooling between stages; 1 to 4096 each (vgg-small ignores it)",
        },
        ParamSpec {
            name: "batch_norm",
            ty: ParamType::Bool,
            default: || json!(false),
            optional: false,
            doc: "vgg: batch norm after each conv (resnet always has it)",
        },
        ParamSpec {
            name: "blocks",
            ty: ParamType::Int { min: 1, max: 16 },
            default: || json!(1),
            optional: false,
            doc: "resnet: basic blocks per stage",
        },
    ]
}

/// The params of [`arch_from`]'s architecture, and of the optimizer, that it does not read.
fn ignored_params(params: &Params) -> Vec<&'static str> {
    let mut v = match p::opt_str(params, "arch") {
        Some("vgg") => vec!["blocks"],
        Some("resnet") => vec!["batch_norm"],
        _ => vec!["widths", "batch_norm", "blocks"],
    };
    if p::opt_str(params, "optimizer") != Some("sgd") {
        v.push("momentum");
    }
    v
}

/// `params` with each of [`ignored_params`] at its default (from `specs`): what a training's
/// key and fusion group hold.
fn key_shape(params: &Params, specs: &[ParamSpec]) -> Params {
    let mut out = params.clone();
    set_to_defaults(&mut out, specs, &ignored_params(params));
    out
}

/// The most channels one conv unit may have: far above the small CNNs of this method (16-64),
/// low enough that a typo (`widths: [100000000]`) is an error at the line instead of an
/// allocation of terabytes that aborts the process.
pub const MAX_WIDTH: usize = 4096;

/// What `widths` must be, said of the param.
fn widths_rule() -> String {
    format!("must be a non-empty list of integers from 1 to {MAX_WIDTH}")
}

pub fn arch_from(params: &Params, in_channels: usize) -> Result<ArchConfig, StageError> {
    // `widths` checked only where it is read: vgg-small keys it at its default, so a check
    // there would fail a cold cache and pass a warm one for one spec.
    let widths = || match p::usize_list(params, "widths") {
        Ok(w) if !w.is_empty() && w.iter().all(|w| (1..=MAX_WIDTH).contains(w)) => Ok(w),
        _ => Err(StageError::new(format!("param `widths` {}", widths_rule()))),
    };
    Ok(match p::str(params, "arch")? {
        "vgg" => ArchConfig::vgg(in_channels, widths()?, p::bool(params, "batch_norm")?),
        "resnet" => ArchConfig::resnet(in_channels, &widths()?, p::usize(params, "blocks")?),
        _ => ArchConfig::vgg_small(in_channels),
    })
}

/// Image size and channel count of the data upstream (its `image_size` and `channel` params),
/// for memory estimates made before the data exists.
pub fn upstream_image(upstream: &dyn Fn(&str) -> Option<Json>) -> Option<(usize, usize)> {
    let size = upstream("image_size")?.as_u64()? as usize;
    let channels = if upstream("channel").as_ref().and_then(Json::as_str) == Some("rgb") { 3 } else { 1 };
    Some((size, channels))
}

struct TrainJob<'a> {
    cfg: TrainConfig,
    ds: &'a Dataset,
    progress: &'a mut dyn FnMut(Progress),
}

struct TrainOut {
    weights: Vec<u8>,
    epochs: Vec<ml_train::EpochLog>,
    test: ClassificationScores,
    val: ClassificationScores,
}

impl BackendJob for TrainJob<'_> {
    type Output = Result<TrainOut, StageError>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        let progress = self.progress;
        let t = ml_train::train_reporting::<B>(&self.cfg, self.ds, &device, &mut |t| progress(step_progress(t)))
            .map_err(StageError::new)?;
        conclude(&self.cfg, self.ds, t)
    }
}

/// A training's progress in overall steps, so the ETA covers every epoch.
fn step_progress(t: ml_train::TrainProgress) -> Progress {
    Progress {
        unit: "step",
        done: ((t.epoch - 1) * t.steps + t.step) as u64,
        total: (t.epochs * t.steps) as u64,
        epoch: Some(t.epoch as u64),
        epochs: Some(t.epochs as u64),
        loss: Some(t.loss),
    }
}

/// Scores a trained model on test and val and serialises its weights.
fn conclude<B: burn::tensor::backend::Backend + crate::ml::fast_ops::FastOps>(
    cfg: &TrainConfig,
    ds: &Dataset,
    t: ml_train::Trained<B>,
) -> Result<TrainOut, StageError> {
    let (test, _) = ml_train::evaluate(&t.model, ds, Split::Test, cfg.batch_size);
    let (val, _) = ml_train::evaluate(&t.model, ds, Split::Val, cfg.batch_size);
    let weights = weights::to_safetensors(&cfg.arch, &t.model).map_err(StageError::new)?;
    Ok(TrainOut { weights, epochs: t.epochs, test, val })
}

/// Several trainings in one task (`ml::fused`); `progress` gets (member, progress).
struct GroupJob<'a> {
    members: Vec<Member<'a>>,
    progress: &'a (dyn Fn(usize, ml_train::TrainProgress) + Sync),
}

impl BackendJob for GroupJob<'_> {
    type Output = Vec<Result<TrainOut, StageError>>;
    fn run<B: TrainBackend>(self, device: B::Device) -> Self::Output {
        let members = &self.members;
        fused::train_group::<B, _>(members, &device, self.progress, &|i, t| {
            conclude(members[i].cfg, members[i].ds, t.map_err(StageError::new)?)
        })
    }
}

/// One instance's training, read from its context: the configuration and the dataset.
struct Prepared {
    cfg: TrainConfig,
    ds: Dataset,
}

pub fn backend(ctx: &RunContext<'_>) -> Result<BackendKind, StageError> {
    BackendKind::parse(ctx.backend).ok_or_else(|| StageError::new(format!("unknown backend `{}`", ctx.backend)))
}

pub fn nan_to_null(v: f64) -> Json {
    if v.is_finite() { json!(v) } else { Json::Null }
}

impl StageKind for Train {
    fn name(&self) -> &'static str {
        if self.retrain { "retrain" } else { "train" }
    }
    fn version(&self) -> u32 {
        // 2: convolutions and pooling on the CPU run through `ml::fast_ops` (other rounding).
        // 3: the portable CPU profile (own GEMM, head, loss and softmax; libm).
        // 4: metrics add majority_rate, balanced_accuracy, val_loss and the guards' `warnings`.
        // 5: `empty-split` and `one-class-split` warnings (no single-class blame on such splits).
        5
    }
    fn doc(&self) -> &'static str {
        if self.retrain {
            "Trains a fresh classifier on a heatmap-filtered dataset and scores it on the filtered test split (params not set on the stage are taken from the upstream train instance)."
        } else {
            "Trains a CNN classifier (tumor / no tumor) on the train split; reports per-epoch loss and accuracy, validation and test scores."
        }
    }
    fn inputs(&self) -> &'static [InputSlot] {
        &[InputSlot { name: "data", artifact: ArtifactType::Dataset, required: true, doc: "the dataset to train on" }]
    }
    fn output(&self) -> ArtifactType {
        ArtifactType::Model
    }
    fn params(&self) -> Vec<ParamSpec> {
        let mut v = arch_params();
        v.extend([
            ParamSpec {
                name: "optimizer",
                ty: ParamType::Choice(&["adam", "adamw", "sgd"]),
                default: || json!("adam"),
                optional: false,
                doc: "optimizer",
            },
            ParamSpec {
                name: "lr",
                ty: ParamType::Float { min: 0.0, max: 10.0 },
                default: || json!(0.001),
                optional: false,
                doc: "learning rate",
            },
            ParamSpec {
                name: "weight_decay",
                ty: ParamType::Float { min: 0.0, max: 1.0 },
                default: || json!(0.0),
                optional: false,
                doc: "L2 penalty (adam, sgd) or decoupled decay (adamw)",
            },
            ParamSpec {
                name: "momentum",
                ty: ParamType::Float { min: 0.0, max: 1.0 },
                default: || json!(0.9),
                optional: false,
                doc: "sgd momentum",
            },
            ParamSpec {
                name: "epochs",
                ty: ParamType::Int { min: 0, max: 100_000 },
                default: || json!(5),
                optional: false,
                doc: "passes over the train split",
            },
            ParamSpec {
                name: "batch_size",
                ty: ParamType::Int { min: 1, max: 65_536 },
                default: || json!(32),
                optional: false,
                doc: "images per step",
            },
            ParamSpec {
                name: "class_weights",
                ty: ParamType::Choice(&["none", "balanced"]),
                default: || json!("balanced"),
                optional: false,
                doc: "loss weights: balanced = inverse class frequency of the train split",
            },
            ParamSpec {
                name: "flip",
                ty: ParamType::Bool,
                default: || json!(true),
                optional: false,
                doc: "random horizontal flips of training images",
            },
            ParamSpec {
                name: "seed",
                ty: ParamType::Int { min: 0, max: i64::MAX },
                default: p::null,
                optional: true,
                doc: "init and batch-order seed (default: the pipeline seed)",
            },
        ]);
        v
    }
    fn backend_dependent(&self) -> bool {
        true
    }
    /// Params the architecture or the optimizer does not read are keyed at their defaults, so
    /// that changing one reruns nothing (`widths` for vgg-small, `momentum` for Adam). At the
    /// default rather than left out: the keys of specs that never set them stay as they were.
    fn key_params(&self, params: &Params) -> Params {
        key_shape(params, &self.params())
    }
    fn inherits(&self) -> Option<Inherit> {
        // A retrained classifier is compared with its upstream `train` instance: by default it
        // is the same architecture trained the same way (every param, seed included).
        self.retrain.then(|| Inherit { from_kind: "train", params: self.params().iter().map(|p| p.name).collect() })
    }
    fn default_resources(&self) -> Resources {
        // burn uses every core of the machine: by default a training holds all CPU slots.
        Resources { cpu: u32::MAX, gpu: GpuShare::NONE, ..Resources::default() }
    }
    /// The architecture's params where it reads them, and against the image size of the data
    /// upstream: checked when the pipeline is read, not when the run gets there.
    fn check(&self, params: &Params, upstream: &dyn Fn(&str) -> Option<Json>) -> Vec<(String, String)> {
        let Ok(arch) = arch_from(params, 1) else {
            // `arch` is a choice checked before: only `widths` can be wrong.
            return vec![("widths".into(), widths_rule())];
        };
        match upstream_image(upstream).and_then(|(size, _)| arch.input_too_small(size, size)) {
            // vgg-small fits every image size the data kind allows; a vgg or resnet is shaped by
            // `widths`.
            Some(why) => vec![("widths".into(), format!("{why} (the data's image_size); give fewer widths or larger images"))],
            None => Vec::new(),
        }
    }
    fn device_memory(&self, params: &Params, upstream: &dyn Fn(&str) -> Option<Json>) -> Option<u64> {
        let (size, channels) = upstream_image(upstream)?;
        let arch = arch_from(params, channels).ok()?;
        let optimizer_states = match p::str(params, "optimizer").ok()? {
            "sgd" if p::f64(params, "momentum").ok()? > 0.0 => 1,
            "sgd" => 0,
            _ => 2,
        };
        let batch = p::usize(params, "batch_size").ok()?;
        Some(memory::estimate(&arch, size, batch, Workload::Training { optimizer_states }).total)
    }
    fn run(&self, ctx: &mut RunContext<'_>) -> Result<Outcome, StageError> {
        let Prepared { cfg, ds } = prepare(ctx)?;
        let out = dispatch(backend(ctx)?, ctx.device, TrainJob { cfg: cfg.clone(), ds: &ds, progress: &mut *ctx.progress })
            .map_err(StageError::new)??;
        finish(ctx, &cfg, out)
    }
    /// Trainings of one model shape, batch size and epoch count. Every backend fuses: on the
    /// CPU a stack's members give their bytes alone, on a GPU the stack is one grouped
    /// convolution per layer (not bitwise, as the GPU alone is not).
    fn fusion_key(&self, params: &Params, backend: &str, _inputs: &BTreeMap<String, usize>) -> Option<Fusion> {
        // As keyed: members that differ only in params their architecture ignores fuse.
        let keyed = key_shape(params, &self.params());
        let shape: Params = ["arch", "widths", "batch_norm", "blocks", "batch_size", "epochs"]
            .iter()
            .filter_map(|&name| keyed.get(name).map(|v| (name.to_string(), v.clone())))
            .collect();
        Some(Fusion { key: format!("{} {backend} {}", self.name(), Json::Object(shape.into_iter().collect())), how: FusionKind::Stacked })
    }
    fn run_group(&self, ctxs: &mut [RunContext<'_>]) -> Vec<Result<Outcome, StageError>> {
        let prepared: Vec<Result<Prepared, StageError>> = ctxs.iter_mut().map(|ctx| prepare(ctx)).collect();
        // Members whose inputs could not be read get their error; the others train together.
        let ready: Vec<(usize, &Prepared)> = prepared.iter().enumerate().filter_map(|(i, p)| p.as_ref().ok().map(|p| (i, p))).collect();
        let backends: Vec<Result<BackendKind, StageError>> = ctxs.iter().map(|c| backend(c)).collect();
        let trained = match (ready.first(), backends.first()) {
            (Some(_), Some(Ok(kind))) => {
                for &(i, _) in &ready {
                    (ctxs[i].log)(format!("fused: trained in a group of {} on one task", ready.len()));
                }
                train_together(ctxs, &ready, *kind)
            }
            _ => Vec::new(),
        };
        let mut trained = trained.into_iter();
        let mut out = Vec::with_capacity(ctxs.len());
        for (i, (ctx, p)) in ctxs.iter_mut().zip(prepared).enumerate() {
            out.push(match p {
                Err(e) => Err(e),
                Ok(p) => match trained.next() {
                    Some(Ok(o)) => finish(ctx, &p.cfg, o),
                    Some(Err(e)) => Err(e),
                    None => Err(StageError::new(format!("member {i} of the group was not trained"))),
                },
            });
        }
        out
    }
}

/// Reads an instance's dataset and turns its params into a training configuration.
fn prepare(ctx: &mut RunContext<'_>) -> Result<Prepared, StageError> {
    let params = ctx.params;
    let ds = io::dataset(io::file(ctx.inputs, "data", io::DATASET_FILE)?)?;
    let arch = arch_from(params, ds.channels)?;
    if let Some(why) = arch.input_too_small(ds.height, ds.width) {
        return Err(StageError::new(why));
    }
    let cfg = TrainConfig {
        arch: arch.clone(),
        optimizer: match p::str(params, "optimizer")? {
            "adamw" => OptimizerKind::AdamW,
            "sgd" => OptimizerKind::Sgd,
            _ => OptimizerKind::Adam,
        },
        lr: p::f64(params, "lr")?,
        weight_decay: p::f64(params, "weight_decay")?,
        momentum: p::f64(params, "momentum")?,
        epochs: p::usize(params, "epochs")?,
        batch_size: p::usize(params, "batch_size")?,
        class_weights: if p::str(params, "class_weights")? == "balanced" { ClassWeights::Balanced } else { ClassWeights::None },
        flip: p::bool(params, "flip")?,
        seed: p::opt_u64(params, "seed").unwrap_or(ctx.seed),
    };
    (ctx.log)(format!("training {} on {} images for {} epochs ({})", arch.name, ds.count(Split::Train), cfg.epochs, ctx.backend));
    Ok(Prepared { cfg, ds })
}

/// Trains the `ready` members as one group on a worker thread, passing each member's latest
/// progress on to its own context from this thread (contexts are not shared across threads).
fn train_together(ctxs: &mut [RunContext<'_>], ready: &[(usize, &Prepared)], kind: BackendKind) -> Vec<Result<TrainOut, StageError>> {
    let latest: std::sync::Mutex<Vec<Option<ml_train::TrainProgress>>> = std::sync::Mutex::new(vec![None; ready.len()]);
    let report = |k: usize, t: ml_train::TrainProgress| {
        if let Ok(mut l) = latest.lock() {
            l[k] = Some(t);
        }
    };
    let forward = |ctxs: &mut [RunContext<'_>]| {
        let taken: Vec<Option<ml_train::TrainProgress>> = latest.lock().map(|mut l| l.iter_mut().map(Option::take).collect()).unwrap_or_default();
        for (k, t) in taken.into_iter().enumerate() {
            if let Some(t) = t {
                (ctxs[ready[k].0].progress)(step_progress(t));
            }
        }
    };
    let device = ctxs[ready[0].0].device;
    let members: Vec<Member> = ready.iter().map(|(_, p)| Member { cfg: &p.cfg, ds: &p.ds }).collect();
    let n = members.len();
    let result = std::thread::scope(|s| {
        let worker = s.spawn(|| dispatch(kind, device, GroupJob { members, progress: &report }));
        while !worker.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(50));
            forward(ctxs);
        }
        forward(ctxs);
        worker.join()
    });
    match result {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => (0..n).map(|_| Err(StageError::new(&e))).collect(),
        Err(panic) => {
            let why = crate::panics::message(panic.as_ref());
            (0..n).map(|_| Err(StageError::new(format!("the training group panicked: {why}")))).collect()
        }
    }
}

/// Writes a trained model's files, logs its epochs and warnings, and gives its metrics.
fn finish(ctx: &mut RunContext<'_>, cfg: &TrainConfig, out: TrainOut) -> Result<Outcome, StageError> {
    let arch = &cfg.arch;
    for e in &out.epochs {
        (ctx.log)(format!(
            "epoch {}: loss {:.4} acc {:.3} val_acc {}",
            e.epoch,
            e.loss,
            e.accuracy,
            e.val_accuracy.map(|v| format!("{v:.3}")).unwrap_or("-".into())
        ));
    }
    let w = io::write(ctx.out_dir, io::WEIGHTS_FILE, &out.weights)?;
    let c = io::write(ctx.out_dir, io::CONFIG_FILE, &serde_json::to_vec_pretty(arch).map_err(StageError::new)?)?;
    let l = io::write(ctx.out_dir, "train_log.json", &serde_json::to_vec_pretty(&out.epochs).map_err(StageError::new)?)?;
    let last = out.epochs.last();
    let losses: Vec<f64> = out.epochs.iter().map(|e| e.loss).collect();
    let mut warnings: Vec<Warning> = metrics::loss_not_falling(&losses).into_iter().collect();
    warnings.extend(classifier_warnings(&[("val", &out.val), ("test", &out.test)]));
    for w in &warnings {
        (ctx.log)(format!("warning: {}: {}", w.flag, w.message));
    }
    let metrics = json!({
        "train_loss": last.map(|e| nan_to_null(e.loss)),
        "train_accuracy": last.map(|e| nan_to_null(e.accuracy)),
        "val_loss": last.and_then(|e| e.val_loss).map(nan_to_null),
        "val_accuracy": nan_to_null(out.val.accuracy),
        "accuracy": nan_to_null(out.test.accuracy),
        "majority_rate": nan_to_null(out.test.majority_rate),
        "balanced_accuracy": nan_to_null(out.test.balanced_accuracy),
        "sensitivity": nan_to_null(out.test.sensitivity),
        "specificity": nan_to_null(out.test.specificity),
        "auc": nan_to_null(out.test.auc),
        "test_images": out.test.n,
        "epochs": out.epochs,
        "warnings": warnings,
    });
    Ok(Outcome { files: vec![w, c, l], metrics })
}

/// The sanity guards on a classifier's predictions, per scored split (in the order given):
/// a single predicted class on any split, and, on the last split (the one whose accuracy is
/// reported), an accuracy that does not beat the majority-class rate.
/// An empty split is flagged too: its scores are null, which must not pass for a result.
pub fn classifier_warnings(splits: &[(&str, &ClassificationScores)]) -> Vec<Warning> {
    let mut v: Vec<Warning> = splits
        .iter()
        .filter(|(_, s)| s.n == 0)
        .map(|(name, _)| Warning {
            flag: "empty-split".into(),
            message: format!(
                "split `{name}` holds no images, so its accuracy, sensitivity, specificity and AUC are not computed \
                 (raise the data stage's `{name}_fraction` or `count`)"
            ),
        })
        .collect();
    v.extend(splits.iter().filter_map(|(name, s)| metrics::one_class_split(name, s)));
    v.extend(splits.iter().filter_map(|(name, s)| metrics::single_class(name, s)));
    if let Some((name, s)) = splits.last() {
        v.extend(metrics::below_majority(name, s));
    }
    v
}

/// Loads the model artifact (config + weights) of input `slot` for a backend, to be run on the
/// images of `ds` (refused, with why, when they are too small for its architecture: a model
/// and a data set may come from different stages).
pub fn load_model<B: burn::tensor::backend::Backend>(
    inputs: &std::collections::BTreeMap<String, InputArtifact>,
    slot: &str,
    device: &B::Device,
    ds: &Dataset,
) -> Result<(ArchConfig, crate::ml::model::Classifier<B>), StageError> {
    let arch: ArchConfig = serde_json::from_slice(&io::read(io::file(inputs, slot, io::CONFIG_FILE)?)?)
        .map_err(|e| StageError::new(format!("model config: {e}")))?;
    if let Some(why) = arch.input_too_small(ds.height, ds.width) {
        return Err(StageError::new(format!("the model of input `{slot}` cannot read this data: {why}")));
    }
    let bytes = io::read(io::file(inputs, slot, io::WEIGHTS_FILE)?)?;
    let m = weights::from_safetensors::<B>(&arch, &bytes, device).map_err(StageError::new)?;
    Ok((arch, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, Json)]) -> Params {
        let kind = Train { retrain: false };
        let mut p: Params = kind.params().iter().map(|s| (s.name.to_string(), (s.default)())).collect();
        for (k, v) in pairs {
            p.insert(k.to_string(), v.clone());
        }
        p
    }

    #[test]
    fn params_the_architecture_or_optimizer_ignores_are_keyed_at_their_defaults() {
        let kind = Train { retrain: false };
        let key = |pairs: &[(&str, Json)]| kind.key_params(&params(pairs));
        let fusion = |pairs: &[(&str, Json)]| kind.fusion_key(&params(pairs), "cpu", &BTreeMap::new()).map(|f| f.key);
        let base = key(&[]);
        assert_eq!(base, params(&[]), "defaults are keyed as they are");
        for ignored in [("widths", json!([4, 8])), ("batch_norm", json!(true)), ("blocks", json!(3)), ("momentum", json!(0.1))] {
            assert_eq!(key(std::slice::from_ref(&ignored)), base, "vgg-small with adam: {ignored:?}");
            assert_eq!(fusion(std::slice::from_ref(&ignored)), fusion(&[]), "{ignored:?} fuses");
        }
        let vgg = ("arch", json!("vgg"));
        assert_ne!(key(&[vgg.clone(), ("widths", json!([4, 8]))]), key(std::slice::from_ref(&vgg)));
        assert_ne!(key(&[vgg.clone(), ("batch_norm", json!(true))]), key(std::slice::from_ref(&vgg)));
        assert_eq!(key(&[vgg.clone(), ("blocks", json!(3))]), key(&[vgg]));
        let resnet = ("arch", json!("resnet"));
        assert_eq!(key(&[resnet.clone(), ("batch_norm", json!(true))]), key(std::slice::from_ref(&resnet)));
        assert_ne!(key(&[resnet.clone(), ("blocks", json!(2))]), key(&[resnet]));
        let sgd = ("optimizer", json!("sgd"));
        assert_ne!(key(&[sgd.clone(), ("momentum", json!(0.1))]), key(&[sgd]));
    }

    /// `widths` is checked where an architecture reads it, every entry: a negative one used
    /// to be dropped from the list (`[4, -1, 8]` trained `[4, 8]`).
    #[test]
    fn widths_are_checked_entry_by_entry_where_they_are_read() {
        let kind = Train { retrain: false };
        let no_upstream = |_: &str| None;
        let check = |w: Json| kind.check(&params(&[("arch", json!("vgg")), ("widths", w)]), &no_upstream);
        let rule = vec![("widths".to_string(), "must be a non-empty list of integers from 1 to 4096".to_string())];
        for bad in [json!([4, -1, 8]), json!([]), json!([0]), json!([4097])] {
            assert_eq!(check(bad.clone()), rule, "{bad}");
        }
        assert_eq!(check(json!([4, 8, 4096])), Vec::new());
        let small = kind.check(&params(&[("widths", json!([-1]))]), &no_upstream);
        assert_eq!(small, Vec::new(), "vgg-small ignores widths");
    }
}
