//! The Slurm executor against a real Slurm (issue 9): the same lock file as a local run, a job
//! cancelled with `scancel`, a job killed by its time limit, the controller killed with
//! SIGKILL, two controllers on one cache, and wide stages grouped into few jobs.
//!
//! These tests submit jobs to the Slurm cluster that `sinfo`/`sbatch` on PATH talk to, so they
//! are `#[ignore]`d (`cargo test` needs no Slurm) and refuse to run unless
//! `CAMFLOW_SLURM_TESTS=1` says that submitting there is fine. With it set they fail, never
//! skip, when Slurm does not answer. On one machine:
//!   scripts/slurm-cluster.sh start
//!   CAMFLOW_SLURM_TESTS=1 cargo test --locked --test e2e slurm:: -- --ignored
//! The projects live in a temporary folder that the jobs must see: on a real cluster, point
//! `CAMFLOW_SLURM_TMP` at a shared filesystem.
//!
//! Every controller runs with a counting `sbatch` shim first on PATH: it logs each submission
//! (exit status, the `--parsable` answer, the arguments) to `sbatch.log` in the project, so a
//! test knows exactly which jobs are its own on a cluster others use too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Project, Run, TINY, lock_of, root};

/// Panics unless the tests may submit jobs and Slurm answers.
fn require_slurm() {
    if std::env::var("CAMFLOW_SLURM_TESTS").as_deref() != Ok("1") {
        panic!(
            "the Slurm tests submit jobs to the cluster on PATH: set CAMFLOW_SLURM_TESTS=1 to allow it \
             (scripts/slurm-cluster.sh start gives a single-node cluster on this machine)"
        );
    }
    let out = Command::new("sinfo").args(["-h", "-o", "%P %a %t"]).output();
    match out {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => {}
        Ok(o) => panic!(
            "CAMFLOW_SLURM_TESTS=1 but `sinfo` fails (exit {:?}): {}{}\nstart a cluster with scripts/slurm-cluster.sh start",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "CAMFLOW_SLURM_TESTS=1 but `sinfo` cannot be run ({e}): is Slurm installed? scripts/slurm-cluster.sh start installs and starts one"
        ),
    }
}

/// The first `name` on PATH.
fn on_path(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").expect("PATH");
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| panic!("no {name} on PATH"))
}

/// A project for the Slurm tests: its folder is one the jobs can see, and it holds the
/// counting `sbatch` shim (`shim/sbatch`, logging to `sbatch.log`).
fn slurm_project(yaml: &str) -> Project {
    require_slurm();
    let dir = match std::env::var_os("CAMFLOW_SLURM_TMP") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    std::fs::write(dir.path().join("p.yaml"), yaml).expect("write pipeline");
    let p = Project { dir };
    let shim = p.path().join("shim");
    std::fs::create_dir(&shim).expect("shim dir");
    let log = p.path().join("sbatch.log");
    let script = format!(
        "#!/bin/sh\n# Counting shim: runs the real sbatch, logs status, answer and arguments.\nout=$('{real}' \"$@\")\nrc=$?\nprintf '%s\\t%s\\t%s\\n' \"$rc\" \"$out\" \"$*\" >> '{log}'\n[ -n \"$out\" ] && printf '%s\\n' \"$out\"\nexit $rc\n",
        real = on_path("sbatch").display(),
        log = log.display()
    );
    let sbatch = shim.join("sbatch");
    std::fs::write(&sbatch, script).expect("write shim");
    std::fs::set_permissions(&sbatch, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod shim");
    p
}

/// Job ids (`--parsable` answers without a cluster name) of the successful submissions so far.
fn submissions(p: &Project) -> Vec<String> {
    let text = std::fs::read_to_string(p.path().join("sbatch.log")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, '\t');
            let (rc, out) = (f.next()?, f.next()?);
            (rc == "0").then(|| out.trim().split(';').next().unwrap_or("").to_string())
        })
        .collect()
}

/// Writes `profile.yaml` into the project with the given `executor:` block body.
fn profile(p: &Project, body: &str) -> PathBuf {
    let path = p.path().join("profile.yaml");
    std::fs::write(&path, format!("executor:\n  kind: slurm\n{body}")).expect("write profile");
    path
}

/// Polling fast enough that a test waits on Slurm, not on the controller's back-off.
const FAST_POLL: &str = "  poll: {min_s: 0.2, max_s: 1}\n";

/// One job per instance, nothing on the controller: the number of `sbatch` calls is then the
/// number of instances submitted, so a double submission shows in the count.
const ONE_PER_JOB: &str = "  arrays: false\n  on_controller: []\n  batch: {threshold: 1, score: 1, filter: 1}\n";

/// `camflow run p.yaml --executor slurm --profile PROFILE`, with the shim first on PATH.
fn slurm_cmd(p: &Project, profile: &Path, cache: &Path) -> Command {
    let pl = p.pipeline();
    let mut c = p.cmd(&[
        "run",
        pl.to_str().expect("utf-8"),
        "--executor",
        "slurm",
        "--profile",
        profile.to_str().expect("utf-8"),
        "--cache-dir",
        cache.to_str().expect("utf-8"),
    ]);
    let path = std::env::var_os("PATH").expect("PATH");
    let mut dirs = vec![p.path().join("shim")];
    dirs.extend(std::env::split_paths(&path));
    c.env("PATH", std::env::join_paths(dirs).expect("PATH"));
    c
}

fn slurm_run(p: &Project, profile: &Path) -> Run {
    Run { out: slurm_cmd(p, profile, &p.cache()).output().expect("camflow runs") }
}

/// The action records in a cache (one per computed key).
fn records(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("actions"))
        .map(|d| d.flatten().filter(|e| e.path().extension().is_none_or(|x| x != "tmp")).count())
        .unwrap_or(0)
}

/// How many times each instance was computed by a job, from the workers' logs
/// (`logs/slurm/*.out`, a `done <label>` line per computed instance; a key another process
/// had computed is `reused`).
fn computed_by_jobs(cache: &Path) -> std::collections::BTreeMap<String, usize> {
    let mut n = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(cache.join("logs/slurm")).expect("job logs").flatten() {
        let text = std::fs::read_to_string(e.path()).expect("read job log");
        for label in text.lines().filter(|l| l.starts_with("done ")).filter_map(|l| l.split_whitespace().nth(1)) {
            *n.entry(label.to_string()).or_insert(0) += 1;
        }
    }
    n
}

/// Every one of the 13 TINY instances computed exactly once, by some job.
#[track_caller]
fn assert_each_computed_once(p: &Project) {
    let n = computed_by_jobs(&p.cache());
    assert_eq!(n.len(), 13, "13 instances computed by jobs: {n:?}");
    assert!(n.values().all(|&c| c == 1), "an instance computed more than once: {n:?}");
}

/// squeue rows `(task id %i, job id %A, comment %k, state %T)` of the given jobs.
fn queue(ids: &[String]) -> Vec<(String, String, String, String)> {
    if ids.is_empty() {
        return Vec::new();
    }
    let out = Command::new("squeue").args(["-h", "-o", "%i|%A|%k|%T", "-j", &ids.join(",")]).output().expect("squeue runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f.len() == 4).then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string(), f[3].to_string()))
        })
        .collect()
}

/// Waits (at most `limit`) until a job of this project whose comment is `comment` is in state
/// `state`; returns its squeue row. Panics naming the controller's output if the controller
/// ended first.
fn wait_for_job(p: &Project, child: &mut Child, comment: &str, state: &str, limit: Duration) -> (String, String, String, String) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(row) = queue(&submissions(p)).into_iter().find(|r| r.2 == comment && r.3 == state) {
            return row;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the controller ended ({status}) before a `{comment}` job was {state}; sbatch log:\n{}",
                std::fs::read_to_string(p.path().join("sbatch.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no `{comment}` job {state} after {limit:?}; jobs: {:?}", queue(&submissions(p)));
}

/// The `camflow worker` processes of a running job (`scontrol listpids`, then each one's
/// name): only those, never Slurm's own step daemon, which `listpids` may also list while the
/// job starts (stopping it makes the job unkillable and Slurm drains the node).
fn worker_pids(job_id: &str) -> Vec<String> {
    let out = Command::new("scontrol").args(["listpids", job_id]).output().expect("scontrol runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "camflow"))
        .map(String::from)
        .collect()
}

/// Stops the job's `camflow worker` (SIGSTOP), so that the job stays mid-run however fast the
/// machine is: a hung job, as one stuck on a file system. squeue says RUNNING a moment before
/// the worker exists, so this waits for it (at most 30 s).
fn freeze(job_id: &str) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let pids = worker_pids(job_id);
        if !pids.is_empty() {
            for pid in pids {
                let st = Command::new("kill").args(["-STOP", &pid]).status().expect("kill runs");
                assert!(st.success(), "SIGSTOP {pid}");
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no camflow worker in job {job_id} after 30 s (scontrol listpids)");
}

/// The TINY study with a training of a few seconds, tagged so its job can be found in the
/// queue (`--comment`), and no retries (a cancelled or timed-out job must fail the run).
fn tagged_training_profile(p: &Project, time: Option<&str>) -> PathBuf {
    let time = time.map(|t| format!(", time: \"{t}\"")).unwrap_or_default();
    profile(p, &format!("{FAST_POLL}  kinds:\n    train: {{retries: 0, sbatch: [\"--comment=cftest-train\"]{time}}}\n"))
}

/// TINY with a training of `epochs` epochs (100: about 4 s on a busy 2-core machine).
fn tiny_with_training(epochs: usize) -> String {
    let yaml =
        TINY.replacen("params: {epochs: 1, batch_size: 16}\n  cams", &format!("params: {{epochs: {epochs}, batch_size: 16}}\n  cams"), 1);
    assert_ne!(yaml, TINY);
    yaml
}

/// The error of a failed Slurm job names its state, its job id and the path of its log.
#[track_caller]
fn assert_names_job(r: &Run, state: &str, task_id: &str) {
    let text = format!("{}{}", r.stdout(), r.stderr());
    assert_eq!(r.code(), 1, "a failed job fails the run with exit 1:\n{text}");
    assert!(text.contains(state), "the error names the Slurm state {state}:\n{text}");
    assert!(text.contains(task_id), "the error names the job id {task_id}:\n{text}");
    let log = format!("logs/slurm/{task_id}");
    assert!(text.contains(&log), "the error names the job's log ({log}...):\n{text}");
}

/// The rerun after a failed training: data was cached by the first run, everything else is
/// computed now, once.
#[track_caller]
fn assert_resumes(p: &Project, profile: &Path) {
    let r = slurm_run(p, profile).ok();
    assert_eq!(r.summary("cached"), 1, "only data was finished before the failure:\n{}", r.stdout());
    assert_eq!(r.summary("ran"), 12, "{}", r.stdout());
    assert_eq!(records(&p.cache()), 13);
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
}

/// (a) The paper pipeline, shrunk (48 phantoms of 16x16, one seed, one epoch, three
/// thresholds, two filter modes: 83 instances), gives through Slurm the lock file of a local
/// run in another cache, byte for byte; some instances share a job; the rerun submits nothing.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_shrunk_paper_pipeline_gives_the_local_lock_file() {
    let paper = std::fs::read_to_string(root().join("pipelines/paper.yaml")).expect("paper.yaml");
    let mut yaml = paper.clone();
    for (from, to) in [
        ("count: 500", "count: 48"),
        ("image_size: 32", "image_size: 16"),
        ("epochs: 10", "epochs: 1"),
        ("seeds: 3", "seeds: 1"),
        ("widths: [16, 32, 64]", "widths: [4, 8, 8]"),
        ("method: [fixed, fixed, fixed, fixed, fixed, fixed, fixed, fixed, fixed, otsu]", "method: [fixed, fixed, otsu]"),
        ("value:  [0.1,   0.2,   0.3,   0.4,   0.5,   0.6,   0.7,   0.8,   0.9,   0.5]", "value:  [0.3, 0.6, 0.5]"),
        ("mode: [multiply, inverse, mask, inverse-mask]", "mode: [multiply, inverse]"),
    ] {
        assert!(yaml.contains(from), "pipelines/paper.yaml no longer has `{from}`: update this test");
        yaml = yaml.replacen(from, to, 1);
    }
    let local = Project::new(&yaml);
    local.run(&[]).ok();
    let p = slurm_project(&yaml);
    let prof = profile(&p, FAST_POLL);
    let t = Instant::now();
    let r = slurm_run(&p, &prof).ok();
    eprintln!(
        "shrunk paper pipeline through Slurm: {:.1} s, {}",
        t.elapsed().as_secs_f64(),
        r.stdout().lines().find(|l| l.starts_with("summary:")).unwrap_or("")
    );
    assert_eq!(r.summary("failed"), 0, "{}", r.stdout());
    assert_eq!(records(&p.cache()), records(&local.cache()), "the same keys computed");
    let want = std::fs::read_to_string(local.path().join("p.lock.yaml")).expect("local lock");
    let got = std::fs::read_to_string(p.path().join("p.lock.yaml")).expect("slurm lock");
    assert!(got == want, "the Slurm run's lock file differs from the local run's:\n{}", first_difference(&want, &got));
    assert_eq!(lock_of(&p), lock_of(&local));
    let jobs = r.summary("jobs");
    assert_eq!(jobs, submissions(&p).len(), "jobs= counts the sbatch submissions");
    let keys = records(&p.cache());
    assert!(jobs > 0 && jobs < keys, "{jobs} jobs for {keys} keys: some instances share a job");
    // The rerun finds everything and submits nothing.
    let again = slurm_run(&p, &prof).ok();
    assert_eq!(again.summary("ran"), 0, "{}", again.stdout());
    assert_eq!(again.summary("jobs"), 0);
    assert_eq!(submissions(&p).len(), jobs);
}

/// The paper-shaped sweep of `camflow bench orch` at 2,9,4 (65 instances: 2 trainings, each
/// with 9 thresholds and 4 filter modes; zero epochs), through Slurm with the default
/// settings (wide stages as arrays, cheap kinds in batches: fewer jobs than instances), and
/// with the cheap kinds on the controller (a handful of jobs). Issue 9: many small instances
/// do not become many jobs.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_wide_stages_are_grouped_into_few_jobs() {
    let thresholds: Vec<String> = (1..=9).map(|i| format!("{}", i as f64 / 10.0)).collect();
    let yaml = format!(
        "name: bench\nseed: 1\nstages:\n  data:\n    kind: data\n    params: {{source: synthetic, count: 16, image_size: 8, slices_per_patient: 1}}\n  train:\n    kind: train\n    inputs: {{data: data}}\n    params: {{epochs: 0, batch_size: 16}}\n    sweep:\n      grid:\n        seed: [1, 2]\n  gradcam:\n    kind: gradcam\n    inputs: {{model: train, data: data}}\n  threshold:\n    kind: threshold\n    inputs: {{heatmaps: gradcam}}\n    sweep:\n      grid:\n        value: [{}]\n  score_seg:\n    kind: score\n    inputs: {{data: data, masks: threshold}}\n  filter:\n    kind: filter\n    inputs: {{data: data, heatmaps: gradcam}}\n    sweep:\n      grid:\n        mode: [multiply, inverse, mask, inverse-mask]\n  retrain:\n    kind: retrain\n    inputs: {{data: filter}}\n    params: {{epochs: 0, batch_size: 16}}\n  score_cls:\n    kind: score\n    inputs: {{data: filter, model: retrain}}\n",
        thresholds.join(", ")
    );
    let p = slurm_project(&yaml);
    let prof = profile(&p, "");
    let r = slurm_run(&p, &prof).ok();
    let ran = r.summary("ran") + r.summary("reused");
    assert_eq!(ran + r.summary("cached"), 65, "{}", r.stdout());
    let jobs = r.summary("jobs");
    assert_eq!(jobs, submissions(&p).len(), "jobs= counts the sbatch submissions");
    // Defaults: what is ready at once goes as one array of batches; dependents of an array
    // are submitted as they become ready, so fewer jobs than instances, not far fewer
    // (measured 38-42 for these 65).
    assert!(jobs < 65, "{jobs} jobs for 65 instances: arrays and batches should group some:\n{}", r.stdout());
    // Cheap kinds on the controller: only data, trainings, Grad-CAM and retrainings are jobs.
    let q = slurm_project(&yaml);
    let prof = profile(&q, "  on_controller: [threshold, score, filter]\n");
    let r = slurm_run(&q, &prof).ok();
    assert_eq!(r.summary("ran") + r.summary("reused") + r.summary("cached"), 65, "{}", r.stdout());
    let jobs = r.summary("jobs");
    assert!(jobs <= 12, "{jobs} jobs with the cheap kinds on the controller (measured 8):\n{}", r.stdout());
}

fn first_difference(a: &str, b: &str) -> String {
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {}: local `{x}`, slurm `{y}`", i + 1);
        }
    }
    format!("lengths differ: local {} lines, slurm {} lines", a.lines().count(), b.lines().count())
}

/// (b) A training job cancelled with `scancel` while it runs: the run fails naming CANCELLED,
/// the job id and its log; the rerun computes only what is missing.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_scancel_mid_run_names_the_job_and_the_rerun_resumes() {
    let p = slurm_project(&tiny_with_training(100));
    let prof = tagged_training_profile(&p, None);
    let mut child = slurm_cmd(&p, &prof, &p.cache()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let (task, job, _, _) = wait_for_job(&p, &mut child, "cftest-train", "RUNNING", Duration::from_secs(120));
    // Mid-run for sure: the job's processes are held until Slurm cancels it.
    freeze(&job);
    let st = Command::new("scancel").arg(&task).status().expect("scancel runs");
    assert!(st.success());
    let r = Run { out: child.wait_with_output().expect("controller ends") };
    assert_names_job(&r, "CANCELLED", &task);
    assert_resumes(&p, &prof);
}

/// (c) A training job killed by its time limit (one minute; the job is held so it cannot
/// finish first): the run fails naming TIMEOUT, the job id and its log; a rerun without the
/// limit computes only what is missing.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_time_limit_kill_names_timeout_and_the_rerun_resumes() {
    let p = slurm_project(&tiny_with_training(100));
    let prof = tagged_training_profile(&p, Some("00:01:00"));
    let mut child = slurm_cmd(&p, &prof, &p.cache()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let (task, job, _, _) = wait_for_job(&p, &mut child, "cftest-train", "RUNNING", Duration::from_secs(120));
    freeze(&job);
    let t = Instant::now();
    let r = Run { out: child.wait_with_output().expect("controller ends") };
    eprintln!("time-limit kill noticed {:.1} s after the job was frozen", t.elapsed().as_secs_f64());
    assert_names_job(&r, "TIMEOUT", &task);
    // Resources are not part of a key: the same instances, now without a limit.
    let prof = tagged_training_profile(&p, None);
    assert_resumes(&p, &prof);
}

/// (d) The controller killed with SIGKILL while its training job is in the queue: the rerun
/// adopts that job instead of submitting it again. With one instance per job, the sbatch
/// calls of both runs together are exactly the 13 instances, and the workers' logs show each
/// instance computed once.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_controller_sigkill_then_rerun_submits_nothing_twice() {
    let p = slurm_project(&tiny_with_training(300));
    let prof = profile(&p, &format!("{FAST_POLL}{ONE_PER_JOB}  kinds:\n    train: {{sbatch: [\"--comment=cftest-train\"]}}\n"));
    let mut child = slurm_cmd(&p, &prof, &p.cache()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let (task, _, _, _) = wait_for_job(&p, &mut child, "cftest-train", "RUNNING", Duration::from_secs(120));
    child.kill().expect("SIGKILL the controller");
    let _ = child.wait();
    let before = submissions(&p);
    assert_eq!(before.len(), 2, "data and train submitted before the kill: {before:?}");
    assert!(queue(std::slice::from_ref(&task)).iter().any(|r| r.3 == "RUNNING"), "the training job outlives its controller");
    let r = slurm_run(&p, &prof).ok();
    let all = submissions(&p);
    assert_eq!(r.summary("jobs"), all.len() - before.len(), "jobs= counts this run's submissions:\n{}", r.stdout());
    assert_eq!(all.len(), 13, "each of the 13 instances submitted exactly once over both runs: {all:?}\n{}", r.stdout());
    let mut ids = all.clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 13, "distinct job ids: {all:?}");
    assert_eq!(records(&p.cache()), 13);
    assert_each_computed_once(&p);
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
}

/// (e) Two controllers started together on one cache: every key is computed once between
/// them (the workers' logs), each controller accounts for all 13 instances.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_two_controllers_on_one_cache_compute_each_key_once() {
    let p = slurm_project(TINY);
    let prof = profile(&p, &format!("{FAST_POLL}{ONE_PER_JOB}"));
    let spawn = || slurm_cmd(&p, &prof, &p.cache()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let (a, b) = (spawn(), spawn());
    let a = Run { out: a.wait_with_output().expect("a") }.ok();
    let b = Run { out: b.wait_with_output().expect("b") }.ok();
    // Each key computed once, by one job: the workers' logs say which (a controller that
    // adopted the other's job may count that instance as its own in `ran=`).
    assert_each_computed_once(&p);
    for r in [&a, &b] {
        assert_eq!(r.summary("ran") + r.summary("reused") + r.summary("cached"), 13, "{}", r.stdout());
    }
    assert_eq!(records(&p.cache()), 13);
    assert!(p.camflow(&["verify"]).ok().stdout().contains(", 0 problems"));
    let jobs = a.summary("jobs") + b.summary("jobs");
    assert_eq!(jobs, submissions(&p).len(), "jobs= of both runs counts the sbatch calls");
}

/// A pipeline of one cheap data instance: one job, a few seconds.
const DATA_ONLY: &str = "name: one\nseed: 1\nstages:\n  data:\n    kind: data\n    params: {source: synthetic, count: 8, image_size: 8, slices_per_patient: 1}\n";

/// A controller whose stdout is read as it runs: each line goes to the channel, all of them
/// to the thread's result.
struct Watched {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<String>,
}

fn watch(mut cmd: Command) -> Watched {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for l in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
            all.push_str(&l);
            all.push('\n');
            let _ = tx.send(l);
        }
        all
    });
    Watched { child, lines, reader }
}

impl Watched {
    /// The first line containing `needle` within `limit`; panics (killing the controller)
    /// naming what it printed otherwise.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let t = Instant::now();
        let mut seen = String::new();
        while t.elapsed() < limit {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) if l.contains(needle) => return l,
                Ok(l) => seen.push_str(&(l + "\n")),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = self.child.kill();
        panic!("no line with `{needle}` within {limit:?}; the controller printed:\n{seen}");
    }

    /// Waits (at most `limit`, else kills it and panics) for the controller to end.
    fn finish(mut self, limit: Duration) -> (i32, String) {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                let out = self.reader.join().expect("reader");
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return (st.code().unwrap_or(-1), out + &err);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("the controller did not end within {limit:?}; it printed:\n{}", self.reader.join().unwrap_or_default());
    }
}

/// Submits a tiny job that fails and returns its id: a job that depends on it (`afterok`) can
/// never start.
fn failed_job() -> String {
    let out = Command::new("sbatch")
        .args(["--parsable", "-c1", "--mem=50M", "-o", "/dev/null", "--comment=cftest-dep", "--wrap", "exit 1"])
        .output()
        .expect("sbatch runs");
    assert!(out.status.success(), "sbatch: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or("").to_string()
}

/// Finding 1: a job that can never start (its dependency failed: Slurm keeps it pending with
/// `DependencyNeverSatisfied` for ever) fails the run at once, naming the reason and what to
/// change, and is cancelled; before, the controller waited silently for ever.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_job_that_can_never_start_fails_at_once_naming_the_reason() {
    let p = slurm_project(DATA_ONLY);
    let dep = failed_job();
    let prof = profile(&p, &format!("{FAST_POLL}  kinds:\n    data: {{sbatch: [\"--dependency=afterok:{dep}\"]}}\n"));
    let w = watch(slurm_cmd(&p, &prof, &p.cache()));
    let (code, out) = w.finish(Duration::from_secs(90));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("can never start (pending, reason DependencyNeverSatisfied)"), "{out}");
    assert!(out.contains("--dependency"), "the message names the option to fix:\n{out}");
    assert!(out.contains("cancelled it"), "{out}");
    let ids = submissions(&p);
    let t = Instant::now();
    while !queue(&ids).is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(queue(&ids).is_empty(), "the job that could never start was cancelled: {:?}", queue(&ids));
}

/// Finding 1: a held job is told once with its reason and how to release it, not failed; once
/// released, the run finishes.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_held_job_is_told_and_waited_for() {
    let p = slurm_project(DATA_ONLY);
    let prof = profile(&p, &format!("{FAST_POLL}  kinds:\n    data: {{sbatch: [--hold]}}\n"));
    let mut w = watch(slurm_cmd(&p, &prof, &p.cache()));
    let line = w.wait_for("is held (JobHeldUser)", Duration::from_secs(60));
    assert!(line.contains("scontrol release"), "{line}");
    let ids = submissions(&p);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let st = Command::new("scontrol").args(["release", &ids[0]]).status().expect("scontrol runs");
    assert!(st.success());
    let (code, out) = w.finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("is held").count(), 1, "the hold is told once:\n{out}");
}

/// Finding 2: `squeue` failing in a row is told once with its own message, and after
/// `poll.give_up_s` the run's Slurm jobs fail (and are cancelled); before, a job that never
/// wrote an outcome (here: held) was waited for silently for ever.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_failing_squeue_is_told_and_given_up_on() {
    let p = slurm_project(DATA_ONLY);
    let squeue = p.path().join("shim/squeue");
    std::fs::write(&squeue, "#!/bin/sh\necho 'squeue: error: Unable to contact slurm controller (connect failure)' >&2\nexit 1\n")
        .expect("write squeue shim");
    std::fs::set_permissions(&squeue, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod shim");
    let prof = profile(&p, "  poll: {min_s: 0.2, max_s: 0.5, give_up_s: 3}\n  kinds:\n    data: {sbatch: [--hold]}\n");
    let (code, out) = watch(slurm_cmd(&p, &prof, &p.cache())).finish(Duration::from_secs(60));
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.matches("squeue fails: squeue: error: Unable to contact slurm controller (connect failure);").count(),
        1,
        "told once, in its own words:\n{out}"
    );
    assert!(out.contains("executor.poll.give_up_s"), "{out}");
    // The seconds counted depend on the machine's load: only their presence is checked.
    assert!(out.contains("squeue has failed for ") && out.contains("s in a row"), "{out}");
    assert!(out.contains("camflow cancelled it"), "{out}");
}

/// Finding 3: a controller that itself runs in a job array task (its environment has
/// SLURM_ARRAY_TASK_ID=5 and SLURM_ARRAY_JOB_ID) submits plain jobs that run their own task;
/// before, they inherited the variables and failed ("array task 5, but the job file has 1
/// task(s)").
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_controller_inside_an_array_task_submits_working_plain_jobs() {
    let p = slurm_project(DATA_ONLY);
    let prof = profile(&p, FAST_POLL);
    let mut cmd = slurm_cmd(&p, &prof, &p.cache());
    cmd.env("SLURM_ARRAY_TASK_ID", "5").env("SLURM_ARRAY_JOB_ID", "999999").env("SLURM_ARRAY_TASK_COUNT", "1");
    let (code, out) = watch(cmd).finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("summary: ran=1"), "{out}");
}

/// Finding 9: a cache path with `%` in it (sbatch expands `%x` in `--output`) still gets its
/// job logs where camflow names them, and the job runs; before, the log folder did not exist
/// and the job failed to launch.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_cache_path_with_a_percent_sign_works() {
    let p = slurm_project(DATA_ONLY);
    let prof = profile(&p, FAST_POLL);
    let cache = p.path().join("P%x dir").join("cache");
    let r = Run { out: slurm_cmd(&p, &prof, &cache).output().expect("camflow runs") }.ok();
    assert_eq!(r.summary("ran"), 1, "{}", r.stdout());
    let logs: Vec<_> = std::fs::read_dir(cache.join("logs/slurm")).expect("the named log folder").flatten().collect();
    assert_eq!(logs.len(), 1, "one job log under the cache's own path: {logs:?}");
}

/// `script` as `shim2/sbatch`, first on the PATH of `cmd`, before the counting shim it passes
/// calls on to (`shim/sbatch`).
fn install_shim2(p: &Project, cmd: &mut Command, script: &str) {
    let dir = p.path().join("shim2");
    std::fs::create_dir_all(&dir).expect("shim2 dir");
    std::fs::write(dir.join("sbatch"), script).expect("write shim2");
    std::fs::set_permissions(dir.join("sbatch"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod shim2");
    let path = std::env::var_os("PATH").expect("PATH");
    let mut dirs = vec![dir, p.path().join("shim")];
    dirs.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(dirs).expect("PATH"));
}

/// A shim before the counting one that fails the first call with `message` and passes the
/// others on.
fn failing_first_sbatch(p: &Project, cmd: &mut Command, message: &str) {
    let marker = p.path().join("sbatch-failed-once");
    let script = format!(
        "#!/bin/sh\nif [ ! -e '{m}' ]; then touch '{m}'; echo '{message}' >&2; exit 1; fi\nexec '{next}' \"$@\"\n",
        m = marker.display(),
        next = p.path().join("shim/sbatch").display()
    );
    install_shim2(p, cmd, &script);
}

/// Finding 6: an sbatch call that fails for a passing reason (a socket timeout) is tried
/// again after a wait, and the run succeeds; before, the instance failed at once.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_sbatch_socket_timeout_is_tried_again() {
    let p = slurm_project(DATA_ONLY);
    let prof = profile(&p, FAST_POLL);
    let mut cmd = slurm_cmd(&p, &prof, &p.cache());
    failing_first_sbatch(&p, &mut cmd, "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation");
    let (code, out) = watch(cmd).finish(Duration::from_secs(90));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Socket timed out on send/recv operation); trying again in 2s (2 of 4 tries)"), "{out}");
    assert!(out.contains("summary: ran=1"), "{out}");
}

/// Findings 6, 10, 12: sbatch refusing the settings (an invalid partition) fails at once with
/// the configuration-error exit code, naming the stage, the kind and the arguments camflow
/// built, and leaves no job file behind.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_refused_settings_fail_at_once_naming_them() {
    let p = slurm_project(DATA_ONLY);
    let prof = profile(&p, &format!("{FAST_POLL}  partition: no-such-partition\n"));
    let t = Instant::now();
    let (code, out) = watch(slurm_cmd(&p, &prof, &p.cache())).finish(Duration::from_secs(60));
    assert_eq!(code, 2, "a configuration error:\n{out}");
    assert!(t.elapsed() < Duration::from_secs(10), "not tried again: {:?}", t.elapsed());
    assert!(out.contains("Slurm refused the job of stage `data` (kind `data`)"), "{out}");
    assert!(out.contains("camflow asked: --job-name=camflow-data --partition=no-such-partition"), "{out}");
    assert!(!out.contains("sbatch: sbatch:"), "{out}");
    let jobs: Vec<_> = std::fs::read_dir(p.cache().join("slurm/jobs")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(jobs.is_empty(), "the job file is removed when sbatch fails: {jobs:?}");
}

/// Finding 4: the controller killed while its job waits (held, with `time: 1h`); the rerun,
/// with corrected settings, cancels that job and submits with its own instead of adopting it
/// (before, it adopted the held job and waited for ever).
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_rerun_replaces_a_pending_job_submitted_with_other_settings() {
    let p = slurm_project(DATA_ONLY);
    let prof = profile(&p, &format!("{FAST_POLL}  kinds:\n    data: {{time: 1h, sbatch: [--hold]}}\n"));
    let mut w = watch(slurm_cmd(&p, &prof, &p.cache()));
    w.wait_for("is held (JobHeldUser)", Duration::from_secs(60));
    w.child.kill().expect("SIGKILL the controller");
    let _ = w.child.wait();
    let first = submissions(&p);
    assert_eq!(first.len(), 1, "{first:?}");
    // The old submission's record is older than the minute after which a gone controller's
    // record is swept: its job file (content-addressed) is the new job's too and must stay.
    let record = p.cache().join("slurm").join("submitted").join(format!("{}.json", first[0]));
    let old = std::time::SystemTime::now() - Duration::from_secs(600);
    std::fs::File::options().write(true).open(&record).expect("the submission record").set_modified(old).expect("backdate");
    let prof = profile(&p, &format!("{FAST_POLL}  kinds:\n    data: {{time: 2m}}\n"));
    let (code, out) = watch(slurm_cmd(&p, &prof, &p.cache())).finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("Slurm job {} (data) of a controller that is gone asked for other settings", first[0])), "{out}");
    assert!(out.contains("--time=01:00:00 (now --time=00:02:00), --hold (now not asked)"), "{out}");
    assert_eq!(submissions(&p).len(), 2, "submitted again");
    let t = Instant::now();
    while !queue(&first).is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(queue(&first).is_empty(), "the old job was cancelled: {:?}", queue(&first));
}

/// Finding 8: without `--keep-going`, the first failure cancels this run's jobs that have not
/// started (here the second of two held data jobs) and says so, instead of waiting for them.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_first_failure_cancels_this_runs_pending_jobs() {
    let yaml = DATA_ONLY.replace("count: 8, ", "") + "    sweep:\n      grid:\n        count: [8, 9]\n";
    let p = slurm_project(&yaml);
    let prof = profile(&p, &format!("{FAST_POLL}{ONE_PER_JOB}  kinds:\n    data: {{retries: 2, sbatch: [--hold]}}\n"));
    let mut w = watch(slurm_cmd(&p, &prof, &p.cache()));
    w.wait_for("is held (JobHeldUser)", Duration::from_secs(60));
    let ids = submissions(&p);
    assert_eq!(ids.len(), 2, "{ids:?}");
    let st = Command::new("scancel").arg(&ids[0]).status().expect("scancel runs");
    assert!(st.success());
    let (code, out) = w.finish(Duration::from_secs(60));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("CANCELLED"), "{out}");
    assert!(out.contains("cancelled 1 Slurm job(s) of this run that had not started"), "{out}");
    assert!(out.contains("skipped=1"), "the cancelled instance is skipped:\n{out}");
    assert_eq!(submissions(&p).len(), 2, "nothing resubmitted");
    let t = Instant::now();
    while !queue(&ids).is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(queue(&ids).is_empty(), "{:?}", queue(&ids));
}

/// A shim before the counting one (`shim2/sbatch`, first on PATH) that refuses, as a QOS's
/// `MaxSubmitJobs` does, any submission that would put more than `limit` of this project's
/// jobs (each array task one) in the queue at once; each refusal is logged to `refusals.log`.
fn limiting_sbatch(p: &Project, cmd: &mut Command, limit: usize) {
    let script = format!(
        r#"#!/bin/sh
ids=$(awk -F'\t' '$1 == 0 {{ split($2, a, ";"); print a[1] }}' '{log}' 2> /dev/null | paste -sd, -)
n=0
[ -z "$ids" ] || n=$(squeue -h -r -o %i -j "$ids" 2> /dev/null | wc -l)
want=1
for a in "$@"; do case "$a" in --array=0-*) want=$(( ${{a#--array=0-}} + 1 )) ;; esac; done
if [ $((n + want)) -gt {limit} ]; then
  echo "$n queued, $want more" >> '{refusals}'
  echo 'sbatch: error: QOSMaxSubmitJobPerUserLimit' >&2
  echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)" >&2
  exit 1
fi
exec '{next}' "$@"
"#,
        log = p.path().join("sbatch.log").display(),
        refusals = p.path().join("refusals.log").display(),
        next = p.path().join("shim/sbatch").display()
    );
    install_shim2(p, cmd, &script);
}

fn refusals(p: &Project) -> usize {
    std::fs::read_to_string(p.path().join("refusals.log")).unwrap_or_default().lines().count()
}

/// Four data instances run with the executor block `executor` under a limit of `limit` jobs
/// queued at once: the project, and the controller's exit code and output.
fn four_under_a_limit(executor: &str, limit: usize) -> (Project, i32, String) {
    let p = slurm_project(&(DATA_ONLY.replace("count: 8, ", "") + "    sweep:\n      grid:\n        count: [8, 9, 10, 11]\n"));
    let prof = profile(&p, &format!("{FAST_POLL}{executor}"));
    let mut cmd = slurm_cmd(&p, &prof, &p.cache());
    limiting_sbatch(&p, &mut cmd, limit);
    let (code, out) = watch(cmd).finish(Duration::from_secs(120));
    (p, code, out)
}

/// A limit on the jobs a user may have queued (Slurm's `MaxSubmitJobs`, here 2) refuses the
/// third of four single jobs: the run keeps two in flight and submits the rest as they end,
/// each instance once, instead of failing them as a refusal of their settings.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_submit_limit_is_waited_out_with_this_runs_jobs_in_flight() {
    let (p, code, out) = four_under_a_limit(ONE_PER_JOB, 2);
    assert_eq!(code, 0, "{out}");
    assert!(refusals(&p) >= 1, "the shim refused a submission:\n{out}");
    assert!(out.contains("while 2 of this run's were queued or running: a limit on the jobs you may have queued at once"), "{out}");
    assert!(out.contains("camflow keeps at most 2 in flight from now on"), "{out}");
    assert!(out.contains("summary: ran=4"), "{out}");
    assert_eq!(submissions(&p).len(), 4, "each instance submitted once");
    assert_eq!(records(&p.cache()), 4);
}

/// The same limit met by one job array larger than it, with nothing else queued: the array is
/// halved until it fits, and the rest follows as its tasks end.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_array_over_the_submit_limit_is_split() {
    let (p, code, out) = four_under_a_limit("  arrays: true\n  on_controller: []\n", 2);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Slurm refused an array of 4 tasks of stage `data`"), "{out}");
    assert!(out.contains("while 0 of this run's were queued or running"), "{out}");
    assert!(out.contains("camflow keeps at most 2 in flight from now on, in smaller arrays"), "{out}");
    assert!(out.contains("summary: ran=4"), "{out}");
    assert_eq!(records(&p.cache()), 4);
    let log = std::fs::read_to_string(p.path().join("sbatch.log")).expect("sbatch.log");
    assert!(log.lines().filter(|l| l.starts_with("0\t")).all(|l| !l.contains("--array=0-3")), "no array over the limit:\n{log}");
}

/// With nothing of this run in flight and one job refused, the limit cannot clear by waiting
/// for this run: it fails at once as a refusal, saying what the limit may be.
#[test]
#[ignore = "needs a Slurm cluster: CAMFLOW_SLURM_TESTS=1, see tests/e2e/slurm.rs"]
fn slurm_submit_limit_with_nothing_in_flight_fails_naming_both_causes() {
    let p = slurm_project(DATA_ONLY);
    let prof = profile(&p, FAST_POLL);
    let mut cmd = slurm_cmd(&p, &prof, &p.cache());
    limiting_sbatch(&p, &mut cmd, 0);
    let (code, out) = watch(cmd).finish(Duration::from_secs(60));
    assert_eq!(code, 2, "a configuration error:\n{out}");
    assert!(out.contains("Slurm refused the job of stage `data` (kind `data`)"), "{out}");
    assert!(out.contains("no other job of this run was queued or running"), "{out}");
    assert!(out.contains("see `squeue --me`"), "{out}");
    assert_eq!(refusals(&p), 1, "tried once: {out}");
}
