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

/// `word` quoted for `/bin/sh` (the `--wrap` script).
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-=+:,@%".contains(&b)) {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
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

/// `squeue -h -r -o %i|%T` output: task id (`123`, `123_4`) -> state. Lines that are not of
/// that shape are ignored.
pub fn parse_squeue(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let (id, state) = l.trim().split_once('|')?;
            let state = state.split('|').next()?.trim();
            (!id.is_empty() && !state.is_empty()).then(|| (id.trim().to_string(), state.to_string()))
        })
        .collect()
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
        // squeue -h -r -o '%i|%T' on Slurm 22.05, an array with two tasks pending.
        let q = parse_squeue("41_0|RUNNING\n41_1|PENDING\n42|COMPLETING\n\ngarbage\n");
        assert_eq!(q.get("41_1").map(String::as_str), Some("PENDING"));
        assert_eq!(q.get("42").map(String::as_str), Some("COMPLETING"));
        assert_eq!(q.len(), 3);
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
}
