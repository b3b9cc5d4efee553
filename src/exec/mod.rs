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
//! CPU-heavy work runs on tokio's blocking pool, never on the async runtime.
//!
//! # Failure and cancellation
//! Fail fast by default: after a failure nothing new starts, running work finishes. With
//! `keep_going`, independent branches go on and only dependents of the failure are skipped.
//! Ctrl-C (SIGINT) and SIGTERM (what Slurm and systemd send) stop dispatching and return at
//! once; since every cache write is atomic and the record comes last, nothing partial is left
//! behind and the next run resumes. The abandoned scratch folders are removed by the next run
//! (`Store::clean_tmp`). A forced rerun keeps the valid record until the new one replaces it,
//! so an interrupted `--force` loses nothing.
//!
//! A cache that cannot be read or written (permissions, a read-only mount, a full disk) stops
//! the run with `Outcome::Done::cache_error`: an I/O error, never a miss or a stage failure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
mod fusion;
mod job;
mod signals;

use job::{Done, Job, JobError};
use signals::Signals;

use crate::cache::{ActionRecord, Lookup, Sidecar, Store};
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
    pub keep_going: bool,
    /// Hash every object on lookup instead of trusting size and mtime.
    pub full_verify: bool,
    pub forced: BTreeSet<usize>,
    pub locked: Option<LockFile>,
    pub backend: String,
    pub backend_class: String,
    pub bitwise_deterministic: bool,
    /// The largest fused group (`exec::fusion`); 0 or 1: every instance runs alone.
    pub fuse: usize,
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
    },
    /// Stopped by a signal: 2 (SIGINT) or 15 (SIGTERM).
    Interrupted {
        signal: i32,
    },
    LockMismatch(String),
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Pending,
    Running,
    Done,
    Failed,
    Skipped,
}

pub async fn execute(
    input: ExecInput,
    catalog: Arc<Catalog>,
    store: Store,
    opts: ExecOptions,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
) -> Outcome {
    let n = input.instances.len();
    let input = Arc::new(input);
    let mut state = vec![State::Pending; n];
    let mut records: Vec<Option<ActionRecord>> = vec![None; n];
    // Key, digest and reason of a ready instance found stale, kept while it waits for slots so
    // that each pass does not rebuild its key and explain it again (it only looks again whether
    // an identical key has been recorded meanwhile).
    let mut stale: Vec<Option<(crate::cache::CacheKey, String, StaleReason)>> = vec![None; n];
    let jobs = opts.jobs.max(1);
    let (mut cpu_free, mut gpu_free): (u32, Vec<usize>) = (jobs, (0..opts.gpus as usize).rev().collect());
    let mut failed = 0usize;
    // Keys computed by this run. An instance found cached under one of them shares its key
    // with an instance that just ran: it gets its own sidecar (its last key, by label), so
    // that `plan` later explains it like the instance that ran, not as a new sweep point.
    let mut ran_here: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut stop = false;
    let mut set: tokio::task::JoinSet<Vec<(usize, Result<Done, JobError>)>> = tokio::task::JoinSet::new();
    // Ready stale instances that may fuse, with their fusion keys, gathered during one pass.
    let mut fusable: BTreeMap<usize, String> = BTreeMap::new();
    let mut holding: BTreeMap<usize, (u32, Option<usize>)> = BTreeMap::new();
    let mut cache_error: Option<String> = None;
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
                                let _ = store.write_sidecar(
                                    &input.pipeline,
                                    &Sidecar { label: inst.label.clone(), key: digest.clone(), key_inputs: key.clone() },
                                );
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
                    let _ = store.write_sidecar(
                        &input.pipeline,
                        &Sidecar { label: inst.label.clone(), key: digest.clone(), key_inputs: key.clone() },
                    );
                    records[i] = Some(*rec);
                    state[i] = State::Done;
                    stale[i] = None;
                    let _ = events.send(Event::Cached { idx: i });
                    progressed = true;
                    continue;
                }
                let res = input.resources[i];
                // Fusable: dispatched after this pass, with the others of its key (`fusion`).
                if res.gpu == 0
                    && let Some(k) = fusion::key(&catalog, inst, &opts.backend, opts.fuse)
                {
                    fusable.insert(i, k);
                    continue;
                }
                let want_cpu = res.cpu.clamp(1, jobs);
                if want_cpu > cpu_free || (res.gpu > 0 && opts.gpus > 0 && gpu_free.is_empty()) {
                    continue;
                }
                if res.gpu > 0 && opts.gpus == 0 {
                    state[i] = State::Failed;
                    failed += 1;
                    let _ =
                        events.send(Event::Failed { idx: i, error: format!("{}: asks for a GPU, but --gpus is 0", inst.label), log: None });
                    stop |= !opts.keep_going;
                    progressed = true;
                    continue;
                }
                let Some((key, digest, reason)) = stale[i].take() else { continue };
                cpu_free -= want_cpu;
                let gpu = if res.gpu > 0 { gpu_free.pop() } else { None };
                holding.insert(i, (want_cpu, gpu));
                state[i] = State::Running;
                let _ = events.send(Event::Started { idx: i, reason });
                let job = make_job(i, key, digest, gpu.unwrap_or(0), &input, &catalog, &store, &opts, &records, &events);
                set.spawn_blocking(move || vec![(i, job.run())]);
                progressed = true;
            }
            // Fused groups of this pass's fusable instances, each holding the CPU slots of
            // its largest member; a group that does not fit waits for the next pass.
            let candidates: Vec<(usize, String)> = std::mem::take(&mut fusable).into_iter().collect();
            for group in fusion::groups(&candidates, opts.fuse) {
                let want_cpu = group.iter().map(|&i| input.resources[i].cpu.clamp(1, jobs)).max().unwrap_or(1);
                if stop || want_cpu > cpu_free {
                    continue;
                }
                cpu_free -= want_cpu;
                holding.insert(group[0], (want_cpu, None));
                if group.len() > 1 {
                    let _ = events.send(Event::Fused { idxs: group.clone() });
                }
                let mut members = Vec::with_capacity(group.len());
                for &i in &group {
                    let Some((key, digest, reason)) = stale[i].take() else { continue };
                    state[i] = State::Running;
                    let _ = events.send(Event::Started { idx: i, reason });
                    members.push(make_job(i, key, digest, 0, &input, &catalog, &store, &opts, &records, &events));
                }
                set.spawn_blocking(move || fusion::run_group(members));
                progressed = true;
            }
        }
        if set.is_empty() {
            break;
        }
        tokio::select! {
            joined = set.join_next() => {
                let Some(joined) = joined else { break };
                let results = match joined {
                    Ok(x) => x,
                    Err(e) => {
                        // A panicking task: find no index; treat as a failure of the whole run.
                        let _ = events.send(Event::Failed { idx: usize::MAX, error: format!("internal error: {e}"), log: None });
                        failed += 1;
                        stop = true;
                        continue;
                    }
                };
                for (i, result) in results {
                    if let Some((c, g)) = holding.remove(&i) {
                        cpu_free += c;
                        if let Some(g) = g { gpu_free.push(g); }
                    }
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
                        Err(JobError { msg: error, log, cache }) => {
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
            }
            signal = signals.next() => {
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
    Outcome::Done { records, failed, cache_error }
}

pub fn default_jobs() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

/// One instance's job, with the records of its upstream instances.
#[allow(clippy::too_many_arguments)]
fn make_job(
    i: usize,
    key: crate::cache::CacheKey,
    digest: String,
    device: usize,
    input: &Arc<ExecInput>,
    catalog: &Arc<Catalog>,
    store: &Store,
    opts: &ExecOptions,
    records: &[Option<ActionRecord>],
    events: &tokio::sync::mpsc::UnboundedSender<Event>,
) -> Job {
    let up_records: BTreeMap<String, ActionRecord> =
        input.instances[i].inputs.iter().filter_map(|(s, &u)| records[u].clone().map(|r| (s.clone(), r))).collect();
    Job {
        idx: i,
        input: input.clone(),
        catalog: catalog.clone(),
        store: store.clone(),
        key,
        digest,
        up_records,
        device,
        backend: opts.backend.clone(),
        deterministic: opts.bitwise_deterministic,
        forced: opts.forced.contains(&i),
        events: events.downgrade(),
    }
}
