//! The planner: for each instance, `cached`, `run` with its reason, or `after` an upstream
//! instance that will run. Pure: the cache is seen through [`CacheView`], so the same spec and
//! the same store give the same plan.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value as Json;

use crate::cache::{CacheKey, KEY_FORMAT, Lookup, Sidecar};
use crate::stage_kind::{Catalog, Resources};
use crate::sweep::{Instance, show_value};

/// What the planner needs from the cache.
pub trait CacheView {
    fn lookup(&self, key: &str) -> Lookup;
    fn sidecar(&self, label: &str) -> Option<Sidecar>;
    /// The output digest of `key` when it is already known to be fresh, without a lookup
    /// (many instances of a sweep share a key); `None` means "look it up".
    fn known_fresh(&self, _key: &str) -> Option<String> {
        None
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum StaleReason {
    NeverRun,
    // A sweep point this stage has not run before, while other points of it have (a changed
    // or added sweep value): `point` is its own axes, `value=0.55`.
    NewPoint { point: String },
    ParamsChanged { changes: Vec<ParamChange> },
    InputsChanged { inputs: Vec<String> },
    DataChanged { files: Vec<String> },
    ImplementationChanged { from: u32, to: u32 },
    SeedChanged { from: u64, to: u64 },
    BackendChanged { from: Option<String>, to: Option<String> },
    KeyFormatChanged,
    EntryMissing,
    EntryCorrupt { detail: String },
    Forced,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamChange {
    pub param: String,
    pub from: Json,
    pub to: Json,
}

impl std::fmt::Display for StaleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StaleReason::NeverRun => write!(f, "never run"),
            StaleReason::NewPoint { point } => write!(f, "new sweep point: {point}"),
            StaleReason::ParamsChanged { changes } => {
                let parts: Vec<String> = changes.iter().map(|c| format!("{} {} -> {}", c.param, show(&c.from), show(&c.to))).collect();
                write!(f, "params changed: {}", parts.join(", "))
            }
            StaleReason::InputsChanged { inputs } => write!(f, "input changed: {}", inputs.join(", ")),
            StaleReason::DataChanged { files } => write!(f, "data changed: {}", files.join(", ")),
            StaleReason::ImplementationChanged { from, to } => write!(f, "stage implementation changed (v{from} -> v{to})"),
            StaleReason::SeedChanged { from, to } => write!(f, "seed changed: {from} -> {to}"),
            StaleReason::BackendChanged { from, to } => {
                write!(f, "backend changed: {} -> {}", from.as_deref().unwrap_or("none"), to.as_deref().unwrap_or("none"))
            }
            StaleReason::KeyFormatChanged => write!(f, "cache key format changed"),
            StaleReason::EntryMissing => write!(f, "cache entry missing"),
            StaleReason::EntryCorrupt { detail } => write!(f, "cache entry corrupt: {detail}"),
            StaleReason::Forced => write!(f, "forced"),
        }
    }
}

fn show(v: &Json) -> String {
    if v.is_null() { "unset".into() } else { show_value(v) }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Cached {
        key: String,
        output_digest: String,
    },
    Run {
        key: String,
        reason: StaleReason,
    },
    /// Waits on the named upstream instance, which will run; its key is not known yet.
    After {
        upstream: usize,
    },
}

/// Everything a key needs besides upstream output digests.
pub struct KeyContext<'a> {
    pub catalog: &'a Catalog,
    pub seed: u64,
    pub backend_class: String,
    /// Per instance: external file name -> content digest.
    pub files: &'a [BTreeMap<String, String>],
}

pub fn build_key(inst: &Instance, idx: usize, cx: &KeyContext<'_>, inputs: BTreeMap<String, String>) -> CacheKey {
    let kind = cx.catalog.get(&inst.kind).expect("kinds were validated");
    CacheKey {
        format: KEY_FORMAT,
        kind: inst.kind.clone(),
        kind_version: kind.version(),
        // Only what can change the result: location params (a data folder; its contents are
        // in `files`) and params the kind ignores in this mode stay out.
        params: kind.key_params(&inst.params),
        inputs,
        files: cx.files.get(idx).cloned().unwrap_or_default(),
        seed: cx.seed,
        backend: if kind.backend_dependent() { Some(cx.backend_class.clone()) } else { None },
    }
}

/// Names present in either map whose values differ, sorted.
fn changed_keys<V: PartialEq>(old: &BTreeMap<String, V>, new: &BTreeMap<String, V>) -> Vec<String> {
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    names.into_iter().filter(|k| old.get(*k) != new.get(*k)).cloned().collect()
}

/// Why `new` differs from the key of the last run of the same label; when nothing differs,
/// the entry itself has gone missing.
pub fn explain(old: Option<&Sidecar>, new: &CacheKey) -> StaleReason {
    let Some(old) = old else { return StaleReason::NeverRun };
    let o = &old.key_inputs;
    if o.format != new.format {
        return StaleReason::KeyFormatChanged;
    }
    if o.kind_version != new.kind_version || o.kind != new.kind {
        return StaleReason::ImplementationChanged { from: o.kind_version, to: new.kind_version };
    }
    let changes: Vec<ParamChange> = changed_keys(&o.params, &new.params)
        .into_iter()
        .map(|n| ParamChange {
            from: o.params.get(&n).cloned().unwrap_or(Json::Null),
            to: new.params.get(&n).cloned().unwrap_or(Json::Null),
            param: n,
        })
        .collect();
    if !changes.is_empty() {
        return StaleReason::ParamsChanged { changes };
    }
    let inputs = changed_keys(&o.inputs, &new.inputs);
    if !inputs.is_empty() {
        return StaleReason::InputsChanged { inputs };
    }
    let files = changed_keys(&o.files, &new.files);
    if !files.is_empty() {
        return StaleReason::DataChanged { files };
    }
    if o.seed != new.seed {
        return StaleReason::SeedChanged { from: o.seed, to: new.seed };
    }
    if o.backend != new.backend {
        return StaleReason::BackendChanged { from: o.backend.clone(), to: new.backend.clone() };
    }
    StaleReason::EntryMissing
}

/// Stages (in instance order, once each) with an instance that asks for a GPU and is not
/// cached: what cannot run when there is no GPU slot.
pub fn gpu_stages_to_run(instances: &[Instance], resources: &[Resources], decisions: &[Decision]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for ((inst, res), d) in instances.iter().zip(resources).zip(decisions) {
        if !res.gpu.is_none() && !matches!(d, Decision::Cached { .. }) && !out.contains(&inst.stage) {
            out.push(inst.stage.clone());
        }
    }
    out
}

/// Plans every instance (given in topological order).
pub fn plan(instances: &[Instance], cx: &KeyContext<'_>, view: &dyn CacheView, forced: &dyn Fn(&Instance) -> bool) -> Vec<Decision> {
    let mut out: Vec<Decision> = Vec::with_capacity(instances.len());
    for (i, inst) in instances.iter().enumerate() {
        let mut inputs = BTreeMap::new();
        let mut waiting = None;
        for (slot, &u) in &inst.inputs {
            match &out[u] {
                Decision::Cached { output_digest, .. } => {
                    inputs.insert(slot.clone(), output_digest.clone());
                }
                _ => {
                    waiting = Some(u);
                    break;
                }
            }
        }
        if let Some(u) = waiting {
            out.push(Decision::After { upstream: u });
            continue;
        }
        let key = build_key(inst, i, cx, inputs);
        let digest = key.digest();
        if forced(inst) {
            out.push(Decision::Run { key: digest, reason: StaleReason::Forced });
            continue;
        }
        if let Some(output_digest) = view.known_fresh(&digest) {
            out.push(Decision::Cached { key: digest, output_digest });
            continue;
        }
        let d = match view.lookup(&digest) {
            Lookup::Fresh(rec) => Decision::Cached { output_digest: rec.output_digest(), key: digest },
            Lookup::Corrupt(detail) => Decision::Run { key: digest, reason: StaleReason::EntryCorrupt { detail } },
            Lookup::Missing => Decision::Run { reason: explain(view.sidecar(&inst.label).as_ref(), &key), key: digest },
        };
        out.push(d);
    }
    name_new_points(instances, &mut out);
    out
}

/// An instance with no history of its own (`never run`) in a stage whose other sweep points
/// have run is a new point: a sweep value was changed or added. Say which, so a changed value
/// reads as the new point it is rather than as a first run. No extra I/O: a stage has history
/// when one of its instances is cached or was explained from its last run.
fn name_new_points(instances: &[Instance], decisions: &mut [Decision]) {
    let ran_before: BTreeSet<&str> = instances
        .iter()
        .zip(decisions.iter())
        .filter(|(_, d)| match d {
            Decision::Cached { .. } => true,
            Decision::Run { reason, .. } => !matches!(reason, StaleReason::NeverRun | StaleReason::Forced),
            Decision::After { .. } => false,
        })
        .map(|(i, _)| i.stage.as_str())
        .collect();
    for (inst, d) in instances.iter().zip(decisions.iter_mut()) {
        if let Decision::Run { reason, .. } = d
            && *reason == StaleReason::NeverRun
            && ran_before.contains(inst.stage.as_str())
        {
            let prefix = format!("{}.", inst.stage);
            let own: Vec<String> =
                inst.coords.iter().filter_map(|(id, v)| id.strip_prefix(&prefix).map(|p| format!("{p}={}", show_value(v)))).collect();
            // A new upstream point (the instance has no axes of its own) shows as that point.
            let point = if own.is_empty() {
                inst.coords.iter().map(|(id, v)| format!("{id}={}", show_value(v))).collect::<Vec<_>>().join(",")
            } else {
                own.join(",")
            };
            if !point.is_empty() {
                *reason = StaleReason::NewPoint { point };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(params: &[(&str, Json)]) -> CacheKey {
        CacheKey {
            format: KEY_FORMAT,
            kind: "threshold".into(),
            kind_version: 1,
            params: params.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            inputs: Default::default(),
            files: Default::default(),
            seed: 1,
            backend: None,
        }
    }

    #[test]
    fn explains_param_changes() {
        let old = Sidecar { label: "m".into(), key: "x".into(), key_inputs: key(&[("value", json!(0.5))]) };
        let r = explain(Some(&old), &key(&[("value", json!(0.6))]));
        assert_eq!(r.to_string(), "params changed: value 0.5 -> 0.6");
        assert_eq!(explain(None, &key(&[])), StaleReason::NeverRun);
        let mut k = key(&[("value", json!(0.5))]);
        k.inputs.insert("heatmaps".into(), "d2".into());
        assert_eq!(explain(Some(&old), &k).to_string(), "input changed: heatmaps");
        k = key(&[("value", json!(0.5))]);
        k.kind_version = 2;
        assert_eq!(explain(Some(&old), &k).to_string(), "stage implementation changed (v1 -> v2)");
    }
}
