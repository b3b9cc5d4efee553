//! The local runner: each instance's [`Job`] on tokio's blocking pool, within `--jobs` CPU
//! slots and `--gpus` GPU slots. A stage asking for more CPU slots than exist gets all of them
//! (training asks for all by default: burn already uses every core).

use std::collections::BTreeMap;

use super::job::Job;
use super::{Finished, Room, Runner};
use crate::stage_kind::Resources;

pub(crate) struct LocalRunner {
    jobs: u32,
    gpus: u32,
    cpu_free: u32,
    gpu_free: Vec<usize>,
    set: tokio::task::JoinSet<(usize, Result<super::Done, super::JobError>)>,
    /// CPU slots and GPU index each running instance holds.
    holding: BTreeMap<usize, (u32, Option<usize>)>,
}

impl LocalRunner {
    pub(crate) fn new(jobs: u32, gpus: u32) -> LocalRunner {
        let jobs = jobs.max(1);
        LocalRunner {
            jobs,
            gpus,
            cpu_free: jobs,
            gpu_free: (0..gpus as usize).rev().collect(),
            set: tokio::task::JoinSet::new(),
            holding: BTreeMap::new(),
        }
    }
}

impl Runner for LocalRunner {
    fn room(&self, res: &Resources, _kind: &str) -> Room {
        if res.gpu > 0 && self.gpus == 0 {
            return Room::Never("asks for a GPU, but --gpus is 0".into());
        }
        if res.cpu.clamp(1, self.jobs) > self.cpu_free || (res.gpu > 0 && self.gpu_free.is_empty()) {
            return Room::Later;
        }
        Room::Now
    }

    fn start(&mut self, mut job: Job, res: Resources) {
        let want_cpu = res.cpu.clamp(1, self.jobs);
        self.cpu_free -= want_cpu;
        let gpu = if res.gpu > 0 { self.gpu_free.pop() } else { None };
        job.device = gpu.unwrap_or(0);
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
                        self.gpu_free.push(g);
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
