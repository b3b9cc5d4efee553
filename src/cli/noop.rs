//! A rerun with nothing to do, finished without the executor.
//!
//! Why: on a no-op rerun of a large sweep the executor's per-instance machinery (an event per
//! instance for the terminal task, a copy of every record for the lock file) cost more than
//! the lookups. When the plan finds every instance cached, nothing can start: the run ends
//! here with the same summary and the same lock file, left alone when it provably holds the
//! same bytes ([`LockFile::unchanged`]). Anything else (a stale instance, a cache entry that
//! cannot be read) goes to the executor, which reports it as it always does.

use std::path::Path;

use super::{Prepared, make_plan};
use crate::cache::{Lookup, Store};
use crate::error::{Error, Result};
use crate::lockfile::{LockFile, LockHeader, LockItem, RunEntry};
use crate::plan::Decision;

/// The number of instances, all cached, when the run had nothing to do and is finished (the
/// lock file written if `write_lock` and it changed); `None` when the executor must run.
pub(super) fn finish_if_noop(p: &Prepared, store: &Store, lock_path: &Path, write_lock: bool) -> Result<Option<usize>> {
    let Ok(decisions) = make_plan(p, store, false, &|_| false) else { return Ok(None) };
    let keys: Option<Vec<&str>> = decisions
        .iter()
        .map(|d| match d {
            Decision::Cached { key, .. } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    let Some(keys) = keys else { return Ok(None) };
    if !write_lock {
        return Ok(Some(keys.len()));
    }
    let header = LockHeader { pipeline: &p.pipeline.name, seed: p.pipeline.seed, backend: p.backend.name(), deterministic: p.backend.bitwise_deterministic() };
    let items: Vec<LockItem<'_>> =
        p.instances.iter().zip(&keys).map(|(i, key)| LockItem { label: &i.label, params: &i.params, key }).collect();
    if LockFile::unchanged(store, lock_path, &header, &items) {
        return Ok(Some(keys.len()));
    }
    // The records, as the plan just found them (this process remembers them by key).
    let mut records = Vec::with_capacity(keys.len());
    for key in &keys {
        match store.try_lookup(key, false) {
            Ok(Lookup::Fresh(rec)) => records.push(*rec),
            // Changed since the plan looked: the executor decides.
            _ => return Ok(None),
        }
    }
    let entries: Vec<RunEntry<'_>> =
        p.instances.iter().zip(&records).map(|(i, record)| RunEntry { label: &i.label, params: &i.params, record }).collect();
    LockFile::write_for_run(store, lock_path, &header, &entries, true).map_err(Error::Io)?;
    Ok(Some(keys.len()))
}
