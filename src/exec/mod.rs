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
//! Ctrl-C (SIGINT) and SIGTERM (what Slurm and systemd send) stop dispatching and return at
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
use std::time::Instant;

use crate::cache::lock::KeyLock;
use crate::cache::{ActionRecord, Lookup, Sidecar, Store};
use crate::lockfile::LockFile;
use crate::plan::{KeyContext, StaleReason, build_key, explain};
use crate::stage_kind::{Catalog, InputArtifact, Progress, Resources, RunContext};
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

enum Done {
    Ran(ActionRecord, f64),
    Reused(ActionRecord),
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
    let mut cpu_free = jobs;
    let mut gpus = gpu_slots::GpuPool::new(opts.gpus, opts.gpu_memory);
    let gpu_demands = gpu_slots::demands(&input.instances, &input.resources, &catalog);
    let mut failed = 0usize;
    // Keys computed by this run. An instance found cached under one of them shares its key
    // with an instance that just ran: it gets its own sidecar (its last key, by label), so
    // that `plan` later explains it like the instance that ran, not as a new sweep point.
    let mut ran_here: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut stop = false;
    let mut set = tokio::task::JoinSet::new();
    let mut holding: BTreeMap<usize, (u32, Option<gpu_slots::Grant>)> = BTreeMap::new();
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
                let want_cpu = res.cpu.clamp(1, jobs);
                if want_cpu > cpu_free || (!res.gpu.is_none() && opts.gpus > 0 && gpus.place(&gpu_demands[i]).is_none()) {
                    continue;
                }
                if !res.gpu.is_none() && opts.gpus == 0 {
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
                let gpu = gpus.acquire(&gpu_demands[i]);
                let device = gpu.as_ref().map_or(0, |g| g.device);
                holding.insert(i, (want_cpu, gpu));
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
                    device,
                    backend: opts.backend.clone(),
                    deterministic: opts.bitwise_deterministic,
                    forced: opts.forced.contains(&i),
                    events: events.downgrade(),
                };
                set.spawn_blocking(move || (i, job.run()));
                progressed = true;
            }
        }
        if set.is_empty() {
            break;
        }
        tokio::select! {
            joined = set.join_next() => {
                let Some(joined) = joined else { break };
                let (i, result) = match joined {
                    Ok(x) => x,
                    Err(e) => {
                        // A panicking task: find no index; treat as a failure of the whole run.
                        let _ = events.send(Event::Failed { idx: usize::MAX, error: format!("internal error: {e}"), log: None });
                        failed += 1;
                        stop = true;
                        continue;
                    }
                };
                if let Some((c, g)) = holding.remove(&i) {
                    cpu_free += c;
                    if let Some(g) = g { gpus.release(g); }
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

/// SIGINT and SIGTERM as one stream of signal numbers.
struct Signals {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn register() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals { int: signal(SignalKind::interrupt()).ok(), term: signal(SignalKind::terminate()).ok() }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// The number of the next signal; never returns if none can be received.
    async fn next(&mut self) -> i32 {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = recv(&mut self.int) => 2,
                _ = recv(&mut self.term) => 15,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            2
        }
    }
}

/// Why a job failed; `cache` marks a cache I/O error (exit 5), not a failure of the stage.
struct JobError {
    msg: String,
    log: Option<PathBuf>,
    cache: bool,
}

struct Job {
    idx: usize,
    input: Arc<ExecInput>,
    catalog: Arc<Catalog>,
    store: Store,
    key: crate::cache::CacheKey,
    digest: String,
    up_records: BTreeMap<String, ActionRecord>,
    device: usize,
    backend: String,
    deterministic: bool,
    forced: bool,
    /// Weak: a job abandoned by Ctrl-C must not keep the event channel (and so `run`) open.
    events: tokio::sync::mpsc::WeakUnboundedSender<Event>,
}

impl Job {
    fn run(self) -> Result<Done, JobError> {
        let inst = &self.input.instances[self.idx];
        let label = inst.label.clone();
        let fail = |m: String| JobError { msg: format!("{label}: {m}"), log: None, cache: false };
        let cache_fail = |m: String| JobError { msg: format!("{label}: {m}"), log: None, cache: true };
        let _lock = KeyLock::acquire(&self.store.root, &self.digest).map_err(|e| cache_fail(format!("cannot lock cache key: {e}")))?;
        match self.store.try_lookup(&self.digest, false).map_err(|e| cache_fail(format!("reading the cache: {e}")))? {
            Lookup::Fresh(rec) if !self.forced => {
                // Computed by another process or instance under the same key: this label's
                // sidecar still names the key it now has (for `plan`'s reasons).
                let _ = self.store.write_sidecar(
                    &self.input.pipeline,
                    &Sidecar { label: label.clone(), key: self.digest.clone(), key_inputs: self.key.clone() },
                );
                return Ok(Done::Reused(*rec));
            }
            // A forced rerun keeps the valid record until the new one replaces it (atomically):
            // interrupted, the old result stays.
            Lookup::Fresh(_) => {}
            // A stale or corrupt record must never look fresh if this run is interrupted.
            Lookup::Missing | Lookup::Corrupt(_) => self.store.invalidate(&self.digest),
        }
        let mut inputs = BTreeMap::new();
        for (slot, rec) in &self.up_records {
            let mut files = BTreeMap::new();
            for (name, r) in &rec.outputs {
                let p = self.store.verified_object(r).map_err(|e| fail(format!("input `{slot}`: {e}; rerun to recompute it")))?;
                files.insert(name.clone(), p);
            }
            inputs.insert(
                slot.clone(),
                InputArtifact { files, metrics: rec.metrics.clone(), params: rec.key_inputs.params.clone(), kind: rec.kind.clone() },
            );
        }
        // Named after the key and used only under its key lock: see `Store::clean_tmp`.
        let scratch = self.store.scratch_dir(&self.digest).map_err(|e| cache_fail(format!("cannot create scratch folder: {e}")))?;
        let out_dir = scratch.path().join("out");
        std::fs::create_dir_all(&out_dir).map_err(|e| cache_fail(format!("cannot create scratch folder {}: {e}", out_dir.display())))?;
        let mut log_lines: Vec<String> = Vec::new();
        let kind = self.catalog.get(&inst.kind).ok_or_else(|| fail(format!("unknown kind `{}`", inst.kind)))?;
        let started = Instant::now();
        let result = {
            let mut log = |line: String| {
                tracing::info!(instance = %label, "{line}");
                log_lines.push(line);
            };
            let (idx, events) = (self.idx, &self.events);
            let mut last_sent: Option<Instant> = None;
            let mut progress = |p: Progress| {
                let now = Instant::now();
                let finished = p.done >= p.total;
                if !finished && last_sent.is_some_and(|t| now.duration_since(t) < PROGRESS_EVERY) {
                    return;
                }
                last_sent = Some(now);
                let spent = now.duration_since(started).as_secs_f64();
                let eta_s = (p.done > 0).then(|| spent / p.done as f64 * p.total.saturating_sub(p.done) as f64);
                if let Some(tx) = events.upgrade() {
                    let _ = tx.send(Event::Progress { idx, progress: p, eta_s });
                }
            };
            let mut ctx = RunContext {
                params: &inst.params,
                inputs: &inputs,
                out_dir: &out_dir,
                base_dir: &self.input.base_dir,
                seed: self.input.seed,
                backend: &self.backend,
                device: self.device,
                planned_data: &self.key.files,
                log: &mut log,
                progress: &mut progress,
            };
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kind.run(&mut ctx)))
        };
        let seconds = started.elapsed().as_secs_f64();
        let log_path = self.store.log_path(&self.digest).map_err(|e| cache_fail(e.to_string()))?;
        let log_text = log_lines.join("\n") + "\n";
        let outcome = match result {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                let text = format!("{log_text}error: {e}\n");
                let _ = self.store.write_atomic(&log_path, text.as_bytes());
                return Err(JobError { msg: format!("{label}: {e}"), log: Some(log_path), cache: false });
            }
            Err(_) => {
                let _ = self.store.write_atomic(&log_path, format!("{log_text}error: stage panicked\n").as_bytes());
                return Err(JobError {
                    msg: format!("{label}: stage panicked (a bug in camflow); see the log"),
                    log: Some(log_path),
                    cache: false,
                });
            }
        };
        let mut outputs = BTreeMap::new();
        for f in &outcome.files {
            if !out_dir.join(f).is_file() {
                return Err(fail(format!("the stage did not write its output `{f}`")));
            }
            let r = self.store.put_file(&out_dir.join(f)).map_err(|e| cache_fail(format!("storing output `{f}`: {e}")))?;
            outputs.insert(f.clone(), r);
        }
        let _ = self.store.write_atomic(&log_path, log_text.as_bytes());
        let rec = ActionRecord {
            key: self.digest.clone(),
            label: label.clone(),
            kind: inst.kind.clone(),
            key_inputs: self.key.clone(),
            outputs,
            metrics: outcome.metrics,
            duration_s: seconds,
            camflow_version: env!("CARGO_PKG_VERSION").to_string(),
            backend: self.backend.clone(),
            bitwise_deterministic: self.deterministic,
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        };
        self.store.write_record(&rec).map_err(|e| cache_fail(format!("writing cache record: {e}")))?;
        let _ = self
            .store
            .write_sidecar(&self.input.pipeline, &Sidecar { label: label.clone(), key: self.digest.clone(), key_inputs: self.key.clone() });
        Ok(Done::Ran(rec, seconds))
    }
}

pub fn default_jobs() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}
