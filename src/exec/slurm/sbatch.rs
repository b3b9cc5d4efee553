//! Talking to Slurm: the arguments of `sbatch` built from resources and the executor block,
//! and the parsing of what `sbatch`, `squeue`, `scontrol` and `sacct` print. Pure functions
//! (the commands themselves are run by the runner), so each is tested on real output.

use std::collections::HashMap;

use crate::spec::executor::{ExecutorConfig, KindSettings, slurm_time};
use crate::stage_kind::Resources;

/// One submission: everything `sbatch` is told besides the command.
pub struct Submission<'a> {
    pub stage: &'a str,
    pub res: &'a Resources,
    pub settings: &'a KindSettings,
    /// `--output`, with `%j` or `%A_%a`.
    pub log_pattern: &'a str,
    /// `Some(n)`: a job array of tasks `0..n`.
    pub array: Option<usize>,
    /// The shell command the job runs.
    pub command: &'a str,
}

/// `sbatch` arguments: `--parsable`, the job name, log, cluster settings, then resources
/// (the kind's `kinds:` entry over the stage's `resources`), then extra options (the block's,
/// then the kind's: later ones win in sbatch), then the command as `--wrap`.
pub fn sbatch_args(cfg: &ExecutorConfig, s: &Submission<'_>) -> Vec<String> {
    let mut a = vec!["--parsable".to_string(), format!("--job-name=camflow-{}", s.stage), format!("--output={}", s.log_pattern)];
    for (flag, v) in [("partition", &cfg.partition), ("account", &cfg.account), ("qos", &cfg.qos)] {
        if let Some(v) = v {
            a.push(format!("--{flag}={v}"));
        }
    }
    if let Some(n) = s.array {
        a.push(format!("--array=0-{}", n.saturating_sub(1)));
    }
    // `cpu: u32::MAX` means "all cores of the machine" locally; a cluster has no such request,
    // so none is made (the cluster's default, or `kinds.<kind>.sbatch: [--cpus-per-task=N]`).
    if s.res.cpu > 0 && s.res.cpu <= 1024 {
        a.push(format!("--cpus-per-task={}", s.res.cpu));
    }
    // Slurm hands out whole GPUs: a fraction (`gpu: 0.25`) asks for the one device it is on.
    if !s.res.gpu.is_none() {
        a.push(format!("--gres=gpu:{}", s.res.gpu.devices()));
    }
    if let Some(m) = s.settings.mem.or(s.res.mem) {
        a.push(format!("--mem={m}M"));
    }
    if let Some(t) = s.settings.time.or(s.res.time) {
        a.push(format!("--time={}", slurm_time(t)));
    }
    a.extend(cfg.sbatch.iter().cloned());
    a.extend(s.settings.sbatch.iter().flatten().cloned());
    a.push(format!("--wrap={}", s.command));
    a
}

/// The `--wrap` script of a job: `camflow worker` on its job file, told its task and job id
/// from the variables Slurm sets for *this* job. The worker does not read `SLURM_ARRAY_*`
/// itself: sbatch exports the submitter's environment, so in a plain job submitted by a
/// controller that itself runs in an array task those variables are the controller's.
pub fn worker_command(exe: &str, root: &str, job_file: &str, array: bool) -> String {
    let ids = if array {
        r#"--task "$SLURM_ARRAY_TASK_ID" --job-id "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}""#
    } else {
        r#"--job-id "$SLURM_JOB_ID""#
    };
    format!("exec {} worker --cache {} {ids} {}", shell_quote(exe), shell_quote(root), shell_quote(job_file))
}

/// Variables of the submitter's own Slurm job that must not reach the jobs it submits
/// (sbatch exports its environment; Slurm sets these only in an array job, so a plain job
/// would inherit the controller's): removed from sbatch's environment.
pub const SUBMITTER_ONLY_VARS: &[&str] = &[
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
];

/// `dir` as the folder part of an sbatch filename pattern (`--output`): sbatch expands `%x`,
/// `%j`, ... anywhere in the pattern, so a `%` in the path itself is written `%%`; `file` (with
/// the pattern's own `%j` or `%A_%a`) is appended as is.
pub fn filename_pattern(dir: &str, file: &str) -> String {
    format!("{}/{file}", dir.trim_end_matches('/').replace('%', "%%"))
}

/// `word` quoted for `/bin/sh` (the `--wrap` script).
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-=+:,@%".contains(&b)) {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// What a failed Slurm command said, as one message: its stderr then its stdout (separated),
/// prefixed with the program's name unless the message already starts with it (Slurm's own
/// messages do: `sbatch: error: ...`).
pub fn command_error(program: &str, stderr: &str, stdout: &str) -> String {
    let said: Vec<&str> = [stderr.trim(), stdout.trim()].into_iter().filter(|s| !s.is_empty()).collect();
    let text = if said.is_empty() { "failed and printed nothing".to_string() } else { said.join("; ").replace('\n', "; ") };
    if text.starts_with(&format!("{program}:")) { text } else { format!("{program}: {text}") }
}

/// How many times one submission is tried when sbatch fails for a reason that passes
/// ([`transient`]), and the wait before the second try (doubled before each next one: 2, 4,
/// 8 s, long enough for a busy slurmctld to catch up, short enough not to stall a run).
pub const SBATCH_TRIES: u32 = 4;
pub const SBATCH_FIRST_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether an sbatch error is the controller being busy or briefly unreachable (worth trying
/// again) rather than a refusal of the job's settings (invalid partition, account, QOS or
/// option; memory or nodes no node has), which fails the same way every time.
pub fn transient(error: &str) -> bool {
    const PASSING: &[&str] = &[
        "socket timed out",
        "temporarily unable to accept job",
        "resource temporarily unavailable",
        "unable to contact slurm controller",
        "connection refused",
        "zero bytes were transmitted",
        "communication connection failure",
        "slurmctld is not responding",
        "try again",
    ];
    let e = error.to_ascii_lowercase();
    PASSING.iter().any(|p| e.contains(p))
}

/// Whether a refused submission may be a limit on how many jobs a user (or account) may have
/// queued and running at once (`MaxSubmitJobs`, `GrpSubmitJobs` of a QOS or association): a
/// limit that clears as those jobs end, unlike a refusal of the job's own request. Slurm gives
/// one error for every accounting limit ("Job violates accounting/QOS policy (job submit limit,
/// user's size and/or time limits)"), usually after a line that names the limit
/// (`sbatch: error: QOSMaxSubmitJobPerUserLimit`): a named submit limit is one; any other named
/// limit (`QOSMaxWallDurationPerJobLimit`, `QOSMaxCpuPerUserLimit`, `QOSMinCpuNotSatisfied`, ...)
/// is not; the bare error may be either.
pub fn maybe_submit_limit(error: &str) -> bool {
    // `command_error` joins sbatch's lines with "; ".
    let named: Vec<&str> = error
        .split([';', '\n'])
        .filter_map(|line| line.trim().strip_prefix("sbatch: error: "))
        .map(str::trim)
        .filter(|w| w.len() > 3 && w.bytes().all(|b| b.is_ascii_alphanumeric()) && w.bytes().any(|b| b.is_ascii_uppercase()))
        .collect();
    if named.iter().any(|w| w.contains("SubmitJob")) {
        return true;
    }
    named.is_empty() && error.to_ascii_lowercase().contains("job submit limit")
}

/// The job id from `sbatch --parsable` (`123` or `123;cluster`).
pub fn parse_sbatch_id(stdout: &str) -> Option<String> {
    let id = stdout.trim().split(';').next()?.trim();
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then(|| id.to_string())
}

/// Chunks `items` into tasks of at most `per_task` (at least 1) items, in order.
pub fn batches<T>(items: Vec<T>, per_task: usize) -> Vec<Vec<T>> {
    let per = per_task.max(1);
    let mut out: Vec<Vec<T>> = Vec::with_capacity(items.len().div_ceil(per));
    for it in items {
        match out.last_mut() {
            Some(last) if last.len() < per => last.push(it),
            _ => out.push(vec![it]),
        }
    }
    out
}

/// One task in the queue: its state (`%T`) and, when Slurm gives one, the reason it is in that
/// state (`%r`: `Priority`, `JobHeldAdmin`, `PartitionTimeLimit`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub state: String,
    pub reason: Option<String>,
}

/// What `squeue` is asked to print per task (one line each with `-r`).
pub const SQUEUE_FORMAT: &str = "%i|%T|%r";

/// `squeue` arguments for this user's tasks: `--me`, or `-u <uid>` where squeue is older than
/// 20.11 and does not know `--me`.
pub fn squeue_args(uid: Option<u32>) -> Vec<String> {
    let mut a: Vec<String> = match uid {
        Some(u) => vec!["-u".into(), u.to_string()],
        None => vec!["--me".into()],
    };
    a.extend(["-h", "-r", "-o", SQUEUE_FORMAT].map(String::from));
    a
}

/// `squeue -h -r -o %i|%T|%r` output: task id (`123`, `123_4`) -> state and reason. Lines that
/// are not of that shape are ignored; a reason of `None` is no reason.
pub fn parse_squeue(text: &str) -> HashMap<String, Queued> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, '|');
            let (id, state) = (f.next()?.trim(), f.next()?.trim());
            let reason = f.next().map(str::trim).filter(|r| !r.is_empty() && *r != "None" && *r != "(null)").map(str::to_string);
            (!id.is_empty() && !state.is_empty()).then(|| (id.to_string(), Queued { state: state.to_string(), reason }))
        })
        .collect()
}

/// What a pending task's reason means for the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The usual waits of a busy queue (priority, resources, a begin time, a dependency):
    /// worth a line only when they last.
    Queue,
    /// Held (by an administrator or the user, or after a failed launch): it starts only once
    /// someone releases it, so the user is told at once, but it is not a failure.
    Held,
    /// Anything else Slurm says: told at once, never a failure (camflow cannot know it lasts).
    Other,
    /// The job can never start as submitted: Slurm (with `EnforcePartLimits=NO`, its default)
    /// keeps it pending for ever, so the controller cancels it and fails its instances.
    Never,
}

/// Classifies a pending task's `%r` reason (Slurm's `job_reason` names).
pub fn waiting(reason: &str) -> Waiting {
    const QUEUE: &[&str] = &[
        "Priority",
        "Resources",
        "Dependency",
        "BeginTime",
        "JobArrayTaskLimit",
        "Prolog",
        "Reservation",
        "Licenses",
        "Nodes_required_for_job_are_DOWN,_DRAINED_or_reserved_for_jobs_in_higher_priority_partitions",
    ];
    const NEVER: &[&str] = &["PartitionTimeLimit", "PartitionConfig", "BadConstraints", "DependencyNeverSatisfied"];
    // `*PerJob*`: a per-job limit of a QOS or association (wall time, CPUs, memory, GRES,
    // nodes) that this job's own request exceeds; only a smaller request helps. Not here, as
    // an administrator may clear them and the job then starts: `PartitionDown` and
    // `PartitionInactive`; `PartitionNodeLimit` (also given while the nodes a job needs are
    // down or drained, as in a maintenance); account and QOS reasons of a job already pending
    // (`InvalidAccount`, `InvalidQOS`, `AccountNotAllowed`, `QOSNotAllowed`: sbatch refuses a
    // bad one at submission, so pending with one means an administrator changed something).
    // Those are told at once, never failed.
    if NEVER.contains(&reason) || reason.contains("PerJob") {
        return Waiting::Never;
    }
    // `JobHeldAdmin`, `JobHeldUser`, and `launch failed requeued held`; never a node name
    // that merely holds the letters (`sheldon01`).
    if reason.starts_with("JobHeld") || reason.ends_with(" held") {
        return Waiting::Held;
    }
    if QUEUE.contains(&reason) || reason.starts_with("QOSGrp") || reason.starts_with("AssocGrp") || reason.ends_with("PerUserLimit") {
        // Group and per-user limits clear as this user's other jobs finish.
        return Waiting::Queue;
    }
    Waiting::Other
}

/// What to change when a task pends for `reason` ([`Waiting::Never`]) or is held: names the
/// executor setting of `kind` (or stage `stage`) and the request camflow made (`request`, see
/// [`request_args`]).
pub fn advice(reason: &str, stage: &str, kind: &str, request: &[String]) -> String {
    let arg = |flag: &str| request.iter().find(|a| a.starts_with(flag)).cloned();
    let asked = |flag: &str| arg(flag).map(|a| format!(" (the job asks {a})")).unwrap_or_default();
    let field = |f: &str| format!("`executor.kinds.{kind}.{f}` (or `kinds.{stage}.{f}`, or the stage's `resources.{f}`)");
    let r = reason.to_ascii_lowercase();
    let what = if r.contains("time") || r.contains("wall") {
        format!(
            "its time limit is over what the partition or QOS allows{}: lower {} or choose another `partition`/`qos`",
            asked("--time="),
            field("time")
        )
    } else if r.contains("cpu") {
        format!("it asks for more CPUs than allowed{}: lower {}", asked("--cpus-per-task="), field("cpu"))
    } else if r.contains("mem") {
        format!("it asks for more memory than allowed{}: lower {}", asked("--mem="), field("mem"))
    } else if r.contains("gres") {
        format!("it asks for more GPUs or other GRES than allowed{}: lower {}", asked("--gres="), field("gpu"))
    } else if r.contains("node") {
        format!("it asks for more nodes than the partition or QOS allows: check `executor.sbatch` and `executor.kinds.{kind}.sbatch`")
    } else if reason == "InvalidAccount" || reason == "AccountNotAllowed" {
        format!("the account is not valid here{}: check `executor.account`", asked("--account="))
    } else if reason == "InvalidQOS" || reason == "QOSNotAllowed" {
        format!("the QOS is not valid here{}: check `executor.qos`", asked("--qos="))
    } else if reason == "BadConstraints" {
        format!(
            "no node can ever meet its request: check `cpu`, `mem` and `gpu` of kind `{kind}` and the `sbatch` options (`--constraint`)"
        )
    } else if reason == "PartitionConfig" {
        format!(
            "its request does not fit the partition's configuration{}: check `executor.partition`, `account`, `qos` and the requests of kind `{kind}`",
            asked("--partition=")
        )
    } else if reason == "DependencyNeverSatisfied" {
        "a job it depends on ended without satisfying it: fix or remove `--dependency` in the `sbatch` options".to_string()
    } else if reason == "JobHeldUser" {
        "held by its user (`--hold` in the `sbatch` options?): `scontrol release <job>` starts it".to_string()
    } else if reason.starts_with("JobHeld") || r.contains("held") {
        "held by the cluster (an administrator, or a launch that failed): `scontrol release <job>` starts it, `scancel` gives up"
            .to_string()
    } else {
        format!("check the requests of kind `{kind}` against the cluster's limits")
    };
    if request.is_empty() { what } else { format!("{what}; camflow asked: {}", request.join(" ")) }
}

/// The arguments of a submission that say what the job asks of the cluster: without the ones
/// that differ between two submissions of the same request (`--parsable`, the log pattern,
/// the array range and the command, which names the job file).
pub fn request_args(args: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| !(*a == "--parsable" || a.starts_with("--output=") || a.starts_with("--array=") || a.starts_with("--wrap=")))
        .cloned()
        .collect()
}

/// How `old` (a recorded submission's request) differs from `new` (this run's), as
/// `--time=01:00:00 (now --time=00:02:00)`; `None` when they are the same.
pub fn request_difference(old: &[String], new: &[String]) -> Option<String> {
    if old == new {
        return None;
    }
    let flag = |a: &str| a.split_once('=').map(|(f, _)| f.to_string()).unwrap_or_else(|| a.to_string());
    let mut parts = Vec::new();
    for a in old.iter().filter(|a| !new.contains(a)) {
        match new.iter().find(|b| !old.contains(b) && flag(b) == flag(a)) {
            Some(b) => parts.push(format!("{a} (now {b})")),
            None => parts.push(format!("{a} (now not asked)")),
        }
    }
    for b in new.iter().filter(|b| !old.contains(b) && !old.iter().any(|a| flag(a) == flag(b))) {
        parts.push(format!("no {b} (now asked)"));
    }
    if parts.is_empty() {
        // Same arguments in another order: later ones win in sbatch, so the order matters.
        parts.push(format!("{} (now {})", old.join(" "), new.join(" ")));
    }
    Some(parts.join(", "))
}

/// `JobState` and `Reason` from `scontrol show job` output.
pub fn parse_scontrol(text: &str) -> Option<(String, Option<String>)> {
    let field = |name: &str| {
        text.split_whitespace().find_map(|w| w.strip_prefix(name).map(str::to_string)).filter(|v| !v.is_empty() && v != "None")
    };
    Some((field("JobState=")?, field("Reason=")))
}

/// The state from `sacct -n -X -P -o JobID,State -j ID` output: the line of `id`. sacct
/// prints `CANCELLED by 0`: the first word is the state.
pub fn parse_sacct(text: &str, id: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (jid, state) = l.trim().split_once('|')?;
        (jid == id).then(|| state.split_whitespace().next().unwrap_or("").to_string()).filter(|s| !s.is_empty())
    })
}

/// Tasks per array when the cluster does not say: Slurm's default `MaxArraySize` is 1001
/// (indices 0 to 1000); 1000 stays within it.
pub const DEFAULT_MAX_ARRAY_SIZE: usize = 1000;

/// Tasks one array may hold, from `scontrol show config` (`MaxArraySize = 1001` allows
/// indices 0 to 1000).
pub fn parse_max_array_size(text: &str) -> Option<usize> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "MaxArraySize").then(|| v.trim().parse::<usize>().ok()).flatten().filter(|n| *n > 1).map(|n| n - 1)
    })
}

/// What a final Slurm state means for the instances of a job that left no outcome.
pub fn explain_state(state: &str) -> &'static str {
    match state {
        "TIMEOUT" => "the job hit its time limit (raise `time` for this stage or kind)",
        "OUT_OF_MEMORY" => "the job ran out of memory (raise `mem` for this stage or kind)",
        "PREEMPTED" => "the job was preempted by the scheduler",
        "NODE_FAIL" => "the job's node failed",
        "CANCELLED" => "the job was cancelled (scancel)",
        "BOOT_FAIL" => "the job's node failed to boot",
        "DEADLINE" => "the job missed its deadline",
        "FAILED" => "the job exited with an error before camflow recorded an outcome",
        "COMPLETED" => "the job completed without camflow recording an outcome",
        _ => "the job ended without camflow recording an outcome",
    }
}

/// Whether a failure in this state is worth resubmitting (`retries`): a job the user cancelled
/// is not.
pub fn retryable(state: &str) -> bool {
    state != "CANCELLED"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::executor::ExecutorSpec;

    #[test]
    fn sbatch_arguments_from_resources_and_config() {
        let mut spec = ExecutorSpec { partition: Some("debug".into()), sbatch: Some(vec!["--nice=10".into()]), ..Default::default() };
        spec.qos = Some("low".into());
        let cfg = spec.resolve();
        let res = Resources { cpu: 2, gpu: crate::stage_kind::GpuShare::whole(1), mem: Some(512), time: Some(90) };
        let settings = KindSettings { mem: Some(4096), sbatch: Some(vec!["--exclusive".into()]), ..Default::default() };
        let s = Submission {
            stage: "train",
            res: &res,
            settings: &settings,
            log_pattern: "/c/logs/slurm/%A_%a.out",
            array: Some(12),
            command: "exec /bin/camflow worker --cache /c /c/slurm/jobs/x.json",
        };
        assert_eq!(
            sbatch_args(&cfg, &s),
            [
                "--parsable",
                "--job-name=camflow-train",
                "--output=/c/logs/slurm/%A_%a.out",
                "--partition=debug",
                "--qos=low",
                "--array=0-11",
                "--cpus-per-task=2",
                "--gres=gpu:1",
                "--mem=4096M",
                "--time=00:01:30",
                "--nice=10",
                "--exclusive",
                "--wrap=exec /bin/camflow worker --cache /c /c/slurm/jobs/x.json",
            ]
        );
        let all = Resources { cpu: u32::MAX, ..Default::default() };
        let plain = sbatch_args(&cfg, &Submission { res: &all, settings: &KindSettings::default(), array: None, ..s });
        assert!(!plain.iter().any(|a| a.starts_with("--cpus-per-task") || a.starts_with("--array") || a.starts_with("--mem")), "{plain:?}");
    }

    #[test]
    fn command_errors_read_as_one_message() {
        assert_eq!(
            command_error("sbatch", "sbatch: error: invalid partition specified: x\nsbatch: error: Batch job submission failed\n", ""),
            "sbatch: error: invalid partition specified: x; sbatch: error: Batch job submission failed"
        );
        assert_eq!(command_error("squeue", "boom", "out"), "squeue: boom; out");
        assert_eq!(command_error("scancel", "", ""), "scancel: failed and printed nothing");
    }

    /// The worker is told its task and job id from this job's own variables (finding 3).
    #[test]
    fn the_worker_command_names_its_task_and_job() {
        assert_eq!(
            worker_command("/bin/camflow", "/my cache", "/c/j.json", false),
            r#"exec /bin/camflow worker --cache '/my cache' --job-id "$SLURM_JOB_ID" /c/j.json"#
        );
        assert_eq!(
            worker_command("/bin/camflow", "/c", "/c/j.json", true),
            r#"exec /bin/camflow worker --cache /c --task "$SLURM_ARRAY_TASK_ID" --job-id "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" /c/j.json"#
        );
    }

    /// Finding 6: the controller's passing troubles are tried again; a refusal of the
    /// settings is not.
    #[test]
    fn transient_sbatch_errors_are_told_from_refusals() {
        for e in [
            "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation",
            "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying",
            "sbatch: error: Batch job submission failed: Resource temporarily unavailable",
            "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
        ] {
            assert!(transient(e), "{e}");
        }
        for e in [
            "sbatch: error: invalid partition specified: gpu-long; sbatch: error: Batch job submission failed: Invalid partition name specified",
            "sbatch: error: Memory specification can not be satisfied; sbatch: error: Batch job submission failed: Requested node configuration is not available",
            "sbatch: unrecognized option '--mem 4G'",
            "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
        ] {
            assert!(!transient(e), "{e}");
        }
    }

    /// A limit on the jobs queued at once (which clears as they end) is told from a refusal of
    /// the job's own size or time, as far as sbatch's words allow.
    #[test]
    fn submit_limits_are_told_from_per_job_limits() {
        const POLICY: &str = "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)";
        for e in [
            format!("sbatch: error: QOSMaxSubmitJobPerUserLimit; {POLICY}"),
            format!("sbatch: error: AssocMaxSubmitJobLimit; {POLICY}"),
            format!("sbatch: error: QOSGrpSubmitJobsLimit; {POLICY}"),
            POLICY.to_string(),
        ] {
            assert!(maybe_submit_limit(&e), "{e}");
            assert!(!transient(&e), "a limit is not a passing trouble: {e}");
        }
        for e in [
            format!("sbatch: error: QOSMaxWallDurationPerJobLimit; {POLICY}"),
            format!("sbatch: error: AssocMaxCpuPerJobLimit; {POLICY}"),
            format!("sbatch: error: QOSMaxCpuPerUserLimit; {POLICY}"),
            format!("sbatch: error: QOSMinCpuNotSatisfied; {POLICY}"),
            "sbatch: error: Batch job submission failed: Invalid partition name specified".to_string(),
            "sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)".to_string(),
        ] {
            assert!(!maybe_submit_limit(&e), "{e}");
        }
    }

    /// Finding 4: what a recorded submission asked, against this run's request.
    #[test]
    fn request_differences_name_the_old_and_new_values() {
        let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let full = v(&["--parsable", "--job-name=camflow-train", "--output=/c/%j.out", "--array=0-3", "--time=01:00:00", "--wrap=exec x"]);
        assert_eq!(request_args(&full), v(&["--job-name=camflow-train", "--time=01:00:00"]));
        let old = v(&["--job-name=camflow-train", "--time=01:00:00", "--hold"]);
        assert_eq!(request_difference(&old, &old), None);
        let new = v(&["--job-name=camflow-train", "--time=00:02:00", "--mem=1024M"]);
        assert_eq!(
            request_difference(&old, &new).as_deref(),
            Some("--time=01:00:00 (now --time=00:02:00), --hold (now not asked), no --mem=1024M (now asked)")
        );
        let swapped = v(&["--hold", "--job-name=camflow-train", "--time=01:00:00"]);
        assert!(request_difference(&old, &swapped).is_some(), "order matters to sbatch");
    }

    /// Finding 9: a `%` in the cache path reaches sbatch as `%%`, the pattern's own as is.
    #[test]
    fn a_percent_in_the_log_folder_is_escaped() {
        assert_eq!(filename_pattern("/c/P%x dir/logs/slurm", "%j.out"), "/c/P%%x dir/logs/slurm/%j.out");
        assert_eq!(filename_pattern("/c/logs/", "%A_%a.out"), "/c/logs/%A_%a.out");
    }

    #[test]
    fn quoting_and_ids() {
        assert_eq!(shell_quote("/a/b.json"), "/a/b.json");
        assert_eq!(shell_quote("/my dir/it's"), r"'/my dir/it'\''s'");
        assert_eq!(parse_sbatch_id("1234\n"), Some("1234".into()));
        assert_eq!(parse_sbatch_id("77;cluster1\n"), Some("77".into()));
        assert_eq!(parse_sbatch_id("sbatch: error: invalid partition"), None);
    }

    #[test]
    fn batches_keep_order_and_size() {
        assert_eq!(batches((0..7).collect(), 3), vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert_eq!(batches((0..2).collect(), 0), vec![vec![0], vec![1]]);
        assert!(batches(Vec::<u8>::new(), 5).is_empty());
    }

    #[test]
    fn queue_and_state_parsing_on_real_output() {
        // squeue -h -r -o '%i|%T|%r' on Slurm 22.05, an array with two tasks pending.
        let q = parse_squeue(
            "41_0|RUNNING|None\n41_1|PENDING|Priority\n42|COMPLETING|None\n43|PENDING|launch failed requeued held\n\ngarbage\n",
        );
        assert_eq!(q.get("41_1"), Some(&Queued { state: "PENDING".into(), reason: Some("Priority".into()) }));
        assert_eq!(q.get("42"), Some(&Queued { state: "COMPLETING".into(), reason: None }));
        assert_eq!(q.get("43").and_then(|x| x.reason.as_deref()), Some("launch failed requeued held"));
        assert_eq!(q.len(), 4);
        assert_eq!(squeue_args(None)[..2], ["--me", "-h"]);
        assert_eq!(squeue_args(Some(1000))[..3], ["-u", "1000", "-h"]);
        // Without a reason column (an older format): the state alone.
        assert_eq!(parse_squeue("7|RUNNING\n").get("7"), Some(&Queued { state: "RUNNING".into(), reason: None }));
        // scontrol show job (abridged, as 22.05 prints it).
        let text = "JobId=57 JobName=camflow-train\n   UserId=root(0) GroupId=root(0) MCS_label=N/A\n   Priority=4294901703 Nice=0 Account=(null) QOS=(null)\n   JobState=TIMEOUT Reason=TimeLimit Dependency=(null)\n   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:15\n";
        assert_eq!(parse_scontrol(text), Some(("TIMEOUT".into(), Some("TimeLimit".into()))));
        assert_eq!(parse_scontrol("JobState=CANCELLED Reason=None Dependency=(null)"), Some(("CANCELLED".into(), None)));
        assert_eq!(parse_scontrol("slurm_load_jobs error: Invalid job id specified"), None);
        assert_eq!(parse_sacct("57|CANCELLED by 0\n58|COMPLETED\n", "57"), Some("CANCELLED".into()));
        assert_eq!(parse_sacct("", "57"), None);
        assert_eq!(parse_max_array_size("MaxArraySize            = 10001\nMaxJobCount = 5\n"), Some(10000));
        assert_eq!(parse_max_array_size("nothing"), None);
        assert!(explain_state("OUT_OF_MEMORY").contains("memory") && !retryable("CANCELLED") && retryable("NODE_FAIL"));
    }

    /// Reasons that never clear fail the job; holds and other waits are told, never failed.
    #[test]
    fn pending_reasons_are_classified() {
        for r in [
            "PartitionTimeLimit",
            "PartitionConfig",
            "BadConstraints",
            "DependencyNeverSatisfied",
            "QOSMaxWallDurationPerJobLimit",
            "QOSMaxCpuPerJobLimit",
            "QOSMaxMemoryPerJob",
            "AssocMaxWallDurationPerJobLimit",
        ] {
            assert_eq!(waiting(r), Waiting::Never, "{r}");
        }
        for r in ["JobHeldAdmin", "JobHeldUser", "launch failed requeued held"] {
            assert_eq!(waiting(r), Waiting::Held, "{r}");
        }
        for r in ["Priority", "Resources", "Dependency", "BeginTime", "QOSGrpCpuLimit", "AssocGrpJobsLimit", "QOSMaxJobsPerUserLimit"] {
            assert_eq!(waiting(r), Waiting::Queue, "{r}");
        }
        // An administrator may clear these: told, never failed.
        for r in ["ReqNodeNotAvail", "PartitionDown", "PartitionInactive", "PartitionNodeLimit", "InvalidAccount", "InvalidQOS", "Something new", "ReqNodeNotAvail,_UnavailableNodes:sheldon01"] {
            assert_eq!(waiting(r), Waiting::Other, "{r}");
        }
    }

    /// The advice for a job that can never start names the setting and what was asked.
    #[test]
    fn advice_names_the_setting_and_the_request() {
        let req: Vec<String> = ["--job-name=camflow-train", "--partition=short", "--time=01:00:00"].map(String::from).to_vec();
        let a = advice("PartitionTimeLimit", "train", "train", &req);
        assert!(a.contains("(the job asks --time=01:00:00)") && a.contains("`executor.kinds.train.time`"), "{a}");
        assert!(a.ends_with("camflow asked: --job-name=camflow-train --partition=short --time=01:00:00"), "{a}");
        assert!(advice("QOSMaxWallDurationPerJobLimit", "big", "train", &[]).contains("`kinds.big.time`"));
        assert!(advice("QOSMaxCpuPerJobLimit", "s", "train", &[]).contains(".cpu`"));
        assert!(advice("InvalidAccount", "s", "train", &[]).contains("`executor.account`"));
        assert!(advice("DependencyNeverSatisfied", "s", "train", &[]).contains("--dependency"));
        assert!(advice("JobHeldUser", "s", "train", &[]).contains("scontrol release"));
    }
}
