//! The local runner: each instance's [`Job`] on tokio's blocking pool, within `--jobs` CPU
//! slots and the GPU pool of `--gpus` devices (`gpu_slots`: whole devices, or fractions of one
//! packed by their memory estimates). A stage asking for more CPU slots than exist gets all of
//! them (training asks for all by default: burn already uses every core).
//!
//! Instances that the run's fusion policy groups (`exec::fusion`: shared-work groups by
//! default, stacks of at most N with `--fuse N`) are not started one by one: `start` keeps
//! them, and `flush` (after each dispatch pass) runs those of equal key as groups, each group
//! in one blocking task holding the CPU slots of its largest member. A group that does not
//! fit waits for a later pass.

use std::collections::{BTreeMap, VecDeque};

use super::gpu_slots::{Demand, GpuPool, Grant};
use super::job::{Done, Job, JobError};
use super::fusion::{self, Grouping};
use super::{Event, Finished, Room, Runner};
use crate::stage_kind::{FusionKind, GpuShare, Resources};

type Results = Vec<(usize, Result<Done, JobError>)>;

pub(crate) struct LocalRunner {
    jobs: u32,
    cpu_free: u32,
    gpus: GpuPool,
    /// What each instance asks of the GPUs, by instance index (none where absent).
    demands: Vec<Demand>,
    /// How each instance joins a group, by index (none where absent: it runs alone).
    groupings: Vec<Option<Grouping>>,
    /// Fusable instances started but not yet running: grouped by `flush`.
    waiting: Vec<(Job, Resources)>,
    /// Results of a finished group not yet handed to the loop.
    finished: VecDeque<(usize, Result<Done, JobError>)>,
    set: tokio::task::JoinSet<Results>,
    /// CPU slots and GPU grant each running task holds, by its first instance's index.
    holding: BTreeMap<usize, (u32, Option<Grant>)>,
}

impl LocalRunner {
    pub(crate) fn new(jobs: u32, gpus: GpuPool, demands: Vec<Demand>) -> LocalRunner {
        let jobs = jobs.max(1);
        LocalRunner {
            jobs,
            cpu_free: jobs,
            gpus,
            demands,
            groupings: Vec::new(),
            waiting: Vec::new(),
            finished: VecDeque::new(),
            set: tokio::task::JoinSet::new(),
            holding: BTreeMap::new(),
        }
    }

    /// `jobs` CPU slots and the run's GPU pool (`--gpus`, `--gpu-memory`, each instance's demand).
    pub(crate) fn for_run(jobs: u32, input: &super::ExecInput, catalog: &crate::stage_kind::Catalog, opts: &super::ExecOptions) -> LocalRunner {
        let gpus = GpuPool::new(opts.gpus, opts.gpu_memory);
        LocalRunner::new(jobs, gpus, super::gpu_slots::demands(&input.instances, &input.resources, catalog))
    }

    /// Runs instances with a grouping in groups (see the module doc).
    pub(crate) fn with_fusion(mut self, groupings: Vec<Option<Grouping>>) -> LocalRunner {
        self.groupings = groupings;
        self
    }

    fn demand(&self, idx: usize) -> Demand {
        self.demands.get(idx).copied().unwrap_or_default()
    }

    /// What a fused group asks of the GPUs: a stack, its members' shares and memory
    /// estimates together, at most one device (it is one model as large as its members
    /// together); a shared-work group, what its largest member asks (it does one member's
    /// work); a group of one, what its instance asks alone.
    fn group_demand(&self, group: &[usize]) -> Demand {
        if let [one] = group {
            return self.demand(*one);
        }
        let demands: Vec<Demand> = group.iter().map(|&i| self.demand(i)).collect();
        let shared = group.iter().all(|&i| self.grouping(i).is_some_and(|g| g.how == FusionKind::SharedWork));
        if shared {
            // The largest share and the largest memory estimate, each on its own (members of
            // different stages may ask differently).
            let share = demands.iter().map(|d| d.share).max_by_key(|s| s.thousandths()).unwrap_or(GpuShare::NONE);
            let memory = demands.iter().map(|d| d.memory).try_fold(0u64, |most, m| m.map(|m| most.max(m)));
            return Demand { share, memory };
        }
        let share: u32 = demands
            .iter()
            .map(|d| match d.share {
                s if s.is_none() || s.is_fraction() => s.thousandths(),
                _ => GpuShare::WHOLE,
            })
            .sum();
        let memory = demands.iter().map(|d| d.memory).try_fold(0u64, |sum, m| m.map(|m| sum.saturating_add(m)));
        if share >= GpuShare::WHOLE {
            Demand { share: GpuShare::whole(1), memory: None }
        } else {
            Demand { share: GpuShare::from_thousandths(share), memory }
        }
    }

    fn grouping(&self, idx: usize) -> Option<&Grouping> {
        self.groupings.get(idx).and_then(Option::as_ref)
    }
}

impl Runner for LocalRunner {
    fn room(&self, idx: usize, res: &Resources, _kind: &str) -> Room {
        if !res.gpu.is_none() && self.gpus.devices() == 0 {
            return Room::Never("asks for a GPU, but --gpus is 0".into());
        }
        // A fusable instance waits in `waiting` for its group's slots.
        if self.grouping(idx).is_some() {
            return Room::Now;
        }
        if res.cpu.clamp(1, self.jobs) > self.cpu_free || (!res.gpu.is_none() && self.gpus.place(&self.demand(idx)).is_none()) {
            return Room::Later;
        }
        Room::Now
    }

    fn start(&mut self, mut job: Job, res: Resources) {
        if self.grouping(job.idx).is_some() {
            self.waiting.push((job, res));
            return;
        }
        let want_cpu = res.cpu.clamp(1, self.jobs);
        self.cpu_free -= want_cpu;
        let gpu = if res.gpu.is_none() { None } else { self.gpus.acquire(&self.demand(job.idx)) };
        job.device = gpu.as_ref().map_or(0, |g| g.device);
        let i = job.idx;
        self.holding.insert(i, (want_cpu, gpu));
        let who = vec![(i, job.label().to_string())];
        self.set.spawn_blocking(move || guarded(who, || vec![(i, job.run())]));
    }

    async fn flush(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let candidates: Vec<(usize, &Grouping)> = self.waiting.iter().filter_map(|(j, _)| self.grouping(j.idx).map(|g| (j.idx, g))).collect();
        let formed = fusion::groups(&candidates);
        let mut waiting: BTreeMap<usize, (Job, Resources)> = self.waiting.drain(..).map(|(j, r)| (j.idx, (j, r))).collect();
        for group in formed {
            let want_cpu = group.iter().filter_map(|i| waiting.get(i)).map(|(_, r)| r.cpu.clamp(1, self.jobs)).max().unwrap_or(1);
            if want_cpu > self.cpu_free {
                continue;
            }
            let on_gpu = group.iter().filter_map(|i| waiting.get(i)).any(|(_, r)| !r.gpu.is_none());
            let gpu = if on_gpu {
                match self.gpus.acquire(&self.group_demand(&group)) {
                    Some(g) => Some(g),
                    None => continue,
                }
            } else {
                None
            };
            self.cpu_free -= want_cpu;
            let device = gpu.as_ref().map_or(0, |g| g.device);
            self.holding.insert(group[0], (want_cpu, gpu));
            let mut members: Vec<Job> = group.iter().filter_map(|i| waiting.remove(i)).map(|(j, _)| j).collect();
            members.iter_mut().for_each(|j| j.device = device);
            if members.len() > 1
                && let Some(tx) = members[0].events.upgrade()
            {
                let _ = tx.send(Event::Fused { idxs: group.clone() });
            }
            let who = members.iter().map(|j| (j.idx, j.label().to_string())).collect();
            self.set.spawn_blocking(move || guarded(who, || fusion::run_group(members)));
        }
        self.waiting = waiting.into_values().collect();
    }

    fn busy(&self) -> bool {
        !self.set.is_empty() || !self.waiting.is_empty() || !self.finished.is_empty()
    }

    async fn next(&mut self) -> Finished {
        loop {
            if let Some(done) = self.finished.pop_front() {
                return Ok(done);
            }
            match self.set.join_next().await {
                None => return Err("no running instance to wait for".into()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(results)) => {
                    for (i, _) in &results {
                        if let Some((c, g)) = self.holding.remove(i) {
                            self.cpu_free += c;
                            if let Some(g) = g {
                                self.gpus.release(g);
                            }
                        }
                    }
                    self.finished.extend(results);
                }
            }
        }
    }

    async fn abandon(&mut self) -> Vec<usize> {
        self.waiting.drain(..).map(|(j, _)| j.idx).collect()
    }

    /// Blocking stage threads cannot be stopped: they are abandoned (every cache write is
    /// atomic, so nothing partial is left), and `run` returns at once.
    async fn interrupt(&mut self) {}
}

/// Runs a task's jobs so that a panic anywhere in it (claiming, publishing: the stage itself
/// is already caught by `Job::run`) becomes an error of each of its instances (`who`: index
/// and label): their slots are given back in `next` and the run goes on like after any
/// failure, instead of stopping with the slots held.
fn guarded(who: Vec<(usize, String)>, task: impl FnOnce() -> Vec<(usize, Result<Done, JobError>)>) -> Vec<(usize, Result<Done, JobError>)> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)) {
        Ok(results) => results,
        Err(panic) => {
            let why = crate::panics::message(panic.as_ref());
            who.into_iter().map(|(i, label)| (i, Err(JobError { msg: format!("{label}: camflow panicked: {why}"), log: None, cache: false, config: false }))).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fused group on a GPU asks for its members' shares and memory together, at most one
    /// device; a group of one asks what its instance asks alone.
    #[test]
    fn a_gpu_group_asks_for_its_members_together() {
        let quarter = |mb: u64| Demand { share: GpuShare::from_thousandths(250), memory: Some(mb << 20) };
        let whole = Demand { share: GpuShare::whole(1), memory: None };
        let demands = vec![quarter(100), quarter(200), quarter(300), quarter(400), quarter(500), whole];
        let r = LocalRunner::new(2, GpuPool::new(1, Some(8 << 30)), demands);
        assert_eq!(r.group_demand(&[1]), quarter(200));
        assert_eq!(r.group_demand(&[0, 1]), Demand { share: GpuShare::from_thousandths(500), memory: Some(300 << 20) });
        assert_eq!(r.group_demand(&[0, 1, 2, 3]), whole);
        assert_eq!(r.group_demand(&[0, 1, 2, 3, 4]), whole);
        assert_eq!(r.group_demand(&[0, 5]), whole);
    }

    /// A shared-work group does one member's work: it asks what its largest member asks.
    #[test]
    fn a_shared_work_group_asks_for_one_member() {
        let quarter = |mb: u64| Demand { share: GpuShare::from_thousandths(250), memory: Some(mb << 20) };
        let shared = Grouping { key: "g".into(), how: FusionKind::SharedWork, max: usize::MAX };
        let r = LocalRunner::new(2, GpuPool::new(1, Some(8 << 30)), vec![quarter(100), quarter(300), quarter(200), quarter(100), quarter(100)])
            .with_fusion(vec![Some(shared.clone()), Some(shared.clone()), Some(shared.clone()), Some(shared), None]);
        assert_eq!(r.group_demand(&[0, 1, 2]), quarter(300));
        // A group with a member that is not shared work is treated as a stack.
        assert_eq!(r.group_demand(&[0, 4]), Demand { share: GpuShare::from_thousandths(500), memory: Some(200 << 20) });
        // Share and memory are each the largest of the members', taken apart.
        let half_small = Demand { share: GpuShare::from_thousandths(500), memory: Some(100 << 20) };
        let shared = Grouping { key: "g".into(), how: FusionKind::SharedWork, max: usize::MAX };
        let r = LocalRunner::new(2, GpuPool::new(1, Some(8 << 30)), vec![half_small, quarter(4000)])
            .with_fusion(vec![Some(shared.clone()), Some(shared)]);
        assert_eq!(r.group_demand(&[0, 1]), Demand { share: GpuShare::from_thousandths(500), memory: Some(4000 << 20) });
    }

    #[test]
    fn a_panicking_task_fails_each_of_its_instances_instead_of_the_run() {
        let who = vec![(3, "retrain[a]".to_string()), (5, "retrain[b]".to_string())];
        let out = guarded(who, || panic!("publish went wrong"));
        let got: Vec<(usize, String)> = out.into_iter().map(|(i, r)| (i, r.err().map(|e| e.msg).unwrap_or_default())).collect();
        assert_eq!(
            got,
            vec![(3, "retrain[a]: camflow panicked: publish went wrong".into()), (5, "retrain[b]: camflow panicked: publish went wrong".into())]
        );
        // A task that returns is passed through untouched.
        let out = guarded(vec![(1, "x".into())], || vec![(1, Err(JobError { msg: "failed".into(), log: None, cache: true, config: false }))]);
        assert!(matches!(&out[..], [(1, Err(e))] if e.msg == "failed" && e.cache));
    }
}
