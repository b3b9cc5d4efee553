//! `camflow diff A B`: per-instance metric deltas between two lock files, or between a lock
//! file and what a pipeline's cache holds now (like `dvc metrics diff`).
//!
//! Exit code 0 when every instance present on both sides reproduced within the tolerance and
//! no instance is present on one side only; 4 otherwise (the same code as `run --locked`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use super::{PipelineArgs, make_plan, open_store_to_read, prepare, print_out};
use crate::error::{Error, Result};
use crate::lockfile::{self, LockFile, MetricChange};
use crate::plan::Decision;

#[derive(Args)]
pub struct DiffArgs {
    /// A lock file (`paper.lock.yaml`), or a pipeline (`paper.yaml`): its instances cached now.
    a: PathBuf,
    /// A lock file, or a pipeline (its instances cached now).
    b: PathBuf,
    /// Largest absolute difference of a numeric metric that still counts as reproduced.
    #[arg(long, default_value_t = 1e-3)]
    tol: f64,
    /// Print the comparison as JSON.
    #[arg(long)]
    json: bool,
}

/// A lock file as is, or the lock a pipeline's cached instances would give now, with the
/// labels of the pipeline's instances that have no cached result (never run, or stale): a
/// comparison that left them out would claim a reproduction they are not part of.
fn side(cache: &Path, path: &Path) -> Result<(LockFile, Vec<String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
    // A lock file has `instances` and no `stages`; anything else is read as a pipeline (whose
    // errors then name the file and line).
    let v: Option<serde_yaml::Value> = serde_yaml::from_str(&text).ok();
    let is_lock = match &v {
        Some(v) => v.get("instances").is_some_and(|i| i.is_mapping()) && v.get("stages").is_none(),
        // Unparsable as YAML (a label twice, say): a lock if it has a top-level `instances:`
        // and no `stages:`, so the lock reader's message names the problem, not a spec's.
        None => {
            let top = |k: &str| text.lines().any(|l| l.starts_with(k));
            top("instances:") && !top("stages:")
        }
    };
    if is_lock {
        return Ok((LockFile::read(path).map_err(Error::Usage)?, Vec::new()));
    }
    let store = open_store_to_read(cache)?;
    let args = PipelineArgs { pipeline: path.to_path_buf(), sets: Vec::new(), backend: None, rehash: false, max_instances: None };
    let p = prepare(&args, &store)?;
    store.note_if_absent();
    let decisions = make_plan(&p, &store, false, &|_| false)?;
    let (mut records, mut missing) = (Vec::new(), Vec::new());
    for (inst, d) in p.instances.iter().zip(&decisions) {
        if let Decision::Cached { key, .. } = d
            && let crate::cache::Lookup::Fresh(rec) = store.lookup(key, false)
        {
            records.push((inst, *rec));
        } else {
            missing.push(inst.label.clone());
        }
    }
    let entries: Vec<lockfile::RunEntry<'_>> =
        records.iter().map(|(i, r)| lockfile::RunEntry { label: &i.label, params: &i.params, record: r }).collect();
    let header = lockfile::LockHeader {
        pipeline: &p.pipeline.name,
        seed: p.pipeline.seed,
        backend: p.backend.name(),
        deterministic: p.backend.bitwise_deterministic(),
    };
    Ok((LockFile::from_run(&header, &entries), missing))
}

pub fn diff(cache: &Path, a: DiffArgs) -> Result<()> {
    if !(a.tol >= 0.0 && a.tol.is_finite()) {
        return Err(Error::Usage(format!("--tol must be a number >= 0, found {}", a.tol)));
    }
    let ((la, missing_a), (lb, missing_b)) = (side(cache, &a.a)?, side(cache, &a.b)?);
    // An instance one side's spec lists but has not computed is `not computed` there, never
    // `only in` the other side: both sides have it, one without a result yet.
    let (uncomputed_a, uncomputed_b): (BTreeSet<&str>, BTreeSet<&str>) =
        (missing_a.iter().map(String::as_str).collect(), missing_b.iter().map(String::as_str).collect());
    let mut diverged: Vec<(String, Vec<MetricChange>)> = Vec::new();
    let mut bytes_differ = Vec::new();
    let mut same = 0usize;
    let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
    for (label, x) in &la.instances {
        let Some(y) = lb.instances.get(label) else {
            if !uncomputed_b.contains(label.as_str()) {
                only_a.push(label.clone());
            }
            continue;
        };
        let changes = lockfile::metric_changes(&x.metrics, &y.metrics, a.tol);
        if changes.is_empty() {
            same += 1;
            if x.outputs != y.outputs {
                bytes_differ.push(label.clone());
            }
        } else {
            diverged.push((label.clone(), changes));
        }
    }
    only_b.extend(lb.instances.keys().filter(|l| !la.instances.contains_key(*l) && !uncomputed_a.contains(l.as_str())).cloned());
    let ok = diverged.is_empty() && only_a.is_empty() && only_b.is_empty() && missing_a.is_empty() && missing_b.is_empty();
    if a.json {
        let js = json!({
            "a": a.a, "b": a.b, "tol": a.tol, "reproduced": ok, "within_tolerance": same,
            "outputs_differ": bytes_differ,
            "diverged": diverged.iter().map(|(l, c)| json!({"instance": l, "metrics": c})).collect::<Vec<_>>(),
            "only_in_a": only_a, "only_in_b": only_b,
            "not_computed_in_a": missing_a, "not_computed_in_b": missing_b,
        });
        print_out(&(serde_json::to_string_pretty(&js).unwrap_or_default() + "\n"));
    } else {
        let mut text = String::new();
        for (l, c) in &diverged {
            text.push_str(&format!("diverged at {l}: {}\n", c.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")));
        }
        for l in &only_a {
            text.push_str(&format!("only in {}: {l}\n", a.a.display()));
        }
        for l in &only_b {
            text.push_str(&format!("only in {}: {l}\n", a.b.display()));
        }
        for (side, missing) in [(&a.a, &missing_a), (&a.b, &missing_b)] {
            for l in missing {
                text.push_str(&format!("not computed in {}: {l} (no cached result: run the pipeline first)\n", side.display()));
            }
        }
        // Never "reproduced" alone while something is missing or diverged.
        if ok {
            text.push_str(&format!("reproduced within {} ({same} instances)", a.tol));
        } else {
            text.push_str(&format!("{same} instance(s) reproduced within {}", a.tol));
        }
        if !bytes_differ.is_empty() {
            text.push_str(&format!("; output bytes differ in {} of them", bytes_differ.len()));
        }
        text.push('\n');
        if !ok {
            text.push_str(&format!(
                "diverged: {} instance(s) beyond the tolerance, {} only in A, {} only in B, {} not computed\n",
                diverged.len(),
                only_a.len(),
                only_b.len(),
                missing_a.len() + missing_b.len()
            ));
        }
        print_out(&text);
    }
    if ok { Ok(()) } else { Err(Error::Diverged(format!("{} and {} differ", a.a.display(), a.b.display()))) }
}
