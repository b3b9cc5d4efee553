//! Group training: K classifiers trained in one task, concurrently over the CPU's cores,
//! each exactly as it would be trained alone.
//!
//! Why: one small training (32x32 or 64x64 images, batches of 32) feeds two cores poorly:
//! its convolutions are too small for the kernels' parallel loops to keep every core busy,
//! and between them a step is serial (autodiff bookkeeping, allocation, the optimizer). K
//! trainings side by side keep every core busy with whole steps. The executor forms the
//! groups (`exec::fusion`); this module only knows models and datasets.
//!
//! Exactness: every member runs [`train_initialised`], the same code as a training alone, on
//! its own model, optimizer state, batch order and flips. The CPU kernels' results do not
//! depend on the thread count or on what else runs (`cpu_kernels`), so on the CPU a member's
//! weights, logs and scores are the bytes it would give alone; the tests below check it for
//! every architecture. Initial weights are drawn one member after another, under
//! [`seeded_init`]'s lock, before anything runs in parallel.
//!
//! What this is not (yet): one fused model whose K members' weights are stacked so that a
//! layer of the group is one grouped convolution. On the CPU that computes the same numbers
//! as the members' own kernels; it would mostly save per-operation overhead. See
//! BENCHMARKS.md, "Fused training (issue 10)".

use super::dataset::Dataset;
use super::fast_ops::TrainBackend;
use super::train::{TrainConfig, TrainError, TrainProgress, Trained, seeded_init, train_initialised};

/// One member of a group: its own configuration (seed included) and its own data.
#[derive(Clone, Copy)]
pub struct Member<'a> {
    pub cfg: &'a TrainConfig,
    pub ds: &'a Dataset,
}

/// Trains every member, concurrently (as many at a time as rayon has threads; each member's
/// kernels still use the rayon pool), and hands each result to `finish` (still inside the
/// parallel section, so evaluation and serialisation run side by side too). Results come
/// back in member order. `progress` receives (member index, progress) from worker threads.
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
    let models: Vec<_> = members.iter().map(|m| std::sync::Mutex::new(Some(seeded_init::<B>(&m.cfg.arch, m.cfg.seed, device)))).collect();
    let results: Vec<std::sync::Mutex<Option<T>>> = members.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    // Plain threads, not rayon tasks: burn's autodiff holds a process-wide lock for a whole
    // backward pass, and a rayon worker waiting inside one (for a kernel's parallel loop) could
    // steal another member's task, which would wait for the same lock on the same thread.
    let workers = members.len().min(rayon::current_num_threads()).max(1);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(m) = members.get(k) else { break };
                    let model = models[k].lock().ok().and_then(|mut slot| slot.take());
                    let Some(model) = model else { break };
                    let r = finish(k, train_initialised::<B>(m.cfg, m.ds, device, model, &mut |p| progress(k, p)));
                    if let Ok(mut slot) = results[k].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    // Every index below `members.len()` was taken by exactly one worker; a worker that
    // panicked has already propagated its panic out of the scope.
    results.into_iter().filter_map(|r| r.into_inner().ok().flatten()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::dataset::{Split, SplitConfig, assign_splits};
    use crate::ml::model::ArchConfig;
    use crate::ml::synthetic::{SyntheticConfig, generate};
    use crate::ml::train::{ClassWeights, EpochLog, OptimizerKind, evaluate, train};
    use crate::ml::weights::to_safetensors;
    use burn::backend::{Autodiff, Flex};

    type Ad = Autodiff<Flex>;

    /// What a member leaves behind: weights file, epoch logs (bit patterns), test probabilities.
    type Fingerprint = (Vec<u8>, Vec<u64>, Vec<u32>);

    fn dataset(seed: u64) -> Dataset {
        let mut ds = generate(&SyntheticConfig {
            count: 20,
            size: 16,
            tumor_fraction: 0.5,
            contrast: 0.6,
            noise: 0.05,
            slices_per_patient: 2,
            seed,
        });
        assign_splits(&mut ds.samples, SplitConfig { val: 0.2, test: 0.2, seed: 1 });
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
        let logs = |e: &EpochLog| [e.loss.to_bits(), e.accuracy.to_bits(), e.val_loss.unwrap_or(f64::NAN).to_bits()];
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
                let grouped = train_group::<Ad, _>(&members, &dev, &|_, _| {}, &|i, t| fingerprint(members[i].cfg, members[i].ds, &t.unwrap()));
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
            let grouped = train_group::<Ad, _>(&members, &dev, &|_, _| {}, &|i, t| fingerprint(members[i].cfg, members[i].ds, &t.unwrap()));
            for (i, m) in members.iter().enumerate() {
                assert!(grouped[i] == fingerprint(m.cfg, m.ds, &train::<Ad>(m.cfg, m.ds, &dev).unwrap()), "{opt:?}: member {i}");
            }
        }
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
