//! Fused training: K classifiers of one shape trained as one stacked model
//! ([`super::stacked`]), each exactly as it would be trained alone.
//!
//! Why: one small training (32x32 or 64x64 images, batches of 32) leaves most of a GPU idle
//! and feeds a CPU's cores poorly: its layers are too small to fill the device, and between
//! them a step is serial (autodiff bookkeeping, allocation, the optimizer). A stack of K runs
//! each layer of all K members as one operation (on a GPU one grouped convolution, on the CPU
//! the members' kernels side by side over the cores), one backward pass and one optimizer step.
//! The executor forms the groups (`exec::fusion`); this module only knows models and datasets.
//!
//! Exactness: every member keeps its own initial weights (drawn one member after another, as
//! alone), its own batch order, flips and class weights from its own seed and data, its own
//! batch-norm statistics and optimizer state; its loss is summed with the others', so its
//! gradient is that of its own loss. On the CPU the stacked ops call the same kernels on each
//! member's slice, so a member's weights, logs and scores are the bytes it would give alone;
//! the tests below check it for every architecture and optimizer.
//!
//! Members stack when their steps line up: same architecture, optimizer and its settings,
//! epochs, batch size, number of training images and image size. A member that differs (or
//! is alone in its kind) trains alone, in the same call; on the CPU a stack holds at most as
//! many members as keep its largest activation within `StackedOps::stack_budget`.

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rayon::prelude::*;

use super::dataset::{Dataset, Split};
use super::fast_ops::TrainBackend;
use super::model::Classifier;
use super::rng::Rng;
use super::stacked::StackedClassifier;
use super::train::{
    EpochLog, OptimizerKind, TrainConfig, TrainError, TrainProgress, Trained, WithOptimizer, class_weights, evaluate_loss, labels, push_batch,
    seeded_init, train_initialised, with_optimizer,
};

/// One member of a group: its own configuration (seed included) and its own data.
#[derive(Clone, Copy)]
pub struct Member<'a> {
    pub cfg: &'a TrainConfig,
    pub ds: &'a Dataset,
}

/// What must be equal for members to take their steps together.
fn stack_key(m: &Member<'_>) -> (String, [u64; 3], [usize; 3], [usize; 3]) {
    let c = m.cfg;
    (
        format!("{:?} {:?}", c.arch, c.optimizer),
        // Momentum only where the optimizer reads it: Adam members with another (ignored)
        // momentum step together.
        [c.lr.to_bits(), c.weight_decay.to_bits(), if matches!(c.optimizer, OptimizerKind::Sgd) { c.momentum.to_bits() } else { 0 }],
        [c.epochs, c.batch_size, m.ds.count(Split::Train)],
        [m.ds.channels, m.ds.height, m.ds.width],
    )
}

/// Bytes of a member's largest activation in one step (a unit's output, before its pool):
/// a stack's largest tensor is K of them.
pub fn largest_activation_bytes(m: &Member<'_>) -> usize {
    let (mut h, mut w, mut largest) = (m.ds.height, m.ds.width, 0);
    for (width, pool) in m.cfg.arch.widths.iter().zip(&m.cfg.arch.pool_after) {
        largest = largest.max(width * h * w);
        if *pool {
            (h, w) = (h / 2, w / 2);
        }
    }
    largest * m.cfg.batch_size * std::mem::size_of::<f32>()
}

/// Splits members into stacks (in member order): members of equal [`stack_key`] together,
/// each stack at most as many as keep its largest stacked activation within `budget` bytes
/// (none: no limit; a member over it alone still forms a stack of one).
pub fn stacks(members: &[Member<'_>], budget: Option<usize>) -> Vec<Vec<usize>> {
    let mut out: Vec<(_, Vec<usize>)> = Vec::new();
    for (i, m) in members.iter().enumerate() {
        if m.cfg.batch_size == 0 || m.ds.count(Split::Train) == 0 {
            out.push((None, vec![i]));
            continue;
        }
        let most = budget.map_or(usize::MAX, |b| (b / largest_activation_bytes(m).max(1)).max(1));
        let key = Some(stack_key(m));
        match out.iter_mut().find(|(k, v)| k.is_some() && *k == key && v.len() < most) {
            Some((_, v)) => v.push(i),
            None => out.push((key, vec![i])),
        }
    }
    out.into_iter().map(|(_, v)| v).collect()
}

/// Trains every member, stacked with those whose steps line up, and hands each result to
/// `finish` (in parallel over members: evaluation and serialisation). Results come back in
/// member order. `progress` receives (member index, progress).
pub fn train_group<B, T>(
    members: &[Member<'_>],
    device: &B::Device,
    progress: &(dyn Fn(usize, TrainProgress) + Sync),
    finish: &(dyn Fn(usize, Result<Trained<B::InnerBackend>, TrainError>) -> T + Sync),
) -> Vec<T>
where
    B: TrainBackend,
    T: Send,
{
    // Initial weights one member after another, as each would draw them alone.
    let mut initial: Vec<Option<Classifier<B>>> = members.iter().map(|m| Some(seeded_init::<B>(&m.cfg.arch, m.cfg.seed, device))).collect();
    let mut trained: Vec<Option<Result<Trained<B::InnerBackend>, TrainError>>> = members.iter().map(|_| None).collect();
    for stack in stacks(members, B::stack_budget()) {
        let models: Vec<Classifier<B>> = stack.iter().filter_map(|&i| initial[i].take()).collect();
        let results = if stack.len() == 1 {
            let i = stack[0];
            models
                .into_iter()
                .map(|model| train_initialised::<B>(members[i].cfg, members[i].ds, device, model, &mut |p| progress(i, p)))
                .collect()
        } else {
            let group: Vec<Member> = stack.iter().map(|&i| members[i]).collect();
            train_stacked::<B>(&group, models, device, &|k, p| progress(stack[k], p))
        };
        for (&i, r) in stack.iter().zip(results) {
            trained[i] = Some(r);
        }
    }
    // Every member is in exactly one stack; a result missing all the same fails only its own.
    trained.into_par_iter().enumerate().map(|(i, r)| finish(i, r.unwrap_or(Err(TrainError::NotTrained)))).collect()
}

/// Trains `members` (whose [`stack_key`]s are equal) as one stacked model from their initial
/// `models`: the loop of `train::train_with`, member by member inside each step.
fn train_stacked<B: TrainBackend>(
    members: &[Member<'_>],
    models: Vec<Classifier<B>>,
    device: &B::Device,
    progress: &(dyn Fn(usize, TrainProgress) + Sync),
) -> Vec<Result<Trained<B::InnerBackend>, TrainError>> {
    let cfg = members[0].cfg;
    let templates: Vec<Classifier<B::InnerBackend>> = models.iter().map(|m| m.valid()).collect();
    let stacked = match StackedClassifier::stack(&cfg.arch, &models) {
        Ok(s) => s,
        // An architecture without a stacked version: every member trains alone.
        Err(_) => {
            return members
                .iter()
                .zip(models)
                .enumerate()
                .map(|(k, (m, model))| train_initialised::<B>(m.cfg, m.ds, device, model, &mut |p| progress(k, p)))
                .collect();
        }
    };
    drop(models);
    let run = Stack { members, device, model: stacked, templates: &templates, progress };
    match with_optimizer(cfg, run) {
        Ok((model, logs)) => {
            let inner = model.valid();
            templates
                .into_iter()
                .zip(logs)
                .enumerate()
                .map(|(k, (template, epochs))| Ok(Trained { model: inner.member(k, template), epochs }))
                .collect()
        }
        Err(e) => members.iter().map(|_| Err(e.clone())).collect(),
    }
}

/// A stacked training, waiting for its optimizer.
struct Stack<'a, B: TrainBackend> {
    members: &'a [Member<'a>],
    device: &'a B::Device,
    model: StackedClassifier<B>,
    /// Each member's initial model, into which its trained parameters are written.
    templates: &'a [Classifier<B::InnerBackend>],
    progress: &'a (dyn Fn(usize, TrainProgress) + Sync),
}

/// The trained stack and each member's epoch logs.
type StackOut<B> = Result<(StackedClassifier<B>, Vec<Vec<EpochLog>>), TrainError>;

impl<B: TrainBackend> WithOptimizer<B, StackedClassifier<B>> for Stack<'_, B> {
    type Output = StackOut<B>;

    fn run<O: Optimizer<StackedClassifier<B>, B>>(self, mut optim: O) -> StackOut<B> {
        let Stack { members, device, mut model, templates, progress } = self;
        let cfg = members[0].cfg;
        let k = members.len();
        let (batch, epochs) = (cfg.batch_size, cfg.epochs);
        let train_idx: Vec<Vec<usize>> = members.iter().map(|m| m.ds.indices(Split::Train)).collect();
        let val_idx: Vec<Vec<usize>> = members.iter().map(|m| m.ds.indices(Split::Val)).collect();
        let weights: Vec<Option<Vec<f32>>> =
            members.iter().zip(&train_idx).map(|(m, t)| class_weights(&m.cfg.class_weights, m.ds, t)).collect();
        let mut rngs: Vec<Rng> = members.iter().map(|m| Rng::derive(m.cfg.seed, "train/order")).collect();
        let (c, h, w) = (members[0].ds.channels, members[0].ds.height, members[0].ds.width);
        let mut logs: Vec<Vec<EpochLog>> = vec![Vec::new(); k];
        for epoch in 1..=epochs {
            let orders: Vec<Vec<usize>> = train_idx
                .iter()
                .zip(rngs.iter_mut())
                .map(|(t, rng)| {
                    let mut order = t.clone();
                    rng.shuffle(&mut order);
                    order
                })
                .collect();
            let (mut loss_sum, mut correct, mut seen) = (vec![0f64; k], vec![0usize; k], 0usize);
            let steps = orders[0].len().div_ceil(batch);
            for step in 0..steps {
                let chunks: Vec<&[usize]> = orders.iter().map(|o| &o[step * batch..((step + 1) * batch).min(o.len())]).collect();
                let n = chunks[0].len();
                let mut x = Vec::with_capacity(k * n * c * h * w);
                let mut targets = Vec::with_capacity(k * n);
                for ((m, chunk), rng) in members.iter().zip(&chunks).zip(rngs.iter_mut()) {
                    let flips: Vec<bool> = chunk.iter().map(|_| m.cfg.flip && rng.uniform() < 0.5).collect();
                    push_batch(m.ds, chunk, &flips, &mut x);
                    targets.extend(labels(m.ds, chunk));
                }
                let x = Tensor::<B, 4>::from_data(TensorData::new(x, [k * n, c, h, w]), device);
                let y: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
                let y = Tensor::<B, 1, Int>::from_data(TensorData::new(y, [k * n]), device);
                let logits = model.forward(x);
                let losses = B::cross_entropy_stacked(logits.clone(), &targets, &weights);
                let hits =
                    logits.argmax(1).reshape([k * n]).equal(y).int().into_data().convert::<i64>().to_vec::<i64>().unwrap_or_default();
                let values = losses.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
                for m in 0..k {
                    correct[m] += hits.get(m * n..(m + 1) * n).map_or(0, |h| h.iter().sum::<i64>()) as usize;
                    loss_sum[m] += values.get(m).copied().unwrap_or(f32::NAN).elem::<f64>() * n as f64;
                }
                seen += n;
                let grads = GradientsParams::from_grads(losses.sum().backward(), &model);
                model = optim.step(cfg.lr, model, grads);
                for m in 0..k {
                    progress(m, TrainProgress { epoch, epochs, step: step + 1, steps, loss: loss_sum[m] / seen as f64 });
                }
            }
            // Validation member by member (inference only, in parallel), as alone.
            let inner = model.valid();
            let val: Vec<(Option<f64>, Option<f64>)> = (0..k)
                .into_par_iter()
                .map(|m| {
                    if val_idx[m].is_empty() {
                        return (None, None);
                    }
                    let member = inner.member(m, templates[m].clone());
                    let (l, a) = evaluate_loss(&member, members[m].ds, &val_idx[m], batch, weights[m].as_deref());
                    (Some(l), Some(a))
                })
                .collect();
            for (m, (val_loss, val_accuracy)) in val.into_iter().enumerate() {
                logs[m].push(EpochLog {
                    epoch,
                    loss: loss_sum[m] / seen as f64,
                    accuracy: correct[m] as f64 / seen as f64,
                    val_loss,
                    val_accuracy,
                });
            }
        }
        Ok((model, logs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::dataset::{SplitConfig, assign_splits};
    use crate::ml::model::ArchConfig;
    use crate::ml::synthetic::{SyntheticConfig, generate};
    use crate::ml::train::{ClassWeights, EpochLog, OptimizerKind, evaluate, train};
    use crate::ml::weights::to_safetensors;
    use crate::ml::stacked_ops::StackedOps;
    use burn::backend::{Autodiff, Flex};

    type Ad = Autodiff<Flex>;

    /// What a member leaves behind: weights file, epoch logs (bit patterns), test probabilities.
    type Fingerprint = (Vec<u8>, Vec<u64>, Vec<u32>);

    /// Member datasets as a sweep's retrainings have them: the same images, splits and labels,
    /// filtered differently (here: scaled and shifted pixels, and fresh noise, per `seed`).
    fn dataset(seed: u64) -> Dataset {
        let mut ds = generate(&SyntheticConfig {
            count: 20,
            size: 16,
            tumor_fraction: 0.5,
            contrast: 0.6,
            noise: 0.05,
            slices_per_patient: 2,
            seed: 10,
        });
        assign_splits(&mut ds.samples, SplitConfig { val: 0.2, test: 0.2, seed: 1 });
        let mut rng = crate::ml::rng::Rng::new(seed);
        let scale = 1.0 + 0.1 * (seed % 7) as f32;
        for s in &mut ds.samples {
            s.image.iter_mut().for_each(|v| *v = *v * scale + 0.05 * rng.normal());
        }
        ds
    }

    fn config(arch: &ArchConfig, seed: u64, optimizer: OptimizerKind) -> TrainConfig {
        TrainConfig {
            arch: arch.clone(),
            optimizer,
            lr: 1e-3,
            weight_decay: if optimizer == OptimizerKind::Adam { 0.0 } else { 1e-4 },
            momentum: 0.9,
            epochs: 2,
            batch_size: 5,
            class_weights: ClassWeights::Balanced,
            flip: true,
            seed,
        }
    }

    fn fingerprint(cfg: &TrainConfig, ds: &Dataset, t: &Trained<Flex>) -> Fingerprint {
        let logs = |e: &EpochLog| {
            [e.loss.to_bits(), e.accuracy.to_bits(), e.val_loss.unwrap_or(f64::NAN).to_bits(), e.val_accuracy.unwrap_or(f64::NAN).to_bits()]
        };
        let (_, probs) = evaluate(&t.model, ds, Split::Test, cfg.batch_size);
        (
            to_safetensors(&cfg.arch, &t.model).unwrap(),
            t.epochs.iter().flat_map(logs).collect(),
            probs.iter().map(|p| p.to_bits()).collect(),
        )
    }

    fn architectures() -> Vec<ArchConfig> {
        vec![
            ArchConfig::vgg_small(1),
            ArchConfig::vgg(1, vec![4, 8, 8], false),
            ArchConfig::vgg(1, vec![4, 8, 8], true),
            ArchConfig::resnet(1, &[4, 8], 1),
        ]
    }

    /// The invariant of issue 10: on the CPU, a member of a group of K = 1, 2, 3 leaves the
    /// bytes it leaves alone (weights file, epoch logs, test probabilities), for every
    /// architecture, with members of different seeds and different datasets.
    #[test]
    fn a_group_member_equals_the_same_training_alone_for_every_architecture() {
        let dev = Default::default();
        let data: Vec<Dataset> = (0..3).map(|i| dataset(10 + i)).collect();
        for arch in architectures() {
            let cfgs: Vec<TrainConfig> = (0..3).map(|i| config(&arch, 7 + i, OptimizerKind::Adam)).collect();
            let alone: Vec<Fingerprint> =
                cfgs.iter().zip(&data).map(|(c, ds)| fingerprint(c, ds, &train::<Ad>(c, ds, &dev).unwrap())).collect();
            // Different seeds give different models, or the comparison below proves little.
            assert_ne!(alone[0].0, alone[1].0, "{}", arch.name);
            for k in 1..=3 {
                let members: Vec<Member> = cfgs.iter().zip(&data).take(k).map(|(cfg, ds)| Member { cfg, ds }).collect();
                // All K train as one stacked model (not one after another), which can be built.
                assert_eq!(stacks(&members, Ad::stack_budget()), vec![(0..k).collect::<Vec<_>>()], "{}", arch.name);
                let models: Vec<_> = cfgs.iter().take(k).map(|c| seeded_init::<Ad>(&c.arch, c.seed, &dev)).collect();
                assert!(crate::ml::stacked::StackedClassifier::stack(&arch, &models).is_ok(), "{}", arch.name);
                let grouped =
                    train_group::<Ad, _>(&members, &dev, &|_, _| {}, &|i, t| fingerprint(members[i].cfg, members[i].ds, &t.unwrap()));
                for (i, g) in grouped.iter().enumerate() {
                    assert!(g == &alone[i], "{} {:?}: member {i} of {k} differs from the same training alone", arch.name, arch.widths);
                }
            }
        }
    }

    /// The other optimizers keep their state per member too.
    #[test]
    fn group_members_keep_their_own_optimizer_state() {
        let dev = Default::default();
        let data = [dataset(21), dataset(22)];
        for opt in [OptimizerKind::AdamW, OptimizerKind::Sgd] {
            let arch = ArchConfig::vgg(1, vec![4, 8], true);
            let cfgs = [config(&arch, 1, opt), config(&arch, 2, opt)];
            let members: Vec<Member> = cfgs.iter().zip(&data).map(|(cfg, ds)| Member { cfg, ds }).collect();
            assert_eq!(stacks(&members, Ad::stack_budget()).len(), 1);
            let grouped = train_group::<Ad, _>(&members, &dev, &|_, _| {}, &|i, t| fingerprint(members[i].cfg, members[i].ds, &t.unwrap()));
            for (i, m) in members.iter().enumerate() {
                assert!(grouped[i] == fingerprint(m.cfg, m.ds, &train::<Ad>(m.cfg, m.ds, &dev).unwrap()), "{opt:?}: member {i}");
            }
        }
    }

    /// Members whose steps do not line up (another number of training images, another
    /// learning rate) form their own stacks, and every member still gives its bytes alone.
    #[test]
    fn members_that_do_not_line_up_train_in_separate_stacks() {
        let dev = Default::default();
        let mut small = generate(&SyntheticConfig {
            count: 12,
            size: 16,
            tumor_fraction: 0.5,
            contrast: 0.6,
            noise: 0.05,
            slices_per_patient: 2,
            seed: 5,
        });
        assign_splits(&mut small.samples, SplitConfig { val: 0.2, test: 0.2, seed: 1 });
        let (a, b) = (dataset(31), dataset(32));
        assert_ne!(a.samples[0].image, b.samples[0].image);
        let arch = ArchConfig::vgg(1, vec![4, 8], true);
        let base = config(&arch, 1, OptimizerKind::Adam);
        let other_lr = TrainConfig { lr: 2e-3, seed: 3, ..base.clone() };
        let second = TrainConfig { seed: 2, ..base.clone() };
        let members = [
            Member { cfg: &base, ds: &a },
            Member { cfg: &base, ds: &small },
            Member { cfg: &other_lr, ds: &b },
            Member { cfg: &second, ds: &b },
        ];
        assert_ne!(small.count(Split::Train), a.count(Split::Train));
        assert_eq!(stacks(&members, None), vec![vec![0, 3], vec![1], vec![2]]);
        // A budget of two members' activations splits the stack of three lined-up members.
        let budget = Some(2 * largest_activation_bytes(&members[0]));
        let lined_up = [members[0], members[3], members[0]];
        assert_eq!(stacks(&lined_up, budget), vec![vec![0, 1], vec![2]]);
        assert_eq!(stacks(&lined_up, Some(1)), vec![vec![0], vec![1], vec![2]]);
        let grouped = train_group::<Ad, _>(&members, &dev, &|_, _| {}, &|i, t| fingerprint(members[i].cfg, members[i].ds, &t.unwrap()));
        for (i, m) in members.iter().enumerate() {
            assert!(grouped[i] == fingerprint(m.cfg, m.ds, &train::<Ad>(m.cfg, m.ds, &dev).unwrap()), "member {i}");
        }
    }

    /// Members of one stack that differ in everything a stack keeps per member: class weights
    /// (none, balanced over other label counts), flips on and off, a member without a
    /// validation split, another image set. Each still gives its bytes alone.
    #[test]
    fn members_of_one_stack_keep_their_own_weights_flips_labels_and_validation() {
        let dev = Default::default();
        let arch = ArchConfig::vgg(1, vec![4, 8], true);
        let base = config(&arch, 1, OptimizerKind::Adam);
        let plain = TrainConfig { class_weights: ClassWeights::None, flip: false, seed: 2, ..base.clone() };
        let third = TrainConfig { seed: 3, ..base.clone() };
        let a = dataset(51);
        // No validation split (its images go to test: the training set is unchanged).
        let mut b = dataset(52);
        for s in &mut b.samples {
            if s.split == Split::Val {
                s.split = Split::Test;
            }
        }
        // Other labels in training: other balanced class weights.
        let mut c = dataset(53);
        for s in c.samples.iter_mut().filter(|s| s.split == Split::Train).take(3) {
            s.label = 1 - s.label;
        }
        assert_eq!(b.count(Split::Val), 0);
        let members = [Member { cfg: &base, ds: &a }, Member { cfg: &plain, ds: &b }, Member { cfg: &third, ds: &c }];
        assert_eq!(stacks(&members, Ad::stack_budget()), vec![vec![0, 1, 2]]);
        let grouped = train_group::<Ad, _>(&members, &dev, &|_, _| {}, &|i, t| fingerprint(members[i].cfg, members[i].ds, &t.unwrap()));
        for (i, m) in members.iter().enumerate() {
            assert!(grouped[i] == fingerprint(m.cfg, m.ds, &train::<Ad>(m.cfg, m.ds, &dev).unwrap()), "member {i}");
        }
    }

    /// Members with other image sizes never share a stack.
    #[test]
    fn members_with_other_image_sizes_do_not_stack() {
        let arch = ArchConfig::vgg(1, vec![4, 8], false);
        let cfg = config(&arch, 1, OptimizerKind::Adam);
        let a = dataset(61);
        let mut b = dataset(62);
        b.height *= 2;
        b.width *= 2;
        for s in &mut b.samples {
            s.image = s.image.iter().flat_map(|&v| [v, v, v, v]).collect();
        }
        assert_eq!(stacks(&[Member { cfg: &cfg, ds: &a }, Member { cfg: &cfg, ds: &b }], None), vec![vec![0], vec![1]]);
    }

    /// A member that cannot train fails alone; the others still train.
    #[test]
    fn a_failing_member_does_not_take_the_group_down() {
        let dev = Default::default();
        let ds = dataset(3);
        let arch = ArchConfig::vgg(1, vec![4], false);
        let good = config(&arch, 1, OptimizerKind::Adam);
        let bad = TrainConfig { batch_size: 0, ..good.clone() };
        let members = [Member { cfg: &good, ds: &ds }, Member { cfg: &bad, ds: &ds }];
        let seen = std::sync::Mutex::new(Vec::new());
        let out = train_group::<Ad, _>(&members, &dev, &|k, p| seen.lock().unwrap().push((k, p.step)), &|_, t| t.map(|_| ()));
        assert!(out[0].is_ok());
        assert!(matches!(out[1], Err(TrainError::BatchSize)));
        assert!(seen.lock().unwrap().iter().all(|&(k, _)| k == 0), "only the good member reports progress");
    }
}
