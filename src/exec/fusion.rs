//! Fused groups: ready stale instances whose stage kinds give equal
//! [`StageKind::fusion_key`](crate::stage_kind::StageKind::fusion_key)s run as one task,
//! through [`StageKind::run_group`](crate::stage_kind::StageKind::run_group).
//!
//! Two kinds of group ([`FusionKind`]): a *stack* runs its members' work side by side (K
//! trainings as one model: `ml::fused`), formed only with `--fuse N`; a *shared-work* group
//! needs one computation for all its members (heatmaps of one model by several layers and
//! methods),
//! formed unless `--fuse off` ([`Policy`]).
//!
//! The executor knows nothing of what a group does. It only forms groups (by key, in
//! instance index order, at most `max` members, so the same plan gives the same groups),
//! gives a group the CPU slots its largest member would hold, and
//! runs each member through the same three phases as an instance alone (`job.rs`): every
//! member is claimed under its own key lock (one found computed meanwhile is simply reused),
//! and published under its own key with its own log. A member whose result in the group is
//! an error, or all members if the group panics, run again alone, so a group never fails an
//! instance that would have succeeded alone.

use std::collections::BTreeMap;
use std::time::Instant;

use super::job::{Claim, Claimed, Done, Job, JobError, StageRun};
use crate::stage_kind::{Catalog, FusionKind, Progress, RunContext};
use crate::sweep::Instance;

/// Which groups a run forms (`run --fuse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Groups that share one computation ([`FusionKind::SharedWork`]): on unless `--fuse off`.
    pub shared_work: bool,
    /// The largest stack ([`FusionKind::Stacked`]); below 2: none (the default).
    pub max_stack: usize,
}

impl Policy {
    /// Every instance alone.
    pub const OFF: Policy = Policy { shared_work: false, max_stack: 0 };
    /// The default: shared work only.
    pub const DEFAULT: Policy = Policy { shared_work: true, max_stack: 0 };

    /// `--fuse`: none given or 1 (stacks of one: the default), `off` (`Some(0)`), or the
    /// largest stack.
    pub fn from_flag(fuse: Option<usize>) -> Policy {
        match fuse {
            None | Some(1) => Policy::DEFAULT,
            Some(0) => Policy::OFF,
            Some(n) => Policy { shared_work: true, max_stack: n },
        }
    }

    /// The largest group of this kind, or `None` when this policy forms none.
    fn max_group(self, how: FusionKind) -> Option<usize> {
        match how {
            FusionKind::Stacked => (self.max_stack >= 2).then_some(self.max_stack),
            FusionKind::SharedWork => self.shared_work.then_some(usize::MAX),
        }
    }
}

/// How one instance joins a group: its kind's key, what the group saves, and its largest size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grouping {
    pub key: String,
    pub how: FusionKind,
    pub max: usize,
}

/// `instance`'s grouping, or `None` when it runs alone (its kind never fuses, or the policy
/// forms no group of its kind).
pub(crate) fn grouping(catalog: &Catalog, instance: &Instance, backend: &str, policy: Policy) -> Option<Grouping> {
    if policy == Policy::OFF {
        return None;
    }
    let fusion = catalog.get(&instance.kind)?.fusion_key(&instance.params, backend, &instance.inputs)?;
    let max = policy.max_group(fusion.how)?;
    Some(Grouping { key: fusion.key, how: fusion.how, max })
}

/// Every instance's grouping, without those whose key no other instance of the plan shares:
/// such an instance could only form a group of one, and a grouped instance waits for the
/// end of a dispatch pass to start, which would let later instances take its slots first.
pub(crate) fn groupings(catalog: &Catalog, instances: &[Instance], backend: &str, policy: Policy) -> Vec<Option<Grouping>> {
    let mut all: Vec<Option<Grouping>> = instances.iter().map(|inst| grouping(catalog, inst, backend, policy)).collect();
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for g in all.iter().flatten() {
        *count.entry(g.key.clone()).or_default() += 1;
    }
    for g in &mut all {
        if g.as_ref().is_some_and(|g| count.get(&g.key) == Some(&1)) {
            *g = None;
        }
    }
    all
}

/// Splits `candidates` (index, grouping) into groups of equal key, each at most its
/// grouping's `max` long, in index order (a group's place is its first member's).
pub(crate) fn groups(candidates: &[(usize, &Grouping)]) -> Vec<Vec<usize>> {
    let mut sorted = candidates.to_vec();
    sorted.sort_by_key(|(i, _)| *i);
    let mut by_key: BTreeMap<&str, (usize, Vec<usize>)> = BTreeMap::new();
    for (i, g) in &sorted {
        by_key.entry(g.key.as_str()).or_insert_with(|| (g.max, Vec::new())).1.push(*i);
    }
    let mut out: Vec<Vec<usize>> = by_key.values().flat_map(|(max, v)| v.chunks((*max).max(1)).map(<[usize]>::to_vec)).collect();
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
            Ok(Claim::Reused(rec)) => results[m] = Some(Ok(jobs[m].found(rec))),
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
    JobError { msg: format!("{}: internal error: the fused group gave no result", job.input.instances[job.idx].label), log: None, cache: false, config: false }
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

    fn stacked(key: &str, max: usize) -> Grouping {
        Grouping { key: key.to_string(), how: FusionKind::Stacked, max }
    }

    #[test]
    fn groups_are_by_key_in_index_order_and_bounded() {
        let c = |max: usize| -> Vec<(usize, Grouping)> {
            [(7, "a"), (2, "b"), (3, "a"), (9, "a"), (4, "b"), (5, "a")].iter().map(|(i, k)| (*i, stacked(k, max))).collect()
        };
        let refs = |v: &[(usize, Grouping)]| -> Vec<Vec<usize>> { groups(&v.iter().map(|(i, g)| (*i, g)).collect::<Vec<_>>()) };
        assert_eq!(refs(&c(2)), vec![vec![2, 4], vec![3, 5], vec![7, 9]]);
        assert_eq!(refs(&c(8)), vec![vec![2, 4], vec![3, 5, 7, 9]]);
        assert_eq!(refs(&c(1)), vec![vec![2], vec![3], vec![4], vec![5], vec![7], vec![9]]);
        assert!(groups(&[]).is_empty());
        // Each key keeps its own bound: an unbounded shared-work key beside a stack of 2.
        let shared = Grouping { key: "s".into(), how: FusionKind::SharedWork, max: usize::MAX };
        let mixed = [(1, stacked("a", 2)), (2, shared.clone()), (3, stacked("a", 2)), (4, shared.clone()), (5, stacked("a", 2)), (6, shared)];
        assert_eq!(refs(&mixed), vec![vec![1, 3], vec![2, 4, 6], vec![5]]);
    }

    /// A kind whose instances share work when their `group` params are equal.
    struct Sharing;
    impl crate::stage_kind::StageKind for Sharing {
        fn name(&self) -> &'static str {
            "sharing"
        }
        fn version(&self) -> u32 {
            1
        }
        fn doc(&self) -> &'static str {
            ""
        }
        fn inputs(&self) -> &'static [crate::stage_kind::InputSlot] {
            &[]
        }
        fn output(&self) -> crate::stage_kind::ArtifactType {
            crate::stage_kind::ArtifactType::Metrics
        }
        fn params(&self) -> Vec<crate::stage_kind::ParamSpec> {
            Vec::new()
        }
        fn run(&self, _: &mut RunContext<'_>) -> Result<crate::stage_kind::Outcome, crate::stage_kind::StageError> {
            Err(crate::stage_kind::StageError::new("not run"))
        }
        fn fusion_key(&self, params: &crate::stage_kind::Params, _: &str, _: &BTreeMap<String, usize>) -> Option<crate::stage_kind::Fusion> {
            Some(crate::stage_kind::Fusion { key: params.get("group")?.to_string(), how: FusionKind::SharedWork })
        }
    }

    /// A key no other instance shares forms no group (it would only wait for `flush`); `off`
    /// forms none at all.
    #[test]
    fn a_key_of_one_instance_forms_no_group() {
        let catalog = Catalog { kinds: vec![Box::new(Sharing)] };
        let instance = |group: &str| Instance {
            stage: "s".into(),
            kind: "sharing".into(),
            label: format!("s[{group}]"),
            coords: BTreeMap::new(),
            params: std::sync::Arc::new([("group".to_string(), serde_json::json!(group))].into()),
            inputs: BTreeMap::new(),
        };
        let plan = [instance("a"), instance("b"), instance("a"), instance("c"), instance("a")];
        let keys: Vec<Option<String>> = groupings(&catalog, &plan, "cpu", Policy::DEFAULT).into_iter().map(|g| g.map(|g| g.key)).collect();
        let a = Some("\"a\"".to_string());
        assert_eq!(keys, vec![a.clone(), None, a.clone(), None, a]);
        assert!(groupings(&catalog, &plan, "cpu", Policy::OFF).iter().all(Option::is_none));
    }

    #[test]
    fn the_policy_forms_shared_work_by_default_and_stacks_only_when_asked() {
        assert_eq!(Policy::from_flag(None), Policy::DEFAULT);
        assert_eq!(Policy::DEFAULT.max_group(FusionKind::SharedWork), Some(usize::MAX));
        assert_eq!(Policy::DEFAULT.max_group(FusionKind::Stacked), None);
        let off = Policy::from_flag(Some(0));
        assert_eq!((off.max_group(FusionKind::SharedWork), off.max_group(FusionKind::Stacked)), (None, None));
        // `--fuse 1`: stacks of one are no stacks; shared work stays on.
        assert_eq!(Policy::from_flag(Some(1)), Policy::DEFAULT);
        let p = Policy::from_flag(Some(16));
        assert_eq!((p.max_group(FusionKind::SharedWork), p.max_group(FusionKind::Stacked)), (Some(usize::MAX), Some(16)));
    }
}
