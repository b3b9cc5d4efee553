//! `dag`, `status`, `gc`, `verify` and `kinds`.
//!
//! `gc` takes the cache lock exclusively (no `run` may be using the cache) and `verify` shares
//! it with runs; see `cache::lock`.

use std::collections::{BTreeMap, BTreeSet};

use clap::{Args, ValueEnum};

use super::{PipelineArgs, load, make_plan, open_store_to_read, prepare, print_out};
use crate::cache::store::{GRACE, is_digest};
use crate::cache::{ActionRecord, CacheLock, KeyLock, RecordError, Store};
use crate::error::{Error, Result};
use crate::plan::Decision;
use crate::stage_kind::Catalog;

#[derive(Clone, Copy, ValueEnum)]
pub enum DagFormat {
    Dot,
    Mermaid,
}

#[derive(Args)]
pub struct DagArgs {
    #[command(flatten)]
    p: PipelineArgs,
    #[arg(long, value_enum, default_value = "dot")]
    format: DagFormat,
}

pub fn dag(a: DagArgs) -> Result<()> {
    let (_, instances, _) = load(&a.p)?;
    print_out(&match a.format {
        DagFormat::Dot => crate::dag::to_dot(&instances),
        DagFormat::Mermaid => crate::dag::to_mermaid(&instances),
    });
    Ok(())
}

pub fn status(cache: &std::path::Path, a: PipelineArgs) -> Result<()> {
    let store = open_store_to_read(cache)?;
    let p = prepare(&a, &store)?;
    store.note_if_absent();
    let d = make_plan(&p, &store, false, &|_| false)?;
    let mut per: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    for (inst, dec) in p.instances.iter().zip(&d) {
        let e = per.entry(inst.stage.as_str()).or_default();
        e.0 += 1;
        match dec {
            Decision::Cached { .. } => e.1 += 1,
            _ => e.2 += 1,
        }
    }
    let mut s = format!("{:<20} {:>9} {:>7} {:>6}\n", "STAGE", "INSTANCES", "CACHED", "STALE");
    for (stage, (n, c, st)) in &per {
        s.push_str(&format!("{stage:<20} {n:>9} {c:>7} {st:>6}\n"));
    }
    let (n, c): (usize, usize) = per.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
    s.push_str(&format!("{} of {} instances cached\n", c, n));
    print_out(&s);
    Ok(())
}

#[derive(Args)]
pub struct GcArgs {
    /// Keep what these pipelines reference; everything else is removed (with --max-size, only
    /// as much of it as needed).
    pipelines: Vec<std::path::PathBuf>,
    /// Remove the oldest entries until the cache is at most this many bytes (suffixes K, M, G
    /// accepted). With pipelines, only entries they do not reference are removed: theirs are
    /// always kept, even when they alone are larger.
    #[arg(long, value_name = "SIZE")]
    max_size: Option<String>,
    /// Say what would be removed, remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// If a `camflow run` is using the cache, wait for it to finish instead of stopping.
    #[arg(long)]
    wait: bool,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let expected = || format!("--max-size {s}: expected a size like 500M or 2G");
    let (num, mult) = match t.chars().last().ok_or_else(expected)? {
        'K' | 'k' => (&t[..t.len() - 1], 1u64 << 10),
        'M' | 'm' => (&t[..t.len() - 1], 1 << 20),
        'G' | 'g' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n = num.trim().parse::<u64>().map_err(|e| match e.kind() {
        std::num::IntErrorKind::PosOverflow => format!("--max-size {s}: too large (at most {} bytes)", u64::MAX),
        _ => expected(),
    })?;
    n.checked_mul(mult).ok_or_else(|| format!("--max-size {s}: too large (at most {} bytes)", u64::MAX))
}

/// The cache lock for `gc`: exclusive (no run may be using the cache), or shared for a dry run
/// (which removes nothing).
fn gc_lock(store: &Store, a: &GcArgs) -> Result<CacheLock> {
    let root = &store.root;
    let io = |e: crate::cache::StoreError| Error::Io(format!("cannot lock the cache: {e}"));
    if a.dry_run {
        return CacheLock::shared(root).map_err(io);
    }
    if let Some(l) = CacheLock::try_exclusive(root).map_err(io)? {
        return Ok(l);
    }
    if a.wait {
        print_out("gc: waiting for the runs using the cache to finish\n");
        return CacheLock::exclusive(root).map_err(io);
    }
    Err(Error::Busy(format!(
        "cache {} is in use by a running `camflow run` (it holds {}); gc removed nothing: run it again when the run is over, or pass --wait",
        root.display(),
        CacheLock::holders(root)
    )))
}

pub fn gc(cache: &std::path::Path, a: GcArgs) -> Result<()> {
    let max = match &a.max_size {
        Some(s) => Some(parse_size(s).map_err(Error::Usage)?),
        None => None,
    };
    let store = open_store_to_read(cache)?;
    store.note_if_absent();
    let _lock = gc_lock(&store, &a)?;
    let records = store.records();
    let mut keep_keys: Option<BTreeSet<String>> = None;
    if !a.pipelines.is_empty() {
        let mut keep = BTreeSet::new();
        for p in &a.pipelines {
            let args = PipelineArgs { pipeline: p.clone(), sets: vec![], backend: None, rehash: false, max_instances: None };
            let prep = prepare(&args, &store)?;
            for (inst, d) in prep.instances.iter().zip(make_plan(&prep, &store, false, &|_| false)?) {
                match d {
                    Decision::Cached { key, .. } | Decision::Run { key, .. } => {
                        keep.insert(key);
                    }
                    // Its key is not known until an upstream instance runs again (that one's
                    // record was removed by `verify`, or lost in a crash). Rerun, the upstream
                    // most likely gives the same bytes and early cutoff reuses the key this
                    // label had last (its sidecar): that record is still referenced.
                    Decision::After { .. } => {
                        if let Some(s) = store.read_sidecar(&prep.pipeline.name, &inst.label) {
                            keep.insert(s.key);
                        }
                    }
                }
            }
        }
        keep_keys = Some(keep);
    }
    // Records to drop, with the objects they name (those go with them, however young).
    let mut drop: BTreeSet<std::path::PathBuf> = BTreeSet::new();
    let mut dropped_refs: BTreeSet<String> = BTreeSet::new();
    // Records the named pipelines reference: never removed, not even to meet --max-size.
    let mut pinned: Vec<(u64, std::path::PathBuf, ActionRecord)> = Vec::new();
    // Records --max-size may remove, oldest first: every record without pipelines; with them,
    // the ones they do not reference (removed outright when there is no --max-size).
    let mut trimmable: Vec<(u64, std::path::PathBuf, ActionRecord)> = Vec::new();
    for (path, r) in records {
        match r {
            // A record this user cannot read is not garbage: stop before removing anything.
            Err(RecordError::Io(e)) => return Err(Error::Io(format!("gc: {e}"))),
            Err(RecordError::Invalid { .. }) => {
                drop.insert(path);
            }
            Ok(rec) => match &keep_keys {
                Some(k) if k.contains(&rec.key) => pinned.push((rec.created, path, rec)),
                Some(_) if max.is_none() => {
                    dropped_refs.extend(rec.outputs.values().map(|o| o.digest.clone()));
                    drop.insert(path);
                }
                _ => trimmable.push((rec.created, path, rec)),
            },
        }
    }
    let objects = store.objects();
    let size_of: BTreeMap<&str, u64> = objects.iter().map(|(d, _, s)| (d.as_str(), *s)).collect();
    let mut over = false;
    if let Some(max) = max {
        trimmable.sort_by_key(|x| x.0);
        // Objects are shared between records: the size is that of every object a kept record
        // names, each counted once. Kept as a running total over reference counts, so trimming
        // N records costs N record updates, not N recounts of the whole cache.
        let mut refs: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for (_, _, r) in pinned.iter().chain(&trimmable) {
            for o in r.outputs.values() {
                *refs.entry(o.digest.clone()).or_default() += 1;
            }
        }
        let mut total: u64 = refs.keys().map(|d| size_of.get(d.as_str()).copied().unwrap_or(0)).sum();
        let mut removed = 0;
        while removed < trimmable.len() && total > max {
            let (_, p, rec) = &trimmable[removed];
            for o in rec.outputs.values() {
                if let Some(n) = refs.get_mut(&o.digest) {
                    *n -= 1;
                    if *n == 0 {
                        total -= size_of.get(o.digest.as_str()).copied().unwrap_or(0);
                    }
                }
                dropped_refs.insert(o.digest.clone());
            }
            drop.insert(p.clone());
            removed += 1;
        }
        trimmable.drain(..removed);
        over = total > max;
    }
    let mut live = pinned;
    live.append(&mut trimmable);
    let referenced: BTreeSet<String> = live.iter().flat_map(|(_, _, r)| r.outputs.values().map(|o| o.digest.clone())).collect();
    let now = std::time::SystemTime::now();
    let (mut freed, mut n_obj, mut young) = (0u64, 0usize, 0usize);
    let mut failures: Vec<String> = Vec::new();
    for (digest, path, size) in &objects {
        if referenced.contains(digest) {
            continue;
        }
        // An object no record names may be one a run stored before writing its record: only
        // an old one is garbage (the cache lock already keeps runs of this camflow out).
        let old = std::fs::symlink_metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > GRACE);
        if !dropped_refs.contains(digest) && !old {
            young += 1;
            continue;
        }
        // Counted only once really removed: a read-only cache must not report space freed.
        if !a.dry_run
            && let Err(e) = std::fs::remove_file(path)
        {
            failures.push(format!("{}: {e}", path.display()));
            continue;
        }
        freed += size;
        n_obj += 1;
    }
    let mut scratch = 0;
    let mut n_rec = drop.len();
    if !a.dry_run {
        n_rec = 0;
        for p in &drop {
            match std::fs::remove_file(p) {
                Ok(()) => n_rec += 1,
                Err(e) => failures.push(format!("{}: {e}", p.display())),
            }
        }
        // Scratch folders of runs that were killed, and old temporary files.
        scratch = store.clean_tmp(GRACE);
    }
    // Links and FIFOs under objects' names: never objects (the link itself goes, not its target).
    let special = store.remove_special_strays(a.dry_run).len();
    let young =
        if young > 0 { format!("; {young} unreferenced objects younger than {} min kept", GRACE.as_secs() / 60) } else { String::new() };
    let scratch = if scratch > 0 { format!("; {scratch} abandoned temporary entries removed") } else { String::new() };
    let special = match special {
        0 => String::new(),
        n => format!("; {n} links or special files in objects/ {}", if a.dry_run { "would be removed" } else { "removed" }),
    };
    let over = if over { "; what the pipelines reference alone exceeds --max-size and is kept" } else { "" };
    print_out(&format!(
        "gc: {} {} records and {} objects, {} freed; {} records kept{young}{scratch}{special}{over}\n",
        if a.dry_run { "would remove" } else { "removed" },
        n_rec,
        n_obj,
        human(freed),
        live.len()
    ));
    match failures.first() {
        None => Ok(()),
        Some(first) => Err(Error::Io(format!("gc could not remove {} file(s), first {first}", failures.len()))),
    }
}

pub fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// Removes a record found corrupt, under its key lock so that a run writing a good record for
/// that key meanwhile is never undone. Returns what was done, for the report.
fn remove_corrupt_record(store: &Store, path: &std::path::Path) -> &'static str {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let _held = if is_digest(stem) {
        match KeyLock::try_acquire(&store.root, stem) {
            Ok(Some(l)) => Some(l),
            _ => return "kept: a run holds its key",
        }
    } else {
        None
    };
    // Look again under the lock: a run may have replaced it with a good one.
    if is_digest(stem) && matches!(store.load_record(stem), Ok(Some(_)) | Ok(None)) {
        return "gone or replaced meanwhile";
    }
    match std::fs::remove_file(path) {
        Ok(()) => "removed",
        Err(_) => "could not be removed",
    }
}

pub fn verify(cache: &std::path::Path) -> Result<()> {
    let store = open_store_to_read(cache)?;
    store.note_if_absent();
    // Shared with runs; waits only for a gc.
    let _lock = CacheLock::shared(&store.root).map_err(|e| Error::Io(format!("cannot lock the cache: {e}")))?;
    let mut problems = Vec::new();
    let mut checked: BTreeSet<String> = BTreeSet::new();
    let records = store.records();
    for (path, r) in &records {
        match r {
            Err(e @ RecordError::Io(_)) => problems.push(format!("record {}: cannot be read: {e}", path.display())),
            Err(e @ RecordError::Invalid { .. }) => {
                let done = remove_corrupt_record(&store, path);
                problems.push(format!("{e}; {done}"));
            }
            // Key inputs that do not hash to the key make a record invalid (`load_record`).
            Ok(rec) => {
                for (name, o) in &rec.outputs {
                    if checked.contains(&o.digest) {
                        continue;
                    }
                    match store.verified_object(o) {
                        Ok(_) => {
                            checked.insert(o.digest.clone());
                        }
                        Err(e) => problems.push(format!("{} output `{name}`: {e}", rec.label)),
                    }
                }
            }
        }
    }
    // Objects no record points to are still checked: a corrupt one must never be reused.
    for (digest, path, _) in store.objects() {
        if checked.contains(&digest) {
            continue;
        }
        match crate::cache::store::hash_file(&path) {
            Ok(h) if h == digest => {}
            Ok(h) => {
                let _ = std::fs::remove_file(&path);
                problems.push(format!("object {digest}: bytes hash to {h}; removed"));
            }
            Err(e) => problems.push(format!("object {digest}: {e}")),
        }
    }
    // A link or FIFO under an object's name is never an object and would be in its way.
    for p in store.remove_special_strays(false) {
        problems.push(format!("{}: a link or special file where objects are stored (never followed); removed", p.display()));
    }
    for p in store.strays() {
        problems.push(format!("{}: not an object (a wrong name or a folder); left alone", p.display()));
    }
    // Nor is one a lock file: a run refuses it (it never follows a link there), so it would
    // stop every run until removed. Runs make only regular files here, so removing the rest
    // races with nothing.
    for dir in [store.root.join("locks"), store.root.join("locks").join("runs")] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_file() || t.is_dir() {
                continue;
            }
            let done = match std::fs::remove_file(e.path()) {
                Ok(()) => "removed".to_string(),
                Err(err) => format!("cannot be removed: {err}"),
            };
            problems.push(format!("{}: a link or special file where lock files are kept (never followed); {done}", e.path().display()));
        }
    }
    let mut s = String::new();
    for p in &problems {
        s.push_str(&format!("problem: {p}\n"));
    }
    s.push_str(&format!("verify: {} records, {} objects checked, {} problems\n", records.len(), store.objects().len(), problems.len()));
    print_out(&s);
    if problems.is_empty() { Ok(()) } else { Err(Error::VerifyFailed(problems.len())) }
}

/// A reference of every kind: inputs, output, params with types and defaults.
pub fn kinds_text(c: &Catalog) -> String {
    let mut s = String::new();
    for k in &c.kinds {
        s.push_str(&format!("## {} (v{}) -> {}\n{}\n", k.name(), k.version(), k.output().name(), k.doc()));
        if !k.inputs().is_empty() {
            s.push_str("inputs:\n");
            for i in k.inputs() {
                s.push_str(&format!("  {:<10} {}{}: {}\n", i.name, i.artifact.name(), if i.required { "" } else { " (optional)" }, i.doc));
            }
        }
        s.push_str("params:\n");
        for p in k.params() {
            let d = (p.default)();
            let def = if d.is_null() { if p.optional { "unset".into() } else { "required".into() } } else { d.to_string() };
            s.push_str(&format!("  {:<18} {} [default: {}]: {}\n", p.name, p.ty.describe(), def, p.doc));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_and_overflow_is_an_error() {
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size(" 2G"), Ok(2 << 30));
        assert!(parse_size("99999999999999999G").unwrap_err().contains("too large"));
        assert!(parse_size("99999999999999999999999").unwrap_err().contains("too large"));
        assert!(parse_size("").unwrap_err().contains("expected a size"));
        assert!(parse_size("12Q").unwrap_err().contains("expected a size"));
    }
}
