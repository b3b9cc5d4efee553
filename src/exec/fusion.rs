//! Fused groups: ready stale instances whose stage kinds give equal
//! [`StageKind::fusion_key`](crate::stage_kind::StageKind::fusion_key)s run as one task,
//! through [`StageKind::run_group`](crate::stage_kind::StageKind::run_group).
//!
//! The executor knows nothing of what a group does (for a training: `ml::fused`). It only
//! forms groups (by key, in instance index order, at most `max` members, so the same plan
//! gives the same groups), gives a group the CPU slots its largest member would hold, and
//! runs each member through the same three phases as an instance alone (`job.rs`): every
//! member is claimed under its own key lock (one found computed meanwhile is simply reused),
//! and published under its own key with its own log. A member whose result in the group is
//! an error, or all members if the group panics, run again alone, so a group never fails an
//! instance that would have succeeded alone.

use std::collections::BTreeMap;
use std::time::Instant;

use super::job::{Claim, Claimed, Done, Job, JobError, StageRun};
use crate::stage_kind::{Catalog, Progress, RunContext};
use crate::sweep::Instance;

/// `instance`'s fusion key, or `None` when it runs alone (fusion off, or its kind never fuses).
pub(crate) fn key(catalog: &Catalog, instance: &Instance, backend: &str, max_group: usize) -> Option<String> {
    if max_group < 2 {
        return None;
    }
    catalog.get(&instance.kind)?.fusion_key(&instance.params, backend)
}

/// Splits `candidates` (index, key) into groups of equal key, each at most `max` long, in
/// index order (a group's place is its first member's).
pub(crate) fn groups(candidates: &[(usize, String)], max: usize) -> Vec<Vec<usize>> {
    let mut sorted = candidates.to_vec();
    sorted.sort();
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, k) in &sorted {
        by_key.entry(k.as_str()).or_default().push(*i);
    }
    let mut out: Vec<Vec<usize>> = by_key.values().flat_map(|v| v.chunks(max.max(1)).map(<[usize]>::to_vec)).collect();
    out.sort();
    out
}

/// Runs a group's jobs and gives each member's result, in member order.
///
/// Key locks are taken in digest order, so two groups (or a group and a lone job) never wait
/// for each other's locks in a cycle. A member whose key another member already holds
/// (equal params and inputs) is claimed only after that member is published: it is then
/// simply reused, instead of waiting for a lock its own task holds.
pub(crate) fn run_group(jobs: Vec<Job>) -> Vec<(usize, Result<Done, JobError>)> {
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by(|&a, &b| jobs[a].digest.cmp(&jobs[b].digest).then(a.cmp(&b)));
    let (mut first, mut later) = (Vec::new(), Vec::new());
    for m in order {
        if first.last().is_some_and(|&f: &usize| jobs[f].digest == jobs[m].digest) { later.push(m) } else { first.push(m) }
    }
    let mut results: Vec<Option<Result<Done, JobError>>> = jobs.iter().map(|_| None).collect();
    let mut mine: Vec<(usize, Claimed)> = Vec::new();
    for m in first {
        match jobs[m].claim() {
            Ok(Claim::Reused(rec)) => results[m] = Some(Ok(Done::Reused(rec))),
            Ok(Claim::Mine(claimed)) => mine.push((m, claimed)),
            Err(e) => results[m] = Some(Err(e)),
        }
    }
    mine.sort_by_key(|(m, _)| *m);
    let runs = if mine.len() > 1 { run_together(&jobs, &mine) } else { mine.iter().map(|_| None).collect() };
    for ((m, claimed), run) in mine.into_iter().zip(runs) {
        let job = &jobs[m];
        // Alone: a lone claimed member, or one whose result in the group was an error.
        let run = run.unwrap_or_else(|| job.run_stage(&claimed));
        results[m] = Some(job.publish(claimed, run));
    }
    for m in later {
        results[m] = Some(jobs[m].run());
    }
    jobs.iter().zip(results).map(|(job, r)| (job.idx, r.unwrap_or_else(|| Err(no_result(job))))).collect()
}

/// A member left without a result: a bug in this file, reported as the member's failure.
fn no_result(job: &Job) -> JobError {
    JobError { msg: format!("{}: internal error: the fused group gave no result", job.input.instances[job.idx].label), log: None, cache: false }
}

/// One `run_group` call over the claimed members; `None` for a member that must run alone.
fn run_together(jobs: &[Job], mine: &[(usize, Claimed)]) -> Vec<Option<StageRun>> {
    let first = &jobs[mine[0].0];
    let Some(kind) = first.catalog.get(&first.input.instances[first.idx].kind) else {
        return mine.iter().map(|_| None).collect();
    };
    let started = Instant::now();
    let mut logs: Vec<Vec<String>> = vec![Vec::new(); mine.len()];
    let result = {
        let mut log_fns: Vec<Box<dyn FnMut(String) + '_>> = logs
            .iter_mut()
            .zip(mine)
            .map(|(lines, (m, _))| {
                let label = jobs[*m].input.instances[jobs[*m].idx].label.clone();
                Box::new(move |line: String| {
                    tracing::info!(instance = %label, "{line}");
                    lines.push(line);
                }) as Box<dyn FnMut(String)>
            })
            .collect();
        let mut sinks: Vec<Box<dyn FnMut(Progress) + '_>> =
            mine.iter().map(|(m, _)| Box::new(jobs[*m].progress_sink(started)) as Box<dyn FnMut(Progress)>).collect();
        let mut ctxs: Vec<RunContext<'_>> = mine
            .iter()
            .zip(log_fns.iter_mut())
            .zip(sinks.iter_mut())
            .map(|(((m, claimed), log), progress)| {
                let job = &jobs[*m];
                RunContext {
                    params: &job.input.instances[job.idx].params,
                    inputs: &claimed.inputs,
                    out_dir: &claimed.out_dir,
                    base_dir: &job.input.base_dir,
                    seed: job.input.seed,
                    backend: &job.backend,
                    device: job.device,
                    planned_data: &job.key.files,
                    log: &mut **log,
                    progress: &mut **progress,
                }
            })
            .collect();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kind.run_group(&mut ctxs)))
    };
    let seconds = started.elapsed().as_secs_f64();
    let outcomes = match result {
        Ok(v) if v.len() == mine.len() => v,
        // A panic (or a kind giving the wrong number of results): everyone runs alone.
        _ => return mine.iter().map(|_| None).collect(),
    };
    outcomes
        .into_iter()
        .zip(logs)
        .map(|(outcome, log_lines)| match outcome {
            Ok(o) => Some(StageRun { result: Ok(Ok(o)), log_lines, seconds }),
            Err(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_by_key_in_index_order_and_bounded() {
        let c: Vec<(usize, String)> =
            [(7, "a"), (2, "b"), (3, "a"), (9, "a"), (4, "b"), (5, "a")].iter().map(|(i, k)| (*i, k.to_string())).collect();
        assert_eq!(groups(&c, 2), vec![vec![2, 4], vec![3, 5], vec![7, 9]]);
        assert_eq!(groups(&c, 8), vec![vec![2, 4], vec![3, 5, 7, 9]]);
        assert_eq!(groups(&c, 1), vec![vec![2], vec![3], vec![4], vec![5], vec![7], vec![9]]);
        assert!(groups(&[], 4).is_empty());
    }
}
