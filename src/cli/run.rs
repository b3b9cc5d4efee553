//! `camflow run` and `camflow plan`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::{PipelineArgs, Prepared, make_plan, open_store, open_store_to_read, prepare, print_out};
use crate::error::{Error, Result};
use crate::exec::{self, Event, ExecInput, ExecOptions, Outcome};
use crate::lockfile::{self, LockFile};
use crate::ml::backend::GpuKernels;
use crate::plan::Decision;
use crate::spec::{ExecutorConfig, ExecutorKind};
use crate::sweep::Instance;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    p: PipelineArgs,
    /// CPU slots shared by running instances (default: number of cores).
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    jobs: Option<u32>,
    /// GPU slots; stages with `resources: {gpu: 1}` get a device index from them, and
    /// stages with a fraction (`gpu: 0.25`) share devices. At most 1024, as a stage's `gpu`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=1024))]
    gpus: u32,
    /// Memory of each GPU (`16G`, `512M`, `24GiB`, bytes), within which instances with a
    /// fractional `resources.gpu` are packed by their memory estimates. Default: what the
    /// driver reports (CUDA, via nvidia-smi), else 4 GiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    gpu_memory: Option<u64>,
    /// After a failure, finish the branches that do not depend on it.
    #[arg(long)]
    keep_going: bool,
    /// Print the plan and run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Refuse to run if any cache key differs from the lock file, and fail if any output
    /// digest or metric differs from it (exit 4, naming the instance, output and likely cause).
    #[arg(long)]
    locked: bool,
    /// Rerun these stages (by stage name or instance label) even if cached.
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    /// Hash every cached object instead of trusting size and mtime.
    #[arg(long)]
    verify: bool,
    /// Where instances run, overriding the `executor:` block's `kind`.
    #[arg(long, value_parser = ["local", "slurm"])]
    executor: Option<String>,
    /// A YAML file with an `executor:` block; it wins over the pipeline's, field by field.
    #[arg(long, value_name = "FILE")]
    profile: Option<std::path::PathBuf>,
    /// Fusion (local executor). By default (and with 1) `gradcam` instances that differ only in
    /// `method` (same model, data, layer, target, batch size) share one pass, the same
    /// computation as each alone, and every training runs alone. N of 2 or more: also train up
    /// to N same-shaped trainings as one stacked model in one task (on the CPU a member's bytes
    /// equal the member trained alone; a CPU whose cores one training already fills gains
    /// little, GPUs are where it pays: README, "Fused training"). `off`: every instance alone.
    #[arg(long, value_name = "off|N", value_parser = parse_fuse)]
    fuse: Option<usize>,
}

/// `--fuse off` (0) or a group size of at least 1 (1: no stacks, as by default).
fn parse_fuse(s: &str) -> std::result::Result<usize, String> {
    match s {
        "off" => Ok(0),
        n => n.parse::<usize>().ok().filter(|&n| n >= 1).ok_or_else(|| format!("expected `off` or a group size of 1 or more, found `{n}`")),
    }
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    p: PipelineArgs,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Plan these stages (name or label) as forced.
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
}

/// Every `--force` value must name a stage or an instance of the pipeline: a misspelt one
/// would otherwise force nothing, and the run would reuse what the user meant to recompute.
fn check_force(p: &Prepared, force: &[String]) -> Result<()> {
    for f in force {
        if p.pipeline.stages.contains_key(f) || p.instances.iter().any(|i| &i.label == f) {
            continue;
        }
        let stages: Vec<&str> = p.pipeline.stages.keys().map(String::as_str).collect();
        let labels = p.instances.iter().map(|i| i.label.as_str());
        let hint = crate::suggest::did_you_mean(f, stages.iter().copied().chain(labels)).map(|m| format!("; did you mean `{m}`?")).unwrap_or_default();
        return Err(Error::Usage(format!("--force {f}: no such stage or instance{hint} (stages: {})", stages.join(", "))));
    }
    Ok(())
}

fn forced_fn(force: &[String]) -> impl Fn(&Instance) -> bool + '_ {
    move |i: &Instance| force.iter().any(|f| f == &i.stage || f == &i.label)
}

/// One row of `plan --json`; fields in alphabetical order, as serde_json prints a map.
#[derive(serde::Serialize)]
struct PlanRow<'a> {
    instance: &'a str,
    key: Option<&'a str>,
    kind: &'a str,
    params: &'a crate::stage_kind::Params,
    reason: String,
    stage: &'a str,
    state: &'static str,
}

#[derive(serde::Serialize)]
struct PlanJson<'a> {
    after: usize,
    cached: usize,
    instances: Vec<PlanRow<'a>>,
    pipeline: &'a str,
    run: usize,
}

/// The plan as text, or as JSON: serialized straight from the instances, so a plan of
/// 100,000 instances holds no second copy of their params (nor a JSON tree of them).
fn plan_rows(p: &Prepared, decisions: &[Decision], json: bool) -> String {
    let width = p.instances.iter().map(|i| i.label.len()).max().unwrap_or(8).min(70);
    let mut text = if json { String::new() } else { format!("{:<7} {:<width$}  {}\n", "STATE", "INSTANCE", "REASON") };
    let mut rows = Vec::new();
    let (mut run, mut after, mut cached) = (0, 0, 0);
    for (inst, d) in p.instances.iter().zip(decisions) {
        let (state, why, key) = match d {
            Decision::Cached { key, .. } => {
                cached += 1;
                ("cached", String::new(), Some(key.as_str()))
            }
            Decision::Run { key, reason } => {
                run += 1;
                ("run", reason.to_string(), Some(key.as_str()))
            }
            Decision::After { upstream } => {
                after += 1;
                ("after", format!("waits on {}", p.instances[*upstream].label), None)
            }
        };
        if json {
            rows.push(PlanRow {
                instance: &inst.label,
                key,
                kind: &inst.kind,
                params: &inst.params,
                reason: why,
                stage: &inst.stage,
                state,
            });
        } else {
            text.push_str(&format!("{state:<7} {:<width$}  {why}\n", inst.label));
        }
    }
    if json {
        let js = PlanJson { after, cached, instances: rows, pipeline: &p.pipeline.name, run };
        return serde_json::to_string_pretty(&js).unwrap_or_default() + "\n";
    }
    text.push_str(&format!("plan: {run} to run, {after} after them, {cached} cached ({} instances)\n", p.instances.len()));
    text
}

/// After the lock's path, when `--set`s of location params were given: the lock now records
/// where the data was for this run (its data digests and metrics are this data's).
fn lock_sets_note(p: &PipelineArgs) -> String {
    if p.sets.is_empty() { String::new() } else { format!(" (recording {})", p.sets.join(", ")) }
}

pub fn plan(cache: &std::path::Path, a: PlanArgs) -> Result<()> {
    let store = open_store_to_read(cache)?;
    let p = prepare(&a.p, &store)?;
    check_force(&p, &a.force)?;
    store.note_if_absent();
    let decisions = make_plan(&p, &store, false, &forced_fn(&a.force))?;
    print_out(&plan_rows(&p, &decisions, a.json));
    Ok(())
}

/// `16G`, `16GiB`, `512M`, `1.5G`, `1024K` or bytes: binary units (a GPU's "80 GB" is GiB).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("`{s}`: expected a size like 16G, 512M or 24GiB (units K, M, G, T)")),
    };
    let v: f64 = num.parse().map_err(|_| format!("`{s}`: expected a size like 16G, 512M or 24GiB"))?;
    let bytes = v * (1u64 << shift) as f64;
    if bytes.is_nan() || bytes < 1.0 {
        return Err(format!("`{s}`: a GPU's memory must be at least one byte"));
    }
    if bytes >= u64::MAX as f64 {
        return Err(format!("`{s}`: too large (at most 16 EiB)"));
    }
    Ok(bytes as u64)
}

/// A memory size in the largest binary unit that keeps it at 1 or more (`1.5 GiB`, `1.0 KiB`).
fn human_bytes(bytes: u64) -> String {
    let units = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    match units.iter().find(|(_, shift)| bytes >= 1u64 << shift) {
        Some((unit, shift)) => format!("{:.1} {unit}", bytes as f64 / (1u64 << shift) as f64),
        None => format!("{bytes} B"),
    }
}

/// Per-device memory for packing fractional GPU instances: the flag, else what the backend's
/// driver reports, else a conservative default. On the CPU backend none is at stake unless
/// given. When some instance shares a GPU, says which figure it uses and where it came from.
fn gpu_memory(p: &Prepared, flag: Option<u64>) -> Option<u64> {
    use crate::ml::backend::{self, BackendKind};
    let (bytes, from) = match (flag, p.backend) {
        (Some(b), _) => (Some(b), "--gpu-memory"),
        (None, BackendKind::Cpu) => (None, "the CPU backend puts nothing on a GPU"),
        (None, kind) => match backend::device_memory(kind) {
            Some(b) => (Some(b), "reported by the driver"),
            None => (Some(backend::DEFAULT_GPU_MEMORY), "a default: the backend cannot report it; --gpu-memory sets it"),
        },
    };
    if p.resources.iter().any(|r| r.gpu.is_fraction()) {
        let shown = bytes.map_or_else(|| "not limited".to_string(), human_bytes);
        print_out(&format!("note: instances share GPUs; memory per GPU: {shown} ({from})\n"));
        // Said, not only done: an instance estimated above a whole device runs alone on one,
        // and may still run out of memory there.
        if let Some(cap) = bytes {
            let demands = crate::exec::gpu_slots::demands(&p.instances, &p.resources, &p.catalog);
            let over: Vec<(&str, u64)> =
                p.instances.iter().zip(&demands).filter_map(|(i, d)| d.memory.filter(|&m| m > cap).map(|m| (i.label.as_str(), m))).collect();
            if let Some((label, m)) = over.first() {
                print_out(&format!(
                    "note: {} instance(s) are estimated above a GPU's memory and run alone on one, e.g. {label} (about {})\n",
                    over.len(),
                    human_bytes(*m)
                ));
            }
        }
    }
    bytes
}

pub fn run(cache: &std::path::Path, a: RunArgs) -> Result<()> {
    let started = Instant::now();
    let store = open_store(cache)?;
    let p = prepare(&a.p, &store)?;
    check_force(&p, &a.force)?;
    let executor = executor_config(&a, &p)?;
    let slurm = executor.kind == ExecutorKind::Slurm;
    if slurm {
        // The workers run on other hosts, where `flock` is node-local or emulated: the
        // controller and every worker lock the cache with leases (`cache::lock`).
        crate::cache::lock::set_mode(crate::cache::lock::Locking::Lease);
        if a.fuse.is_some_and(|n| n > 1) {
            // Never silently: a user who asked for fusion learns it did not happen.
            print_out("note: --fuse applies to the local executor; under Slurm every training runs as its own array task\n");
        }
    }
    // Held shared for the whole run, so `gc` (exclusive) never removes a scratch folder or an
    // object from under a running job; a run started during a gc waits for it.
    let _cache_lock = if a.dry_run { None } else { Some(lock_cache(&store)?) };
    let forced = forced_fn(&a.force);
    // A stage that needs a GPU with no GPU slot would never start: refuse before running
    // anything (on Slurm, GPUs are the cluster's: `--gres`).
    if !slurm && a.gpus == 0 && p.resources.iter().any(|r| !r.gpu.is_none()) {
        let decisions = make_plan(&p, &store, a.verify, &forced)?;
        let stages = crate::plan::gpu_stages_to_run(&p.instances, &p.resources, &decisions);
        if !stages.is_empty() {
            return Err(Error::Usage(format!(
                "--gpus 0, but stage(s) {} ask for a GPU (`resources: {{gpu: ...}}`) and have instances to run; \
                 give --gpus 1 or more, or remove their `resources.gpu`",
                stages.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    if a.dry_run {
        let decisions = make_plan(&p, &store, a.verify, &forced)?;
        print_out(&plan_rows(&p, &decisions, false));
        return Ok(());
    }
    let lock_path = lockfile::path_for(&a.p.pipeline);
    let writes_lock = super::sets_keep_the_lock(&a.p, &p);
    if !a.locked && writes_lock {
        // Before anything runs: a lock that cannot be written should not cost a run.
        lockfile::check_lock_target(&a.p.pipeline, &p.pipeline.name, &lock_path).map_err(Error::Usage)?;
    }
    let locked = if a.locked { Some(LockFile::read(&lock_path).map_err(Error::Usage)?) } else { None };
    if let Some(lock) = &locked {
        let header = lockfile::LockHeader {
            pipeline: &p.pipeline.name,
            seed: p.pipeline.seed,
            backend: p.backend.name(),
            deterministic: p.backend.bitwise_deterministic(),
        };
        lock.check_header(&header).map_err(|m| Error::LockMismatch(format!("{}: {m}", lock_path.display())))?;
        // Both ways, before anything runs: an instance the lock lacks would stop the run at
        // its turn, and a lock entry the spec does not produce would never be checked (a lock
        // only partly reproduced must not pass).
        const SHOWN: usize = 10;
        let labels: BTreeSet<&str> = p.instances.iter().map(|i| i.label.as_str()).collect();
        let new: Vec<&str> = labels.iter().copied().filter(|l| !lock.instances.contains_key(*l)).collect();
        let extra = lock.entries_not_in(&labels);
        let mut why: Vec<String> =
            new.iter().take(SHOWN).map(|l| format!("{l}: not in the lock file (the spec has changed since it was locked)")).collect();
        if let Some(w) = why.last_mut()
            && new.len() > SHOWN
        {
            w.push_str(&format!("\n  and {} more", new.len() - SHOWN));
        }
        if !extra.is_empty() {
            why.push(format!(
                "{}: {} locked instance(s) that the spec does not produce: {}{} (a sweep point or stage was removed or renamed \
                 since the lock was written, or the entry was added by hand); the spec does not reproduce this lock",
                lock_path.display(),
                extra.len(),
                extra.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", "),
                if extra.len() > SHOWN { format!(" and {} more", extra.len() - SHOWN) } else { String::new() }
            ));
        }
        if !why.is_empty() {
            return Err(Error::LockMismatch(why.join("\n  ")));
        }
    }
    if !p.backend.bitwise_deterministic() {
        // Which GPU kernels too: results of the other build are keyed apart (`BackendKind::class`).
        print_out(&format!(
            "note: backend `{}` is not bitwise deterministic: reruns may give slightly different numbers ({} GPU kernels: {})\n",
            p.backend.name(),
            GpuKernels::BUILT.name(),
            GpuKernels::BUILT.build()
        ));
    }
    // Nothing to run: finished without the executor (see `cli::noop`).
    if !a.locked
        && !a.verify
        && a.force.is_empty()
        && let Some(cached) = super::noop::finish_if_noop(&p, &store, &lock_path, writes_lock)?
    {
        print_out(&format!("{}\n", Counts { cached, jobs: slurm.then_some(0), ..Counts::default() }.line(started)));
        if writes_lock {
            print_out(&format!("lock: {}{}\n", lock_path.display(), lock_sets_note(&a.p)));
        }
        return Ok(());
    }
    let forced_idx: BTreeSet<usize> = p.instances.iter().enumerate().filter(|(_, i)| forced(i)).map(|(k, _)| k).collect();
    let gpu_memory = gpu_memory(&p, a.gpu_memory);
    let opts = ExecOptions {
        jobs: a.jobs.unwrap_or_else(exec::default_jobs),
        gpus: a.gpus,
        gpu_memory,
        keep_going: a.keep_going,
        full_verify: a.verify,
        forced: forced_idx,
        locked,
        backend: p.backend.name().to_string(),
        backend_class: p.backend.class(),
        bitwise_deterministic: p.backend.bitwise_deterministic(),
        fuse: exec::FusionPolicy::from_flag(a.fuse),
    };
    let labels: Vec<String> = p.instances.iter().map(|i| i.label.clone()).collect();
    let stages: Vec<String> = p.instances.iter().map(|i| i.stage.clone()).collect();
    let input = ExecInput {
        pipeline: p.pipeline.name.clone(),
        base_dir: p.pipeline.base_dir.clone(),
        seed: p.pipeline.seed,
        instances: p.instances.clone(),
        resources: p.resources.clone(),
        files: p.files.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Io(format!("tokio runtime: {e}")))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let catalog = p.catalog.clone();
    let total = labels.len() as u64;
    // The lock is written after the executor is done with its handle.
    let lock_store = store.clone();
    let local_jobs = opts.jobs;
    let outcome: std::result::Result<_, Error> = rt.block_on(async move {
        let exec = if slurm {
            let exe = std::env::current_exe().map_err(|e| Error::Io(format!("cannot find camflow's own binary for the Slurm jobs: {e}")));
            let setup = exec::slurm::SlurmSetup { config: executor, exe: exe?, local_jobs };
            tokio::spawn(exec::slurm::execute(input, catalog, store, opts, setup, tx))
        } else {
            tokio::spawn(exec::execute(input, catalog, store, opts, tx))
        };
        // JSON logs carry progress as events instead; a bar would interleave with them on stderr.
        let bar = if super::json_log() { ProgressBar::hidden() } else { ProgressBar::new(total) };
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut counts = Counts { jobs: slurm.then_some(0), ..Counts::default() };
        let mut running: BTreeSet<usize> = BTreeSet::new();
        // Latest progress of each running instance, shown after its label on the bar.
        let mut progress: BTreeMap<usize, String> = BTreeMap::new();
        let mut failures = Vec::new();
        // Instances computed (or reused) by this run: their warnings are printed at the end.
        let mut fresh: Vec<usize> = Vec::new();
        while let Some(ev) = rx.recv().await {
            match &ev {
                Event::Cached { .. } => counts.cached += 1,
                Event::Started { idx, reason } => {
                    running.insert(*idx);
                    say(&bar, format!("run     {}  ({reason})", labels[*idx]));
                }
                Event::Finished { idx, seconds } => {
                    running.remove(idx);
                    fresh.push(*idx);
                    counts.ran += 1;
                    say(&bar, format!("done    {}  {seconds:.2}s", labels[*idx]));
                }
                Event::Reused { idx } => {
                    running.remove(idx);
                    fresh.push(*idx);
                    counts.reused += 1;
                    say(&bar, format!("reused  {}  (computed by another run)", labels[*idx]));
                }
                Event::Failed { idx, error, log } => {
                    running.remove(idx);
                    counts.failed += 1;
                    let log = log.as_ref().map(|l| format!(" (log: {})", l.display())).unwrap_or_default();
                    say(&bar, format!("FAILED  {error}{log}"));
                    failures.push(error.clone());
                }
                Event::Skipped { .. } => counts.skipped += 1,
                Event::Submitted { job_id, tasks, instances, log } => {
                    *counts.jobs.get_or_insert(0) += 1;
                    let array = if *tasks > 1 { format!(" (array of {tasks} tasks)") } else { String::new() };
                    say(&bar, format!("submit  Slurm job {job_id}{array}: {instances} instance(s), log {}", log.display()));
                }
                Event::Adopted { idx, job_id } => {
                    say(&bar, format!("adopt   {}  (Slurm job {job_id}, still queued or running)", labels[*idx]));
                }
                Event::Retrying { error, attempt, .. } => {
                    say(&bar, format!("retry   {error} (resubmitted, retry {attempt})"));
                }
                Event::Note { text } => {
                    say(&bar, format!("note    {text}"));
                }
                Event::Fused { idxs } => {
                    let names: Vec<&str> = idxs.iter().map(|&i| labels[i].as_str()).collect();
                    say(&bar, format!("fused   {} instances in one task: {}", idxs.len(), names.join(", ")));
                }
                Event::Progress { idx, progress: pr, eta_s } => {
                    if super::json_log() {
                        tracing::info!(
                            target: "camflow::progress",
                            instance = %labels[*idx],
                            stage = %stages[*idx],
                            unit = pr.unit,
                            done = pr.done,
                            total = pr.total,
                            epoch = pr.epoch,
                            epochs = pr.epochs,
                            loss = pr.loss,
                            eta_s = *eta_s,
                            "progress"
                        );
                    }
                    progress.insert(*idx, progress_text(pr, *eta_s));
                }
            }
            if !matches!(
                ev,
                Event::Started { .. }
                    | Event::Progress { .. }
                    | Event::Submitted { .. }
                    | Event::Adopted { .. }
                    | Event::Retrying { .. }
                    | Event::Note { .. }
                    | Event::Fused { .. }
            ) {
                bar.inc(1);
            }
            progress.retain(|i, _| running.contains(i));
            bar.set_message(
                running
                    .iter()
                    .map(|i| match progress.get(i) {
                        Some(p) => format!("{} {p}", labels[*i]),
                        None => labels[*i].clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
        bar.finish_and_clear();
        // A panic in the executor is a bug: say so, never "interrupted".
        let outcome = exec.await.map_err(|e| e.to_string());
        Ok((outcome, counts, fresh))
    });
    // Ctrl-C returns at once; blocking stage threads are abandoned, not awaited.
    let (outcome, counts, fresh) = match outcome {
        Ok(x) => x,
        Err(e) => {
            rt.shutdown_background();
            return Err(e);
        }
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            rt.shutdown_background();
            return Err(Error::Internal(format!("the executor stopped: {e}")));
        }
    };
    match outcome {
        Outcome::Interrupted { signal } => {
            print_out(&format!("{}\n", counts.line(started)));
            rt.shutdown_background();
            Err(Error::Interrupted { signal })
        }
        Outcome::LockMismatch(m) => {
            rt.shutdown_background();
            Err(Error::LockMismatch(m))
        }
        Outcome::Done { records, failed, cache_error, config_error } => {
            rt.shutdown_background();
            print_out(&warning_lines(&fresh, &p.instances, &records));
            print_out(&format!("{}\n", counts.line(started)));
            if let Some(e) = cache_error {
                return Err(Error::Io(e));
            }
            // Each instance by its own label, whichever instance computed a shared key.
            let done: Vec<lockfile::RunEntry<'_>> = p
                .instances
                .iter()
                .zip(&records)
                .filter_map(|(i, r)| r.as_ref().map(|record| lockfile::RunEntry { label: &i.label, params: &i.params, record }))
                .collect();
            if a.locked {
                // Keys were checked as instances became ready; results are checked here, so a
                // leaf instance whose bytes differ is caught too.
                let lock = LockFile::read(&lock_path).map_err(Error::Usage)?;
                let diffs: Vec<String> = done.iter().filter_map(|e| lock.check_result(e.label, e.record).err()).collect();
                if !diffs.is_empty() {
                    return Err(Error::LockMismatch(diffs.join("\n  ")));
                }
            }
            if failed == 0 && writes_lock && !a.locked {
                let header = lockfile::LockHeader {
                    pipeline: &p.pipeline.name,
                    seed: p.pipeline.seed,
                    backend: p.backend.name(),
                    deterministic: p.backend.bitwise_deterministic(),
                };
                LockFile::write_for_run(&lock_store, &lock_path, &header, &done, counts.ran + counts.reused == 0).map_err(Error::Io)?;
                print_out(&format!("lock: {}{}\n", lock_path.display(), lock_sets_note(&a.p)));
            }
            if config_error.is_some() {
                // Exit 2: what needs fixing is the executor block or profile, not a stage.
                return Err(Error::Usage(format!(
                    "{failed} instance(s) failed; Slurm refused the settings camflow submitted (see `FAILED` above): fix the `executor:` block or the profile"
                )));
            }
            if failed > 0 {
                return Err(Error::StagesFailed { failed });
            }
            Ok(())
        }
    }
}

/// One `warn` line per warning a stage put in its metrics (`warnings: [{flag, message}]`),
/// for the instances this run computed. The core does not know what they mean: the stage
/// kinds decide what deserves one (e.g. a classifier that predicts a single class).
fn warning_lines(fresh: &[usize], instances: &[crate::sweep::Instance], records: &[Option<crate::cache::ActionRecord>]) -> String {
    let mut s = String::new();
    for &i in fresh {
        let Some(Some(rec)) = records.get(i) else { continue };
        for w in rec.metrics.get("warnings").and_then(|w| w.as_array()).into_iter().flatten() {
            let text = |k: &str| w.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            s.push_str(&format!("warn    {}  {}: {}\n", instances[i].label, text("flag"), text("message")));
            if super::json_log() {
                tracing::warn!(target: "camflow::warning", instance = %instances[i].label, flag = %text("flag"), "{}", text("message"));
            }
        }
    }
    s
}

/// Takes the cache lock shared (waiting, with a word, while a `gc` holds it), then removes the
/// scratch folders that interrupted runs left behind (those whose key lock no live run holds).
fn lock_cache(store: &crate::cache::Store) -> Result<crate::cache::CacheLock> {
    use crate::cache::CacheLock;
    let io = |e: crate::cache::StoreError| Error::Io(format!("cannot lock the cache: {e}"));
    let lock = match CacheLock::try_shared(&store.root).map_err(io)? {
        Some(l) => l,
        None => {
            print_out("waiting for `camflow gc` to finish with the cache\n");
            CacheLock::shared(&store.root).map_err(io)?
        }
    };
    let n = store.clean_tmp(crate::cache::store::GRACE);
    if n > 0 {
        tracing::info!("removed {n} abandoned scratch entries from {}", store.tmp_dir().display());
    }
    Ok(lock)
}

/// `epoch 2/5 step 3/10 loss 0.6931 eta 12s` or `64/200 images eta 3s`, for the bar.
fn progress_text(p: &crate::stage_kind::Progress, eta_s: Option<f64>) -> String {
    let mut s = match (p.epoch, p.epochs) {
        (Some(e), Some(n)) if n > 0 => {
            let per_epoch = (p.total / n).max(1);
            let step = p.done - (e.saturating_sub(1) * per_epoch).min(p.done);
            format!("epoch {e}/{n} step {step}/{per_epoch}")
        }
        _ => format!("{}/{} {}s", p.done, p.total, p.unit),
    };
    if let Some(l) = p.loss {
        s.push_str(&format!(" loss {l:.4}"));
    }
    if let Some(t) = eta_s {
        s.push_str(&format!(" eta {t:.0}s"));
    }
    s
}

/// A line above the progress bar, or plain stdout when the bar is hidden (not a terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        print_out(&(line + "\n"));
    } else {
        bar.println(line);
    }
}

#[derive(Default)]
struct Counts {
    ran: usize,
    cached: usize,
    reused: usize,
    failed: usize,
    skipped: usize,
    /// `sbatch` submissions, under Slurm only.
    jobs: Option<usize>,
}

impl Counts {
    fn line(&self, started: Instant) -> String {
        format!(
            "summary: ran={} cached={} reused={} failed={} skipped={}{} in {:.2}s",
            self.ran,
            self.cached,
            self.reused,
            self.failed,
            self.skipped,
            self.jobs.map(|j| format!(" jobs={j}")).unwrap_or_default(),
            started.elapsed().as_secs_f64()
        )
    }
}

/// The executor block: the pipeline's, a `--profile` over it field by field, `--executor`
/// over both.
fn executor_config(a: &RunArgs, p: &Prepared) -> Result<ExecutorConfig> {
    let mut spec = p.pipeline.executor.clone();
    if let Some(f) = &a.profile {
        let stages: Vec<String> = p.pipeline.stages.keys().cloned().collect();
        spec = crate::spec::executor::load_profile(f, &p.catalog, &stages)?.over(spec);
    }
    if let Some(k) = &a.executor {
        spec.kind = ExecutorKind::parse(k);
    }
    Ok(spec.resolve())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn gpu_memory_sizes_parse_in_binary_units_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_size("16G"), Ok(16 << 30));
        assert_eq!(parse_size("24GiB"), Ok(24 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "G", "16X", "-1G", "0", "1.2.3G", "0.1"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")), "{bad}: {e}");
        }
    }
}
