//! The executor: runs stale instances, concurrently, within resource limits, and is the
//! only writer of the cache.
//!
//! # Lifecycle of an instance
//! 1. It becomes *ready* when every upstream instance has an action record.
//! 2. Its key is built from the upstream output digests (so early cutoff is automatic).
//! 3. With `--locked`, the key must equal the lock file's; otherwise the run stops.
//! 4. A fresh record for the key means *cached*: nothing runs.
//! 5. Otherwise it waits for CPU slots (and a GPU slot with its device index), then a
//!    blocking task takes the per-key file lock, looks again (another process may have
//!    finished it meanwhile: *reused*), runs the stage into a scratch folder in the cache,
//!    moves each output into the object store, and writes the record last.
//! 6. Its dependents become ready.
//!
//! # Concurrency
//! `--jobs` CPU slots and `--gpus` GPU slots. A stage asking for more CPU slots than exist
//! gets all of them (training asks for all by default: burn already uses every core).
//! Instances asking for a fraction of a GPU share devices within their memory estimates
//! (`gpu_slots`).
//! CPU-heavy work runs on tokio's blocking pool, never on the async runtime.
//!
//! # Failure and cancellation
//! Fail fast by default: after a failure nothing new starts, running work finishes. With
//! `keep_going`, independent branches go on and only dependents of the failure are skipped.
//! Ctrl-C (SIGINT), SIGTERM (what Slurm and systemd send) and SIGHUP stop dispatching and return at
//! once; since every cache write is atomic and the record comes last, nothing partial is left
//! behind and the next run resumes. The abandoned scratch folders are removed by the next run
//! (`Store::clean_tmp`). A forced rerun keeps the valid record until the new one replaces it,
//! so an interrupted `--force` loses nothing.
//!
//! A cache that cannot be read or written (permissions, a read-only mount, a full disk) stops
//! the run with `Outcome::Done::cache_error`: an I/O error, never a miss or a stage failure.

pub mod gpu_slots;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
mod fusion;
pub use fusion::Policy as FusionPolicy;
mod job;
mod local;
mod signals;
pub mod slurm;

use job::{Done, Job, JobError};
pub(crate) use local::LocalRunner;
use signals::Signals;

use crate::cache::{ActionRecord, Lookup, Store};
use crate::lockfile::LockFile;
use crate::plan::{KeyContext, StaleReason, build_key, explain};
use crate::stage_kind::{Catalog, Progress, Resources};
use crate::sweep::Instance;

#[derive(Debug, Clone)]
pub enum Event {
    Cached {
        idx: usize,
    },
    Started {
        idx: usize,
        reason: StaleReason,
    },
    Finished {
        idx: usize,
        seconds: f64,
    },
    /// Another process computed the same key while this one waited for its lock.
    Reused {
        idx: usize,
    },
    Failed {
        idx: usize,
        error: String,
        log: Option<PathBuf>,
    },
    Skipped {
        idx: usize,
    },
    /// One `sbatch` submission (a job, or a job array of `tasks` tasks) holding `instances`.
    Submitted {
        job_id: String,
        tasks: usize,
        instances: usize,
        log: PathBuf,
    },
    /// A running instance's cluster job was found still queued or running from an earlier
    /// (or a concurrent) controller: it is waited for, not submitted again.
    Adopted {
        idx: usize,
        job_id: String,
    },
    /// A failed cluster job submitted again (`retries` of its kind).
    Retrying {
        idx: usize,
        error: String,
        attempt: u32,
    },
    /// Something the user should know that is neither a result nor an error of an instance:
    /// why a cluster job waits (held, a limit), that `squeue` fails, a job adopted with other
    /// settings than this run's, jobs cancelled after a failure.
    Note {
        text: String,
    },
    /// These instances (each also `Started`) run together as one fused group.
    Fused {
        idxs: Vec<usize>,
    },
    /// Progress inside a running instance, at most [`PROGRESS_EVERY`] apart (and the last
    /// unit always); `eta_s` extrapolates the time per unit so far.
    Progress {
        idx: usize,
        progress: Progress,
        eta_s: Option<f64>,
    },
}

/// The least time between two progress events of one instance: enough for a live line, few
/// enough that a JSON log of a long training stays small (at most ~10 lines a second).
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

pub struct ExecOptions {
    pub jobs: u32,
    pub gpus: u32,
    /// Memory of each GPU in bytes, for packing instances that share one (`gpu_slots`);
    /// `None`: no device memory is at stake (the CPU backend), only shares count.
    pub gpu_memory: Option<u64>,
    pub keep_going: bool,
    /// Hash every object on lookup instead of trusting size and mtime.
    pub full_verify: bool,
    pub forced: BTreeSet<usize>,
    pub locked: Option<LockFile>,
    pub backend: String,
    pub backend_class: String,
    pub bitwise_deterministic: bool,
    /// Which fused groups to form (`exec::fusion`).
    pub fuse: fusion::Policy,
}

pub struct ExecInput {
    pub pipeline: String,
    pub base_dir: PathBuf,
    pub seed: u64,
    pub instances: Vec<Instance>,
    pub resources: Vec<Resources>,
    pub files: Vec<BTreeMap<String, String>>,
}

#[derive(Debug)]
pub enum Outcome {
    /// `cache_error`: the first cache I/O error, which stopped the run.
    Done {
        records: Vec<Option<ActionRecord>>,
        failed: usize,
        cache_error: Option<String>,
        /// The first job the cluster refused for its settings (an invalid partition, memory
        /// no node has): the run is a configuration error.
        config_error: Option<String>,
    },
    /// Stopped by a signal: 2 (SIGINT), 15 (SIGTERM) or 1 (SIGHUP).
    Interrupted {
        signal: i32,
    },
    LockMismatch(String),
}

/// Whether a runner can take an instance now.
pub(crate) enum Room {
    Now,
    Later,
    /// Never: the instance fails with this message (a GPU asked of a run without GPUs).
    Never(String),
}

/// What a runner gives back for a finished instance; `Err` without an index is a bug (a
/// panicking task), which stops the run.
pub(crate) type Finished = Result<(usize, Result<Done, JobError>), String>;

/// The seam between the dispatch loop (readiness, keys, the second look for a key finished
/// meanwhile, failure policy, signals) and *where* an instance's [`Job`] runs: on a blocking
/// thread of this process ([`LocalRunner`]) or as a Slurm job ([`slurm::SlurmRunner`]). A
/// runner never decides what runs, only where and when there is room.
pub(crate) trait Runner {
    fn room(&self, idx: usize, res: &Resources, kind: &str) -> Room;
    /// Takes an instance the loop found room for.
    fn start(&mut self, job: Job, res: Resources);
    /// Called after each dispatch pass: hands over what `start` collected (a Slurm runner
    /// groups it into arrays and batches here).
    async fn flush(&mut self);
    /// Whether anything is started and not yet finished.
    fn busy(&self) -> bool;
    /// The next finished instance; only called while `busy`.
    async fn next(&mut self) -> Finished;
    /// SIGINT/SIGTERM: stop this runner's work (a Slurm runner cancels its jobs).
    async fn interrupt(&mut self);
    /// The run stops (a failure without `--keep-going`, a cache error): gives back the
    /// instances started but not yet running, which then never run (a Slurm runner cancels
    /// its jobs still pending). Called after every pass while the run stops.
    async fn abandon(&mut self) -> Vec<usize>;
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Pending,
    Running,
    Done,
    Failed,
    Skipped,
}

/// Runs on this machine: `--jobs` CPU slots and `--gpus` GPU slots.
pub async fn execute(
    input: ExecInput,
    catalog: Arc<Catalog>,
    store: Store,
    opts: ExecOptions,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
) -> Outcome {
    let groupings = fusion::groupings(&catalog, &input.instances, &opts.backend, opts.fuse);
    let runner = LocalRunner::for_run(opts.jobs, &input, &catalog, &opts).with_fusion(groupings);
    execute_with(input, catalog, store, opts, events, runner).await
}

pub(crate) async fn execute_with<R: Runner>(
    input: ExecInput,
    catalog: Arc<Catalog>,
    store: Store,
    opts: ExecOptions,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    mut runner: R,
) -> Outcome {
    let n = input.instances.len();
    let input = Arc::new(input);
    let mut state = vec![State::Pending; n];
    let mut records: Vec<Option<ActionRecord>> = vec![None; n];
    // Key, digest and reason of a ready instance found stale, kept while it waits for slots so
    // that each pass does not rebuild its key and explain it again (it only looks again whether
    // an identical key has been recorded meanwhile).
    let mut stale: Vec<Option<(crate::cache::CacheKey, String, StaleReason)>> = vec![None; n];
    let mut failed = 0usize;
    // Keys computed by this run. An instance found cached under one of them shares its key
    // with an instance that just ran: it gets its own sidecar (its last key, by label), so
    // that `plan` later explains it like the instance that ran, not as a new sweep point.
    let mut ran_here: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut stop = false;
    let mut cache_error: Option<String> = None;
    let mut config_error: Option<String> = None;
    // Registered now, not at the first wait, so a signal during the first dispatch is caught.
    let mut signals = Signals::register();
    loop {
        // Dispatch everything ready, in topological (index) order.
        let mut progressed = true;
        while progressed && !stop {
            progressed = false;
            for i in 0..n {
                if state[i] != State::Pending {
                    continue;
                }
                let inst = &input.instances[i];
                if inst.inputs.values().any(|&u| matches!(state[u], State::Failed | State::Skipped)) {
                    state[i] = State::Skipped;
                    let _ = events.send(Event::Skipped { idx: i });
                    progressed = true;
                    continue;
                }
                if !inst.inputs.values().all(|&u| state[u] == State::Done) {
                    continue;
                }
                if stale[i].is_none() {
                    let upstream: BTreeMap<String, String> = inst
                        .inputs
                        .iter()
                        .map(|(s, &u)| (s.clone(), records[u].as_ref().map(|r| r.output_digest()).unwrap_or_default()))
                        .collect();
                    let kcx =
                        KeyContext { catalog: &catalog, seed: input.seed, backend_class: opts.backend_class.clone(), files: &input.files };
                    let key = build_key(inst, i, &kcx, upstream);
                    let digest = key.digest();
                    // The upstream instances' results are checked first: an output that differs
                    // from the lock is the cause of every downstream key that differs.
                    if let Some(lock) = &opts.locked
                        && let Err(m) = lock.check(
                            &inst.label,
                            &key,
                            &inst.params,
                            &|p| catalog.get(&inst.kind).map_or_else(|| p.clone(), |k| k.key_params(p)),
                            &inst
                                .inputs
                                .values()
                                .filter_map(|&u| records[u].as_ref().map(|r| (input.instances[u].label.as_str(), r)))
                                .collect::<Vec<_>>(),
                        )
                    {
                        return Outcome::LockMismatch(m);
                    }
                    let lookup = if opts.forced.contains(&i) {
                        Lookup::Missing
                    } else {
                        match store.try_lookup(&digest, opts.full_verify) {
                            Ok(l) => l,
                            // Unreadable is an error, not a miss: recomputing would overwrite
                            // an entry another user of a shared cache may rely on.
                            Err(e) => {
                                let error = format!("{}: reading the cache: {e}", inst.label);
                                cache_error.get_or_insert(error.clone());
                                state[i] = State::Failed;
                                failed += 1;
                                let _ = events.send(Event::Failed { idx: i, error, log: None });
                                stop = true;
                                progressed = true;
                                continue;
                            }
                        }
                    };
                    let reason = match lookup {
                        Lookup::Fresh(rec) => {
                            if ran_here.contains(&digest) {
                                job::write_sidecar(&store, &input.pipeline, &inst.label, &digest, &key);
                            }
                            records[i] = Some(*rec);
                            state[i] = State::Done;
                            let _ = events.send(Event::Cached { idx: i });
                            progressed = true;
                            continue;
                        }
                        Lookup::Corrupt(detail) => StaleReason::EntryCorrupt { detail },
                        Lookup::Missing if opts.forced.contains(&i) => StaleReason::Forced,
                        Lookup::Missing => explain(store.read_sidecar(&input.pipeline, &inst.label).as_ref(), &key),
                    };
                    stale[i] = Some((key, digest, reason));
                } else if let Some((key, digest, _)) = &stale[i]
                    && !opts.forced.contains(&i)
                    && let Lookup::Fresh(rec) = store.lookup(digest, opts.full_verify)
                {
                    // Another instance with the same key finished while this one waited.
                    job::write_sidecar(&store, &input.pipeline, &inst.label, digest, key);
                    records[i] = Some(*rec);
                    state[i] = State::Done;
                    stale[i] = None;
                    let _ = events.send(Event::Cached { idx: i });
                    progressed = true;
                    continue;
                }
                let res = input.resources[i];
                match runner.room(i, &res, &inst.kind) {
                    Room::Now => {}
                    Room::Later => continue,
                    Room::Never(why) => {
                        state[i] = State::Failed;
                        failed += 1;
                        let _ = events.send(Event::Failed { idx: i, error: format!("{}: {why}", inst.label), log: None });
                        stop |= !opts.keep_going;
                        progressed = true;
                        continue;
                    }
                }
                let Some((key, digest, reason)) = stale[i].take() else { continue };
                state[i] = State::Running;
                let _ = events.send(Event::Started { idx: i, reason });
                let up_records: BTreeMap<String, ActionRecord> =
                    inst.inputs.iter().filter_map(|(s, &u)| records[u].clone().map(|r| (s.clone(), r))).collect();
                let job = Job {
                    idx: i,
                    input: input.clone(),
                    catalog: catalog.clone(),
                    store: store.clone(),
                    key,
                    digest,
                    up_records,
                    device: 0,
                    backend: opts.backend.clone(),
                    deterministic: opts.bitwise_deterministic,
                    forced: opts.forced.contains(&i),
                    events: events.downgrade(),
                };
                runner.start(job, res);
                progressed = true;
            }
        }
        if stop {
            // Fail fast: what was handed to the runner but has not started (a fused group
            // waiting for slots, instances not yet submitted) never starts.
            for i in runner.abandon().await {
                state[i] = State::Skipped;
                let _ = events.send(Event::Skipped { idx: i });
            }
        }
        runner.flush().await;
        if !runner.busy() {
            break;
        }
        tokio::select! {
            finished = runner.next() => {
                let (i, result) = match finished {
                    Ok(x) => x,
                    Err(e) => {
                        // A panicking task: find no index; treat as a failure of the whole run.
                        let _ = events.send(Event::Failed { idx: usize::MAX, error: format!("internal error: {e}"), log: None });
                        failed += 1;
                        stop = true;
                        continue;
                    }
                };
                match result {
                    Ok(Done::Ran(rec, secs)) => {
                        ran_here.insert(rec.key.clone());
                        records[i] = Some(rec);
                        state[i] = State::Done;
                        let _ = events.send(Event::Finished { idx: i, seconds: secs });
                    }
                    Ok(Done::Reused(rec)) => {
                        records[i] = Some(rec);
                        state[i] = State::Done;
                        let _ = events.send(Event::Reused { idx: i });
                    }
                    Ok(Done::Cached(rec)) => {
                        records[i] = Some(rec);
                        state[i] = State::Done;
                        let _ = events.send(Event::Cached { idx: i });
                    }
                    Err(JobError { msg: error, log, cache, config }) => {
                        if config {
                            config_error.get_or_insert(error.clone());
                        }
                        if cache {
                            cache_error.get_or_insert(error.clone());
                            stop = true;
                        }
                        state[i] = State::Failed;
                        failed += 1;
                        let _ = events.send(Event::Failed { idx: i, error, log });
                        if !opts.keep_going { stop = true; }
                    }
                }
            }
            signal = signals.next() => {
                runner.interrupt().await;
                return Outcome::Interrupted { signal };
            }
        }
    }
    for (i, st) in state.iter_mut().enumerate() {
        if *st == State::Pending {
            *st = State::Skipped;
            let _ = events.send(Event::Skipped { idx: i });
        }
    }
    Outcome::Done { records, failed, cache_error, config_error }
}

pub fn default_jobs() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}
