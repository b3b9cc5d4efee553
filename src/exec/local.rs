//! The local runner: each instance's [`Job`] on tokio's blocking pool, within `--jobs` CPU
//! slots and the GPU pool of `--gpus` devices (`gpu_slots`: whole devices, or fractions of one
//! packed by their memory estimates). A stage asking for more CPU slots than exist gets all of
//! them (training asks for all by default: burn already uses every core).

use std::collections::BTreeMap;

use super::gpu_slots::{Demand, GpuPool, Grant};
use super::job::Job;
use super::{Finished, Room, Runner};
use crate::stage_kind::Resources;

pub(crate) struct LocalRunner {
    jobs: u32,
    cpu_free: u32,
    gpus: GpuPool,
    /// What each instance asks of the GPUs, by instance index (none where absent).
    demands: Vec<Demand>,
    set: tokio::task::JoinSet<(usize, Result<super::Done, super::JobError>)>,
    /// CPU slots and GPU grant each running instance holds.
    holding: BTreeMap<usize, (u32, Option<Grant>)>,
}

impl LocalRunner {
    pub(crate) fn new(jobs: u32, gpus: GpuPool, demands: Vec<Demand>) -> LocalRunner {
        let jobs = jobs.max(1);
        LocalRunner { jobs, cpu_free: jobs, gpus, demands, set: tokio::task::JoinSet::new(), holding: BTreeMap::new() }
    }

    fn demand(&self, idx: usize) -> Demand {
        self.demands.get(idx).copied().unwrap_or_default()
    }
}

impl Runner for LocalRunner {
    fn room(&self, idx: usize, res: &Resources, _kind: &str) -> Room {
        if !res.gpu.is_none() && self.gpus.devices() == 0 {
            return Room::Never("asks for a GPU, but --gpus is 0".into());
        }
        if res.cpu.clamp(1, self.jobs) > self.cpu_free || (!res.gpu.is_none() && self.gpus.place(&self.demand(idx)).is_none()) {
            return Room::Later;
        }
        Room::Now
    }

    fn start(&mut self, mut job: Job, res: Resources) {
        let want_cpu = res.cpu.clamp(1, self.jobs);
        self.cpu_free -= want_cpu;
        let gpu = if res.gpu.is_none() { None } else { self.gpus.acquire(&self.demand(job.idx)) };
        job.device = gpu.as_ref().map_or(0, |g| g.device);
        let i = job.idx;
        self.holding.insert(i, (want_cpu, gpu));
        self.set.spawn_blocking(move || (i, job.run()));
    }

    async fn flush(&mut self) {}

    fn busy(&self) -> bool {
        !self.set.is_empty()
    }

    async fn next(&mut self) -> Finished {
        match self.set.join_next().await {
            None => Err("no running instance to wait for".into()),
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok((i, result))) => {
                if let Some((c, g)) = self.holding.remove(&i) {
                    self.cpu_free += c;
                    if let Some(g) = g {
                        self.gpus.release(g);
                    }
                }
                Ok((i, result))
            }
        }
    }

    /// Blocking stage threads cannot be stopped: they are abandoned (every cache write is
    /// atomic, so nothing partial is left), and `run` returns at once.
    async fn interrupt(&mut self) {}
}
