//! `camflow worker`: what a Slurm job runs on its node. It reads a job file from the cache
//! (one instance, or a list: an array task runs its own entry), checks the node's numeric
//! profile against each key's, runs each instance through the same phases as the local
//! executor and writes each outcome into the cache. It never reads the pipeline nor plans.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::{open_store, print_out};
use crate::error::{Error, Result};
use crate::exec::slurm::jobfile::{self, Status};
use crate::ml::backend::BackendKind;

#[derive(Args)]
pub struct WorkerArgs {
    /// The cache folder the job file lives in (absolute on a cluster).
    #[arg(long, value_name = "DIR")]
    cache: PathBuf,
    /// Job files written by `camflow run --executor slurm`.
    #[arg(required = true, value_name = "JOBFILE")]
    job_files: Vec<PathBuf>,
    /// Run only this task of the job file (default: $SLURM_ARRAY_TASK_ID unless --job-id is
    /// given, else all tasks).
    #[arg(long)]
    task: Option<usize>,
    /// The job id outcomes are written under (`<job>` or `<arrayjob>_<task>`, as squeue names
    /// it). The controller passes it, with --task, from the job's own variables: a plain job
    /// may have inherited another job's SLURM_ARRAY_* (see `sbatch::worker_command`).
    #[arg(long, value_name = "ID")]
    job_id: Option<String>,
}

/// This node's numeric class for a backend, as the controller computed it for the key.
fn node_class(backend: &str) -> std::result::Result<String, String> {
    let b = BackendKind::parse(backend).ok_or_else(|| format!("unknown backend `{backend}`"))?;
    if !BackendKind::compiled().contains(&b.name()) {
        return Err(format!("backend `{backend}` is not compiled into this camflow"));
    }
    if b == BackendKind::Cpu {
        crate::ml::backend::check_cpu_kernels_setting()?;
    }
    Ok(b.class())
}

/// `<jobid>` or `<arrayjobid>_<task>`, as `squeue` names the task; `local` outside Slurm.
fn job_id() -> String {
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    match (var("SLURM_ARRAY_JOB_ID"), var("SLURM_ARRAY_TASK_ID")) {
        (Some(j), Some(t)) => format!("{j}_{t}"),
        _ => var("SLURM_JOB_ID").unwrap_or_else(|| "local".into()),
    }
}

pub fn worker(a: WorkerArgs) -> Result<()> {
    // Started by a Slurm controller, which locks the cache with leases: so must every worker
    // (see `cli::run`).
    crate::cache::lock::set_mode(crate::cache::lock::Locking::Lease);
    let store = open_store(&a.cache)?;
    // Held shared like `run` holds it, so `gc` never removes this job's scratch or objects.
    let _lock = crate::cache::CacheLock::shared(&store.root).map_err(|e| Error::Io(format!("cannot lock the cache: {e}")))?;
    let given_id = a.job_id.filter(|j| !j.trim().is_empty() && j.trim() != "_");
    let task = match a.task {
        Some(t) => Some(t),
        // Told the job id, the worker is told its task too (or has none): the environment's
        // SLURM_ARRAY_TASK_ID may be the submitter's.
        None if given_id.is_some() => None,
        None => match std::env::var("SLURM_ARRAY_TASK_ID") {
            Ok(v) => Some(v.trim().parse().map_err(|_| Error::Usage(format!("SLURM_ARRAY_TASK_ID={v}: expected a whole number")))?),
            Err(_) => None,
        },
    };
    let catalog = Arc::new(crate::stages::catalog());
    let id = given_id.unwrap_or_else(job_id);
    let mut failed = 0;
    for f in &a.job_files {
        let file = jobfile::read_job_file(f).map_err(Error::Usage)?;
        let lines = jobfile::run_worker(&store, catalog.clone(), &file, task, &id, &node_class).map_err(Error::Io)?;
        for l in lines {
            let word = match l.status {
                Status::Ran => "done   ",
                Status::Reused => "reused ",
                Status::Failed => {
                    failed += 1;
                    "FAILED "
                }
            };
            print_out(&format!("{word} {} {}\n", l.label, l.message));
        }
    }
    if failed > 0 { Err(Error::StagesFailed { failed }) } else { Ok(()) }
}
