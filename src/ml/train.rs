//! Training and inference of the classifiers.
//!
//! Deterministic on the CPU backend: the weights are initialised after `B::seed`, the batch
//! order and flips come from our own frozen generator, and nothing depends on thread count.

use burn::module::AutodiffModule;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::dataset::{Dataset, Split};
use super::fast_ops::{FastOps, TrainBackend};
use super::metrics::{self, ClassificationScores};
use super::model::{ArchConfig, Classifier};
use super::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    AdamW,
    Sgd,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClassWeights {
    None,
    /// Inverse class frequency of the training split, normalised to mean 1.
    Balanced,
    Manual([f32; 2]),
}

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub arch: ArchConfig,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub class_weights: ClassWeights,
    /// Random horizontal flips of training images.
    pub flip: bool,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
}

pub struct Trained<B: Backend> {
    pub model: Classifier<B>,
    pub epochs: Vec<EpochLog>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TrainError {
    #[error("the training split is empty")]
    EmptyTrain,
    #[error("batch_size must be at least 1")]
    BatchSize,
    /// A member of a fused group that its group did not train (a bug, reported per member).
    #[error("the fused group did not train this member")]
    NotTrained,
}

/// Stacks the images of `idx` into a `[n, C, H, W]` tensor, flipping those in `flip`.
pub fn batch_tensor<B: Backend>(ds: &Dataset, idx: &[usize], flip: &[bool], device: &B::Device) -> Tensor<B, 4> {
    let (c, h, w) = (ds.channels, ds.height, ds.width);
    let mut v = Vec::with_capacity(idx.len() * c * h * w);
    push_batch(ds, idx, flip, &mut v);
    Tensor::from_data(TensorData::new(v, [idx.len(), c, h, w]), device)
}

/// Appends the images of `idx` to `v` (NCHW), flipping those in `flip`.
pub(crate) fn push_batch(ds: &Dataset, idx: &[usize], flip: &[bool], v: &mut Vec<f32>) {
    let w = ds.width;
    for (k, &i) in idx.iter().enumerate() {
        let img = &ds.samples[i].image;
        if flip.get(k).copied().unwrap_or(false) {
            for row in img.chunks(w) {
                v.extend(row.iter().rev());
            }
        } else {
            v.extend_from_slice(img);
        }
    }
}

fn labels_tensor<B: Backend>(ds: &Dataset, idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| ds.samples[i].label as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}

/// The class index of each sample of `idx`.
pub(crate) fn labels(ds: &Dataset, idx: &[usize]) -> Vec<usize> {
    idx.iter().map(|&i| ds.samples[i].label as usize).collect()
}

pub(crate) fn class_weights(cfg: &ClassWeights, ds: &Dataset, train: &[usize]) -> Option<Vec<f32>> {
    match cfg {
        ClassWeights::None => None,
        ClassWeights::Manual(w) => Some(w.to_vec()),
        ClassWeights::Balanced => {
            let pos = train.iter().filter(|&&i| ds.samples[i].label == 1).count().max(1) as f32;
            let neg = (train.len() as f32 - pos).max(1.0);
            let (wn, wp) = (1.0 / neg, 1.0 / pos);
            let mean = (wn + wp) / 2.0;
            Some(vec![wn / mean, wp / mean])
        }
    }
}

/// Where a training is: `step` of `steps` batches in `epoch` of `epochs`, with the mean loss of
/// the epoch's batches so far. Reported after every batch; reading it changes nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainProgress {
    pub epoch: usize,
    pub epochs: usize,
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
}

pub fn train<B: TrainBackend>(cfg: &TrainConfig, ds: &Dataset, device: &B::Device) -> Result<Trained<B::InnerBackend>, TrainError> {
    train_reporting::<B>(cfg, ds, device, &mut |_| {})
}

/// [`train`], calling `progress` after every batch (a plain callback: the caller decides how
/// often to show it).
pub fn train_reporting<B: TrainBackend>(
    cfg: &TrainConfig,
    ds: &Dataset,
    device: &B::Device,
    progress: &mut dyn FnMut(TrainProgress),
) -> Result<Trained<B::InnerBackend>, TrainError> {
    train_initialised::<B>(cfg, ds, device, seeded_init(&cfg.arch, cfg.seed, device), progress)
}

/// [`train_reporting`] from a model already initialised by [`seeded_init`] with `cfg`'s arch
/// and seed. Why apart: a group of trainings (`super::fused`) draws every member's initial
/// weights one after another before training them concurrently, so no member ever waits for
/// the initialisation lock inside a parallel section.
pub fn train_initialised<B: TrainBackend>(
    cfg: &TrainConfig,
    ds: &Dataset,
    device: &B::Device,
    model: Classifier<B>,
    progress: &mut dyn FnMut(TrainProgress),
) -> Result<Trained<B::InnerBackend>, TrainError> {
    with_optimizer(cfg, Alone { cfg, ds, device, model, progress })
}

/// A training alone, waiting for its optimizer.
struct Alone<'a, B: TrainBackend> {
    cfg: &'a TrainConfig,
    ds: &'a Dataset,
    device: &'a B::Device,
    model: Classifier<B>,
    progress: &'a mut dyn FnMut(TrainProgress),
}

impl<B: TrainBackend> WithOptimizer<B, Classifier<B>> for Alone<'_, B> {
    type Output = Result<Trained<B::InnerBackend>, TrainError>;
    fn run<O: Optimizer<Classifier<B>, B>>(self, optim: O) -> Self::Output {
        train_with::<B, O>(self.cfg, self.ds, self.device, optim, self.model, self.progress)
    }
}

/// What runs with the optimizer a configuration names: one generic entry for every optimizer
/// kind (a closure cannot be generic over the optimizer's type).
pub(crate) trait WithOptimizer<B: AutodiffBackend, M: AutodiffModule<B>> {
    type Output;
    fn run<O: Optimizer<M, B>>(self, optim: O) -> Self::Output;
}

/// One training's optimizer, for any module of parameters (a classifier, or a stack of them:
/// the optimizers are element-wise, so a stack's members get the updates they would alone).
pub(crate) fn with_optimizer<B: AutodiffBackend, M: AutodiffModule<B>, W: WithOptimizer<B, M>>(cfg: &TrainConfig, w: W) -> W::Output {
    match cfg.optimizer {
        OptimizerKind::Adam => {
            let mut o = AdamConfig::new();
            if cfg.weight_decay > 0.0 {
                o = o.with_weight_decay(Some(WeightDecayConfig::new(cfg.weight_decay as f32)));
            }
            w.run(o.init())
        }
        OptimizerKind::AdamW => w.run(AdamWConfig::new().with_weight_decay(cfg.weight_decay as f32).init()),
        OptimizerKind::Sgd => {
            let mut o = SgdConfig::new();
            if cfg.momentum > 0.0 {
                o = o.with_momentum(Some(MomentumConfig::new().with_momentum(cfg.momentum).with_dampening(0.0)));
            }
            if cfg.weight_decay > 0.0 {
                o = o.with_weight_decay(Some(WeightDecayConfig::new(cfg.weight_decay as f32)));
            }
            w.run(o.init())
        }
    }
}

fn train_with<B: TrainBackend, O: Optimizer<Classifier<B>, B>>(
    cfg: &TrainConfig,
    ds: &Dataset,
    device: &B::Device,
    mut optim: O,
    mut model: Classifier<B>,
    progress: &mut dyn FnMut(TrainProgress),
) -> Result<Trained<B::InnerBackend>, TrainError> {
    if cfg.batch_size == 0 {
        return Err(TrainError::BatchSize);
    }
    let train_idx = ds.indices(Split::Train);
    if train_idx.is_empty() {
        return Err(TrainError::EmptyTrain);
    }
    let val_idx = ds.indices(Split::Val);
    let weights = class_weights(&cfg.class_weights, ds, &train_idx);
    let mut rng = Rng::derive(cfg.seed, "train/order");
    let mut epochs = Vec::new();
    for epoch in 1..=cfg.epochs {
        let mut order = train_idx.clone();
        rng.shuffle(&mut order);
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let steps = order.len().div_ceil(cfg.batch_size);
        for (step, chunk) in order.chunks(cfg.batch_size).enumerate() {
            let flips: Vec<bool> = chunk.iter().map(|_| cfg.flip && rng.uniform() < 0.5).collect();
            let x = batch_tensor::<B>(ds, chunk, &flips, device);
            let y = labels_tensor::<B>(ds, chunk, device);
            let logits = model.forward(x);
            let loss = B::cross_entropy(logits.clone(), &labels(ds, chunk), weights.as_deref());
            let pred = logits.argmax(1).reshape([chunk.len()]);
            correct += pred.equal(y).int().sum().into_scalar().elem::<i64>() as usize;
            loss_sum += loss.clone().into_scalar().elem::<f64>() * chunk.len() as f64;
            seen += chunk.len();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(cfg.lr, model, grads);
            progress(TrainProgress { epoch, epochs: cfg.epochs, step: step + 1, steps, loss: loss_sum / seen as f64 });
        }
        let (val_loss, val_accuracy) = if val_idx.is_empty() {
            (None, None)
        } else {
            let inner = model.valid();
            let (l, a) = evaluate_loss(&inner, ds, &val_idx, cfg.batch_size, weights.as_deref());
            (Some(l), Some(a))
        };
        epochs.push(EpochLog { epoch, loss: loss_sum / seen as f64, accuracy: correct as f64 / seen as f64, val_loss, val_accuracy });
    }
    Ok(Trained { model: model.valid(), epochs })
}

/// burn's backend RNG is process-global: seeding and initialising under one lock keeps a
/// concurrent stage (or test) from drawing from the stream between the two.
pub fn seeded_init<B: Backend>(arch: &ArchConfig, seed: u64, device: &B::Device) -> Classifier<B> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|p| p.into_inner());
    B::seed(device, seed);
    let model = arch.init(device);
    // Parameters initialise lazily: draw them now, while the stream is ours.
    struct Touch;
    impl<B: Backend> burn::module::ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    burn::module::Module::visit(&model, &mut Touch);
    model
}

pub(crate) fn evaluate_loss<B: FastOps>(model: &Classifier<B>, ds: &Dataset, idx: &[usize], batch: usize, weights: Option<&[f32]>) -> (f64, f64) {
    let device = model.fc.weight.val().device();
    let (mut l, mut c) = (0f64, 0usize);
    for chunk in idx.chunks(batch.max(1)) {
        let logits = model.forward(batch_tensor::<B>(ds, chunk, &[], &device));
        let y = labels_tensor::<B>(ds, chunk, &device);
        l += B::cross_entropy(logits.clone(), &labels(ds, chunk), weights).into_scalar().elem::<f64>() * chunk.len() as f64;
        c += logits.argmax(1).reshape([chunk.len()]).equal(y).int().sum().into_scalar().elem::<i64>() as usize;
    }
    (l / idx.len() as f64, c as f64 / idx.len() as f64)
}

/// Positive-class probabilities for the samples `idx`.
pub fn predict<B: FastOps>(model: &Classifier<B>, ds: &Dataset, idx: &[usize], batch: usize) -> Vec<f32> {
    let device = model.fc.weight.val().device();
    let mut out = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(batch.max(1)) {
        let p = B::probabilities(model.forward(batch_tensor::<B>(ds, chunk, &[], &device)));
        let v = p.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        out.extend(v.chunks(2).map(|r| r[1]));
    }
    out
}

/// Classification scores of `model` on one split.
pub fn evaluate<B: FastOps>(model: &Classifier<B>, ds: &Dataset, split: Split, batch: usize) -> (ClassificationScores, Vec<f32>) {
    let idx = ds.indices(split);
    let probs = predict(model, ds, &idx, batch);
    let labels: Vec<u8> = idx.iter().map(|&i| ds.samples[i].label).collect();
    (metrics::classification(&probs, &labels), probs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::dataset::{SplitConfig, assign_splits};
    use crate::ml::synthetic::{SyntheticConfig, generate};
    use crate::ml::weights::to_safetensors;
    use burn::backend::{Autodiff, Flex};

    /// The same tiny training (vgg-small, and a resnet for batch norm and the 1x1 shortcut)
    /// under every kernel level this CPU supports: the weights' bytes and the logged losses
    /// must be identical. This is how one machine checks what another CPU would compute.
    #[test]
    fn training_bytes_are_identical_at_every_kernel_level() {
        use crate::ml::cpu_kernels::portable_gemm::{KernelLevel, calls_at, force_level};
        let mut ds = generate(&SyntheticConfig {
            count: 20,
            size: 16,
            tumor_fraction: 0.5,
            contrast: 0.6,
            noise: 0.05,
            slices_per_patient: 2,
            seed: 3,
        });
        assign_splits(&mut ds.samples, SplitConfig { val: 0.2, test: 0.2, seed: 1 });
        let levels = KernelLevel::available();
        #[cfg(target_arch = "x86_64")]
        assert!(levels.len() >= 2, "expected at least baseline and avx2, found {levels:?}");
        let dev = Default::default();
        for arch in [ArchConfig::vgg_small(1), ArchConfig::resnet(1, &[4, 8], 1)] {
            let cfg = TrainConfig {
                arch: arch.clone(),
                optimizer: OptimizerKind::Adam,
                lr: 1e-3,
                weight_decay: 0.0,
                momentum: 0.0,
                epochs: 1,
                batch_size: 6,
                class_weights: ClassWeights::Balanced,
                flip: true,
                seed: 4,
            };
            let runs: Vec<(String, Vec<u64>)> = levels
                .iter()
                .map(|&level| {
                    let _forced = force_level(level);
                    let before = calls_at(level);
                    let t = train::<Autodiff<Flex>>(&cfg, &ds, &dev).unwrap();
                    assert!(calls_at(level) > before, "{}: no GEMM ran at this level", level.name());
                    let bytes = to_safetensors(&cfg.arch, &t.model).unwrap();
                    let logs = t.epochs.iter().flat_map(|e| [e.loss.to_bits(), e.val_loss.unwrap_or(f64::NAN).to_bits()]).collect();
                    (crate::cache::key::sha256_hex(&bytes), logs)
                })
                .collect();
            for (level, run) in levels.iter().zip(&runs).skip(1) {
                assert_eq!(run, &runs[0], "{}: {} differs from baseline", arch.name, level.name());
            }
        }
    }

    #[test]
    fn training_is_bit_reproducible_across_thread_counts() {
        let mut ds = generate(&SyntheticConfig {
            count: 24,
            size: 16,
            tumor_fraction: 0.5,
            contrast: 0.6,
            noise: 0.05,
            slices_per_patient: 2,
            seed: 5,
        });
        assign_splits(&mut ds.samples, SplitConfig { val: 0.2, test: 0.2, seed: 1 });
        let cfg = TrainConfig {
            arch: ArchConfig::vgg_small(1),
            optimizer: OptimizerKind::Adam,
            lr: 1e-3,
            weight_decay: 0.0,
            momentum: 0.0,
            epochs: 1,
            batch_size: 8,
            class_weights: ClassWeights::Balanced,
            flip: true,
            seed: 9,
        };
        let dev = Default::default();
        // Two trainings, with different rayon thread counts: the bytes may depend on neither.
        let in_pool = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| train::<Autodiff<Flex>>(&cfg, &ds, &dev).unwrap())
        };
        let (a, b) = (in_pool(1), in_pool(3));
        let digest = |m| crate::cache::key::sha256_hex(&to_safetensors(&cfg.arch, m).unwrap());
        assert_eq!(digest(&a.model), digest(&b.model));
        assert_eq!(a.epochs.len(), 1);
        assert!(a.epochs[0].loss.is_finite());
    }
}
