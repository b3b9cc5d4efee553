//! `dag`, `status`, `gc`, `verify` and `kinds`.

use std::collections::{BTreeMap, BTreeSet};

use clap::{Args, ValueEnum};

use super::{PipelineArgs, load, make_plan, open_store, prepare, print_out};
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
    let store = open_store(cache)?;
    let p = prepare(&a, &store)?;
    let d = make_plan(&p, &store, false, &|_| false);
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
    /// Keep what these pipelines reference; everything else is removed.
    pipelines: Vec<std::path::PathBuf>,
    /// Without pipelines: remove the oldest entries until the cache is at most this many bytes
    /// (suffixes K, M, G accepted).
    #[arg(long, value_name = "SIZE")]
    max_size: Option<String>,
    /// Say what would be removed, remove nothing.
    #[arg(long)]
    dry_run: bool,
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok().map(|n| n * mult)
}

pub fn gc(cache: &std::path::Path, a: GcArgs) -> Result<()> {
    let store = open_store(cache)?;
    let records = store.records();
    let mut keep_keys: Option<BTreeSet<String>> = None;
    if !a.pipelines.is_empty() {
        let mut keep = BTreeSet::new();
        for p in &a.pipelines {
            let args = PipelineArgs { pipeline: p.clone(), sets: vec![], backend: None, rehash: false };
            let prep = prepare(&args, &store)?;
            for d in make_plan(&prep, &store, false, &|_| false) {
                if let Decision::Cached { key, .. } | Decision::Run { key, .. } = d {
                    keep.insert(key);
                }
            }
        }
        keep_keys = Some(keep);
    }
    let max = match &a.max_size {
        Some(s) => Some(parse_size(s).ok_or_else(|| Error::Usage(format!("--max-size {s}: expected a size like 500M or 2G")))?),
        None => None,
    };
    // Records to drop.
    let mut drop: BTreeSet<std::path::PathBuf> = BTreeSet::new();
    let mut live: Vec<(u64, std::path::PathBuf, crate::cache::ActionRecord)> = Vec::new();
    for (path, r) in records {
        match r {
            Err(_) => {
                drop.insert(path);
            }
            Ok(rec) => {
                if keep_keys.as_ref().is_some_and(|k| !k.contains(&rec.key)) {
                    drop.insert(path);
                } else {
                    live.push((rec.created, path, rec));
                }
            }
        }
    }
    let objects = store.objects();
    let size_of: BTreeMap<&str, u64> = objects.iter().map(|(d, _, s)| (d.as_str(), *s)).collect();
    if let Some(max) = max {
        live.sort_by_key(|x| x.0);
        let total = |live: &[(u64, std::path::PathBuf, crate::cache::ActionRecord)]| -> u64 {
            let refs: BTreeSet<&str> = live.iter().flat_map(|(_, _, r)| r.outputs.values().map(|o| o.digest.as_str())).collect();
            refs.iter().map(|d| size_of.get(d).copied().unwrap_or(0)).sum()
        };
        while !live.is_empty() && total(&live) > max {
            let (_, p, _) = live.remove(0);
            drop.insert(p);
        }
    }
    let referenced: BTreeSet<String> = live.iter().flat_map(|(_, _, r)| r.outputs.values().map(|o| o.digest.clone())).collect();
    let (mut freed, mut n_obj) = (0u64, 0usize);
    for (digest, path, size) in &objects {
        if !referenced.contains(digest) {
            freed += size;
            n_obj += 1;
            if !a.dry_run {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    if !a.dry_run {
        for p in &drop {
            let _ = std::fs::remove_file(p);
        }
        // Scratch folders of runs that were killed.
        if let Ok(rd) = std::fs::read_dir(store.tmp_dir()) {
            for e in rd.flatten() {
                let p = e.path();
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
    }
    print_out(&format!(
        "gc: {} {} records and {} objects, {} freed; {} records kept\n",
        if a.dry_run { "would remove" } else { "removed" },
        drop.len(),
        n_obj,
        human(freed),
        live.len()
    ));
    Ok(())
}

pub fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub fn verify(cache: &std::path::Path) -> Result<()> {
    let store = open_store(cache)?;
    let mut problems = Vec::new();
    let mut checked: BTreeSet<String> = BTreeSet::new();
    let records = store.records();
    for (path, r) in &records {
        match r {
            Err(e) => problems.push(format!("record {}: unreadable: {e}", path.display())),
            Ok(rec) => {
                if path.file_stem().and_then(|s| s.to_str()) != Some(rec.key.as_str()) {
                    problems.push(format!("record {}: holds key {}", path.display(), rec.key));
                }
                if rec.key_inputs.digest() != rec.key {
                    problems.push(format!("record {} ({}): key inputs hash to {}", rec.key, rec.label, rec.key_inputs.digest()));
                }
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
