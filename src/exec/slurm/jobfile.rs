//! What a Slurm job carries, and what it leaves behind: the job file (written by the
//! controller into the cache), the worker that executes it on a node, and the outcome file
//! the worker writes back.
//!
//! A job file holds, per instance, everything [`Job`]'s three phases need and nothing more:
//! label, kind, resolved params, the cache key (so its inputs: params, upstream output
//! digests, data digests, seed, backend class), the upstream records whose objects it reads,
//! the backend. Never the pipeline, never the DAG: the worker does not plan (the complaint of
//! snakemake-executor-plugin-slurm#215 is that every job re-reads and re-plans the whole
//! workflow). It runs exactly the local phases (same key lock, second look, scratch, objects,
//! record last), so a key computed on a node is the key computed locally.
//!
//! Layout under the cache root:
//! ```text
//! slurm/jobs/<digest>.json        job files (named by the SHA-256 of their bytes)
//! slurm/outcomes/<key>.json       a worker's outcome for one key (ran, reused or failed)
//! slurm/submitted/<jobid>.json    what a controller submitted, for adoption by a rerun
//! logs/slurm/<jobid>[_<task>].out the job's stdout and stderr
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cache::store::is_digest;
use crate::cache::{ActionRecord, CacheKey, Store};
use crate::exec::job::{Done, Job};
use crate::exec::{Event, ExecInput};
use crate::stage_kind::{Catalog, Params, Resources};
use crate::sweep::Instance;

/// Bumped when the job file layout changes: a worker refuses a file of another format.
pub const JOB_FORMAT: u32 = 1;

/// One instance, as a worker runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub label: String,
    pub stage: String,
    pub kind: String,
    pub params: Params,
    pub key: CacheKey,
    /// `key.digest()`; checked by the worker.
    pub digest: String,
    /// The upstream records by input slot: their objects are the stage's inputs.
    pub upstream: BTreeMap<String, ActionRecord>,
    /// For the label's sidecar (`plan`'s reasons).
    pub pipeline: String,
    /// Absolute: relative data paths resolve against it.
    pub base_dir: PathBuf,
    pub seed: u64,
    /// `cpu` or `cuda`.
    pub backend: String,
    pub deterministic: bool,
    pub forced: bool,
}

/// A job file: tasks (one per array task, or one for a plain job), each a batch of instances
/// run one after another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFile {
    pub format: u32,
    pub tasks: Vec<Vec<JobSpec>>,
}

/// What a worker says about one key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeFile {
    /// `<jobid>` or `<arrayjobid>_<task>`, as `squeue` shows it.
    pub job: String,
    pub status: Status,
    pub seconds: f64,
    pub error: Option<String>,
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ran,
    Reused,
    Failed,
}

impl JobSpec {
    pub(crate) fn from_job(job: &Job) -> JobSpec {
        let inst = &job.input.instances[job.idx];
        let base = &job.input.base_dir;
        JobSpec {
            label: inst.label.clone(),
            stage: inst.stage.clone(),
            kind: inst.kind.clone(),
            params: (*inst.params).clone(),
            key: job.key.clone(),
            digest: job.digest.clone(),
            upstream: job.up_records.clone(),
            pipeline: job.input.pipeline.clone(),
            base_dir: std::path::absolute(base).unwrap_or_else(|_| base.clone()),
            seed: job.input.seed,
            backend: job.backend.clone(),
            deterministic: job.deterministic,
            forced: job.forced,
        }
    }

    /// The local [`Job`] for this instance: the same phases the local executor runs.
    fn to_job(&self, catalog: Arc<Catalog>, store: Store, events: &tokio::sync::mpsc::UnboundedSender<Event>) -> Job {
        let inst = Instance {
            stage: self.stage.clone(),
            kind: self.kind.clone(),
            label: self.label.clone(),
            coords: BTreeMap::new(),
            params: Arc::new(self.params.clone()),
            inputs: BTreeMap::new(),
        };
        let input = ExecInput {
            pipeline: self.pipeline.clone(),
            base_dir: self.base_dir.clone(),
            seed: self.seed,
            instances: vec![inst],
            resources: vec![Resources::default()],
            files: vec![self.key.files.clone()],
        };
        Job {
            idx: 0,
            input: Arc::new(input),
            catalog,
            store,
            key: self.key.clone(),
            digest: self.digest.clone(),
            up_records: self.upstream.clone(),
            device: 0,
            backend: self.backend.clone(),
            deterministic: self.deterministic,
            forced: self.forced,
            events: events.downgrade(),
        }
    }
}

pub fn jobs_dir(root: &Path) -> PathBuf {
    root.join("slurm").join("jobs")
}

pub fn outcome_path(root: &Path, key: &str) -> Option<PathBuf> {
    is_digest(key).then(|| root.join("slurm").join("outcomes").join(format!("{key}.json")))
}

/// Writes a job file into the cache (atomically; named by its content) and returns its path.
/// Whether `path` names a job file of the cache at `root` (`slurm/jobs/<digest>.json`), as a
/// path read from a submission record on disk must before it is removed.
pub fn is_job_file_of(root: &Path, path: &Path) -> bool {
    path.parent() == Some(jobs_dir(root).as_path())
        && path.extension().is_some_and(|x| x == "json")
        && path.file_stem().and_then(|s| s.to_str()).is_some_and(is_digest)
}

pub fn write_job_file(store: &Store, file: &JobFile) -> Result<PathBuf, String> {
    let bytes = serde_json::to_vec(file).map_err(|e| format!("job file: {e}"))?;
    let name = crate::cache::key::sha256_hex(&bytes);
    let path = jobs_dir(&store.root).join(format!("{name}.json"));
    store.write_atomic(&path, &bytes).map_err(|e| e.to_string())?;
    Ok(path)
}

pub fn read_job_file(path: &Path) -> Result<JobFile, String> {
    let bytes = match crate::cache::store::read_regular(path) {
        Ok(Some(b)) => b,
        Ok(None) => return Err(format!("{}: no such job file", path.display())),
        Err(Ok(what)) => return Err(format!("{}: {what}", path.display())),
        Err(Err(e)) => return Err(format!("{}: {e}", path.display())),
    };
    let f: JobFile = serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a camflow job file: {e}", path.display()))?;
    if f.format != JOB_FORMAT {
        return Err(format!(
            "{}: job file format {} (this camflow reads {JOB_FORMAT}); use the controller's camflow",
            path.display(),
            f.format
        ));
    }
    for spec in f.tasks.iter().flatten() {
        if !is_digest(&spec.digest) || spec.key.digest() != spec.digest {
            return Err(format!("{}: `{}`: its key does not hash to its digest (edited or damaged)", path.display(), spec.label));
        }
    }
    Ok(f)
}

/// Reads the outcome a worker wrote for `key`, if any (unreadable counts as none: the queue
/// and the record still tell).
pub fn read_outcome(root: &Path, key: &str) -> Option<OutcomeFile> {
    let p = outcome_path(root, key)?;
    let bytes = crate::cache::store::read_regular(&p).ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// One instance's result inside a worker, for its log.
#[derive(Debug)]
pub struct WorkerLine {
    pub label: String,
    pub status: Status,
    pub message: String,
}

/// The worker: runs the instances of `file` (those of array task `task`, or all), each through
/// [`Job::run`], and writes each one's outcome into the cache. `node_class(backend)` is this
/// node's numeric class for a backend name (as `BackendKind::class` gives it): an instance
/// whose key was planned for another class is refused, never computed, so no number computed
/// with other kernels is cached under the key. `job_id` names this job in outcomes.
pub fn run_worker(
    store: &Store,
    catalog: Arc<Catalog>,
    file: &JobFile,
    task: Option<usize>,
    job_id: &str,
    node_class: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Vec<WorkerLine>, String> {
    let specs: Vec<&JobSpec> = match task {
        Some(t) => {
            file.tasks.get(t).ok_or_else(|| format!("array task {t}, but the job file has {} task(s)", file.tasks.len()))?.iter().collect()
        }
        None => file.tasks.iter().flatten().collect(),
    };
    // The stage's progress events have no reader here; the channel only has to exist.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let mut lines = Vec::new();
    for spec in specs {
        let started = std::time::Instant::now();
        let (status, error, log) = match profile_mismatch(spec, node_class) {
            Some(m) => (Status::Failed, Some(format!("{}: {m}", spec.label)), None),
            None => match spec.to_job(catalog.clone(), store.clone(), &tx).run() {
                Ok(Done::Ran(..)) => (Status::Ran, None, None),
                Ok(Done::Reused(_) | Done::Cached(_)) => (Status::Reused, None, None),
                Err(e) => (Status::Failed, Some(e.msg), e.log),
            },
        };
        let outcome = OutcomeFile { job: job_id.to_string(), status, seconds: started.elapsed().as_secs_f64(), error: error.clone(), log };
        let path = outcome_path(&store.root, &spec.digest).ok_or_else(|| format!("`{}`: bad key", spec.label))?;
        let bytes = serde_json::to_vec(&outcome).map_err(|e| e.to_string())?;
        store.write_atomic(&path, &bytes).map_err(|e| format!("writing the outcome of `{}`: {e}", spec.label))?;
        lines.push(WorkerLine { label: spec.label.clone(), status, message: error.unwrap_or_default() });
    }
    Ok(lines)
}

fn profile_mismatch(spec: &JobSpec, node_class: &dyn Fn(&str) -> Result<String, String>) -> Option<String> {
    let planned = spec.key.backend.as_ref()?;
    match node_class(&spec.backend) {
        Ok(here) if &here == planned => None,
        Ok(here) => Some(format!(
            "this node's numeric profile is `{here}`, but the key was planned for `{planned}`; refusing to run \
             (its numbers would be cached under a key that promises other kernels): run it on a matching node, \
             with a camflow of the same build (`camflow --version` names its backends and GPU kernels)"
        )),
        Err(e) => Some(format!("backend `{}` cannot run on this node: {e}", spec.backend)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn spec(label: &str, value: f64) -> JobSpec {
        let key = CacheKey {
            format: crate::cache::KEY_FORMAT,
            kind: "threshold".into(),
            kind_version: 1,
            params: [("value".to_string(), json!(value))].into_iter().collect(),
            inputs: BTreeMap::new(),
            files: BTreeMap::new(),
            seed: 7,
            backend: Some("flex-x86_64-portable1".into()),
        };
        JobSpec {
            label: label.into(),
            stage: "masks".into(),
            kind: "threshold".into(),
            params: key.params.clone(),
            digest: key.digest(),
            key,
            upstream: BTreeMap::new(),
            pipeline: "p".into(),
            base_dir: "/data".into(),
            seed: 7,
            backend: "cpu".into(),
            deterministic: true,
            forced: false,
        }
    }

    #[test]
    fn only_job_files_of_the_cache_are_job_files() {
        let root = Path::new("/c");
        let d = "a".repeat(64);
        assert!(is_job_file_of(root, &jobs_dir(root).join(format!("{d}.json"))));
        for bad in ["/home/u/thesis.tex".to_string(), format!("/c/slurm/jobs/../../x/{d}.json"), format!("/c/slurm/{d}.json"), "/c/slurm/jobs/x.json".into()] {
            assert!(!is_job_file_of(root, Path::new(&bad)), "{bad}");
        }
    }

    #[test]
    fn job_file_round_trips_and_refuses_a_tampered_key() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let f = JobFile { format: JOB_FORMAT, tasks: vec![vec![spec("masks[value=0.1]", 0.1)], vec![spec("masks[value=0.3]", 0.3)]] };
        let p = write_job_file(&store, &f).unwrap();
        assert!(p.starts_with(d.path().join("slurm/jobs")));
        assert_eq!(read_job_file(&p).unwrap(), f, "bit-exact round trip (floats included)");
        let mut bad = f.clone();
        bad.tasks[1][0].key.params.insert("value".into(), json!(0.9));
        let p2 = write_job_file(&store, &bad).unwrap();
        let e = read_job_file(&p2).unwrap_err();
        assert!(e.contains("masks[value=0.3]") && e.contains("does not hash"), "{e}");
        let mut old = f;
        old.format = 99;
        let e = read_job_file(&write_job_file(&store, &old).unwrap()).unwrap_err();
        assert!(e.contains("format 99"), "{e}");
    }

    #[test]
    fn a_worker_refuses_a_node_of_another_numeric_profile_and_says_so() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let s = spec("masks[value=0.1]", 0.1);
        let f = JobFile { format: JOB_FORMAT, tasks: vec![vec![s.clone()]] };
        let other = |_: &str| Ok("flex-aarch64-portable1".to_string());
        let lines = run_worker(&store, Arc::new(crate::stages::catalog()), &f, None, "42", &other).unwrap();
        assert_eq!(lines[0].status, Status::Failed);
        assert!(lines[0].message.contains("flex-aarch64-portable1") && lines[0].message.contains("refusing"), "{}", lines[0].message);
        let o = read_outcome(d.path(), &s.digest).expect("outcome written");
        assert_eq!((o.job.as_str(), o.status), ("42", Status::Failed));
        assert!(store.load_record(&s.digest).unwrap().is_none(), "nothing cached under the key");
        assert!(run_worker(&store, Arc::new(crate::stages::catalog()), &f, Some(3), "42", &other).unwrap_err().contains("array task 3"));
    }
}
