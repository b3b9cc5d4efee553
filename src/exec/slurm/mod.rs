//! The Slurm runner: the controller's side of `run --executor slurm`.
//!
//! The dispatch loop (`exec::execute_with`) plans and decides exactly as it does locally; this
//! runner only decides *where*: each started instance is queued, and after each dispatch pass
//! the queue is grouped by stage into `sbatch --parsable` submissions: one job array for a
//! stage with several ready tasks (`arrays: true`), each task a batch of up to `batch[kind]`
//! instances. A job runs `camflow worker` on a job file in the cache ([`jobfile`]), which
//! executes the same phases as the local executor and writes an outcome per key.
//!
//! Outcomes are learnt from the cache (outcome files and records) and the queue: `squeue`
//! each poll (back-off from `poll.min_s` to `poll.max_s`, reset by any progress), and for a
//! task gone from the queue without an outcome, its final state from `scontrol show job`
//! (`sacct` when scontrol has forgotten it and accounting works). Such a failure names the
//! Slurm state, the job id and the log path; `retries` of its kind resubmit it (never a job
//! that was cancelled).
//!
//! Adoption: every submission is recorded (`slurm/submitted/<jobid>.json`, atomically, with
//! the keys of each task and the controller's host and pid). A controller that finds a key it
//! is about to submit in a task still queued or running waits for that task instead: a rerun
//! after a crash or a kill submits nothing twice, and two controllers on one cache do not
//! submit one key twice (if they race anyway, the worker's key lock and second look turn the
//! second job into a reuse). SIGINT/SIGTERM cancel (`scancel`) the jobs this controller
//! submitted, and those it adopted from a dead controller on this host; not those of a live
//! controller, which is still waiting on them.
//!
//! Kinds in `on_controller` run here, on a [`LocalRunner`] with `--jobs` CPU slots.

pub mod jobfile;
pub mod sbatch;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::job::{Done, Job, JobError};
use super::{Event, Finished, LocalRunner, Room, Runner};
use crate::cache::{Lookup, Store};
use crate::host::Process;
use crate::spec::ExecutorConfig;
use crate::stage_kind::Resources;
use jobfile::{JOB_FORMAT, JobFile, JobSpec, Status};
use sbatch::Submission;

/// What the controller needs besides the executor block.
pub struct SlurmSetup {
    pub config: ExecutorConfig,
    /// The camflow binary jobs run (the controller's own, by absolute path).
    pub exe: PathBuf,
    /// CPU slots for `on_controller` kinds.
    pub local_jobs: u32,
}

/// `slurm/submitted/<jobid>.json`: one `sbatch` call.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SubmissionRecord {
    job_id: String,
    array: bool,
    /// Keys per task.
    tasks: Vec<Vec<String>>,
    /// The controller that submitted it (host, boot, pid, start time; older records have no
    /// boot or start time, and their controller cannot be judged).
    #[serde(flatten)]
    submitter: Process,
    job_file: PathBuf,
    /// What the job asks of the cluster ([`sbatch::request_args`]): a rerun adopts the job
    /// silently only if it would ask the same. Records of older camflows have none.
    #[serde(default)]
    sbatch_args: Vec<String>,
}

impl SubmissionRecord {
    fn task_id(&self, t: usize) -> String {
        if self.array { format!("{}_{t}", self.job_id) } else { self.job_id.clone() }
    }
}

struct Member {
    job: Job,
    res: Resources,
    attempts: u32,
    /// Waited on in a live controller's job: its result is that controller's, a reuse here.
    theirs: bool,
}

/// A job (or one array task) this controller waits on.
struct Task {
    job_id: String,
    log: PathBuf,
    members: Vec<Member>,
    /// What the job asks of the cluster ([`sbatch::request_args`]); empty when unknown (a job
    /// adopted from a record of an older camflow).
    request: Vec<String>,
    /// When this controller first saw the task pending, and the last wait it told the user
    /// about (a reason, or `queue` for the usual waits): each wait is told once.
    pending_since: Option<Instant>,
    told: Option<String>,
}

impl Task {
    fn new(job_id: String, log: PathBuf, members: Vec<Member>, request: Vec<String>) -> Task {
        Task { job_id, log, members, request, pending_since: None, told: None }
    }
}

/// How long a task may wait in the queue for the usual reasons (priority, resources) before
/// the controller says so: a busy queue is normal, silence for an hour is not.
const QUIET_PENDING: Duration = Duration::from_secs(60);

/// Queue states in which a task has not started and `%r` says why.
fn not_started(state: &str) -> bool {
    state == "PENDING" || state.ends_with("_HOLD")
}

/// A submission this controller knows: its record file, and whether interrupting this
/// controller cancels it.
struct Known {
    record: PathBuf,
    job_file: PathBuf,
    cancel_on_interrupt: bool,
}

pub(crate) struct SlurmRunner {
    cfg: ExecutorConfig,
    exe: PathBuf,
    /// Absolute: jobs run in another working directory, maybe on another host.
    root: PathBuf,
    store: Store,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    local: LocalRunner,
    queued: Vec<Member>,
    /// By task id (`123`, `123_4`).
    tasks: HashMap<String, Task>,
    ready: VecDeque<Finished>,
    interval: Duration,
    known: BTreeMap<String, Known>,
    /// Keys of submissions recorded by other (or earlier) controllers -> (task id, record).
    index: HashMap<String, (String, usize)>,
    others: Vec<(SubmissionRecord, PathBuf)>,
    index_stamp: Option<std::time::SystemTime>,
    /// This controller, as submission records name it.
    me: Process,
    max_array: Option<usize>,
    /// Queued members per kind (see `queued_jobs`).
    queued_by_kind: HashMap<String, usize>,
    /// Since when `squeue` has failed in a row (none while it answers), and the messages
    /// already told (each distinct one once).
    squeue_failing: Option<Instant>,
    squeue_told: HashSet<String>,
    /// `squeue -u <uid>` instead of `--me`, which Slurm before 20.11 does not know.
    squeue_by_uid: bool,
    /// The run stops (a failure without `--keep-going`): no retries, pending jobs cancelled.
    stopping: bool,
    /// The most tasks kept queued and running at once, learnt when Slurm refused a submission
    /// for a limit on the jobs a user may have queued (`MaxSubmitJobs`); lowered by each such
    /// refusal, never raised within a run (the limit may count the user's other jobs too).
    submit_room: Option<usize>,
    /// Tasks of this controller's jobs that the last `squeue` still listed though their
    /// results are in (a job ending, `COMPLETING`): Slurm still counts them against such a
    /// limit ([`SlurmRunner::in_flight`]).
    lingering: usize,
}

/// Runs a Slurm command off the async runtime; `Err` with what it printed when it fails.
async fn slurm_cmd(program: &str, args: Vec<String>) -> Result<String, String> {
    let prog = program.to_string();
    let out = tokio::task::spawn_blocking(move || {
        let mut c = Command::new(&prog);
        for v in sbatch::SUBMITTER_ONLY_VARS {
            c.env_remove(v);
        }
        c.args(&args).output()
    })
    .await
    .map_err(|e| e.to_string())?;
    match out {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(sbatch::command_error(program, &String::from_utf8_lossy(&o.stderr), &String::from_utf8_lossy(&o.stdout))),
        Err(e) => Err(format!("{program}: {e} (is Slurm's `{program}` on PATH?)")),
    }
}

impl SlurmRunner {
    /// `local` runs the `on_controller` kinds on this machine (with `--jobs` and `--gpus`).
    pub(crate) fn new(
        setup: SlurmSetup,
        local: LocalRunner,
        store: Store,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
    ) -> SlurmRunner {
        let root = std::path::absolute(&store.root).unwrap_or_else(|_| store.root.clone());
        let interval = Duration::from_secs_f64(setup.config.poll_min_s);
        let mut r = SlurmRunner {
            cfg: setup.config,
            exe: setup.exe,
            root,
            store,
            events,
            local,
            queued: Vec::new(),
            tasks: HashMap::new(),
            ready: VecDeque::new(),
            interval,
            known: BTreeMap::new(),
            index: HashMap::new(),
            others: Vec::new(),
            index_stamp: None,
            me: Process::me(),
            max_array: None,
            queued_by_kind: HashMap::new(),
            squeue_failing: None,
            squeue_told: HashSet::new(),
            squeue_by_uid: false,
            stopping: false,
            submit_room: None,
            lingering: 0,
        };
        r.load_index();
        r
    }

    fn submitted_dir(&self) -> PathBuf {
        self.root.join("slurm").join("submitted")
    }

    /// (Re)reads the submission records of other controllers when the folder changed.
    fn load_index(&mut self) {
        let dir = self.submitted_dir();
        let stamp = std::fs::symlink_metadata(&dir).and_then(|m| m.modified()).ok();
        if stamp.is_none() || stamp == self.index_stamp {
            return;
        }
        self.index_stamp = stamp;
        self.index.clear();
        self.others.clear();
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            let Some(id) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
            if self.known.contains_key(&id) || path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Ok(Some(bytes)) = crate::cache::store::read_regular(&path) else { continue };
            let Ok(rec) = serde_json::from_slice::<SubmissionRecord>(&bytes) else { continue };
            // The record's job file is removed once its job is gone: it must be a job file of
            // this cache, whatever the record on disk says.
            if rec.job_id != id || sbatch::parse_sbatch_id(&rec.job_id).is_none() || !jobfile::is_job_file_of(&self.root, &rec.job_file) {
                continue;
            }
            let n = self.others.len();
            for (t, keys) in rec.tasks.iter().enumerate() {
                for k in keys {
                    self.index.insert(k.clone(), (rec.task_id(t), n));
                }
            }
            self.others.push((rec, path));
        }
    }

    /// This user's tasks in the queue; `Err` with what squeue printed when it fails.
    async fn squeue(&mut self) -> Result<HashMap<String, sbatch::Queued>, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        let first = slurm_cmd("squeue", sbatch::squeue_args(self.squeue_by_uid.then_some(uid))).await;
        let text = match first {
            Err(e) if !self.squeue_by_uid && e.contains("--me") => {
                // Slurm < 20.11: "unrecognized option '--me'"; `-u <uid>` means the same.
                self.squeue_by_uid = true;
                slurm_cmd("squeue", sbatch::squeue_args(Some(uid))).await?
            }
            other => other?,
        };
        Ok(sbatch::parse_squeue(&text))
    }

    /// `squeue` failed (`error`): told once per distinct message; after `poll.give_up_s` of
    /// failures in a row, the tasks still waited on are failed (and cancelled if `scancel`
    /// works): without the queue, a job that ends without an outcome (cancelled, killed,
    /// never started) would be waited for for ever.
    async fn squeue_failed(&mut self, error: String) {
        let since = *self.squeue_failing.get_or_insert_with(Instant::now);
        let give_up = Duration::from_secs_f64(self.cfg.poll_give_up_s);
        if self.squeue_told.insert(error.clone()) {
            let text = format!(
                "squeue fails: {error}; camflow keeps polling (results its jobs write to the cache still count) and gives up on its \
                 Slurm jobs after {}s of failures in a row (executor.poll.give_up_s)",
                give_up.as_secs()
            );
            let _ = self.events.send(Event::Note { text });
        }
        if since.elapsed() < give_up || self.tasks.is_empty() {
            return;
        }
        // Not given up on: a task whose members' results are in the cache already (the
        // outcomes, read after this, settle it), nor another live controller's job (its to
        // cancel; this run waits for its results like any result in the cache).
        let done = |t: &Task| t.members.iter().all(|m| matches!(self.store.lookup(&m.job.digest, false), Lookup::Fresh(_)));
        let ids: Vec<String> =
            self.tasks.iter().filter(|(_, t)| !done(t) && !t.members.iter().any(|m| m.theirs)).map(|(id, _)| id.clone()).collect();
        if ids.is_empty() {
            return;
        }
        let cancelled = match slurm_cmd("scancel", ids.clone()).await {
            Ok(_) => "camflow cancelled it".to_string(),
            Err(e) => format!("cancelling it failed too ({e}): it may still run (`scancel {}`)", ids.join(" ")),
        };
        for id in ids {
            let Some(task) = self.tasks.remove(&id) else { continue };
            for m in task.members {
                let label = &m.job.input.instances[m.job.idx].label;
                let msg = format!(
                    "{label}: Slurm job {id}: squeue has failed for {}s in a row ({error}), so camflow cannot tell whether the job still runs; {cancelled}",
                    since.elapsed().as_secs()
                );
                self.ready.push_back(Ok((m.job.idx, Err(JobError { msg, log: Some(task.log.clone()), cache: false, config: false }))));
            }
        }
    }

    /// Waits on tasks of other controllers' live submissions instead of submitting their keys.
    async fn adopt(&mut self) {
        self.load_index();
        if !self.queued.iter().any(|m| self.index.contains_key(&m.job.digest)) {
            return;
        }
        let Ok(queue) = self.squeue().await else { return };
        let queued = std::mem::take(&mut self.queued);
        // Pending tasks of gone controllers that asked for something else: cancelled, their
        // keys submitted again with this run's settings.
        let mut replace: Vec<String> = Vec::new();
        let mut told: HashSet<String> = HashSet::new();
        for m in queued {
            let Some((task_id, n)) = self.index.get(&m.job.digest).cloned().filter(|(t, _)| queue.contains_key(t)) else {
                self.queued.push(m);
                continue;
            };
            if replace.contains(&task_id) {
                self.queued.push(m);
                continue;
            }
            let inst = &m.job.input.instances[m.job.idx];
            let now_asks = request_for(&self.cfg, &inst.stage, &inst.kind, &m.res);
            let stage = inst.stage.clone();
            let (rec, path) = &self.others[n];
            let job_id = rec.job_id.clone();
            // Ours to cancel on Ctrl-C: submitted by this process, or by a controller of this
            // host that is gone (a reused pid is another process). Another host's or
            // container's controller may be alive: its jobs are left to it.
            let mine = rec.submitter == self.me || rec.submitter.alive_seen_from(&self.me) == Some(false);
            // A rerun is often meant to fix the request (a time over the partition's limit, too
            // little memory): adopting the old job would keep the old request. A job not yet
            // started of a gone controller is replaced; a running one (cancelling it loses its
            // work) or a live controller's is adopted, and the difference told.
            let difference = if rec.sbatch_args.is_empty() { None } else { sbatch::request_difference(&rec.sbatch_args, &now_asks) };
            if let Some(d) = &difference {
                let pending = queue.get(&task_id).is_some_and(|q| not_started(&q.state));
                if mine && pending {
                    let text = format!(
                        "Slurm job {task_id} ({stage}) of a controller that is gone asked for other settings: {d}; cancelling it and submitting again with this run's"
                    );
                    let _ = self.events.send(Event::Note { text });
                    replace.push(task_id);
                    self.queued.push(m);
                    continue;
                }
                if told.insert(task_id.clone()) {
                    let whose = if mine { "it is already running" } else { "another live controller waits on it" };
                    let text = format!(
                        "adopting Slurm job {task_id} ({stage}), submitted with other settings than this run's: {d}; {whose}, so it keeps them (`scancel {task_id}` and rerun to apply this run's)"
                    );
                    let _ = self.events.send(Event::Note { text });
                }
            }
            let request = rec.sbatch_args.clone();
            self.known.entry(job_id.clone()).or_insert_with(|| Known {
                record: path.clone(),
                job_file: rec.job_file.clone(),
                cancel_on_interrupt: mine,
            });
            let _ = self.events.send(Event::Adopted { idx: m.job.idx, job_id: task_id.clone() });
            let m = Member { theirs: !mine, ..m };
            let log = self.log_path(&task_id);
            self.tasks.entry(task_id).or_insert_with(|| Task::new(job_id, log, Vec::new(), request)).members.push(m);
        }
        if !replace.is_empty()
            && let Err(e) = slurm_cmd("scancel", replace.clone()).await
        {
            // The keys are submitted anyway: if the old job runs after all, the worker's key
            // lock and second look make one of the two a reuse.
            let _ = self.events.send(Event::Note { text: format!("cancelling Slurm job {} failed: {e}", replace.join(" ")) });
        }
    }

    /// Removes the job file at `path` unless a job this controller knows, or another
    /// controller's recorded job (only those still in the queue, when `alive` is given), reads
    /// it. Job files are named by their content, so a resubmission of the same tasks shares one.
    fn remove_job_file_unless_used(&self, path: &Path, alive: Option<&HashSet<&str>>) {
        let used = self.known.values().any(|k| k.job_file == path)
            || self.others.iter().any(|(o, _)| o.job_file == path && alive.is_none_or(|a| a.contains(o.job_id.as_str())));
        if !used {
            let _ = std::fs::remove_file(path);
        }
    }

    fn log_dir(&self) -> PathBuf {
        self.root.join("logs").join("slurm")
    }

    fn log_path(&self, task_id: &str) -> PathBuf {
        self.log_dir().join(format!("{task_id}.out"))
    }

    /// One `sbatch`: `tasks` as a job array (`array`) or a single job of one task.
    async fn submit(&mut self, stage: &str, tasks: Vec<Vec<Member>>, array: bool) {
        let first = &tasks[0][0];
        let kind = first.job.input.instances[first.job.idx].kind.clone();
        let res = first.res;
        let settings = self.cfg.settings(stage, &kind);
        // A stale outcome (an earlier attempt's) must not be read as this job's.
        for m in tasks.iter().flatten() {
            if let Some(p) = jobfile::outcome_path(&self.root, &m.job.digest) {
                let _ = std::fs::remove_file(p);
            }
        }
        let file =
            JobFile { format: JOB_FORMAT, tasks: tasks.iter().map(|t| t.iter().map(|m| JobSpec::from_job(&m.job)).collect()).collect() };
        let fail_all = |me: &mut SlurmRunner, tasks: Vec<Vec<Member>>, msg: &str, config: bool| {
            for m in tasks.into_iter().flatten() {
                let label = &m.job.input.instances[m.job.idx].label;
                me.ready.push_back(Ok((m.job.idx, Err(JobError { msg: format!("{label}: {msg}"), log: None, cache: false, config }))));
            }
        };
        let job_file = match jobfile::write_job_file(&self.store, &file) {
            Ok(p) => p,
            Err(e) => return fail_all(self, tasks, &format!("writing the job file: {e}"), false),
        };
        if let Err(e) = std::fs::create_dir_all(self.log_dir()) {
            return fail_all(self, tasks, &format!("creating {}: {e}", self.log_dir().display()), false);
        }
        let pattern = sbatch::filename_pattern(&self.log_dir().to_string_lossy(), if array { "%A_%a.out" } else { "%j.out" });
        let command = sbatch::worker_command(&self.exe.to_string_lossy(), &self.root.to_string_lossy(), &job_file.to_string_lossy(), array);
        let sub = Submission {
            stage,
            res: &res,
            settings: &settings,
            log_pattern: &pattern,
            array: array.then_some(tasks.len()),
            command: &command,
        };
        let args = sbatch::sbatch_args(&self.cfg, &sub);
        let request = sbatch::request_args(&args);
        tracing::debug!("sbatch {}", args.join(" "));
        let mut wait = sbatch::SBATCH_FIRST_WAIT;
        let mut tries = 1;
        // A limit on the jobs queued at once can be waited out while this run's own jobs hold
        // it (they end) or the refused array can be smaller; with neither, it is a refusal.
        let limit_clears = self.in_flight() > 0 || tasks.len() > 1;
        let submitted = loop {
            match slurm_cmd("sbatch", args.clone()).await {
                Ok(o) => break sbatch::parse_sbatch_id(&o).ok_or_else(|| (format!("sbatch printed no job id: {o}"), false)),
                Err(e) if sbatch::maybe_submit_limit(&e) && limit_clears => {
                    // After a passing failure the first call may have made a job after all
                    // (then this refusal is its doing): its job file stays.
                    if tries == 1 {
                        self.remove_job_file_unless_used(&job_file, None);
                    }
                    return self.hold_back(stage, tasks, &e);
                }
                Err(e) if sbatch::transient(&e) && tries < sbatch::SBATCH_TRIES => {
                    // A busy or restarting slurmctld; the submission may be tried again (if
                    // the failed call did create a job, the worker's key lock and second look
                    // make the second one a reuse).
                    let text = format!(
                        "sbatch failed ({e}); trying again in {}s ({} of {} tries)",
                        wait.as_secs(),
                        tries + 1,
                        sbatch::SBATCH_TRIES
                    );
                    let _ = self.events.send(Event::Note { text });
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    tries += 1;
                }
                Err(e) if sbatch::transient(&e) => break Err((format!("submitting to Slurm failed {tries} times: {e}"), false)),
                Err(e) => {
                    let limit = if sbatch::maybe_submit_limit(&e) {
                        " (no other job of this run was queued or running: if the limit is on the jobs you may have queued at once, \
                         jobs of yours outside this run fill it, see `squeue --me`; else the job's own request is over a per-job limit)"
                    } else {
                        ""
                    };
                    let msg = format!(
                        "Slurm refused the job of stage `{stage}` (kind `{kind}`): {e}{limit}; camflow asked: {}; check `executor.partition`, `account`, `qos`, `sbatch` and `executor.kinds.{kind}` (or `kinds.{stage}`): `time`, `mem`, `sbatch`",
                        request.join(" ")
                    );
                    break Err((msg, true));
                }
            }
        };
        let job_id = match submitted {
            Ok(id) => id,
            Err((msg, config)) => {
                // No job will read it (a job file is content-addressed: another submission of
                // the same tasks may still use it).
                self.remove_job_file_unless_used(&job_file, None);
                return fail_all(self, tasks, &msg, config);
            }
        };
        let rec = SubmissionRecord {
            job_id: job_id.clone(),
            array,
            tasks: tasks.iter().map(|t| t.iter().map(|m| m.job.digest.clone()).collect()).collect(),
            submitter: self.me.clone(),
            job_file: job_file.clone(),
            sbatch_args: request.clone(),
        };
        let record = self.submitted_dir().join(format!("{job_id}.json"));
        // Not fatal: without the record a rerun would submit again, and the worker's second
        // look would turn that into a reuse.
        if let Err(e) = serde_json::to_vec(&rec)
            .map_err(|e| e.to_string())
            .and_then(|b| self.store.write_atomic(&record, &b).map_err(|e| e.to_string()))
        {
            tracing::warn!("cannot record Slurm job {job_id} for adoption by a rerun: {e}");
        }
        self.known.insert(job_id.clone(), Known { record, job_file, cancel_on_interrupt: true });
        let n_tasks = tasks.len();
        let instances = tasks.iter().map(Vec::len).sum();
        for (t, members) in tasks.into_iter().enumerate() {
            let id = rec.task_id(t);
            let log = self.log_path(&id);
            self.tasks.insert(id, Task::new(job_id.clone(), log, members, request.clone()));
        }
        let log = if array { self.log_path(&format!("{job_id}_*")) } else { self.log_path(&job_id) };
        let _ = self.events.send(Event::Submitted { job_id, tasks: n_tasks, instances, log });
    }

    /// A submission refused for a limit on the jobs queued at once (`error`): its members go
    /// back to the queue, and the room for tasks in flight is lowered to what this run holds
    /// now plus half the refused tasks (an array may fit smaller; a single job waits for this
    /// run's jobs to end). The submission was tried with room for all its tasks, so each
    /// refusal lowers the room and this ends: at worst in one task refused with nothing in
    /// flight, which `submit` fails.
    fn hold_back(&mut self, stage: &str, tasks: Vec<Vec<Member>>, error: &str) {
        let in_flight = self.in_flight();
        let room = (in_flight + tasks.len() / 2).max(1);
        self.submit_room = Some(self.submit_room.map_or(room, |r| r.min(room)));
        let text = if tasks.len() == 1 {
            format!(
                "Slurm refused a job of stage `{stage}` ({error}) while {in_flight} of this run's were queued or running: a limit \
                 on the jobs you may have queued at once; camflow keeps at most {room} in flight from now on and submits the rest \
                 as those end (`executor.max_jobs: {room}` avoids the refused calls). If the limit is on the job's own size or \
                 time instead, it fails once nothing else is in flight"
            )
        } else {
            format!(
                "Slurm refused an array of {} tasks of stage `{stage}` ({error}) while {in_flight} of this run's were queued or \
                 running: a limit on the jobs you may have queued at once counts each task; camflow keeps at most {room} in flight \
                 from now on, in smaller arrays (`executor.max_jobs` below the limit avoids the refused calls)",
                tasks.len()
            )
        };
        let _ = self.events.send(Event::Note { text });
        for m in tasks.into_iter().flatten() {
            self.enqueue(m);
        }
    }

    /// Tasks that may still be submitted under a learnt limit on the jobs queued at once
    /// (`None`: no limit learnt; `executor.max_jobs` still holds through `room`).
    fn submit_room_left(&self) -> Option<usize> {
        self.submit_room.map(|r| r.saturating_sub(self.in_flight()))
    }

    /// This controller's tasks that Slurm counts as queued or running: those waited on, and
    /// those whose results are in but which the last `squeue` still listed.
    fn in_flight(&self) -> usize {
        self.tasks.len() + self.lingering
    }

    /// One pass over the queue ([`Runner::flush`]): per stage, its members batched into tasks,
    /// submitted as job arrays or single jobs, within a learnt limit on the jobs queued at once
    /// (what does not fit stays queued).
    async fn submit_queued(&mut self) {
        self.queued_by_kind.clear();
        let mut by_stage: BTreeMap<String, Vec<Member>> = BTreeMap::new();
        for m in std::mem::take(&mut self.queued) {
            let stage = m.job.input.instances[m.job.idx].stage.clone();
            by_stage.entry(stage).or_default().push(m);
        }
        for (stage, members) in by_stage {
            let kind = members[0].job.input.instances[members[0].job.idx].kind.clone();
            let mut tasks: VecDeque<Vec<Member>> = sbatch::batches(members, self.cfg.batch_size(&kind) as usize).into();
            let most = if self.cfg.arrays && tasks.len() > 1 { self.max_array_size().await } else { 1 };
            while !tasks.is_empty() {
                let fits = self.submit_room_left().unwrap_or(usize::MAX).min(most);
                if fits == 0 {
                    tasks.into_iter().flatten().for_each(|m| self.enqueue(m));
                    break;
                }
                let chunk: Vec<Vec<Member>> = tasks.drain(..fits.min(tasks.len())).collect();
                let array = chunk.len() > 1;
                self.submit(&stage, chunk, array).await;
            }
        }
    }

    /// The final state of a task that left the queue: `scontrol`, else `sacct`, else unknown.
    async fn final_state(&self, task_id: &str) -> (String, Option<String>) {
        if let Ok(text) = slurm_cmd("scontrol", vec!["show".into(), "job".into(), task_id.into()]).await
            && let Some(s) = sbatch::parse_scontrol(&text)
        {
            return s;
        }
        let args = ["-n", "-X", "-P", "-o", "JobID,State", "-j", task_id].map(String::from).to_vec();
        if let Ok(text) = slurm_cmd("sacct", args).await
            && let Some(s) = sbatch::parse_sacct(&text, task_id)
        {
            return (s, None);
        }
        ("UNKNOWN".into(), None)
    }

    /// The run stops: this controller's own jobs that have not started are cancelled (what
    /// has not started never starts, as in a local run; a running job is left to finish, its
    /// work is kept). Returns their instances, which are then skipped.
    async fn cancel_pending(&mut self) -> Vec<usize> {
        if self.tasks.is_empty() {
            return Vec::new();
        }
        let pending: Vec<String> = match self.squeue().await {
            Ok(q) => self
                .tasks
                .iter()
                .filter(|(id, t)| {
                    q.get(*id).is_some_and(|x| not_started(&x.state))
                        && self.known.get(&t.job_id).is_some_and(|k| k.cancel_on_interrupt)
                        && !t.members.iter().any(|m| m.theirs)
                })
                .map(|(id, _)| id.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut idxs = Vec::new();
        let mut cancelled = 0;
        if !pending.is_empty() {
            match slurm_cmd("scancel", pending.clone()).await {
                Ok(_) => {
                    for id in &pending {
                        if let Some(t) = self.tasks.remove(id) {
                            cancelled += 1;
                            idxs.extend(t.members.iter().map(|m| m.job.idx));
                        }
                    }
                }
                Err(e) => {
                    let _ =
                        self.events.send(Event::Note { text: format!("cancelling pending Slurm jobs {} failed: {e}", pending.join(" ")) });
                }
            }
        }
        let left = self.tasks.len();
        let mut text = String::from("the run stops (a failure without --keep-going, or a cache error)");
        if cancelled > 0 {
            text.push_str(&format!(": cancelled {cancelled} Slurm job(s) of this run that had not started"));
        }
        if left > 0 {
            text.push_str(&format!(
                "; waiting for {left} Slurm job(s) already running or not this run's to cancel (Ctrl-C cancels this run's)"
            ));
        }
        let _ = self.events.send(Event::Note { text });
        idxs
    }

    /// A failed member: resubmitted while its kind has `retries` left (not once the run
    /// stops), else reported.
    fn fail(&mut self, mut m: Member, state: &str, msg: String, log: &Path) {
        let inst = &m.job.input.instances[m.job.idx];
        let retries = self.cfg.settings(&inst.stage, &inst.kind).retries.unwrap_or(0);
        if sbatch::retryable(state) && m.attempts < retries && !self.stopping {
            m.attempts += 1;
            let _ = self.events.send(Event::Retrying { idx: m.job.idx, error: msg, attempt: m.attempts });
            self.enqueue(m);
            return;
        }
        self.ready.push_back(Ok((m.job.idx, Err(JobError { msg, log: Some(log.to_path_buf()), cache: false, config: false }))));
    }

    /// A member whose worker reported `status`: its record is read back from the cache.
    fn resolve(&mut self, m: Member, o: jobfile::OutcomeFile, task_id: &str, log: &Path) {
        let label = m.job.input.instances[m.job.idx].label.clone();
        if o.status == Status::Failed {
            let err = o.error.unwrap_or_else(|| format!("{label}: failed"));
            return self.fail(m, "FAILED", format!("{err} (Slurm job {task_id}, state FAILED)"), log);
        }
        // The worker wrote the record (a forced one replaced an old one this process saw).
        self.store.forget_checked(&m.job.digest);
        match self.store.try_lookup(&m.job.digest, false) {
            Ok(Lookup::Fresh(rec)) => {
                // A success is in the record; only failures' outcomes are kept (for the message
                // a controller that adopted the job gives), until the key is submitted again.
                if let Some(p) = jobfile::outcome_path(&self.root, &m.job.digest) {
                    let _ = std::fs::remove_file(p);
                }
                let done = if o.status == Status::Ran && !m.theirs { Done::Ran(*rec, o.seconds) } else { Done::Reused(*rec) };
                self.ready.push_back(Ok((m.job.idx, Ok(done))));
            }
            Ok(_) => {
                self.fail(m, "FAILED", format!("{label}: Slurm job {task_id} reported success, but its record is missing or damaged"), log)
            }
            Err(e) => self.ready.push_back(Ok((
                m.job.idx,
                Err(JobError { msg: format!("{label}: reading the cache: {e}"), log: None, cache: true, config: false }),
            ))),
        }
    }

    /// One look at the queue and the cache; true if anything finished.
    async fn poll(&mut self) -> bool {
        // The queue first, then the outcomes: a task that is gone from the queue and has no
        // outcome after that really ended without one (its worker writes it before exiting).
        let queue_at = std::time::SystemTime::now();
        let ready_before = self.ready.len();
        let queue = match self.squeue().await {
            Ok(q) => {
                if self.squeue_failing.take().is_some() {
                    let _ = self.events.send(Event::Note { text: "squeue answers again".into() });
                    // A later outage is told again.
                    self.squeue_told.clear();
                }
                Some(q)
            }
            Err(e) => {
                self.squeue_failed(e).await;
                None
            }
        };
        let mut progressed = self.ready.len() > ready_before;
        let ids: Vec<String> = self.tasks.keys().cloned().collect();
        let now = Instant::now();
        // Tasks that can never start, with their reason; and waits to tell, by (job, reason).
        let mut never: Vec<(String, String)> = Vec::new();
        let mut waits: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for id in ids {
            let state = queue.as_ref().map(|q| q.get(&id).cloned());
            if let Some(Some(q)) = &state
                && not_started(&q.state)
            {
                if let (Some(reason), Some(task)) = (&q.reason, self.tasks.get_mut(&id)) {
                    let since = *task.pending_since.get_or_insert(now);
                    // Another live controller's job is its to cancel: only told here.
                    let ours = !task.members.iter().any(|m| m.theirs);
                    match sbatch::waiting(reason) {
                        sbatch::Waiting::Never if ours => {
                            never.push((id.clone(), reason.clone()));
                            continue;
                        }
                        w => {
                            // The usual waits are one ("queue"): told once, after a while.
                            let what = if w == sbatch::Waiting::Queue { "queue" } else { reason.as_str() };
                            let due = w != sbatch::Waiting::Queue || now.duration_since(since) >= QUIET_PENDING;
                            if due && task.told.as_deref() != Some(what) {
                                task.told = Some(what.to_string());
                                waits.entry((task.job_id.clone(), reason.clone())).or_default().push(id.clone());
                            }
                        }
                    }
                }
                if q.state == "PENDING" {
                    continue;
                }
            }
            let Some(mut task) = self.tasks.remove(&id) else { continue };
            let mut left = Vec::new();
            for m in std::mem::take(&mut task.members) {
                match jobfile::read_outcome(&self.root, &m.job.digest).filter(|o| o.job == id) {
                    Some(o) => {
                        progressed = true;
                        self.resolve(m, o, &id, &task.log);
                    }
                    None => left.push(m),
                }
            }
            if matches!(state, Some(None)) && !left.is_empty() {
                progressed = true;
                let (st, reason) = self.final_state(&id).await;
                for m in left.drain(..) {
                    // Killed after its record but before its outcome: the record is the result.
                    if let Lookup::Fresh(rec) = self.store.lookup(&m.job.digest, false) {
                        let secs = rec.duration_s;
                        let done = if m.theirs { Done::Reused(*rec) } else { Done::Ran(*rec, secs) };
                        self.ready.push_back(Ok((m.job.idx, Ok(done))));
                        continue;
                    }
                    let label = m.job.input.instances[m.job.idx].label.clone();
                    let reason = reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default();
                    let msg = format!("{label}: Slurm job {id} {st}{reason}: {}", sbatch::explain_state(&st));
                    self.fail(m, &st, msg, &task.log.clone());
                }
            }
            task.members = left;
            if !task.members.is_empty() {
                self.tasks.insert(id, task);
            }
        }
        self.tell_waits(waits);
        if !never.is_empty() {
            progressed = true;
            self.fail_never(never).await;
        }
        // Submissions with nothing left in the queue and nothing waited on: their records go.
        // Another controller's record of this user goes too once it is a minute older than
        // this look at the queue ([`stale_record`]); another user's, never.
        if let Some(q) = &queue {
            let alive: HashSet<&str> = q.keys().map(|k| k.split('_').next().unwrap_or(k)).collect();
            let mut removed = false;
            // SAFETY: geteuid has no preconditions and cannot fail.
            let own_uid = unsafe { libc::geteuid() };
            for (rec, path) in &self.others {
                let Ok(meta) = std::fs::symlink_metadata(path) else { continue };
                let old = meta.modified().is_ok_and(|t| stale_record(std::os::unix::fs::MetadataExt::uid(&meta), own_uid, t, queue_at));
                if old && !alive.contains(rec.job_id.as_str()) && !self.known.contains_key(&rec.job_id) {
                    let _ = std::fs::remove_file(path);
                    // Job files are named by their content: a job resubmitted for the same keys
                    // (a replaced pending job, a retry) has this very file. Never removed under
                    // a job that is known or still in the queue.
                    self.remove_job_file_unless_used(&rec.job_file, Some(&alive));
                    removed = true;
                }
            }
            if removed {
                self.index_stamp = None;
            }
        }
        if let Some(q) = &queue {
            self.lingering = q
                .keys()
                .filter(|id| !self.tasks.contains_key(*id) && self.known.contains_key(id.split('_').next().unwrap_or(id)))
                .count();
            let alive: HashSet<&str> = q.keys().map(|k| k.split('_').next().unwrap_or(k)).collect();
            let waited: HashSet<String> = self.tasks.values().map(|t| t.job_id.clone()).collect();
            let done: Vec<String> = self.known.keys().filter(|j| !alive.contains(j.as_str()) && !waited.contains(*j)).cloned().collect();
            for j in done {
                if let Some(k) = self.known.remove(&j) {
                    let _ = std::fs::remove_file(&k.record);
                    // Not under a later job of the same keys (same content, same file name).
                    self.remove_job_file_unless_used(&k.job_file, Some(&alive));
                }
            }
        }
        if !self.queued.is_empty() {
            self.flush().await;
        }
        progressed
    }

    /// Tells the user why tasks wait (`waits`: task ids by job and reason), one line per job
    /// and reason.
    fn tell_waits(&self, waits: BTreeMap<(String, String), Vec<String>>) {
        for ((job_id, reason), ids) in waits {
            let Some(task) = self.tasks.get(&ids[0]) else { continue };
            let Some(m) = task.members.first() else { continue };
            let inst = &m.job.input.instances[m.job.idx];
            let shown = if ids.len() > 3 { format!("{} and {} more", ids[..3].join(", "), ids.len() - 3) } else { ids.join(", ") };
            let text = match sbatch::waiting(&reason) {
                sbatch::Waiting::Queue => {
                    format!("Slurm job {shown} ({}) still pending after {}s: {reason}", inst.stage, QUIET_PENDING.as_secs())
                }
                sbatch::Waiting::Held => format!(
                    "Slurm job {shown} ({}) is held ({reason}): {}",
                    inst.stage,
                    sbatch::advice(&reason, &inst.stage, &inst.kind, &[]).replace("<job>", &job_id)
                ),
                _ => format!("Slurm job {shown} ({}) is pending: {reason}", inst.stage),
            };
            let _ = self.events.send(Event::Note { text });
        }
    }

    /// Tasks pending for a reason that never clears (`never`: task id and reason): cancelled,
    /// and their instances failed (never retried: the same request would wait again), naming
    /// the reason and the setting to change.
    async fn fail_never(&mut self, never: Vec<(String, String)>) {
        let ids: Vec<String> = never.iter().map(|(id, _)| id.clone()).collect();
        let cancelled = match slurm_cmd("scancel", ids.clone()).await {
            Ok(_) => "camflow cancelled it".to_string(),
            Err(e) => format!("cancelling it failed ({e}): `scancel {}`", ids.join(" ")),
        };
        for (id, reason) in never {
            let Some(task) = self.tasks.remove(&id) else { continue };
            for m in task.members {
                let inst = &m.job.input.instances[m.job.idx];
                let msg = format!(
                    "{}: Slurm job {id} can never start (pending, reason {reason}): {}; {cancelled}",
                    inst.label,
                    sbatch::advice(&reason, &inst.stage, &inst.kind, &task.request)
                );
                self.ready.push_back(Ok((m.job.idx, Err(JobError { msg, log: None, cache: false, config: false }))));
            }
        }
    }

    /// The most tasks one job array may have: the cluster's `MaxArraySize` (asked once), else
    /// Slurm's default.
    async fn max_array_size(&mut self) -> usize {
        if self.max_array.is_none() {
            let text = slurm_cmd("scontrol", vec!["show".into(), "config".into()]).await.unwrap_or_default();
            self.max_array = Some(sbatch::parse_max_array_size(&text).unwrap_or(sbatch::DEFAULT_MAX_ARRAY_SIZE));
        }
        self.max_array.unwrap_or(sbatch::DEFAULT_MAX_ARRAY_SIZE)
    }

    /// Jobs the queued members would take, grouped as `flush` groups them (per kind, which
    /// fixes the batch size; counted as they are queued, so `room` is O(kinds)).
    fn queued_jobs(&self) -> usize {
        self.queued_by_kind.iter().map(|(kind, n)| n.div_ceil(self.cfg.batch_size(kind) as usize)).sum()
    }

    fn enqueue(&mut self, m: Member) {
        *self.queued_by_kind.entry(m.job.input.instances[m.job.idx].kind.clone()).or_default() += 1;
        self.queued.push(m);
    }
}

impl Runner for SlurmRunner {
    fn room(&self, idx: usize, res: &Resources, kind: &str) -> Room {
        if self.cfg.on_controller.iter().any(|k| k == kind) {
            return self.local.room(idx, res, kind);
        }
        let most = self.submit_room.map_or(self.cfg.max_jobs as usize, |r| r.min(self.cfg.max_jobs as usize));
        if self.tasks.len() + self.queued_jobs() >= most {
            return Room::Later;
        }
        Room::Now
    }

    fn start(&mut self, job: Job, res: Resources) {
        let kind = &job.input.instances[job.idx].kind;
        if self.cfg.on_controller.iter().any(|k| k == kind) {
            self.local.start(job, res);
        } else {
            self.enqueue(Member { job, res, attempts: 0, theirs: false });
        }
    }

    async fn flush(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        self.adopt().await;
        // Again while a refusal for a limit on queued jobs lowered the room and left some
        // room (a smaller array); members that do not fit wait for this run's jobs to end
        // (`next` returns as they do, and the dispatch loop flushes again).
        loop {
            let room = self.submit_room;
            self.submit_queued().await;
            if self.queued.is_empty() || self.submit_room == room || self.submit_room_left() == Some(0) {
                break;
            }
        }
        self.interval = Duration::from_secs_f64(self.cfg.poll_min_s);
    }

    fn busy(&self) -> bool {
        !self.tasks.is_empty() || !self.ready.is_empty() || !self.queued.is_empty() || self.local.busy()
    }

    async fn next(&mut self) -> Finished {
        loop {
            if let Some(f) = self.ready.pop_front() {
                return f;
            }
            if self.tasks.is_empty() && self.queued.is_empty() {
                return self.local.next().await;
            }
            let sleep = tokio::time::sleep(self.interval);
            if self.local.busy() {
                tokio::select! {
                    r = self.local.next() => return r,
                    _ = sleep => {}
                }
            } else {
                sleep.await;
            }
            let progressed = self.poll().await;
            self.interval = if progressed {
                Duration::from_secs_f64(self.cfg.poll_min_s)
            } else {
                self.interval.mul_f64(1.5).min(Duration::from_secs_f64(self.cfg.poll_max_s))
            };
        }
    }

    async fn abandon(&mut self) -> Vec<usize> {
        self.queued_by_kind.clear();
        let mut idxs: Vec<usize> = self.queued.drain(..).map(|m| m.job.idx).collect();
        idxs.extend(self.local.abandon().await);
        if !self.stopping {
            self.stopping = true;
            idxs.extend(self.cancel_pending().await);
        }
        idxs
    }

    async fn interrupt(&mut self) {
        let ids: Vec<String> = self.known.iter().filter(|(_, k)| k.cancel_on_interrupt).map(|(j, _)| j.clone()).collect();
        if ids.is_empty() {
            return;
        }
        match slurm_cmd("scancel", ids.clone()).await {
            Ok(_) => {
                for j in &ids {
                    if let Some(k) = self.known.remove(j) {
                        let _ = std::fs::remove_file(&k.record);
                        let _ = std::fs::remove_file(&k.job_file);
                    }
                }
            }
            // The jobs go on; their records stay, so the next run adopts them.
            Err(e) => tracing::warn!("cancelling Slurm jobs {}: {e}", ids.join(",")),
        }
    }
}

/// Runs the pipeline's stale instances as Slurm jobs (see the module docs).
pub async fn execute(
    input: super::ExecInput,
    catalog: std::sync::Arc<crate::stage_kind::Catalog>,
    store: Store,
    opts: super::ExecOptions,
    setup: SlurmSetup,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
) -> super::Outcome {
    // The controller's own kinds get this machine's CPU and GPU slots, as a local run would.
    let local = LocalRunner::for_run(setup.local_jobs, &input, &catalog, &opts);
    let runner = SlurmRunner::new(setup, local, store.clone(), events.clone());
    super::execute_with(input, catalog, store, opts, events, runner).await
}

/// What this run would ask of the cluster for an instance of `kind` in `stage` with `res`
/// ([`sbatch::request_args`] of the arguments [`SlurmRunner::submit`] builds).
fn request_for(cfg: &ExecutorConfig, stage: &str, kind: &str, res: &Resources) -> Vec<String> {
    let settings = cfg.settings(stage, kind);
    let sub = Submission { stage, res, settings: &settings, log_pattern: "", array: None, command: "" };
    sbatch::request_args(&sbatch::sbatch_args(cfg, &sub))
}

/// Whether another controller's submission record, owned by `owner` and last written at
/// `written`, may be swept when its job is not in the queue seen at `queue_at`: only a record
/// of this user (`squeue --me` shows no one else's jobs: another user's queued job, whose job
/// file the sweep would delete, would then fail), and only a minute after it was written (a
/// younger one's job may have been submitted after that look).
fn stale_record(owner: u32, own_uid: u32, written: std::time::SystemTime, queue_at: std::time::SystemTime) -> bool {
    owner == own_uid && written + Duration::from_secs(60) < queue_at
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another user's submission record is never swept (`squeue --me` cannot see its job);
    /// this user's only a minute after it was written.
    #[test]
    fn only_this_users_minute_old_submission_records_are_swept() {
        let now = std::time::SystemTime::now();
        let minute_ago = now - Duration::from_secs(61);
        assert!(stale_record(1000, 1000, minute_ago, now));
        assert!(!stale_record(1001, 1000, minute_ago, now), "another user's record was swept");
        assert!(!stale_record(1000, 1000, now - Duration::from_secs(30), now));
    }
}
