//! One instance's work, in three phases that every way of running it shares (the local
//! executor today; a group of fused members or a cluster worker reuse the same phases):
//!
//! 1. [`Job::claim`]: take the per-key lock, look again (another process may have finished the
//!    key meanwhile: *reused*), drop a stale record, verify and resolve the input objects, and
//!    make the scratch folder.
//! 2. [`Job::run_stage`]: the stage kind's `run`, with the log and throttled progress events;
//!    a panic is caught and becomes a failure of this instance.
//! 3. [`Job::publish`]: move each output into the object store, write the log, and write the
//!    record last (so after any crash an entry is whole or absent).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::{Event, ExecInput, PROGRESS_EVERY};
use crate::cache::lock::KeyLock;
use crate::cache::store::Published;
use crate::cache::{ActionRecord, Lookup, Sidecar, Store};
use crate::stage_kind::{Catalog, InputArtifact, Outcome as StageOutcome, Progress, RunContext, StageError};

/// Keys this process published (see [`Job::found`]).
fn computed_here() -> &'static std::sync::Mutex<std::collections::HashSet<String>> {
    static SET: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> = std::sync::OnceLock::new();
    SET.get_or_init(Default::default)
}

/// What a finished job gives the executor.
pub(crate) enum Done {
    Ran(ActionRecord, f64),
    Reused(ActionRecord),
    /// Another instance of this run with the same key computed it ([`Job::found`]).
    Cached(ActionRecord),
}

/// Why a job failed; `cache` marks a cache I/O error (exit 5), not a failure of the stage.
pub(crate) struct JobError {
    pub msg: String,
    pub log: Option<PathBuf>,
    pub cache: bool,
    /// The cluster refused the job's settings (sbatch): the run exits as a configuration
    /// error (2), not as a stage failure.
    pub config: bool,
}

pub(crate) struct Job {
    pub idx: usize,
    pub input: Arc<ExecInput>,
    pub catalog: Arc<Catalog>,
    pub store: Store,
    pub key: crate::cache::CacheKey,
    pub digest: String,
    pub up_records: BTreeMap<String, ActionRecord>,
    pub device: usize,
    pub backend: String,
    pub deterministic: bool,
    pub forced: bool,
    /// Weak: a job abandoned by Ctrl-C must not keep the event channel (and so `run`) open.
    pub events: tokio::sync::mpsc::WeakUnboundedSender<Event>,
}

/// The outcome of [`Job::claim`].
pub(crate) enum Claim {
    /// Another process or instance computed the key meanwhile.
    Reused(ActionRecord),
    /// This job holds the key and runs it.
    Mine(Claimed),
}

/// A key this job holds: its lock (released on drop), verified inputs and a scratch folder.
pub(crate) struct Claimed {
    _lock: KeyLock,
    pub inputs: BTreeMap<String, InputArtifact>,
    /// Named after the key and used only under its key lock: see `Store::clean_tmp`.
    _scratch: tempfile::TempDir,
    pub out_dir: PathBuf,
}

/// What [`Job::run_stage`] gives [`Job::publish`]: the stage's result (or its panic), its log
/// lines and how long it took.
pub(crate) struct StageRun {
    pub result: std::thread::Result<Result<StageOutcome, StageError>>,
    pub log_lines: Vec<String>,
    pub seconds: f64,
}

impl Job {
    pub(crate) fn label(&self) -> &str {
        &self.input.instances[self.idx].label
    }

    fn fail(&self, m: String) -> JobError {
        JobError { msg: format!("{}: {m}", self.label()), log: None, cache: false, config: false }
    }

    fn cache_fail(&self, m: String) -> JobError {
        JobError { msg: format!("{}: {m}", self.label()), log: None, cache: true, config: false }
    }

    /// A record this job found computed: by this run (another instance with the key, alone
    /// or in another task or group), reported as cached, as the dispatcher reports a duplicate
    /// it finds before dispatching; by another process, reused. So the summary is the same
    /// whatever `--fuse` groups together.
    pub(crate) fn found(&self, rec: ActionRecord) -> Done {
        if computed_here().lock().is_ok_and(|set| set.contains(&self.digest)) { Done::Cached(rec) } else { Done::Reused(rec) }
    }

    pub(crate) fn run(&self) -> Result<Done, JobError> {
        match self.claim()? {
            Claim::Reused(rec) => Ok(self.found(rec)),
            Claim::Mine(claimed) => {
                let run = self.run_stage(&claimed);
                self.publish(claimed, run)
            }
        }
    }

    pub(crate) fn claim(&self) -> Result<Claim, JobError> {
        let lock = KeyLock::acquire(&self.store.root, &self.digest).map_err(|e| self.cache_fail(format!("cannot lock cache key: {e}")))?;
        match self.store.try_lookup(&self.digest, false).map_err(|e| self.cache_fail(format!("reading the cache: {e}")))? {
            Lookup::Fresh(rec) if !self.forced => {
                // Computed by another process or instance under the same key: this label's
                // sidecar still names the key it now has (for `plan`'s reasons).
                self.write_sidecar();
                return Ok(Claim::Reused(*rec));
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
                let p = self.store.verified_object(r).map_err(|e| self.fail(format!("input `{slot}`: {e}; rerun to recompute it")))?;
                files.insert(name.clone(), p);
            }
            inputs.insert(
                slot.clone(),
                InputArtifact { files, metrics: rec.metrics.clone(), params: rec.key_inputs.params.clone(), kind: rec.kind.clone() },
            );
        }
        let scratch = self.store.scratch_dir(&self.digest).map_err(|e| self.cache_fail(format!("cannot create scratch folder: {e}")))?;
        let out_dir = scratch.path().join("out");
        std::fs::create_dir_all(&out_dir)
            .map_err(|e| self.cache_fail(format!("cannot create scratch folder {}: {e}", out_dir.display())))?;
        Ok(Claim::Mine(Claimed { _lock: lock, inputs, _scratch: scratch, out_dir }))
    }

    pub(crate) fn run_stage(&self, claimed: &Claimed) -> StageRun {
        let inst = &self.input.instances[self.idx];
        let label = inst.label.as_str();
        let mut log_lines: Vec<String> = Vec::new();
        let started = Instant::now();
        let Some(kind) = self.catalog.get(&inst.kind) else {
            let e = StageError::new(format!("unknown kind `{}`", inst.kind));
            return StageRun { result: Ok(Err(e)), log_lines, seconds: 0.0 };
        };
        let result = {
            let mut log = |line: String| {
                tracing::info!(instance = %label, "{line}");
                log_lines.push(line);
            };
            let mut progress = self.progress_sink(started);
            let mut ctx = RunContext {
                params: &inst.params,
                inputs: &claimed.inputs,
                out_dir: &claimed.out_dir,
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
        StageRun { result, log_lines, seconds: started.elapsed().as_secs_f64() }
    }

    /// Turns a stage's progress calls into [`Event::Progress`], at most one per
    /// [`PROGRESS_EVERY`] (and the last unit always).
    pub(crate) fn progress_sink(&self, started: Instant) -> impl FnMut(Progress) + '_ {
        let mut last_sent: Option<Instant> = None;
        move |p: Progress| {
            let now = Instant::now();
            let finished = p.done >= p.total;
            if !finished && last_sent.is_some_and(|t| now.duration_since(t) < PROGRESS_EVERY) {
                return;
            }
            last_sent = Some(now);
            let spent = now.duration_since(started).as_secs_f64();
            let eta_s = (p.done > 0).then(|| spent / p.done as f64 * p.total.saturating_sub(p.done) as f64);
            if let Some(tx) = self.events.upgrade() {
                let _ = tx.send(Event::Progress { idx: self.idx, progress: p, eta_s });
            }
        }
    }

    pub(crate) fn publish(&self, claimed: Claimed, run: StageRun) -> Result<Done, JobError> {
        let inst = &self.input.instances[self.idx];
        let label = inst.label.clone();
        let log_path = self.store.log_path(&self.digest).map_err(|e| self.cache_fail(e.to_string()))?;
        let log_text = run.log_lines.join("\n") + "\n";
        let outcome = match run.result {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                let text = format!("{log_text}error: {e}\n");
                let _ = self.store.write_atomic(&log_path, text.as_bytes());
                return Err(JobError { msg: format!("{label}: {e}"), log: Some(log_path), cache: false, config: false });
            }
            Err(panic) => {
                let why = crate::panics::message(panic.as_ref());
                let _ = self.store.write_atomic(&log_path, format!("{log_text}error: stage panicked: {why}\n").as_bytes());
                return Err(JobError {
                    msg: format!("{label}: stage panicked (a bug in camflow): {why}; see the log"),
                    log: Some(log_path),
                    cache: false,
                    config: false,
                });
            }
        };
        let out_dir = &claimed.out_dir;
        let mut outputs = BTreeMap::new();
        for f in &outcome.files {
            if !out_dir.join(f).is_file() {
                return Err(self.fail(format!("the stage did not write its output `{f}`")));
            }
            let r = self.store.put_file(&out_dir.join(f)).map_err(|e| self.cache_fail(format!("storing output `{f}`: {e}")))?;
            outputs.insert(f.clone(), r);
        }
        let _ = self.store.write_atomic(&log_path, log_text.as_bytes());
        let rec = ActionRecord {
            key: self.digest.clone(),
            label,
            kind: inst.kind.clone(),
            key_inputs: self.key.clone(),
            outputs,
            metrics: outcome.metrics,
            duration_s: run.seconds,
            camflow_version: env!("CARGO_PKG_VERSION").to_string(),
            backend: self.backend.clone(),
            bitwise_deterministic: self.deterministic,
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        };
        let written = |e| self.cache_fail(format!("writing cache record: {e}"));
        // Before the record is visible: a job of this run that finds it then knows whose it is.
        if let Ok(mut set) = computed_here().lock() {
            set.insert(self.digest.clone());
        }
        if self.forced {
            // A forced rerun replaces the old record (atomically).
            self.store.write_record(&rec).map_err(written)?;
        } else if let Published::Kept(first) = self.store.publish_record(&rec).map_err(written)? {
            // Another host published this key first (a lease lost to a stalled node): the first
            // record stands, and this instance uses it like any other reuse.
            self.write_sidecar();
            return Ok(Done::Reused(*first));
        }
        self.write_sidecar();
        Ok(Done::Ran(rec, run.seconds))
    }

    /// This label's sidecar names its current key, so `plan` explains its next change.
    pub(crate) fn write_sidecar(&self) {
        write_sidecar(&self.store, &self.input.pipeline, self.label(), &self.digest, &self.key);
    }
}

/// Records that `label` now has `key` (best effort: a sidecar only feeds `plan`'s reasons).
pub(crate) fn write_sidecar(store: &Store, pipeline: &str, label: &str, digest: &str, key: &crate::cache::CacheKey) {
    let _ = store.write_sidecar(pipeline, &Sidecar { label: label.to_string(), key: digest.to_string(), key_inputs: key.clone() });
}
